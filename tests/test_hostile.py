"""Hostile clients (issue 9): what a client can send the coordinator, and what comes of it.

Property-based tests (hypothesis) drive the chunk reassembly, vector decoding and the servicer's
SubmitUpdate with generated and mutated streams; named cases cover each hostile move the issue
lists and check that it is refused with its reason, counted, kept out of the ledger and the
checkpoint, and that the honest agents of the same round are served. A few tests use real
sockets (a cut upload, one identity flooding the worker threads). The coverage-guided fuzzer
(atheris) for the same parsers is tests/fuzz_parsers.py; ``test_fuzzers_find_nothing`` runs it.

``FEDWARDEN_HEAVY=1`` runs more examples and longer fuzz runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedwarden.aggregation.chain import parse_chain
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
from fedwarden.protocol.transfer import (
    Assembler,
    TransferError,
    decode_vector,
    encode_vector,
    sha256_hex,
)
from fedwarden.server import checkpoint
from fedwarden.server.admission import ARRIVAL_REASONS, REASONS, admit
from fedwarden.server.auth import Authenticator
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.hub import Hub
from fedwarden.server.ledger import Ledger
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.service import FederationServicer
from fedwarden.server.trust import TrustBook, TrustPolicy
from tests.deploy_helpers import (
    OPERATOR_TOKEN,
    ROOT,
    SPEC,
    TOKENS,
    Aborted,
    FakeContext,
    FakeLedger,
    poll,
    subprocess_env,
)

HEAVY = os.environ.get("FEDWARDEN_HEAVY") == "1"
EXAMPLES = 2000 if HEAVY else 150
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
N = SPEC.num_weights
HONEST = ("c00", "c01")
HOSTILE = "c02"  # selected, like the honest ones
OUTSIDER = "c03"  # not selected


# -- chunk reassembly and decoding -----------------------------------------------------------


def chunks_of(payload: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(i, payload[s : s + size]) for i, s in enumerate(range(0, len(payload), size))]


@PROPERTY
@given(
    payload=st.binary(min_size=1, max_size=2000),
    size=st.integers(1, 300),
    order=st.randoms(use_true_random=False),
)
def test_reassembly_is_exact_or_refused(payload, size, order):
    """In order: the payload, exactly. Any other order, a drop or a duplicate: TransferError."""
    chunks = chunks_of(payload, size)
    assembler = Assembler(len(payload))
    for seq, data in chunks:
        assembler.add(seq, data)
    assert assembler.finish(sha256_hex(payload)) == payload

    mutated = list(chunks)
    move = order.randrange(4)
    if move == 0 and len(mutated) > 1:  # shuffle until the order differs
        while mutated == chunks:
            order.shuffle(mutated)
    elif move == 1:  # drop one chunk
        del mutated[order.randrange(len(mutated))]
    elif move == 2:  # repeat one chunk
        i = order.randrange(len(mutated))
        mutated.insert(i, mutated[i])
    else:  # renumber one chunk
        i = order.randrange(len(mutated))
        mutated[i] = (mutated[i][0] + order.randint(1, 5), mutated[i][1])
    if mutated == chunks:
        return
    with pytest.raises(TransferError):
        assembler = Assembler(len(payload))
        for seq, data in mutated:
            assembler.add(seq, data)
        assembler.finish(sha256_hex(payload))


@PROPERTY
@given(
    payload=st.binary(min_size=1, max_size=500),
    cut=st.integers(0, 499),
    flip=st.integers(0, 499),
    declared=st.integers(0, 2**64 - 1),
)
def test_truncated_flipped_or_misdeclared_payloads_never_pass(payload, cut, flip, declared):
    digest = sha256_hex(payload)
    short = payload[: cut % len(payload)]
    with pytest.raises(TransferError):
        assembler = Assembler(len(payload))
        assembler.add(0, short)
        assembler.finish(digest)
    damaged = bytearray(payload)
    damaged[flip % len(payload)] ^= 0x5A
    with pytest.raises(TransferError, match="sha256"):
        assembler = Assembler(len(payload))
        assembler.add(0, bytes(damaged))
        assembler.finish(digest)
    if declared != len(payload):
        with pytest.raises(TransferError):
            assembler = Assembler(declared)
            assembler.add(0, payload)
            assembler.finish(digest)


@PROPERTY
@given(payload=st.binary(max_size=256), dtype=st.sampled_from(["float32", "float64", "int32", "float16", "int64", "complex64", ""]))  # fmt: skip
def test_decoding_gives_whole_values_or_a_transfer_error(payload, dtype):
    try:
        vector = decode_vector(payload, dtype)
    except TransferError:
        return
    assert vector.ndim == 1 and vector.size * vector.dtype.itemsize == len(payload)
    assert vector.dtype.byteorder in ("=", "|")


# -- the servicer under generated streams ----------------------------------------------------


@dataclass
class Bench:
    """A servicer and hub with three registered agents and round 2 open (round 1 closed)."""

    hub: Hub
    servicer: FederationServicer
    sessions: dict[str, str]
    old_task: str
    task: str
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    late: list[tuple[str, str]] = field(default_factory=list)


def make_bench(selected: tuple[str, ...] = (*HONEST, HOSTILE), **kwargs) -> Bench:
    hub = Hub(5)
    refused: list[tuple[str, str, str]] = []
    late: list[tuple[str, str]] = []
    hub.on_late = lambda cid, task: late.append((cid, task))
    servicer = FederationServicer(
        hub,
        Authenticator(TOKENS, {"ops": OPERATOR_TOKEN}),
        SPEC,
        FakeLedger(),
        max_update_bytes=N * 8,
        on_rejected=lambda *args: refused.append(args),
        **kwargs,
    )
    sessions = {
        cid: servicer.Register(pb.RegisterRequest(client_id=cid), FakeContext(tok)).session_id
        for cid, tok in TOKENS.items()
    }
    weights = encode_vector(np.zeros(N))
    old = hub.publish(1, 0, list(selected), weights, sha256_hex(weights))
    hub.collect(0, time.monotonic())
    hub.set_last_round(1)
    task = hub.publish(2, 0, list(selected), weights, sha256_hex(weights))
    return Bench(hub, servicer, sessions, old.task_id, task.task_id, refused, late)


def header(bench: Bench, cid: str, payload: bytes, **overrides) -> pb.UpdateChunk:
    fields = dict(
        session_id=bench.sessions[cid],
        task_id=bench.task,
        round=2,
        num_examples=10,
        loss=0.5,
        dtype="float32",
        total_size=len(payload),
    )
    fields.update(overrides)
    return pb.UpdateChunk(header=pb.UpdateHeader(**fields))


def stream(
    bench: Bench, cid: str, payload: bytes, chunk: int = 256, **overrides
) -> list[pb.UpdateChunk]:
    """A well-formed upload of ``payload`` (header fields may be overridden)."""
    msgs = [header(bench, cid, payload, **overrides)]
    msgs += [pb.UpdateChunk(chunk=pb.Chunk(seq=s, data=d)) for s, d in chunks_of(payload, chunk)]
    if not payload:
        msgs.append(pb.UpdateChunk(chunk=pb.Chunk(seq=0, data=b"")))
    msgs.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256_hex(payload))))
    return msgs


@dataclass
class Sent:
    reply: pb.SubmitReply | None
    aborted: Aborted | None


def send(bench: Bench, msgs: list[pb.UpdateChunk], token: str | None) -> Sent:
    try:
        return Sent(bench.servicer.SubmitUpdate(iter(msgs), FakeContext(token)), None)
    except Aborted as exc:
        return Sent(None, exc)


MUTATIONS = ("none", "drop", "swap", "repeat", "truncate", "flip", "no_trailer", "extra_header",
             "bad_digest", "size", "seq", "dtype", "session", "task", "round", "empty")  # fmt: skip


def mutate(msgs: list[pb.UpdateChunk], how: str, rng, bench: Bench) -> list[pb.UpdateChunk]:
    msgs = [type(m).FromString(m.SerializeToString()) for m in msgs]  # deep copies
    body = list(range(1, len(msgs) - 1))  # indexes of the chunks
    if not body and how in ("drop", "swap", "repeat", "flip", "extra_header", "seq"):
        return msgs
    i = rng.choice(body) if body else 0
    head = msgs[0].header
    if how == "drop":
        del msgs[i]
    elif how == "swap" and len(body) > 1:
        j = rng.choice([b for b in body if b != i])
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif how == "repeat":
        msgs.insert(i, msgs[i])
    elif how == "truncate":
        msgs = msgs[: rng.randint(0, len(msgs) - 1)]
    elif how == "flip" and msgs[i].chunk.data:
        data = bytearray(msgs[i].chunk.data)
        data[rng.randrange(len(data))] ^= 0xFF
        msgs[i].chunk.data = bytes(data)
    elif how == "no_trailer":
        msgs.pop()
    elif how == "extra_header":
        msgs.insert(i, pb.UpdateChunk(header=head))
    elif how == "bad_digest":
        msgs[-1].trailer.sha256 = rng.choice(["", "0" * 64, "zz", msgs[-1].trailer.sha256[::-1]])
    elif how == "size":
        head.total_size = rng.choice(
            [0, 1, max(0, head.total_size - 1), (head.total_size + 4) % 2**64, 2**64 - 1]
        )
    elif how == "seq":
        msgs[i].chunk.seq = rng.choice(
            [(msgs[i].chunk.seq + 1) % 2**64, 2**64 - 1, 0 if i > 1 else 7]
        )
    elif how == "dtype":
        head.dtype = rng.choice(["float64", "int32", "float16", "", "float32 ", "complex64"])
    elif how == "session":
        head.session_id = rng.choice(["", "0" * 16, bench.sessions[OUTSIDER]])
    elif how == "task":
        head.task_id = rng.choice(["", bench.old_task, bench.task + "x"])
    elif how == "round":
        head.round = rng.choice([0, 1, 3, 2**32 - 1])
    elif how == "empty":
        msgs = []
    return msgs


@PROPERTY
@given(
    values=st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=0, max_size=N + 2
    ),
    chunk=st.integers(1, 2000),
    hows=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
    rng=st.randoms(use_true_random=False),
    token=st.sampled_from([TOKENS[HOSTILE], TOKENS[HOSTILE], "x" * 32, OPERATOR_TOKEN, None]),
)
def test_every_upload_is_accepted_or_refused_with_a_reason(values, chunk, hows, rng, token):
    """Whatever arrives, SubmitUpdate answers or aborts with a counted reason; what it takes
    into the round is exactly what the sender's digest covers; admission names every problem."""
    bench = make_bench()
    payload = encode_vector(np.array(values, np.float32))
    msgs = stream(bench, HOSTILE, payload, chunk)
    for how in hows:
        if msgs:
            msgs = mutate(msgs, how, rng, bench)
    sent = send(bench, msgs, token)
    collected = bench.hub._collected.updates
    if sent.aborted is not None:
        assert sent.aborted.code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.DATA_LOSS,
        ), sent.aborted
        assert len(bench.refused) == 1 and bench.refused[0][1] in ARRIVAL_REASONS
        assert bench.refused[0][2] == sent.aborted.details and not collected
        return
    assert not bench.refused
    if sent.reply.status == pb.SubmitReply.LATE:
        assert bench.late and not collected
        return
    (update,) = collected
    assert update.client_id == HOSTILE  # whoever the stream claims to be
    if sent.reply.status == pb.SubmitReply.ACCEPTED:
        trailer = next(m.trailer for m in msgs if m.WhichOneof("part") == "trailer")
        raw = update.delta.astype(update.delta.dtype.newbyteorder("<")).tobytes()
        assert hashlib.sha256(raw).hexdigest() == trailer.sha256.lower()
    else:
        assert sent.reply.status == pb.SubmitReply.REJECTED and "exceeds the limit" in (
            sent.reply.detail
        )
    updates, _ = bench.hub.collect(0, time.monotonic())
    admitted, rejected = admit(updates, 2, {*HONEST, HOSTILE}, N)
    assert all(r.reason in REASONS and r.detail for r in rejected)
    for u in admitted:
        assert u.delta.shape == (N,) and np.isfinite(u.delta).all() and u.round == 2


def test_the_unmutated_stream_is_accepted_intact():
    bench = make_bench()
    delta = np.linspace(-1, 1, N).astype(np.float32)
    sent = send(bench, stream(bench, HOSTILE, encode_vector(delta), 100), TOKENS[HOSTILE])
    assert sent.reply.status == pb.SubmitReply.ACCEPTED
    (update,) = bench.hub._collected.updates
    assert np.array_equal(update.delta, delta) and not bench.refused


# -- each hostile move in a full round: reason, count, ledger, checkpoint ---------------------


def good(scale: float) -> bytes:
    return encode_vector(np.full(N, scale, np.float32))


def nan_payload() -> bytes:
    v = np.ones(N, np.float32)
    v[[3, 50]] = [np.nan, np.inf]
    return encode_vector(v)


def swapped(b: Bench) -> list[pb.UpdateChunk]:
    msgs = stream(b, HOSTILE, good(1), 200)
    msgs[1], msgs[2] = msgs[2], msgs[1]
    return msgs


@dataclass(frozen=True)
class Move:
    name: str
    make: Callable[[Bench], list[pb.UpdateChunk]]
    token: str | None
    reason: str
    at: str  # "arrival" (refused by the transport) or "admission" (charged to trust)
    sender: str = HOSTILE


MOVES = [
    Move("truncated", lambda b: stream(b, HOSTILE, good(1), 200)[:3], TOKENS[HOSTILE], "damaged_stream", "arrival"),  # noqa: E501
    Move("wrong chunk order", swapped, TOKENS[HOSTILE], "damaged_stream", "arrival"),
    Move("bad digest", lambda b: stream(b, HOSTILE, good(1))[:-1] + [pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256="0" * 64))], TOKENS[HOSTILE], "damaged_stream", "arrival"),  # noqa: E501
    Move("no header", lambda b: stream(b, HOSTILE, good(1))[1:], TOKENS[HOSTILE], "damaged_stream", "arrival"),  # noqa: E501
    Move("oversized", lambda b: [header(b, HOSTILE, b"", total_size=2**64 - 1)], TOKENS[HOSTILE], "oversized", "admission"),  # noqa: E501
    Move("wrong shape", lambda b: stream(b, HOSTILE, encode_vector(np.ones(N - 1))), TOKENS[HOSTILE], "wrong_shape", "admission"),  # noqa: E501
    Move("wrong dtype", lambda b: stream(b, HOSTILE, np.ones(N, np.int32).tobytes(), dtype="int32"), TOKENS[HOSTILE], "wrong_dtype", "admission"),  # noqa: E501
    Move("unknown dtype", lambda b: stream(b, HOSTILE, good(1), dtype="complex64"), TOKENS[HOSTILE], "wrong_dtype", "arrival"),  # noqa: E501
    Move("NaN and Inf", lambda b: stream(b, HOSTILE, nan_payload()), TOKENS[HOSTILE], "non_finite", "admission"),  # noqa: E501
    Move("replay of round 1's task", lambda b: stream(b, HOSTILE, good(1), round=1, task_id=b.old_task), TOKENS[HOSTILE], "late", "arrival"),  # noqa: E501
    Move("round 1 under round 2's task", lambda b: stream(b, HOSTILE, good(1), round=1), TOKENS[HOSTILE], "wrong_round", "admission"),  # noqa: E501
    Move("not selected", lambda b: stream(b, OUTSIDER, good(1)), TOKENS[OUTSIDER], "not_selected", "admission", OUTSIDER),  # noqa: E501
    Move("another's session", lambda b: stream(b, HONEST[0], good(5)), TOKENS[OUTSIDER], "unknown_session", "arrival", OUTSIDER),  # noqa: E501
    Move("invalid token", lambda b: stream(b, HONEST[0], good(5)), "z" * 32, "unauthenticated", "arrival", ""),  # noqa: E501
    Move("operator token", lambda b: stream(b, HONEST[0], good(5)), OPERATOR_TOKEN, "unauthenticated", "arrival", ""),  # noqa: E501
]  # fmt: skip


def run_round(tmp_path, moves: list[Move]) -> tuple[Coordinator, Ledger, Bench, list]:
    """Round 2 of a coordinator: the honest agents upload, then each move is made."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    coordinator = Coordinator(
        np.zeros(N, np.float32),
        parse_chain("mean"),
        ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy(), ledger),
    )
    coordinator.round = 1
    bench = make_bench()
    for i, cid in enumerate(HONEST):
        sent = send(bench, stream(bench, cid, good(0.1 * (i + 1))), TOKENS[cid])
        assert sent.reply.status == pb.SubmitReply.ACCEPTED
    sent = [send(bench, move.make(bench), move.token) for move in moves]
    updates, complete = bench.hub.collect(2, time.monotonic() + 0.05)
    assert complete
    outcome = coordinator.finish_round(2, [*HONEST, HOSTILE], updates)
    checkpoint.save(tmp_path, 2, {"coordinator": coordinator.state_dict()})
    return coordinator, ledger, bench, [outcome, sent]


@pytest.fixture(scope="module")
def honest_only(tmp_path_factory):
    coordinator, ledger, _, _ = run_round(tmp_path_factory.mktemp("honest"), [])
    rows = {r["client_id"]: r for r in ledger.round_rows(2)}
    ledger.close()
    return coordinator.weights.copy(), rows


@pytest.mark.parametrize("move", MOVES, ids=[m.name for m in MOVES])
def test_a_hostile_move_is_refused_counted_and_kept_out(tmp_path, move, honest_only):
    coordinator, ledger, bench, (outcome, (sent,)) = run_round(tmp_path, [move])
    reference_weights, reference_rows = honest_only
    # refused with its reason, and counted where the coordinator counts it
    if move.at == "arrival":
        refused = bench.refused + [(c, "late", t) for c, t in bench.late]
        assert [(c, r) for c, r, _ in refused] == [(move.sender, move.reason)]
        assert not outcome.rejected
    else:
        assert [(r.client_id, r.reason) for r in outcome.rejected] == [(move.sender, move.reason)]
        assert outcome.rejected[0].detail and not bench.refused
    if sent.aborted is not None:
        assert sent.aborted.details
    else:
        assert sent.reply.status in (
            pb.SubmitReply.ACCEPTED,
            pb.SubmitReply.LATE,
            pb.SubmitReply.REJECTED,
        )
    # the honest agents were served as if nothing happened
    assert outcome.admitted == list(HONEST)
    np.testing.assert_array_equal(coordinator.weights, reference_weights)
    saved = checkpoint.load_latest(tmp_path)["coordinator"]["weights"]
    np.testing.assert_array_equal(saved, reference_weights)
    rows = {r["client_id"]: r for r in ledger.round_rows(2)}
    for cid in HONEST:
        assert rows[cid] == reference_rows[cid]
    # the ledger holds the charge of an admission rejection, and nothing else from the sender
    hostile = {c: r for c, r in rows.items() if c not in HONEST}
    if move.at == "admission":
        (row,) = hostile.values()
        assert row["client_id"] == move.sender and row["rejected_reason"] == move.reason
        assert row["norm"] is None and row["cosine"] is None  # nothing measured from it
    else:
        assert not hostile
    ledger.close()


def test_all_moves_at_once_still_leave_the_honest_round_intact(tmp_path, honest_only):
    coordinator, ledger, bench, (outcome, sent) = run_round(tmp_path, MOVES)
    np.testing.assert_array_equal(coordinator.weights, honest_only[0])
    assert outcome.admitted == list(HONEST)
    # every move is counted once: after the first update of a client, the others count as
    # duplicates (kept as evidence, not as payload)
    assert len(bench.refused) + len(bench.late) + len(outcome.rejected) == len(MOVES)
    ledger.close()


# -- real sockets ----------------------------------------------------------------------------


@pytest.fixture
def live():
    """A servicer on a real port with a small worker pool (8 threads)."""
    bench = make_bench()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FederationServicer_to_server(bench.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channels: list[grpc.Channel] = []

    def stub() -> pb_grpc.FederationStub:
        # a channel of its own (own subchannel pool): one TCP connection per client
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        channels.append(channel)
        return pb_grpc.FederationStub(channel)

    yield bench, stub
    for channel in channels:
        channel.close()
    server.stop(0).wait()


def meta(cid: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[cid]}"),)


def stalled(msgs: list[pb.UpdateChunk], release: threading.Event) -> Iterator[pb.UpdateChunk]:
    """Sends ``msgs``, then holds the stream open until ``release`` is set."""
    yield from msgs
    release.wait(30)


def test_an_upload_cut_off_midway_is_counted_and_the_agent_can_send_again(live):
    bench, stub = live
    payload = good(1)
    release = threading.Event()
    client = stub()
    call = client.SubmitUpdate.future(
        stalled(stream(bench, HOSTILE, payload, 100)[:3], release), metadata=meta(HOSTILE)
    )
    time.sleep(0.3)  # let the first chunks arrive (a fixed pause: the cut must come mid-stream)
    call.cancel()  # the agent dies: its connection goes away mid-upload
    release.set()
    poll(lambda: bench.refused, 10, "the cut upload to be counted")
    assert [(c, r) for c, r, _ in bench.refused] == [(HOSTILE, "damaged_stream")]
    assert not bench.hub._collected.updates
    # the agent restarts, registers again and submits the same round
    again = stub()
    session = again.Register(
        pb.RegisterRequest(client_id=HOSTILE), metadata=meta(HOSTILE), timeout=5
    ).session_id
    bench.sessions[HOSTILE] = session
    reply = again.SubmitUpdate(
        iter(stream(bench, HOSTILE, payload)), metadata=meta(HOSTILE), timeout=5
    )
    assert reply.status == pb.SubmitReply.ACCEPTED
    assert [u.client_id for u in bench.hub._collected.updates] == [HOSTILE]


def test_one_identity_cannot_take_every_worker_from_the_honest_agents(live):
    """The hostile agent opens 12 uploads that never finish on an 8-thread server: 4 are held,
    the rest are refused as busy, and the honest agents still fetch their task and upload."""
    bench, stub = live
    release = threading.Event()
    hostile = stub()
    calls = [
        hostile.SubmitUpdate.future(
            stalled(stream(bench, HOSTILE, good(1))[:1], release), metadata=meta(HOSTILE)
        )
        for _ in range(12)
    ]
    try:
        busy = poll(
            lambda: [r for r in bench.refused if r[1] == "busy"] if len(bench.refused) >= 8 else 0,
            20,
            "the extra uploads to be refused",
        )
        assert len(busy) == 8 and all(c == HOSTILE for c, _, _ in busy)
        for cid in HONEST:
            honest = stub()
            task = list(
                honest.GetTask(
                    pb.TaskRequest(session_id=bench.sessions[cid], wait_s=1),
                    metadata=meta(cid),
                    timeout=10,
                )
            )
            assert task[0].header.status == pb.TaskHeader.TASK
            reply = honest.SubmitUpdate(
                iter(stream(bench, cid, good(0.1))), metadata=meta(cid), timeout=10
            )
            assert reply.status == pb.SubmitReply.ACCEPTED
        # unauthenticated callers are turned away at once, whatever their number
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as err:
                stub().SubmitUpdate(
                    iter(stream(bench, HONEST[0], good(9))),
                    metadata=(("authorization", "Bearer " + "q" * 32),),
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        release.set()
    for call in calls:
        try:
            call.result(timeout=10)
        except grpc.RpcError:
            pass
    assert sorted(u.client_id for u in bench.hub._collected.updates) == sorted(HONEST)


# -- the coverage-guided fuzzer --------------------------------------------------------------


@pytest.mark.parametrize("target", ["transfer", "update", "idx", "npz", "csv"])
def test_fuzzers_find_nothing(target, tmp_path):
    """atheris (libFuzzer) on each parser: a crash (an exception other than the parser's own
    error, or a broken invariant) fails the run and leaves the input in tmp_path."""
    pytest.importorskip("atheris")
    runs = 50_000 if HEAVY else 3_000
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/fuzz_parsers.py"), target, f"-runs={runs}",
         f"-artifact_prefix={tmp_path}/", "-max_len=4096", "-seed=1"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
        env={**subprocess_env(), "TMPDIR": str(tmp_path)},  # the fuzzer's scratch files
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {runs} runs" in proc.stderr


# -- a real coordinator process: every refusal reaches /metrics, the rounds go on -------------


@pytest.mark.integration
def test_a_live_coordinator_counts_each_hostile_upload_and_finishes_its_rounds(tmp_path, procs):
    from fedwarden.server.ledger import Ledger
    from tests.deploy_helpers import Proc, metrics_text
    from tests.load_harness import AgentPool, serve_args, write_client_data, write_tokens

    light, hostile = ["c00", "c01", "c02"], "c03"
    files = write_client_data(tmp_path / "data", [*light, hostile])
    tokens = write_tokens(tmp_path / "tokens.toml", [*light, hostile])
    state = tmp_path / "state"
    state.mkdir()
    (state / "PAUSE").write_text("1")
    args = serve_args(state, tmp_path / "tokens.toml", 2, 3, 4, "--insecure", "--round-timeout", "5")  # fmt: skip
    coordinator = Proc("coordinator", *args)
    procs.append(coordinator)
    found = coordinator.wait_for(
        r"listening on 127\.0\.0\.1:(\d+).*metrics on 127\.0\.0\.1:(\d+)", 300
    )  # noqa: E501
    address, metrics_port = f"127.0.0.1:{found.group(1)}", int(found.group(2))
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.FederationStub(channel)
    own = (("authorization", f"Bearer {tokens[hostile]}"),)
    session = stub.Register(
        pb.RegisterRequest(client_id=hostile), metadata=own, timeout=30
    ).session_id  # noqa: E501
    pool = AgentPool(address, tokens, files)
    pool.start(light)
    coordinator.wait_for(r"^round 1: held by", 60)
    (state / "PAUSE").write_text("2")  # round 1 may start; hold before round 2
    task = next(
        stub.GetTask(pb.TaskRequest(session_id=session, wait_s=30), metadata=own, timeout=60)
    ).header  # noqa: E501
    assert task.status == pb.TaskHeader.TASK and task.round == 1
    n = int(sum(np.prod(s.dims) for s in task.spec.weight_shapes))
    bench = Bench(None, None, {hostile: session}, "", task.task_id)

    def upload(msgs, metadata=own):
        try:
            return stub.SubmitUpdate(iter(msgs), metadata=metadata, timeout=30).status
        except grpc.RpcError as exc:
            return exc.code()

    ones = encode_vector(np.ones(n, np.float32))
    nan = np.ones(n, np.float32)
    nan[0] = np.nan
    msgs = [header(bench, hostile, ones, round=1)]
    msgs += [
        pb.UpdateChunk(chunk=pb.Chunk(seq=s, data=d)) for s, d in reversed(chunks_of(ones, 100))
    ]  # noqa: E501
    bad_token = (("authorization", "Bearer " + "f" * 32),)
    assert (
        upload(stream(bench, hostile, ones, round=1), bad_token) == grpc.StatusCode.UNAUTHENTICATED
    )  # noqa: E501
    assert (
        upload(stream(bench, hostile, ones, round=1, session_id="0" * 16))
        == grpc.StatusCode.NOT_FOUND
    )  # noqa: E501
    assert upload(msgs) == grpc.StatusCode.DATA_LOSS  # chunks in the wrong order
    assert upload(stream(bench, hostile, encode_vector(nan), round=1)) == pb.SubmitReply.ACCEPTED
    coordinator.wait_for(r"^round 2: held by", 120)
    # a replay of round 1's upload, now that round 1 is closed
    assert upload(stream(bench, hostile, encode_vector(nan), round=1)) == pb.SubmitReply.LATE
    text = metrics_text(metrics_port)  # the servicer counts before it answers
    counted = dict(re.findall(r'fedwarden_updates_rejected_total\{reason="(\w+)"\} (\S+)', text))
    assert {k: float(v) for k, v in counted.items() if float(v)} == {  # every reason starts at 0
        "unauthenticated": 1.0, "unknown_session": 1.0, "damaged_stream": 1.0, "non_finite": 1.0,
        "late": 1.0,
    }  # fmt: skip
    (state / "PAUSE").unlink()
    assert coordinator.wait(300) == 0, coordinator.output()
    assert all(code == 0 for code in pool.join(120).values())
    channel.close()
    results = json.loads((state / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert [r["admitted"] for r in results["rounds"]] == [3, 3]
    assert results["rounds"][0]["rejections"] == [{"client_id": hostile, "reason": "non_finite"}]
    with Ledger(state / "ledger.sqlite", readonly=True) as ledger:
        # round 1: the admission charge; round 2 (selected, never answered): silent
        row, silent = ledger.client_history(hostile)
        assert row["rejected_reason"] == "non_finite" and row["norm"] is None
        assert silent["round"] == 2 and silent["rejected_reason"] == "silent"
        assert silent["trust"] == row["trust"]  # silence does not change trust
