"""Pre-aggregation steps that make any robust rule stronger: bucketing, ARC, client momentum.

Each sits in front of a rule in a chain (``bucketing+median``, ``arc+multi_krum``,
``client_momentum+centered_clipping``). Bucketing and ARC bound what heterogeneity and a few
large updates do to the rule after them; client momentum makes each client's update average
out its noise over rounds, so the honest updates agree and attackers stand out (Karimireddy et
al. 2021: it is what lets centered clipping hold).

Example::

    step = chain(bucketing(bucket_size=2, num_byzantine=2), median())
    out = step(updates, weights, step.init())
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedwarden.aggregation.base import (
    AggregationError,
    StepOutput,
    as_cohort,
    check_not_empty,
    check_num_byzantine,
)

__all__ = [
    "AdaptiveRobustClipping",
    "Bucketing",
    "ClientMomentum",
    "adaptive_robust_clipping",
    "arc_clipped_count",
    "bucketing",
    "client_momentum",
]


class Bucketing:
    """Bucketing: shuffle the cohort, average it in buckets of ``bucket_size``, pass the buckets on.

    The K updates are randomly permuted and split into ``ceil(K / s)`` buckets of s (the last
    may be smaller); each bucket's unweighted mean becomes one row, with the sum of its
    members' weights. The rule after it sees fewer, more alike rows: averaging s honest updates
    divides their spread by about sqrt(s), which is what lets median-type rules hold under
    heterogeneity, at the price of up to f corrupted buckets out of ceil(K / s).

    References:
      Karimireddy, He and Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing", ICLR 2022 (s = 2 in their experiments).

    Args:
      bucket_size: s, updates per bucket; >= 1 (1 only shuffles).
      num_byzantine: f, the malicious clients to tolerate.
      seed: seeds the permutations (the generator lives in the state, so runs repeat).

    Assumption: the corrupted buckets stay a minority for the rule after it, ``2 * f * s < K``
    (the paper's delta * s <= delta_max with delta_max = 1/2); ``check`` enforces it. State: the
    permutation generator.
    """

    name = "bucketing"
    keeps_rows = False

    def __init__(self, bucket_size: int = 2, num_byzantine: int = 0, seed: int = 0) -> None:
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise AggregationError(
                f"bucket_size must be a positive integer. Received: bucket_size={bucket_size!r}."
            )
        self.bucket_size = bucket_size
        self.num_byzantine = check_num_byzantine(num_byzantine)
        self.seed = seed

    def init(self) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), 17])

    def output_rows(self, num_clients: int) -> int:
        """Rows the next step sees: one per bucket."""
        return math.ceil(num_clients / self.bucket_size)

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)
        f, s = self.num_byzantine, self.bucket_size
        if 2 * f * s >= num_clients and f > 0:
            most = max(math.ceil(num_clients / (2 * f)) - 1, 0)
            raise AggregationError(
                f"bucketing needs 2*num_byzantine*bucket_size < num_clients, so that corrupted "
                f"buckets stay a minority. Received: num_clients={num_clients}, "
                f"num_byzantine={f}, bucket_size={s}; use bucket_size <= {most} (1 turns "
                f"bucketing off) or sample more clients."
            )

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k = updates.shape[0]
        self.check(k)
        rng = copy.deepcopy(state if state is not None else self.init())
        order = rng.permutation(k)
        groups = [order[i : i + self.bucket_size] for i in range(0, k, self.bucket_size)]
        rows = np.stack([updates[g].mean(axis=0) for g in groups]).astype(updates.dtype)
        bucket_weights = np.array([weights[g].sum() for g in groups])
        bucket_of = np.empty(k)
        for b, g in enumerate(groups):
            bucket_of[g] = b
        return StepOutput(
            rows, bucket_weights, state=rng, measurements={"buckets": len(groups)},
            per_client={"bucket": bucket_of},
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{self.name}(bucket_size={self.bucket_size!r}, num_byzantine={self.num_byzantine!r}, "
            f"seed={self.seed!r})"
        )


def arc_clipped_count(num_clients: int, num_byzantine: int) -> int:
    """ARC's k = floor(2 * (f / n) * (n - f)): how many of the largest updates it clips."""
    if num_clients < 1:
        return 0
    return math.floor(2.0 * num_byzantine / num_clients * (num_clients - num_byzantine))


class AdaptiveRobustClipping:
    """ARC: clip the k largest updates to the norm of the (k+1)-th largest, k = floor(2f(n-f)/n).

    A pre-step that keeps the K rows: no threshold to tune, it follows the cohort's own norms.
    The k = ``arc_clipped_count(K, f)`` updates with the largest L2 norms are scaled down to the
    norm of the largest one left alone; the others pass unchanged.

    References:
      Allouah, Guerraoui, Gupta, Pinot and Rizk 2024, "Boosting Robustness by Clipping
      Gradients in Distributed Learning" (Adaptive Robust Clipping).

    Args:
      num_byzantine: f, the malicious clients to tolerate.

    Assumption: ``f < K / 2`` (then k < K and a norm to clip to exists); the rule after it
    states its own bound. Per client: ``clipped``; measurement ``clip_norm``.
    """

    name = "arc"
    keeps_rows = True

    def __init__(self, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    def init(self) -> None:
        return None

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)
        if 2 * self.num_byzantine >= num_clients:
            raise AggregationError(
                f"arc needs num_byzantine < num_clients / 2. Received: num_clients={num_clients}, "
                f"num_byzantine={self.num_byzantine}; sample more clients or lower num_byzantine."
            )

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k = updates.shape[0]
        self.check(k)
        norms = np.linalg.norm(updates.astype(np.float64), axis=1)
        clip = arc_clipped_count(k, self.num_byzantine)
        clipped = np.zeros(k)
        out = updates.copy()
        bound = float(norms.max()) if k else 0.0
        if clip:
            order = np.argsort(-norms, kind="stable")
            bound = float(norms[order[clip]])
            top = order[:clip]
            scale = np.where(norms[top] > bound, bound / np.maximum(norms[top], 1e-300), 1.0)
            out[top] = updates[top] * scale.astype(updates.dtype)[:, None]
            clipped[top] = (norms[top] > bound).astype(float)
        return StepOutput(
            out, weights.copy(), None,
            measurements={"clip_norm": bound, "clipped_count": int(clipped.sum())},
            per_client={"clipped": clipped},
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"{self.name}(num_byzantine={self.num_byzantine!r})"


class ClientMomentum:
    """Client (worker) momentum kept by the server: each client's update is its momentum.

    For every client in the cohort, ``m_i <- beta * m_i + (1 - beta) * x_i`` and the row sent on
    is ``m_i``; a client seen for the first time starts at ``m_i = x_i`` (with sampled cohorts a
    client is seen every few rounds, and a zero start would shrink its first updates). Momentum
    averages each client's noise over its rounds, so honest rows agree more and a time-coupled
    attack has to persist to matter.

    References:
      Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust Optimization",
      ICML 2021 (worker momentum, beta = 0.9; with centered clipping it holds on non-iid MNIST
      under every attack they tried).
      Allouah et al. 2023, "Fixing by Mixing" (momentum before NNM).

    Args:
      beta: momentum coefficient in [0, 1); 0.9 as in the paper.

    Needs the client ids (``uses_client_ids``): the chain forwards ``client_ids``, which the
    coordinator passes. Without ids (a what-if call, e.g. an attack probing the rule) the rows
    pass unchanged and the state is kept. State: ``{client_id: momentum (d,)}``, which the
    coordinator's checkpoint carries.
    """

    name = "client_momentum"
    keeps_rows = True
    uses_client_ids = True

    def __init__(self, beta: float = 0.9) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta < 1.0:
            raise AggregationError(f"beta must be a number in [0, 1). Received: beta={beta!r}.")
        self.beta = float(beta)

    def init(self) -> dict[str, np.ndarray]:
        return {}

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(
        self,
        updates: np.ndarray,
        weights: np.ndarray,
        state: Any,
        client_ids: Sequence[str] | None = None,
    ) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        momenta = dict(state or {})
        if client_ids is None:
            return StepOutput(updates.copy(), weights.copy(), momenta)
        if len(client_ids) != k:
            raise AggregationError(
                f"client_momentum needs one client id per update. Received: {len(client_ids)} ids "
                f"for {k} updates."
            )
        out = np.empty_like(updates)
        for row, cid in enumerate(client_ids):
            previous = momenta.get(cid)
            if previous is not None and previous.shape != (d,):
                raise AggregationError(
                    f"client_momentum's state for {cid!r} has shape {previous.shape}, the updates "
                    f"have {d} values; start from init() for a model of another size."
                )
            x = updates[row]
            m = x.copy() if previous is None else self.beta * previous + (1 - self.beta) * x
            momenta[cid] = out[row] = m.astype(updates.dtype)
        return StepOutput(out, weights.copy(), momenta, measurements={"clients": len(momenta)})

    def __repr__(self) -> str:
        return f"{self.name}(beta={self.beta!r})"


bucketing = Bucketing
adaptive_robust_clipping = AdaptiveRobustClipping
client_momentum = ClientMomentum
