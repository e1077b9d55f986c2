"""The in-process simulation: many clients on one machine, with attacks and defences.

``Simulation`` holds what runs share (data split, compiled model, trainer), so ``fedwarden compare``
reuses it across the cells of its grid; ``run`` executes one configuration and writes its outputs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from fedwarden.aggregation.chain import Chain
from fedwarden.aggregation.filtering import reference_steps
from fedwarden.attacks import Attack, attacks_in_round, build_attack
from fedwarden.clients.training import (
    DPSGDSettings,
    LocalResult,
    LocalTrainer,
    Trainer,
    one_thread_per_op,
)
from fedwarden.config import RunConfig
from fedwarden.data.datasets import Dataset, load_dataset
from fedwarden.data.partition import partition
from fedwarden.errors import UsageError
from fedwarden.models import build_model
from fedwarden.results import describe_attack
from fedwarden.server import checkpoint
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.callbacks import (
    Callback,
    Checkpoint,
    MetricsExport,
    PrivacyAccount,
    Reports,
)
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.defence import build_coordinator, build_defence
from fedwarden.server.driver import Cohort, History, RoundDriver, RunInfo, check_resume
from fedwarden.server.ledger import Ledger, remove_ledger
from fedwarden.server.metrics import MetricsExporter
from fedwarden.server.tensorboard import TensorBoard, log_dir
from fedwarden.server.validation import ValidationProbe, held_out_indices
from fedwarden.simulations.preflight import check_run
from fedwarden.weights import WeightLayout

log = logging.getLogger("fedwarden.simulate")

# Test inputs, labels, and the attack's (triggered inputs, target) or None.
TestSet = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]


def client_ids(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"c{i:0{width}d}" for i in range(n)]


@dataclass
class Federation:
    """The data split and malicious set for one seed: identical across the runs of a comparison."""

    dataset: Dataset
    ids: list[str]
    parts: dict[str, np.ndarray]
    malicious: frozenset[str]


def make_federation(config: RunConfig) -> Federation:
    dataset = load_dataset(config.dataset, config.data_dir, config.seed)
    rng = np.random.default_rng([config.seed, 1])
    ids = client_ids(config.clients)
    parts = partition(
        dataset.y_train,
        config.clients,
        config.partition,
        rng,
        alpha=config.alpha,
        shards_per_client=config.shards_per_client,
    )
    malicious = frozenset(rng.permutation(ids)[: config.num_malicious].tolist())
    return Federation(dataset, ids, dict(zip(ids, parts)), malicious)


class Simulation:
    """Runs configurations that share a federation and a model architecture."""

    def __init__(self, config: RunConfig, federation: Federation | None = None):
        # One thread per op and one model copy per core (fedwarden.clients.training): faster rounds.
        # Only possible before TensorFlow's first op; later, TF keeps its thread count.
        one_thread_per_op()
        tf.config.experimental.enable_op_determinism()
        self.base = config
        self.federation = federation or make_federation(config)
        ds = self.federation.dataset
        self.model = build_model(config.model, ds.name, ds.input_shape, ds.num_classes, config.seed)
        self.initial_weights = self.model.get_weights()
        self.layout = WeightLayout.of(self.initial_weights)
        self._trainers: dict[tuple, Trainer] = {}
        # What trains a run's cohorts: this process, or Ray actors (simulations/ray_cohort.py).
        self.transport: Callable[[_Run], Any] = InProcessClients

    def trainer(self, config: RunConfig) -> Trainer:
        dp = (
            DPSGDSettings(config.dp_l2_clip, config.dp_sgd_noise_multiplier, config.dp_microbatches)
            if config.dp_sgd
            else None
        )
        key = (config.engine, config.lr, config.batch_size, config.local_epochs, dp)
        if key not in self._trainers and config.engine == "tff":
            from fedwarden.simulations.tff_trainer import TFFTrainer  # TFF: only when asked

            self._trainers[key] = TFFTrainer.for_simulation(self, config)
        if key not in self._trainers:
            self._trainers[key] = LocalTrainer(
                self.model, config.lr, config.batch_size, config.local_epochs, dp
            )
        return self._trainers[key]

    def run(
        self,
        config: RunConfig,
        out: Path,
        progress_label: str = "",
        resume: bool = False,
        aggregator: Chain | None = None,
    ) -> dict[str, Any]:
        """One run; ``aggregator`` is its parsed ``--aggregator`` (``check_run`` returns it;
        parsed here when not given)."""
        return _Run(self, config, out, progress_label, resume, aggregator).execute()


class InProcessClients:
    """The simulation's transport: the selected clients train here, attackers craft their updates.

    Selection follows the seed (``[seed, 5, round]``), Poisson when the central DP accountant
    assumes it; the cohort trains in one ``train_cohort`` call (native model copies in parallel,
    or one TFF computation). Under a round memory budget the updates come from a generator, a
    few at a time (``_Run.stream_round``), unless an attack crafts its updates from the whole
    cohort's this round.
    """

    def __init__(self, run: _Run):
        self.run = run

    def collect(self, round_number: int, coordinator: Coordinator) -> Cohort:
        selected = self.select(round_number, coordinator)
        r, weights = self.run, coordinator.weights
        if coordinator.round_memory_budget is not None and not r.crafts_from_cohort(round_number):
            return Cohort(selected, r.stream_round(round_number, selected, weights))
        return Cohort(selected, r.local_round(round_number, selected, weights))

    def select(self, round_number: int, coordinator: Coordinator) -> list[str]:
        r, c = self.run, self.run.config
        rng = np.random.default_rng([c.seed, 5, round_number])
        rate = r.privacy.sampling_rate if r.privacy else None
        return coordinator.select(r.fed.ids, c.clients_per_round, rng, poisson_rate=rate)


class Progress(Callback):
    """A tqdm bar over the run's rounds, with the last accuracy and the flagged count."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.bar: tqdm | None = None

    def on_run_begin(self, logs: dict[str, Any]) -> None:
        done = logs["first_round"] - 1
        self.bar = tqdm(initial=done, total=self.total, desc=self.label or "rounds", unit="round",
                        disable=not self.enabled, leave=False)  # fmt: skip

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(acc=f"{logs['accuracy']:.3f}", flagged=len(logs["flagged"]))

    def on_run_end(self, logs: dict[str, Any]) -> None:
        self.bar.close()


class TestExamples(Callback):
    """Puts in each round's record how many test examples evaluated it (``test_examples``).

    With ``--eval-subset`` the rounds before the last use the subset; a run that ends earlier (a
    privacy budget, a stop request) has its last round evaluated again on the whole test split,
    so ``final`` always comes from the whole split.
    """

    def __init__(self, run: _Run):
        self.run = run

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        logs["test_examples"] = self.run.evaluated_on

    def on_run_end(self, logs: dict[str, Any]) -> None:
        rounds, run = self.driver.history.rounds, self.run
        if rounds and rounds[-1].get("test_examples") != len(run.full_test[1]):
            loss, accuracy, asr = run.evaluate_on(run.coordinator.weights, run.full_test)
            rounds[-1].update(
                loss=loss,
                accuracy=accuracy,
                attack_success_rate=asr,
                test_examples=run.evaluated_on,
            )
            run.checkpointer.write_results()


class _Run:
    """One configuration, checkpointed after every round into ``out/checkpoints``."""

    def __init__(
        self,
        sim: Simulation,
        config: RunConfig,
        out: Path,
        label: str,
        resume: bool,
        aggregator: Chain | None = None,
    ):
        self.sim, self.config, self.out, self.label = sim, config, out, label
        self.fed = sim.federation
        self.trainer = sim.trainer(config)
        attack_params = {"num_classes": self.fed.dataset.num_classes,
                         "output_kernel": sim.layout.output_kernel(), **config.attack_params}  # fmt: skip
        self.attack: Attack = build_attack(config.attack, attack_params, collude=config.collude)
        defence = build_defence(config, aggregator=aggregator)
        self.privacy, self.chain = defence.privacy, defence.chain
        for step in reference_steps(self.chain):  # FLTrust: the server's own update
            step.bind_reference(self._root_update(step.root_size))
        if config.engine == "tff":  # TFF's own aggregator for mean-based chains
            from fedwarden.aggregation.tff import tff_step

            self.chain = tff_step(self.chain)
        out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = out / "checkpoints"
        saved = checkpoint.load_latest(self.checkpoints) if resume else None
        if saved is not None:
            check_resume(saved, config.to_dict(), sim.layout.shapes, out)
        else:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            remove_ledger(out / "ledger.sqlite")
        self.checkpoints.mkdir(exist_ok=True)
        self.ledger = Ledger(out / "ledger.sqlite")
        if saved is not None:
            self.ledger.truncate_after(saved["round"])
        self.coordinator = build_coordinator(
            config,
            sim.layout.flatten(sim.initial_weights),
            self.chain,
            self.ledger,
            self._validation_probe(config.validation_examples),
            sim.layout.output_layer_size(),
            sim.layout.output_kernel(),
        )
        history = None
        if saved is not None:
            self.coordinator.load_state_dict(saved["coordinator"])
            history = History.from_state(saved)
        self.exporter = MetricsExporter()
        self.account = PrivacyAccount.for_run(
            config, self.privacy, lambda cid: len(self.fed.parts[cid]), self.exporter, saved
        )
        info = RunInfo(
            config.to_dict(),
            population={cid: int(len(self.fed.parts[cid])) for cid in self.fed.ids},
            malicious=self.fed.malicious,
            attack=describe_attack(self.attack),
            attacks=self.attacking,
        )
        self.checkpointer = Checkpoint(
            self.checkpoints, out / "results.json", info, self.account, shapes=sim.layout.shapes
        )
        self.driver = RoundDriver(
            self.coordinator,
            sim.transport(self),
            self._evaluate,
            config.rounds,
            [
                self.account,
                TestExamples(self),
                *self._tensorboard(config, out),
                MetricsExport(self.exporter, out / "metrics.prom"),
                self.checkpointer,
                Reports(
                    out,
                    f"{config.dataset}: attack={config.attack}, aggregator={config.aggregator}",
                    config.aggregator,
                    set(self.fed.malicious),
                ),
                Progress(config.rounds, label, config.progress),
            ],
            history=history,
            population=self.fed.ids,
            state_dir=self.checkpoints,
            average_last=config.average_last_rounds,
        )
        self.poisoned = self._poison_data()
        self.full_test, self.between_rounds = self._test_sets()
        self.evaluated_on = 0  # test examples of the last evaluation

    def _tensorboard(self, config: RunConfig, out: Path) -> list[Callback]:
        logdir = log_dir(config.tensorboard, out)
        return [] if logdir is None else [TensorBoard(logdir, set(self.fed.malicious))]

    def _poison_data(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.attack.kind != "data":
            return {}
        ds, poisoned = self.fed.dataset, {}
        for i, cid in enumerate(self.fed.ids):
            if cid in self.fed.malicious:
                idx = self.fed.parts[cid]
                rng = np.random.default_rng([self.config.seed, 2, i])
                poisoned[cid] = self.attack.poison_data(ds.x_train[idx], ds.y_train[idx], rng)
        return poisoned

    def attacking(self, cid: str, round_number: int) -> bool:
        """Whether client ``cid`` attacks in ``round_number``: a malicious client, from the
        attack's start round, in every round or (``attack_rate`` under 1) on-off."""
        c = self.config
        return (
            self.attack.kind != "none" and cid in self.fed.malicious
            and attacks_in_round(cid, round_number, start_round=c.attack_start_round,
                                 rate=c.attack_rate, seed=c.seed)
        )  # fmt: skip

    def _client_data(self, cid: str, round_number: int) -> tuple[np.ndarray, np.ndarray]:
        if cid in self.poisoned and self.attacking(cid, round_number):
            return self.poisoned[cid]
        idx = self.fed.parts[cid]
        return self.fed.dataset.x_train[idx], self.fed.dataset.y_train[idx]

    def local_round(
        self, round_number: int, selected: list[str], flat_weights: np.ndarray
    ) -> list[ClientUpdate]:
        weights = self.sim.layout.unflatten(flat_weights)
        data = [self._client_data(cid, round_number) for cid in selected]
        rngs = [
            np.random.default_rng([self.config.seed, 3, round_number, self.fed.ids.index(cid)])
            for cid in selected
        ]
        # The whole cohort in one call: native model copies in parallel, or one TFF call.
        results = self.trainer.train_cohort(weights, data, rngs)
        return self.updates(round_number, selected, results, flat_weights)

    def stream_round(
        self, round_number: int, selected: list[str], flat_weights: np.ndarray
    ) -> Iterator[ClientUpdate]:
        """``local_round``'s updates, trained one model copy's worth of clients at a time and
        handed on as they come, so that at most that many (plus the one being admitted) are
        held. The same updates: copy k trains clients k, k + c, k + 2c, ... in turn either way
        (``LocalTrainer._on_copies``), and a data attack's boost is per update."""
        step = getattr(self.trainer, "copies", 1)
        for start in range(0, len(selected), step):
            yield from self.local_round(round_number, selected[start : start + step], flat_weights)

    def crafts_from_cohort(self, round_number: int) -> bool:
        """Whether the attackers craft this round's updates from the honest ones (a model
        attack), which needs the whole cohort's updates at once."""
        return self.attack.kind == "model" and round_number >= self.config.attack_start_round

    def updates(
        self,
        round_number: int,
        selected: list[str],
        results: list[LocalResult],
        trained_from: np.ndarray,
    ) -> list[ClientUpdate]:
        """The cohort's updates from its training results (trained from the flat global weights
        ``trained_from``), the attackers' crafted if they attack."""
        updates = []
        for cid, result in zip(selected, results):
            updates.append(
                ClientUpdate(cid, round_number, result.delta, result.num_examples, result.loss)
            )
        attackers = {u.client_id for u in updates if self.attacking(u.client_id, round_number)}
        if attackers:
            self._craft(round_number, updates, attackers, trained_from)
            claim = self.config.attack_claim_examples
            if claim is not None:
                for u in updates:
                    if u.client_id in attackers:
                        u.num_examples = claim
        return updates

    def _craft(
        self,
        round_number: int,
        updates: list[ClientUpdate],
        attackers: set[str],
        trained_from: np.ndarray,
    ) -> None:
        bad = [u for u in updates if u.client_id in attackers]
        # the honest updates the server would admit (an on-off attacker's in a round it does
        # not attack among them): a diverged client's NaN or Inf is not one
        good = [u for u in updates
                if u.client_id not in attackers and np.isfinite(u.delta).all()]  # fmt: skip
        honest = (
            np.stack([u.delta for u in good])
            if good
            else np.zeros((0, self.sim.layout.size), np.float32)
        )
        rng = np.random.default_rng([self.config.seed, 4, round_number])
        rule = self._attacked_rule if self.attack.uses_aggregate else None
        own = np.stack([u.delta for u in bad])
        crafted = self.attack.craft(honest, own, rng, rule, trained_from)
        for u, row in zip(bad, crafted):
            u.delta = np.asarray(row, np.float32)

    def _held_out(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The server's own ``size`` examples of the held-out split (never client data; they stay
        in the test set, 100 of 17,500 on Fashion-MNIST)."""
        ds = self.fed.dataset
        idx = held_out_indices(len(ds.y_test), size, self.config.seed)
        return ds.x_test[idx], ds.y_test[idx]

    def _validation_probe(self, size: int) -> ValidationProbe | None:
        """Each update's loss change on ``size`` held-out examples (None for 0)."""
        if size == 0:
            return None
        x, y = self._held_out(size)
        layout, trainer = self.sim.layout, self.trainer
        return ValidationProbe(
            lambda flat: trainer.predict(layout.unflatten(flat), x),
            y,
            self.fed.dataset.num_classes,
        )

    def _root_update(self, size: int) -> Callable[[], np.ndarray]:
        """FLTrust's server update: the current model trained on ``size`` held-out examples."""
        x, y = self._held_out(size)

        def update() -> np.ndarray:
            weights = self.sim.layout.unflatten(self.coordinator.weights)
            rng = np.random.default_rng([self.config.seed, 6, self.coordinator.round])
            return self.trainer.train(weights, x, y, rng).delta

        return update

    def _attacked_rule(self, updates: np.ndarray) -> np.ndarray:
        """The run's chain on ``updates`` with this round's state, for rule-aware attacks (the
        omniscient attacker of Shejwalkar & Houmansadr 2021 knows the rule); state not advanced."""
        weights = np.ones(len(updates))
        return self.chain(updates, weights, self.coordinator.chain_state).updates[0]

    def _test_sets(self) -> tuple[TestSet, TestSet]:
        """The whole test split and what rounds before the last are evaluated on: the same split,
        or with ``--eval-subset N`` a fixed subset of N drawn from ``[seed, 7]``."""
        ds, n = self.fed.dataset, self.config.eval_subset
        full = (ds.x_test, ds.y_test, self.attack.asr_inputs(ds.x_test, ds.y_test))
        if n is None or n >= len(ds.y_test):
            return full, full
        idx = np.sort(np.random.default_rng([self.config.seed, 7]).permutation(len(ds.y_test))[:n])
        x, y = ds.x_test[idx], ds.y_test[idx]
        return full, (x, y, self.attack.asr_inputs(x, y))

    def _evaluate(self, flat_weights: np.ndarray) -> tuple[float, float, float | None]:
        last = self.coordinator.round >= self.config.rounds
        return self.evaluate_on(flat_weights, self.full_test if last else self.between_rounds)

    def evaluate_on(
        self, flat_weights: np.ndarray, test: TestSet
    ) -> tuple[float, float, float | None]:
        """(loss, accuracy, attack success rate or None) of ``flat_weights`` on ``test``."""
        x, y, asr_data = test
        weights = self.sim.layout.unflatten(flat_weights)
        loss, accuracy = self.trainer.evaluate(weights, x, y)
        asr = None
        if asr_data is not None:
            triggered, target = asr_data
            asr = float(np.mean(np.argmax(self.trainer.predict(weights, triggered), 1) == target))
        self.evaluated_on = len(y)
        return loss, accuracy, asr

    def execute(self) -> dict[str, Any]:
        server = self.exporter.serve(self.config.metrics_port) if self.config.metrics_port else None
        try:
            self.driver.run()
        finally:
            if server is not None:
                server.shutdown()
        rounds = self.driver.history.rounds
        if not rounds:
            raise UsageError(
                f"{self.out} already holds {self.coordinator.round} rounds; "
                "raise --rounds to continue it"
            )
        return self._write_outputs()

    def _write_outputs(self) -> dict[str, Any]:
        return self.checkpointer.results()


def check_config(config: RunConfig, num_classes: int | None = None) -> Chain:
    """Fails fast, before any training (see ``fedwarden.simulations.preflight.check_run``);
    returns the parsed ``--aggregator``."""
    return check_run(config)


def simulate(
    config: RunConfig, resume: bool = False, aggregator: Chain | None = None
) -> dict[str, Any]:
    """One simulation; ``aggregator``: what ``check_run(config)`` returned, when the caller
    already ran it (else it runs here)."""
    federation = make_federation(config)
    if aggregator is None:
        aggregator = check_config(config, federation.dataset.num_classes)
    return Simulation(config, federation).run(
        config, Path(config.out), resume=resume, aggregator=aggregator
    )


def variant(config: RunConfig, **changes: Any) -> RunConfig:
    return replace(config, **changes)
