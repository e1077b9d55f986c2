"""Crash-safe checkpoints: one file per round, written atomically, verified on load.

``save(state_dir, round, payload)`` pickles ``payload`` into ``checkpoint-{round:06d}.ckpt``
through a temporary file, fsync and ``os.replace``, then fsyncs the directory: a crash leaves the
old file or the new one, never half of one. The first line of the file holds a magic tag, the
round and the sha256 of the pickled bytes after it. The newest ``keep`` files are kept (the
previous good one survives a corrupted newest one); older ones are removed.

``load_latest(state_dir)`` returns the payload of the newest checkpoint whose checksum verifies,
logging which file it used and any file it skipped (and removing temporary files a crash left
mid-write), or None when there is none. When checkpoint files exist but none verifies it
raises CheckpointError rather than let a run start again from round 0 over them.

The payload is pickled (numpy arrays, optimizer and aggregation-chain state of any shape): a
state directory is trusted local storage, like the process's own memory. Never load a checkpoint
from an untrusted source.

Example::

    save("runs/serve", 3, {"coordinator": coordinator.state_dict(), "rounds": history})
    payload = load_latest("runs/serve")   # {"round": 3, "coordinator": ..., "rounds": ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.errors import UsageError
from fedwarden.server import faults

log = logging.getLogger("fedwarden.checkpoint")

MAGIC = b"FEDWARDEN-CHECKPOINT-1"
_NAME = re.compile(r"^checkpoint-(\d{6,})\.ckpt$")


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
    """Writes ``payload`` (plus ``"round"``) as the checkpoint of ``round``; returns its path."""
    if round < 0:
        raise ValueError(f"round must be non-negative. Received: round={round}")
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    body = pickle.dumps({**payload, "round": int(round)}, protocol=pickle.HIGHEST_PROTOCOL)
    header = b"%s %d %s\n" % (MAGIC, round, hashlib.sha256(body).hexdigest().encode())
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
    if not sep or len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path} is not a fedwarden checkpoint (bad header)")
    if hashlib.sha256(body).hexdigest().encode() != parts[2]:
        raise CheckpointError(
            f"{path} is corrupted: sha256 of its {len(body)} bytes does not match"
        )
    try:
        payload = pickle.loads(body)
    except Exception as exc:  # a checksum match makes this unlikely, but say so if it happens
        raise CheckpointError(f"{path} does not unpickle: {exc}") from None
    if not isinstance(payload, dict) or payload.get("round") != int(parts[1]):
        raise CheckpointError(f"{path}: payload does not match its header")
    return payload


def load_latest(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest checkpoint that verifies (falling back to older ones), or None if there is
    none at all; raises CheckpointError if there are some and none verifies."""
    directory = Path(state_dir)
    if directory.is_dir():
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
