"""Signals across clients and across rounds, for the anomaly score (``scoring.py``).

numpy in, numpy out, no I/O. The per-round cohort statistics of ``scoring.client_metrics`` see
one round at a time and each client on its own; the attacks built to hide (ALIE, Min-Max,
Min-Sum) sit inside the honest spread on every such statistic. What gives them away is how the
clients relate to each other and to their own past:

- **collusion** (after FoolsGold, Fung et al. 2020, which uses the largest pairwise cosine):
  each client's relative distance to its nearest other client, :func:`nearest_pair_gap`.
  Honest clients train on different data with different SGD noise, so no two of them send
  near-identical updates; colluders who send one crafted vector, or jointly crafted ones, do.
- **noise**: each update's largest |cosine| to another update in units of a random direction's
  spread, :func:`alignment_z`, and the excess kurtosis of its coordinates,
  :func:`excess_kurtosis`. Noise (Gaussian attackers) and random directions have no partner
  beyond chance and Gaussian coordinates; honest updates are heavy tailed, and most share the
  loss's descent direction with some other client (:func:`noise_like`).
- **cluster membership** (FLAME, Nguyen et al. 2022): HDBSCAN on the cohort's cosine distances
  with a minimum cluster size of a majority, :func:`cluster_outliers`; a client outside the
  majority cluster is an outlier.
- **consistency with its own history** (FLDetector, Zhang et al. 2022; FLANDERS, Gabrielli et al.
  2023): :class:`HistoryForecast` forecasts each client's next deviation from the cohort's
  reference from the deviations it sent before, on a :class:`CountSketch` of the update (512
  numbers by default, whatever the model size), and reports how far the new deviation lands
  from the forecast.
- **association with the flagged clients** (FoolsGold's similarity across the whole history, and
  its use of it against sybils): :meth:`HistoryForecast.association` measures how closely each
  client's forecast deviation follows those of the clients already flagged, against the clients
  not flagged. Attackers poisoned alike (label noise, a backdoor, DBA's trigger pieces) keep
  deviating the same way in whichever rounds they are sampled, so once some of them are flagged
  the others stand out among the unflagged ones, including those not sampled since.

State is explicit: :meth:`HistoryForecast.state_dict` returns plain arrays for the coordinator's
checkpoint, and :meth:`HistoryForecast.load_state_dict` restores it.

References:
    Fung, Yoon, Beschastnikh. The Limitations of Federated Learning in Sybil Settings. RAID 2020.
    Nguyen et al. FLAME: Taming Backdoors in Federated Learning. USENIX Security 2022.
    Zhang, Cao, Jia, Gong. FLDetector: Defending Federated Learning Against Model Poisoning
    Attacks via Detecting Malicious Clients. KDD 2022.
    Gabrielli, Belli, Matrullo, Miozzo, Tolomei. A Byzantine-Resilient Aggregation Scheme for
    Federated Learning via Matrix Autoregression on Client Updates (FLANDERS). 2023.
    Charikar, Chen, Farach-Colton. Finding Frequent Items in Data Streams. ICALP 2002.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from scipy.sparse.csgraph import connected_components

from fedwarden.aggregation import _kernels

DEFAULT_SKETCH_DIM = 512
"""Numbers kept per client by :class:`HistoryForecast` (2 KB of float32 per client)."""

MAD_TO_SIGMA = 1.4826
"""The MAD of a normal distribution times this is its standard deviation."""
_MIN_CLUSTER_COHORT = 4  # below this a "majority cluster" says nothing


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities from a Gram matrix (0 where either vector is zero)."""
    gram = np.asarray(gram, np.float64)
    norm = np.sqrt(np.maximum(np.diag(gram), 0.0))
    denom = np.outer(norm, norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def median_cosine_to_others(pairwise: np.ndarray) -> np.ndarray:
    """Each client's median cosine similarity to the other clients' updates.

    Unlike the cosine to the cohort's median, the client's own update takes no part in what it
    is compared with (a coordinate-wise median of 10 rows is partly made of each row, so a
    random direction has cosine about 0.15 to it and a sign flip may have a positive one), and
    the median keeps the comparison on the honest side while attackers are fewer than half the
    other clients. NaN for a client alone.

    Args:
        pairwise: ``(K, K)`` cosine similarities (:func:`cosine_matrix`).

    Returns:
        Float64 array of length K.
    """
    pairwise = np.asarray(pairwise, np.float64)
    k = pairwise.shape[0]
    if k < 2:
        return np.full(k, np.nan)
    others = pairwise[~np.eye(k, dtype=bool)].reshape(k, k - 1)
    return np.median(others, axis=1)


UNALIGNED_Z = 4.5
"""Below this ``alignment_z`` an update's direction cannot be told from a random one: a random
direction exceeds it against one of 9 others with probability 6e-5 (99 others: 7e-4). On
Fashion-MNIST (d = 56,714) honest updates measured 32 and up at Dirichlet 0.1 without attack
(50 rounds) and 7.2 and up with 40% Gaussian attackers (one of four honest updates among six
noise ones); noise and random directions 3.6 and under (docs/history/aggregation.md, "Noise
majorities").
But an honest client whose classes no other client in a small cohort has sends an update
orthogonal to all of theirs: on digits (d = 4,810, 5 per round) one measured 4.0. Hence the
second condition of :func:`noise_like`."""

NOISE_KURTOSIS = 1.0
"""A Gaussian's coordinates have excess kurtosis 0 (standard error sqrt(24/n) over n of them,
0.02 on :data:`KURTOSIS_SAMPLE`); honest updates are heavy tailed: 5.6 and up on digits, 27 and up
on Fashion-MNIST at Dirichlet 0.1."""

KURTOSIS_SAMPLE = 65_536
"""Coordinates (evenly strided) on which :func:`excess_kurtosis` is measured, whatever d."""

MAX_UNALIGNED_COSINE = 0.5
"""Where ``UNALIGNED_Z / sqrt(d)`` reaches this cosine (d <= 81) chance alone can align two
vectors, so no update is called unaligned."""

COPY_GAP = 1e-3
"""Updates closer than this :func:`pair_gaps` distance are copies of one another. Honest updates
are 0.3 and more apart on Fashion-MNIST; copies and one crafted vector sent twice are 0 up to
float32 rounding."""

COPY_HISTORY_MARGIN = 0.2
"""How much more consistent with its own past an original is than its copies
(:func:`copied_originals`). Measured on Fashion-MNIST (Dirichlet 0.5, 50 rounds, seed 0): of the
mimic attack's 47 victims 41 had a history, 37 of them with forecast errors of 0.13-0.64, and its
copiers' errors were 0.36-1.22 (99% of them 0.5 or more); with 0.2 the run made again recognised
27 of the 47 victims, and no attacker qualified in the 272 groups of the eight attacks that send
one crafted vector (replayed from the runs' ledgers)."""


def excess_kurtosis(updates: np.ndarray) -> np.ndarray:
    """Each row's excess kurtosis over its coordinates (at most :data:`KURTOSIS_SAMPLE` of them,
    evenly strided); NaN for a constant row. About 0 for Gaussian noise and random directions."""
    updates = np.asarray(updates)
    step = max(1, updates.shape[1] // KURTOSIS_SAMPLE)
    out = np.full(updates.shape[0], np.nan)
    for i, row in enumerate(updates):
        x = np.asarray(row[::step], np.float64)
        squared = (x - x.mean()) ** 2
        m2 = float(np.mean(squared))
        if m2 > 0 and np.isfinite(m2):
            out[i] = float(np.mean(squared * squared)) / (m2 * m2) - 3.0
    return out


def noise_like(alignment: np.ndarray, kurtosis: np.ndarray) -> np.ndarray:
    """Mask of the updates that look like noise: no more aligned with any other update than
    chance allows (:data:`UNALIGNED_Z`) and Gaussian in shape (:data:`NOISE_KURTOSIS`). NaN in
    either (a cohort of one, a small d, a constant row) is not noise-like."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(alignment) < UNALIGNED_Z) & (np.abs(kurtosis) < NOISE_KURTOSIS)


def alignment_z(pairwise: np.ndarray, dim: int) -> np.ndarray:
    """Each update's largest |cosine| to another update, times ``sqrt(dim)``.

    A random direction's cosine to any fixed vector has standard deviation ``1/sqrt(d)``, so
    this is a z-score against chance: under :data:`UNALIGNED_Z` the update is as unrelated to
    every other update as noise is. NaN for a client alone, or when ``dim`` is too small for
    chance to be told apart (:data:`MAX_UNALIGNED_COSINE`).

    Args:
        pairwise: ``(K, K)`` cosine similarities (:func:`cosine_matrix`).
        dim: the updates' dimension d.

    Returns:
        Float64 array of length K.
    """
    pairwise = np.asarray(pairwise, np.float64)
    k = pairwise.shape[0]
    scale = math.sqrt(max(dim, 1))
    if k < 2 or UNALIGNED_Z / scale >= MAX_UNALIGNED_COSINE:
        return np.full(k, np.nan)
    others = np.abs(pairwise[~np.eye(k, dtype=bool)].reshape(k, k - 1))
    return others.max(axis=1) * scale


def pair_gaps(gram: np.ndarray) -> np.ndarray:
    """The ``(K, K)`` relative distances ``|x_i - x_j| / (|x_i| + |x_j|)``, in [0, 1].

    0 for two identical updates, about 0.7 for orthogonal ones of equal norm, 1 for opposite
    ones. Unlike the cosine it does not call a scaled copy of an honest update (model
    replacement) a twin of it: ``10 x`` and ``x`` are 0.82 apart. The diagonal, and pairs of
    zero vectors, are NaN.
    """
    gram = np.asarray(gram, np.float64)
    sq = np.diag(gram)
    norm = np.sqrt(np.maximum(sq, 0.0))
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    denom = norm[:, None] + norm[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(denom > 0, dist / np.where(denom > 0, denom, 1.0), np.nan)
    np.fill_diagonal(gap, np.nan)
    return np.clip(gap, 0.0, 1.0)


def nearest_pair_gap(gram: np.ndarray, copied: np.ndarray | None = None) -> np.ndarray:
    """Each client's relative distance to its nearest other client (:func:`pair_gaps`).

    NaN for a client alone or whose pairs are all zero vectors. For the rows that ``copied``
    marks (:func:`copied_originals`), the copies of the row are left out: they are not
    evidence against the update they copy.

    Args:
        gram: ``(K, K)`` Gram matrix of the updates.
        copied: ``(K,)`` booleans, or None.

    Returns:
        Float64 array of length K.
    """
    return nearest_gap(pair_gaps(gram), copied)


def nearest_gap(gaps: np.ndarray, copied: np.ndarray | None = None) -> np.ndarray:
    """:func:`nearest_pair_gap` from the :func:`pair_gaps` matrix (not modified)."""
    if len(gaps) < 2:
        return np.full(len(gaps), np.nan)
    gap = np.array(gaps, np.float64)
    if copied is not None:
        for i in np.flatnonzero(copied):
            gap[i, copy_pairs(gap[i])] = np.nan
    gap = np.where(np.isnan(gap), np.inf, gap).min(axis=1)
    return np.where(np.isfinite(gap), gap, np.nan)


def copy_pairs(gaps: np.ndarray) -> np.ndarray:
    """``(K, K)`` booleans: the pairs of :func:`pair_gaps` within :data:`COPY_GAP` (NaN is not)."""
    return np.nan_to_num(np.asarray(gaps, np.float64), nan=1.0) < COPY_GAP


def repeated_rows(gaps: np.ndarray) -> np.ndarray:
    """The rows within :data:`COPY_GAP` of an earlier row: every copy but the first of a group.

    Args:
        gaps: ``(K, K)`` :func:`pair_gaps` of the updates.

    Returns:
        ``(K,)`` booleans, True for a row that repeats an earlier one.
    """
    return np.tril(copy_pairs(gaps), k=-1).any(axis=1)


def copied_originals(
    gaps: np.ndarray,
    suspect: np.ndarray,
    history_error: np.ndarray,
    own_rounds: np.ndarray | None = None,
    margin: float = COPY_HISTORY_MARGIN,
) -> np.ndarray:
    """The honest updates that other clients copied (the mimic attack).

    Copies of one update are a group whose pairwise :func:`pair_gaps` are under
    :data:`COPY_GAP`; every member scores as a colluder. A copier copies in every round it is
    sampled, so the original is told from its copies by what the copiers cannot show:

    - it is the one member that has sent an update of its own (one no other client of its round
      sent, and that did not flag it) in an earlier round (``own_rounds``), and it is not
      flagged (``suspect``);
    - or it is the one member with a history not already flagged, and it is consistent with its
      own past deviations (:class:`HistoryForecast`) by ``margin`` more than every copy with a
      history, which repeat a different victim each round (at least one copy must have one).

    In six ten-round mimic runs (Fashion-MNIST, Dirichlet 0.5) 25 of 55 copied victims had sent
    an update of their own before and no copier had; the history alone recognised 7. A group
    with no such member (crafted vectors sent by attackers not yet flagged, or members seen only
    in copies) has no original. An attacker that sends one update of its own before it copies
    is taken for the original when its victim has never sent one; the collusion score then
    falls on the victim, as it does on every member without this rule.

    Args:
        gaps: ``(K, K)`` :func:`pair_gaps` of the updates.
        suspect: ``(K,)`` booleans, the clients flagged before this round.
        history_error: ``(K,)`` forecast errors (NaN where a client has no history).
        own_rounds: ``(K,)`` earlier rounds in which each client sent an update of its own
            (:class:`HistoryScores`), or None.
        margin: how much smaller the original's forecast error is than every copy's.

    Returns:
        ``(K,)`` booleans, True for an original.
    """
    suspect = np.asarray(suspect, bool)
    error = np.asarray(history_error, np.float64)
    own = np.zeros(len(error)) if own_rounds is None else np.asarray(own_rounds, np.float64)
    twin = copy_pairs(gaps)
    _, group_of = connected_components(twin, directed=False)
    original = np.zeros(len(twin), bool)
    for group in np.unique(group_of):
        members = np.flatnonzero(group_of == group)
        if len(members) < 2:
            continue
        alone = members[own[members] > 0]
        if len(alone) == 1 and not suspect[alone[0]]:
            original[alone[0]] = True
            continue
        known = members[~np.isnan(error[members])]
        clean = known[~suspect[known]]
        copies = known[known != clean[0]] if len(clean) == 1 else known[:0]
        if len(copies) and error[clean[0]] <= error[copies].min() - margin:
            original[clean[0]] = True
    return original


def cluster_outliers(cosines: np.ndarray, min_scale: float = 0.05) -> np.ndarray:
    """How far each client sits outside the cohort's majority cluster, in [0, 1] (FLAME).

    HDBSCAN on cosine distances ``1 - cos`` with ``min_cluster_size = K // 2 + 1``,
    ``min_samples = 1`` and a single cluster allowed, FLAME's settings, finds the majority
    cluster. FLAME drops every client outside it; in a homogeneous cohort HDBSCAN leaves about a
    third of the clients out, so here the verdict is graded: a client outside the cluster scores
    the logistic of the robust z of its mean distance to the cluster's members against the
    members' own mean distances to each other (``1 / (1 + exp(-1.5 (z - 3)))``), and members
    score 0. Cohorts smaller than 4, or where HDBSCAN finds no cluster, get NaN.

    Args:
        cosines: ``(K, K)`` pairwise cosine similarities.
        min_scale: smallest scale of the members' mean distances (cosine-distance units).

    Returns:
        Float64 array of length K.
    """
    cosines = np.asarray(cosines, np.float64)
    k = cosines.shape[0]
    if k < _MIN_CLUSTER_COHORT:
        return np.full(k, np.nan)
    from sklearn.cluster import HDBSCAN  # imported here: only this signal needs scikit-learn

    # An update with no direction (zero norm) or an overflowed one has no defined cosine; it
    # counts as orthogonal to everyone rather than crashing HDBSCAN on NaN.
    distance = np.clip(np.nan_to_num(1.0 - cosines, nan=1.0, posinf=2.0, neginf=0.0), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2.0
    labels = HDBSCAN(
        min_cluster_size=k // 2 + 1,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
    ).fit_predict(distance)
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.full(k, np.nan)
    members = labels == np.bincount(clustered).argmax()
    to_members = distance[:, members].sum(axis=1) / np.maximum(members.sum() - members, 1)
    inside = to_members[members]
    med = float(np.median(inside))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(inside - med))), min_scale)
    score = 1.0 / (1.0 + np.exp(-1.5 * ((to_members - med) / scale - 3.0)))
    return np.where(members, 0.0, score)


def class_template_cosines(
    updates: np.ndarray, weights: np.ndarray, kernel: tuple[int, int]
) -> np.ndarray:
    """For each update, the cosine between the output-layer kernel column of the class it raises
    most and that class's column in the global weights (the class's *template*).

    The model's last layer is a dense kernel of shape ``kernel = (inputs, classes)`` and its bias,
    the last ``inputs * classes + classes`` coordinates of a row. An update raises class ``c`` by
    about the sum of its kernel column plus its bias (the features after ReLU are non-negative),
    and the class it raises most is the one its client's labels favour. Trained on examples of
    ``c``, that column grows along the features the model already ties to ``c``: honest
    updates' cosines to the template are mostly positive. Trained on examples of other classes
    labelled ``c`` (a backdoor's or DBA's relabelled copies, flipped or random labels), it grows
    along the features of those classes, which the model has learnt to hold against ``c``.

    Measured on Fashion-MNIST (50 clients, 10 per round, 20 seeds; docs/history/detection.md,
    "Labels the model's templates contradict"): in rounds 4-10 DBA's attackers had a median of
    -0.24 and 90% below -0.03 (the backdoor's -0.25 and -0.05), honest clients a median of 0.29
    and 97% above -0.02 at Dirichlet 0.5, 97% above -0.09 at 0.1. Label flipping and label noise
    move it less (medians 0.09 and 0.01). In round 1 the template is still close to the random
    initialisation and the two do not differ.

    Args:
        updates: ``(K, d)`` update matrix; its last ``inputs * classes + classes`` columns are the
            output layer's kernel (row-major) and bias.
        weights: ``(d,)`` the global weights the updates were trained from.
        kernel: ``(inputs, classes)``, the output kernel's shape.

    Returns:
        Float64 array of length K, in [-1, 1]; 0 where the column or the template is zero.
    """
    inputs, classes = int(kernel[0]), int(kernel[1])
    size = inputs * classes + classes
    updates, weights = np.asarray(updates), np.asarray(weights).reshape(-1)
    if updates.ndim != 2 or updates.shape[1] < size or weights.shape[0] != updates.shape[1]:
        raise ValueError(
            f"need (K, d) updates and (d,) weights with d >= {size} for an output kernel of "
            f"shape {kernel}. Received {updates.shape} and {weights.shape}."
        )
    out = np.asarray(updates[:, -size:], np.float64)
    columns = out[:, :-classes].reshape(-1, inputs, classes)
    raised = columns.sum(axis=1) + out[:, -classes:]
    chosen = raised.argmax(axis=1)
    templates = np.asarray(weights[-size:-classes], np.float64).reshape(inputs, classes)
    pushed = _unit(columns[np.arange(len(chosen)), :, chosen])
    return np.einsum("ki,ki->k", pushed, _unit(templates[:, chosen].T))


class CountSketch:
    """A fixed random projection of ``d``-vectors to ``dim`` numbers (Charikar et al. 2002).

    Coordinate ``j`` is added, with a random sign, to bucket ``h(j)``. Inner products, norms and
    cosines are preserved in expectation with relative error about ``1 / sqrt(dim)``, and the
    projection costs one pass over the update and ``16 d`` bytes of indices and signs, never a
    ``d x dim`` matrix (``_kernels.count_sketch``: one compiled pass over all rows). The same ``(d, dim, seed)`` always gives the same projection, so only the seed needs
    saving.

    Args:
        d: length of the vectors to sketch.
        dim: sketch length.
        seed: seed of the hash and signs.
    """

    def __init__(self, d: int, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0):
        if dim < 1 or d < 1:
            raise ValueError(f"CountSketch needs d >= 1 and dim >= 1. Received: d={d}, dim={dim}.")
        self.d, self.dim, self.seed = int(d), int(dim), int(seed)
        rng = np.random.default_rng([self.seed, self.d, self.dim])
        self._bucket = rng.integers(0, self.dim, self.d, dtype=np.int64)
        self._sign = rng.choice(np.array([-1.0, 1.0]), self.d)
        self._code = _kernels.sketch_code(self._bucket, self._sign)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """``(K, d)`` (or ``(d,)``) in, ``(K, dim)`` (or ``(dim,)``) float64 out."""
        vectors = np.asarray(vectors)
        single = vectors.ndim == 1
        rows = vectors.reshape(1, -1) if single else vectors
        if rows.shape[1] != self.d:
            raise ValueError(
                f"expected vectors of length {self.d}. Received shape {vectors.shape}."
            )
        out = _kernels.count_sketch(rows, self._bucket, self._sign, self.dim, self._code)
        return out[0] if single else out


def _unit(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.where(norm > 0, rows / np.where(norm > 0, norm, 1.0), 0.0)


ASSOCIATION_TOP = 2
"""Flagged clients an association is measured against: the mean of a client's cosines to its
``ASSOCIATION_TOP`` nearest flagged forecasts. With 2, one flagged honest outlier cannot make its
look-alikes (clients with the same dominant class) suspects on its own."""

ASSOCIATION_MIN_SCALE = 0.1
"""Least spread (cosine units) of the unflagged clients' associations in their robust z."""

ASSOCIATION_MIN_KINSHIP = 0.2
"""Least mean cosine to the nearest flagged forecasts for an association to count (below it the
z is capped at 0). The crafted-vector senders deviate against the honest mean, so the unflagged
clients' cosines to them centre below zero, and an honest client whose history is merely
unrelated to theirs stood 2.5 robust z above the rest: over ten seeds of Min-Max, Min-Sum,
optimised ALIE and Fang-trim, 12 honest clients were flagged by association at cosines of -0.08
to 0.16, where every attacker association found sat at 0.22 or more (backdoor 0.22-0.65, DBA
0.26-0.58, label flipping and label noise 0.31-0.71, crafted vectors 0.46-0.92). Honest clients
flagged by association at round 10 under those four attacks: 13 -> 3; every flag of the data
attacks unchanged (docs/history/detection.md, "Association that means deviating alike")."""

ASSOCIATION_MIN_COPY_KINSHIP = 0.5
"""Least mean cosine for an association through flagged clients that all sent copies (one
crafted vector, or the mimic attack's copied update): a crafted-vector attacker sampled alone
sends the same construction (ALIE, Min-Max, Min-Sum associates at 0.69-0.94 to the senders of
its copies), an honest client deviates like it only in part (0.23-0.47 for the honest clients
flagged that way at round 10 under AGR-tailored, ALIE, Fang-trim, Min-Max and Min-Sum, seeds
0-19 and 50-59). Replayed over 680 runs: honest client-rounds flagged under attack 319 -> 283,
AGR-tailored's precision on seeds 50-59 0.92 -> 0.99, every attacker found as before
(docs/history/detection.md, "Association through copies")."""


ASSOCIATION_OUTPUT_WEIGHT = 2.0 / 3.0
"""Where the output layer's association z is higher than the whole update's, the association is
their mean with this weight on the output layer's. Replayed on 30 fresh backdoor, DBA and
label-noise runs and 50 of the other attacks association acts under: none found 249 of 276 data
attackers, 1/2 254, 2/3 256 with one honest client-round more, 3/4 257 with two and one more
honest client flagged at round 10 (docs/history/detection.md, "The output layer's association")."""

ASSOCIATION_MIN_OUTPUT_KINSHIP = 0.4
"""Least mean cosine of a client's output-layer forecast to the flagged clients' for the output
layer to count. Attackers trained on poisoned labels that it lifted sat at 0.40-0.67 (one at
0.25); most honest clients it lifted under other attacks lower, 0.25-0.45, not all (0.62 once
under sign flipping)."""

ASSOCIATION_MAX_TEMPLATE_COSINE = 0.1
"""A flagged client counts in the output layer's association only while the last template cosine it
sent (:func:`class_template_cosines`) is at most this, or unknown: poisoned labels raise a class
against the model's template of it (DBA's and the backdoor's attackers at a median of -0.24 from
round 2, label noise's at 0.01, label flipping's at 0.09), a sign flip or a boosted honest
update does not (honest clients 0.29), and the honest clients whose classes they share followed
their output layers into association. Replayed over the 270 ledgers that record the cosine
(every attack on seeds 0-9, DBA on 10-99, no attack at Dirichlet 0.1 and 0.5): one attacker more
(DBA two, label noise one fewer), honest client-rounds flagged 114 -> 107 (scaling's and sign
flip's 5 fewer); on 60 live runs of seeds 100-109 (five attacks, no attack at Dirichlet 0.1):
one scaling attacker fewer, honest client-rounds 73 -> 65, sign flip's honest streak of 4 down
to 2 (docs/history/detection.md, "The output layer's association without sign flips and
boosts")."""


class Association(NamedTuple):
    """How one client's history sits with the flagged clients'
    (:meth:`HistoryForecast.association`).

    kinship: mean cosine of its forecast deviation to its ``ASSOCIATION_TOP`` nearest flagged
        clients' forecasts.
    z: robust z-score of ``kinship`` among the clients not flagged (median, 1.4826 MAD, at least
        ``ASSOCIATION_MIN_SCALE``), at most 0 while ``kinship`` is under
        ``ASSOCIATION_MIN_KINSHIP`` (``ASSOCIATION_MIN_COPY_KINSHIP`` when those nearest flagged
        clients all sent copies); lifted towards the output layer's z when that is higher
        (``ASSOCIATION_OUTPUT_WEIGHT``).
    nearest: those flagged clients, nearest first.
    output_layer: the same mean cosine on the output layer's forecasts (NaN without them).
    """

    kinship: float
    z: float
    nearest: tuple[str, ...]
    output_layer: float = math.nan


def _association(
    forecasts: np.ndarray, group: list[int], apart: np.ndarray, unflagged: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's mean cosine to its ``ASSOCIATION_TOP`` nearest ``group`` rows (pairs marked
    ``apart`` left out), its robust z among the ``unflagged`` rows, and the order of the nearest
    group rows."""
    norm = np.linalg.norm(forecasts, axis=1).astype(np.float64)
    scale = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0)
    dots = (forecasts @ forecasts[group].T).astype(np.float64)  # no normalised copy of all rows
    similar = np.where(apart, -np.inf, dots * scale[:, None] * scale[group][None, :])
    order = np.argsort(-similar, axis=1, kind="stable")[:, :ASSOCIATION_TOP]
    kinship = np.take_along_axis(similar, order, axis=1).mean(axis=1)
    population = kinship[unflagged]
    population = population[np.isfinite(population)]
    if population.size < 3:
        return kinship, np.full(len(kinship), np.nan), order
    center = float(np.median(population))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(population - center)))
    z = (kinship - center) / max(spread, ASSOCIATION_MIN_SCALE)
    return kinship, np.where(np.isfinite(z), z, np.nan), order


class CopyGroups:
    """Who sent the same update as whom, round by round, and how many rounds each client sent
    an update of its own: what tells the client the mimic attack copied from its copiers.

    A copier copies in every round it is sampled; the copied client sends updates of its own in
    the rounds it is not copied. A group of copies whose one member has sent an update of its
    own (one that did not flag it: :meth:`record_own`) had that member as its original
    (:meth:`originals`, and :func:`copied_originals` within a round).
    """

    def __init__(self) -> None:
        self._groups: list[tuple[str, ...]] = []
        self._own: dict[str, int] = {}

    def add_round(self, client_ids: Sequence[str], twins: np.ndarray) -> np.ndarray:
        """Records the round's groups of copies (``twins``, ``(K, K)`` booleans of the pairs
        that are copies); returns ``(K,)`` booleans, True where the update has no copy."""
        alone = np.zeros(len(client_ids), bool)
        if not len(client_ids):
            return alone
        _, group_of = connected_components(np.asarray(twins, bool), directed=False)
        for group in np.unique(group_of):
            members = np.flatnonzero(group_of == group)
            if len(members) > 1:
                self._groups.append(tuple(sorted(client_ids[i] for i in members)))
            else:
                alone[members[0]] = True
        return alone

    def own_rounds(self, client_ids: Sequence[str]) -> np.ndarray:
        """``(K,)`` float64: the rounds each client has sent an update of its own."""
        return np.array([self._own.get(c, 0) for c in client_ids], np.float64)

    def record_own(self, client_ids: Iterable[str]) -> None:
        """Counts one more round in which each of these clients sent an update of its own.

        The caller decides which count (the trust book: no copy, and the client's evidence apart
        from what copies made under the flag line).
        """
        for cid in client_ids:
            self._own[cid] = self._own.get(cid, 0) + 1

    def originals(self, suspects: Iterable[str] = ()) -> set[str]:
        """The clients that were the original of every group of copies they were in, as far as
        is known now, and were never seen copying.

        A group has one original at most (the mimic attack copies one honest update; a crafted
        vector has none), and an original copies nobody. So a client that has sent an update of
        its own, in any round (:func:`copied_originals` asks the same of earlier rounds only),
        is the original of each group it is the one such member of, and the other members of
        that group are copiers; a group whose members but one are copiers had that one as its
        original, which is then the original of its other groups too. This names a victim
        copied every time it was sampled once its copiers have been seen copying someone else;
        found originals make more copiers, until nothing changes. A victim of the mimic attack
        sampled for the first time is flagged with its copies; once it is named here, the trust
        book takes the copies' part of its evidence back (``TrustBook.update``).

        An original among ``suspects`` makes no copiers: a lone sender of a crafted vector that
        looked ordinary counts as having sent an update of its own, and through it every member
        of its later groups would pass for a copier and the next group's attacker for an
        original (Min-Sum, Fashion-MNIST seed 3: one attacker fewer found).

        WARNING: an attacker whose crafted vector, sent alone, looked ordinary counts as having
        sent an update of its own before anything flags it: its fellow senders then pass for
        copiers, and a group of them with one more attacker names that one (optimised ALIE,
        Fashion-MNIST seed 4: two attackers unflagged for one to four rounds, flagged again by
        round 10). The trust book still judges a named original on the rest of its evidence.

        Args:
            suspects: clients flagged on more than what copies of their updates made (the
                trust book's: by association, now or coming into the round, or over the line
                without the copies' part).

        Returns:
            The client ids named originals.
        """
        groups, suspects = self._groups, set(suspects)
        known = {c for c, n in self._own.items() if n > 0}
        while True:
            original_of = {}
            for i, group in enumerate(groups):
                members = [c for c in group if c in known]
                if len(members) == 1:
                    original_of[i] = members[0]
            copiers = {
                c for i, o in original_of.items() if o not in suspects for c in groups[i] if c != o
            }
            found = set()
            for i, group in enumerate(groups):
                rest = [c for c in group if c not in copiers]
                if i not in original_of and len(rest) == 1:
                    found.add(rest[0])
            if not found - known:
                break
            known |= found
        judged: dict[str, bool] = {}
        for i, group in enumerate(groups):
            for c in group:
                judged[c] = judged.get(c, True) and original_of.get(i) == c
        return {c for c, original in judged.items() if original and c not in copiers}

    def members(self) -> set[str]:
        """Every client that has been in a group of copies."""
        return {c for group in self._groups for c in group}

    def copies_of(self, client_id: str) -> tuple[str, ...]:
        """The clients that sent the same update as ``client_id`` in some round, sorted."""
        return tuple(sorted({c for g in self._groups if client_id in g for c in g} - {client_id}))

    def state_dict(self) -> dict:
        """Plain data for a checkpoint: every round's groups and the own-update counts."""
        return {"groups": [list(g) for g in self._groups], "own": dict(sorted(self._own.items()))}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output."""
        self._groups = [tuple(g) for g in state.get("groups", [])]
        self._own = {str(c): int(n) for c, n in state.get("own", {}).items()}


class HistoryScores(NamedTuple):
    """What :meth:`HistoryForecast.step` measures of each update of a round.

    error: ``1 - cos`` of the client's deviation to its own forecast (NaN in its first round).
    kinship: the largest cosine of the client's deviation to another client's forecast (NaN
        while no other client has a history), FoolsGold's similarity across rounds. Clients
        poisoned alike deviate alike in whichever rounds they are sampled: on Fashion-MNIST at
        Dirichlet 0.5 (10 rounds) attackers' medians were 0.48-0.57 under label noise, label
        flipping and both backdoors against honest clients' 0.32-0.33 (AUC 0.84-0.995), but
        honest clients at Dirichlet 0.1, many holding one class, reached 0.68-0.72: above the
        attackers, so it is recorded and not scored (docs/history/detection.md, "Kinship").
    own_rounds: earlier rounds in which the client sent an update of its own (one no other
        client of its round sent), as :meth:`CopyGroups.record_own` counted them
        (:func:`copied_originals`).
    alone: True where no other client of this round sent the same update.
    """

    error: np.ndarray
    kinship: np.ndarray
    own_rounds: np.ndarray
    alone: np.ndarray


class HistoryForecast:
    """Each client's consistency with its own past updates, on a sketch of the update.

    A client's *deviation* in a round is its sketched update minus the sketched reference (the
    cohort's coordinate-wise median), as a unit vector: the direction in which its data pull it
    away from the consensus. An honest client's data do not change between rounds, so neither
    does that direction much; the forecast of its next deviation is the exponentially weighted
    average of its past ones (weight ``memory`` on the past), and the signal is the forecast
    error ``1 - cos(deviation, forecast)``, 0 on forecast, 1 unrelated, 2 reversed. A client's
    first round has no forecast (NaN). The predicted update is the reference plus the forecast
    deviation at the observed length; only its direction is scored here, the norm signals cover
    the length.

    Beside it, each client keeps a forecast of the part of its deviation across the reference
    (the deviation less its component along the reference) and, given ``output_layer``, of the
    deviation of its output layer alone, for :meth:`association`; and :attr:`copies`
    (:class:`CopyGroups`) records which clients sent the same update.

    Args:
        sketch_dim: numbers kept per client.
        memory: weight of the past in the forecast, in [0, 1).
        seed: seed of the sketch.
        output_layer: how many of the update's last coordinates are the model's output layer
            (``fedwarden.weights.WeightLayout.output_layer_size``); 0: no such forecast. One
            longer than ``sketch_dim`` is sketched to it.
    """

    def __init__(
        self, sketch_dim: int = DEFAULT_SKETCH_DIM, memory: float = 0.5, seed: int = 0,
        output_layer: int = 0,
    ):  # fmt: skip
        if not 0.0 <= memory < 1.0:
            raise ValueError(f"memory must be in [0, 1). Received: memory={memory!r}.")
        self.sketch_dim, self.memory, self.seed = int(sketch_dim), float(memory), int(seed)
        self.output_layer = int(output_layer)
        self._sketch: CountSketch | None = None
        self._output_sketch: CountSketch | None = None
        self._forecast: dict[str, np.ndarray] = {}
        self._across: dict[str, np.ndarray] = {}
        self._output: dict[str, np.ndarray] = {}
        self._seen: dict[str, int] = {}
        self._template_cosine: dict[str, float] = {}
        self.copies = CopyGroups()

    def _deviations(
        self, updates: np.ndarray, reference: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sketched updates, their unit deviations from the sketched reference, and the unit
        parts of those deviations across the reference."""
        d = updates.shape[1]
        if self._sketch is None or self._sketch.d != d:
            self._sketch = CountSketch(d, self.sketch_dim, self.seed)
        sketched = self._sketch(updates)
        reference = self._sketch(reference)
        raw = sketched - reference[None, :]
        axis = _unit(reference)
        return sketched, _unit(raw), _unit(raw - np.outer(raw @ axis, axis))

    def _output_deviations(self, updates: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
        """The unit deviations of the updates' output layers from the reference's (sketched
        when longer than ``sketch_dim``); None without an output layer to read."""
        n = self.output_layer
        if n <= 0 or n > updates.shape[1]:
            return None
        raw = np.asarray(updates[:, -n:], np.float64) - np.asarray(reference[-n:], np.float64)
        if n > self.sketch_dim:
            if self._output_sketch is None or self._output_sketch.d != n:
                self._output_sketch = CountSketch(n, self.sketch_dim, self.seed + 1)
            raw = self._output_sketch(raw)
        return _unit(raw)

    def step(
        self, client_ids: list[str], updates: np.ndarray, reference: np.ndarray
    ) -> HistoryScores:
        """This round's updates scored against the histories, then folded into them.

        Args:
            client_ids: one id per row of ``updates``.
            updates: ``(K, d)`` update matrix.
            reference: ``(d,)`` the cohort's reference (its coordinate-wise median).

        Returns:
            :class:`HistoryScores`, two float64 arrays of length K.
        """
        updates = np.asarray(updates)
        if len(client_ids) != len(updates):
            raise ValueError(
                f"need one client id per update row. Received {len(client_ids)} ids for "
                f"{len(updates)} rows."
            )
        errors = np.full(len(client_ids), np.nan)
        own = self.copies.own_rounds(client_ids)
        if len(updates) == 0:
            return HistoryScores(errors, errors.copy(), own, np.zeros(0, bool))
        reference = np.asarray(reference).reshape(-1)
        sketched, deviations, across = self._deviations(updates, reference)
        output = self._output_deviations(updates, reference)
        kinship = self._kinship(client_ids, deviations)
        for i, cid in enumerate(client_ids):
            past = self._forecast.get(cid)
            now = deviations[i].astype(np.float32)
            if past is not None and np.any(past) and np.any(now):
                errors[i] = 1.0 - float(np.dot(_unit(past), now))
            self._forecast[cid] = self._fold(past, now)
            self._across[cid] = self._fold(self._across.get(cid), across[i].astype(np.float32))
            if output is not None:
                self._output[cid] = self._fold(self._output.get(cid), output[i].astype(np.float32))
            self._seen[cid] = self._seen.get(cid, 0) + 1
        alone = self.copies.add_round(client_ids, copy_pairs(pair_gaps(sketched @ sketched.T)))
        return HistoryScores(errors, kinship, own, alone)

    def _fold(self, past: np.ndarray | None, now: np.ndarray) -> np.ndarray:
        """The forecast after one more round: the weighted average of past and new."""
        if past is None:
            return now
        return (self.memory * past + (1.0 - self.memory) * now).astype(np.float32)

    def _kinship(self, client_ids: list[str], deviations: np.ndarray) -> np.ndarray:
        kinship = np.full(len(client_ids), np.nan)
        others = list(self._forecast)
        if not others:
            return kinship
        column = {c: j for j, c in enumerate(others)}
        similar = deviations @ _unit(np.stack([self._forecast[c] for c in others])).T
        for i, cid in enumerate(client_ids):
            if cid in column:  # a client's own past is the error's business, not kinship's
                similar[i, column[cid]] = -np.inf
        best = similar.max(axis=1)
        return np.where(np.isfinite(best), best, np.nan)

    def association(self, flagged: set[str]) -> dict[str, Association]:
        """Every client's :class:`Association` with the ``flagged`` clients, from the forecasts.

        Measured twice, on the forecast deviations and on their parts across the reference, and
        the smaller z counts. A client flagged for the length of its update along the consensus
        (a boosted or a sign-flipped one) has a forecast near the honest clients with long or
        short updates, and across the consensus near those whose data are like its own honest
        data; clients poisoned alike deviate alike in both. With output-layer forecasts it is
        measured a third time on them, and where that z is higher the association moves towards
        it (``ASSOCIATION_OUTPUT_WEIGHT``): poisoned labels (a backdoor's target, flipped classes)
        move the output layer alike from the first round on, when the rest of a poisoned update
        is still an honest one. An honest client whose data favour the attackers' target class
        moves it alike too, so the output layer alone does not associate: it lifts only a client
        whose whole update deviates alike too (the floor below) and whose output layer follows
        theirs closely (``ASSOCIATION_MIN_OUTPUT_KINSHIP``), compared only with flagged clients
        that sent no copies (crafted vectors poison no labels) and whose last template cosine
        (:meth:`record_template_cosines`) is unknown or at most ``ASSOCIATION_MAX_TEMPLATE_COSINE``
        (a sign flip or a boost poisons none either). The floor is ``ASSOCIATION_MIN_KINSHIP``,
        and ``ASSOCIATION_MIN_COPY_KINSHIP`` when a client's nearest flagged clients all sent
        copies: their attacker sampled alone sends the same vector,
        which honest clients follow only in part. A flagged client that sent a copy of a
        client's update (the mimic attack) does not count towards that client's association.
        Empty when fewer than ``ASSOCIATION_TOP`` flagged clients or fewer than three unflagged
        clients have a history; a flagged client is measured against the other flagged clients,
        and left out when fewer than ``ASSOCIATION_TOP`` of them remain.
        """
        group = sorted(c for c in flagged if c in self._forecast)
        rest = [c for c in self._forecast if c not in flagged]
        if len(group) < ASSOCIATION_TOP or len(rest) < 3:
            return {}
        ids = sorted(self._forecast)
        row = {c: i for i, c in enumerate(ids)}
        apart = np.zeros((len(ids), len(group)), bool)  # pairs that must not count
        for j, c in enumerate(group):
            apart[row[c], j] = True
            for other in self.copies.copies_of(c):
                if other in row:
                    apart[row[other], j] = True
        unflagged = [row[c] for c in rest]
        measured = [
            _association(np.stack([forecasts[c] for c in ids]).astype(np.float32, copy=False),
                         [row[c] for c in group], apart, unflagged)
            for forecasts in (self._forecast, self._across)
        ]  # fmt: skip
        (kinship, z, order), (_, z_across, _) = measured
        z = np.fmin(z, z_across)
        sender = np.array([bool(self.copies.copies_of(c)) for c in group])
        least = np.where(sender[order].all(axis=1), ASSOCIATION_MIN_COPY_KINSHIP,
                         ASSOCIATION_MIN_KINSHIP)  # fmt: skip
        z = np.where(kinship < least, np.fmin(z, 0.0), z)
        output = np.full(len(ids), np.nan)
        # a crafted vector poisons no labels: copy senders (and the clients they copied) are
        # not what the output layer is compared with
        # nor is a client whose labels agree with the model's templates (unknown: -inf)
        labelled = [
            j for j in range(len(group))
            if not sender[j]
            and self._template_cosine.get(group[j], -math.inf) <= ASSOCIATION_MAX_TEMPLATE_COSINE
        ]  # fmt: skip
        if self._output and len(labelled) >= ASSOCIATION_TOP:  # an old ledger's replay has none
            empty = np.zeros_like(next(iter(self._output.values())))
            rows = np.stack([self._output.get(c, empty) for c in ids])
            output, z_output, _ = _association(
                rows, [row[group[j]] for j in labelled], apart[:, labelled], unflagged
            )
            z_output = np.where(
                output < ASSOCIATION_MIN_OUTPUT_KINSHIP, np.fmin(z_output, 0.0), z_output
            )
            lift = (z_output > z) & (kinship >= least)
            w = ASSOCIATION_OUTPUT_WEIGHT
            z = np.where(lift, (1.0 - w) * z + w * z_output, z)
        return {
            c: Association(float(kinship[i]), float(z[i]), tuple(group[j] for j in order[i]),
                           float(output[i]))
            for i, c in enumerate(ids)
            if np.isfinite(z[i])
        }  # fmt: skip

    def forecasts_of(
        self, client_ids: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The clients' forecasts (the deviation, its part across the reference, and the output
        layer's, None without one), as float32 arrays of one row per client; what
        :meth:`association` reads, for a ledger to keep."""
        output = np.stack([self._output[c] for c in client_ids]) if self._output else None
        return (np.stack([self._forecast[c] for c in client_ids]),
                np.stack([self._across[c] for c in client_ids]), output)  # fmt: skip

    def set_forecasts(
        self, forecasts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    ) -> None:
        """Sets clients' forecasts as :meth:`forecasts_of` gave them (a ledger's replay)."""
        for cid, (forecast, across, output) in forecasts.items():
            self._forecast[cid] = np.asarray(forecast, np.float32)
            self._across[cid] = np.asarray(across, np.float32)
            if output is not None:
                self._output[cid] = np.asarray(output, np.float32)

    def record_template_cosines(
        self, client_ids: Sequence[str], template_cosine: np.ndarray
    ) -> None:
        """Keeps each client's last known template cosine (``client_metrics``' ``template_cosine``;
        NaN leaves the one before), which :meth:`association` reads."""
        for cid, value in zip(client_ids, np.asarray(template_cosine, np.float64), strict=True):
            if math.isfinite(value):
                self._template_cosine[cid] = float(value)

    def seen(self, client_id: str) -> int:
        """Rounds in which the client's update entered the history."""
        return self._seen.get(client_id, 0)

    def state_dict(self) -> dict:
        """Plain data for a checkpoint: settings, ids, two ``(n, sketch_dim)`` float32 arrays, the
        rounds each client was seen, and the :class:`CopyGroups`."""
        ids = sorted(self._forecast)
        empty = np.zeros((0, self.sketch_dim), np.float32)
        output = [c for c in ids if c in self._output]
        return {
            "sketch_dim": self.sketch_dim,
            "memory": self.memory,
            "seed": self.seed,
            "output_layer": self.output_layer,
            "client_ids": ids,
            "forecast": np.stack([self._forecast[c] for c in ids]) if ids else empty,
            "across": np.stack([self._across[c] for c in ids]) if ids else empty,
            "output_ids": output,
            "output": np.stack([self._output[c] for c in output]) if output else empty,
            "seen": [self._seen.get(c, 0) for c in ids],
            "template_cosine": dict(sorted(self._template_cosine.items())),
            "copy_groups": self.copies.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output (settings included)."""
        self.sketch_dim, self.memory = int(state["sketch_dim"]), float(state["memory"])
        self.seed = int(state["seed"])
        self._sketch = None
        forecast = np.asarray(state["forecast"], np.float32)
        across = np.asarray(state.get("across", forecast), np.float32)  # older checkpoints: none
        self._forecast = {c: forecast[i].copy() for i, c in enumerate(state["client_ids"])}
        self._across = {c: across[i].copy() for i, c in enumerate(state["client_ids"])}
        self.output_layer = int(state.get("output_layer", self.output_layer))  # older: none
        self._output_sketch = None
        output = np.asarray(state.get("output", np.zeros((0, 0))), np.float32)
        self._output = {c: output[i].copy() for i, c in enumerate(state.get("output_ids", []))}
        self._seen = {c: int(n) for c, n in zip(state["client_ids"], state["seen"], strict=True)}
        self._template_cosine = {  # older checkpoints: none
            str(c): float(v) for c, v in state.get("template_cosine", {}).items()
        }
        # older checkpoints kept the pairs of copies only
        self.copies.load_state_dict(state.get("copy_groups", {"groups": state.get("copies", [])}))

    def __repr__(self) -> str:
        return (
            f"HistoryForecast(sketch_dim={self.sketch_dim}, memory={self.memory}, "
            f"clients={len(self._forecast)})"
        )
