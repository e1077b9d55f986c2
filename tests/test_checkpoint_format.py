"""Checkpoints hold data, never code (issue 13, item 9): JSON plus an .npz archive, read without
pickle; the state dir is private (0700, files 0600, the ledger included)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import stat
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.server import checkpoint
from fedwarden.server.checkpoint import CheckpointError
from fedwarden.server.ledger import Ledger
from fedwarden.server.optimizers import ServerOptimizer

INITS: list[object] = []


@dataclass(frozen=True)
class Frozen:
    values: tuple
    count: int = 0

    def __post_init__(self):
        INITS.append(self)  # loading a checkpoint must not run it


def same(a, b) -> bool:
    """Equal in type and value, arrays by dtype, shape and bits (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray | np.generic):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")  # fmt: skip
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    if isinstance(a, np.random.Generator):
        return same(a.bit_generator.state, b.bit_generator.state)
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


PAYLOAD = {
    "weights": np.arange(12, dtype=np.float32).reshape(3, 4),
    "empty": np.zeros((0, 5), np.float32),
    "ints": np.array([2**62, -1], np.int64),
    "flags": np.array([True, False]),
    "names": np.array(["c00", "c01"]),
    "scalar": np.float32(0.25),
    "big": 2**64 - 1,
    "floats": [float("nan"), float("inf"), -float("inf"), 1e300, -0.0],
    "nested": {"tuple": (1, (2.5, "x"), None), "list": [True, {"deep": np.int64(3)}]},
    "int_keys": {1: "a", 2: (np.float64(0.5),)},
    "odd": {"$array": "not an array reference"},
    "rng": np.random.default_rng(5),
    "state": Frozen((np.ones(2), 3), count=4),
}


def test_a_payload_of_every_kind_comes_back_exactly(tmp_path):
    path = checkpoint.save(tmp_path, 7, PAYLOAD)
    inits = len(INITS)
    loaded = checkpoint.read(path)
    assert len(INITS) == inits
    assert loaded.pop("round") == 7
    assert same(loaded, PAYLOAD)
    assert loaded["weights"].flags.writeable


def test_the_file_is_json_and_an_npz_archive_without_pickle(tmp_path):
    raw = checkpoint.save(tmp_path, 1, PAYLOAD).read_bytes()
    header, _, body = raw.partition(b"\n")
    magic, round_, digest, size = header.split(b" ")
    assert magic == checkpoint.MAGIC and int(round_) == 1
    assert hashlib.sha256(body).hexdigest().encode() == digest
    text = body[: int(size)].decode()
    tree = json.loads(text)
    assert tree["weights"] == {"$array": tree["weights"]["$array"]}
    references = text.count('"$array"') + text.count('"$scalar"')
    with np.load(io.BytesIO(body[int(size) :]), allow_pickle=False) as archive:
        assert len(archive.files) == references - 1 > 8  # "odd" holds the tag as data
    assert b"\x80\x04" not in body[: int(size)] and b"\x80\x05" not in body  # no pickle stream


def write_raw(path, tree: dict, arrays: dict, magic=checkpoint.MAGIC, round=1):
    """A checkpoint file as save() lays it out, with any tree and arrays (object arrays too:
    numpy would pickle them into the archive)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=True)
            z.writestr(f"{name}.npy", member.getvalue())
    text = json.dumps({**tree, "round": round}).encode()
    body = text + archive.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    path.write_bytes(b"%s %d %s %d\n" % (magic, round, digest, len(text)) + body)


class Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_FILE'], 'w').write('ran')",))


def test_an_old_pickle_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("BOOM_FILE", str(marker))
    body = pickle.dumps({"round": 1, "x": Boom()})
    digest = hashlib.sha256(body).hexdigest().encode()
    path = checkpoint.path_for(tmp_path, 1)
    path.write_bytes(b"%s 1 %s\n" % (checkpoint.PICKLE_MAGIC, digest) + body)
    with pytest.raises(CheckpointError, match="pickle checkpoint of an earlier fedwarden"):
        checkpoint.read(path)
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        checkpoint.load_latest(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tree, arrays, problem",
    [
        (
            {"x": {"$dataclass": "fedwarden_evil:Payload", "fields": {}}},
            {},
            "not a dataclass of an imported module",
        ),  # fmt: skip
        ({"x": {"$dataclass": "os:system", "fields": {}}}, {}, "not a dataclass"),
        ({"x": {"$dataclass": f"{__name__}:Frozen", "fields": {"values": []}}}, {}, "has fields"),
        ({"x": {"$array": "a0"}}, {"a0": np.array([{"a": 1}], dtype=object)}, "does not decode"),
        ({"x": {"$array": "missing"}}, {}, "does not decode"),
        ({"x": {"$pickle": "gASV"}}, {}, "unknown tag"),
    ],
)
def test_a_checkpoint_naming_anything_but_data_is_refused(tmp_path, tree, arrays, problem):
    path = checkpoint.path_for(tmp_path, 1)
    write_raw(path, tree, arrays)
    with pytest.raises(CheckpointError, match=problem):
        checkpoint.read(path)
    assert "fedwarden_evil" not in sys.modules


def test_a_value_a_checkpoint_cannot_hold_is_named_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"payload\.chain\[1\].*builtins\.object"):
        checkpoint.save(tmp_path, 1, {"chain": (1, object())})
    with pytest.raises(TypeError, match="object array"):
        checkpoint.save(tmp_path, 1, {"x": np.array([None, 1])})


CHAINS = [
    "mean", "clip:max_norm=1+median", "trimmed_mean:trim_fraction=0.2", "centered_clipping:radius=1",
    "client_momentum+mean", "bucketing+median", "arc+mean", "mean+gaussian_noise:stddev=0.1",
    "central_dp:clip_norm=1.0,noise_multiplier=0.5,expected_clients=8,seed=3,adaptive=true", "krum:num_byzantine=1",
    "flame", "signguard",
]  # fmt: skip


@pytest.mark.parametrize("spec", CHAINS)
def test_every_chain_and_optimizer_state_survives_a_checkpoint(tmp_path, spec):
    try:
        chain = parse_chain(spec, num_byzantine_default=1)
    except Exception as exc:  # a step whose options differ: say which, do not hide it
        pytest.fail(f"{spec}: {exc}")
    rng = np.random.default_rng(0)
    state = chain.init()
    ids = [f"c{i:02d}" for i in range(8)]
    for _ in range(2):
        out = chain(rng.normal(size=(8, 30)).astype(np.float32), np.ones(8), state, ids)
        state = out.state
    optimizer = ServerOptimizer("fedadam", 0.1)
    weights, moments = optimizer.step(
        np.zeros(30, np.float32), np.ones(30, np.float32), optimizer.init(30)
    )
    payload = {"chain_state": state, "optimizer_state": moments}
    loaded = checkpoint.read(checkpoint.save(tmp_path, 2, payload))
    assert same(loaded["chain_state"], state), (loaded["chain_state"], state)
    assert same(loaded["optimizer_state"], moments)
    # and the restored state drives the chain exactly like the original
    updates = rng.normal(size=(8, 30)).astype(np.float32)
    a = chain(updates, np.ones(8), state, ids).updates
    b = chain(updates, np.ones(8), loaded["chain_state"], ids).updates
    np.testing.assert_array_equal(a, b)


def test_the_state_dir_and_its_files_are_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    results = state / "results.json"
    results.write_text("{}")
    results.chmod(0o644)
    with Ledger(state / "ledger.sqlite") as ledger:
        assert ledger.last_round() == 0
    assert stat.S_IMODE((state / "ledger.sqlite").stat().st_mode) == 0o600  # new ledgers
    (state / "ledger.sqlite").chmod(0o644)  # one made by an earlier version
    assert checkpoint.load_latest(state) is None  # what serve calls first
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for f in state.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    checkpoint.save(state, 1, {"x": 1})
    for f in state.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    fresh = tmp_path / "fresh" / "state"
    checkpoint.save(fresh, 1, {"x": 1})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
