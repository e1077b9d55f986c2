"""Hostile clients on the wire (issue 13, items 3, 4, 5, 6 and 8): each test starts a real
``fedwarden serve`` on 127.0.0.1 and attacks it with the client generated from the ``.proto``
file alone (tests/wire_client.py), so what is tested is the wire contract.

- item 3: uploads that send a header and then nothing, from many identities at once, are
  cancelled; Register and Heartbeat keep their deadlines; a silent TCP connection is closed.
- item 4: a selected agent that never answers is recorded as silent (its own reason, trust
  unchanged), benched after repeated silence, and the rounds go on without waiting for it.
- item 5: with mutual TLS, a certificate the CA signed for a name not on the allow-list is
  refused, and a client removed from the list is refused from then on, without a restart.
- item 6: /metrics needs TLS and basic auth when configured, caps its connections, drops idle
  ones, and exports the trust of a client whose updates are rejected.
- item 8: an open coordinator refuses a public address, never serves trust, and a burst of
  fake registrations neither passes the per-source cap nor stalls the rounds.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.deploy_helpers import Proc, make_certs, poll, run_fedwarden
from tests.wire_client import Task, WireClient, held_open
from tests.wire_helpers import TINY_MODEL, start_serve

pytestmark = pytest.mark.integration

CLIENT_ID_HEADER = "x-fedwarden-client-id"  # open mode's claimed identity (docs/deploy.md)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page, None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def closed_by_peer(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """The sockets the other end closes within ``within`` seconds (we send nothing)."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + within
    while len(closed) < len(socks) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], left)
        for sock in readable:
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed.append(sock)
    return closed


class HonestAgent(threading.Thread):
    """Fetches each task and answers it with a small update until training is done."""

    def __init__(self, client: WireClient, client_id: str, scale: float = 0.01):
        super().__init__(daemon=True)
        self.registered = threading.Event()
        self.client, self.client_id, self.scale = client, client_id, scale
        self.answered: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if not self.client.session_id:
                self.client.register(self.client_id, num_examples=10)
            self.registered.set()
            while True:
                task = self.client.wait_task(timeout=120, wait_s=2)
                if task.header.status == self.client.pb.TaskHeader.DONE:
                    return
                reply = self.client.submit(task, np.full(task.size, self.scale), num_examples=10)
                assert reply.status == self.client.pb.SubmitReply.ACCEPTED, reply
                self.answered.append(task.round)
        except BaseException as exc:  # reported by the test
            self.error = exc


# -- item 3: stalled uploads, deadlines, caps, idle connections ------------------------------


def test_stalled_uploads_from_many_identities_leave_register_and_heartbeat_served(
    wire, tmp_path, procs
):
    attackers = [f"h{i:02d}" for i in range(50)]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "PAUSE").touch()  # no round: only the calls are under test
    live = start_serve(procs, tmp_path, [*attackers, "c00", "c01"], "--rounds", "1",
                       "--min-clients", "2", "--clients-per-round", "2", "--max-agents", "8",
                       "--stall-timeout", "8", "--idle-timeout", "2")  # fmt: skip
    clients: list[WireClient] = []
    release = threading.Event()
    try:
        honest = WireClient(wire, live.address, live.tokens["c00"])
        clients.append(honest)
        honest.register("c00")
        for cid in attackers:
            client = WireClient(wire, live.address, live.tokens[cid])
            clients.append(client)
            client.register(cid)
        # each attacker opens 4 uploads (its per-identity limit) that send a header, then nothing
        fake = wire.pb.TaskHeader(task_id="x", round=1)
        fake.spec.weight_shapes.add(dims=[84])
        task = Task(fake, b"")  # no round is open: the upload only has to start
        calls = []
        for client in clients[1:]:
            header = client.update_messages(task, 0.0)[:1]
            for _ in range(4):
                calls.append(
                    client.stub.SubmitUpdate.future(
                        held_open(header, release), metadata=client.metadata, timeout=120
                    )
                )
        # at most 2 * max_agents = 16 are held; the others are refused at once (by the guard,
        # or by gRPC itself beyond the worker pool)
        poll(lambda: sum(c.done() for c in calls) >= 200 - 16, 30, "the extra uploads refused")
        assert metric(scrape(live.metrics_port), "fedwarden_updates_rejected_total",
                      reason="busy") >= 1  # fmt: skip
        # while the held uploads wait on their senders, the honest agent is served at once
        started = time.monotonic()
        newcomer = WireClient(wire, live.address, live.tokens["c01"])
        clients.append(newcomer)
        assert newcomer.register("c01", timeout=5).session_id
        assert honest.heartbeat(timeout=5).last_round == 0
        assert time.monotonic() - started < 5
        assert sum(not c.done() for c in calls) > 0, "no upload was held: nothing was tested"
        # every held upload is cancelled by the coordinator: nobody released them
        deadline = time.monotonic() + 30
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=max(deadline - time.monotonic(), 0.1))
            assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        grpc.StatusCode.CANCELLED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED), err.value  # fmt: skip
        assert not release.is_set()
        text = scrape(live.metrics_port)
        assert metric(text, "fedwarden_updates_rejected_total", reason="too_slow") >= 1
        # a unary call that sends its headers and never its message is cancelled too
        register = honest.channel.stream_unary(
            "/fedwarden.v1.Federation/Register",
            request_serializer=wire.pb.RegisterRequest.SerializeToString,
            response_deserializer=wire.pb.RegisterReply.FromString,
        )
        headers_only = register.future(held_open([], release), metadata=honest.metadata,
                                       timeout=120)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            headers_only.result(timeout=20)
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        # a TCP connection that never speaks is closed within the handshake timeout (stall)
        with socket.create_connection(("127.0.0.1", int(live.address.rsplit(":", 1)[1]))) as raw:
            assert closed_by_peer([raw], within=15)
        # a connection with no call for --idle-timeout is closed by the coordinator (GOAWAY)
        with WireClient(wire, live.address, live.tokens["c01"]) as idle:
            states: list[grpc.ChannelConnectivity] = []
            idle.channel.subscribe(states.append)
            with pytest.raises(grpc.RpcError):
                idle.trust()  # one call (refused: c01 is no operator), then nothing
            # the channel reports its states on its own thread: READY may come after the call
            poll(lambda: grpc.ChannelConnectivity.READY in states, 10, "the connection")
            poll(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, 20, "the idle close")
        assert live.proc.popen.poll() is None
    finally:
        release.set()
        for client in clients:
            client.close()


# -- item 4: silence --------------------------------------------------------------------------


def test_a_silent_agent_is_recorded_and_benched_and_the_rounds_go_on(wire, tmp_path, procs):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "PAUSE").touch()  # round 1 waits until all three registered
    live = start_serve(procs, tmp_path, ["c00", "c01", "c02"], "--rounds", "4",
                       "--min-clients", "2", "--clients-per-round", "3", "--round-timeout", "3",
                       "--max-silences", "2", "--bench-rounds", "10")  # fmt: skip
    with (
        WireClient(wire, live.address, live.tokens["c00"]) as a,
        WireClient(wire, live.address, live.tokens["c01"]) as b,
        WireClient(wire, live.address, live.tokens["c02"]) as silent,
    ):
        silent.register("c02")
        stop = threading.Event()

        def keep_alive() -> None:  # polls once for its task, then only heartbeats
            silent.wait_task(timeout=60, wait_s=2)
            while not stop.wait(1.0):
                try:
                    silent.heartbeat()
                except grpc.RpcError:  # the coordinator is gone
                    return

        threading.Thread(target=keep_alive, daemon=True).start()
        agents = [HonestAgent(a, "c00"), HonestAgent(b, "c01")]
        for agent in agents:
            agent.start()
            assert agent.registered.wait(30)
        (live.state / "PAUSE").unlink()
        try:
            live.proc.wait_for(r"^round 4/4", 180)
            text = scrape(live.metrics_port)
            assert live.proc.wait(60) == 0, live.proc.output()
        finally:
            stop.set()
        for agent in agents:
            agent.join(30)
            assert agent.error is None and agent.answered == [1, 2, 3, 4]
    rounds = live.results()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # rounds 1-2 waited their timeout for c02; once benched, the rounds close without it
    assert all("c02" in r["selected"] for r in rounds[:2])
    assert all("c02" not in r["selected"] and r["duration_s"] < 3 for r in rounds[2:])
    assert all(not r["flagged"] for r in rounds)
    shown = run_fedwarden("trust", "show", "c02", "--ledger", str(live.state / "ledger.sqlite"),
                          "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    history = json.loads(shown.stdout)["history"]
    assert [(h["round"], h["rejected_reason"]) for h in history] == [(1, "silent"), (2, "silent")]
    assert all(h["trust"] is None and h["anomaly"] is None for h in history)  # never scored
    assert metric(text, "fedwarden_client_silent_attempts", client_id="c02") == 2
    assert metric(text, "fedwarden_client_silent_attempts", client_id="c00") is None
    assert "c02" not in live.results()["clients"] or not live.results()["clients"]["c02"]["flagged"]


def test_attempts_at_a_round_are_capped(wire, tmp_path, procs):
    """--min-clients equal to the population and one agent that never answers: the round is
    not re-run without end; the coordinator stops, naming the silent agent."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "PAUSE").touch()
    live = start_serve(procs, tmp_path, ["c00", "c01", "c02"], "--rounds", "2",
                       "--min-clients", "3", "--clients-per-round", "3", "--round-timeout", "2",
                       "--max-silences", "9", "--max-attempts", "2")  # fmt: skip
    with (
        WireClient(wire, live.address, live.tokens["c00"]) as a,
        WireClient(wire, live.address, live.tokens["c01"]) as b,
        WireClient(wire, live.address, live.tokens["c02"]) as silent,
    ):
        silent.register("c02")
        agents = [HonestAgent(a, "c00"), HonestAgent(b, "c01")]
        for agent in agents:
            agent.start()
            assert agent.registered.wait(30)
        (live.state / "PAUSE").unlink()
        while live.proc.popen.poll() is None:  # alive, so never benched for a dead session
            try:
                silent.heartbeat(timeout=5)
            except grpc.RpcError:
                break
            time.sleep(0.5)
        assert live.proc.wait(60) == 2
    live.proc.wait_for(r"round 1: 2 attempts abandoned \(--max-attempts\); silent so far: "
                       r"\{'c02': 2\}", 5)  # fmt: skip
    assert not (live.state / "results.json").exists()


# -- item 5: the mTLS allow-list --------------------------------------------------------------


def test_mtls_admits_only_the_allow_list_and_a_revocation_needs_no_restart(wire, tmp_path, procs):
    certs = make_certs(tmp_path / "certs", ["c00", "c01", "intruder"])
    allow = tmp_path / "allow.txt"
    allow.write_text("c00\nc01\n")
    state = tmp_path / "state"
    proc = Proc("coordinator", "serve", *TINY_MODEL, "--seed", "0", "--state-dir", str(state),
                "--rounds", "1", "--min-clients", "2", "--clients-per-round", "2",
                "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
                "--tls-client-ca", str(certs["ca.pem"]), "--allow-clients", str(allow),
                "--port", "0")  # fmt: skip
    procs.append(proc)
    port = proc.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(mutual TLS\)", 300).group(1)

    def client(name: str) -> WireClient:
        return WireClient(wire, f"127.0.0.1:{port}", root_ca=certs["ca.pem"].read_bytes(),
                          cert=certs[f"{name}.pem"].read_bytes(),
                          key=certs[f"{name}.key"].read_bytes())  # fmt: skip

    with client("intruder") as intruder, client("c00") as c00, client("c01") as c01:
        with pytest.raises(grpc.RpcError) as err:
            intruder.register("intruder")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "allow-list" in err.value.details()
        assert c00.register("c00").session_id
        assert c01.register("c01").session_id
        # revoke c01 by deleting its line; pin c00 to its certificate's fingerprint
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        pem = certs["c00.pem"].read_bytes()
        fp = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
        allow.write_text(f"c00 sha256:{fp.hex()}\n")

        def refused() -> bool:
            try:
                c01.heartbeat(timeout=5)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.PERMISSION_DENIED
            return False

        poll(refused, 15, "c01 to be refused after its revocation")
        assert c00.heartbeat(timeout=5).last_round == 0  # pinned to the right certificate
        allow.write_text("c00 sha256:" + "0" * 64 + "\n")  # another certificate for c00
        poll(lambda: not _heartbeats(c00), 15, "c00 to be refused with a wrong fingerprint")
    assert proc.popen.poll() is None  # no restart was needed


def _heartbeats(client: WireClient) -> bool:
    try:
        client.heartbeat(timeout=5)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc
        return False


def test_mtls_without_an_allow_list_or_tokens_does_not_start(tmp_path):
    certs = make_certs(tmp_path / "certs", ["c00"])
    proc = run_fedwarden("serve", *TINY_MODEL, "--state-dir", str(tmp_path / "s"),
                         "--tls-cert", str(certs["server.pem"]), "--tls-key",
                         str(certs["server.key"]), "--tls-client-ca", str(certs["ca.pem"]))  # fmt: skip
    assert proc.returncode == 2 and "--allow-clients" in proc.stderr


# -- item 6: /metrics --------------------------------------------------------------------------


def _web_config(tmp_path: Path, certs: dict[str, Path], password: str) -> Path:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        "tls_server_config:\n"
        f"  cert_file: {certs['server.pem']}\n"
        f"  key_file: {certs['server.key']}\n"
        "basic_auth_users:\n"
        f"  prometheus: '{hashed}'\n"
    )
    return config


def test_metrics_need_tls_and_auth_are_bounded_and_show_a_refused_clients_trust(
    wire, tmp_path, procs
):
    certs = make_certs(tmp_path / "certs", [])
    config = _web_config(tmp_path, certs, "s3cret")
    live = start_serve(procs, tmp_path, ["c00", "c01", "c02"], "--rounds", "2",
                       "--min-clients", "3", "--clients-per-round", "3", "--aggregator",
                       "median", "--metrics-web-config", str(config))  # fmt: skip
    tls = ssl.create_default_context(cafile=str(certs["ca.pem"]))
    url = f"https://127.0.0.1:{live.metrics_port}/metrics"

    def get(auth: str | None) -> tuple[int, str]:
        request = urllib.request.Request(url)
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10, context=tls) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    assert get(None)[0] == 401
    assert get("prometheus:wrong")[0] == 401
    assert get("prometheus:s3cret")[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        scrape(live.metrics_port)  # plaintext is not served
    # idle connections: at most 16 are served, the rest closed at once; idle ones time out
    idle = [socket.create_connection(("127.0.0.1", live.metrics_port)) for _ in range(20)]
    try:
        assert len(closed_by_peer(idle, within=2.0)) == 4  # the others time out after 5 s
        assert len(closed_by_peer(idle, within=15)) == 20
    finally:
        for s in idle:
            s.close()
    assert get("prometheus:s3cret")[0] == 200
    # c02 sends NaN every round: its updates are rejected, and its trust is exported anyway
    with (
        WireClient(wire, live.address, live.tokens["c00"]) as a,
        WireClient(wire, live.address, live.tokens["c01"]) as b,
        WireClient(wire, live.address, live.tokens["c02"]) as bad,
    ):
        agents = [HonestAgent(a, "c00"), HonestAgent(b, "c01"), HonestAgent(bad, "c02", np.nan)]
        for agent in agents:
            agent.start()
        live.proc.wait_for(r"^round 2/2", 180)
        status, text = get("prometheus:s3cret")
        for agent in agents:
            agent.join(60)
    assert status == 200
    trust = {c: metric(text, "fedwarden_client_trust_score", client_id=c) for c in ("c00", "c02")}
    assert trust["c02"] is not None and trust["c00"] is not None and trust["c02"] < trust["c00"]
    assert metric(text, "fedwarden_client_refused_updates", client_id="c02") == 2
    assert metric(text, "fedwarden_client_refused_updates", client_id="c00") is None


# -- item 8: open mode --------------------------------------------------------------------------


def test_open_mode_refuses_a_public_address_unless_told_so(tmp_path):
    proc = run_fedwarden("serve", *TINY_MODEL, "--state-dir", str(tmp_path / "s"),
                         "--insecure", "--host", "0.0.0.0")  # fmt: skip
    assert proc.returncode == 2 and "--allow-open-network" in proc.stderr


def test_open_mode_serves_no_trust_and_fake_registrations_do_not_stall_rounds(
    wire, tmp_path, procs
):
    state = tmp_path / "state"
    proc = Proc("coordinator", "serve", *TINY_MODEL, "--seed", "0", "--state-dir", str(state),
                "--rounds", "2", "--min-clients", "2", "--clients-per-round", "2",
                "--round-timeout", "30", "--insecure", "--port", "0")  # fmt: skip
    procs.append(proc)
    port = proc.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(plaintext\)", 300).group(1)
    address = f"127.0.0.1:{port}"

    def claiming(cid: str) -> WireClient:
        client = WireClient(wire, address)
        client.metadata = ((CLIENT_ID_HEADER, cid),)
        return client

    honest = [claiming("c00"), claiming("c01")]
    for client, cid in zip(honest, ("c00", "c01")):
        client.register(cid)
    with claiming("ops") as reader:
        with pytest.raises(grpc.RpcError) as err:
            reader.trust()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # 200 fake ids from one address in a burst: the per-source cap refuses most of them
    registered = refused = 0
    with WireClient(wire, address) as flood:
        for i in range(200):
            flood.metadata = ((CLIENT_ID_HEADER, f"fake{i:03d}"),)
            try:
                flood.register(f"fake{i:03d}", timeout=5)
                registered += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused += 1
    assert refused >= 100 and registered <= 70
    agents = [HonestAgent(client, cid) for client, cid in zip(honest, ("c00", "c01"))]
    for agent in agents:
        agent.start()
    assert proc.wait(120) == 0, proc.output()
    for agent in agents:
        agent.join(30)
        assert agent.error is None and agent.answered == [1, 2]
        agent.client.close()
    rounds = json.loads((state / "results.json").read_text())["rounds"]
    assert [sorted(r["selected"]) for r in rounds] == [["c00", "c01"]] * 2
    assert all(r["duration_s"] < 30 for r in rounds)
