"""Real deployment (issue 6): protocol, chunking, checkpoints, auth, agents, the coordinator.

Unit tests drive the servicer with a fake context (no sockets); a few tests open real gRPC
sockets on 127.0.0.1 with ports from the OS; the integration tests start a coordinator and agents
as processes. Nothing waits with a fixed sleep: every wait polls with a deadline or reads the
processes' output.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedwarden.config import DeploymentConfig
from fedwarden.data.validation import DataError, check_arrays, check_labels, load_npz, prepare
from fedwarden.errors import UsageError
from fedwarden.protocol.connection import Connection, fetch_trust
from fedwarden.protocol.convert import TrainingSpec, spec_from_proto, spec_to_proto
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
from fedwarden.protocol.transfer import (
    Assembler,
    TransferError,
    decode_vector,
    encode_vector,
    sha256_hex,
    split,
)
from fedwarden.server import checkpoint
from fedwarden.server.admission import admit
from fedwarden.server.auth import Authenticator, AuthError, load_tokens
from fedwarden.server.hub import Hub
from fedwarden.server.service import FederationServicer
from tests.deploy_helpers import (
    OPERATOR_TOKEN,
    ROOT,
    SERVE_ARGS,
    SPEC,
    TOKENS,
    Aborted,
    FakeContext,
    FakeLedger,
    Proc,
    gen_certs,
    make_certs,
    make_servicer,
    metrics_text,
    poll,
    register,
    run_fedwarden,
    split_data,
    update_stream,
    write_tokens,
)

# -- chunked transfer ------------------------------------------------------------------------


def test_chunks_round_trip_and_empty_payload():
    payload = np.arange(1000, dtype=np.float32).tobytes()
    chunks = list(split(payload, chunk_size=1024))
    assert [seq for seq, _ in chunks] == list(range(4))
    assembler = Assembler(len(payload))
    for seq, data in chunks:
        assembler.add(seq, data)
    assert assembler.finish(sha256_hex(payload)) == payload
    assert list(split(b"")) == [(0, b"")]
    empty = Assembler(0)
    empty.add(0, b"")
    assert empty.finish(sha256_hex(b"")) == b""


@pytest.mark.parametrize("problem", ["gap", "overflow", "short", "digest", "limit"])
def test_damaged_chunk_streams_are_refused(problem):
    payload = bytes(range(256)) * 8
    chunks = list(split(payload, chunk_size=512))
    with pytest.raises(TransferError):
        if problem == "limit":
            Assembler(len(payload), limit=100)
        assembler = Assembler(len(payload) - (1 if problem == "overflow" else 0))
        for seq, data in chunks:
            if problem == "gap" and seq == 1:
                continue
            if problem == "short" and seq == len(chunks) - 1:
                break
            assembler.add(seq, data)
        assembler.finish(sha256_hex(payload + (b"x" if problem == "digest" else b"")))


def test_vectors_travel_little_endian_in_their_dtype():
    v = np.linspace(-1, 1, 7)
    assert decode_vector(encode_vector(v, "float64"), "float64").tolist() == v.tolist()
    assert decode_vector(encode_vector(v), "float32").dtype == np.float32
    with pytest.raises(TransferError, match="whole number"):
        decode_vector(b"abc", "float32")


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_the_previous_good_one(tmp_path):
    for r in (1, 2, 3):
        checkpoint.save(
            tmp_path, r, {"weights": np.full(5, r, np.float32), "rounds": list(range(r))}
        )
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 2]
    payload = checkpoint.load_latest(tmp_path)
    assert payload["round"] == 3 and payload["weights"].tolist() == [3.0] * 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    checkpoint.save(tmp_path, 1, {"x": 1})
    newest = checkpoint.save(tmp_path, 2, {"x": 2})
    raw = bytearray(newest.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = b"garbage" + raw
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="fedwarden.checkpoint"):
        payload = checkpoint.load_latest(tmp_path)
    assert payload == {"x": 1, "round": 1}
    assert "skipping checkpoint of round 2" in caplog.text
    assert "checkpoint-000001" in caplog.text
    assert checkpoint.load_latest(tmp_path / "nothing-here") is None


def test_json_is_written_atomically_with_numpy_values(tmp_path):
    checkpoint.write_json_atomic(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 0.5, "b": [0, 1]}


# -- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('c00 = "short"', "at least 16"),
        (f'c00 = "{"a" * 20}"\nc01 = "{"a" * 20}"', "share a token"),
        ("c00 = 5", "string token"),
        ("c00 = [", "not valid TOML"),
    ],
)
def test_bad_tokens_files_are_refused(tmp_path, text, message):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_tokens(path)


def test_identity_comes_from_the_credentials(tmp_path):
    clients, operators = load_tokens(write_tokens(tmp_path / "t.toml"))
    auth = Authenticator(clients, operators)
    bearer = lambda token: [("authorization", f"Bearer {token}")]  # noqa: E731
    assert auth.identify(bearer(TOKENS["c01"])).name == "c01"
    # the claimed id header is ignored when tokens are in force
    assert auth.identify(bearer(TOKENS["c01"]) + [("x-fedwarden-client-id", "c00")]).name == "c01"
    ops = auth.identify(bearer(OPERATOR_TOKEN))
    assert ops.may_read_trust and not ops.may_train
    with pytest.raises(AuthError, match="invalid token"):
        auth.identify(bearer("z" * 32))
    with pytest.raises(AuthError, match="missing token"):
        auth.identify([])
    mtls = Authenticator(mutual_tls=True, operator_names=["alice"])
    assert mtls.identify([], "c02").name == "c02"
    assert mtls.identify([], "alice").may_read_trust
    with pytest.raises(AuthError, match="client certificate"):
        mtls.identify([], None)
    both = Authenticator(clients, mutual_tls=True)
    with pytest.raises(AuthError) as err:
        both.identify(bearer(TOKENS["c01"]), "c00")
    assert err.value.denied
    assert Authenticator().identify([("x-fedwarden-client-id", "c09")]).name == "c09"


# -- the servicer, without sockets -----------------------------------------------------------


def test_register_refuses_wrong_tokens_and_borrowed_ids():
    servicer = make_servicer()
    with pytest.raises(Aborted) as err:
        servicer.Register(pb.RegisterRequest(client_id="c00"), FakeContext("x" * 32))
    assert (
        err.value.code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in err.value.details
    )
    with pytest.raises(Aborted) as err:
        servicer.Register(pb.RegisterRequest(client_id="c00"), FakeContext(TOKENS["c01"]))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'c01'" in err.value.details
    with pytest.raises(Aborted) as err:
        servicer.Register(pb.RegisterRequest(client_id="ops"), FakeContext(OPERATOR_TOKEN))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    reply = servicer.Register(pb.RegisterRequest(client_id="c00"), FakeContext(TOKENS["c00"]))
    assert reply.session_id and reply.total_rounds == 3
    assert spec_from_proto(reply.spec) == SPEC


def test_spec_survives_the_wire_with_dp_sgd():
    spec = TrainingSpec(
        "pkg.mod:fn",
        "x",
        (3,),
        2,
        ((3, 2),),
        0.05,
        8,
        2,
        7,
        dp_sgd={"l2_norm_clip": 1.0, "noise_multiplier": 1.1, "num_microbatches": 4},
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec


def test_tasks_go_to_the_selected_and_updates_count_as_their_sender():
    hub = Hub(3)
    servicer = make_servicer(hub, chunk_size=64)
    s0, s1 = register(servicer, "c00"), register(servicer, "c01")
    weights = np.arange(SPEC.num_weights, dtype=np.float32)
    payload = encode_vector(weights)
    task = hub.publish(1, 0, ["c00"], payload, sha256_hex(payload))

    stream = list(
        servicer.GetTask(pb.TaskRequest(session_id=s0, wait_s=1), FakeContext(TOKENS["c00"]))
    )
    header = stream[0].header
    assert header.status == pb.TaskHeader.TASK and header.round == 1
    assert header.total_size == len(payload) and len(stream) == 1 + -(-len(payload) // 64)
    assembler = Assembler(header.total_size)
    for msg in stream[1:]:
        assembler.add(msg.chunk.seq, msg.chunk.data)
    assert np.array_equal(decode_vector(assembler.finish(header.sha256), "float32"), weights)
    # c01 was not selected: a short poll ends with NO_TASK
    (other,) = servicer.GetTask(
        pb.TaskRequest(session_id=s1, wait_s=0.05), FakeContext(TOKENS["c01"])
    )
    assert other.header.status == pb.TaskHeader.NO_TASK

    delta = encode_vector(np.ones(SPEC.num_weights))
    reply = servicer.SubmitUpdate(
        update_stream(s0, task.task_id, delta), FakeContext(TOKENS["c00"])
    )
    assert reply.status == pb.SubmitReply.ACCEPTED
    # c01 holds its own token only: its update is c01's, and admission says it was not selected
    servicer.SubmitUpdate(update_stream(s1, task.task_id, delta), FakeContext(TOKENS["c01"]))
    with pytest.raises(Aborted) as err:  # c01's token with c00's session
        servicer.SubmitUpdate(update_stream(s0, task.task_id, delta), FakeContext(TOKENS["c01"]))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    updates, complete = hub.collect(1, time.monotonic() + 1)
    assert complete and [u.client_id for u in updates] == ["c00", "c01"]
    admitted, rejected = admit(updates, 1, {"c00"}, SPEC.num_weights)
    assert [u.client_id for u in admitted] == ["c00"]
    assert [(r.client_id, r.reason) for r in rejected] == [("c01", "not_selected")]
    # the round is closed: a late update is dropped and counted
    late = servicer.SubmitUpdate(update_stream(s0, task.task_id, delta), FakeContext(TOKENS["c00"]))
    assert late.status == pb.SubmitReply.LATE and hub.late == 1


def test_bad_updates_reach_admission_with_a_reason():
    hub = Hub(3)
    servicer = make_servicer(hub)
    sessions = {cid: register(servicer, cid) for cid in TOKENS}
    task = hub.publish(1, 0, list(TOKENS), b"", sha256_hex(b""))
    n = SPEC.num_weights
    nan = np.ones(n, np.float32)
    nan[3] = np.nan
    sends = {
        "c00": encode_vector(np.ones(n + 1)),  # wrong shape
        "c01": encode_vector(nan),  # non finite
        "c02": np.ones(n, np.int32).tobytes(),  # wrong dtype (declared int32)
        "c03": encode_vector(np.ones(3 * n), "float64"),  # over the size limit: never read
    }
    for cid, payload in sends.items():
        dtype = {"c02": "int32", "c03": "float64"}.get(cid, "float32")
        reply = servicer.SubmitUpdate(
            update_stream(sessions[cid], task.task_id, payload, dtype=dtype),
            FakeContext(TOKENS[cid]),
        )
        expected = pb.SubmitReply.REJECTED if cid == "c03" else pb.SubmitReply.ACCEPTED
        assert reply.status == expected, cid
    updates, complete = hub.collect(4, time.monotonic() + 1)
    assert complete
    _, rejected = admit(updates, 1, set(TOKENS), n)
    assert {r.client_id: r.reason for r in rejected} == {
        "c00": "wrong_shape",
        "c01": "non_finite",
        "c02": "wrong_dtype",
        "c03": "oversized",
    }


def test_a_damaged_update_stream_is_data_loss():
    hub = Hub(3)
    servicer = make_servicer(hub)
    s0 = register(servicer, "c00")
    task = hub.publish(1, 0, ["c00"], b"", sha256_hex(b""))
    payload = encode_vector(np.ones(SPEC.num_weights))
    with pytest.raises(Aborted) as err:
        servicer.SubmitUpdate(
            update_stream(s0, task.task_id, payload, digest="0" * 64), FakeContext(TOKENS["c00"])
        )
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "sha256" in err.value.details


def test_trust_is_for_operators_only():
    servicer = make_servicer()
    with pytest.raises(Aborted) as err:
        servicer.GetTrust(pb.TrustRequest(), FakeContext(TOKENS["c00"]))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    reply = servicer.GetTrust(pb.TrustRequest(), FakeContext(OPERATOR_TOKEN))
    (row,) = reply.clients
    assert row.client_id == "c01" and row.trust == pytest.approx(0.4) and row.flagged
    assert not row.HasField("cosine")
    one = servicer.GetTrust(pb.TrustRequest(client_id="c01"), FakeContext(OPERATOR_TOKEN))
    assert [h.round for h in one.history] == [1, 2] and one.history[
        1
    ].rejected_reason == "non_finite"
    with pytest.raises(Aborted) as err:
        servicer.GetTrust(pb.TrustRequest(client_id="c99"), FakeContext(OPERATOR_TOKEN))
    assert err.value.code == grpc.StatusCode.NOT_FOUND


# -- the hub ---------------------------------------------------------------------------------


def test_a_long_poll_wakes_up_when_a_task_is_published():
    hub = Hub(2)
    session = hub.register("c00")
    got: queue.Queue = queue.Queue()
    waiter = threading.Thread(target=lambda: got.put(hub.wait_task("c00", session, "", 10.0)))
    waiter.start()
    deadline = time.monotonic() + 5
    while hub.live_clients() != ["c00"] or not hub._sessions["c00"].polling:
        assert time.monotonic() < deadline, "the poll never started"
        time.sleep(0.01)
    hub.publish(1, 0, ["c00"], b"w", sha256_hex(b"w"))
    task = got.get(timeout=5)
    assert task.round == 1 and task.task_id.endswith("-1-0")
    hub.finish()
    assert hub.wait_task("c00", session, task.task_id, 5.0) == "done"
    assert hub.wait_told_done(1.0)


def test_collect_closes_on_time_with_enough_updates_and_abandons_without():
    from fedwarden.server.admission import ClientUpdate

    hub = Hub(2)
    sessions = {c: hub.register(c) for c in ("c00", "c01", "c02")}
    task = hub.publish(1, 0, list(sessions), b"", sha256_hex(b""))
    hub.submit("c00", sessions["c00"], task.task_id, ClientUpdate("c00", 1, np.zeros(2), 1))
    updates, complete = hub.collect(1, time.monotonic() + 0.2)
    assert complete and len(updates) == 1
    task = hub.publish(1, 1, list(sessions), b"", sha256_hex(b""))
    hub.submit("c00", sessions["c00"], task.task_id, ClientUpdate("c00", 1, np.zeros(2), 1))
    _, complete = hub.collect(2, time.monotonic() + 0.2)
    assert not complete
    clock = [0.0]
    stale = Hub(1, liveness_s=5, clock=lambda: clock[0])
    stale.register("c00")
    clock[0] = 6.0
    assert stale.live_clients() == []


# -- local data ------------------------------------------------------------------------------


def test_data_problems_name_the_rows_and_count_them():
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype(np.float32)
    y = np.arange(20) % 10
    assert check_arrays(x, y, (8, 8, 1), 10) == []
    bad = x.copy()
    bad[[4, 9, 11], 0, 0, 0] = [np.nan, np.inf, np.nan]
    (p,) = check_arrays(bad, y, (8, 8, 1), 10)
    assert (p.check, p.count, p.first_row) == ("non_finite", 3, 4) and "row 4" in p.message
    labels = y.copy()
    labels[[7, 8]] = [10, -1]
    (p,) = check_labels(labels, 10)
    assert (p.check, p.count, p.first_row) == ("label_range", 2, 7) and "[0, 10)" in p.message
    assert check_arrays(x.reshape(20, 64), y, (8, 8, 1), 10)[0].check == "shape"
    assert check_arrays((x * 255).astype(np.uint8), y, (8, 8, 1), 10)[0].check == "dtype"
    assert check_arrays(x, y[:19], (8, 8, 1), 10)[0].check == "length"
    assert check_labels(np.array([0.0, 1.5]), 10)[0].check == "dtype"
    with pytest.raises(DataError, match="2 labels are outside"):
        prepare(x, labels, (8, 8, 1), 10, "c00.npz")


def test_npz_loading_reports_missing_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3)))
    with pytest.raises(DataError, match="missing y"):
        load_npz(tmp_path / "a.npz")
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "b.npz")


def test_data_split_writes_one_file_per_client(tmp_path):
    from fedwarden.cli.main import main

    out = tmp_path / "split"
    argv = [
        "data",
        "split",
        "--dataset",
        "digits",
        "--clients",
        "3",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.5",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    manifest = json.loads((out / "split.json").read_text())
    sizes = []
    for cid in ("c00", "c01", "c02"):
        x, y = load_npz(out / f"{cid}.npz")
        assert check_arrays(x, y, (8, 8, 1), 10) == [] and len(y) == manifest["examples"][cid]
        sizes.append(len(y))
    test_x, test_y = load_npz(out / "test.npz")
    assert sum(sizes) + len(test_y) == 1797 and test_x.shape[1:] == (8, 8, 1)
    assert (
        main(
            [
                "data",
                "split",
                "--dataset",
                "digits",
                "--clients",
                "2",
                "--partition",
                "zz",
                "--out",
                str(out),
            ]
        )
        == 2
    )


# -- serve options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "TLS needs --tls-cert and --tls-key"),
        ({"tls_cert": "c", "tls_key": "k"}, "no client authentication"),
        ({"insecure": True, "tls_cert": "c"}, "cannot be combined"),
        ({"insecure": True, "min_clients": 0}, "--min-clients"),
    ],
)
def test_serve_is_secure_by_default(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        DeploymentConfig(state_dir=str(tmp_path), **kwargs)


def test_serve_refuses_plaintext_without_insecure_on_the_command_line(tmp_path):
    proc = run_fedwarden("serve", "--state-dir", str(tmp_path), "--port", "0", timeout=60)
    assert proc.returncode == 2
    assert "TLS needs --tls-cert" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_agent_refuses_bad_usage(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 5]))
    proc = run_fedwarden(
        "agent",
        "--server",
        "nohost",
        "--client-id",
        "c00",
        "--data",
        str(tmp_path / "d.npz"),
        "--insecure",
        timeout=60,
    )
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


# -- real sockets: chunked streams larger than gRPC's 4 MB messages --------------------------


@pytest.fixture
def plaintext_server():
    hub = Hub(1)
    auth = Authenticator(TOKENS, {"ops": OPERATOR_TOKEN})
    servicer = FederationServicer(hub, auth, SPEC, FakeLedger(), max_update_bytes=80 << 20)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield hub, port
    server.stop(0).wait()


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_50_mb_model_travels_both_ways(plaintext_server, compression):
    hub, port = plaintext_server
    n = 13_500_000  # 54 MB of float32
    weights = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    if compression == "gzip":
        weights[: n // 2] = 0  # compressible
    payload = encode_vector(weights)
    assert len(payload) >= 50 << 20
    conn = Connection(
        f"127.0.0.1:{port}",
        client_id="c00",
        token=TOKENS["c00"],
        insecure=True,
        compression=compression,
    )
    with conn.channel() as channel:
        stub = pb_grpc.FederationStub(channel)
        session = stub.Register(
            pb.RegisterRequest(client_id="c00"), metadata=conn.metadata(), timeout=10
        ).session_id
        task = hub.publish(1, 0, ["c00"], payload, sha256_hex(payload))
        stream = stub.GetTask(
            pb.TaskRequest(session_id=session, wait_s=5), timeout=120, metadata=conn.metadata()
        )
        header = next(stream).header
        assembler = Assembler(header.total_size)
        for msg in stream:
            assembler.add(msg.chunk.seq, msg.chunk.data)
        received = decode_vector(assembler.finish(header.sha256), "float32")
        assert np.array_equal(received, weights)
        back = encode_vector(received * 2)
        reply = stub.SubmitUpdate(
            update_stream(session, task.task_id, back, chunk_size=1 << 20),
            timeout=120,
            metadata=conn.metadata(),
        )
        assert reply.status == pb.SubmitReply.ACCEPTED
    (update,), complete = hub.collect(1, time.monotonic() + 5)
    assert complete and update.client_id == "c00" and np.array_equal(update.delta, weights * 2)


def test_trust_list_reads_a_running_coordinator(plaintext_server, capsys):
    from fedwarden.cli.main import main

    _, port = plaintext_server
    address = f"127.0.0.1:{port}"
    rows, _ = fetch_trust(Connection(address, token=OPERATOR_TOKEN, insecure=True))
    assert rows[0]["client_id"] == "c01" and rows[0]["cosine"] is None
    assert (
        main(
            [
                "trust",
                "list",
                "--server",
                address,
                "--insecure",
                "--token",
                OPERATOR_TOKEN,
                "--format",
                "json",
            ]
        )
        == 0
    )
    listed = json.loads(capsys.readouterr().out)
    assert listed == [
        {
            "client_id": "c01",
            "trust": 0.4,
            "anomaly": 0.7,
            "flagged": True,
            "quarantined": False,
            "rounds": 2,
            "last_round": 2,
            "rejected": 1,
            "evidence": None,
            "explanation": None,
        }
    ]
    assert (
        main(
            [
                "trust",
                "show",
                "c01",
                "--server",
                address,
                "--insecure",
                "--token",
                OPERATOR_TOKEN,
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert [h["round"] for h in json.loads(capsys.readouterr().out)["history"]] == [1, 2]
    assert main(["trust", "list", "--server", address, "--insecure", "--token", TOKENS["c00"]]) == 2
    assert "permission_denied" in capsys.readouterr().err


# -- processes -------------------------------------------------------------------------------


@pytest.mark.integration
def test_deployment_survives_sigkill_and_finishes_every_round_once(tmp_path, procs):
    """The issue's done-when test: 4 agents with tokens over TLS, SIGKILL after round 3."""
    split_dir, state = tmp_path / "split", tmp_path / "state"
    split_data(split_dir, 4)
    certs = make_certs(tmp_path / "certs", [])
    tokens = write_tokens(tmp_path / "tokens.toml")
    serve = ["serve", *SERVE_ARGS, *"--rounds 6 --min-clients 4 --clients-per-round 4".split(),
             "--average-last-rounds", "3",
             "--state-dir", str(state), "--tokens", str(tokens), "--tls-cert",
             str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
             "--metrics-port", "0"]  # fmt: skip
    state.mkdir()
    (state / "PAUSE").write_text("4")  # hold before round 4, so the kill lands after round 3
    coordinator = Proc("coordinator", *serve, "--port", "0")
    procs.append(coordinator)
    listening = coordinator.wait_for(
        r"listening on 127\.0\.0\.1:(\d+).*metrics on 127\.0\.0\.1:(\d+)", 120
    )
    port, metrics_port = int(listening.group(1)), int(listening.group(2))
    address = f"127.0.0.1:{port}"
    tls = ["--tls-ca", str(certs["ca.pem"])]

    def agent(name: str, cid: str, *extra: str, env=None) -> Proc:
        p = Proc(name, "agent", "--server", address, "--client-id", cid, "--data",
                 str(split_dir / f"{cid}.npz"), *tls, *extra, env=env)  # fmt: skip
        procs.append(p)
        return p

    intruder = agent("intruder", "c00", "--token", "f" * 32)
    agents = [
        agent(c, c, "--backoff-max", "2", env={"FEDWARDEN_TOKEN": t}) for c, t in TOKENS.items()
    ]
    assert intruder.wait(60) == 2
    intruder.wait_for(r"refused 'c00': unauthenticated: invalid token", 1)

    coordinator.wait_for(r"^round 4: held by", 240)

    def trust_series() -> str | None:
        text = metrics_text(metrics_port)
        return text if text.count("fedwarden_client_trust_score{") >= len(TOKENS) else None

    text = poll(trust_series, 30, "per-client trust on /metrics")
    for cid in TOKENS:
        assert re.search(rf'fedwarden_client_trust_score{{client_id="{cid}"}} [0-9.]+', text), cid
    listed = run_fedwarden("trust", "list", "--server", address, *tls, "--token", OPERATOR_TOKEN,
                           "--format", "json")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["client_id"] for r in json.loads(listed.stdout)) == sorted(TOKENS)
    rounds = json.loads((state / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]

    coordinator.popen.send_signal(signal.SIGKILL)
    coordinator.popen.wait(10)
    (state / "PAUSE").unlink()
    restarted = Proc("coordinator (restarted)", *serve, "--port", str(port))
    procs.append(restarted)
    restarted.wait_for(r"resuming after round 3 ", 120)
    restarted.wait_for(r"^round 6/6", 240)
    for a in agents:
        assert a.wait(60) == 0, a.output()
        a.wait_for(r"training is over", 1)
    assert restarted.wait(60) == 0, restarted.output()

    results = json.loads((state / "results.json").read_text())
    accuracy = [round(r["accuracy"], 3) for r in results["rounds"]]
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5, 6], accuracy
    assert results["final"]["accuracy"] >= 0.85, accuracy
    assert results["final"]["accuracy"] == results["rounds"][-1]["accuracy"]
    # the model handed back is the mean of rounds 4-6, begun after the restart
    assert results["rounds"][-1]["averaged_rounds"] == [4, 6]
    assert results["rounds"][-1]["last_model"]["accuracy"] >= 0.85
    assert set(results["clients"]) == set(TOKENS)
    assert all(r["admitted"] == 4 for r in results["rounds"])
    from fedwarden.server.ledger import Ledger

    with Ledger(state / "ledger.sqlite", readonly=True) as ledger:
        for cid in TOKENS:
            assert [h["round"] for h in ledger.client_history(cid)] == [1, 2, 3, 4, 5, 6]
    # the agents noticed the coordinator was gone and came back by themselves
    assert all(any("retrying" in line for line in a.lines) for a in agents)


@pytest.mark.integration
def test_mutual_tls_identity_comes_from_the_certificate(tmp_path, procs):
    """mTLS with deploy/gen-certs.sh certificates; also bad data, SIGTERM and resuming."""
    split_dir, state = tmp_path / "split", tmp_path / "state"
    split_data(split_dir, 2)
    certs = gen_certs(tmp_path / "certs", ["c00", "c01", "ops"])
    stranger = make_certs(tmp_path / "other-ca", ["c00"])
    bad = tmp_path / "bad.npz"
    x, y = load_npz(split_dir / "c00.npz")
    y[[5, 9]] = 12
    np.savez(bad, x=x, y=y)
    allow = tmp_path / "allow.txt"
    allow.write_text("c00\nc01\n")
    serve = ["serve", *SERVE_ARGS, *"--rounds 2 --min-clients 2 --clients-per-round 2".split(),
             "--state-dir", str(state), "--tls-cert", str(certs["server.pem"]), "--tls-key",
             str(certs["server.key"]), "--tls-client-ca", str(certs["ca.pem"]),
             "--operator", "ops", "--allow-clients", str(allow)]  # fmt: skip
    state.mkdir()
    (state / "PAUSE").write_text("2")  # hold after round 1 while trust is read
    coordinator = Proc("coordinator", *serve, "--port", "0")
    procs.append(coordinator)
    listening = coordinator.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(mutual TLS\)", 120)
    port = int(listening.group(1))

    def agent(
        name: str, cid: str, cert: str, *extra: str, files=certs, data: Path | None = None
    ) -> Proc:
        p = Proc(name, "agent", "--server", f"127.0.0.1:{port}", "--client-id", cid, "--data",
                 str(data or split_dir / f"{cid}.npz"), "--tls-ca", str(certs["ca.pem"]),
                 "--tls-cert", str(files[f"{cert}.pem"]), "--tls-key", str(files[f"{cert}.key"]),
                 "--backoff-max", "2", *extra)  # fmt: skip
        procs.append(p)
        return p

    impostor = agent("impostor", "c01", "c00")  # c00's certificate, claiming to be c01
    assert impostor.wait(60) == 2
    impostor.wait_for(r"permission_denied: these credentials identify 'c00', not 'c01'", 1)
    unfit = agent("unfit data", "c00", "c00", "--strict", data=bad)  # without it: rows skipped
    assert unfit.wait(60) == 2
    unfit.wait_for(r"refusing to train: .*bad\.npz: 2 labels are outside \[0, 10\) "
                   r"\(first: row 5, label 12\)", 1)  # fmt: skip
    outsider = agent("outsider", "c00", "c00", files=stranger)  # a certificate from another CA
    good = [agent("c00", "c00", "c00"), agent("c01", "c01", "c01")]
    coordinator.wait_for(r"^round 2: held by", 240)
    listed = run_fedwarden("trust", "list", "--server", f"127.0.0.1:{port}", "--tls-ca",
                           str(certs["ca.pem"]), "--tls-cert", str(certs["ops.pem"]), "--tls-key",
                           str(certs["ops.key"]), "--format", "json")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["client_id"] for r in json.loads(listed.stdout)) == ["c00", "c01"]

    coordinator.popen.send_signal(signal.SIGTERM)  # graceful: checkpoint kept, exit 0
    assert coordinator.wait(30) == 0, coordinator.output()
    coordinator.wait_for(r"stopped after round 1; the checkpoint is kept", 1)
    (state / "PAUSE").unlink()
    restarted = Proc("coordinator (restarted)", *serve, "--port", str(port))
    procs.append(restarted)
    restarted.wait_for(r"resuming after round 1 ", 120)
    for p in good:
        assert p.wait(120) == 0, p.output()
    assert restarted.wait(60) == 0, restarted.output()
    # the outsider's TLS handshake never succeeds: it retries until stopped, and never trains
    assert not any("registered" in line for line in outsider.lines)
    results = json.loads((state / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["deployment"]["transport"] == "mutual TLS"


# -- deploy files ----------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every metric name the coordinator exports (server/metrics.py and server/serve.py)."""
    from prometheus_client import CollectorRegistry

    from fedwarden.server.metrics import MetricsExporter
    from fedwarden.server.serve import ServeMetrics

    exporter = MetricsExporter(CollectorRegistry())
    ServeMetrics(exporter.registry)
    exporter.set_flag_line(5.0)  # as the MetricsExport callback does under the evidence rule
    names = set()
    for family in exporter.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def test_dashboard_queries_use_only_exported_metrics():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/fedwarden.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    used = {name for e in exprs for name in re.findall(r"\bfedwarden_[a-z0-9_]+", e)}
    assert len(exprs) >= 6 and used
    exported = exported_metric_names()
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for required in (
        "fedwarden_client_trust_score",
        "fedwarden_client_anomaly_score",
        "fedwarden_client_update_norm",
        "fedwarden_round",
        "fedwarden_test_accuracy",
        "fedwarden_updates_rejected_total",
    ):
        assert required in used, required


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (scripts/system-deps installs it)")
    proc = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    config = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    for service in ("coordinator", "split", "agent-c00", "agent-c03", "prometheus", "grafana"):
        assert re.search(rf"^  {service}:", config, re.M), service
    prometheus = (ROOT / "deploy/prometheus.yml").read_text()
    assert "coordinator:9100" in prometheus

    # the optional red-team profile: one attacker agent whose command the agent CLI accepts
    red = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "--profile", "red-team", "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert red.returncode == 0, red.stderr
    block = re.search(r"^  agent-red-team:\n((?:    .*\n|  - .*\n)+)", red.stdout, re.M)
    assert block and re.search(r"^    profiles:\n    - red-team$", block.group(1), re.M)
    command = re.search(r"^    command:\n((?:    - .*\n)+)", block.group(1), re.M).group(1)
    from fedwarden.cli.main import build_parser

    args = build_parser().parse_args(re.findall(r"^    - (.*)$", command, re.M))
    assert args.command == "agent" and args.attack == "gaussian" and args.red_team_report
