"""The in-process simulation: many clients on one machine, with attacks and defences.

``Simulation`` holds what runs share (data split, compiled model, trainer), so ``fedwarden compare``
reuses it across the cells of its grid; ``run`` executes one configuration and writes its outputs.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from fedwarden.aggregation.accounting import default_delta
from fedwarden.aggregation.filtering import reference_steps
from fedwarden.attacks import Attack, build_attack
from fedwarden.clients.dp_sgd import ClientPrivacyAccount
from fedwarden.clients.training import DPSGDSettings, LocalTrainer, one_thread_per_op
from fedwarden.config import RunConfig
from fedwarden.data.datasets import Dataset, load_dataset
from fedwarden.data.partition import partition
from fedwarden.errors import UsageError
from fedwarden.models import build_model
from fedwarden.server import checkpoint
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator, RoundOutcome
from fedwarden.server.defence import build_chain, central_privacy, trust_policy
from fedwarden.server.ledger import Ledger, remove_ledger
from fedwarden.server.metrics import MetricsExporter
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook
from fedwarden.simulations import report
from fedwarden.simulations.preflight import check_run
from fedwarden.weights import WeightLayout

log = logging.getLogger("fedwarden.simulate")


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
        self._trainers: dict[tuple, LocalTrainer] = {}

    def trainer(self, config: RunConfig) -> LocalTrainer:
        dp = (
            DPSGDSettings(
                config.dp_l2_clip, config.dp_sgd_noise_multiplier, config.dp_microbatches
            )
            if config.dp_sgd
            else None
        )
        key = (config.engine, config.lr, config.batch_size, config.local_epochs, dp)
        if key not in self._trainers and config.engine == "tff":
            from fedwarden.simulations.tff_engine import (
                TFFTrainer,  # imports TFF (slow): only when asked
            )

            self._trainers[key] = TFFTrainer.for_simulation(self, config)
        if key not in self._trainers:
            self._trainers[key] = LocalTrainer(
                self.model, config.lr, config.batch_size, config.local_epochs, dp
            )
        return self._trainers[key]

    def run(
        self, config: RunConfig, out: Path, progress_label: str = "", resume: bool = False
    ) -> dict[str, Any]:
        return _Run(self, config, out, progress_label, resume).execute()


# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"rounds", "out", "progress", "metrics_port"}


@dataclass
class _History:
    rounds: list[dict[str, Any]]
    trust_by_round: dict[str, list[float | None]]
    flagged_by_round: list[set[str]]


class _Run:
    """One configuration, checkpointed after every round into ``out/checkpoints``."""

    def __init__(self, sim: Simulation, config: RunConfig, out: Path, label: str, resume: bool):
        self.sim, self.config, self.out, self.label = sim, config, out, label
        self.fed = sim.federation
        self.trainer = sim.trainer(config)
        attack_params = {"num_classes": self.fed.dataset.num_classes, **config.attack_params}
        self.attack: Attack = build_attack(config.attack, attack_params, collude=config.collude)
        self.privacy = central_privacy(config, len(self.fed.ids))
        self.chain = build_chain(config, self.privacy, seed=config.seed)
        for step in reference_steps(self.chain):  # FLTrust: the server's own update
            step.bind_reference(self._root_update(step.root_size))
        if config.engine == "tff":  # TFF's own aggregator for mean-based chains
            from fedwarden.aggregation.tff import tff_step

            self.chain = tff_step(self.chain)
        self.dp_sgd = (
            ClientPrivacyAccount(config.dp_sgd_noise_multiplier, config.batch_size)
            if config.dp_sgd
            else None
        )
        out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = out / "checkpoints"
        saved = self._load_checkpoint() if resume else None
        if saved is None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            remove_ledger(out / "ledger.sqlite")
        self.checkpoints.mkdir(exist_ok=True)
        self.ledger = Ledger(out / "ledger.sqlite")
        if saved is not None:
            self.ledger.truncate_after(saved["round"])
        policy = trust_policy(config)
        self.coordinator = Coordinator(
            sim.layout.flatten(sim.initial_weights),
            self.chain,
            ServerOptimizer(config.server_optimizer, config.server_lr, config.server_momentum),
            TrustBook(policy, self.ledger),
            anomaly_weights=config.anomaly_weights,
        )
        self.history = _History([], {cid: [] for cid in self.fed.ids}, [])
        if saved is not None:
            self.coordinator.load_state_dict(saved["coordinator"])
            self.history = saved["history"]
            self.dp_sgd = saved["dp_sgd"]
        self.exporter = MetricsExporter()
        self.server = self.exporter.serve(config.metrics_port) if config.metrics_port else None
        self.poisoned = self._poison_data()
        self.asr_data = self.attack.asr_inputs(self.fed.dataset.x_test, self.fed.dataset.y_test)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        saved = checkpoint.load_latest(self.checkpoints)
        if saved is None:
            return None
        before, now = saved["config"], self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
        if changed:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise UsageError(
                f"cannot resume {self.out}: its checkpoint was made with other "
                f"settings ({diffs}); use the same settings or another --out"
            )
        return saved

    def _save_checkpoint(self, round_number: int) -> None:
        checkpoint.save(
            self.checkpoints,
            round_number,
            {
                "round": round_number,
                "config": self.config.to_dict(),
                "history": self.history,
                "coordinator": self.coordinator.state_dict(),
                "dp_sgd": self.dp_sgd,
            },
        )

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

    def _client_data(self, cid: str, round_number: int) -> tuple[np.ndarray, np.ndarray]:
        if cid in self.poisoned and round_number >= self.config.attack_start_round:
            return self.poisoned[cid]
        idx = self.fed.parts[cid]
        return self.fed.dataset.x_train[idx], self.fed.dataset.y_train[idx]

    def _local_round(self, round_number: int, selected: list[str]) -> list[ClientUpdate]:
        weights = self.sim.layout.unflatten(self.coordinator.weights)
        data = [self._client_data(cid, round_number) for cid in selected]
        rngs = [
            np.random.default_rng([self.config.seed, 3, round_number, self.fed.ids.index(cid)])
            for cid in selected
        ]
        # The whole cohort in one call: native model copies in parallel, or one TFF call.
        results = self.trainer.train_cohort(weights, data, rngs)
        updates = []
        for cid, result in zip(selected, results):
            if self.dp_sgd is not None:
                self.dp_sgd.record(cid, result.num_examples, steps=result.steps)
            updates.append(
                ClientUpdate(cid, round_number, result.delta, result.num_examples, result.loss)
            )
        if self.attack.kind != "none" and round_number >= self.config.attack_start_round:
            self._craft(round_number, updates)
        return updates

    def _craft(self, round_number: int, updates: list[ClientUpdate]) -> None:
        bad = [u for u in updates if u.client_id in self.fed.malicious]
        good = [u for u in updates if u.client_id not in self.fed.malicious]
        if not bad:
            return
        honest = (
            np.stack([u.delta for u in good])
            if good
            else np.zeros((0, self.sim.layout.size), np.float32)
        )
        rng = np.random.default_rng([self.config.seed, 4, round_number])
        rule = self._attacked_rule if self.attack.uses_aggregate else None
        crafted = self.attack.craft(honest, np.stack([u.delta for u in bad]), rng, rule)
        for u, row in zip(bad, crafted):
            u.delta = np.asarray(row, np.float32)

    def _root_update(self, size: int) -> Callable[[], np.ndarray]:
        """FLTrust's server update: the current model trained on ``size`` examples of the held-out
        split (never client data; they stay in the test set, 100 of 17,500 on Fashion-MNIST)."""
        ds = self.fed.dataset
        idx = np.random.default_rng([self.config.seed, 5]).permutation(len(ds.y_test))[:size]
        x, y = ds.x_test[idx], ds.y_test[idx]

        def update() -> np.ndarray:
            weights = self.sim.layout.unflatten(self.coordinator.weights)
            rng = np.random.default_rng([self.config.seed, 6, self.coordinator.round])
            return self.trainer.train_cohort(weights, [(x, y)], [rng])[0].delta

        return update

    def _attacked_rule(self, updates: np.ndarray) -> np.ndarray:
        """The run's chain on ``updates`` with this round's state, for rule-aware attacks (the
        omniscient attacker of Shejwalkar & Houmansadr 2021 knows the rule); state not advanced."""
        weights = np.ones(len(updates))
        return self.chain(updates, weights, self.coordinator.chain_state).updates[0]

    def _evaluate(self) -> tuple[float, float, float | None]:
        ds = self.fed.dataset
        weights = self.sim.layout.unflatten(self.coordinator.weights)
        loss, accuracy = self.trainer.evaluate(weights, ds.x_test, ds.y_test)
        asr = None
        if self.asr_data is not None:
            x, target = self.asr_data
            asr = float(np.mean(np.argmax(self.trainer.predict(weights, x), 1) == target))
        return loss, accuracy, asr

    def _round_record(
        self, outcome: RoundOutcome, loss: float, accuracy: float, asr: float | None, elapsed: float
    ) -> dict[str, Any]:
        return {
            "round": outcome.round,
            "accuracy": accuracy,
            "loss": loss,
            "attack_success_rate": asr,
            "flagged": outcome.flagged,
            "selected": outcome.selected,
            "admitted": len(outcome.admitted),
            "rejected": len(outcome.rejected),
            "duration_s": elapsed,
            "measurements": checkpoint.jsonable(outcome.measurements),
        }

    def _export_privacy(self, record: dict[str, Any], outcome: RoundOutcome) -> None:
        if self.privacy is not None:
            record["epsilon"] = self.privacy.epsilon(outcome.round)
            self.exporter.set_dp_epsilon(record["epsilon"])
            for key, value in outcome.measurements.items():
                if key.endswith("clip_rate"):
                    self.exporter.set_gauge("fedwarden_dp_clip_rate", value)
                elif key.endswith("/clip_norm"):
                    self.exporter.set_gauge("fedwarden_dp_clip_norm", value)
        if self.dp_sgd is not None:
            for cid in outcome.selected:
                self.exporter.set_dp_epsilon(self._client_epsilon(cid), client_id=cid)

    def _client_epsilon(self, cid: str) -> float:
        delta = self.config.dp_delta or default_delta(len(self.fed.parts[cid]))
        return self.dp_sgd.epsilon(cid, delta)

    def _privacy_report(self, rounds_run: int) -> dict[str, Any] | None:
        report_: dict[str, Any] = {}
        if self.privacy is not None:
            report_["central"] = self.privacy.report(rounds_run)
        if self.dp_sgd is not None:
            per_client = {
                cid: self._client_epsilon(cid) for cid in self.fed.ids if self.dp_sgd.steps(cid)
            }
            report_["client"] = {
                "epsilon": max(per_client.values(), default=0.0),
                "delta": self.config.dp_delta or "1/n_local^1.1 per client",
                "noise_multiplier": self.config.dp_sgd_noise_multiplier,
                "l2_clip": self.config.dp_l2_clip,
                "accountant": "rdp",
                "per_client": per_client,
            }
        return report_ or None

    def execute(self) -> dict[str, Any]:
        c = self.config
        history = self.history
        bar = tqdm(
            range(self.coordinator.round + 1, c.rounds + 1),
            initial=self.coordinator.round,
            total=c.rounds,
            desc=self.label or "rounds",
            unit="round",
            disable=not c.progress,
            leave=False,
        )
        try:
            for round_number in bar:
                start = time.perf_counter()
                rng = np.random.default_rng([c.seed, 5, round_number])
                selected = self.coordinator.select(
                    self.fed.ids,
                    c.clients_per_round,
                    rng,
                    poisson_rate=self.privacy.sampling_rate if self.privacy else None,
                )
                outcome = self.coordinator.finish_round(
                    round_number, selected, self._local_round(round_number, selected)
                )
                loss, accuracy, asr = self._evaluate()
                elapsed = time.perf_counter() - start
                record = self._round_record(outcome, loss, accuracy, asr, elapsed)
                self._export_privacy(record, outcome)
                self.exporter.observe_round(round_number, accuracy, loss, elapsed, outcome.clients)
                for r in outcome.rejected:
                    self.exporter.count_rejected(r.reason)
                self.exporter.write_textfile(self.out / "metrics.prom")
                history.rounds.append(record)
                snapshot = self.coordinator.trust.snapshot()
                for cid in self.fed.ids:
                    history.trust_by_round[cid].append(
                        snapshot[cid].trust if cid in snapshot else None
                    )
                history.flagged_by_round.append(set(outcome.flagged))
                self._save_checkpoint(round_number)
                bar.set_postfix(acc=f"{accuracy:.3f}", flagged=len(outcome.flagged))
        finally:
            bar.close()
            if self.server is not None:
                self.server.shutdown()
        if not history.rounds:
            raise UsageError(
                f"{self.out} already holds {self.coordinator.round} rounds; "
                "raise --rounds to continue it"
            )
        return self._write_outputs(history.rounds, history.trust_by_round, history.flagged_by_round)

    def _write_outputs(self, rounds, trust_by_round, flagged_by_round) -> dict[str, Any]:
        malicious = set(self.fed.malicious)
        snapshot = self.coordinator.trust.snapshot()
        last = rounds[-1]
        detection = report.detection_summary(flagged_by_round, malicious)
        results = {
            "config": self.config.to_dict(),
            "rounds": rounds,
            "final": {
                "accuracy": last["accuracy"],
                "loss": last["loss"],
                "attack_success_rate": last["attack_success_rate"],
                "detection": detection,
                "privacy": self._privacy_report(len(rounds)),
            },
            "clients": {
                cid: {
                    "malicious": cid in malicious,
                    "trust": snapshot[cid].trust if cid in snapshot else None,
                    "flagged": bool(snapshot[cid].flagged) if cid in snapshot else False,
                    "num_examples": int(len(self.fed.parts[cid])),
                }
                for cid in self.fed.ids
            },
            "aggregator": repr(self.chain),
            "attack": repr(self.attack),
        }
        checkpoint.write_json_atomic(self.out / "results.json", results)
        report.write_rounds_csv(rounds, self.out / "rounds.csv")
        title = f"{self.config.dataset}: attack={self.config.attack}, aggregator={self.config.aggregator}"
        report.plot_accuracy({self.config.aggregator: rounds}, self.out / "accuracy.png", title)
        report.plot_trust_heatmap(trust_by_round, malicious, self.out / "trust.png")
        return results


def check_config(config: RunConfig, num_classes: int | None = None) -> None:
    """Fails fast, before any training (see ``fedwarden.simulations.preflight.check_run``)."""
    check_run(config)


def simulate(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    federation = make_federation(config)
    check_config(config, federation.dataset.num_classes)
    return Simulation(config, federation).run(config, Path(config.out), resume=resume)


def variant(config: RunConfig, **changes: Any) -> RunConfig:
    return replace(config, **changes)
