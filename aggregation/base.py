"""The aggregation step contract: small steps over the round's update matrix that compose.

A step maps the cohort ``(updates (K, d), weights (K,))`` to a new cohort. Clipping keeps K rows,
a robust rule reduces to one row, central DP noise perturbs that row. A chain of steps is itself a
step, so ``chain(clip_by_norm(5.0), trimmed_mean(0.2), gaussian_noise(...))`` reads in the order the
data flows. Steps never mutate their inputs.

Round-to-round state (adaptive clip norm, centered-clipping momentum, a noise generator) is
explicit: ``init()`` returns it, ``__call__`` takes and returns it, so the coordinator checkpoints
it.

What a step observed leaves as measurements, one path to trust scoring and metrics:
``measurements`` holds scalars (e.g. ``clipped_count``) and ``per_client`` holds arrays of length
K aligned with the input rows (e.g. ``krum_score``, ``trimmed_share``, ``selected``).

A step that keeps its K rows in order (clipping, nearest-neighbour mixing) sets the class attribute
``keeps_rows = True``; ``chain`` reads it (``getattr(step, "keeps_rows", False)``) to know how many
rows the next step sees and whether that step's ``per_client`` arrays still line up with the
clients. Steps without the attribute are taken to reduce the cohort to one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class AggregationError(ValueError):
    """A step's assumptions do not hold for the cohort at hand (the message says which, and how to
    fix it)."""


@dataclass
class StepOutput:
    updates: np.ndarray  # (K', d)
    weights: np.ndarray  # (K',)
    state: Any = None
    measurements: dict[str, float] = field(default_factory=dict)
    per_client: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Step(Protocol):
    name: str

    def init(self) -> Any:
        """Initial round-to-round state (None for stateless steps)."""

    def check(self, num_clients: int) -> None:
        """Raise AggregationError if the step cannot run on a cohort of ``num_clients`` rows."""

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput: ...


class StatelessStep:
    """Base for steps without state; subclasses implement ``apply`` and, if needed, ``check``.

    ``__call__`` validates the cohort with ``as_cohort``, runs ``check`` and then ``apply``; the
    ``state`` argument is ignored and the output state is None. ``repr`` shows ``name`` and every
    public attribute, e.g. ``trimmed_mean(trim_fraction=0.1)``.
    """

    name = "step"
    keeps_rows = False

    def init(self) -> Any:
        return None

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        self.check(updates.shape[0])
        return self.apply(updates, weights)

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({params})"


def as_cohort(
    updates: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validates and normalises a cohort: a 2-D float matrix and non-negative weights of length K.

    Integer updates become float32; float updates keep their dtype and are not copied. Weights
    default to ones and become float64.
    """
    updates = np.asarray(updates)
    if updates.ndim != 2:
        raise AggregationError(f"updates must be a (K, d) matrix. Received shape {updates.shape}.")
    if not np.issubdtype(updates.dtype, np.floating):
        updates = updates.astype(np.float32)
    k = updates.shape[0]
    weights = np.ones(k, np.float64) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (k,):
        raise AggregationError(f"weights must have shape ({k},). Received shape {weights.shape}.")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise AggregationError(
            f"weights must be finite and non-negative. Received: weights={weights}; pass example "
            f"counts or trust multipliers (0 leaves a client out)."
        )
    return updates, weights


def check_not_empty(name: str, num_clients: int) -> None:
    """A one-line AggregationError naming ``name`` when the cohort has no update."""
    if num_clients < 1:
        raise AggregationError(
            f"{name} needs at least one update. Received: num_clients={num_clients}."
        )


def check_num_byzantine(value: Any) -> int:
    """``value`` as a count of malicious clients to tolerate, or a one-line AggregationError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise AggregationError(
            f"num_byzantine must be a non-negative integer, the number of malicious clients to "
            f"tolerate. Received: num_byzantine={value!r}."
        )
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a positive float, or a one-line AggregationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not value > 0:
        raise AggregationError(f"{name} must be a positive number. Received: {name}={value!r}.")
    return float(value)
