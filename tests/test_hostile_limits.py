"""The pieces behind tests/test_hostile_wire.py, without sockets (issue 13): the hub's silence
rules on a fake clock, the call guard's watchdog, the allow-list file and the /metrics web
config."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedwarden.errors import UsageError
from fedwarden.protocol.transfer import sha256_hex
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.auth import AllowList, Authenticator, AuthError, parse_allow_list
from fedwarden.server.hub import SILENT, Hub, client_rows, record_silence
from fedwarden.server.ledger import Ledger
from fedwarden.server.metrics import MetricsExporter, WebConfig
from fedwarden.server.service import CallGuard, CallLimits
from fedwarden.server.trust import TrustBook, TrustPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(hub: Hub, cid: str, session: str, task) -> None:
    hub.submit(cid, session, task.task_id, ClientUpdate(cid, task.round, np.zeros(2), 1))


# -- silence ---------------------------------------------------------------------------------


def test_a_round_closes_at_its_target_and_the_spares_are_not_silent():
    hub = Hub(3)
    sessions = {c: hub.register(c) for c in ("a", "b", "c", "d")}
    task = hub.publish(1, 0, list(sessions), b"", sha256_hex(b""), target=2)
    answer(hub, "a", sessions["a"], task)
    answer(hub, "b", sessions["b"], task)
    updates, complete = hub.collect(2, deadline=hub.clock() + 60)  # returns at once
    assert complete and [u.client_id for u in updates] == ["a", "b"]
    assert hub.take_silence() == {} and hub.silences == {}


def test_a_dead_session_ends_the_wait_and_is_counted_silent():
    clock = Clock()
    hub = Hub(3, liveness_s=5, clock=clock)
    sessions = {c: hub.register(c) for c in ("a", "b", "gone")}
    task = hub.publish(1, 0, list(sessions), b"", sha256_hex(b""))
    answer(hub, "a", sessions["a"], task)
    clock.now = 6.0  # nobody heard from "b" or "gone" since registering
    hub.heartbeat("b", sessions["b"])
    answer(hub, "b", sessions["b"], task)
    _, complete = hub.collect(2, deadline=1000.0)  # "gone" is dead: no wait for the deadline
    assert complete and hub.take_silence() == {"gone": 1}


def test_repeated_silence_benches_a_client_for_some_rounds():
    clock = Clock()
    hub = Hub(10, clock=clock, max_silences=2, bench_rounds=3)
    sessions = {c: hub.register(c) for c in ("a", "mute")}
    for attempt in range(2):
        task = hub.publish(1, attempt, ["a", "mute"], b"", sha256_hex(b""))
        answer(hub, "a", sessions["a"], task)
        hub.collect(1, deadline=clock.now)  # the deadline has passed: "mute" was silent
    assert hub.silences == {"mute": 2} and hub.benched_clients() == ["mute"]
    assert hub.live_clients() == ["a"]
    assert hub.take_silence() == {"mute": 2} and hub.take_silence() == {}
    hub.set_last_round(3)
    assert hub.live_clients() == ["a", "mute"]  # back after bench_rounds rounds


def test_an_open_hub_selects_only_sessions_that_asked_for_a_task():
    hub = Hub(3, poll_to_select=True)
    session = hub.register("agent")
    hub.register("fake")
    assert hub.live_clients() == []
    assert hub.wait_task("agent", session, "", 0.0) is None
    assert hub.live_clients() == ["agent"]


def test_silence_reaches_the_ledger_without_changing_trust(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    trust = TrustBook(TrustPolicy(), ledger)
    trust.update(1, ["a", "b"], np.array([0.1, 0.2]))
    before = trust.get("b").trust
    record_silence(trust, 2, {"b": 1, "never_scored": 3})
    rows = {r["client_id"]: r for r in ledger.round_rows(2)}
    assert rows["b"]["rejected_reason"] == SILENT and rows["b"]["trust"] == before
    assert (
        rows["never_scored"]["rejected_reason"] == SILENT and rows["never_scored"]["trust"] is None
    )
    exported = {r["client_id"]: r for r in client_rows(trust, {"b": 1, "never_scored": 3})}
    assert exported["b"]["silent"] == 1 and "silent" not in exported["a"]
    assert exported["never_scored"] == {"client_id": "never_scored", "silent": 3}
    ledger.close()


def test_a_silent_round_keeps_the_evidence_a_restarted_coordinator_resumes(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        for r in range(1, 6):
            book.update(r, ["a", "b", "c", "d"], np.array([0.1, 0.12, 0.11, 1.0]), {})
        before = ledger.get_client("d")
        assert before["flagged"] and before["evidence"] > 0
        record_silence(book, 6, {"d": 1})
        after = ledger.get_client("d")
        for key in ("flagged", "evidence", "explanation", "evidence_state"):
            assert after[key] == before[key], key
        restarted = TrustBook(TrustPolicy(), ledger)
        assert restarted.get("d").evidence == pytest.approx(book.get("d").evidence)


# -- the call guard --------------------------------------------------------------------------


class Context:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.aborted: tuple | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def abort(self, code, details):
        self.aborted = (code, details)
        raise RuntimeError(details)


def test_the_guard_caps_calls_and_cancels_a_stalled_one():
    clock = Clock()
    guard = CallGuard(CallLimits(max_calls=3, max_streams=1, stall_s=2, min_rate=100),
                      clock=clock, tick_s=0.01)  # fmt: skip
    guard.start()
    try:
        stalled, transfer, other = Context(), Context(), Context()
        with guard.call(stalled, stream=True) as call:
            guard.expect(call, nbytes=10_000)  # a deadline 102 s away: only the stall counts
            refused: list[str] = []
            with (
                pytest.raises(RuntimeError),
                guard.call(other, stream=True, on_full=refused.append),
            ):
                pass
            assert "streaming calls" in refused[0] and other.aborted is not None
            with guard.call(transfer, stream=False) as moving:
                guard.expect(moving, nbytes=1000)  # 2 s of grace + 10 s at 100 B/s
                clock.now = 5.0
                guard.progress(moving)
                assert stalled.cancelled.wait(5)  # no byte for 5 s > stall_s
                assert "stalled" in call.expired
                assert not transfer.cancelled.is_set()
                clock.now = 12.5  # past 2 + 10 s even though it kept moving
                assert transfer.cancelled.wait(5) and "deadline" in moving.expired
        assert guard.in_progress() == (0, 0)
    finally:
        guard.stop()


def test_call_limits_keep_workers_for_unary_calls():
    with pytest.raises(ValueError, match="max_streams < max_calls"):
        CallLimits(max_calls=4, max_streams=4)


# -- the allow-list --------------------------------------------------------------------------


def test_the_allow_list_is_re_read_when_it_changes(tmp_path):
    path = tmp_path / "allow.txt"
    pin = "ab" * 32
    path.write_text(f"# training identities\nc00\nc01 sha256:{pin}\n")
    clock = Clock()
    allow = AllowList(path, clock=clock)
    auth = Authenticator(mutual_tls=True, allow=allow, operator_names=["ops"])
    assert auth.identify([], "c00").name == "c00"
    assert auth.identify([], "c01", f"sha256:{pin}").name == "c01"
    assert auth.identify([], "ops").may_read_trust  # operators are not training identities
    for name, fp in (("c01", "sha256:" + "cd" * 32), ("intruder", None)):
        with pytest.raises(AuthError) as err:
            auth.identify([], name, fp)
        assert err.value.denied
    path.write_text("c01 sha256:" + ":".join([pin[i : i + 2].upper() for i in range(0, 64, 2)]))
    assert allow.permits("c00")  # not re-read before recheck_s
    clock.now = 1.0
    assert not allow.permits("c00") and allow.permits("c01", f"sha256:{pin}")
    path.unlink()
    clock.now = 2.0
    assert not allow.permits("c01", f"sha256:{pin}")  # a missing list denies everyone


def test_a_bad_allow_list_line_is_named():
    with pytest.raises(UsageError, match="line 2: 'md5:12'"):
        parse_allow_list("c00\nc01 md5:12\n")


# -- /metrics ------------------------------------------------------------------------------


def test_web_config_refuses_what_it_does_not_support(tmp_path):
    path = tmp_path / "web.yml"
    for text, message in (
        ("http_server_config: {}\n", "supported keys"),
        ("basic_auth_users:\n  prom: plain\n", "bcrypt hash"),
        ("tls_server_config:\n  cert_file: a.pem\n", "cert_file and key_file"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            WebConfig.load(path)


def test_basic_auth_checks_bcrypt_once_per_credential():
    import base64

    import bcrypt

    config = WebConfig(users={"prom": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()})

    def header(credentials: str) -> str:
        return "Basic " + base64.b64encode(credentials.encode()).decode()

    assert not config.authorized(None) and not config.authorized(header("prom:nope"))
    assert not config.authorized(header("other:pw")) and not config.authorized("Basic !!")
    assert config.authorized(header("prom:pw")) and config.authorized(header("prom:pw"))
    assert WebConfig().authorized(None)


def test_refusals_and_silence_are_exported_per_client():
    exporter = MetricsExporter()
    exporter.count_rejected("too_slow", client_id="c03")
    exporter.count_rejected("non_finite", client_id="c03")
    exporter.count_rejected("unauthenticated")
    exporter.update_clients([{"client_id": "c04", "silent": 2}])
    text = exporter.render().decode()
    assert 'fedwarden_client_refused_updates{client_id="c03"} 2.0' in text
    assert 'fedwarden_client_silent_attempts{client_id="c04"} 2.0' in text
    assert 'fedwarden_updates_rejected_total{reason="unauthenticated"} 1.0' in text
