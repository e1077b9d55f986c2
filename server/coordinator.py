"""The round logic, shared by every transport (simulated clients, gRPC agents, TFF).

A transport selects clients with ``select``, gathers their ``ClientUpdate``s however it likes, and
hands them to ``finish_round``: admission, one update matrix, the aggregation chain, per-client
anomaly scores, trust, the server optimizer step, the ledger. Evaluation and export belong to the
caller, which knows its test data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedwarden.aggregation import new_rows, row_allocator, warm_up
from fedwarden.aggregation.accounting import poisson_sample
from fedwarden.aggregation.base import AggregationError, Step
from fedwarden.aggregation.detection import HistoryForecast
from fedwarden.aggregation.rules import median
from fedwarden.aggregation.scoring import (
    HISTORY_METRIC,
    KINSHIP_METRIC,
    NORM_SCALE_METRIC,
    STEPS_METRIC,
    anomaly_as_original,
    anomaly_components,
    anomaly_score,
    boost_rows,
    boost_spread,
    client_metrics,
    log_norm_spread,
    median_and_trimmed_shares,
    order_statistics_scope,
    share_order_statistics,
)
from fedwarden.records import ClientRound, ClientSummary
from fedwarden.server.admission import Admission, ClientUpdate, Rejection, RoundIntake
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, round_record
from fedwarden.server.update_matrix import UpdateMatrix, remove_stale_spill_files
from fedwarden.server.validation import ValidationProbe

log = logging.getLogger("fedwarden.coordinator")

NORM_SCALE_ROUNDS = 5  # rounds whose unflagged median norms make the ``norm_scale``
NORM_SPREAD_ROUNDS = 5  # rounds (this one and the ones before) whose log norm spreads make
# the scales of ``norm_z`` and ``boosted_group`` (``scoring.log_norm_z``, ``boosted_groups``)


@dataclass
class RoundOutcome:
    """What ``Coordinator.finish_round`` did with one round's updates.

    Attributes:
      round: the round number.
      selected: the cohort the transport selected, as given.
      admitted: ids of the clients whose updates were admitted and aggregated (a client whose
        update made the aggregate overflow is moved to ``rejected``).
      rejected: one ``Rejection(client_id, reason, detail)`` per refused update; reasons such as
        ``non_finite``, ``wrong_shape``, ``not_selected``, ``overflow``.
      clients: one ``fedwarden.records.ClientRound`` per admitted client: its aggregation
        ``weight``, ``anomaly``, the scoring metrics (``norm``, ``cosine``, ...), then trust's
        verdict (``trust``, ``flagged``, ``quarantined`` and the evidence behind it).
      flagged: every client currently flagged, not only this round's cohort.
      measurements: the chain's measurements (``"<step>/<name>"``, e.g.
        ``"central_dp/clip_rate"``); ``skipped`` with the reason when the weights did not move.
      duration_s: wall time of ``finish_round``.
      received: every update handed in, in arrival order, without its values (``receipt``):
        who sent what example count; the values lived in the round's matrix only.
      unscored: the standing (``ClientSummary``) of every other client trust changed this
        round: a rejected one, or one flagged or unflagged by association while it sat out.
    """

    round: int
    selected: list[str]
    admitted: list[str]
    rejected: list[Rejection]
    clients: list[ClientRound]
    flagged: list[str]  # every client currently flagged, not only this round's cohort
    measurements: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    received: list[ClientUpdate] = field(default_factory=list)
    unscored: list[ClientSummary] = field(default_factory=list)


DEFAULT_MAX_WEIGHT_RATIO = 4.0
"""A client's aggregation weight is at most this multiple of the cohort's median example count."""


def bounded_weights(num_examples: list[int], max_ratio: float | None) -> np.ndarray:
    """Example counts as aggregation weights, capped at ``max_ratio`` times the cohort median.

    Reported counts are the client's word; without a cap one client claiming ``2**64 - 1``
    examples owns a weighted mean. None leaves the counts as reported.
    """
    counts = np.array([float(n) for n in num_examples], np.float64)
    if max_ratio is None or counts.size == 0:
        return counts
    return np.minimum(counts, max_ratio * float(np.median(counts)))


def local_steps(
    num_examples: np.ndarray, batch_size: int, full_batches: bool = False
) -> np.ndarray:
    """Optimizer steps per local epoch: batches of ``min(batch_size, n)``, the last one short,
    or dropped with ``full_batches`` (DP-SGD's, ``clients/training.py``). A claimed count buys a
    larger expected norm only as far as its weight goes, so the counts passed are the bounded
    ones (:func:`bounded_weights`)."""
    counts = np.maximum(np.asarray(num_examples, np.float64), 1.0)
    batches = counts / np.minimum(batch_size, counts)
    return np.floor(batches) if full_batches else np.ceil(batches)


BLOCKWISE_STEPS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "gaussian_noise",
                   "clip_by_norm", "adaptive_clip_by_norm")  # fmt: skip
"""Steps that read a spilled matrix in column blocks and never hold a copy of it in private
memory (clipping writes its clipped copy to another spill file, ``UpdateMatrix.allocate``)."""


def copying_steps(chain: Any) -> list[str]:
    """The names of the chain's steps that are not ``BLOCKWISE_STEPS``: those that would copy a
    spilled update matrix into private memory, so a round memory budget cannot hold."""
    return [name for name in step_names(chain) if name not in BLOCKWISE_STEPS]


def step_names(step: Any) -> list[str]:
    """The names of a chain's steps, nested chains flattened."""
    children = getattr(step, "steps", None)
    if children is None:
        return [getattr(step, "name", repr(step))]
    return [name for child in children for name in step_names(child)]


def _take_rows(matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``matrix[mask]``, in a buffer from the round's row allocator: a spill file in a spilled
    round, so a subset of the rows is not a private copy either."""
    rows = new_rows((int(mask.sum()), matrix.shape[1]), matrix.dtype)
    for i, source in enumerate(np.flatnonzero(mask)):
        rows[i] = matrix[source]
    return rows


def _finite(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)))


class Coordinator:
    """The server side of federated rounds: admission, robust aggregation, scores and trust.

    Every transport (simulated clients, gRPC agents, TFF) drives the same object: ``select`` a
    cohort, gather its updates, ``finish_round``. The coordinator holds the global weights
    (flat float32), the chain and optimizer states and the trust book; ``state_dict`` and
    ``load_state_dict`` carry them through a checkpoint (trust persists in its ledger).

    Args:
      weights: the initial global weights, flat (``fedwarden.weights.WeightLayout.flatten``).
      chain: the aggregation step, ``(updates (K, d), weights (K,), state) -> StepOutput``
        (``fedwarden.aggregation.chain`` or ``parse_chain``).
      optimizer: the server optimizer applied to the aggregate (FedAvg, FedAvgM, FedAdam).
      trust: per-client trust; it may down-weight or exclude clients and writes the ledger.
      max_update_norm: admission refuses updates with a larger L2 norm (None: no limit).
      anomaly_weights: weights of the anomaly score's components (default: the scoring's).
      max_weight_ratio: a client's aggregation weight is at most this multiple of the cohort's
        median example count (None: counts as reported).
      round_memory_budget: bytes; a round whose ``K x d`` float32 update matrix is larger goes
        through a memory-mapped file in ``spill_dir`` (None: always in memory). The chain's
        steps must then be among ``BLOCKWISE_STEPS``.
      spill_dir: where spilled matrices go (default: the system's temporary directory).
      validation: measures each update's loss change on server-held examples (the ``validation``
        anomaly component, ``server/validation.py``); None: no such component.
      batch_size: the local batch size the clients train with; with it, each update's norm is
        judged against the steps its example count (bounded as its weight is) makes
        (``scoring.log_norm_z``). None: against the cohort's norms alone.
      full_batches: the clients keep full batches only (DP-SGD), so a short last batch is no step.
      output_layer: how many of the weights' last coordinates are the model's output layer
        (``fedwarden.weights.WeightLayout.output_layer_size``); the history forecasts them apart
        for association. 0: not known.
      output_kernel: ``(inputs, classes)`` of the model's dense output layer
        (``fedwarden.weights.WeightLayout.output_kernel``), for the ``mislabeled`` component;
        None: not known.

    Example::

        coordinator = Coordinator(np.zeros(d, np.float32), parse_chain("median"),
                                  ServerOptimizer("fedavg", 1.0), TrustBook(TrustPolicy()))
        cohort = coordinator.select(client_ids, 10, np.random.default_rng(0))
        updates = [ClientUpdate(cid, 1, delta, num_examples) for cid, delta, ... in ...]
        outcome = coordinator.finish_round(1, cohort, updates)
        coordinator.weights  # the new global weights

    ``fedwarden.server.driver.RoundDriver`` runs this loop with evaluation, checkpoints and
    metrics around it.
    """

    def __init__(
        self,
        weights: np.ndarray,
        chain: Step,
        optimizer: ServerOptimizer,
        trust: TrustBook,
        *,
        max_update_norm: float | None = None,
        anomaly_weights: dict[str, float] | None = None,
        max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
        round_memory_budget: float | None = None,
        spill_dir: str | os.PathLike | None = None,
        validation: ValidationProbe | None = None,
        batch_size: int | None = None,
        full_batches: bool = False,
        output_layer: int = 0,
        output_kernel: tuple[int, int] | None = None,
    ):
        self.weights = np.asarray(weights, np.float32)
        self.chain = chain
        self.optimizer = optimizer
        self.trust = trust
        self.max_update_norm = max_update_norm
        self.anomaly_weights = anomaly_weights or None
        self.max_weight_ratio = max_weight_ratio
        self.round_memory_budget = round_memory_budget  # bytes
        self.spill_dir = spill_dir
        self.validation = validation
        self.batch_size = batch_size
        self.full_batches = full_batches
        self.output_kernel = output_kernel
        self._matrix_buffer: np.ndarray | None = None  # the last in-memory round's matrix
        if round_memory_budget is not None:
            for path in remove_stale_spill_files(spill_dir):
                log.warning(
                    "removed %s, a spilled update matrix left by an interrupted round", path
                )
        self.round = 0  # last completed round
        self.optimizer_state = optimizer.init(self.weights.size)
        self.chain_state = chain.init()
        warm_up()  # loads while the first round's clients train
        # each client's consistency with its own past updates
        self.history = HistoryForecast(output_layer=output_layer)
        # The median norm of the unflagged updates of each of the last NORM_SCALE_ROUNDS rounds:
        # a norm scale no client of the current round shapes (``oversized``).
        self.norm_scales: list[float] = []
        self.norm_spreads: list[float] = []  # the earlier rounds' ``scoring.log_norm_spread``
        self.boost_spreads: list[float] = []  # the earlier rounds' ``scoring.boost_spread``
        self._median = median()

    def _local_steps(self, admitted: list[ClientUpdate]) -> np.ndarray | None:
        if self.batch_size is None:
            return None
        counts = bounded_weights([u.num_examples for u in admitted], self.max_weight_ratio)
        return local_steps(counts, self.batch_size, self.full_batches)

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

    def open_round(self, round_number: int, selected: list[str]) -> RoundIntake:
        """The round's intake, for a transport that hands updates in as they arrive.

        Each ``intake.add(update)`` admits the update and copies it into the round's update
        matrix (spilled under ``round_memory_budget``), so the transport need not keep it; then
        ``finish_round(round_number, selected, intake)``. An intake the transport abandons
        (a round attempt that failed) must be ``close``d: it may hold a spill file.

        Raises:
          ValueError: when the matrix is spilled and the chain cannot run in column blocks.
        """
        store = UpdateMatrix(
            len(set(selected)),
            self.weights.size,
            self.round_memory_budget,
            self.spill_dir,
            reuse=self._matrix_buffer,
        )
        self._matrix_buffer = None  # the round owns it until it returns
        if store.spilled:
            try:
                self._check_blockwise(store)
            except ValueError:
                store.close()
                raise
        gate = Admission(round_number, set(selected), self.weights.size, self.max_update_norm)
        return RoundIntake(gate, list(selected), store)

    def finish_round(
        self,
        round_number: int,
        selected: list[str],
        updates: Iterable[ClientUpdate] | RoundIntake,
    ) -> RoundOutcome:
        """Admits, aggregates and scores one round's updates, then updates trust and weights.

        Args:
          round_number: the round these updates answer; updates tagged with another round are
            rejected (``wrong_round``), so must be ``self.round + 1`` in a normal run.
          selected: the cohort; updates from anyone else are rejected (``not_selected``).
          updates: ``ClientUpdate`` deltas (trained minus global weights, flat), at most one
            per client (a second is rejected as ``duplicate``); they are not modified. Any
            iterable: each admitted delta is copied into the round's update matrix as it comes,
            so a generator's updates need not all be held at once. Or the ``RoundIntake`` of
            ``open_round(round_number, selected)``, already filled by the transport.

        Returns:
          A :class:`RoundOutcome`. Side effects: ``weights``, the optimizer and chain states
          and ``round`` advance; trust is updated (and written to the ledger, if any).

        What it assumes: nothing about the updates; admission checks round, sender, shape,
        dtype, finiteness and example counts, and refuses with a reason. What it guarantees: the weights stay finite. An aggregate that is not finite is
        rolled back: the updates that made it overflow (largest norms first) are rejected
        (``overflow``) and the rest aggregated again; when the rule cannot run (e.g. Krum on a
        thin cohort), everyone is quarantined, or the optimizer step is not finite, the
        weights stay as they were and ``measurements["skipped"]`` says why. Clients are
        scored against the cohort's coordinate-wise median whatever the rule.

        Memory: the update matrix is held once, and kept for the next round when it is in
        memory; with ``round_memory_budget`` set and the cohort's matrix larger than it, it is
        a memory-mapped file in ``spill_dir``, deleted when the round ends
        (``server/update_matrix.py``).
        """
        start = time.perf_counter()
        if isinstance(updates, RoundIntake):
            intake = updates
            if intake.round != round_number or intake.selected != list(selected):
                intake.close()
                raise ValueError(
                    f"finish_round got the intake of round {intake.round} for "
                    f"{len(intake.selected)} clients; pass the intake that "
                    f"open_round({round_number}, selected) returned. Received: round "
                    f"{round_number}, {len(selected)} clients"
                )
        else:
            intake = self.open_round(round_number, selected)
        store = intake.store
        try:
            if not isinstance(updates, RoundIntake):
                for u in updates:  # each admitted delta lands in its row as it comes
                    intake.add(u)
            copies = row_allocator(store.allocate) if store.spilled else contextlib.nullcontext()
            with order_statistics_scope(), copies:
                outcome = self._round(intake, start)
            self._matrix_buffer = store.buffer  # kept: refilling it costs no page faults
            return outcome
        finally:
            intake.close()

    def _check_blockwise(self, store: UpdateMatrix) -> None:
        steps = step_names(self.chain)
        copying = copying_steps(self.chain)
        if copying:
            raise ValueError(
                f"round_memory_budget={self.round_memory_budget / 2**20:g} MB is below this "
                f"round's {store.nbytes / 2**20:.0f} MB update matrix, and {copying} "
                f"copies the matrix, so it cannot run in blocks. Received: chain {steps}; raise "
                f"the budget or use {', '.join(BLOCKWISE_STEPS)}."
            )

    def _round(self, intake: RoundIntake, start: float) -> RoundOutcome:
        round_number, selected, store = intake.round, intake.selected, intake.store
        admitted, rejected = list(intake.admitted), list(intake.rejected)
        for r in rejected:
            log.warning(
                "round %d: rejected update from %s (%s): %s",
                round_number,
                r.client_id,
                r.reason,
                r.detail,
            )
        measurements: dict[str, Any] = {}
        trained_from = self.weights  # the updates' base, before this round's step replaces it
        if admitted:
            matrix = store.matrix
            share_order_statistics(matrix)  # one order pass serves the chain and the scoring
            weights = bounded_weights(
                [u.num_examples for u in admitted], self.max_weight_ratio
            ) * np.array([self.trust.weight_multiplier(u.client_id) for u in admitted])
            out, error = self._aggregate(matrix, weights, [u.client_id for u in admitted])
            if error is None and not _finite(out.updates[0]):
                keep = self._drop_overflow(matrix, weights)
                for i in np.flatnonzero(~keep):
                    rejected.append(
                        Rejection(
                            admitted[i].client_id,
                            "overflow",
                            "the round's aggregate was not finite with this update and finite "
                            "without it",
                        )
                    )
                    log.warning("round %d: %s made the aggregate overflow; rejected",
                                round_number, admitted[i].client_id)  # fmt: skip
                admitted = [u for u, k in zip(admitted, keep) if k]
                matrix, weights = store.keep(keep), weights[keep]
                share_order_statistics(matrix)
                out, error = (
                    self._aggregate(matrix, weights, [u.client_id for u in admitted])
                    if admitted
                    else (None, "empty")
                )
        ids = [u.client_id for u in admitted]
        if admitted:
            counted = weights > 0
            per_client: dict[str, np.ndarray] = {}
            if error is not None:
                measurements["skipped"] = error
            if out is not None and error is None:
                new_weights, new_optimizer_state = self.optimizer.step(
                    self.weights, out.updates[0].astype(np.float32), self.optimizer_state
                )
                if _finite(new_weights):
                    self.weights, self.optimizer_state = new_weights, new_optimizer_state
                    self.chain_state = out.state
                    measurements.update(out.measurements)
                    for name, values in out.per_client.items():
                        full = np.full(len(ids), np.nan)
                        full[counted] = values
                        per_client[name] = full
                else:
                    measurements["skipped"] = "the server optimizer produced non-finite weights"
            if "skipped" in measurements:
                log.warning(
                    "round %d: no aggregate (%s); weights unchanged",
                    round_number,
                    measurements["skipped"],
                )
            losses = np.array([np.nan if u.loss is None else u.loss for u in admitted])
            # Scores compare each client with the cohort's coordinate-wise median, not with the
            # round's aggregate: a plain mean is dragged by the attackers and DP noise blurs any
            # aggregate, and one reference keeps scores comparable across aggregation rules.
            # The median and the trimmed shares come from the round's one pass over the order
            # statistics, which a median chain has already made (``order_statistics_scope``).
            if "trimmed_share" in per_client:
                reference = self._median(matrix, np.ones(len(ids)), None).updates[0]
            else:
                reference, per_client["trimmed_share"] = median_and_trimmed_shares(matrix)
            # The history tells an update other clients copied from its copies.
            history = self.history.step(ids, matrix, reference)
            if self.trust.ledger is not None:
                # before the round's rows, so a recorded round has them: ``trust replay`` decides
                # flags by association again from them
                forecasts = self.history.forecasts_of(ids)
                self.trust.ledger.record_histories(round_number, ids, *forecasts)
            flagged_before = self.trust.flagged()
            suspect = np.array([c in flagged_before for c in ids])
            # Flagged clients do not shape the reference of the cosine: in a round where flagged
            # attackers hold the cohort's median they would look ordinary and the honest
            # clients odd, and the round would clear them.
            trusted = _trusted_rows(suspect)
            steps = self._local_steps(admitted)
            metrics = client_metrics(
                matrix, reference, losses, per_client, trusted=trusted, weights=trained_from,
                suspect=suspect, history_error=history.error, own_rounds=history.own_rounds,
                steps=steps, earlier_spreads=self.norm_spreads,
                earlier_boost_spreads=self.boost_spreads, output_kernel=self.output_kernel,
            )  # fmt: skip
            self.history.record_template_cosines(ids, metrics["template_cosine"])
            spread = log_norm_spread(metrics["norm"], trusted, self.norm_spreads)
            _pool(self.norm_spreads, spread)
            lower_half = boost_rows(metrics["pair_gap"], metrics["copied"], trusted)
            _pool(self.boost_spreads, boost_spread(metrics["norm"], steps, lower_half))
            metrics["num_examples"] = np.array([u.num_examples for u in admitted], np.float64)
            if steps is not None:
                metrics[STEPS_METRIC] = steps
            metrics[HISTORY_METRIC] = history.error
            metrics[KINSHIP_METRIC] = history.kinship
            if self.validation is not None:
                metrics.update(self.validation.measure(trained_from, matrix))
            if self.norm_scales:
                metrics[NORM_SCALE_METRIC] = np.full(len(ids), float(np.median(self.norm_scales)))
            anomaly = anomaly_score(metrics, self.anomaly_weights)
            as_original = anomaly_as_original(metrics, anomaly, self.anomaly_weights)
            alone = history.alone
            components = anomaly_components(metrics)
        else:
            anomaly, metrics, losses, components = np.zeros(0), None, None, None
            as_original, alone = anomaly, None
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
            components=components,
            association=self.history.association,
            copies=self.history.copies,
            alone=alone,
            as_original=as_original,
            weights=self.anomaly_weights,
        )
        if ids:
            unflagged = [i for i, c in enumerate(ids) if not states[c].flagged]
            if unflagged:
                self.norm_scales.append(float(np.median(metrics["norm"][unflagged])))
                del self.norm_scales[:-NORM_SCALE_ROUNDS]
        # each scored client's record: its measurements, then trust's verdict after the round
        rows = [
            round_record(
                states[c],
                round_number,
                weight=float(w),
                anomaly=float(a),
                **{k: float(v[i]) for k, v in metrics.items()},
            )
            for i, (c, w, a) in enumerate(zip(ids, weights, anomaly))
        ] if ids else []  # fmt: skip
        self.round = round_number
        flagged = sorted(self.trust.flagged())
        admitted = set(ids)
        return RoundOutcome(
            round_number,
            selected,
            ids,
            rejected,
            rows,
            flagged,
            measurements,
            time.perf_counter() - start,
            intake.received,
            [state for cid, state in sorted(states.items()) if cid not in admitted],
        )

    def _aggregate(
        self, matrix: np.ndarray, weights: np.ndarray, ids: list[str] | None = None
    ) -> tuple[Any, str | None]:
        """The chain's output on the clients with positive weight, or the reason there is none.

        A chain with per-client state (client momentum) also gets the counted clients' ids."""
        counted = weights > 0
        if not counted.any():
            return None, "every admitted client is quarantined"
        # Boolean indexing copies the whole matrix; only a round with weight-0 clients needs it.
        cohort = matrix if counted.all() else _take_rows(matrix, counted)
        try:
            if ids is not None and getattr(self.chain, "uses_client_ids", False):
                cohort_ids = [c for c, k in zip(ids, counted) if k]
                out = self.chain(cohort, weights[counted], self.chain_state, client_ids=cohort_ids)
                return out, None
            return self.chain(cohort, weights[counted], self.chain_state), None
        except AggregationError as exc:  # e.g. Krum's n > 2f + 2 on a thin cohort
            return None, str(exc)

    def _drop_overflow(self, matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Which rows to keep so that the aggregate is finite: the largest updates go first.

        Every row is finite as float32, yet sums of rows near float32's limit overflow; the rows
        that caused it are the ones with the largest norms.
        """
        norms = np.array([np.linalg.norm(row.astype(np.float64)) for row in matrix])
        keep = np.ones(len(matrix), bool)
        for i in np.argsort(-norms, kind="stable"):
            keep[i] = False
            if not keep.any():
                break
            out, error = self._aggregate(_take_rows(matrix, keep), weights[keep])
            if error is not None or _finite(out.updates[0]):
                break
        return keep

    def state_dict(self) -> dict[str, Any]:
        """Round, weights, optimizer and chain states: what a checkpoint needs besides trust."""
        return {
            "round": self.round,
            "weights": self.weights,
            "optimizer_state": self.optimizer_state,
            "chain_state": self.chain_state,
            "history": self.history.state_dict(),
            "norm_scales": list(self.norm_scales),
            "norm_spreads": list(self.norm_spreads),
            "boost_spreads": list(self.boost_spreads),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.weights = np.asarray(state["weights"], np.float32)
        self.optimizer_state = state["optimizer_state"]
        self.chain_state = state["chain_state"]
        if "history" in state:  # checkpoints from before the history signal have none
            self.history.load_state_dict(state["history"])
        self.norm_scales = [float(v) for v in state.get("norm_scales", [])]
        self.norm_spreads = [float(v) for v in state.get("norm_spreads", [])]
        self.boost_spreads = [float(v) for v in state.get("boost_spreads", [])]


def _pool(spreads: list[float], spread: float) -> None:
    """Adds a finite round's spread to a pool of :data:`NORM_SPREAD_ROUNDS` - 1 earlier ones."""
    if np.isfinite(spread):
        spreads.append(spread)
        del spreads[: 1 - NORM_SPREAD_ROUNDS]


def _trusted_rows(flagged: np.ndarray) -> np.ndarray | None:
    """Which rows make the cosine's reference: the clients not flagged, when at least half the
    cohort (and 3 rows) are not; None means every row."""
    trusted = ~flagged
    if trusted.all() or trusted.sum() < max(3, (len(flagged) + 1) // 2):
        return None
    return trusted
