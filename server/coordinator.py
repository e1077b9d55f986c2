"""The round logic, shared by every transport (simulated clients, gRPC agents, TFF).

A transport selects clients with ``select``, gathers their ``ClientUpdate``s however it likes, and
hands them to ``finish_round``: admission, one update matrix, the aggregation chain, per-client
anomaly scores, trust, the server optimizer step, the ledger. Evaluation and export belong to the
caller, which knows its test data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation.accounting import poisson_sample
from aggregation.base import AggregationError, Step
from aggregation.rules import median
from aggregation.scoring import anomaly_score, client_metrics
from server.admission import ClientUpdate, Rejection, admit
from server.optimizers import ServerOptimizer
from server.trust import TrustBook

log = logging.getLogger("fedwarden.coordinator")


@dataclass
class RoundOutcome:
    round: int
    selected: list[str]
    admitted: list[str]
    rejected: list[Rejection]
    clients: list[dict[str, Any]]  # one row per scored client: metrics, anomaly, trust, flagged
    flagged: list[str]  # every client currently flagged, not only this round's cohort
    measurements: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


class Coordinator:
    def __init__(
        self,
        weights: np.ndarray,
        chain: Step,
        optimizer: ServerOptimizer,
        trust: TrustBook,
        *,
        max_update_norm: float | None = None,
        anomaly_weights: dict[str, float] | None = None,
    ):
        self.weights = np.asarray(weights, np.float32)
        self.chain = chain
        self.optimizer = optimizer
        self.trust = trust
        self.max_update_norm = max_update_norm
        self.anomaly_weights = anomaly_weights or None
        self.round = 0  # last completed round
        self.optimizer_state = optimizer.init(self.weights.size)
        self.chain_state = chain.init()
        self._median = median()

    def select(
        self,
        available: list[str],
        k: int,
        rng: np.random.Generator,
        poisson_rate: float | None = None,
    ) -> list[str]:
        """Samples up to k clients uniformly, skipping quarantined ones.

        With ``poisson_rate`` each eligible client joins independently with that probability,
        the sampling that the central DP accountant assumes (the cohort size then varies).
        """
        eligible = [c for c in available if not self.trust.is_excluded(c, self.round + 1)]
        if poisson_rate is not None:
            return sorted(poisson_sample(eligible, poisson_rate, rng))
        if len(eligible) <= k:
            return sorted(eligible)
        return sorted(rng.choice(eligible, size=k, replace=False).tolist())

    def finish_round(
        self, round_number: int, selected: list[str], updates: list[ClientUpdate]
    ) -> RoundOutcome:
        start = time.perf_counter()
        admitted, rejected = admit(
            updates, round_number, set(selected), self.weights.size, self.max_update_norm
        )
        for r in rejected:
            log.warning(
                "round %d: rejected update from %s (%s): %s",
                round_number,
                r.client_id,
                r.reason,
                r.detail,
            )
        measurements: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        ids = [u.client_id for u in admitted]
        if admitted:
            matrix = np.stack([u.delta.astype(np.float32, copy=False) for u in admitted])
            multipliers = np.array([self.trust.weight_multiplier(c) for c in ids])
            weights = np.array([u.num_examples for u in admitted], np.float64) * multipliers
            counted = weights > 0
            per_client: dict[str, np.ndarray] = {}
            # Boolean indexing copies the whole matrix; only a round with weight-0 clients needs it.
            cohort = matrix if counted.all() else matrix[counted]
            try:
                out = self.chain(cohort, weights[counted], self.chain_state)
            except AggregationError as exc:  # e.g. Krum's n > 2f + 2 on a thin cohort
                out = None
                measurements["skipped"] = str(exc)
            if out is not None:
                self.chain_state = out.state
                aggregate = out.updates[0]
                measurements.update(out.measurements)
                for name, values in out.per_client.items():
                    full = np.full(len(ids), np.nan)
                    full[counted] = values
                    per_client[name] = full
                self.weights, self.optimizer_state = self.optimizer.step(
                    self.weights, aggregate.astype(np.float32), self.optimizer_state
                )
            else:
                log.warning(
                    "round %d: no aggregate (%s); weights unchanged",
                    round_number,
                    measurements.get("skipped", "every admitted client is quarantined"),
                )
            losses = np.array([np.nan if u.loss is None else u.loss for u in admitted])
            # Scores compare each client with the cohort's coordinate-wise median, not with the
            # round's aggregate: a plain mean is dragged by the attackers and DP noise blurs any
            # aggregate, and one reference keeps scores comparable across aggregation rules.
            reference = self._median(matrix, np.ones(len(ids)), None).updates[0]
            metrics = client_metrics(matrix, reference, losses, per_client)
            anomaly = anomaly_score(metrics, self.anomaly_weights)
            rows = [
                {
                    "client_id": c,
                    "weight": float(w),
                    "anomaly": float(a),
                    **{k: float(v[i]) for k, v in metrics.items()},
                }
                for i, (c, w, a) in enumerate(zip(ids, weights, anomaly))
            ]
        else:
            anomaly, metrics, losses = np.zeros(0), None, None
            log.warning("round %d: no update admitted; weights unchanged", round_number)
        rejected_counts: dict[str, int] = {}
        for r in rejected:
            rejected_counts[r.client_id] = rejected_counts.get(r.client_id, 0) + 1
        states = self.trust.update(
            round_number,
            ids,
            anomaly,
            rejected_counts,
            metrics=metrics,
            losses=losses,
            reasons={r.client_id: r.reason for r in rejected},
        )
        for row in rows:
            state = states[row["client_id"]]
            row.update(trust=state.trust, flagged=state.flagged, quarantined=state.quarantined)
        self.round = round_number
        flagged = sorted(c for c, s in self.trust.snapshot().items() if s.flagged)
        return RoundOutcome(
            round_number,
            selected,
            ids,
            rejected,
            rows,
            flagged,
            measurements,
            time.perf_counter() - start,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "weights": self.weights,
            "optimizer_state": self.optimizer_state,
            "chain_state": self.chain_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.weights = np.asarray(state["weights"], np.float32)
        self.optimizer_state = state["optimizer_state"]
        self.chain_state = state["chain_state"]
