"""Faults and secrets (issue 9): crashes at every point of a round, damaged checkpoints, a full
disk, an agent killed mid-upload; tokens that never leave their files.

The kill chain runs one deployment through six coordinator lifetimes: five end in SIGKILL at a
different point of a round (server/faults.py), one after a damaged newest checkpoint, and the
last finishes. The agents are light agents (tests/load_harness.py) in this process, plus one in
its own process that is killed in the middle of an upload. The same run's every output is then
searched for the tokens it used. ``FEDWARDEN_HEAVY=1`` adds a chain that kills the coordinator
at a random point of every round of a longer run.
"""

from __future__ import annotations

import errno
import hmac
import inspect
import json
import logging
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedwarden.server import checkpoint
from fedwarden.server.auth import Authenticator, AuthError
from fedwarden.server.faults import POINTS
from fedwarden.server.hub import Hub, UnknownSession
from fedwarden.server.ledger import Ledger
from tests.deploy_helpers import Proc, make_certs, metrics_text, poll, run_fedwarden
from tests.load_harness import AgentPool, serve_args, write_client_data, write_tokens

HEAVY = os.environ.get("FEDWARDEN_HEAVY") == "1"
LIGHT = ["c00", "c01", "c02"]
STALLER = "c03"  # killed in the middle of its upload of round 1


# -- checkpoints, without processes ----------------------------------------------------------


def test_a_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"x": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, {"x": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001.ckpt"]
    assert checkpoint.load_latest(tmp_path) == {"x": 1, "round": 1}


def test_half_written_checkpoints_are_removed_and_unverifiable_ones_refuse_a_restart(
    tmp_path, caplog
):
    checkpoint.save(tmp_path, 1, {"x": 1})
    (tmp_path / ".checkpoint-000002.ckpt.abc.tmp").write_bytes(b"FEDWARDEN-CHECKPOINT-1 2 ")
    with caplog.at_level(logging.WARNING, logger="fedwarden.checkpoint"):
        assert checkpoint.load_latest(tmp_path)["round"] == 1
    assert "left half-written by a crash" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))
    path = checkpoint.path_for(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* verifies"):
        checkpoint.load_latest(tmp_path)  # never silently back to round 0


# -- constant-time comparisons ---------------------------------------------------------------


def test_tokens_are_compared_in_constant_time_against_every_entry(monkeypatch):
    tokens = {f"c{i:02d}": secrets.token_hex(16) for i in range(5)}
    auth = Authenticator(tokens, {"ops": secrets.token_hex(16)})
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr("fedwarden.server.auth.hmac.compare_digest", spy)
    for offered in (tokens["c00"], tokens["c04"], "0" * 32, tokens["c00"][:-1] + "x", "short"):
        calls.clear()
        try:
            auth.identify([("authorization", f"Bearer {offered}")])
        except AuthError:
            pass
        # every entry is compared, whether the first one matches, the last one, or none
        assert len(calls) == 6 and all(b == offered.encode() for _, b in calls)
    source = inspect.getsource(Authenticator._from_token)
    assert "hmac.compare_digest" in source
    assert not re.search(r"offered\s*(==|!=|in\b)|(==|!=|\bin)\s*offered", source)


def test_session_ids_are_compared_in_constant_time(monkeypatch):
    hub = Hub(1)
    session = hub.register("c00")
    seen = []
    original = secrets.compare_digest
    monkeypatch.setattr(
        "fedwarden.server.hub.secrets.compare_digest", lambda a, b: seen.append(b) or original(a, b)
    )
    hub.heartbeat("c00", session)
    with pytest.raises(UnknownSession):
        hub.heartbeat("c00", "0" * len(session))
    assert seen == [session, "0" * len(session)]


# -- the kill chain: six lifetimes of one deployment -----------------------------------------


@dataclass
class Deployment:
    """One deployment's state dir, credentials, light agents and every line it printed."""

    root: Path
    rounds: int
    state: Path = field(init=False)
    tokens: dict[str, str] = field(init=False)
    files: dict[str, Path] = field(init=False)
    certs: dict[str, Path] = field(init=False)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    agent_log: list[str] = field(default_factory=list)
    observed: dict[str, object] = field(default_factory=dict)
    extra_texts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        self.files = write_client_data(self.root / "data", [*LIGHT, STALLER])
        self.tokens = write_tokens(self.root / "tokens.toml", [*LIGHT, STALLER], operator="ops")
        self.certs = make_certs(self.root / "certs", [])

    def serve(self, port: int, fault: str | None, *extra: str) -> Proc:
        args = serve_args(self.state, self.root / "tokens.toml", self.rounds, 3, 4,
                          "--tls-cert", str(self.certs["server.pem"]), "--tls-key",
                          str(self.certs["server.key"]), "--round-timeout", "8", "--port",
                          str(port), *extra)  # fmt: skip
        name = f"coordinator {len(self.outputs) + 1} ({fault or 'no fault'})"
        proc = Proc(name, *args, env={"FEDWARDEN_FAULT": fault} if fault else None)
        self.outputs[name] = proc.lines
        return proc

    def killed(self, proc: Proc) -> None:
        """Waits for a coordinator to die by its own fault injection (SIGKILL)."""
        assert proc.wait(300) == -signal.SIGKILL, proc.output()

    def results(self) -> list[int]:
        path = self.state / "results.json"
        return [r["round"] for r in json.loads(path.read_text())["rounds"]] if path.exists() else []

    def checkpoints(self) -> list[int]:
        return [r for r, _ in checkpoint.list_checkpoints(self.state)]

    def ledger_last(self) -> int:
        with Ledger(self.state / "ledger.sqlite", readonly=True) as ledger:
            return ledger.last_round()


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("chain"), rounds=6)
    agent_logger = logging.getLogger("fedwarden.agent")
    handler, level = _Collect(d.agent_log), agent_logger.level
    agent_logger.addHandler(handler)
    agent_logger.setLevel(logging.INFO)
    started: list[Proc] = []
    try:
        run_chain(d, started)
    finally:
        for p in started:
            p.stop()
        agent_logger.removeHandler(handler)
        agent_logger.setLevel(level)
    return d


def run_chain(d: Deployment, started: list[Proc]) -> None:
    o = d.observed
    d.state.mkdir()
    (d.state / "PAUSE").write_text("1")  # round 1 waits until every agent is connected
    first = d.serve(0, "collect:2")
    started.append(first)
    port = int(first.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 300).group(1))
    address = f"127.0.0.1:{port}"
    ca = str(d.certs["ca.pem"])
    staller = Proc(STALLER, "agent", "--server", address, "--client-id", STALLER, "--data",
                   str(d.files[STALLER]), "--tls-ca", ca, "--stall-upload",
                   module="tests.load_harness", env={"FEDWARDEN_TOKEN": d.tokens[STALLER]})  # fmt: skip
    started.append(staller)
    d.outputs[STALLER] = staller.lines
    staller.wait_for("registered with", 120)
    pool = AgentPool(address, d.tokens, d.files, tls_ca=ca)
    pool.start(LIGHT)
    poll(lambda: sum("registered with" in line for line in d.agent_log) == len(LIGHT), 120,
         "the light agents to register")  # fmt: skip
    (d.state / "PAUSE").unlink()
    # 1: an agent dies in the middle of its upload of round 1; round 2 starts, then the crash
    staller.wait_for("stalled mid-upload of round 1", 120)
    staller.popen.kill()
    staller.popen.wait(10)
    first.wait_for(r"update from c03 refused on arrival \(damaged_stream\)", 60)
    d.killed(first)
    o["after collect:2"] = (d.results(), d.checkpoints(), d.ledger_last())
    # 2: killed with round 3's updates in, before aggregation
    second = d.serve(port, "aggregate:3")
    started.append(second)
    d.killed(second)
    o["after aggregate:3"] = (d.results(), d.checkpoints(), d.ledger_last())
    # 3: killed with round 4 in the ledger but not in a checkpoint
    third = d.serve(port, "ledger:4")
    started.append(third)
    d.killed(third)
    o["after ledger:4"] = (d.results(), d.checkpoints(), d.ledger_last())
    # 4: killed halfway through writing round 5's checkpoint
    fourth = d.serve(port, "checkpoint:5")
    started.append(fourth)
    fourth.wait_for(r"the ledger holds rounds after 3", 300)
    d.killed(fourth)
    o["after checkpoint:5"] = (d.results(), d.checkpoints(), d.ledger_last())
    o["half-written"] = sorted(p.name for p in d.state.glob(".checkpoint-*.tmp"))
    # 5: killed after round 6's checkpoint, before results.json
    fifth = d.serve(port, "results:6")
    started.append(fifth)
    fifth.wait_for(r"removing \.checkpoint-000005\.ckpt\..*half-written by a crash", 300)
    d.killed(fifth)
    o["after results:6"] = (d.results(), d.checkpoints(), d.ledger_last())
    # 6: the newest checkpoint is damaged on disk; the previous one is used, the operator told
    newest = checkpoint.path_for(d.state, 6)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    (d.state / "PAUSE").write_text("6")
    last = d.serve(port, None)
    started.append(last)
    last.wait_for(r"skipping checkpoint of round 6: .* is corrupted: sha256", 300)
    last.wait_for(r"resuming after round 5 ", 60)
    listening = last.wait_for(r"metrics on 127\.0\.0\.1:(\d+)", 60)
    last.wait_for(r"^round 6: held by", 120)
    d.extra_texts["metrics"] = metrics_text(int(listening.group(1)))
    listed = run_fedwarden("trust", "list", "--server", address, "--tls-ca", ca, "--token",
                           d.tokens["ops"], "--format", "json")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    d.extra_texts["trust list"] = listed.stdout + listed.stderr
    (d.state / "PAUSE").unlink()
    assert last.wait(300) == 0, last.output()
    o["exits"] = pool.join(120)


@pytest.mark.integration
def test_no_round_is_lost_or_repeated_across_crashes_at_every_point(chain):
    d, o = chain, chain.observed
    # (results.json, checkpoints on disk, ledger's last round) after each crash
    assert o["after collect:2"] == ([1], [1], 1)
    assert o["after aggregate:3"] == ([1, 2], [2, 1], 2)
    assert o["after ledger:4"] == ([1, 2, 3], [3, 2], 4)  # the ledger is ahead: truncated later
    assert o["after checkpoint:5"] == ([1, 2, 3, 4], [4, 3], 5)
    assert len(o["half-written"]) == 1 and o["half-written"][0].startswith(".checkpoint-000005")
    assert o["after results:6"] == ([1, 2, 3, 4, 5], [6, 5], 6)
    assert all(code == 0 for code in o["exits"].values()), o["exits"]
    results = json.loads((d.state / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5, 6]
    assert STALLER in results["rounds"][0]["selected"]
    assert [r["admitted"] for r in results["rounds"]] == [3] * 6
    assert d.checkpoints() == [6, 5] and not list(d.state.glob("*.tmp"))
    with Ledger(d.state / "ledger.sqlite", readonly=True) as ledger:
        for cid in LIGHT:
            assert [h["round"] for h in ledger.client_history(cid)] == [1, 2, 3, 4, 5, 6]
            assert ledger.get_client(cid)["trust"] == pytest.approx(
                results["clients"][cid]["trust"]
            )  # noqa: E501
        # its cut upload never reached the ledger: only its silence in round 1, trust unscored
        assert [(h["round"], h["rejected_reason"], h["trust"])
                for h in ledger.client_history(STALLER)] == [(1, "silent", None)]  # fmt: skip
        assert ledger.last_round() == 6
    # the restarted coordinator shows the trust it resumed with before running a round
    metrics = d.extra_texts["metrics"]
    assert re.search(r"^fedwarden_round 5\.0$", metrics, re.M)
    for cid in LIGHT:
        assert f'fedwarden_client_trust_score{{client_id="{cid}"}}' in metrics
    # the agents found each new coordinator by themselves
    assert sum("retrying" in line for line in d.agent_log) >= len(LIGHT)
    assert any(
        "refused on arrival (damaged_stream)" in line
        for line in d.outputs["coordinator 1 (collect:2)"]
    )  # noqa: E501


def every_text(d: Deployment) -> dict[str, bytes]:
    texts = {name: "\n".join(lines).encode() for name, lines in d.outputs.items()}
    texts["agents' logs"] = "\n".join(d.agent_log).encode()
    texts.update({name: text.encode() for name, text in d.extra_texts.items()})
    for path in d.state.rglob("*"):
        if path.is_file():
            texts[str(path.relative_to(d.root))] = path.read_bytes()
    return texts


@pytest.mark.integration
def test_tokens_never_appear_in_logs_metrics_or_state(chain):
    texts = every_text(chain)
    assert any("ledger.sqlite" in name for name in texts) and "metrics" in texts
    assert sum(len(t) for t in texts.values()) > 10_000
    # the search would see them: the client ids next to the tokens are all over these texts
    for name in ("agents' logs", "trust list", "metrics", "state/ledger.sqlite"):
        assert all(cid.encode() in texts[name] for cid in LIGHT), name
    for cid, token in chain.tokens.items():
        for needle in (token, token[:16]):
            leaks = [name for name, text in texts.items() if needle.encode() in text]
            assert not leaks, f"{cid}'s token appears in {leaks}"
    labels = set(re.findall(r'(?:client_id|reason)="([^"]*)"', chain.extra_texts["metrics"]))
    assert labels and not labels & set(chain.tokens.values())
    assert "fedwarden_client_trust_score{" in chain.extra_texts["metrics"]


# -- a full disk for the state dir ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the monkeypatched "
                    "ENOSPC test covers checkpoints")  # fmt: skip
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.integration
def test_a_full_state_dir_stops_the_coordinator_cleanly_and_it_resumes(tmp_path, small_disk, procs):  # noqa: E501
    d = Deployment(tmp_path, rounds=4)
    d.state = small_disk / "state"
    d.state.mkdir()
    (d.state / "PAUSE").write_text("3")
    first = d.serve(0, None)
    procs.append(first)
    port = int(first.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 300).group(1))
    pool = AgentPool(f"127.0.0.1:{port}", d.tokens, d.files, tls_ca=str(d.certs["ca.pem"]))
    pool.start(LIGHT)
    first.wait_for(r"^round 3: held by", 300)
    filler = fill(small_disk)
    (d.state / "PAUSE").unlink()
    assert first.wait(300) == 2, first.output()
    first.wait_for(r"round 3: cannot write the state dir .*(No space left|disk is full).*last "
                   r"checkpoint is round 2.*restart with the same --state-dir", 1)  # fmt: skip
    assert d.checkpoints() == [2, 1] and not list(d.state.glob("*.tmp"))
    assert d.results() == [1, 2]
    with sqlite3.connect(d.state / "ledger.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    filler.unlink()
    second = d.serve(port, None)
    procs.append(second)
    second.wait_for(r"resuming after round 2 ", 300)
    assert second.wait(300) == 0, second.output()
    assert all(code == 0 for code in pool.join(120).values())
    assert d.results() == [1, 2, 3, 4]
    with Ledger(d.state / "ledger.sqlite", readonly=True) as ledger:
        for cid in LIGHT:
            assert [h["round"] for h in ledger.client_history(cid)] == [1, 2, 3, 4]


# -- heavy: a crash at a random point of every round ------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not HEAVY, reason="set FEDWARDEN_HEAVY=1")
def test_random_crashes_in_every_round_never_lose_or_repeat_one(tmp_path, procs):
    rounds = 12
    d = Deployment(tmp_path, rounds=rounds)
    rng = random.Random(0)
    port, pool = 0, None
    for r in range(1, rounds + 1):
        fault = f"{rng.choice(POINTS)}:{r}"
        proc = d.serve(port, fault)
        procs.append(proc)
        if pool is None:
            port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 300).group(1))
            pool = AgentPool(f"127.0.0.1:{port}", d.tokens, d.files, tls_ca=str(d.certs["ca.pem"]))  # noqa: E501
            pool.start(LIGHT)
        d.killed(proc)
        assert d.results() == list(range(1, len(d.results()) + 1))
        if len(d.checkpoints()) > 1 and rng.random() < 0.3:  # sometimes a damaged newest one
            newest = checkpoint.path_for(d.state, d.checkpoints()[0])
            newest.write_bytes(newest.read_bytes()[:-7])
    final = d.serve(port, None)
    procs.append(final)
    assert final.wait(600) == 0, final.output()
    assert all(code == 0 for code in pool.join(120).values())
    assert d.results() == list(range(1, rounds + 1))
    with Ledger(d.state / "ledger.sqlite", readonly=True) as ledger:
        for cid in LIGHT:
            assert [h["round"] for h in ledger.client_history(cid)] == list(range(1, rounds + 1))
