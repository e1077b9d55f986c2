"""Crash-safe checkpoints: one file per round, written atomically, verified on load, no pickle.

``save(state_dir, round, payload)`` writes ``payload`` into ``checkpoint-{round:06d}.ckpt``
through a temporary file, fsync and ``os.replace``, then fsyncs the directory: a crash leaves the
old file or the new one, never half of one. The first line of the file holds a magic tag, the
round, the sha256 of the bytes after it and the length of its JSON part. The newest ``keep``
files are kept (the previous good one survives a corrupted newest one); older ones are removed.
Files are created 0600 and the state dir is made 0700: checkpoints hold the model and the trust
history.

The body is data, never code: a JSON document describing the payload's structure, followed by an
``.npz`` archive (read with ``allow_pickle=False``) holding its arrays. The JSON keeps dicts,
lists, strings, numbers, booleans and None as they are, and tags the rest: tuples, non-finite
floats, dicts whose keys are not plain strings, arrays and numpy scalars (by name of their
``.npz`` member), numpy random generators (by their bit generator's state) and dataclass
instances (by class name and fields). Loading a dataclass looks
the class up in a module that is already imported and fills its fields without calling its
code; a checkpoint that names anything else is refused. So write access to the state dir can
change the state a coordinator resumes with, but cannot run code in it. Checkpoints written by
earlier versions (pickles, tag ``FEDWARDEN-CHECKPOINT-1``) are not loaded.

``load_latest(state_dir)`` returns the payload of the newest checkpoint that verifies, logging
which file it used and any file it skipped (and removing temporary files a crash left
mid-write), or None when there is none. When checkpoint files exist but none verifies it
raises CheckpointError rather than let a run start again from round 0 over them.

Example::

    save("runs/serve", 3, {"coordinator": coordinator.state_dict(), "rounds": history})
    payload = load_latest("runs/serve")   # {"round": 3, "coordinator": ..., "rounds": ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.errors import UsageError
from fedwarden.server import faults

log = logging.getLogger("fedwarden.checkpoint")

MAGIC = b"FEDWARDEN-CHECKPOINT-2"
PICKLE_MAGIC = b"FEDWARDEN-CHECKPOINT-1"
_NAME = re.compile(r"^checkpoint-(\d{6,})\.ckpt$")
_TAG = "$"  # keys of tagged JSON objects start with it; plain dict keys that do are tagged too


class CheckpointError(UsageError):
    """A checkpoint file is truncated, corrupted or not a fedwarden checkpoint (the command
    line reports it in one line, like any problem with what the user gave it)."""


def path_for(state_dir: str | os.PathLike, round: int) -> Path:
    return Path(state_dir) / f"checkpoint-{round:06d}.ckpt"


def list_checkpoints(state_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file in ``state_dir``, newest first."""
    directory = Path(state_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save(state_dir: str | os.PathLike, round: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``payload`` (plus ``"round"``) as the checkpoint of ``round``; returns its path.

    Raises TypeError, naming where, if the payload holds a value a checkpoint cannot hold.
    """
    if round < 0:
        raise ValueError(f"round must be non-negative. Received: round={round}")
    directory = Path(state_dir)
    make_private(directory)
    arrays: dict[str, np.ndarray] = {}
    tree = json.dumps(_encode({**payload, "round": int(round)}, arrays, "payload"), allow_nan=False)
    archive = io.BytesIO()
    np.savez(archive, **arrays)
    body = tree.encode() + archive.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    header = b"%s %d %s %d\n" % (MAGIC, round, digest, len(tree.encode()))
    target = path_for(directory, round)
    _atomic_write(target, [header, body], fault=("checkpoint", round))
    for _, old in list_checkpoints(directory)[max(keep, 1) :]:
        old.unlink(missing_ok=True)
    return target


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of one checkpoint file; raises CheckpointError unless it verifies."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    header, sep, body = raw.partition(b"\n")
    parts = header.split(b" ")
    if parts[0] == PICKLE_MAGIC:
        raise CheckpointError(
            f"{path} is a pickle checkpoint of an earlier fedwarden version, which is not loaded "
            "(loading a pickle can run code)"
        )
    if not sep or len(parts) != 4 or parts[0] != MAGIC or not parts[3].isdigit():
        raise CheckpointError(f"{path} is not a fedwarden checkpoint (bad header)")
    if hashlib.sha256(body).hexdigest().encode() != parts[2]:
        raise CheckpointError(
            f"{path} is corrupted: sha256 of its {len(body)} bytes does not match"
        )
    size = int(parts[3])
    try:
        with np.load(io.BytesIO(body[size:]), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        payload = _decode(json.loads(body[:size]), arrays)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path} does not decode: {exc}") from None
    if not isinstance(payload, dict) or payload.get("round") != int(parts[1]):
        raise CheckpointError(f"{path}: payload does not match its header")
    return payload


def _encode(value: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    """``value`` as JSON-ready data; its arrays go into ``arrays`` (see the module docstring)."""
    if isinstance(value, np.ndarray | np.generic):  # first: np.float64 is a float
        if value.dtype.hasobject:
            raise TypeError(f"{where}: a checkpoint cannot hold an object array")
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(value)
        return {(_TAG + ("array" if isinstance(value, np.ndarray) else "scalar")): name}
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG + "float": repr(value)}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG + "tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith(_TAG) for k in value):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}
        return {_TAG + "dict": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")] for k, v in value.items()]}  # fmt: skip
    if isinstance(value, np.random.Generator):
        bits = value.bit_generator.state
        return {_TAG + "generator": _encode(bits, arrays, f"{where}.bit_generator.state")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), arrays, f"{where}.{f.name}")
                  for f in dataclasses.fields(value)}  # fmt: skip
        return {_TAG + "dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise TypeError(
        f"{where}: a checkpoint holds numbers, strings, arrays, lists, tuples, dicts and "
        f"dataclasses. Received: {type(value).__module__}.{type(value).__qualname__}"
    )


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith(_TAG)]
    if not tags:
        return {k: _decode(v, arrays) for k, v in value.items()}
    tag = tags[0][len(_TAG) :]
    content = value[tags[0]]
    if tag == "float":
        return float(content)
    if tag == "array":
        return arrays[content]
    if tag == "scalar":
        return arrays[content][()]
    if tag == "tuple":
        return tuple(_decode(v, arrays) for v in content)
    if tag == "dict":
        return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in content}
    if tag == "generator":
        return _generator(_decode(content, arrays))
    if tag == "dataclass":
        return _dataclass(content, {k: _decode(v, arrays) for k, v in value["fields"].items()})
    raise ValueError(f"unknown tag {tags[0]!r}")


def _hashable(key: Any) -> Any:
    return key.item() if isinstance(key, np.generic) else key


BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def _generator(state: dict[str, Any]) -> np.random.Generator:
    """A numpy Generator in ``state`` (``bit_generator.state``) of one of numpy's own bit
    generators."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in BIT_GENERATORS:
        raise ValueError(f"unknown bit generator {name!r}. Accepted values: {BIT_GENERATORS}")
    bits = getattr(np.random, name)()
    bits.state = state
    return np.random.Generator(bits)


def _dataclass(name: str, fields: dict[str, Any]) -> Any:
    """An instance of the dataclass ``module:qualname`` with ``fields``, if that module is
    already imported; its ``__init__`` and ``__post_init__`` are not called."""
    module_name, _, qualname = name.partition(":")
    cls: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{name} is not a dataclass of an imported module")
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != expected:
        raise ValueError(f"{name} has fields {sorted(expected)}. Received: {sorted(fields)}")
    instance = cls.__new__(cls)
    for key, item in fields.items():
        object.__setattr__(instance, key, item)
    return instance


def make_private_dir(directory: Path) -> None:
    """Creates ``directory`` with mode 0700, or takes group and others' access away from it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        directory.chmod(mode & 0o700)


def make_private(state_dir: str | os.PathLike) -> None:
    """The state dir 0700 and every file in it 0600 at most (the ledger and its -wal and -shm
    files, results.json, checkpoints): they hold the model and every client's trust history."""
    directory = Path(state_dir)
    make_private_dir(directory)
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            mode = stat.S_IMODE(entry.stat().st_mode)
            if mode & 0o077:
                entry.chmod(mode & 0o600)


def load_latest(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest checkpoint that verifies (falling back to older ones), or None if there is
    none at all; raises CheckpointError if there are some and none verifies. An existing state
    dir is made private first (``make_private``)."""
    directory = Path(state_dir)
    if directory.is_dir():
        make_private(directory)
        for stale in directory.glob(".checkpoint-*.tmp"):
            log.warning("removing %s, a checkpoint left half-written by a crash", stale.name)
            stale.unlink(missing_ok=True)
    found = list_checkpoints(state_dir)
    problems = []
    for round, path in found:
        try:
            payload = read(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint of round %d: %s", round, exc)
            problems.append(str(exc))
            continue
        log.info("resuming from %s (round %d)", path, round)
        return payload
    if found:
        raise CheckpointError(
            f"no checkpoint in {state_dir} verifies ({'; '.join(problems)}); restore one from "
            "a backup, or move them away to start the run again from round 0"
        )
    return None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes ``data`` as strict, indented JSON through tmp + fsync + replace.

    Numpy values become plain Python and NaN or infinite floats become ``null``, so every JSON
    parser reads the file (``json.dumps`` would otherwise write the non-standard ``NaN``).
    """
    text = json.dumps(jsonable(data), indent=2, allow_nan=False)
    _atomic_write(Path(path), [text.encode()])


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars (nested in dicts, lists, tuples) as plain Python,
    and NaN or infinite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(target: Path, parts: list[bytes], fault: tuple[str, int] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
                if fault:  # test-only: die with part of the file on disk (server/faults.py)
                    f.flush()
                    faults.point(*fault)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
