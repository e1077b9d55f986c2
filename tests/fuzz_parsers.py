"""Coverage-guided fuzzing (atheris, libFuzzer) of what fedwarden parses from outside.

Targets:

- ``transfer``: chunk reassembly and vector decoding (fedwarden/protocol/transfer.py).
- ``update``: a whole SubmitUpdate stream into the servicer, then admission (server/service.py,
  server/admission.py): the messages are built from the fuzzer's bytes.
- ``idx``: the IDX reader of fedwarden/data/datasets.py, plain and gzipped.
- ``npz``, ``csv``: the agent's data loaders and validation (fedwarden/data/validation.py).

Each target accepts the parser's own error (TransferError, an aborted call, UsageError,
DataError) and checks the invariants of what it returns; any other exception is a finding, and
libFuzzer saves the input that caused it. Run one::

    .venv/bin/python tests/fuzz_parsers.py update -runs=100000
    .venv/bin/python tests/fuzz_parsers.py csv -max_total_time=600 -artifact_prefix=runs/fuzz/

tests/test_hostile.py runs every target for a few thousand inputs (more with FEDWARDEN_HEAVY=1).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["server", "clients", "simulations"]):
    import numpy as np

    from fedwarden.data.datasets import read_idx
    from fedwarden.data.validation import DataError, LocalData, load_csv, load_npz, validate
    from fedwarden.errors import UsageError
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.protocol.transfer import (
        VECTOR_DTYPES,
        Assembler,
        TransferError,
        decode_vector,
        encode_vector,
        sha256_hex,
    )
    from fedwarden.server.admission import ARRIVAL_REASONS, REASONS, admit
    from fedwarden.server.auth import Authenticator
    from fedwarden.server.hub import Hub
    from fedwarden.server.service import FederationServicer

from tests.deploy_helpers import OPERATOR_TOKEN, SPEC, TOKENS, Aborted, FakeContext, FakeLedger  # noqa: E402

SCRATCH = Path(tempfile.mkdtemp(prefix="fedwarden-fuzz-"))
DTYPES = [*VECTOR_DTYPES, "", "complex64", "float32 "]


def fuzz_transfer(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    declared = fdp.ConsumeIntInRange(0, 4096)
    assembler = Assembler(declared)
    sent = []
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            seq = fdp.ConsumeIntInRange(0, 10)
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024))
            assembler.add(seq, chunk)
            sent.append(chunk)
        payload = b"".join(sent)
        digest = sha256_hex(payload) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(64)
        out = assembler.finish(digest)
    except TransferError:
        return
    assert out == payload and hashlib.sha256(out).hexdigest() == digest.lower()
    try:
        vector = decode_vector(out, DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
    except TransferError:
        return
    assert vector.size * vector.dtype.itemsize == len(out)


class _Round:
    """A servicer with every client registered and round 2 open for c00..c02."""

    def __init__(self) -> None:
        self.hub = Hub(5)
        self.refused: list[tuple[str, str, str]] = []
        self.late: list[tuple[str, str]] = []
        self.hub.on_late = lambda cid, task: self.late.append((cid, task))
        self.servicer = FederationServicer(
            self.hub,
            Authenticator(TOKENS, {"ops": OPERATOR_TOKEN}),
            SPEC,
            FakeLedger(),
            max_update_bytes=SPEC.num_weights * 8,
            on_rejected=lambda *args: self.refused.append(args),
        )
        self.sessions = {
            cid: self.servicer.Register(
                pb.RegisterRequest(client_id=cid), FakeContext(tok)
            ).session_id
            for cid, tok in TOKENS.items()
        }
        self.old = self.hub.publish(1, 0, ["c00", "c01", "c02"], b"", sha256_hex(b"")).task_id
        self.hub.collect(0, time.monotonic())
        self.task = self.hub.publish(2, 0, ["c00", "c01", "c02"], b"", sha256_hex(b"")).task_id


def _update_messages(fdp: atheris.FuzzedDataProvider, r: _Round) -> list[pb.UpdateChunk]:
    n = SPEC.num_weights
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:  # a plausible update, maybe poisoned with NaN or huge values
        values = np.array(fdp.ConsumeFloatListInRange(n, -1e38, 1e38), np.float32)
        payload = encode_vector(values)
    elif kind == 1:
        payload = encode_vector(np.array(fdp.ConsumeRegularFloatList(n)), "float64")
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3 * n))
    msgs = []
    for _ in range(fdp.ConsumeIntInRange(1, 10)):
        part = fdp.ConsumeIntInRange(0, 5)
        if part == 0:
            sizes = [len(payload), 0, 2**64 - 1, fdp.ConsumeIntInRange(0, 5000)]
            header = pb.UpdateHeader(
                session_id=fdp.PickValueInList([*r.sessions.values(), "", "zz"]),
                task_id=fdp.PickValueInList([r.task, r.old, "", "x-2-0"]),
                round=fdp.ConsumeIntInRange(0, 3),
                num_examples=fdp.ConsumeIntInRange(0, 2**64 - 1),
                dtype=fdp.PickValueInList(DTYPES),
                total_size=fdp.PickValueInList(sizes),
            )
            if fdp.ConsumeBool():
                header.loss = fdp.ConsumeFloat()
            msgs.append(pb.UpdateChunk(header=header))
        elif part <= 3:
            start = fdp.ConsumeIntInRange(0, max(len(payload), 1))
            size = fdp.ConsumeIntInRange(0, 2048)
            chunk = pb.Chunk(seq=fdp.ConsumeIntInRange(0, 4), data=payload[start : start + size])
            msgs.append(pb.UpdateChunk(chunk=chunk))
        else:
            digest = (
                sha256_hex(payload) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(64)
            )
            msgs.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest)))
    return msgs


def fuzz_update(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    r = _Round()
    token = fdp.PickValueInList([*TOKENS.values(), OPERATOR_TOKEN, "x" * 32, ""])
    msgs = _update_messages(fdp, r)
    try:
        reply = r.servicer.SubmitUpdate(iter(msgs), FakeContext(token or None))
    except Aborted as exc:
        assert len(r.refused) == 1 and r.refused[0][1] in ARRIVAL_REASONS, r.refused
        assert r.refused[0][2] == exc.details and not r.hub._collected.updates
        return
    assert not r.refused
    collected = r.hub._collected.updates
    if reply.status == pb.SubmitReply.LATE:
        assert r.late and not collected
        return
    assert reply.status in (pb.SubmitReply.ACCEPTED, pb.SubmitReply.REJECTED) and collected
    updates, _ = r.hub.collect(0, time.monotonic())
    admitted, rejected = admit(updates, 2, {"c00", "c01", "c02"}, SPEC.num_weights)
    assert all(x.reason in REASONS for x in rejected)
    for u in admitted:
        assert u.delta.shape == (SPEC.num_weights,) and np.isfinite(u.delta).all()


def fuzz_idx(data: bytes) -> None:
    if not data:
        return
    path = SCRATCH / ("f.gz" if data[0] & 1 else "f")
    path.write_bytes(data[1:])
    try:
        array = read_idx(path)
    except UsageError:
        return
    assert array.dtype == np.uint8


def _check(loaded: LocalData, fdp: atheris.FuzzedDataProvider) -> None:
    shape = fdp.PickValueInList([None, (1,), (2,), (2, 2), (3,), (64,), (8, 8, 1)])
    classes = fdp.PickValueInList([None, 1, 2, 10])
    value_range = fdp.PickValueInList([None, (0.0, 1.0)])
    checked = validate(loaded, shape, classes, value_range)
    assert checked.x.dtype == np.float32 and checked.y.dtype == np.int64
    assert len(checked.x) == len(checked.y) == checked.total - checked.skipped
    if len(checked.y):
        assert np.isfinite(checked.x).all() and (checked.y >= 0).all()
        if classes is not None:
            assert (checked.y < classes).all()
        if value_range is not None:
            assert ((checked.x >= 0) & (checked.x <= 1)).all()
    for p in checked.problems:
        assert p.message and p.count >= 1 and (not p.rows or p.count == len(p.rows))


def _array(raw: bytes, dtype: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer(raw[: len(raw) - len(raw) % size], dtype)


def fuzz_npz(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = SCRATCH / "f.npz"
    if fdp.ConsumeBool():  # a real archive of fuzzed arrays
        dtype = fdp.PickValueInList(["<f4", ">f8", "<i4", "u1", "<f2", "?", "<c8", "<U2"])
        rows = fdp.ConsumeIntInRange(0, 8)
        x = _array(fdp.ConsumeBytes(rows * 4 * np.dtype(dtype).itemsize), dtype)
        x = x[: len(x) - len(x) % 4].reshape(-1, 2, 2) if fdp.ConsumeBool() else x
        y = _array(fdp.ConsumeBytes(rows * 8), fdp.PickValueInList(["<i8", "<f8", "u1"]))
        with path.open("wb") as f:
            np.savez(f, x=x, y=y)
        raw = path.read_bytes()
        if fdp.ConsumeBool() and raw:  # then damage it
            at = fdp.ConsumeIntInRange(0, len(raw) - 1)
            raw = raw[:at] + fdp.ConsumeBytes(8) + raw[at + 8 :]
            path.write_bytes(raw)
    else:
        path.write_bytes(fdp.ConsumeBytes(4096))
    try:
        x, y = load_npz(path)
    except DataError:
        return
    _check(LocalData(x, y, str(path)), fdp)


def fuzz_csv(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = SCRATCH / "f.csv"
    path.write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)))
    try:
        loaded = load_csv(path)
    except DataError:
        return
    _check(loaded, fdp)


TARGETS = {
    "transfer": fuzz_transfer,
    "update": fuzz_update,
    "idx": fuzz_idx,
    "npz": fuzz_npz,
    "csv": fuzz_csv,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz_parsers.py {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
