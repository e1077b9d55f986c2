"""Red-team agents and the live privacy budget (issue 10).

Unit tests cover the non-omniscient attack estimates and the red-team bookkeeping without
sockets; the integration tests start a coordinator and agents as processes on 127.0.0.1 (helpers
in tests/deploy_helpers.py: nothing waits with a fixed sleep).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from fedwarden.attacks import ATTACKS, alie_z, build_attack
from fedwarden.clients.red_team import (
    ESTIMATE_SAMPLES,
    RedTeam,
    honest_reference,
    needs_spread,
    read_reports,
)
from fedwarden.errors import UsageError
from fedwarden.server.ledger import Ledger
from tests.deploy_helpers import (
    OPERATOR_TOKEN,
    SERVE_ARGS,
    TOKENS,
    Proc,
    metrics_text,
    run_fedwarden,
    split_data,
    write_tokens,
)

D = 300


def honest_population(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    """n honest updates around a common direction, with per-coordinate spread."""
    mean = rng.normal(0.0, 1.0, d)
    return mean + rng.normal(0.0, 0.5, (n, d)) * rng.uniform(0.5, 1.5, d)


# -- the estimates ---------------------------------------------------------------------------


def test_reference_rows_have_the_samples_mean_and_std_exactly():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(ESTIMATE_SAMPLES, D))
    rows = honest_reference(samples, 9, rng)
    assert rows.shape == (9, D) and rows.dtype == np.float32
    np.testing.assert_allclose(rows.mean(0), samples.mean(0), atol=1e-5)
    np.testing.assert_allclose(rows.std(0), samples.std(0, ddof=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(honest_reference(samples, 1, rng)[0], samples.mean(0), rtol=1e-6)


def test_one_sample_is_repeated_without_a_copy():
    own = np.arange(5, dtype=np.float32)
    rows = honest_reference(own[None], 4, np.random.default_rng(0))
    assert rows.shape == (4, 5) and not rows.flags.writeable
    assert (rows == own).all()
    with pytest.raises(ValueError, match="samples must be shaped"):
        honest_reference(np.zeros((0, 5)), 4, np.random.default_rng(0))


def test_only_attacks_that_read_honest_values_pay_for_an_estimate(monkeypatch):
    spread = {n for n in ATTACKS if needs_spread(build_attack(n, {"num_classes": 10}))}
    assert spread == {"alie", "ipm", "min_max", "min_sum", "random_direction"}
    assert needs_spread(build_attack("gaussian", {"relative": True}))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert needs_spread(build_attack("attack_plugins:push_away"))
    assert not needs_spread(build_attack("attack_plugins:relabel_all"))


def estimated(rng: np.random.Generator, honest: np.ndarray) -> np.ndarray:
    """The agent's view: its own update and resampled ones stand in for ESTIMATE_SAMPLES draws."""
    return honest_reference(honest[:ESTIMATE_SAMPLES], len(honest), rng)


def test_non_omniscient_alie_stays_within_z_estimated_stds_of_the_estimated_mean():
    rng = np.random.default_rng(1)
    honest = honest_population(rng, 9)
    ref = estimated(rng, honest)
    own = honest[:1]
    sent = build_attack("alie").craft(ref, own, rng)[0]
    z = alie_z(10, 1)
    est_mean, est_std = honest[:ESTIMATE_SAMPLES].mean(0), honest[:ESTIMATE_SAMPLES].std(0, ddof=1)
    np.testing.assert_allclose(sent, est_mean - z * est_std, rtol=1e-4, atol=1e-4)
    # and it lands near the omniscient ALIE, relative to the honest updates' size
    omniscient = build_attack("alie").craft(honest, own, rng)[0]
    gap = np.linalg.norm(sent - omniscient) / np.median(np.linalg.norm(honest, axis=1))
    assert gap < 0.3, gap  # an honest update is about 0.4 from the honest mean here


def test_non_omniscient_ipm_and_min_max_still_oppose_the_true_honest_mean():
    rng = np.random.default_rng(2)
    honest = honest_population(rng, 9)
    true_mean = honest.mean(0)
    ref = estimated(rng, honest)
    for name in ("ipm", "min_max", "min_sum"):
        sent = build_attack(name).craft(ref, honest[:1], rng)[0]
        assert sent @ true_mean < (honest[:1] @ true_mean).item(), name
    ipm = build_attack("ipm").craft(ref, honest[:1], rng)[0]
    assert ipm @ true_mean < 0


# -- the red team's bookkeeping ---------------------------------------------------------------


class FakeTraining:
    """``train(x, y, rng)``: an update from the data's mean label, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.calls += 1
        return np.full(D, y.mean(), np.float32) + rng.normal(0, 0.1, D).astype(np.float32)


def local_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.random((40, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 40)


@pytest.mark.parametrize(
    "attack, extra_trainings",
    [("gaussian", 0), ("scaling", 0), ("alie", 3), ("attack_plugins:push_away", 3)],
)
def test_red_team_attacks_from_its_start_round_and_reports_what_it_sent(
    tmp_path, monkeypatch, attack, extra_trainings
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report = tmp_path / "red.jsonl"
    red = RedTeam(attack, {}, "c04", start_round=2, cohort=5, report=report)
    x, y = local_data()
    red.bind(10, x, y, seed=0)
    train = FakeTraining()
    trained = train(x, y, np.random.default_rng(0))
    train.calls = 0
    assert (red.craft(1, trained, train) == trained).all()  # honest before the start round
    red.record(1, "ACCEPTED")
    sent = red.craft(2, trained, train)
    red.record(2, "ACCEPTED")
    assert train.calls == extra_trainings
    if attack == "scaling":  # default boost n / m with the assumed cohort n = 5
        np.testing.assert_allclose(sent, 5 * trained, rtol=1e-6)
    if attack.endswith("push_away"):  # the plugin gets 4 stand-in rows: -2 * their mean
        assert sent @ trained < 0
    lines = read_reports([report])
    assert [(r["round"], r["attacking"]) for r in lines] == [(1, False), (2, True)]
    assert lines[1]["update_norm"] == pytest.approx(float(np.linalg.norm(sent)), rel=1e-6)
    assert lines[0]["update_norm"] == pytest.approx(lines[0]["trained_norm"])
    assert lines[1]["attack"] == attack and lines[1]["status"] == "ACCEPTED"
    assert lines[1]["estimate_samples"] == 1 + extra_trainings and "num_classes" not in str(lines)


def test_a_red_team_attacker_that_reads_the_detector_scores_against_the_weights_it_was_sent(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import attack_plugins

    params = {"score": "attack_plugins:recording_score"}
    red = RedTeam("detector_aware", params, "c04", start_round=1, cohort=5, report=None)
    x, y = local_data()
    red.bind(10, x, y, seed=0)
    train = FakeTraining()
    trained = train(x, y, np.random.default_rng(0))
    sent_from = np.linspace(-1.0, 1.0, trained.size).astype(np.float32)
    attack_plugins.SCORED_WITH_WEIGHTS.clear()
    red.craft(1, trained, train, trained_from=sent_from)
    seen = attack_plugins.SCORED_WITH_WEIGHTS
    assert seen and all(np.array_equal(v, sent_from) for v in seen)


def test_a_data_attack_trains_on_poisoned_data_once_it_starts():
    red = RedTeam("label_flip", {}, "c04", start_round=3)
    x, y = local_data()
    red.bind(10, x, y, seed=0)
    assert red.local_data(2, x, y)[1] is y
    flipped = red.local_data(3, x, y)[1]
    assert (flipped == 9 - y).all()
    boosted = RedTeam("backdoor", {"boost": 4.0}, "c04")
    boosted.bind(10, x, y, seed=0)
    own = np.ones(D, np.float32)
    np.testing.assert_allclose(boosted.craft(1, own, FakeTraining()), 4 * own)


def test_a_red_team_agent_claims_its_example_count_only_while_attacking():
    red = RedTeam("sign_flip", {}, "c04", start_round=3, claim_examples=1)
    assert [red.reported_examples(r, 40) for r in (1, 2, 3, 4)] == [40, 40, 1, 1]
    assert RedTeam("sign_flip", {}, "c04").reported_examples(5, 40) == 40


def test_an_on_off_agent_attacks_in_the_rounds_a_simulation_would_have_it_attack():
    from fedwarden.attacks import attacks_in_round

    red = RedTeam("sign_flip", {}, "c04", start_round=3, rate=0.5)
    x, y = local_data()
    red.bind(10, x, y, seed=7)
    trained = FakeTraining()(x, y, np.random.default_rng(0))
    on = [r for r in range(1, 201) if (red.craft(r, trained, FakeTraining()) != trained).any()]
    assert on == [r for r in range(1, 201) if attacks_in_round("c04", r, start_round=3, rate=0.5,
                                                               seed=7)]  # fmt: skip
    assert min(on) >= 3 and 70 < len(on) < 130  # about half of rounds 3-200
    assert on != [r for r in range(1, 201) if attacks_in_round("c05", r, rate=0.5, seed=7)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attack="scaling", claim_examples=0), "--attack-claim-examples must be >= 1"),
        (dict(attack="nope"), "unknown attack 'nope'"),
        (dict(attack="scaling", params={"bost": 2}), "has no parameter 'bost'"),
        (dict(attack="none"), "honest agent"),
        (dict(attack="gaussian", cohort=1), "--attack-cohort must be >= 2"),
        (dict(attack="gaussian", start_round=0), "--attack-start-round must be >= 1"),
        (dict(attack="gaussian", rate=0.0), r"--attack-rate must be in \(0, 1\]"),
    ],
)
def test_bad_red_team_options_are_usage_errors(kwargs, message):
    kwargs = {"params": {}, "client_id": "c04", **kwargs}
    with pytest.raises(UsageError, match=message):
        RedTeam(kwargs.pop("attack"), kwargs.pop("params"), **kwargs)


def test_class_ranges_are_checked_when_the_task_names_its_classes():
    red = RedTeam("backdoor", {"target": 12}, "c04")  # fine until the task says 10 classes
    with pytest.raises(UsageError, match="target must be a class in 0..9"):
        red.bind(10, *local_data(), seed=0)


def test_agent_cli_refuses_a_bad_attack_before_connecting(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 2]))
    base = ["agent", "--server", "127.0.0.1:9", "--client-id", "c04", "--data",
            str(tmp_path / "d.npz"), "--insecure"]  # fmt: skip
    proc = run_fedwarden(*base, "--attack", "scaling", "--attack-param", "boost", timeout=60)
    assert proc.returncode == 2 and "bad --attack-param: 'boost'" in proc.stderr, proc.stderr
    proc = run_fedwarden(*base, "--red-team-report", str(tmp_path / "r.jsonl"), timeout=60)
    assert proc.returncode == 2 and "need --attack NAME" in proc.stderr, proc.stderr
    proc = run_fedwarden(*base, "--attack-claim-examples", "1", timeout=60)
    assert proc.returncode == 2 and "need --attack NAME" in proc.stderr, proc.stderr


def test_reports_must_be_json_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"round": 1}\n')
    with pytest.raises(UsageError, match="needs client_id, round, attacking"):
        read_reports([bad])
    bad.write_text("not json\n")
    with pytest.raises(UsageError, match="bad.jsonl:1: not a JSON line"):
        read_reports([bad])
    with pytest.raises(UsageError, match="not found"):
        read_reports([tmp_path / "missing.jsonl"])


# -- fedwarden trust report -------------------------------------------------------------------


def report_line(cid: str, r: int, attacking: bool, status: str = "ACCEPTED") -> str:
    return json.dumps({"client_id": cid, "round": r, "attacking": attacking, "attack": "gaussian",
                       "update_norm": 1.0, "status": status})  # fmt: skip


def test_trust_report_scores_the_ledger_flags_against_the_red_team(tmp_path, capsys):
    from fedwarden.cli.trust import trust_main
    from fedwarden.server.ledger import Ledger

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        flags = {1: [], 2: ["c04"], 3: ["c04", "c01"], 4: ["c04"]}
        for r, flagged in flags.items():
            selected = ["c00", "c01", "c04"] if r != 4 else ["c00", "c04"]  # c01 keeps its flag
            ledger.record_round(r, [{"client_id": c, "trust": 0.9, "flagged": c in flagged}
                                    for c in selected])  # fmt: skip
    red = tmp_path / "c04.jsonl"
    red.write_text("\n".join(report_line("c04", r, r >= 2) for r in (1, 2, 3, 4)) + "\n")
    late = tmp_path / "c05.jsonl"  # an attacker whose only attacking update came too late
    late.write_text(report_line("c05", 1, False) + "\n" + report_line("c05", 2, True, "LATE"))
    argv = ["trust", "report", "--ledger", str(tmp_path / "ledger.sqlite"), "--red-team"]
    assert trust_main([*argv, str(red), str(late), "--format", "json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["rounds"] == 4 and scores["flagged"] == ["c01", "c04"]
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    assert scores["first_detection_round"] == 2 and scores["false_positives"] == ["c01"]
    assert scores["attackers"] == {
        "c04": {"attack": "gaussian", "first_attack_round": 2, "first_flagged_round": 2,
                "rounds_to_detection": 1}
    }  # fmt: skip
    assert trust_main([*argv, str(red)]) == 0
    assert "precision 0.50  recall 1.00  first detection round 2" in capsys.readouterr().out
    assert trust_main([*argv, str(tmp_path / "none.jsonl")]) == 2
    assert "red-team report not found" in capsys.readouterr().err


# -- processes: a rehearsal and a privacy budget on 127.0.0.1 --------------------------------

RED_TOKENS = {**TOKENS, "c04": "f" * 32}


@pytest.mark.integration
def test_a_red_team_agent_ends_flagged_and_the_report_scores_it(tmp_path, procs):
    """The issue's done-when test: four honest agents and one gaussian red-team agent."""
    split_dir, state, red_report = tmp_path / "split", tmp_path / "state", tmp_path / "c04.jsonl"
    split_data(split_dir, 5)
    tokens = write_tokens(tmp_path / "tokens.toml", RED_TOKENS)
    state.mkdir()
    (state / "PAUSE").write_text("4")  # hold after round 3 while trust is read from the server
    coordinator = Proc("coordinator", "serve", *SERVE_ARGS, "--aggregator", "trimmed_mean",
                       *"--rounds 4 --min-clients 5 --clients-per-round 5 --port 0".split(),
                       "--state-dir", str(state), "--tokens", str(tokens), "--insecure")  # fmt: skip
    procs.append(coordinator)
    port = int(coordinator.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 120).group(1))
    address = f"127.0.0.1:{port}"

    def agent(cid: str, *extra: str) -> Proc:
        p = Proc(cid, "agent", "--server", address, "--client-id", cid, "--data",
                 str(split_dir / f"{cid}.npz"), "--insecure", *extra,
                 env={"FEDWARDEN_TOKEN": RED_TOKENS[cid]})  # fmt: skip
        procs.append(p)
        return p

    honest = [agent(cid) for cid in TOKENS]
    red = agent("c04", "--attack", "gaussian", "--attack-cohort", "5",
                "--attack-claim-examples", "1", "--red-team-report", str(red_report))  # fmt: skip
    coordinator.wait_for(r"^round 4: held by", 600)
    listed = run_fedwarden("trust", "list", "--server", address, "--insecure", "--token",
                           OPERATOR_TOKEN, "--format", "json")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["client_id"] for r in rows][0] == "c04", rows  # lowest trust first
    assert {r["client_id"]: bool(r["flagged"]) for r in rows} == {**dict.fromkeys(TOKENS, False),
                                                                  "c04": True}  # fmt: skip
    (state / "PAUSE").unlink()
    for p in [*honest, red]:
        assert p.wait(300) == 0, p.output()
    assert coordinator.wait(60) == 0, coordinator.output()
    red.wait_for(r"c04: red team: round 4: sent gaussian update", 1)

    lines = [json.loads(line) for line in red_report.read_text().splitlines()]
    assert [(r["round"], r["attacking"], r["status"]) for r in lines] == [
        (r, True, "ACCEPTED") for r in (1, 2, 3, 4)
    ]
    # it claimed one example each round, and the coordinator recorded the claim (its weight)
    assert {r["claimed_examples"] for r in lines} == {1}
    with Ledger(state / "ledger.sqlite", readonly=True) as ledger:
        claimed = {row["num_examples"] for r in range(1, 5) for row in ledger.round_rows(r)
                   if row["client_id"] == "c04" and not row.get("absent")}  # fmt: skip
    assert claimed == {1}
    report = run_fedwarden("trust", "report", "--ledger", str(state / "ledger.sqlite"),
                           "--red-team", str(red_report), "--format", "json")  # fmt: skip
    assert report.returncode == 0, report.stderr
    scores = json.loads(report.stdout)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0, scores
    assert scores["flagged"] == ["c04"] and scores["attackers"]["c04"]["rounds_to_detection"] <= 3
    # nothing the coordinator received or wrote marks c04 as an attacker
    results = json.loads((state / "results.json").read_text())
    assert results["clients"]["c04"]["malicious"] is None and results["attack"] is None
    assert not any("gaussian" in line or "red team" in line for line in coordinator.lines)


def independent_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism composed ``rounds`` times, straight from dp_accounting (RDP)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.integration
def test_a_dp_run_stops_at_its_target_epsilon(tmp_path, procs):
    z, delta, target = 1.5, 1e-5, 6.0
    assert independent_epsilon(z, 3, delta) <= target < independent_epsilon(z, 4, delta)
    split_dir, state = tmp_path / "split", tmp_path / "state"
    split_data(split_dir, 2)
    state.mkdir()
    (state / "PAUSE").write_text("3")  # hold before round 3 to read the live epsilon
    serve = ["serve", *SERVE_ARGS, *"--rounds 10 --min-clients 2 --clients-per-round 2".split(),
             "--dp", "central", "--dp-clip", "1.0", "--dp-noise-multiplier", str(z), "--dp-delta",
             str(delta), "--target-epsilon", str(target), "--state-dir", str(state),
             "--insecure", "--metrics-port", "0"]  # fmt: skip
    coordinator = Proc("coordinator", *serve, "--port", "0")
    procs.append(coordinator)
    listening = coordinator.wait_for(
        r"listening on 127\.0\.0\.1:(\d+).*metrics on 127\.0\.0\.1:(\d+)", 120
    )
    port, metrics_port = int(listening.group(1)), int(listening.group(2))
    coordinator.wait_for(r"stops before epsilon would exceed 6", 1)
    agents = []
    for cid in ("c00", "c01"):
        agents.append(Proc(cid, "agent", "--server", f"127.0.0.1:{port}", "--client-id", cid,
                           "--data", str(split_dir / f"{cid}.npz"), "--insecure"))  # fmt: skip
        procs.append(agents[-1])
    coordinator.wait_for(r"^round 3: held by", 300)
    live = re.search(r"^fedwarden_dp_epsilon ([0-9.e+-]+)$", metrics_text(metrics_port), re.M)
    assert live and float(live.group(1)) == pytest.approx(independent_epsilon(z, 2, delta))
    (state / "PAUSE").unlink()
    coordinator.wait_for(r"^round 4: not started: it would take epsilon from 5\.58\d* to "
                         r"6\.6\d*, above the target 6", 300)  # fmt: skip
    assert coordinator.wait(60) == 0, coordinator.output()
    coordinator.wait_for(r"done, privacy budget spent after round 3", 1)
    for a in agents:
        assert a.wait(60) == 0, a.output()

    results = json.loads((state / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    central = results["final"]["privacy"]["central"]
    assert central["epsilon"] <= target and central["epsilon_budget"] == target
    assert central["epsilon"] == pytest.approx(independent_epsilon(z, 3, delta), rel=1e-6)
    assert [r["epsilon"] for r in results["rounds"]] == pytest.approx(
        [independent_epsilon(z, r, delta) for r in (1, 2, 3)], rel=1e-6
    )
    # restarted, it has nothing left to spend: it says so and exits 0 at once
    again = run_fedwarden(*serve, "--port", "0")
    assert again.returncode == 0, again.stderr
    assert "resuming after round 3" in again.stdout and "round 4: not started" in again.stdout
