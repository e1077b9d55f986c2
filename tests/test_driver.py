"""The round driver and its callbacks, in process: fake transports, no TensorFlow, no network.

The same ``RoundDriver`` runs simulations (``InProcessClients``), ``fedwarden serve``
(``HubTransport``, here over a fake hub) and ``--engine tff``; these tests hold its loop to what
both entry points promise: retries of abandoned attempts, the privacy-budget stop, the pause
file, checkpoints that resume to the same results, one results.json for every transport.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.config import DeploymentConfig, RunConfig
from fedwarden.errors import UsageError
from fedwarden.server import checkpoint
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.callbacks import (
    Callback,
    Checkpoint,
    LambdaCallback,
    Pause,
    PrivacyAccount,
    dp_gauges,
)
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.driver import Cohort, History, RoundDriver, RunInfo, check_resume
from fedwarden.server.ledger import Ledger
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.serve import HubTransport, ServeMetrics
from fedwarden.server.trust import TrustBook, TrustPolicy

IDS = ["a", "b", "c", "d"]
DIM = 6


def make_coordinator(ledger: Ledger | None = None) -> Coordinator:
    return Coordinator(
        np.zeros(DIM, np.float32),
        parse_chain("median"),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy(), ledger),
    )


def evaluate(weights: np.ndarray) -> tuple[float, float, float | None]:
    """A loss that falls as the weights approach all-ones; accuracy its complement."""
    loss = float(np.mean((weights - 1.0) ** 2))
    return loss, 1.0 / (1.0 + loss), None


def update(cid: str, round_number: int) -> ClientUpdate:
    """Honest clients pull towards ones; client "d" pushes far away."""
    rng = np.random.default_rng([round_number, IDS.index(cid)])
    delta = 0.3 + 0.01 * rng.normal(size=DIM)
    if cid == "d":
        delta = -50.0 * np.ones(DIM)
    return ClientUpdate(cid, round_number, delta.astype(np.float32), 10 + IDS.index(cid), 0.5)


class FakeClients:
    """Every client answers; ``fail`` lists rounds whose first attempt is abandoned."""

    def __init__(self, fail: tuple[int, ...] = ()):
        self.fail = set(fail)
        self.calls: list[tuple[int, int]] = []  # (round, attempt)
        self.attempts: dict[int, int] = {}

    def collect(self, round_number: int, coordinator: Coordinator) -> Cohort | None:
        attempt = self.attempts.get(round_number, 0)
        self.calls.append((round_number, attempt))
        if round_number in self.fail and attempt == 0:
            self.attempts[round_number] = 1
            return None
        selected = coordinator.select(IDS, 4, np.random.default_rng(round_number))
        return Cohort(selected, [update(c, round_number) for c in selected], attempt)


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_run_begin(self, logs):
        self.events.append(("run_begin", logs["first_round"]))

    def on_round_begin(self, round, logs):
        self.events.append(("round_begin", round))

    def on_round_end(self, round, logs):
        self.events.append(("round_end", round, logs["attempts"]))

    def on_run_end(self, logs):
        self.events.append(("run_end", logs["reason"], logs["rounds"]))


def test_rounds_run_in_order_and_abandoned_attempts_are_retried():
    recorder, transport = Recorder(), FakeClients(fail=(2,))
    driver = RoundDriver(make_coordinator(), transport, evaluate, 3, [recorder])
    assert driver.run() == "done"
    assert transport.calls == [(1, 0), (2, 0), (2, 1), (3, 0)]
    assert recorder.events == [
        ("run_begin", 1),
        ("round_begin", 1), ("round_end", 1, 1),
        ("round_begin", 2), ("round_begin", 2), ("round_end", 2, 2),
        ("round_begin", 3), ("round_end", 3, 1),
        ("run_end", "done", 3),
    ]  # fmt: skip
    rounds = driver.history.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["loss"] < rounds[0]["loss"]  # the median ignores "d" and training works
    assert driver.history.flagged[-1] == ["d"]
    assert set(driver.history.trust) == set(IDS)
    assert all(len(series) == 3 for series in driver.history.trust.values())


class Budget:
    """A central privacy account whose epsilon grows by one per round, with budget 2.5."""

    budget, delta, noise_multiplier, solved_for = 2.5, 1e-5, 1.0, None

    def epsilon(self, rounds: int) -> float:
        return float(rounds)

    def allows(self, rounds: int) -> bool:
        return self.epsilon(rounds) <= self.budget

    def report(self, rounds: int) -> dict:
        return {"epsilon": self.epsilon(rounds), "client_sampling": "poisson"}


def test_the_privacy_budget_stops_the_run_before_the_round_that_would_exceed_it(capsys):
    account = PrivacyAccount(Budget(), sampling_note="rate 1")
    recorder = Recorder()
    driver = RoundDriver(make_coordinator(), FakeClients(), evaluate, 10, [account, recorder])
    assert driver.run() == "budget"
    assert [r["epsilon"] for r in driver.history.rounds] == [1.0, 2.0]
    assert recorder.events[-1] == ("run_end", "budget", 2)
    assert "round 3: not started" in capsys.readouterr().out
    assert account.report(2) == {"central": {"epsilon": 2.0, "client_sampling": "rate 1"}}


def test_dp_gauges_come_from_the_measurement_names():
    gauges = dp_gauges({"central_dp/clip_rate": 0.25, "central_dp/clip_norm": 2.0,
                        "clip_by_norm/clipped_count": 3, "median/skipped": 0})  # fmt: skip
    assert gauges == {"fedwarden_dp_clip_rate": 0.25, "fedwarden_dp_clip_norm": 2.0}


def run_to(state: Path, rounds: int, config: dict, history: History | None = None,
           coordinator: Coordinator | None = None, average_last: int = 1,
           crash_after: int | None = None) -> RoundDriver:  # fmt: skip
    """Runs to ``rounds`` (or stops after ``crash_after``) with a checkpoint and results.json in
    ``state``; trust in its ledger."""
    state.mkdir(exist_ok=True)
    info = RunInfo(config, population={cid: 10 for cid in IDS}, malicious=frozenset({"d"}))
    writer = Checkpoint(state, state / "results.json", info, shapes=[(DIM,)])
    crash = LambdaCallback(on_round_end=lambda r, logs: r == crash_after and driver.stop("crash"))
    driver = RoundDriver(
        coordinator or make_coordinator(Ledger(state / "ledger.sqlite")), FakeClients(), evaluate, rounds, [writer, crash],
        history=history, population=IDS, state_dir=state, average_last=average_last,
    )  # fmt: skip
    driver.run()
    return driver


def resume(state: Path, config: dict, rounds: int, average_last: int = 1) -> RoundDriver:
    """Continues the run in ``state`` from its latest checkpoint, as ``--resume`` does."""
    saved = checkpoint.load_latest(state)
    ledger = Ledger(state / "ledger.sqlite")
    ledger.truncate_after(saved["round"])
    coordinator = make_coordinator(ledger)
    coordinator.load_state_dict(saved["coordinator"])
    return run_to(state, rounds, config, History.from_state(saved), coordinator, average_last)


def test_the_last_round_is_evaluated_on_the_mean_of_the_last_rounds_models(tmp_path):
    seen: list[np.ndarray] = []

    def remember(weights):
        seen.append(weights.copy())
        return evaluate(weights)

    driver = RoundDriver(make_coordinator(), FakeClients(), remember, 5, average_last=3)
    driver.run()
    models = seen[:5]  # one evaluation per round of its own model, then the handed-back one
    mean = np.mean(np.asarray(models[2:5], np.float64), axis=0)
    np.testing.assert_allclose(seen[5], mean, rtol=1e-6)
    np.testing.assert_allclose(driver.final_weights(), mean, rtol=1e-6)
    np.testing.assert_array_equal(driver.coordinator.weights, models[4])  # training goes on from it
    last = driver.history.rounds[-1]
    assert last["averaged_rounds"] == [3, 5]
    assert last["accuracy"] == pytest.approx(evaluate(mean)[1])
    assert last["last_model"]["accuracy"] == pytest.approx(evaluate(models[4])[1])
    assert last["accuracy"] != pytest.approx(last["last_model"]["accuracy"])
    assert all("last_model" not in r for r in driver.history.rounds[:-1])


def test_a_run_that_crashes_inside_the_average_resumes_to_the_same_model(tmp_path):
    config = {"rounds": 5, "aggregator": "median"}
    straight = run_to(tmp_path / "straight", 5, config, average_last=3)
    run_to(tmp_path / "resumed", 5, config, average_last=3, crash_after=4)
    assert checkpoint.load_latest(tmp_path / "resumed")["model_average"]["count"] == 2
    resumed = resume(tmp_path / "resumed", config, 5, average_last=3)
    np.testing.assert_array_equal(resumed.final_weights(), straight.final_weights())
    assert resumed.history.rounds[-1]["accuracy"] == straight.history.rounds[-1]["accuracy"]


def test_more_rounds_on_resume_average_only_the_rounds_still_to_run(tmp_path, caplog):
    config = {"rounds": 4, "aggregator": "median"}
    run_to(tmp_path / "run", 4, config, average_last=3)
    with caplog.at_level("WARNING", logger="fedwarden.driver"):
        driver = resume(tmp_path / "run", {**config, "rounds": 6}, 6, average_last=3)
    assert "rounds 4-6 can only hold rounds 5-6" in caplog.text
    assert driver.history.rounds[-1]["averaged_rounds"] == [5, 6]


def test_a_resumed_run_writes_the_results_of_a_straight_one(tmp_path):
    config = {"rounds": 4, "aggregator": "median"}
    run_to(tmp_path / "straight", 4, config)
    run_to(tmp_path / "resumed", 2, {**config, "rounds": 2})
    saved = checkpoint.load_latest(tmp_path / "resumed")
    assert saved["round"] == 2
    check_resume(saved, config, [(DIM,)], tmp_path)  # only --rounds changed: allowed
    resume(tmp_path / "resumed", config, 4)

    def read(name: str) -> dict:
        results = json.loads((tmp_path / name / "results.json").read_text())
        for record in results["rounds"]:
            record.pop("duration_s")
        return results

    straight, resumed = read("straight"), read("resumed")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed == straight
    assert straight["clients"]["d"] == {
        "malicious": True, "trust": straight["clients"]["d"]["trust"], "flagged": True,
        "num_examples": 10, "attacked_rounds": [1, 2, 3, 4],
    }  # fmt: skip
    assert straight["final"]["detection"]["recall_attacked"] == 1.0


def test_recall_counts_apart_the_attackers_that_attacked_when_they_were_sampled():
    rounds = [{"round": 1, "selected": ["a", "d"]}, {"round": 2, "selected": ["a", "b", "d"]},
              {"round": 3, "selected": ["b"]}]  # fmt: skip
    info = RunInfo({}, malicious=frozenset({"a", "b", "c", "d"}), attacks=lambda cid, r: r >= 2)
    assert info.attacked_rounds(rounds) == {"a": [2], "b": [2, 3], "d": [2]}
    assert RunInfo({}).attacked_rounds(rounds) is None
    assert RunInfo({}, malicious=frozenset({"a"})).attacked_rounds(rounds) == {"a": [1, 2]}


def test_resume_refuses_another_model_or_other_settings(tmp_path):
    saved = {"config": {"training": {"rounds": 2, "lr": 0.1}, "seed": 0}, "layout": [[DIM]]}
    check_resume(saved, {"training": {"rounds": 9, "lr": 0.1}, "seed": 0}, [(DIM,)], tmp_path)
    with pytest.raises(UsageError, match=r"training\.lr: 0\.1 -> 0\.2"):
        check_resume(saved, {"training": {"rounds": 2, "lr": 0.2}, "seed": 0}, [(DIM,)], tmp_path)
    with pytest.raises(UsageError, match="another model"):
        check_resume(saved, saved["config"], [(DIM + 1,)], tmp_path)


def test_an_unwritable_state_dir_stops_the_run_with_one_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "results.json").mkdir()  # results.json cannot be replaced by a file
    with pytest.raises(UsageError, match="round 1: cannot write the state dir"):
        run_to(state, 2, {})


def test_a_deployment_reports_the_clients_it_scored_without_ground_truth(tmp_path):
    driver = RoundDriver(make_coordinator(), FakeClients(), evaluate, 2)
    driver.run()
    writer = Checkpoint(tmp_path, tmp_path / "r.json", RunInfo({}, extra={"deployment": {}}))
    writer.set_driver(driver)
    results = writer.results()
    assert list(results["clients"]) == IDS
    assert results["clients"]["b"]["malicious"] is None
    assert results["clients"]["b"]["num_examples"] == 11  # the count it reported
    assert results["final"]["detection"]["precision"] is None
    assert "deployment" in results


def test_the_pause_file_holds_the_next_round_until_it_is_removed(tmp_path):
    pause_file = tmp_path / "PAUSE"
    pause_file.write_text("2")

    class Operator(Pause):
        """Removes the pause file on the third look, as an operator would."""

        looks = 0

        def held(self, round):
            result = super().held(round)
            if result:
                self.looks += 1
                if self.looks == 3:
                    pause_file.unlink()
            return result

    pause = Operator(pause_file, poll_s=0.0)
    assert not pause.held(1) and pause.held(2) and pause.held(3)
    pause.looks = 0
    started = []
    transport = FakeClients()
    original = transport.collect
    transport.collect = lambda r, c: (started.append((r, pause_file.exists())), original(r, c))[1]
    RoundDriver(make_coordinator(), transport, evaluate, 3, [pause]).run()
    assert started == [(1, True), (2, False), (3, False)]
    assert pause.looks == 3


def test_a_stop_request_ends_a_held_run():
    pause = Pause(Path("/nonexistent"), poll_s=0.0)
    pause.held = lambda round: True
    stopper = LambdaCallback(on_round_begin=lambda r, logs: driver.stop("stopped"))
    driver = RoundDriver(make_coordinator(), FakeClients(), evaluate, 3, [stopper, pause])
    assert driver.run() == "stopped"
    assert driver.history.rounds == []


class FakeHub:
    """The hub's side of HubTransport: scripted live agents and answers, no threads."""

    def __init__(self, live: list[list[str]], answers: list[bool]):
        self.live, self.answers = live, answers
        self.published: list[tuple[int, int, list[str]]] = []
        self.silences: dict[str, int] = {}

    def wait_for_clients(self, n: int, timeout: float) -> list[str]:
        return self.live.pop(0) if len(self.live) > 1 else self.live[0]

    def benched_clients(self) -> list[str]:
        return []

    def take_silence(self) -> dict[str, int]:
        return {}

    def publish(self, round, attempt, selected, payload, sha256, target=None, intake=None):
        self.published.append((round, attempt, list(selected)))

    def collect(self, min_updates, deadline, stop=lambda: False):
        round_number, _, selected = self.published[-1]
        complete = self.answers.pop(0)
        answering = selected if complete else selected[:1]
        return [update(c, round_number) for c in answering], complete


def test_the_serve_loop_waits_for_agents_and_reruns_abandoned_attempts(tmp_path, capsys):
    from fedwarden.server.metrics import MetricsExporter

    config = RunConfig(clients=4, clients_per_round=2, rounds=2, aggregator="mean")
    options = DeploymentConfig(
        state_dir=str(tmp_path), insecure=True, min_clients=2, round_timeout=1.0, overselect=1.0
    )
    hub = FakeHub(live=[["a"], IDS], answers=[False, True, True])
    exporter = MetricsExporter()
    metrics = ServeMetrics(exporter.registry)
    transport = HubTransport(hub, config, options, metrics, exporter, lambda: False)
    driver = RoundDriver(make_coordinator(), transport, evaluate, 2)
    assert driver.run() == "done"
    out = capsys.readouterr().out
    assert "round 1: waiting for agents (1 of 2 connected)" in out
    assert "round 1: only 1 of 2 selected agents answered" in out
    assert [(r, a) for r, a, _ in hub.published] == [(1, 0), (1, 1), (2, 0)]
    assert all(len(selected) == 2 for _, _, selected in hub.published)
    assert [r["attempts"] for r in driver.history.rounds] == [2, 1]
    assert metrics.abandoned._value.get() == 1
    assert metrics.agents._value.get() == 4


def test_dp_sgd_is_accounted_from_every_update_of_the_round():
    from fedwarden.aggregation.accounting import ClientPrivacyAccount, dp_sgd_steps

    client = ClientPrivacyAccount(noise_multiplier=1.0, batch_size=4)
    account = PrivacyAccount(
        client=client,
        client_delta=lambda cid: 1e-3,
        client_settings={"noise_multiplier": 1.0},
        local_steps=lambda n: dp_sgd_steps(n, 4, 2),
    )
    driver = RoundDriver(make_coordinator(), FakeClients(), evaluate, 3, [account])
    driver.run()
    # every update counts, the attacker's too (client i reports 10 + i examples)
    assert {cid: client.steps(cid) for cid in IDS} == {
        cid: 3 * 2 * ((10 + i) // 4) for i, cid in enumerate(IDS)
    }
    report = account.report(3)["client"]
    assert report["noise_multiplier"] == 1.0 and set(report["per_client"]) == set(IDS)
    assert report["epsilon"] == max(report["per_client"].values()) > 0
    assert dp_sgd_steps(3, 16, 2) == 2  # fewer examples than a batch: one batch of them all


def test_the_serve_loop_overselects_and_gives_up_after_its_attempts(tmp_path):
    from fedwarden.server.metrics import MetricsExporter

    config = RunConfig(clients=4, clients_per_round=2, rounds=1, aggregator="mean")
    options = DeploymentConfig(
        state_dir=str(tmp_path), insecure=True, min_clients=2, overselect=1.5, max_attempts=2
    )
    hub = FakeHub(live=[IDS], answers=[False, False])
    exporter = MetricsExporter()
    transport = HubTransport(hub, config, options, ServeMetrics(exporter.registry), exporter,
                             lambda: False)  # fmt: skip
    with pytest.raises(UsageError, match="round 1: 2 attempts abandoned"):
        RoundDriver(make_coordinator(), transport, evaluate, 1).run()
    assert [len(selected) for _, _, selected in hub.published] == [3, 3]  # ceil(2 * 1.5)


def test_metrics_follow_a_flag_that_changed_in_a_round_the_client_sat_out():
    """Client "a" takes part in round 1 only; in round 2 trust flags it for its association with
    flagged clients. The exported flag follows in round 2, though "a" sent nothing."""
    from fedwarden.aggregation.detection import Association
    from fedwarden.server.callbacks import MetricsExport
    from fedwarden.server.metrics import MetricsExporter

    class WithoutAAfterRoundOne(FakeClients):
        def collect(self, round_number, coordinator):
            cohort = super().collect(round_number, coordinator)
            if round_number > 1:
                cohort.selected = [c for c in cohort.selected if c != "a"]
                cohort.updates = [u for u in cohort.updates if u.client_id != "a"]
            return cohort

    coordinator = make_coordinator()
    rounds_asked: list[int] = []

    def association(flagged):
        rounds_asked.append(len(rounds_asked) + 1)
        return {"a": Association(0.9, 9.0, ("b", "d"))} if len(rounds_asked) == 2 else {}

    coordinator.history.association = association
    exporter = MetricsExporter()
    driver = RoundDriver(
        coordinator, WithoutAAfterRoundOne(), evaluate, 2, [MetricsExport(exporter)]
    )
    driver.run()
    assert rounds_asked == [1, 2]
    assert "a" not in driver.outcome.admitted and coordinator.trust.get("a").flagged
    flagged = exporter.registry.get_sample_value("fedwarden_client_flagged", {"client_id": "a"})
    assert flagged == 1.0
