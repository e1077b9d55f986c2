"""Robust aggregation rules: steps that reduce the cohort ``(K, d)`` to one row ``(1, d)``.

Every builder is a small class with a lowercase alias (``median = Median``), so ``median()`` reads
like a function call and ``repr(step)`` is the call that rebuilds it. A rule returns one row in the
input dtype and one weight, the sum of the input weights; the rules that pick or mix a subset of
clients report per-client measurements aligned with the input rows. Rules never modify their
inputs.

Which rules use the client weights: ``mean`` (FedAvg) and ``geometric_median`` (RFA) are weighted;
the others treat every row alike, as in their papers, so a client cannot buy influence by
reporting a large example count.

WARNING: updates must be finite (the server's admission rejects NaN and Inf before aggregation).
A non-finite value makes the order statistics and distances of every rule meaningless.

Example::

    step = trimmed_mean(trim_fraction=0.2)
    out = step(updates, weights, step.init())
    aggregate = out.updates[0]                 # (d,)
    out.per_client["trimmed_share"]            # (K,)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fedwarden.aggregation import _kernels as kernels
from fedwarden.aggregation._kernels import gram, sq_distances
from fedwarden.aggregation.base import (
    AggregationError,
    StatelessStep,
    StepOutput,
    as_cohort,
    check_not_empty,
    check_num_byzantine,
    check_positive,
)

__all__ = [
    "Bulyan",
    "CenteredClipping",
    "FunctionRule",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NearestNeighborMixing",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "from_function",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "nearest_neighbor_mixing",
    "trimmed_mean",
]


def _one_row(row: np.ndarray, weights: np.ndarray, **kwargs: Any) -> StepOutput:
    return StepOutput(row.reshape(1, -1), np.array([weights.sum()]), **kwargs)


def _krum_scores(dist: np.ndarray, num_neighbors: int) -> np.ndarray:
    """Sum of each row's ``num_neighbors`` smallest squared distances to the other rows."""
    others = dist + np.diag(np.full(len(dist), np.inf))
    return np.sort(others, axis=1)[:, :num_neighbors].sum(axis=1)


def _ranking(scores: np.ndarray, updates: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Positions of ``scores`` from lowest to highest, ties broken by the rows' values.

    Scores within a relative 1e-9 of each other count as tied (Krum's mutual nearest pairs tie
    exactly when one neighbour is counted) and are ordered lexicographically by their update
    rows, so the choice does not depend on the order the clients arrived in. ``rows[i]`` is the
    row of ``updates`` that ``scores[i]`` belongs to (default: row i).
    """
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    tied = np.diff(ranked) <= 1e-9 * np.maximum(np.abs(ranked[1:]), np.abs(ranked[:-1]))
    if not tied.any():
        return order
    rows = np.arange(len(scores)) if rows is None else rows
    start = 0
    for end in range(1, len(order) + 1):  # runs of tied scores, usually none or one pair
        if end < len(order) and tied[end - 1]:
            continue
        if end - start > 1:
            group = order[start:end]
            order[start:end] = group[_lexicographic(updates[rows[group]])]
        start = end
    return order


def _lexicographic(values: np.ndarray) -> np.ndarray:
    """Order of the rows of ``values`` (a few rows) in lexicographic order of their entries."""
    differ = (values != values[0]).any(axis=0)
    if len(values) < 2 or not differ.any():
        return np.arange(len(values))
    first = int(np.argmax(differ))  # every row agrees before this column
    column = values[:, first]
    order = []
    for value in np.unique(column):
        members = np.flatnonzero(column == value)
        if len(members) > 1:
            members = members[_lexicographic(values[members, first + 1 :])]
        order.extend(members)
    return np.array(order)


class Mean(StatelessStep):
    """Weighted mean of the updates (FedAvg).

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
      Data".

    Assumption: every client is honest; one malicious update moves the mean arbitrarily far
    (breakdown point 0). Weights are typically example counts.
    """

    name = "mean"

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        total = weights.sum()
        if not total > 0:
            raise AggregationError(
                "mean needs weights with a positive sum. Received: sum(weights)=0.0; give at "
                "least one client a positive weight."
            )
        return _one_row((weights / total).astype(updates.dtype) @ updates, weights)


class Median(StatelessStep):
    """Coordinate-wise median (unweighted); the mean of the two middle values when K is even.

    References:
      Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".

    Assumption: fewer than half of the clients are malicious (breakdown point 1/2); each output
    coordinate then lies within the honest clients' range for that coordinate.
    """

    name = "median"

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        return _one_row(kernels.median(updates), weights)


class TrimmedMean(StatelessStep):
    """Coordinate-wise trimmed mean (unweighted).

    For each coordinate drops the ``floor(trim_fraction * K)`` largest and smallest values and
    averages the rest.

    References:
      Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".

    Args:
      trim_fraction: share of the cohort trimmed at each end, in ``[0, 0.5]``.
      num_byzantine: trim exactly this many values at each end instead (used when
        ``trim_fraction`` is not given; a chain string fills it from the run's Byzantine budget).
        With neither, 10% is trimmed at each end.

    Assumption: at most ``num_trimmed(K)`` malicious clients; each output coordinate then lies
    within the honest clients' range.

    Per client: ``trimmed_share``, the share of the client's coordinates that were trimmed (at
    either end). When several clients tie at a cut, the trimmed slots left are split evenly among
    them (each counts ``slots / tied``), so shares never depend on the client order and still sum
    to ``2 * trimmed_per_side``. Measurement: ``trimmed_per_side``.
    """

    name = "trimmed_mean"

    def __init__(
        self, trim_fraction: float | None = None, num_byzantine: int | None = None
    ) -> None:
        if num_byzantine is not None and (
            isinstance(num_byzantine, bool)
            or not isinstance(num_byzantine, int)
            or num_byzantine < 0
        ):
            raise AggregationError(
                f"num_byzantine must be a non-negative integer. Received: num_byzantine={num_byzantine!r}."
            )
        self.num_byzantine = num_byzantine
        if trim_fraction is None:
            self.trim_fraction = None if num_byzantine is not None else 0.1
            return
        if (
            isinstance(trim_fraction, bool)
            or not isinstance(trim_fraction, int | float)
            or not (0.0 <= trim_fraction <= 0.5)
        ):
            raise AggregationError(
                f"trim_fraction must be a number in [0, 0.5], the share trimmed at each end. "
                f"Received: trim_fraction={trim_fraction!r}."
            )
        self.trim_fraction = float(trim_fraction)

    def num_trimmed(self, num_clients: int) -> int:
        """Values dropped at each end of every coordinate for a cohort of ``num_clients``."""
        if self.trim_fraction is None:
            return self.num_byzantine
        return math.floor(self.trim_fraction * num_clients + 1e-9)

    def check(self, num_clients: int) -> None:
        super().check(num_clients)
        t = self.num_trimmed(num_clients)
        if 2 * t >= num_clients:
            raise AggregationError(
                f"{self!r} removes everything: it drops {t} values at each end of every "
                f"coordinate. Received: num_clients={num_clients}; trim fewer than "
                f"{(num_clients + 1) // 2} per side (trim_fraction or num_byzantine) or sample "
                "more clients."
            )

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        k, d = updates.shape
        t = self.num_trimmed(k)
        out, trimmed = kernels.trimmed_mean(updates, t)
        return _one_row(
            out,
            weights,
            measurements={"trimmed_per_side": t},
            per_client={"trimmed_share": trimmed / max(d, 1)},
        )


class Krum(StatelessStep):
    """Krum: the single update closest to its ``K - f - 2`` nearest neighbours.

    Each client's score is the sum of squared distances to its ``K - f - 2`` nearest other updates
    (all distances from one Gram matrix); the update with the lowest score is returned as is
    (tied scores: the lexicographically smallest update, so the client order does not matter).

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
      Descent".

    Args:
      num_byzantine: f, the number of malicious clients to tolerate.

    Assumption: at most f malicious clients and ``K > 2f + 2``. The output is always one client's
    update. Per client: ``krum_score``, ``selected`` (1 for the returned update).
    """

    name = "krum"

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def check(self, num_clients: int) -> None:
        super().check(num_clients)
        f = self.num_byzantine
        if num_clients <= 2 * f + 2:
            raise AggregationError(
                f"{self.name} needs num_clients > 2*num_byzantine + 2. Received: "
                f"num_clients={num_clients}, num_byzantine={f}; sample more clients or lower "
                f"num_byzantine."
            )

    def scores(self, updates: np.ndarray) -> np.ndarray:
        """Krum score of every row (float64, lower is more central)."""
        k = updates.shape[0]
        return _krum_scores(sq_distances(gram(updates)), k - self.num_byzantine - 2)

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        scores = self.scores(updates)
        best = int(_ranking(scores, updates)[0])
        selected = np.zeros(len(scores))
        selected[best] = 1.0
        return _one_row(
            updates[best].copy(),
            weights,
            per_client={"krum_score": scores, "selected": selected},
        )


class MultiKrum(Krum):
    """Multi-Krum: the uniform average of the ``num_selected`` updates with the lowest Krum scores.

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
      Descent".

    Args:
      num_byzantine: f, the number of malicious clients to tolerate.
      num_selected: m, how many updates to average; None means ``K - f``.

    Assumption: at most f malicious clients and ``K > 2f + 2``. With ``m = 1`` this is Krum.
    Per client: ``krum_score``, ``selected`` (1 for the averaged updates).
    """

    name = "multi_krum"

    def __init__(self, num_byzantine: int, num_selected: int | None = None) -> None:
        super().__init__(num_byzantine)
        if num_selected is not None and (
            isinstance(num_selected, bool)
            or not isinstance(num_selected, int | np.integer)
            or num_selected < 1
        ):
            raise AggregationError(
                f"num_selected must be a positive integer or None (K - num_byzantine). "
                f"Received: num_selected={num_selected!r}."
            )
        self.num_selected = None if num_selected is None else int(num_selected)

    def check(self, num_clients: int) -> None:
        super().check(num_clients)
        if self.num_selected is not None and self.num_selected > num_clients:
            raise AggregationError(
                f"multi_krum cannot select more updates than the cohort holds. Received: "
                f"num_selected={self.num_selected}, num_clients={num_clients}; lower num_selected "
                f"or leave it unset (K - num_byzantine)."
            )

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        k = updates.shape[0]
        m = k - self.num_byzantine if self.num_selected is None else self.num_selected
        scores = self.scores(updates)
        selected = np.zeros(k)
        selected[_ranking(scores, updates)[:m]] = 1.0
        row = (selected / m).astype(updates.dtype) @ updates
        return _one_row(row, weights, per_client={"krum_score": scores, "selected": selected})


class GeometricMedian(StatelessStep):
    """Weighted geometric median by the smoothed Weiszfeld algorithm (RFA).

    Iterates ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(eps, ||z - x_i||)`` from the
    weighted mean, until the weighted sum of distances improves by less than ``tol`` (relative) or
    after ``max_iter`` steps. Every iterate is a convex combination of the rows, so all distances
    come from one Gram matrix and each step costs O(K^2), whatever d is.

    References:
      Pillutla, Kakade and Harchaoui 2022, "Robust Aggregation for Federated Learning".

    Args:
      eps: smoothing (nu in the paper), a floor on the distances; > 0.
      max_iter: most Weiszfeld steps.
      tol: relative improvement of the objective under which it stops.

    Assumption: malicious clients hold less than half of the total weight (breakdown point 1/2).
    Measurements: ``iterations``, ``objective`` (weighted sum of distances to the output).
    """

    name = "geometric_median"

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-8) -> None:
        self.eps = check_positive("eps", eps)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise AggregationError(
                f"max_iter must be a positive integer. Received: max_iter={max_iter!r}."
            )
        self.max_iter = max_iter
        if not isinstance(tol, int | float) or tol < 0:
            raise AggregationError(f"tol must be a number >= 0. Received: tol={tol!r}.")
        self.tol = float(tol)

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        total = weights.sum()
        if not total > 0:
            raise AggregationError(
                "geometric_median needs weights with a positive sum. Received: sum(weights)=0.0; "
                "give at least one client a positive weight."
            )
        g = gram(updates)
        sq = np.diag(g)
        alpha = weights / total

        def distances(c: np.ndarray) -> np.ndarray:
            gc = g @ c
            return np.sqrt(np.maximum(sq - 2.0 * gc + c @ gc, 0.0))

        coef = alpha
        dist = distances(coef)
        objective = float(alpha @ dist)
        iterations = 0
        while iterations < self.max_iter:
            iterations += 1
            beta = alpha / np.maximum(self.eps, dist)
            coef = beta / beta.sum()
            dist = distances(coef)
            previous, objective = objective, float(alpha @ dist)
            if abs(previous - objective) <= self.tol * objective:
                break
        return _one_row(
            coef.astype(updates.dtype) @ updates,
            weights,
            measurements={"iterations": iterations, "objective": objective},
        )


class Bulyan(StatelessStep):
    """Bulyan: iterated Krum picks ``theta = K - 2f`` updates, then a coordinate-wise trimmed mean.

    Krum (``max(1, n - f - 2)`` neighbours among the n remaining) picks one update at a time until
    ``theta`` are selected; then, for each coordinate, the ``beta = theta - 2f`` selected values
    closest to the selected values' median are averaged (ties: the smaller value).

    References:
      El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
      Byzantium".

    Args:
      num_byzantine: f, the number of malicious clients to tolerate.

    Assumption: at most f malicious clients and ``K >= 4f + 3``; each output coordinate lies
    within the honest clients' range. Per client: ``selected`` (1 for the theta selected),
    ``krum_score`` (of the first Krum round, over the whole cohort).
    """

    name = "bulyan"

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def check(self, num_clients: int) -> None:
        super().check(num_clients)
        f = self.num_byzantine
        if num_clients < 4 * f + 3:
            raise AggregationError(
                f"bulyan needs num_clients >= 4*num_byzantine + 3. Received: "
                f"num_clients={num_clients}, num_byzantine={f}; sample more clients or lower "
                f"num_byzantine."
            )

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        k = updates.shape[0]
        f = self.num_byzantine
        theta = k - 2 * f
        dist = sq_distances(gram(updates))
        remaining = np.arange(k)
        chosen: list[int] = []
        first_scores = None
        for _ in range(theta):  # one Krum round per selected client, O(K^2 log K) each
            n = len(remaining)
            scores = _krum_scores(dist[np.ix_(remaining, remaining)], min(max(1, n - f - 2), n - 1))
            if first_scores is None:
                first_scores = scores
            pick = int(_ranking(scores, updates, remaining)[0])
            chosen.append(int(remaining[pick]))
            remaining = np.delete(remaining, pick)
        rows = np.sort(chosen)
        out = kernels.bulyan_mean(updates, rows, f)
        selected = np.zeros(k)
        selected[rows] = 1.0
        return _one_row(out, weights, per_client={"selected": selected, "krum_score": first_scores})


class CenteredClipping:
    """Centered clipping around the previous aggregate (stateful).

    Starting from the previous round's aggregate ``v`` (zeros in the first round), repeats
    ``iterations`` times ``v <- v + mean_i (x_i - v) * min(1, radius / ||x_i - v||)``. The new
    ``v`` is the output and the next state. Unweighted, as in the paper. Every iterate is the
    previous aggregate plus a combination of the rows, so distances come from one Gram matrix of
    the rows and the previous aggregate.

    References:
      Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust Optimization".

    Args:
      radius: tau, the clipping radius around the current centre; > 0.
      iterations: L, clipping iterations per round (the paper finds 1 enough with momentum).

    Assumption: fewer than half of the clients are malicious and the honest updates change slowly
    from round to round (clients send momentum); the aggregate then moves by at most ``radius``
    per iteration towards each malicious update. State: the previous aggregate, a ``(d,)`` array
    in the input dtype, or None before the first round. Per client: ``clipped`` (in the last
    iteration); measurement ``clipped_count``.
    """

    name = "centered_clipping"
    keeps_rows = False

    def __init__(self, radius: float, iterations: int = 1) -> None:
        self.radius = check_positive("radius", radius)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise AggregationError(
                f"iterations must be a positive integer. Received: iterations={iterations!r}."
            )
        self.iterations = iterations

    def init(self) -> None:
        return None

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        centre = None if state is None else np.asarray(state)
        if centre is not None and centre.shape != (d,):
            raise AggregationError(
                f"centered_clipping's state must be the previous aggregate, shape ({d},). "
                f"Received shape {centre.shape}; pass the state returned by init() or by the "
                f"previous call (a model of another size needs a fresh init())."
            )
        g = gram(updates, centre)
        gx, sq = g[:k, :k], np.diag(g)[:k]
        p = g[:k, k] if centre is not None else np.zeros(k)  # x_i . v0
        q = g[k, k] if centre is not None else 0.0  # |v0|^2
        a, c = 1.0, np.zeros(k)  # v = a * v0 + c @ X
        scale = np.ones(k)
        for _ in range(self.iterations):
            gc = gx @ c
            sq_dist = sq - 2.0 * (a * p + gc) + a * a * q + 2.0 * a * (c @ p) + c @ gc
            dist = np.sqrt(np.maximum(sq_dist, 0.0))
            scale = np.minimum(1.0, self.radius / np.maximum(dist, np.finfo(float).tiny))
            s = scale.mean()
            a, c = a * (1.0 - s), c * (1.0 - s) + scale / k
        out = c.astype(updates.dtype) @ updates
        if centre is not None:
            out += (a * centre).astype(updates.dtype)
        clipped = (scale < 1.0).astype(np.float64)
        return StepOutput(
            out.reshape(1, d),
            np.array([weights.sum()]),
            state=out.copy(),
            measurements={"clipped_count": int(clipped.sum())},
            per_client={"clipped": clipped},
        )

    def __repr__(self) -> str:
        return f"{self.name}(radius={self.radius!r}, iterations={self.iterations!r})"


class NearestNeighborMixing(StatelessStep):
    """Nearest-neighbour mixing (NNM), a pre-step that keeps the K rows.

    Replaces each update by the uniform mean of its ``K - f`` nearest updates (itself included),
    from one Gram matrix. Put it before a robust rule: ``chain(nearest_neighbor_mixing(f),
    krum(f))``. Weights pass through unchanged.

    References:
      Allouah et al. 2023, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under
      Heterogeneity".

    Args:
      num_byzantine: f, the number of malicious clients to tolerate.

    Assumption: at most f malicious clients, ``K > f`` (the rule after it states its own bound,
    usually ``K > 2f``); it shrinks the spread of honest updates under heterogeneity.
    """

    name = "nearest_neighbor_mixing"
    keeps_rows = True

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def check(self, num_clients: int) -> None:
        super().check(num_clients)
        if num_clients <= self.num_byzantine:
            raise AggregationError(
                f"nearest_neighbor_mixing needs num_clients > num_byzantine. Received: "
                f"num_clients={num_clients}, num_byzantine={self.num_byzantine}; sample more "
                f"clients or lower num_byzantine."
            )

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        k = updates.shape[0]
        n = k - self.num_byzantine
        dist = sq_distances(gram(updates))
        np.fill_diagonal(dist, -1.0)  # each row is its own nearest neighbour
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :n]
        mixing = np.zeros((k, k), updates.dtype)
        np.put_along_axis(mixing, nearest, 1.0 / n, axis=1)
        return StepOutput(mixing @ updates, weights.copy())


class FunctionRule(StatelessStep):
    """Wraps a plain function ``fn(updates, weights) -> (d,) vector`` as a rule.

    The function sees a read-only view of the updates (so it cannot change the caller's matrix) and
    the weights; its result is cast to the input dtype.

    Args:
      fn: the aggregation function.
      name: the step's name in measurements and ``repr``; defaults to the function's name.
    """

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str | None = None):
        if not callable(fn):
            raise AggregationError(f"from_function needs a callable. Received: {fn!r}.")
        self._fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def apply(self, updates: np.ndarray, weights: np.ndarray) -> StepOutput:
        view = updates.view()
        view.flags.writeable = False
        result = np.asarray(self._fn(view, weights.copy()))
        d = updates.shape[1]
        if result.size != d or result.ndim > 2 or (result.ndim == 2 and result.shape[0] != 1):
            raise AggregationError(
                f"aggregation function {self.name} must return a vector of shape ({d},), one "
                f"value per column. Received shape {result.shape}."
            )
        return _one_row(result.astype(updates.dtype, copy=True), weights)

    def __repr__(self) -> str:
        return f"from_function({self.name})"


mean = Mean
median = Median
trimmed_mean = TrimmedMean
krum = Krum
multi_krum = MultiKrum
geometric_median = GeometricMedian
bulyan = Bulyan
centered_clipping = CenteredClipping
nearest_neighbor_mixing = NearestNeighborMixing
from_function = FunctionRule

# Used by tests and the benchmark to report which kernel ran.
ORDER_KERNEL = kernels.PATH
