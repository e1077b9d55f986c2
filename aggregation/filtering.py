"""Filtering rules: find the malicious updates, drop or down-weight them, average the rest.

Each reduces the cohort to one row, like the rules of ``rules.py``, and reports per client
``selected`` (1 for the updates that made it into the average; FLTrust reports its trust score):

- ``signguard``: norm bounds plus clustering of sign statistics (Xu et al. 2022);
- ``dnc``: Divide-and-Conquer, SVD outlier scores on random coordinate subsets (Shejwalkar &
  Houmansadr 2021);
- ``flame``: HDBSCAN on cosine distances, clip to the median norm, adaptive noise (Nguyen et
  al. 2022);
- ``clipped_clustering``: clip to the median of past norms, two-cluster agglomerative
  clustering on cosine similarity, average the larger cluster (Li et al. 2023, in Blades);
- ``fltrust``: trust = ReLU(cosine to the server's own update on a small root set), updates
  rescaled to that update's norm (Cao et al. 2021).

Clustering uses scikit-learn (``MeanShift``, ``HDBSCAN``), imported on first use.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fedwarden.aggregation.base import (
    AggregationError,
    StepOutput,
    as_cohort,
    check_not_empty,
    check_num_byzantine,
    check_positive,
)
from fedwarden.aggregation.detection import (
    UNALIGNED_Z,
    alignment_z,
    excess_kurtosis,
    noise_like,
    pair_gaps,
    repeated_rows,
)

__all__ = [
    "DnC",
    "FLTrust",
    "Flame",
    "ClippedClustering",
    "SignGuard",
    "clipped_clustering",
    "dnc",
    "flame",
    "fltrust",
    "signguard",
]


def _selected_mean(
    updates: np.ndarray, weights: np.ndarray, keep: np.ndarray, **extra: Any
) -> StepOutput:
    """Unweighted mean of the kept rows, one output row carrying the cohort's total weight."""
    row = (
        updates[keep].astype(np.float64).mean(axis=0) if keep.any() else np.zeros(updates.shape[1])
    )
    per_client = {"selected": keep.astype(np.float64), **extra.pop("per_client", {})}
    return StepOutput(
        row.astype(updates.dtype).reshape(1, -1),
        np.array([weights.sum()]),
        extra.pop("state", None),
        measurements={"selected_count": int(keep.sum()), **extra.pop("measurements", {})},
        per_client=per_client,
    )


def _clip_to(updates: np.ndarray, norms: np.ndarray, bound: float) -> np.ndarray:
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return updates * scale.astype(updates.dtype)[:, None]


def _cosine_distances(updates: np.ndarray) -> np.ndarray:
    x = updates.astype(np.float64)
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-300)
    unit = x / norms[:, None]
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


class SignGuard:
    """SignGuard: keep the updates that pass a norm filter and fall in the main sign cluster.

    1. Norm filter: keep i with ``lower <= ||x_i|| / median_j ||x_j|| <= upper`` (0.1 and 3.0).
    2. Sign filter: on a random ``coordinate_fraction`` (10%) of the coordinates, each update's
       shares of positive, zero and negative signs form a 3-d feature; mean-shift clustering
       (bandwidth from the features' own spread) and the largest cluster is kept.
    3. The kept updates (in both) are clipped to the median norm and averaged.

    References:
      Xu, Huang, Xu and Qiu 2022, "SignGuard: Byzantine-robust Federated Learning through
      Collaborative Malicious Gradient Filtering", ICDCS 2022.

    Args:
      lower, upper: the norm filter's bounds relative to the median norm.
      coordinate_fraction: share of coordinates the sign statistics are computed on.
      seed: seeds the coordinate draws (the generator is the state).

    Assumption: honest updates are a majority and share a sign pattern the attackers' do not
    (sign-flipping, Gaussian and scaled updates are caught; attacks that keep the honest sign
    statistics, such as ALIE with a small z, are only bounded by the clip). Empty selection
    (never with an honest majority) gives a zero update.
    """

    name = "signguard"
    keeps_rows = False

    def __init__(
        self,
        lower: float = 0.1,
        upper: float = 3.0,
        coordinate_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.lower, self.upper = check_positive("lower", lower), check_positive("upper", upper)
        if self.lower >= 1.0 or self.upper <= 1.0:
            raise AggregationError(
                f"signguard needs lower < 1 < upper (bounds around the median norm). Received: "
                f"lower={lower!r}, upper={upper!r}."
            )
        if not 0.0 < coordinate_fraction <= 1.0:
            raise AggregationError(
                f"coordinate_fraction must be in (0, 1]. Received: {coordinate_fraction!r}."
            )
        self.coordinate_fraction = float(coordinate_fraction)
        self.seed = seed

    def init(self) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), 23])

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        from sklearn.cluster import MeanShift, estimate_bandwidth

        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        rng = copy.deepcopy(state if state is not None else self.init())
        norms = np.linalg.norm(updates.astype(np.float64), axis=1)
        median = float(np.median(norms))
        ratio = norms / max(median, 1e-300)
        by_norm = (ratio >= self.lower) & (ratio <= self.upper)
        columns = rng.choice(d, size=max(1, int(self.coordinate_fraction * d)), replace=False)
        signs = np.sign(updates[:, columns])
        features = np.stack([(signs > 0).mean(1), (signs == 0).mean(1), (signs < 0).mean(1)], 1)
        bandwidth = estimate_bandwidth(features, quantile=0.5) if k > 1 else 0.0
        if k > 1 and bandwidth > 0:
            labels = MeanShift(bandwidth=bandwidth).fit(features).labels_
            by_sign = labels == np.bincount(labels).argmax()
        else:
            by_sign = np.ones(k, bool)
        keep = by_norm & by_sign
        return _selected_mean(
            _clip_to(updates, norms, median), weights, keep, state=rng,
            measurements={"norm_rejected": int((~by_norm).sum()),
                          "sign_rejected": int((~by_sign).sum())},
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{self.name}(lower={self.lower!r}, upper={self.upper!r}, "
            f"coordinate_fraction={self.coordinate_fraction!r}, seed={self.seed!r})"
        )


class DnC:
    """Divide-and-Conquer: drop the updates that stick out along the top singular direction.

    ``iterations`` times: draw ``subsample`` coordinates, centre the updates on them, take the
    top right singular vector v, score each update by ``<x_i - mean, v>^2`` and keep the
    ``K - filter_fraction * f`` lowest. The output is the mean of the updates kept every time.

    References:
      Shejwalkar and Houmansadr 2021, "Manipulating the Byzantine: Optimizing Model Poisoning
      Attacks and Defenses for Federated Learning", NDSS 2021 (Algorithm 2; one iteration,
      10,000 coordinates and c = 1 as in the Blades benchmark's port of the authors' code).

    Args:
      num_byzantine: f, the malicious clients to tolerate.
      iterations: random subsets drawn per round.
      subsample: coordinates per subset (all when the model is smaller).
      filter_fraction: c, the multiple of f removed per iteration.
      seed: seeds the coordinate draws (the generator is the state).

    Assumption: at most f malicious and ``K - c * f >= 1``; the attackers' common direction
    (what any effective model-poisoning attack shares) dominates the top singular vector.
    """

    name = "dnc"
    keeps_rows = False

    def __init__(
        self,
        num_byzantine: int,
        iterations: int = 1,
        subsample: int = 10000,
        filter_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        for name, value in (("iterations", iterations), ("subsample", subsample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AggregationError(
                    f"{name} must be a positive integer. Received: {name}={value!r}."
                )
        self.iterations, self.subsample = iterations, subsample
        self.filter_fraction = check_positive("filter_fraction", filter_fraction)
        self.seed = seed

    def init(self) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), 29])

    def removed(self) -> int:
        return math.floor(self.filter_fraction * self.num_byzantine)

    def check(self, num_clients: int) -> None:
        if num_clients - self.removed() < 1:
            raise AggregationError(
                f"dnc removes filter_fraction*num_byzantine={self.removed()} updates per "
                f"iteration and keeps none. Received: num_clients={num_clients}; sample more "
                f"clients or lower num_byzantine."
            )

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        rng = copy.deepcopy(state if state is not None else self.init())
        keep = np.ones(k, bool)
        scores = np.zeros(k)
        for _ in range(self.iterations):
            columns = rng.choice(d, size=min(self.subsample, d), replace=False)
            part = updates[:, columns].astype(np.float64)
            part -= part.mean(axis=0)
            top = np.linalg.svd(part, full_matrices=False)[2][0]
            score = (part @ top) ** 2
            scores = np.maximum(scores, score)
            kept = np.zeros(k, bool)
            kept[np.argsort(score, kind="stable")[: k - self.removed()]] = True
            keep &= kept
        return _selected_mean(
            updates, weights, keep, state=rng, per_client={"outlier_score": scores}
        )

    def __repr__(self) -> str:
        return (
            f"{self.name}(num_byzantine={self.num_byzantine!r}, iterations={self.iterations!r}, "
            f"subsample={self.subsample!r}, filter_fraction={self.filter_fraction!r}, "
            f"seed={self.seed!r})"
        )


class Flame:
    """FLAME: HDBSCAN on cosine distances, clip to the median norm, add adaptive Gaussian noise.

    1. HDBSCAN over the pairwise cosine distances with ``min_cluster_size = K // 2 + 1``: only a
       majority cluster can form; updates outside it are dropped.
    2. The median norm S of all updates is the clip bound; kept updates are clipped to it and
       averaged.
    3. Gaussian noise with std ``noise_factor * S`` (lambda = 0.001, the paper's value for image
       classification) is added to the average; 0 turns it off.

    References:
      Nguyen et al. 2022, "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022.

    Args:
      noise_factor: lambda, noise std as a multiple of the clip bound; >= 0.
      seed: seeds the noise (the generator is the state).

    Assumption: fewer than half of the clients are malicious (the cluster must be a majority).
    Measurement ``clip_norm``. The noise is for backdoor removal, not differential privacy.
    """

    name = "flame"
    keeps_rows = False

    def __init__(self, noise_factor: float = 0.001, seed: int = 0) -> None:
        if isinstance(noise_factor, bool) or not isinstance(noise_factor, int | float):
            raise AggregationError(
                f"noise_factor must be a number >= 0. Received: {noise_factor!r}."
            )
        if noise_factor < 0:
            raise AggregationError(f"noise_factor must be >= 0. Received: {noise_factor!r}.")
        self.noise_factor = float(noise_factor)
        self.seed = seed

    def init(self) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), 31])

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        from sklearn.cluster import HDBSCAN

        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        rng = copy.deepcopy(state if state is not None else self.init())
        if k >= 3:
            labels = HDBSCAN(
                metric="precomputed", min_cluster_size=k // 2 + 1, min_samples=1,
                allow_single_cluster=True,
            ).fit(_cosine_distances(updates)).labels_  # fmt: skip
            clustered = labels >= 0
            keep = (
                labels == np.bincount(labels[clustered]).argmax() if clustered.any() else clustered
            )
        else:
            keep = np.ones(k, bool)
        norms = np.linalg.norm(updates.astype(np.float64), axis=1)
        bound = float(np.median(norms))
        out = _selected_mean(
            _clip_to(updates, norms, bound), weights, keep, state=rng,
            measurements={"clip_norm": bound},
        )  # fmt: skip
        if self.noise_factor > 0:
            noise = rng.normal(0.0, self.noise_factor * bound, size=d)
            out.updates = (out.updates + noise.astype(updates.dtype)).astype(updates.dtype)
        out.state = rng
        return out

    def __repr__(self) -> str:
        return f"{self.name}(noise_factor={self.noise_factor!r}, seed={self.seed!r})"


class ClippedClustering:
    """Clipped clustering: clip to the median of past norms, keep the larger of two clusters.

    Every norm seen so far is remembered (the state); updates are clipped to their median (in
    the first round, to the lower quartile: :data:`FIRST_ROUND_QUANTILE`), then split in two by
    agglomerative clustering (average linkage) on cosine distance, and the larger cluster is
    averaged.

    fedwarden's addition: an update that looks like noise is set aside first (counted as
    ``unaligned_count``): its largest |cosine| to the other updates is under ``4.5 / sqrt(d)``
    (a random direction's cosine to any fixed vector has standard deviation 1/sqrt(d)) and its
    coordinates are Gaussian in shape (``detection.noise_like``). Its norm does not enter the
    history. Without this a first cohort with a majority of noise updates (Gaussian attackers at
    40%) sets the clipping bound at a noise norm and the noise is averaged in unclipped. Honest
    updates are heavy tailed and share the loss's descent direction (docs/history/aggregation.md,
    "Noise majorities", measures how far from the lines they sit). When ``d`` is too small for the
    test or a single update arrives, nothing is set aside. A second: an update within
    ``detection.COPY_GAP`` of an earlier one in the cohort counts once (``copies_count``), so an
    attacker gains no weight by sending another client's update again (mimic) or one crafted vector
    from many clients; honest updates sit 0.3 and more apart on Fashion-MNIST.

    References:
      Li, Ngai and Voigt 2023, "An Experimental Study of Byzantine-Robust Aggregation Schemes in
      Federated Learning", IEEE Transactions on Big Data (ClippedClustering; in the Blades
      benchmark it stays at 83-88% on Fashion-MNIST under every attack up to 30% malicious).

    Assumption: fewer than half malicious, and the malicious updates closer in direction to
    each other than to the honest ones. State: the past norms, a float64 array.
    """

    name = "clipped_clustering"
    keeps_rows = False

    def init(self) -> np.ndarray:
        return np.zeros(0)

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k = updates.shape[0]
        self.check(k)
        norms = np.linalg.norm(updates.astype(np.float64), axis=1)
        dist = _cosine_distances(updates)
        # A copy counts once: the round goes on as if it had not come.
        copies = repeated_rows(pair_gaps(norms[:, None] * norms[None, :] * (1.0 - dist)))
        distinct = np.flatnonzero(~copies)
        alignment = alignment_z(1.0 - dist[np.ix_(distinct, distinct)], updates.shape[1])
        kurtosis = np.full(len(distinct), np.nan)
        low = np.flatnonzero(alignment < UNALIGNED_Z)  # the shape matters only there
        kurtosis[low] = excess_kurtosis(updates[distinct[low]])
        aligned = np.zeros(k, bool)
        aligned[distinct] = ~noise_like(alignment, kurtosis)
        past = np.asarray(state if state is not None else [], float)
        history = np.concatenate([past, norms[aligned]])
        # A first round has no past to trust: half its cohort may be attackers with large norms.
        quantile = 0.5 if past.size else FIRST_ROUND_QUANTILE
        bound = float(np.quantile(history, quantile)) if history.size else 0.0
        clipped = _clip_to(updates, norms, bound)
        candidates = np.flatnonzero(aligned)
        keep = np.zeros(k, bool)
        if candidates.size < 3:
            keep[candidates] = True
        else:
            keep[candidates[_larger_of_two_clusters(dist[np.ix_(candidates, candidates)])]] = True
        return _selected_mean(
            clipped,
            weights,
            keep,
            state=history,
            measurements={
                "clip_norm": bound,
                "unaligned_count": int((~aligned & ~copies).sum()),
                "copies_count": int(copies.sum()),
            },
        )

    def __repr__(self) -> str:
        return f"{self.name}()"


FIRST_ROUND_QUANTILE = 0.25
"""Clipped clustering's first bound: the lower quartile of the first round's norms, not their
median. At 40% malicious a first cohort of ten held five AGR-tailored attackers whose cluster won
the 5-5 tie; clipped to that round's median norm (10.6, honest ones near 1.9) their step killed
the network for good (accuracy 0.10 for 50 rounds); clipped to the lower quartile (1.4) the run
recovered (docs/history/aggregation.md, "Noise majorities")."""


def _larger_of_two_clusters(dist: np.ndarray) -> np.ndarray:
    """Average-linkage agglomerative clustering down to two clusters; the larger one's mask."""
    clusters = [[i] for i in range(len(dist))]
    while len(clusters) > 2:
        best, pair = np.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = dist[np.ix_(clusters[a], clusters[b])].mean()
                if link < best:
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    keep = np.zeros(len(dist), bool)
    keep[max(clusters, key=len)] = True
    return keep


ReferenceFn = Callable[[], np.ndarray]


class FLTrust:
    """FLTrust: weight each update by ReLU(cosine to the server's own update), rescale its norm.

    The server trains the current model on a small root set it holds (never client data) and
    gets ``g0``. Each client's trust is ``ReLU(cos(x_i, g0))``; its update is rescaled to
    ``||g0||``; the output is the trust-weighted average (zero when every trust is 0).

    References:
      Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust
      Bootstrapping", NDSS 2021 (root set of 100 examples).

    The server update is an explicit input: ``bind_reference(fn)`` with ``fn() -> (d,)``, called
    once per aggregation; ``fedwarden simulate`` binds one that trains on ``root_size`` examples
    of the held-out split. Calling it unbound raises AggregationError.

    Args:
      root_size: examples in the root set (100 as in the paper), read by whoever binds the
        reference.

    Assumption: the root set is clean and its update points roughly where honest ones do; no
    bound on the number of malicious clients. Per client: ``trust``.
    """

    name = "fltrust"
    keeps_rows = False

    def __init__(self, root_size: int = 100) -> None:
        if isinstance(root_size, bool) or not isinstance(root_size, int) or root_size < 1:
            raise AggregationError(
                f"root_size must be a positive integer. Received: root_size={root_size!r}."
            )
        self.root_size = root_size
        self._reference: ReferenceFn | None = None

    def bind_reference(self, reference: ReferenceFn) -> None:
        """Sets the callable returning the server's update on its root set for this round."""
        self._reference = reference

    def init(self) -> None:
        return None

    def check(self, num_clients: int) -> None:
        check_not_empty(self.name, num_clients)

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        k, d = updates.shape
        self.check(k)
        if self._reference is None:
            raise AggregationError(
                "fltrust needs the server's update on its root set and none is bound. Received: "
                "an unbound fltrust step; call bind_reference(fn) (fedwarden simulate does it "
                "from the held-out split), or choose another rule."
            )
        g0 = np.asarray(self._reference(), np.float64).reshape(-1)
        if g0.shape != (d,):
            raise AggregationError(
                f"fltrust's reference update has shape {g0.shape}; the updates have {d} values."
            )
        x = updates.astype(np.float64)
        norms = np.maximum(np.linalg.norm(x, axis=1), 1e-300)
        g0_norm = float(np.linalg.norm(g0))
        trust = np.maximum(0.0, (x @ g0) / (norms * max(g0_norm, 1e-300)))
        total = trust.sum()
        row = ((trust * g0_norm / norms) @ x) / total if total > 0 else np.zeros(d)
        return StepOutput(
            row.astype(updates.dtype).reshape(1, -1), np.array([weights.sum()]), None,
            measurements={"trusted_count": int((trust > 0).sum())},
            per_client={"trust": trust, "selected": (trust > 0).astype(float)},
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"{self.name}(root_size={self.root_size!r})"


signguard = SignGuard
dnc = DnC
flame = Flame
clipped_clustering = ClippedClustering
fltrust = FLTrust


def reference_steps(step: Any) -> list[Any]:
    """The steps in ``step`` (a chain, nested or not) that need a server reference update."""
    if hasattr(step, "bind_reference"):
        return [step]
    return [found for child in getattr(step, "steps", ()) for found in reference_steps(child)]
