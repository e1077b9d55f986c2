"""The bound on the bytes that uploads in progress hold (``--max-inflight-upload-mb``).

The promise is to a hostile party, so the uploads come from the client written against the
``.proto`` alone (tests/wire_client.py) over a loopback socket, to the real servicer, hub and
call guard. Each upload reserves its declared size when its header arrives; one that would pass
the bound is refused at once, unread, with RESOURCE_EXHAUSTED; the reservation comes back on
every ending. The waits are on the server's own state (``inflight_bytes``) or on events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from fedwarden.clients.agent import Agent
from fedwarden.config import DeploymentConfig, RunConfig
from fedwarden.errors import UsageError
from fedwarden.protocol.connection import Connection
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
from fedwarden.protocol.transfer import sha256_hex
from fedwarden.server.hub import Hub
from fedwarden.server.serve import MIN_INFLIGHT_UPLOAD_MB, inflight_upload_bytes
from fedwarden.server.service import CallGuard, CallLimits, FederationServicer, add_to_server
from tests.deploy_helpers import SPEC, TOKENS, make_servicer, metrics_text, poll
from tests.wire_client import Task, WireClient, held_open
from tests.wire_helpers import start_serve

UPDATE = SPEC.num_weights * 4  # bytes of one float32 update
MB = 2**20


@dataclass
class Federation:
    """A servicer on a loopback port with round 1 open for every client in TOKENS."""

    hub: Hub
    servicer: FederationServicer
    address: str
    wire: object
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # held uploads go on
    clients: list[WireClient] = field(default_factory=list)

    def client(self, cid: str) -> tuple[WireClient, Task]:
        """A registered client and its task."""
        client = WireClient(self.wire, self.address, TOKENS[cid])
        self.clients.append(client)
        client.register(cid, timeout=10)
        return client, client.wait_task(timeout=10, wait_s=1)

    def reasons(self) -> list[tuple[str, str]]:
        return [(cid, reason) for cid, reason, _ in self.refused]


def header_then_rest(messages: list, release: threading.Event) -> Iterator:
    """Sends the header, waits for ``release``, then the chunks and trailer."""
    yield messages[0]
    if release.wait(30):
        yield from messages[1:]


@pytest.fixture
def federation(wire):
    servers: list[tuple[grpc.Server, CallGuard, Federation]] = []

    def start(limit: int | None, stall_s: float = 30.0, on_rejected=None) -> Federation:
        hub, refused = Hub(3), []

        def rejected(cid: str, reason: str, detail: str) -> None:
            refused.append((cid, reason, detail))
            if on_rejected is not None:
                on_rejected(cid, reason, detail)

        servicer = make_servicer(hub, max_inflight_bytes=limit, on_rejected=rejected)
        guard = CallGuard(CallLimits(max_calls=40, max_streams=20, stall_s=stall_s), tick_s=0.1)
        guard.start()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=42))
        add_to_server(servicer, server, guard)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        fed = Federation(hub, servicer, address, wire, refused)
        weights = np.zeros(SPEC.num_weights, np.float32).tobytes()
        hub.publish(1, 0, list(TOKENS), weights, sha256_hex(weights))
        servers.append((server, guard, fed))
        return fed

    yield start
    for server, guard, fed in servers:
        fed.release.set()
        for client in fed.clients:
            client.close()
        server.stop(0).wait()
        guard.stop()


def hold(client: WireClient, task: Task, release: threading.Event, **kw) -> grpc.Future:
    """An upload that sends its header and waits for ``release`` before the rest."""
    messages = client.update_messages(task, 0.01, **kw)
    return client.stub.SubmitUpdate.future(
        header_then_rest(messages, release), metadata=client.metadata, timeout=30
    )


def test_an_upload_past_the_bound_is_refused_at_once_unread_and_the_others_complete(federation):
    fed = federation(limit=2 * UPDATE)
    (a, task_a), (b, task_b), (c, task_c) = (fed.client(cid) for cid in ("c00", "c01", "c02"))
    held = [hold(a, task_a, fed.release), hold(b, task_b, fed.release)]
    poll(lambda: fed.servicer.inflight_bytes() == 2 * UPDATE, 10, "both uploads to reserve")

    # c02 sends its header and nothing more: only a refusal that does not read the payload
    # can answer it (reading would wait for chunks that never come)
    never = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as err:
            c.send(held_open(c.update_messages(task_c, 0.01)[:1], never), timeout=20)
    finally:
        never.set()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-inflight-upload-mb" in err.value.details()
    assert f"declares {UPDATE}" in err.value.details()
    assert fed.reasons() == [("c02", "upload_memory")]
    assert fed.servicer.inflight_bytes() == 2 * UPDATE  # the refusal reserved nothing

    fed.release.set()
    assert [f.result(timeout=10).status for f in held] == [a.pb.SubmitReply.ACCEPTED] * 2
    assert fed.servicer.inflight_bytes() == 0
    # the round goes on: the refused client sends again and is taken
    assert c.submit(task_c, 0.01).status == c.pb.SubmitReply.ACCEPTED
    assert sorted(u.client_id for u in fed.hub._collected.updates) == ["c00", "c01", "c02"]


def test_the_bound_counts_declared_bytes_not_uploads(federation):
    """One float64 upload takes the room of two float32 ones."""
    fed = federation(limit=2 * UPDATE)
    (a, task_a), (b, task_b) = fed.client("c00"), fed.client("c01")
    wide = hold(a, task_a, fed.release, dtype="float64")
    poll(lambda: fed.servicer.inflight_bytes() == 2 * UPDATE, 10, "the float64 upload to reserve")
    with pytest.raises(grpc.RpcError) as err:
        b.submit(task_b, 0.01)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fed.release.set()
    assert wide.result(timeout=10).status == a.pb.SubmitReply.ACCEPTED
    assert b.submit(task_b, 0.01).status == b.pb.SubmitReply.ACCEPTED


ENDINGS = ("accepted", "bad_digest", "wrong_order", "cut_off", "stalled", "late", "hub_raises")


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_ending_gives_the_reservation_back(federation, ending):
    """With room for one upload, an upload ends some way; a later upload is then not refused
    for memory (with a leaked reservation it would be, for ever)."""
    fed = federation(limit=UPDATE, stall_s=1.0 if ending == "stalled" else 30.0)
    (a, task_a), (b, task_b) = fed.client("c00"), fed.client("c01")
    reserved = lambda: fed.servicer.inflight_bytes() == UPDATE  # noqa: E731
    outcome: object = None
    if ending == "accepted":
        outcome = a.submit(task_a, 0.01).status
    elif ending == "bad_digest":
        outcome = send_code(a, a.update_messages(task_a, 0.01, sha256="0" * 64))
    elif ending == "wrong_order":
        messages = a.update_messages(task_a, 0.01, chunk_size=256)
        messages[1], messages[2] = messages[2], messages[1]
        outcome = send_code(a, messages)
    elif ending == "cut_off":  # the agent dies after its header and first chunk
        messages = a.update_messages(task_a, 0.01, chunk_size=256)
        call = a.stub.SubmitUpdate.future(
            held_open(messages[:2], fed.release), metadata=a.metadata, timeout=30
        )
        poll(reserved, 10, "the upload to reserve")
        call.cancel()
        outcome = "cut"
    elif ending == "stalled":  # header, then nothing: the call guard cancels it after 1 s
        outcome = send_code(a, held_open(a.update_messages(task_a, 0.01)[:1], fed.release))
    elif ending == "late":
        fed.hub.collect(0, time.monotonic())  # round 1 closes before the upload
        outcome = a.submit(task_a, 0.01).status
    else:

        def broken(*args, **kwargs):
            raise RuntimeError("the hub failed")

        fed.hub.submit = broken
        outcome = send_code(a, a.update_messages(task_a, 0.01))
        del fed.hub.submit
    expected = {
        "accepted": {a.pb.SubmitReply.ACCEPTED},
        "bad_digest": {grpc.StatusCode.DATA_LOSS},
        "wrong_order": {grpc.StatusCode.DATA_LOSS},
        "cut_off": {"cut"},
        "stalled": {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED},
        "late": {a.pb.SubmitReply.LATE},
        "hub_raises": {grpc.StatusCode.UNKNOWN},
    }[ending]
    assert outcome in expected
    poll(lambda: fed.servicer.inflight_bytes() == 0, 10, "the reservation to come back")
    reply = b.submit(task_b, 0.01)
    assert reply.status == (
        b.pb.SubmitReply.LATE if ending == "late" else b.pb.SubmitReply.ACCEPTED
    )
    assert "upload_memory" not in {reason for _, reason in fed.reasons()}
    counted = {"bad_digest": "damaged_stream", "wrong_order": "damaged_stream",
               "cut_off": "damaged_stream", "stalled": "too_slow"}  # fmt: skip
    if ending in counted:
        assert fed.reasons() == [("c00", counted[ending])]


def send_code(client: WireClient, messages: Iterable) -> grpc.StatusCode:
    """The status code the server aborts ``messages`` with (the test fails if it accepts)."""
    with pytest.raises(grpc.RpcError) as err:
        client.send(messages, timeout=20)
    return err.value.code()


def test_the_agent_sends_its_update_again_until_there_is_room(federation, tmp_path):
    """The real agent, refused for memory, retries the same update with backoff (it neither
    gives up nor trains again); room comes when the upload that held it finishes."""
    release = threading.Event()

    def room_after_refusal(cid: str, reason: str, detail: str) -> None:
        if reason == "upload_memory":
            release.set()

    fed = federation(limit=UPDATE, on_rejected=room_after_refusal)
    holder, task = fed.client("c00")
    held = hold(holder, task, release)
    poll(lambda: fed.servicer.inflight_bytes() == UPDATE, 10, "the first upload to reserve")

    conn = Connection(fed.address, client_id="c01", token=TOKENS["c01"], insecure=True)
    agent = Agent(conn, str(tmp_path / "unused.npz"), backoff_initial_s=0.02, backoff_max_s=0.2)
    with conn.channel() as channel:
        stub = pb_grpc.FederationStub(channel)
        session = stub.Register(
            pb.RegisterRequest(client_id="c01"), metadata=conn.metadata(), timeout=10
        ).session_id
        header, _ = agent._fetch(stub, session)
        payload = np.full(SPEC.num_weights, 0.01, np.float32).tobytes()
        reply = agent._submit(stub, session, header, 10, 0.5, payload)

    assert reply.status == holder.pb.SubmitReply.ACCEPTED
    assert held.result(timeout=10).status == holder.pb.SubmitReply.ACCEPTED
    assert ("c01", "upload_memory") in fed.reasons()
    assert sorted(u.client_id for u in fed.hub._collected.updates) == ["c00", "c01"]


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page, None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix)), None)


@pytest.mark.slow
@pytest.mark.integration
def test_a_live_coordinator_refuses_past_its_bound_counts_it_and_finishes_the_round(
    wire, tmp_path, procs
):
    """``fedwarden serve --max-inflight-upload-mb``: room for two float32 updates of the tiny
    model (84 weights, 336 bytes; the bound must hold one float64 update, 672)."""
    ids = ["c00", "c01", "c02"]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "PAUSE").touch()  # the round starts once all three are registered
    live = start_serve(procs, tmp_path, ids, "--rounds", "1", "--min-clients", "3",
                       "--clients-per-round", "3", "--max-inflight-upload-mb", "0.0007")  # fmt: skip
    limit = int(0.0007 * MB)
    release = threading.Event()
    clients = [WireClient(wire, live.address, live.tokens[cid]) for cid in ids]
    try:
        for client, cid in zip(clients, ids):
            client.register(cid)
        (live.state / "PAUSE").unlink()
        (a, b, c) = clients
        tasks = [client.wait_task(timeout=60, wait_s=2) for client in clients]
        assert all(t.header.status == a.pb.TaskHeader.TASK for t in tasks)
        page = metrics_text(live.metrics_port)
        assert sample(page, "fedwarden_upload_bytes_limit") == limit
        assert sample(page, "fedwarden_updates_rejected_total", reason="upload_memory") == 0
        held = [hold(a, tasks[0], release), hold(b, tasks[1], release)]
        poll(lambda: sample(metrics_text(live.metrics_port), "fedwarden_upload_bytes_in_flight")
             == 2 * 336, 30, "both uploads to reserve")  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            c.submit(tasks[2], 0.01)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"of the {limit} bytes" in err.value.details()
        page = metrics_text(live.metrics_port)
        assert sample(page, "fedwarden_updates_rejected_total", reason="upload_memory") == 1
        release.set()
        assert [f.result(timeout=30).status for f in held] == [a.pb.SubmitReply.ACCEPTED] * 2
        assert c.submit(tasks[2], 0.01).status == c.pb.SubmitReply.ACCEPTED
        assert sample(metrics_text(live.metrics_port), "fedwarden_upload_bytes_in_flight") == 0
        assert live.proc.wait(120) == 0, live.proc.output()
    finally:
        release.set()
        for client in clients:
            client.close()
    (round_1,) = live.results()["rounds"]
    assert sorted(round_1["selected"]) == ids


# -- the bound from the settings -------------------------------------------------------------


def deployment(**kw) -> DeploymentConfig:
    return DeploymentConfig(state_dir="unused", insecure=True, **kw)


def test_the_default_bound_follows_the_round_budget_or_the_cohort():
    weights = 1_000_000
    update = weights * 8  # the largest update the coordinator reads (float64)
    cohort = RunConfig(
        clients=1000, clients_per_round=100
    )  # 130 selected at the default overselect 1.3
    assert inflight_upload_bytes(cohort, deployment(), weights) == 130 * update
    small = RunConfig(clients_per_round=2)  # 3 selected: the 64 MB floor
    assert inflight_upload_bytes(small, deployment(), weights) == int(MIN_INFLIGHT_UPLOAD_MB * MB)
    budget = RunConfig(clients=1000, clients_per_round=100, round_memory_budget=256.0)
    assert inflight_upload_bytes(budget, deployment(), weights) == 256 * MB
    tiny_budget = RunConfig(clients=1000, clients_per_round=100, round_memory_budget=1.0)
    assert inflight_upload_bytes(tiny_budget, deployment(), weights) == update  # room for one
    explicit = deployment(max_inflight_upload_mb=100.0)
    assert inflight_upload_bytes(budget, explicit, weights) == 100 * MB


def test_an_explicit_bound_below_one_update_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        inflight_upload_bytes(RunConfig(), deployment(max_inflight_upload_mb=7.0), 1_000_000)
    message = str(err.value)
    assert "\n" not in message
    assert "--max-inflight-upload-mb" in message and "Received: 7" in message
    assert "7.63 MB" in message  # one float64 update of a million weights
