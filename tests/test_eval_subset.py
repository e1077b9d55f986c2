"""--eval-subset: a fixed test subset between rounds, the whole test split for the final figures."""

import json
from dataclasses import replace
from pathlib import Path

from fedwarden.config import make_config
from fedwarden.server.callbacks import Callback
from fedwarden.simulations.runner import Simulation, _Run, simulate

TINY = dict(clients=6, clients_per_round=4, rounds=3, local_epochs=1, progress=False)
SUBSET = 100  # of the 450 test examples of digits


def test_subset_between_rounds_and_the_same_final_figures(tmp_path: Path):
    whole = simulate(make_config({}, {**TINY, "attack": "backdoor", "out": str(tmp_path / "a")}))
    config = make_config(
        {}, {**TINY, "attack": "backdoor", "eval_subset": SUBSET, "out": str(tmp_path / "b")}
    )
    subset = simulate(config)
    full = whole["rounds"][-1]["test_examples"]
    assert full > SUBSET
    assert [r["test_examples"] for r in whole["rounds"]] == [full] * 3
    assert [r["test_examples"] for r in subset["rounds"]] == [SUBSET, SUBSET, full]
    # Evaluation does not touch training: the last round, on the whole split, is unchanged.
    assert subset["final"] == whole["final"]
    assert subset["rounds"][-1]["attack_success_rate"] == whole["rounds"][-1]["attack_success_rate"]
    on_disk = json.loads((tmp_path / "b" / "results.json").read_text())
    assert on_disk["config"]["eval_subset"] == SUBSET
    assert [r["test_examples"] for r in on_disk["rounds"]] == [SUBSET, SUBSET, full]


def test_subset_is_fixed_for_a_seed(tmp_path: Path):
    config = make_config({}, {**TINY, "eval_subset": SUBSET, "out": str(tmp_path / "a")})
    first = simulate(config)["rounds"]
    second = simulate(replace(config, out=str(tmp_path / "b")))["rounds"]
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in second]


def test_a_subset_as_large_as_the_test_split_is_the_whole_split(tmp_path: Path):
    config = make_config({}, {**TINY, "eval_subset": 10**6, "out": str(tmp_path)})
    rounds = simulate(config)["rounds"]
    assert len({r["test_examples"] for r in rounds}) == 1


class StopAfter(Callback):
    def __init__(self, round_number: int):
        self.round_number = round_number

    def on_round_end(self, round: int, logs: dict) -> None:
        if round == self.round_number:
            self.driver.stop()


def test_a_run_that_stops_early_ends_on_the_whole_split(tmp_path: Path):
    """Stopped after round 2 of 3: round 2 is evaluated again on the whole split, as it would be
    by a run of 2 rounds."""
    config = make_config({}, {**TINY, "eval_subset": SUBSET, "out": str(tmp_path / "stopped")})
    sim = Simulation(config)
    run = _Run(sim, config, tmp_path / "stopped", "", resume=False)
    stopper = StopAfter(2)
    stopper.set_driver(run.driver)
    run.driver.callbacks.insert(0, stopper)
    stopped = run.execute()
    two_rounds = sim.run(replace(config, rounds=2), tmp_path / "two")
    full = two_rounds["rounds"][-1]["test_examples"]
    assert [r["test_examples"] for r in stopped["rounds"]] == [SUBSET, full]
    assert stopped["final"]["accuracy"] == two_rounds["final"]["accuracy"]
    on_disk = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert on_disk["final"]["accuracy"] == two_rounds["final"]["accuracy"]
    assert on_disk["rounds"][-1]["test_examples"] == full
