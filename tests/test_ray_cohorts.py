"""``simulate --ray-address``: cohorts trained on Ray actors give the local run's results."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fedwarden.config import RunConfig
from fedwarden.errors import UsageError

RUN = RunConfig(clients=8, clients_per_round=4, rounds=2, progress=False)


def _results(path) -> dict:
    """results.json without what differs between two runs of the same seed: timings, --out."""
    results = json.loads((path / "results.json").read_text())
    for record in results["rounds"]:
        record.pop("duration_s")
    results["config"].pop("out", None)
    results["config"].get("output", {}).pop("out", None)
    return results


def test_dp_sgd_and_the_tff_engine_are_refused_on_ray():
    from fedwarden.simulations.ray_cohort import simulate_on_ray

    with pytest.raises(UsageError, match="--engine tff"):
        simulate_on_ray(replace(RUN, engine="tff"), "local")


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    # "local": a new instance, never an existing cluster this machine may have running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("attack", ["label_flip", "gaussian"])  # poisoned shards; crafted here
def test_cohorts_on_ray_actors_give_the_local_results_with_data_sent_once(
    attack, local_ray, tmp_path, monkeypatch
):
    from fedwarden.simulations import ray_cohort
    from fedwarden.simulations.runner import simulate

    config = replace(RUN, attack=attack, aggregator="median")
    simulate(replace(config, out=str(tmp_path / "local")))

    starts = []
    start_actors = ray_cohort.RayClients._start_actors

    def counted(self):
        starts.append(start_actors(self))
        return starts[-1]

    monkeypatch.setattr(ray_cohort.RayClients, "_start_actors", counted)
    ray_cohort.simulate_on_ray(replace(config, out=str(tmp_path / "ray")), "local")

    assert _results(tmp_path / "ray") == _results(tmp_path / "local")
    assert len(starts) == 1  # the actors, and the shards they hold, for every round
    import ray

    held = ray.get([actor.clients.remote() for actor in starts[0]])
    assert len(held) == 2
    assert sorted(i for clients in held for i in clients) == list(range(RUN.clients))


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_node_killed_mid_round_costs_no_round(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import threading

    import ray

    from fedwarden.simulations import ray_cohort
    from fedwarden.simulations.runner import simulate
    from tests.ray_cluster import RayCluster, wait_for

    # Local training long enough (about a second per call) to be caught in the middle.
    config = replace(RUN, rounds=3, local_epochs=10, attack="gaussian", aggregator="median")
    simulate(replace(config, out=str(tmp_path / "local")))
    nodes: list[str] = []
    start_actors = ray_cohort.RayClients._start_actors

    def placed(self):
        actors = start_actors(self)
        nodes.extend(ray.get([a.node_id.remote() for a in actors]))
        return actors

    monkeypatch.setattr(ray_cohort.RayClients, "_start_actors", placed)
    cluster = RayCluster.start(cpus_per_node=2)  # room on the head for the restarted actor
    try:
        cluster.connect_driver()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                out = str(tmp_path / "ray")
                ray_cohort.simulate_on_ray(replace(config, out=out), cluster.address, num_actors=2)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        driver = threading.Thread(target=run)
        driver.start()
        wait_for(
            lambda: cluster.running_on_worker_node("ClientTrainer.train"), 300, "a round's call"
        )
        cluster.kill_worker_node()
        driver.join(timeout=600)
        assert not driver.is_alive() and not errors, errors
        assert len(set(nodes)) == 2  # the actors started on both nodes
        assert [n["Alive"] for n in ray.nodes()].count(True) == 1
    finally:
        ray.shutdown()
        cluster.stop()
    assert not cluster.processes(), "Ray processes left running"
    ray_results = _results(tmp_path / "ray")
    assert [r["round"] for r in ray_results["rounds"]] == [1, 2, 3]
    assert ray_results == _results(tmp_path / "local")
