"""``simulate --ray-address``: a round's clients train on Ray actors, the coordinator stays here.

The run is the local one (``Simulation.run``: selection, admission, aggregation, scoring, trust,
ledger, metrics, checkpoints, evaluation all in this process) with another transport: the
selected clients are trained by ``ClientTrainer`` actors spread over the cluster. Client ``i``
belongs to actor ``i % num_actors``, which receives its clients' data shards (and a data
poisoner's poisoned shards) once, when it starts; a round then sends each actor the global
weights (one object in Ray's store, shared by all actors) and the indices of its selected clients,
and gets their training results back. The attackers' updates are crafted here, as in a local run.

Each client trains from the global weights with the random stream ``[seed, 3, round, i]`` on
deterministic kernels, the same as in a local run, so the results are the local engine's for the
same seed (one model copy per actor; TensorFlow's thread count is set the same way, see
``fedwarden.clients.training``). Random ops inside training are not client-by-client streams, so
DP-SGD (its noise) is refused here, and so is the TFF engine.

An actor lost with its node is restarted by Ray on a live node from its constructor arguments
(its shards), and the round's call is retried there (``max_restarts``, ``max_task_retries``):
a killed worker node costs the round only the time the retry takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.aggregation.chain import Chain
from fedwarden.config import RunConfig
from fedwarden.errors import UsageError
from fedwarden.server.driver import Cohort

MAX_RESTARTS = 3
"""Times an actor lost with its node is restarted elsewhere; its round's calls wait for that."""

Shard = tuple[np.ndarray, np.ndarray]


class ClientTrainer:
    """A Ray actor: one model copy and the data shards of its clients.

    Args:
      config: the run's settings (model, learning rate, batch size, local epochs, seed).
      shards: client index -> its (x, y).
      poisoned: client index -> its poisoned (x, y), used in the rounds the client attacks.
      dataset: name, input shape and number of classes, to build the model.
    """

    def __init__(
        self,
        config: RunConfig,
        shards: dict[int, Shard],
        poisoned: dict[int, Shard],
        dataset: tuple[str, tuple[int, ...], int],
    ):
        import tensorflow as tf

        from fedwarden.clients.training import LocalTrainer, one_thread_per_op
        from fedwarden.models import build_model

        one_thread_per_op()  # as the driver process does: same thread count, same sums
        tf.config.experimental.enable_op_determinism()
        name, input_shape, num_classes = dataset
        model = build_model(config.model, name, input_shape, num_classes, config.seed)
        self.trainer = LocalTrainer(
            model, config.lr, config.batch_size, config.local_epochs, copies=1
        )
        self.config, self.shards, self.poisoned = config, shards, poisoned

    def clients(self) -> list[int]:
        return sorted(self.shards)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def train(
        self, round_number: int, flat_weights: np.ndarray, indices: list[int], attacking: set[int]
    ) -> list:
        """Trains clients ``indices`` from ``flat_weights``, those in ``attacking`` on their
        poisoned data (the driver decides who attacks: ``_Run.attacking``); their
        ``LocalResult``s in order."""
        c = self.config
        weights = self.trainer.layout.unflatten(flat_weights)
        data = [
            self.poisoned[i] if i in attacking and i in self.poisoned else self.shards[i]
            for i in indices
        ]
        rngs = [np.random.default_rng([c.seed, 3, round_number, i]) for i in indices]
        return self.trainer.train_cohort(weights, data, rngs)


class RayClients:
    """The transport of a run whose clients train on ``ClientTrainer`` actors.

    Args:
      run: the local run (``fedwarden.simulations.runner``) whose coordinator this serves.
      num_actors: actors to start, at most one per client (default: the cluster's CPUs).
    """

    def __init__(self, run: Any, num_actors: int | None = None):
        from fedwarden.simulations.runner import InProcessClients

        self.run = run
        self.local = InProcessClients(run)  # the selection, one place for both
        self.num_actors = num_actors
        self.actors: list[Any] = []
        self.shards: list[tuple[Any, Any]] = []  # each actor's shards, in Ray's object store

    def collect(self, round_number: int, coordinator: Any) -> Cohort:
        import ray

        if not self.actors:
            self.actors = self._start_actors()
        selected = self.local.select(round_number, coordinator)
        position = {cid: i for i, cid in enumerate(self.run.fed.ids)}
        weights = ray.put(coordinator.weights)  # sent once, read by every actor
        calls, order = [], []
        for k, actor in enumerate(self.actors):
            mine = [cid for cid in selected if position[cid] % len(self.actors) == k]
            if mine:
                attacking = {position[c] for c in mine if self.run.attacking(c, round_number)}
                indices = [position[c] for c in mine]
                calls.append(actor.train.remote(round_number, weights, indices, attacking))
                order += mine
        by_client = dict(zip(order, (r for results in ray.get(calls) for r in results)))
        results = [by_client[cid] for cid in selected]
        updates = self.run.updates(round_number, selected, results, coordinator.weights)
        return Cohort(selected, updates)

    def _start_actors(self) -> list[Any]:
        import ray

        fed, run = self.run.fed, self.run
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = max(1, min(self.num_actors or cpus, len(fed.ids)))
        ds = fed.dataset
        index = {cid: i for i, cid in enumerate(fed.ids)}
        actor = ray.remote(ClientTrainer).options(
            num_cpus=1,
            max_restarts=MAX_RESTARTS,
            # Until restarted: an actor of a dead node is "unavailable" for a while (until the
            # cluster declares the node dead), and a bounded count runs out in that time.
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        actors = []
        for k in range(n):
            mine = [cid for cid in fed.ids if index[cid] % n == k]
            shards = {index[c]: (ds.x_train[fed.parts[c]], ds.y_train[fed.parts[c]]) for c in mine}
            poisoned = {index[c]: run.poisoned[c] for c in mine if c in run.poisoned}
            dataset = (ds.name, ds.input_shape, ds.num_classes)
            # Put here and held by this transport: a restarted actor reads them again (Ray
            # frees the arguments it stored itself once the first constructor ran).
            held = (ray.put(shards), ray.put(poisoned))
            self.shards.append(held)
            actors.append(actor.remote(run.config, *held, dataset))
        return actors


def simulate_on_ray(
    config: RunConfig,
    address: str,
    resume: bool = False,
    num_actors: int | None = None,
    aggregator: Chain | None = None,
) -> dict[str, Any]:
    """``fedwarden simulate`` with the cohorts trained on the Ray cluster at ``address``.

    Args:
      config: the run.
      address: the cluster (``fedwarden.simulations.ray_grid.connect``).
      resume: continue the run in ``config.out`` from its last checkpoint.
      num_actors: actors to start (default: the cluster's CPUs).
      aggregator: the parsed ``--aggregator`` that ``check_run`` returned (parsed when None).

    Returns:
      The run's results (``results.json``), as a local run returns them.
    """
    from fedwarden.simulations.ray_grid import connect
    from fedwarden.simulations.runner import Simulation, make_federation

    if config.engine != "native" or config.dp_sgd:
        raise UsageError(
            "--ray-address trains with the native engine, without --dp-sgd (DP-SGD noise is not "
            f"drawn per client). Received: --engine {config.engine}, dp_sgd={config.dp_sgd}"
        )
    if num_actors is not None and num_actors < 1:
        raise UsageError(f"--ray-actors must be at least 1. Received: {num_actors}")
    connect(address)
    simulation = Simulation(config, make_federation(config))
    simulation.transport = lambda run: RayClients(run, num_actors)
    return simulation.run(config, Path(config.out), resume=resume, aggregator=aggregator)
