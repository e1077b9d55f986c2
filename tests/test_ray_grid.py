"""Comparison grids over several seeds, and on a two-node Ray cluster started on this machine."""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedwarden.config import RunConfig
from fedwarden.errors import UsageError
from fedwarden.simulations.compare import compare

ATTACKS, AGGREGATORS = ["gaussian"], ["mean", "median"]
GRID = RunConfig(clients=6, clients_per_round=3, rounds=2, attack="gaussian", progress=False)


def _results(run_dir: Path) -> dict:
    """A run's results.json without its timings (the only figures that differ run to run)."""
    results = json.loads((run_dir / "results.json").read_text())
    for record in results["rounds"]:
        record.pop("duration_s")
    return results


def _rounds_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "rounds.csv") as f:
        return [{k: v for k, v in row.items() if k != "duration_s"} for row in csv.DictReader(f)]


def _files(run_dir: Path) -> list[str]:
    # SQLite's -wal and -shm files exist while a ledger is open, as in this process's local runs.
    return sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(("-wal", "-shm")))


def _assert_same_grid(local: Path, other: Path) -> None:
    assert (other / "matrix.json").read_bytes() == (local / "matrix.json").read_bytes()
    assert (other / "matrix.md").read_text() == (local / "matrix.md").read_text()
    names = sorted(p.name for p in (local / "runs").iterdir())
    assert sorted(p.name for p in (other / "runs").iterdir()) == names
    for name in names:
        a, b = local / "runs" / name, other / "runs" / name
        assert _files(b) == _files(a)
        assert _results(b) == _results(a), name
        assert _rounds_csv(b) == _rounds_csv(a), name


def test_several_seeds_report_mean_and_spread_of_their_runs(tmp_path):
    base = replace(GRID, attack="none", rounds=1)
    table = compare(base, ["none"], ["mean"], tmp_path, seeds=[0, 1])
    cell = json.loads((tmp_path / "matrix.json").read_text())["none"]["mean"]
    per_seed = [_results(tmp_path / "runs" / f"none__mean__seed{s}") for s in (0, 1)]
    accuracies = np.array([r["final"]["accuracy"] for r in per_seed])
    assert [r["config"]["seed"] for r in per_seed] == [0, 1]
    assert cell["accuracy"] == pytest.approx(accuracies.mean())
    assert cell["accuracy_std"] == pytest.approx(accuracies.std(ddof=1))
    assert (cell["accuracy_min"], cell["accuracy_max"]) == (accuracies.min(), accuracies.max())
    assert [cell["seeds"][s]["accuracy"] for s in ("0", "1")] == accuracies.tolist()
    assert cell["attack_success_rate"] is None
    assert f"{cell['accuracy']:.3f} ± {cell['accuracy_std']:.3f}" in table
    assert "seeds 0, 1" in table


def test_the_detection_table_sums_its_runs_flags(tmp_path):
    base = replace(GRID, clients=10, clients_per_round=5, rounds=3, malicious_fraction=0.2)
    compare(base, ATTACKS, ["median"], tmp_path, seeds=[0, 1])
    found = attacked = honest = honest_flagged = 0
    precisions = []
    for s in (0, 1):
        results = _results(tmp_path / "runs" / f"gaussian__median__seed{s}")
        malicious = {c for c, v in results["clients"].items() if v["malicious"]}
        rounds = results["rounds"]
        final = set(rounds[-1]["flagged"])
        sent = {c for r in rounds for c in r["selected"]} & malicious
        found, attacked = found + len(final & sent), attacked + len(sent)
        precisions.append(len(final & malicious) / len(final))
        for r in rounds:
            cohort = set(r["selected"]) - malicious
            honest += len(cohort)
            honest_flagged += len(cohort & set(r["flagged"]))
    assert attacked > 0 and found > 0  # Gaussian noise is found in three rounds
    table = (tmp_path / "detection.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| gaussian | median |"))
    assert f"| {found} of {attacked} |" in row
    assert f"({honest_flagged} of {honest})" in row
    assert f"| {np.mean(precisions):.2f} (" in row
    assert "seeds 0, 1" in table
    assert "| none | median |" in table
    assert (tmp_path / "detection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text", ["", "a,b", "0,-1", ","])
def test_bad_seeds_are_refused_with_the_value(text):
    from fedwarden.cli.main import parse_seeds

    with pytest.raises(UsageError, match="--seeds"):
        parse_seeds(text)


def test_no_cluster_at_the_address_is_a_usage_error():
    from fedwarden.simulations.ray_grid import connect

    with pytest.raises(UsageError, match="no Ray cluster at --ray-address 127.0.0.1:9"):
        connect("127.0.0.1:9")


# The cluster tests below start real Ray processes (about a minute each on 2 shared cores).


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    compare(GRID, ATTACKS, AGGREGATORS, out)
    return out


@pytest.fixture
def cluster():
    ray = pytest.importorskip("ray")
    from tests.ray_cluster import RayCluster

    started = RayCluster.start(cpus_per_node=1)
    try:
        started.connect_driver()
        yield started
    finally:
        ray.shutdown()
        started.stop()
        assert not started.processes(), "Ray processes left running"


def _node_ids() -> dict[str, bool]:
    import ray

    return {n["NodeID"]: n["Alive"] for n in ray.nodes()}


@pytest.mark.integration
@pytest.mark.slow
def test_grid_on_a_two_node_cluster_is_the_local_grid_and_uses_both_nodes(
    local_grid, cluster, tmp_path
):
    compare(GRID, ATTACKS, AGGREGATORS, tmp_path, ray_address=cluster.address)
    _assert_same_grid(local_grid, tmp_path)
    placement = json.loads((tmp_path / "placement.json").read_text())
    nodes = _node_ids()
    assert len(nodes) == 2
    assert {p["node_id"] for p in placement.values()} == set(nodes)


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_node_killed_mid_grid_loses_and_doubles_no_run(local_grid, cluster, tmp_path):
    from tests.ray_cluster import wait_for

    errors: list[BaseException] = []

    def run() -> None:
        try:
            compare(GRID, ATTACKS, AGGREGATORS, tmp_path, ray_address=cluster.address)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    driver = threading.Thread(target=run)
    driver.start()
    wait_for(lambda: cluster.running_on_worker_node("execute_run"), 300, "a run on the worker")
    killed = [p.pid for p in cluster.worker_raylet().children()]
    cluster.kill_worker_node()
    driver.join(timeout=600)
    assert not driver.is_alive() and not errors, errors

    # The grid can finish on the head node (its retries placed there once the raylet saw the
    # worker die) before the GCS's node table, updated on its own heartbeat timeout, says so.
    wait_for(
        lambda: list(_node_ids().values()).count(True) == 1, 120, "the worker node marked dead"
    )
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert len(placement) == 2 * len(AGGREGATORS)
    assert not {p["pid"] for p in placement.values()} & set(killed)  # re-run elsewhere
    for name in placement:
        run_dir = tmp_path / "runs" / name
        assert [r["round"] for r in _results(run_dir)["rounds"]] == [1, 2]
        with sqlite3.connect(run_dir / "ledger.sqlite") as ledger:
            rows = ledger.execute("SELECT COUNT(*) FROM client_rounds").fetchone()[0]
        assert rows == GRID.rounds * GRID.clients_per_round
    _assert_same_grid(local_grid, tmp_path)
