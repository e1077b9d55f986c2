"""Norm clipping: a pre-step that keeps the K rows and bounds each update's L2 norm.

``clip_by_norm(max_norm)`` scales every row whose norm exceeds ``max_norm`` down to that norm;
rows within the bound pass unchanged. The bound a round uses comes from ``clip_norm(state)`` and
the next round's state from ``next_state(state, norms, weights)``: the fixed clip keeps no state;
``adaptive_clip_by_norm`` (chain name ``adaptive_clip``) subclasses ``ClipByNorm`` and keeps its
norm estimator in the state, so a checkpoint carries the estimate. The adaptive clip is not
private: for DP, ``central_dp(..., adaptive=True)`` noises the count it learns from.

Example::

    step = chain(clip_by_norm(5.0), trimmed_mean(0.2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedwarden.aggregation._kernels import new_rows, row_norms
from fedwarden.aggregation._tf_queries import compiled_accumulate, flatten_state
from fedwarden.aggregation.base import AggregationError, StepOutput, as_cohort, check_not_empty

__all__ = ["ClipByNorm", "clip_by_norm", "clip_rows"]


def clip_rows(updates: np.ndarray, max_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Scales each row of ``updates`` to L2 norm at most ``max_norm``; a new array, same dtype.

    Returns:
      ``(clipped, norms)``: the clipped ``(K, d)`` matrix and the float64 pre-clip norms ``(K,)``.
      A clipped row's norm equals ``max_norm`` up to rounding in the input dtype.
    """
    norms = row_norms(updates)
    with np.errstate(divide="ignore"):
        scale = np.minimum(1.0, max_norm / norms)  # norm 0 -> inf -> 1
    clipped = new_rows(updates.shape, updates.dtype)  # a file under a round memory budget
    np.multiply(updates, scale.astype(updates.dtype)[:, None], out=clipped)
    return clipped, norms


class ClipByNorm:
    """Clips every update to L2 norm at most ``max_norm``; keeps the K rows and their weights.

    References:
      Sun et al. 2019, "Can You Really Backdoor Federated Learning?" (norm bounding as a defence);
      McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (the clip of
      DP-FedAvg).

    Args:
      max_norm: the bound; > 0.

    Assumption: honest updates have norms around or below ``max_norm`` (too small a bound slows
    training, too large lets a scaled malicious update through). Alone it is not robust: follow it
    with a rule. Measurements: ``clipped_count``, ``clip_norm`` (the bound used). Per client:
    ``clipped`` (1 if scaled down), ``norm`` (the pre-clip L2 norm).

    Subclasses that adapt the bound override ``init``, ``clip_norm`` and ``next_state``.
    """

    name = "clip_by_norm"
    keeps_rows = True

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm > 0:
            raise AggregationError(
                f"max_norm must be a positive number. Received: max_norm={max_norm!r}."
            )
        self.max_norm = float(max_norm)

    def init(self) -> Any:
        return None

    def clip_norm(self, state: Any) -> float:
        """The bound to use this round (a fixed clip ignores the state)."""
        return self.max_norm

    def next_state(self, state: Any, norms: np.ndarray, weights: np.ndarray) -> Any:
        """The state for the next round, given this round's pre-clip norms (unchanged here)."""
        return state

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        self.check(updates.shape[0])
        bound = float(self.clip_norm(state))
        clipped, norms = clip_rows(updates, bound)
        was_clipped = (norms > bound).astype(np.float64)
        return StepOutput(
            clipped,
            weights.copy(),
            state=self.next_state(state, norms, weights),
            measurements={"clipped_count": int(was_clipped.sum()), "clip_norm": bound},
            per_client={"clipped": was_clipped, "norm": norms},
        )

    def __repr__(self) -> str:
        return f"{self.name}(max_norm={self.max_norm!r})"


clip_by_norm = ClipByNorm


@dataclass
class AdaptiveClipState:
    """State of ``adaptive_clip_by_norm``: the quantile estimator's global state, flattened."""

    estimator_state: tuple[np.ndarray, ...]


class AdaptiveClipByNorm(ClipByNorm):
    """Clips to a bound that follows a quantile of the update norms, round after round.

    The bound moves geometrically, ``C <- C * exp(-lr * (share_unclipped - target_quantile))``,
    using tensorflow-privacy's ``NoPrivacyQuantileEstimatorQuery`` (the estimator of Andrew et al.
    2021 with the count taken exactly, i.e. not private). For robust chains such as
    ``adaptive_clip_by_norm() -> trimmed_mean``; for DP use ``central_dp(..., adaptive=True)``,
    whose count is noised. Measurements and per-client arrays are those of ``clip_by_norm``.

    WARNING: the bound is learned from all norms, attackers' included; at most a
    ``1 - target_quantile`` share of scaled-up updates leaves it where the honest ones put it.
    """

    name = "adaptive_clip_by_norm"
    dp_record_wise = False  # the bound depends on other clients' norms

    def __init__(
        self, initial_norm: float = 1.0, target_quantile: float = 0.5, learning_rate: float = 0.2
    ) -> None:
        super().__init__(initial_norm)
        if not 0.0 <= target_quantile <= 1.0:
            raise AggregationError(
                f"target_quantile must be in [0, 1]. Received: target_quantile={target_quantile}."
            )
        if not learning_rate >= 0:
            raise AggregationError(
                f"learning_rate must be >= 0. Received: learning_rate={learning_rate}."
            )
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self._query: Any = None
        self._accumulate: Any = None

    def _get_query(self) -> Any:
        if self._query is None:
            from tensorflow_privacy.privacy.dp_query.quantile_estimator_query import (
                NoPrivacyQuantileEstimatorQuery,
            )

            self._query = NoPrivacyQuantileEstimatorQuery(
                self.max_norm, self.target_quantile, self.learning_rate, geometric_update=True
            )
            self._accumulate = compiled_accumulate(self._query)
        return self._query

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "_query": None, "_accumulate": None}

    def _pack(self, state: AdaptiveClipState | None) -> Any:
        import tensorflow as tf

        query = self._get_query()
        template = query.initial_global_state()
        if state is None:
            return template
        return tf.nest.pack_sequence_as(template, [tf.constant(x) for x in state.estimator_state])

    def init(self) -> AdaptiveClipState:
        return AdaptiveClipState(flatten_state(self._get_query().initial_global_state()))

    def clip_norm(self, state: AdaptiveClipState | None) -> float:
        return float(self._pack(state).current_estimate)

    def next_state(
        self, state: AdaptiveClipState | None, norms: np.ndarray, weights: np.ndarray
    ) -> AdaptiveClipState:
        import tensorflow as tf

        query = self._get_query()
        global_state = self._pack(state)
        if len(norms) == 0:
            return AdaptiveClipState(flatten_state(global_state))
        params = query.derive_sample_params(global_state)
        sample_state = self._accumulate(params, tf.constant(norms, tf.float32))
        _, new_state, _ = query.get_noised_result(sample_state, global_state)
        return AdaptiveClipState(flatten_state(new_state))

    def __repr__(self) -> str:
        return (
            f"{self.name}(initial_norm={self.max_norm!r}, "
            f"target_quantile={self.target_quantile!r}, learning_rate={self.learning_rate!r})"
        )


def adaptive_clip_by_norm(
    initial_norm: float = 1.0, target_quantile: float = 0.5, learning_rate: float = 0.2
) -> AdaptiveClipByNorm:
    """Norm clipping whose bound tracks the ``target_quantile`` of update norms (not private).

    Args:
      initial_norm: the first round's bound.
      target_quantile: share of updates left unclipped once the bound settles (0.5 = median).
      learning_rate: the bound changes by at most ``exp(learning_rate)`` per round.
    """
    return AdaptiveClipByNorm(initial_norm, target_quantile, learning_rate)
