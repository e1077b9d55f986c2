"""Norm clipping: a pre-step that keeps the K rows and bounds each update's L2 norm.

``clip_by_norm(max_norm)`` scales every row whose norm exceeds ``max_norm`` down to that norm;
rows within the bound pass unchanged. The bound a round uses comes from ``clip_norm(state)`` and
the next round's state from ``next_state(state, norms, weights)``: the fixed clip keeps no state,
an adaptive clip (``aggregation/dp.py``) subclasses ``ClipByNorm`` and keeps its norm estimator in
the state, so a checkpoint carries the estimate.

Example::

    step = chain(clip_by_norm(5.0), trimmed_mean(0.2))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedwarden.aggregation._kernels import row_norms
from fedwarden.aggregation.base import AggregationError, StepOutput, as_cohort

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
    return updates * scale.astype(updates.dtype)[:, None], norms


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
        if num_clients < 1:
            raise AggregationError(
                f"{self.name} needs at least one update. Received: num_clients={num_clients}."
            )

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
