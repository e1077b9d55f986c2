"""Per-client measurements of one round and the anomaly score that combines them.

numpy in, numpy out, no I/O. The coordinator stacks the admitted updates once per round into a
``(K, d)`` matrix; :func:`client_metrics` measures every row against the cohort and the round's
robust aggregate, :func:`anomaly_score` turns those measurements into one score in ``[0, 1]`` per
client (0 = looks like the cohort, 1 = as anomalous as it gets). Trust (``server/trust.py``) is an
exponentially weighted average of ``1 - anomaly``.

Example::

    metrics = client_metrics(updates, aggregate, losses, step_output.per_client)
    scores = anomaly_score(metrics)                      # DEFAULT_ANOMALY_WEIGHTS
    scores = anomaly_score(metrics, {"cosine": 1.0})     # direction only

How each measurement becomes a component in ``[0, 1]`` (all are scale free, so the same weights
work for any model size):

- ``norm_z``: robust z-score of the log of the update norm against the clients not flagged (the
  cosine's reference rows, below), less what the client's local step count explains when the
  coordinator knows it, in units of 1.5 times the log norms' spread over the last rounds (rows
  far above the median left out of it: :data:`NORM_SPREAD_TRIM`), two-sided (tiny updates of
  free riders, log norm -inf, are as suspicious as huge ones), squashed by a logistic
  ``1 / (1 + exp(-1.5 (|z| - 3)))``: about 0.01 at ``|z| = 0``, 0.18 at 2, 0.5 at 3, 0.95 at 5.
  Norms spread multiplicatively (clients with more data take more steps), so the log keeps an
  honest client with twice the median data inside the cohort. Against the unflagged clients, a
  round in which four or five boosted attackers, some already flagged, move the cohort's median
  norm to theirs does not hide the others.
- ``loss_z``: the same for the reported local loss (dropped when losses are unknown).
- ``cosine``: the largest of ``(1 - cosine) / 2`` (0 aligned with the reference, 0.5 orthogonal,
  1 opposite), the logistic of the one-sided robust z of the cosine against the cohort (scale
  at least 0.15), so an update that is merely unaligned stands out when honest clients agree,
  and the same z of ``median_cosine``, the median cosine to the other updates (scale at least
  0.05 and a quarter of the cohort's median). The reference is the coordinate-wise median of
  the cohort's clients not flagged (the coordinator's choice; the whole cohort's when fewer
  than half would be left), partly made of the scored update itself: on Fashion-MNIST a random
  direction had cosine 0.06 to 0.23 to the whole cohort's median and a sign flip up to 0.37,
  where their median cosines to the others stayed within 0.006 of 0 and below 0.01 (honest
  clients: -0.09 to 0.59, median 0.12). It shares the cosine's weight (a weight of its own
  diluted the norm and Krum components and lost a scaling and a label-flipping attacker in
  fresh runs).
- ``krum_score``: ``max(0, 1 - median / score)``: 0 at or below the cohort's median Krum score,
  0.5 at twice it, 0.9 at ten times it. Unlike a rank it does not push the honest client that
  happens to rank last to 1.
- ``trimmed_share``: excess over the cohort's mean share, ``max(0, (s - mean) / (1 - mean))``: a
  trimmed mean trims the same number of rows per coordinate, so honest clients sit near the mean
  and a row trimmed on every coordinate scores 1.
- ``distance`` (weight 0 by default): logistic of the one-sided robust z of the distance to the
  aggregate (it largely repeats ``norm_z`` and ``cosine``).

Signals across clients and rounds (``detection.py``):

- ``collusion``: how much closer a client is to its nearest other client than the cohort is, the
  logistic of the one-sided robust z of ``-log(pair_gap)`` (log units, scale at least 0.7)
  against the rows with no copy in the cohort (:func:`_not_copies`). Two identical crafted
  updates (ALIE, Min-Max, Min-Sum, IPM send one vector) score 1, also when they are half the
  cohort.
- ``centrality``: the same on ``1 - cohort_cosine``, the cosine to the whole cohort's median: an
  update far more aligned with it than any honest one (ALIE sits next to the mean). Not the
  reference without the flagged clients (``cosine``): attackers that own the cohort's median are
  central to it, not to the others' median.
- ``cluster``: outside FLAME's majority cluster, graded by distance (``cluster_outlier``).
- ``history``: the forecast error of the client's deviation from its own past deviations, one
  sided robust z against the cohort (scale at least 0.1; NaN in a client's first round).
- ``zero_update``: an update (nearly) zero against the cohort, the logistic of how far its log
  norm sits below 1% of the lower median of the cohort's non-zero norms (a free rider sends the
  model back: 1; the lower median keeps honest updates out of it when half the cohort sends
  huge noise).
- ``unaligned``: an update that looks like noise (Gaussian attackers, random directions): no
  more aligned with any other than chance allows (``alignment`` below 4.5) and Gaussian in shape
  (``kurtosis`` near 0), see :func:`_unaligned_component`. A sharp component, absolute rather
  than cohort relative.
- ``oversized``: the mirror image, how far the log norm sits above 10 times the cohort's median
  (a model-replacement boost scores 1; honest updates stayed below 4.5 times the median in every
  Fashion-MNIST run of the detection grid, component below 0.1), or above 10 times the earlier
  rounds' honest norm scale (``norm_scale``, the coordinator's) when that is smaller: half a
  cohort of huge updates moves the cohort's median to theirs, not the earlier rounds'.
- ``shrinking``: how far the update shrinks the weights it was trained from (``radial``, its
  cosine to them, below 0), in units of the cohort's median ``|radial|``; honest training grows
  them and a sign flip shrinks them as much, however many flip (:func:`_shrinking_component`).
  Added to the score with weight 0.2 rather than averaged (:data:`ADDED_COMPONENTS`), and
  discounted for a client that took fewer local steps than the cohort's median
  (:data:`SHRINK_STEPS_POWER`). Present only when the coordinator passes the weights.
- ``mislabeled``: how far the update's ``template_cosine`` sits below the cohort's (one-sided
  robust z, logistic, spread at least :data:`MISLABELED_MIN_SCALE`): the cosine between the
  output-layer column of the class the update raises most and that class's column in the
  weights it was trained from (``detection.class_template_cosines``). Honest training raises a
  class along the features the model ties to it; examples of other classes labelled with it (a
  backdoor's or DBA's relabelled copies, flipped or random labels) raise it along features the
  model holds against it. Added
  with weight 0.1 (:data:`ADDED_COMPONENTS`): replayed over 180 Fashion-MNIST runs it found 13
  more attackers by round 10 (DBA 161 -> 174 of 182) and flagged 4 honest client-rounds fewer
  (99 of 14,841); weights of 0.15 and 0.2 found one more and flagged 109 to 159. Present only
  when the coordinator knows the weights and the shape of a dense output layer.

A data-side signal, present only when the server holds validation examples
(``--validation-examples``; ``server/validation.py`` measures, the model never enters here):

- ``validation``: Zeno's descendant score, cohort relative. The coordinator adds each update's
  loss change on the server's examples after a step of 0.3 along it
  (``validation_loss_change``) and the largest per-class change (``validation_class_change``);
  the component is the larger of their one-sided robust z's (logistic) against the cohort, scale
  at least 0.01 nats. Worse than the cohort is suspicious; better is not. Weight 0 by default
  (measured and recorded, not scored): on 20 replayed Fashion-MNIST runs a weight of 0.03 took
  label flipping from 0.33 to 0.50 by round 10 with one honest client-round more, but a fresh
  seed flagged 4 of 100 honest client-rounds at Dirichlet 0.5 (1 without) and digits at
  Dirichlet 0.1 2 of 200 (0 without); at 0.1 label flipping reached 0.77 and honest clients of
  attacked runs were flagged 17 times in 1149 (5 without). A skewed honest client's step hurts
  a balanced validation set as a flipper's does (docs/results.md). Opt in with
  ``anomaly_weights``.
- ``inert``: an update that barely moves the model for its norm, the logistic (centred at a z of
  5, spread at least 0.5) of how far ``validation_effect``, the log of the mean absolute per-class
  loss change of the whole update per unit norm, sits below the cohort's. On Fashion-MNIST a
  random direction of honest norm had a log effect of -5.0 to -3.9, honest updates -2.25 and up
  (median -1.2): most directions in weight space barely change what the model computes. A sharp
  component. In the same replays it took random directions from 0.27 to 0.87 by round 10
  (precision 1.00; 0.2 -> 0.7 in a fresh seed), with no honest client-round more flagged in any of
  33 runs.

The score is the weighted power mean of the components a client has,
``(sum(w_i * c_i**p) / sum(w_i)) ** (1/p)``, with ``p = 1`` (the weighted mean) by default,
raised to the largest of the :data:`SHARP_COMPONENTS` (``collusion``, ``centrality``,
``zero_update``, ``oversized``, ``unaligned``, ``inert``, ``boosted``) with a positive weight that
reaches :data:`SHARP_FLOOR`: honest clients do not light those up, so one of them alone is evidence,
where the mean would dilute it (a free rider's zero update, once scored 0.2 by the mean and
missed in 3 of 10 cases by round 10, now scores 1 in its first round; a 50-fold boost along the
honest direction scored 0.29, below an honest client). The
weights and the power were chosen on Fashion-MNIST runs (50 clients, 10 per round, Dirichlet 0.5,
20% attackers, trimmed mean; ALIE, Min-Max, Min-Sum, sign flip, scaling, and no attack at
Dirichlet 0.5 and 0.1), replaying each run's ledger with candidate weights, powers (1, 2, 3) and
flag lines and keeping the setting with the best worst-case precision and recall by round 10
at the fewest honest flags (docs/results.md, "Detection"). The honest clients' components have
heavy upper tails in ``norm_z``, ``cosine``, ``loss_z``, ``cluster`` and ``history`` (a client
with little data, or with one rare class, is an outlier there every round), and none at all in
``collusion`` and ``centrality`` (honest maximum 0.02 against 1.0 for every ALIE, Min-Max and
Min-Sum attacker seen with another attacker): the weights lean on the latter, and a higher power
let one heavy-tailed component of an honest client dominate its score. ``loss_z`` (weight 0) and
heavier ``norm_z``, ``krum_score`` or ``cluster`` weights flagged persistent honest outliers on
digits at Dirichlet 0.1 (up to 10% of honest client-rounds, four in a row); these weights flag
none there, at the price of sign-flip and scaling recall (0.7 and 0.8 by round 10 on
Fashion-MNIST, against 0.9 with the heavier weights). Why no re-weighting, per-signal
maximum or fitted combination of these components does better without flagging honest
outliers: docs/history/detection.md, "Why sign flip, scaling and random directions stop short".

Third pass (issue 18): 36 of the detection grid's runs made again with ``median_cosine``
(``fedwarden simulate --dataset fashion_mnist --partition dirichlet --alpha 0.5 --clients 50
--clients-per-round 10 --rounds 10 --aggregator auto --quarantine none --attack NAME --seed S``,
seeds 0 to 2; Intel Xeon, 2 cores, AVX-512, load average 0.9 to 11), replayed: the zero update's
lower-median reference took Gaussian precision from 0.87 to 0.97 (seed 2: 0.71 to 1.00), the
cosine's peer part took sign flip recall from 0.47 to 0.53 and random directions from 0.23 to
0.27 (one attacker each in three runs), no row worse; scaling (0.70), sign flip, random
directions and label flipping (0.33) stay far under 0.95 (docs/history/detection.md, "The
median cosine to the other updates, and where it stops").

A component that is NaN for a client (no losses reported, a cohort too small to trim) is left
out and the other weights are renormalised, so a missing measurement never counts as evidence
either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedwarden.aggregation import _kernels
from fedwarden.aggregation.detection import (
    COPY_GAP,
    MAD_TO_SIGMA,
    NOISE_KURTOSIS,
    UNALIGNED_Z,
    alignment_z,
    class_template_cosines,
    cluster_outliers,
    copied_originals,
    copy_pairs,
    cosine_matrix,
    excess_kurtosis,
    median_cosine_to_others,
    nearest_gap,
    pair_gaps,
)

DEFAULT_ANOMALY_WEIGHTS: dict[str, float] = {
    "norm_z": 0.1,
    "cosine": 0.15,
    "krum_score": 0.05,
    "trimmed_share": 0.15,
    "loss_z": 0.0,
    "distance": 0.0,
    "collusion": 0.4,
    "centrality": 0.2,
    "cluster": 0.05,
    "history": 0.05,
    "zero_update": 0.01,
    "oversized": 0.001,
    "unaligned": 0.001,
    "validation": 0.0,
    "inert": 0.01,
    "shrinking": 0.2,
    "boosted": 0.001,
    "mislabeled": 0.1,
}
"""Component weights of :func:`anomaly_score` (they need not sum to 1; only ratios count)."""

SHARP_COMPONENTS = (
    "collusion", "centrality", "zero_update", "oversized", "unaligned", "inert", "boosted"
)  # fmt: skip
"""Components honest clients do not light up (measured maxima 0.05, 0.06, 0 and 0.04 on
Fashion-MNIST and digits with 10 of 20 or 50 clients per round, Dirichlet 0.1 to iid;
``unaligned`` under 1e-6), so one of them alone may carry the score: with a positive weight,
each also sets a floor under it once it reaches :data:`SHARP_FLOOR` (see
:func:`anomaly_score`). ``zero_update``, ``oversized``, ``unaligned`` (and ``inert``, present
only with validation examples: honest robust z's up to 2.9, random directions from 2.25) and
``boosted`` (0 or 1, :func:`boosted_groups`: 16 of 10,228 honest client-rounds in the attacked
runs of its live check, none of 2,500 without attack) weigh almost nothing in the mean:
their work is the floor (a weight of 0.01 on ``oversized`` diluted the other components enough
to lose a scaling and a sign-flip attacker in the detection grid's replay)."""

ADDED_COMPONENTS = ("shrinking", "mislabeled")
"""Components added to the score, weight times value, instead of averaged into it: they are
(near) 0 for nearly every honest client, so in the mean they would dilute every other signal.
Weighed in the mean at 0.15, ``shrinking`` took scaling attackers flagged by round 10 from 20 to
16 of 30 on Fashion-MNIST; added, none of the other figures moves (docs/history/detection.md,
"Updates that shrink the weights"). ``mislabeled`` in the mean (0.1) found one attacker fewer
than added as taken, and flagged 2 honest client-rounds fewer (docs/history/detection.md,
"Labels the model's templates contradict")."""

SHARP_FLOOR = 0.5
"""A sharp component sets the score's floor only from this value: it says yes. Below it, it
counts in the mean like the others. Two honest clients holding the same single class (digits,
Dirichlet 0.1, every client every round) were each other's nearest update every round, with
``collusion`` 0.15 to 0.25: as a floor that was a z of 3 to 5 per round, and one of them was
flagged 20 rounds in a row. In the detection grids (Fashion-MNIST, 20 attacks, 3 seeds) 509 of
the 583 attacker client-rounds with a sharp component above 0.1 had it at 0.9 or more, and the
cut alone lost no attacker at the default settings (docs/history/detection.md, "Honest clients
seen every round")."""

DEFAULT_TRIM_RATIO = 0.1
"""Share of rows trimmed per side when the chain does not supply ``trimmed_share``."""

METRIC_NAMES = ("norm", "norm_z", "cosine", "cohort_cosine", "distance", "krum_score",
                "trimmed_share", "loss_z", "pair_gap", "cluster_outlier", "median_cosine",
                "alignment", "kurtosis", "radial", "copied", "boosted_group",
                "template_cosine")  # fmt: skip
"""Keys of the dict returned by :func:`client_metrics`, each an array of length K."""

NORM_SCALE_METRIC = "norm_scale"
"""Key under which the coordinator adds the earlier rounds' honest norm scale (``oversized``)."""

STEPS_METRIC = "local_steps"
"""Key under which the coordinator adds each client's local steps per epoch (from the example
counts bounded as the weights are) to the metrics, for ``shrinking``; absent without a batch
size."""

HISTORY_METRIC = "history_error"
"""Key under which the coordinator adds ``detection.HistoryForecast`` errors to the metrics."""

KINSHIP_METRIC = "kinship"
"""Key under which the coordinator adds ``detection.HistoryScores.kinship`` to the metrics:
measured and recorded, not scored (no component reads it; docs/history/detection.md, "Kinship")."""

VALIDATION_METRIC = "validation_loss_change"
CLASS_VALIDATION_METRIC = "validation_class_change"
EFFECT_METRIC = "validation_effect"
"""Keys under which the coordinator adds each update's loss change on server-held examples,
overall and in the class where it grows most, and the log of its effect on the per-class losses
per unit norm (``server/validation.py``); absent without them."""

VALIDATION_MIN_SCALE = 0.01
"""Least spread (nats) of the validation loss changes in the ``validation`` component."""

_MEANAD_TO_SIGMA = 1.2533  # the same for the mean absolute deviation (fallback when MAD is 0)


def robust_z(x: np.ndarray) -> np.ndarray:
    """Robust z-scores ``(x - median) / (1.4826 * MAD)``.

    When the MAD is 0 (more than half the values are equal) the scale falls back to
    ``1.2533 * mean absolute deviation``; when that is 0 too (all values equal) every z is 0.
    NaN entries are ignored in the statistics and stay NaN.
    """
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(x.shape, np.nan)
    med = np.median(x[finite])
    dev = np.abs(x[finite] - med)
    scale = MAD_TO_SIGMA * np.median(dev)
    if scale <= 0:
        scale = _MEANAD_TO_SIGMA * np.mean(dev)
    if scale <= 0:
        return np.where(finite, 0.0, np.nan)
    return (x - med) / scale


def krum_scores(sq_dist: np.ndarray, num_byzantine: int | None = None) -> np.ndarray:
    """Krum scores from a (K, K) matrix of squared distances.

    The score of client i is the sum of its squared distances to its ``K - f - 2`` nearest other
    clients (Blanchard et al., 2017), with ``f = num_byzantine`` defaulting to the largest value
    Krum tolerates, ``floor((K - 3) / 2)`` clipped at 0. The neighbour count is clipped to
    ``[1, K - 1]`` so that cohorts of 2 or 3 still get scores; a cohort of one scores 0.

    References:
        Blanchard, El Mhamdi, Guerraoui, Stainer. Machine Learning with Adversaries: Byzantine
        Tolerant Gradient Descent. NeurIPS 2017.
    """
    k = sq_dist.shape[0]
    if k < 2:
        return np.zeros(k)
    f = max((k - 3) // 2, 0) if num_byzantine is None else num_byzantine
    m = min(max(k - f - 2, 1), k - 1)
    others = sq_dist + np.diag(np.full(k, np.inf))  # a client is not its own neighbour
    nearest = np.partition(others, m - 1, axis=1)[:, :m]
    return nearest.sum(axis=1)


def trimmed_shares(updates: np.ndarray, trim_ratio: float = DEFAULT_TRIM_RATIO) -> np.ndarray:
    """Share of coordinates on which each row would be trimmed by a coordinate-wise trimmed mean.

    ``t = max(1, floor(trim_ratio * K))`` rows are trimmed per side and coordinate (at least one,
    so small cohorts still say something). With ``K < 3`` nothing would be left after trimming,
    and the shares are NaN. Rows tied at a cut share its slots evenly (``_kernels.trimmed_counts``),
    so a client's share does not depend on its place in the cohort.
    """
    k, d = updates.shape
    t = _trim_count(k, trim_ratio)
    if k < 2 * t + 1 or d == 0:
        return np.full(k, np.nan)
    return _kernels.trimmed_counts(updates, t) / d


def _trim_count(k: int, trim_ratio: float) -> int:
    return max(1, int(np.floor(trim_ratio * k)))


def order_statistics_scope() -> Any:
    """A context in which a matrix given to :func:`share_order_statistics` has its median and
    trimmed shares computed once, by one pass, for every caller (the chain's median rule, the
    scoring reference, :func:`trimmed_shares`, :func:`median_and_trimmed_shares`).

    Example::

        with order_statistics_scope():
            share_order_statistics(matrix)
            aggregate = median()(matrix, weights, None)           # the one pass
            reference, shares = median_and_trimmed_shares(matrix)  # no second one
    """
    return _kernels.order_statistics_scope()


def share_order_statistics(updates: np.ndarray, trim_ratio: float = DEFAULT_TRIM_RATIO) -> None:
    """Registers ``updates`` in the current :func:`order_statistics_scope` (no-op outside one).

    The matrix must not change while the scope lasts.
    """
    _kernels.share_order_statistics(updates, _trim_count(updates.shape[0], trim_ratio))


def median_and_trimmed_shares(
    updates: np.ndarray, trim_ratio: float = DEFAULT_TRIM_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """The cohort's coordinate-wise median and :func:`trimmed_shares`, from one order pass.

    The scoring reference and the trimmed shares read the same per-column order statistics, so
    ``_kernels.median_and_trimmed_counts`` takes both from one sort of each column block; the
    pair costs about what the shares alone cost.

    Returns:
        ``(median (d,) in the input dtype, shares (K,) float64)``, the values ``np.median`` and
        :func:`trimmed_shares` give (shares NaN when ``K < 2t + 1``).
    """
    k, d = updates.shape
    t = _trim_count(k, trim_ratio)
    if k < 2 * t + 1 or d == 0:
        return _kernels.median(updates), np.full(k, np.nan)
    med, counts = _kernels.median_and_trimmed_counts(updates, t)
    return med, counts / d


def _per_client(per_client: dict[str, np.ndarray], key: str, k: int) -> np.ndarray | None:
    value = per_client.get(key)
    if value is None:
        return None
    value = np.asarray(value, np.float64)
    if value.shape != (k,):
        raise ValueError(
            f"per_client[{key!r}] must have one value per update row, shape ({k},). "
            f"Received shape {value.shape}."
        )
    return value


def client_metrics(
    updates: np.ndarray,
    aggregate: np.ndarray,
    losses: np.ndarray | None,
    per_client: dict[str, np.ndarray] | None = None,
    trusted: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    suspect: np.ndarray | None = None,
    history_error: np.ndarray | None = None,
    own_rounds: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    earlier_spreads: Sequence[float] = (),
    earlier_boost_spreads: Sequence[float] = (),
    output_kernel: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Measures every admitted update against the cohort and the round's robust aggregate.

    Args:
        updates: ``(K, d)`` admitted update matrix, one row per client (not modified).
        aggregate: ``(d,)`` robust aggregate of the round (before server optimizer and DP noise
            is best: noise makes every cosine smaller).
        losses: ``(K,)`` reported local losses, or None when unknown.
        per_client: the aggregation chain's per-client measurements; ``krum_score`` and
            ``trimmed_share`` are taken from it when present (so the scores match what the rule
            actually did) and computed here otherwise.
        trusted: ``(K,)`` booleans, the rows the reference is made of (the coordinator's: the
            clients not flagged), or None for all. ``norm_z`` is measured against them; with
            some rows left out, ``cosine`` and ``distance`` measure each row against the
            coordinate-wise median of the trusted rows and itself
            (:func:`own_reference_products`), so that flagged rows do not shape the reference
            and every row is in its own, as with the whole cohort's median.
        weights: ``(d,)`` the global weights the updates were trained from, or None (``radial``
            is then NaN).
        suspect, history_error, own_rounds: ``(K,)`` the clients flagged before this round,
            their forecast errors and the earlier rounds in which they sent an update of their
            own (``detection.HistoryScores``), or None. With the first two, an update other
            clients copied is not called a colluder for the copies
            (``detection.copied_originals``).
        steps: ``(K,)`` each client's local optimizer steps (the coordinator's, from the example
            counts it weighs by): ``norm_z`` takes out what they explain (:func:`log_norm_z`).
            None compares the norms as they are.
        earlier_spreads: the earlier rounds' :func:`log_norm_spread` (the coordinator's), pooled
            with this round's into the scale of ``norm_z``.
        earlier_boost_spreads: the earlier rounds' :func:`boost_spread`, pooled with this
            round's into the scale of ``boosted_group``.
        output_kernel: ``(inputs, classes)`` of the model's dense output layer, whose kernel and
            bias end each row (``fedwarden.weights.WeightLayout.output_kernel``), or None
            (``template_cosine`` is then NaN).

    Returns:
        Float64 arrays of length K, keyed by :data:`METRIC_NAMES`: ``norm``; ``norm_z``, the robust
        z-score of the log norm against the ``trusted`` rows, less what ``steps`` explain
        (:func:`log_norm_z`); ``cosine``, the cosine similarity to the aggregate (0 when either
        vector is zero); ``cohort_cosine``, the cosine to ``aggregate`` whatever ``trusted`` says
        (for an update other clients copied, to the median of the others and itself);
        ``distance``, the Euclidean distance to the aggregate; ``krum_score`` (see
        :func:`krum_scores`); ``trimmed_share`` (see :func:`trimmed_shares`, 10% trim); ``loss_z``,
        the robust z-score of the loss (NaN when ``losses`` is None); ``pair_gap``, the relative
        distance to the nearest other update (``detection.nearest_pair_gap``); ``cluster_outlier``,
        how far outside FLAME's majority cluster (``detection.cluster_outliers``);
        ``median_cosine``, the median cosine to the other updates
        (``detection.median_cosine_to_others``); ``alignment``, the largest |cosine| to another
        update against chance (``detection.alignment_z``); ``kurtosis``, the excess kurtosis of the
        update's coordinates (``detection.excess_kurtosis``); ``radial``, the cosine of the update
        to ``weights``: honest training grows the weights it starts from, a sign flip shrinks them
        (:func:`_shrinking_component`); ``copied``, 1 for an update other clients copied, whose
        ``pair_gap`` leaves the copies out (NaN without ``suspect`` and ``history_error``);
        ``boosted_group``, 1 for an update of a boosted group (:func:`boosted_groups`);
        ``template_cosine``, how the output column of the class the update raises most follows
        that class's column in ``weights`` (``detection.class_template_cosines``).

    Norms, cosines, distances and Krum scores all come from one Gram matrix of the rows and the
    aggregate (``_kernels.gram``: BLAS products in the input dtype over column blocks of a fixed
    byte size, summed in float64, on two threads), so memory stays ``O(K^2)`` plus a few MB
    beyond the input for any K and d.
    """
    updates = np.asarray(updates)
    if updates.ndim != 2:
        raise ValueError(f"updates must be a (K, d) matrix. Received shape {updates.shape}.")
    k, d = updates.shape
    aggregate = np.asarray(aggregate).reshape(-1)
    if aggregate.shape != (d,):
        raise ValueError(
            f"aggregate must have shape ({d},), one value per update column. "
            f"Received shape {aggregate.shape}."
        )
    per_client = per_client or {}

    if weights is not None and np.shape(weights) != (d,):
        raise ValueError(
            f"weights must have shape ({d},), one value per update column. "
            f"Received shape {np.shape(weights)}."
        )
    # The global weights are a second reference row: one pass over the updates serves both.
    gram = _kernels.gram(updates, [aggregate] if weights is None else [aggregate, weights])
    sq_norm = np.diag(gram)
    norm = np.sqrt(sq_norm[:k])
    if weights is None:
        radial = np.full(k, np.nan)
    else:
        radial = _cosines(gram[:k, k + 1], norm, np.full(k, sq_norm[k + 1]))
        radial[np.abs(radial) < RADIAL_CHANCE_Z / np.sqrt(d)] = 0.0
    dots, ref_sq = gram[:k, k], np.full(k, sq_norm[k])
    cohort_cosine = _cosines(dots, norm, ref_sq)
    if trusted is not None and not np.all(trusted):
        dots, ref_sq = own_reference_products(updates, trusted)
    cosine = _cosines(dots, norm, ref_sq)
    distance = np.sqrt(np.maximum(sq_norm[:k] - 2 * dots + ref_sq, 0.0))

    krum = _per_client(per_client, "krum_score", k)
    if krum is None:
        sq_dist = np.maximum(sq_norm[:k, None] + sq_norm[None, :k] - 2 * gram[:k, :k], 0.0)
        krum = krum_scores(sq_dist)
    trimmed = _per_client(per_client, "trimmed_share", k)
    if trimmed is None:
        trimmed = trimmed_shares(updates)

    if losses is None:
        loss_z = np.full(k, np.nan)
    else:
        losses = np.asarray(losses, np.float64).reshape(-1)
        if losses.shape != (k,):
            raise ValueError(f"losses must have shape ({k},). Received shape {losses.shape}.")
        loss_z = robust_z(losses)

    pairwise = cosine_matrix(gram[:k, :k])
    gaps = pair_gaps(gram[:k, :k])
    copied = None
    if suspect is not None and history_error is not None:
        copied = copied_originals(gaps, suspect, history_error, own_rounds)
        for i in np.flatnonzero(copied):
            # Its copies put the cohort's median on it; how central it is on its own is told
            # by the median of the rest and itself.
            apart = ~copy_pairs(gaps[i])
            if apart.sum() >= 2:
                dots_i, ref_sq_i = own_reference_products(updates, apart)
                cohort_cosine[i] = _cosines(dots_i[[i]], norm[[i]], ref_sq_i[[i]])[0]
    pair_gap = nearest_gap(gaps, copied)
    copied = np.full(k, np.nan) if copied is None else copied.astype(np.float64)
    rows = boost_rows(pair_gap, copied, trusted)
    median_cosine = median_cosine_to_others(pairwise)
    if weights is None or output_kernel is None:
        template_cosine = np.full(k, np.nan)
    else:
        template_cosine = class_template_cosines(updates, weights, output_kernel)
    return {
        "norm": norm,
        "norm_z": log_norm_z(norm, trusted, steps, earlier_spreads),
        "cosine": cosine,
        "cohort_cosine": cohort_cosine,
        "distance": distance,
        "krum_score": krum,
        "trimmed_share": trimmed,
        "loss_z": loss_z,
        "pair_gap": pair_gap,
        "cluster_outlier": cluster_outliers(pairwise),
        "median_cosine": median_cosine,
        "alignment": alignment_z(pairwise, d),
        "kurtosis": excess_kurtosis(updates),
        "radial": radial,
        "copied": copied,
        "boosted_group": boosted_groups(
            norm, steps, rows, earlier_boost_spreads, aligned_rows(cosine, median_cosine)
        ),
        "template_cosine": template_cosine,
    }


def own_reference_products(
    updates: np.ndarray, trusted: np.ndarray, block_bytes: int = 4 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's dot product with, and the squared norm of, its own reference: the
    coordinate-wise median of the ``trusted`` rows and the row itself.

    For a trusted row that is the trusted rows' median. For another row it is that median with
    the row added, which per coordinate needs only the trusted rows' middle order statistics:
    with ``n = 2m`` of them, ``clip(x, s[m-1], s[m])``; with ``n = 2m + 1``, the mean of
    ``clip(x, s[m-1], s[m])`` and ``clip(x, s[m], s[m+1])``. One partial sort of each column
    block of the trusted rows serves every row; memory stays at one block.

    Returns:
        ``(dots (K,), squared norms (K,))`` in float64.
    """
    trusted = np.asarray(trusted, bool)
    k, d = updates.shape
    if trusted.shape != (k,) or trusted.sum() < 2:
        raise ValueError(
            f"trusted must mark at least 2 of the {k} update rows, shape ({k},). "
            f"Received {int(trusted.sum())} of shape {trusted.shape}."
        )
    kept, others = np.flatnonzero(trusted), np.flatnonzero(~trusted)
    n = len(kept)
    m = n // 2
    ranks = [m - 1, m] if n % 2 == 0 else [m - 1, m, m + 1]
    dots, ref_sq = np.zeros(k), np.zeros(k)
    columns = max(256, block_bytes // (8 * k))
    for start in range(0, d, columns):
        block = np.asarray(updates[:, start : start + columns], np.float64)
        rows, x = block[kept], block[others]
        s = np.partition(rows, ranks, axis=0)[ranks]  # a sorted copy: rows stay in order
        median = 0.5 * (s[0] + s[1]) if n % 2 == 0 else s[1]
        own = np.clip(x, s[0], s[1])
        if n % 2:
            own = 0.5 * (own + np.clip(x, s[1], s[2]))
        dots[kept] += rows @ median
        ref_sq[kept] += median @ median
        dots[others] += np.einsum("ij,ij->i", x, own)
        ref_sq[others] += np.einsum("ij,ij->i", own, own)
    return dots, ref_sq


def _cosines(dots: np.ndarray, norms: np.ndarray, ref_sq: np.ndarray) -> np.ndarray:
    """Cosines from dot products, norms and the references' squared norms, 0 where either
    vector is zero."""
    denom = norms * np.sqrt(ref_sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cosine, -1.0, 1.0)


def _logistic_of_abs(z: np.ndarray, center: float = 3.0, slope: float = 1.5) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-slope * (np.abs(z) - center)))


def _krum_component(score: np.ndarray) -> np.ndarray:
    finite = np.isfinite(score)
    if not finite.any():
        return np.full(score.shape, np.nan)
    med = np.median(score[finite])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(score > 0, 1.0 - med / np.where(score > 0, score, 1.0), 0.0)
    return np.where(finite, np.clip(out, 0.0, 1.0), np.nan)


def _trimmed_component(share: np.ndarray) -> np.ndarray:
    finite = np.isfinite(share)
    if not finite.any():
        return np.full(share.shape, np.nan)
    mean = float(np.mean(share[finite]))
    if mean >= 1.0:
        return np.where(finite, 0.0, np.nan)
    return np.clip((share - mean) / (1.0 - mean), 0.0, 1.0)


def _distance_component(distance: np.ndarray) -> np.ndarray:
    return _logistic_of_abs(np.maximum(robust_z(distance), 0.0))


NORM_SPREAD_FACTOR = 1.5
"""The scale of :func:`log_norm_z` in units of the log norms' spread (1.4826 MAD, median over
the last rounds): wide enough for the honest clients whose norms their step counts do not
explain. Replayed on the detection grid's ledgers (Fashion-MNIST, 19 attacks, five seeds), the
step-count covariate at 1.5 times the pooled spread left 6 honest client-rounds flagged where
the plain log norm against its round's MAD left 37, at 1.0 36, at 2.0 4 with scaling's recall
0.69, 0.77 and 0.52 (docs/history/detection.md, "Norms against step counts")."""


NORM_SPREAD_TRIM = 3.0
"""Log norms further above the round's median than this many earlier spreads do not shape this
round's spread (:func:`log_norm_spread`): boosted updates not yet flagged would widen the line
that judges them. Under scaling (three to five attackers of ten sending 2 to 3.3 times their
update) the untrimmed spread was a median 1.34 times the trimmed one; in honest rounds 1.000 at
Dirichlet 0.1 and 0.5. Replayed on the fifteenth pass's ledgers (Fashion-MNIST, Dirichlet 0.5,
ten seeds) it took scaling's recall by round 10 from 0.62 to 0.73 (the honest rows' own spread
would give 0.79) with no honest client-round more flagged without attack; cuts at 1.5 to 2.5
spreads flagged more honest clients in attacked runs (docs/history/detection.md, "Boosted updates
and the spread that judges them"). One-sided, because the low side is where honest clients that took
few steps sit, which the spread is wide for."""


def log_norm_spread(
    norm: np.ndarray,
    rows: np.ndarray | None = None,
    earlier_spreads: Sequence[float] = (),
    min_scale: float = 0.1,
) -> float:
    """1.4826 MAD of the log norms of ``rows`` (all by default; all too when fewer than three of
    ``rows`` are usable), NaN when no norm is positive. With ``earlier_spreads``, rows more than
    :data:`NORM_SPREAD_TRIM` times the earlier spreads' median (at least ``min_scale /
    NORM_SPREAD_FACTOR``) above this round's median are left out, as long as three remain."""
    log_norm, usable = _log_norms(norm, rows)
    if not usable.any():
        return float("nan")
    return _trimmed_spread(log_norm, usable, earlier_spreads, min_scale)


def _trimmed_spread(
    log_norm: np.ndarray, usable: np.ndarray, earlier_spreads: Sequence[float], min_scale: float
) -> float:
    if len(earlier_spreads):
        prior = max(float(np.median(earlier_spreads)), min_scale / NORM_SPREAD_FACTOR)
        below = usable & (log_norm <= np.median(log_norm[usable]) + NORM_SPREAD_TRIM * prior)
        if below.sum() >= 3:
            usable = below
    return _spread(log_norm[usable])


def _spread(values: np.ndarray) -> float:
    return MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values))))


def _log_norms(norm: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    norm = np.asarray(norm, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norm = np.log(norm)
    finite = np.isfinite(log_norm)
    usable = finite if rows is None or (finite & rows).sum() < 3 else finite & rows
    return log_norm, usable


def log_norm_z(
    norm: np.ndarray,
    rows: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    earlier_spreads: Sequence[float] = (),
    min_scale: float = 0.1,
) -> np.ndarray:
    """Two-sided robust z of the log norm against ``rows`` (all by default; all too when fewer
    than three of ``rows`` are usable), NaN for a zero norm.

    Norms are positive and spread multiplicatively: on the log scale an honest client with twice
    the median data stays near the cohort, while a boosted or noise update is far out. With
    ``steps``, each client's local step count, the part of the log norm that the log step count
    explains is taken out first: a client that took 40 steps sends a larger update than one
    that took 2, honestly. The slope is the Theil-Sen estimate over ``rows`` (the median of the
    pairwise slopes, which two outliers of ten barely move), kept within [0, 1]: more steps
    never shrink an honest update, nor grow it faster than in proportion.

    The scale is :data:`NORM_SPREAD_FACTOR` times the median of ``earlier_spreads`` and this
    round's :func:`log_norm_spread` (at least ``min_scale``, in log units): the spread of the
    plain log norms, not of what the steps leave, which is far tighter in most rounds (1.4826
    MAD 0.09 against 0.24 at Dirichlet 0.5) while a few honest clients per round sit a whole
    log unit off the steps' line. Pooled over rounds, one round's ten rows do not set it alone,
    and rows far above the median do not widen it (:data:`NORM_SPREAD_TRIM`).
    """
    log_norm, usable = _log_norms(norm, rows)
    if not usable.any():
        return np.full(log_norm.shape, np.nan)
    here = _trimmed_spread(log_norm, usable, earlier_spreads, min_scale)
    spread = float(np.median([*earlier_spreads, here]))
    log_norm = _less_steps(log_norm, usable, steps)
    med = np.median(log_norm[usable])
    scale = max(NORM_SPREAD_FACTOR * spread, min_scale)
    finite = np.isfinite(log_norm)
    return np.where(finite, (log_norm - med) / np.where(finite, scale, 1.0), np.nan)


def _less_steps(log_norm: np.ndarray, usable: np.ndarray, steps: np.ndarray | None) -> np.ndarray:
    """The log norms less what the log step counts explain (the slope fitted on ``usable``)."""
    if steps is None:
        return log_norm
    log_steps = np.log(np.maximum(np.asarray(steps, np.float64), 1.0))
    return log_norm - _steps_slope(log_steps[usable], log_norm[usable]) * log_steps


def _steps_slope(log_steps: np.ndarray, log_norm: np.ndarray) -> float:
    """Theil-Sen slope of ``log_norm`` on ``log_steps``, within [0, 1] (0 when every client took
    the same number of steps)."""
    i, j = np.triu_indices(len(log_steps), 1)
    run = log_steps[j] - log_steps[i]
    apart = np.abs(run) > 1e-9
    if not apart.any():
        return 0.0
    return float(np.clip(np.median((log_norm[j] - log_norm[i])[apart] / run[apart]), 0.0, 1.0))


BOOST_Z = 16.0
"""How far above the lower half of its cohort, in that half's spreads, an update of a boosted
group sits (:func:`boosted_groups`). Replayed on Fashion-MNIST ledgers (50 clients, 10 per round,
Dirichlet 0.5, 20 attacks and no attack at Dirichlet 0.1, 0.5 and iid, seeds 0-19 and 0-39 at
Dirichlet 0.1), 16 found 7 to 8 more of scaling's 90-odd attackers per ten seeds and flagged no
honest client-round more without attack; 13 found 10 to 16 more, but flagged 3 more honest
client-rounds without attack and 44 more under the other attacks. Live, scaling's recall by
round 10 went from 0.74 to 0.82 (seeds 0-9) and 0.73 to 0.84 (10-19), label flipping's precision
from 1.00 to 0.97 (docs/results.md, "Boosted groups")."""

BOOST_NEAR = 8.0
"""A member of a boosted group has another within this many spreads of it: attackers sharing a
round boost by one factor, and an honest update as long as a noise vector is not its kin. Two
scaling attackers of one round were more than 6 apart in 13% of pairs (seeds 0-9 and 60-69),
more than 8 apart in 6%; 8 instead of 6 found 3 more of them and marked 2 honest client-rounds
more (docs/history/detection.md, "Boosted groups that stand apart")."""

BOOST_MIN_SCALE = 0.05
"""Smallest spread (log units) :func:`boosted_groups` divides by."""

BOOST_GAP = 10.0
"""How many spreads a boosted group standing apart sits above the rest of the clients not
flagged (:func:`boosted_groups`). Replayed on the Fashion-MNIST ledgers of seeds 0-9 and 60-69
(every attack, no attack at Dirichlet 0.1 and 0.5; 495 runs), 10 found 7 of the 27 scaling
attackers :data:`BOOST_Z` left by round 10 and marked 3 honest client-rounds more; 8 found 10 and
marked 11, 12 found none (docs/history/detection.md, "Boosted groups that stand apart")."""

ALIGNED_Z = 1.5
"""A row is aligned (:func:`aligned_rows`) unless its cosine to the reference or its median
cosine to the others sits more than this many robust spreads below the cohort's."""


def _lower_half(
    norm: np.ndarray, steps: np.ndarray | None, rows: np.ndarray | None
) -> tuple[np.ndarray, float, float] | None:
    """The log norms less what the steps explain, and the median and spread (1.4826 MAD) of the
    lower half of ``rows``' (all when fewer than three are usable); None below three norms."""
    log_norm, usable = _log_norms(norm, rows)
    if usable.sum() < 3:
        return None
    residual = _less_steps(log_norm, usable, steps)
    low = np.sort(residual[usable])[: int(usable.sum()) // 2 + 1]
    return residual, float(np.median(low)), _spread(low)


def boost_spread(
    norm: np.ndarray, steps: np.ndarray | None = None, rows: np.ndarray | None = None
) -> float:
    """This round's spread for :func:`boosted_groups`' pool (NaN below three usable norms)."""
    lower = _lower_half(norm, steps, rows)
    return float("nan") if lower is None else lower[2]


def boosted_groups(
    norm: np.ndarray,
    steps: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    earlier_spreads: Sequence[float] = (),
    aligned: np.ndarray | None = None,
) -> np.ndarray:
    """1 for each update of a boosted group, else 0 (NaN for a norm that is not positive).

    Model replacement boosts every attacker's update by one factor, n / m with m attackers in a
    cohort of n: 2 to 2.5 when four or five share a round, inside the spread ``norm_z`` judges
    (which is wide for the honest clients whose norms their steps do not explain). Measured
    against the lower half of the cohort (less what the local steps explain, the half a boost
    does not reach while the attackers are fewer than half) they sit far out together: an update
    more than :data:`BOOST_Z` of that half's spreads (the median over this round and
    ``earlier_spreads``, at least :data:`BOOST_MIN_SCALE`) above its median, with another within
    :data:`BOOST_NEAR` spreads of it, is in a boosted group. ``rows`` (the coordinator's: not
    flagged and not a copy) make the lower half; the others are judged against it. One long
    honest update alone is not a group; two honest ones in a round are, rarely.

    With ``aligned`` (:func:`aligned_rows`), a group of ``rows`` that stands apart is one too:
    the top k of them (2 <= k <= half), :data:`BOOST_GAP` spreads above the rest of them, every
    one aligned and within :data:`BOOST_NEAR` of another. Four or five attackers boosting by 2
    to 2.5 sit under :data:`BOOST_Z` but apart from the honest clients; honest updates that stand
    out by their norm mostly point elsewhere too, and label flipping's long updates beside an
    honest one are flagged, so not in ``rows``.
    """
    norm = np.asarray(norm, np.float64)
    lower = _lower_half(norm, steps, rows)
    if lower is None:
        return np.full(norm.shape, np.nan)
    residual, centre, here = lower
    scale = max(float(np.median([*earlier_spreads, here])), BOOST_MIN_SCALE)
    z = (residual - centre) / scale
    finite = np.isfinite(z)
    above = finite & (z > BOOST_Z)
    z = np.where(finite, z, 0.0)
    kin = above[None, :] & (np.abs(z[:, None] - z[None, :]) <= BOOST_NEAR)
    group = above & (kin.sum(axis=1) >= 2)  # itself and one more
    if aligned is not None:
        group |= _standing_apart(z, finite if rows is None else finite & rows, aligned)
    return np.where(finite, group.astype(np.float64), np.nan)


def _standing_apart(z: np.ndarray, candidates: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    """The top k of ``candidates`` by ``z`` (the largest k, 2 <= k <= half of them) that sit
    :data:`BOOST_GAP` above the rest of them, when every one of the k is ``aligned`` and within
    :data:`BOOST_NEAR` of another of them."""
    group = np.zeros(z.shape, bool)
    order = np.argsort(-np.where(candidates, z, -np.inf))
    top = z[order[: int(candidates.sum())]]
    for k in range(len(top) // 2, 1, -1):
        if top[k - 1] - top[k] >= BOOST_GAP:
            near = -np.diff(top[:k]) <= BOOST_NEAR
            kin = np.r_[False, near] | np.r_[near, False]
            group[order[:k]] = bool(kin.all() and np.asarray(aligned, bool)[order[:k]].all())
            break
    return group


def aligned_rows(cosine: np.ndarray, median_cosine: np.ndarray) -> np.ndarray:
    """Rows whose cosine to the reference and median cosine to the others are both within
    :data:`ALIGNED_Z` robust spreads below the cohort's (unknown counts as aligned)."""
    near = [np.nan_to_num(robust_z(c), nan=0.0) > -ALIGNED_Z for c in (cosine, median_cosine)]
    return near[0] & near[1]


def boost_rows(
    pair_gap: np.ndarray, copied: np.ndarray, trusted: np.ndarray | None = None
) -> np.ndarray:
    """The rows that make :func:`boosted_groups`' lower half: ``trusted`` ones (all for None)
    that are not copies of another update (``pair_gap`` under ``COPY_GAP``, or ``copied``):
    attackers that send one short vector (IPM) would otherwise be that half."""
    copy = (np.nan_to_num(np.asarray(pair_gap, np.float64), nan=1.0) < COPY_GAP) | (
        np.nan_to_num(np.asarray(copied, np.float64)) == 1
    )
    return ~copy if trusted is None else np.asarray(trusted, bool) & ~copy


def _norm_component(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """Logistic of ``norm_z`` (:func:`log_norm_z`); 1 for a zero update (a free rider, log norm
    -inf), as suspicious as a huge one."""
    component = _logistic_of_abs(np.asarray(metrics["norm_z"], np.float64))
    if "norm" not in metrics:
        return component
    norm = np.asarray(metrics["norm"], np.float64)
    return np.where(norm == 0, 1.0, np.where(np.isnan(norm), np.nan, component))


def _cosine_component(
    cosine: np.ndarray, median_cosine: np.ndarray | None = None, min_scale: float = 0.15
) -> np.ndarray:
    """The largest of the absolute ``(1 - cos) / 2``, the logistic of the one-sided robust z of
    the cosine to the reference and, when ``median_cosine`` is given, the same z of the median
    cosine to the other updates (:func:`_peer_cosine_component`).

    The relative part catches updates that are merely unaligned (random directions) when the
    honest cohort is tightly aligned; ``min_scale`` keeps a near-identical cohort from turning
    tiny differences into large z. The peer part sees what the reference cannot: the cohort's
    median is partly made of the scored update itself.
    """
    cosine = np.clip(np.asarray(cosine, np.float64), -1.0, 1.0)
    component = (1.0 - cosine) / 2.0
    finite = np.isfinite(cosine)
    if finite.sum() >= 3:
        med = np.median(cosine[finite])
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(cosine[finite] - med))), min_scale)
        component = np.maximum(component, _logistic_of_abs(np.maximum(med - cosine, 0.0) / scale))
    if median_cosine is not None:
        component = np.fmax(component, _peer_cosine_component(median_cosine))
    return component


def _smaller_than_cohort(
    gap: np.ndarray, min_scale: float, reference: np.ndarray | None = None
) -> np.ndarray:
    """Logistic of the one-sided robust z of ``-log(gap)`` against the ``reference`` rows (all
    by default, and all when fewer than three of them are usable).

    On the log scale a gap of 0.001 is as far below 0.01 as 0.01 is below 0.1: near-identical
    updates stand out however close the honest cohort is. ``min_scale`` (in log units) keeps a
    cohort with equal gaps from turning small differences into large z.
    """
    gap = np.asarray(gap, np.float64)
    gap = np.log(np.maximum(gap, 1e-6))
    finite = np.isfinite(gap)
    if finite.sum() < 3:
        return np.full(gap.shape, np.nan)
    usable = finite & reference if reference is not None else finite
    if usable.sum() < 3:
        usable = finite
    med = np.median(gap[usable])
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(gap[usable] - med))), min_scale)
    return np.where(finite, _logistic_of_abs(np.maximum(med - gap, 0.0) / scale), np.nan)


def _not_copies(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """The rows with no copy in the cohort (``pair_gap`` at least ``COPY_GAP``), the reference
    of ``collusion`` and ``centrality``: when copies of one vector are half the cohort (five or
    more attackers of ten sending it), a reference with them puts its median at the copies and
    they scored 0.03 (mimic, seed 0, round 8: a new attacker went unflagged)."""
    return ~(np.nan_to_num(np.asarray(metrics["pair_gap"], np.float64), nan=1.0) < COPY_GAP)


def _norm_ratio_component(
    norm: np.ndarray, ratio: float, above: bool, scale: np.ndarray | None = None
) -> np.ndarray:
    """Logistic of how far (log units) the norm sits beyond ``ratio`` times a reference norm:
    below ``reference / ratio`` when ``above`` is false, above ``reference * ratio`` when it is
    true.

    A free rider sends the model back (norm 0: 1 with ``above=False``); a model-replacement boost
    sends a norm many times the cohort's (1 with ``above=True``). Honest updates stayed within a
    factor 4.5 of the median on Fashion-MNIST at Dirichlet 0.1 to iid.

    The reference is the cohort's median norm for ``above=True``. For ``above=False`` it is the
    lower median of the non-zero norms: when half a cohort of 10 sends huge noise, the median
    falls between the two halves, 10,000 times the honest norms, and made every honest update
    of that round a "zero update" (Gaussian, seed 2 of the detection grid); exact zeros are left
    out so that up to half the cohort of free riders cannot pull the reference to 0.

    ``scale`` (``above=True`` only): a norm no client of this round shapes, the same for every
    row (NaN when unknown); the reference is the smaller of it and the cohort's median.
    """
    norm = np.asarray(norm, np.float64)
    finite = np.isfinite(norm)
    if finite.sum() < 3:
        return np.full(norm.shape, np.nan)
    if above:
        reference = float(np.median(norm[finite]))
        known = None if scale is None else np.asarray(scale, np.float64)
        if known is not None and known.size and np.isfinite(known[0]) and known[0] > 0:
            reference = min(reference, float(known[0]))
    else:
        nonzero = norm[finite & (norm > 0)]
        reference = float(np.quantile(nonzero, 0.5, method="lower")) if nonzero.size else 0.0
    if reference <= 0:
        return np.where(finite, 0.0, np.nan)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(np.maximum(norm, 0.0) / reference)
    beyond = (log_ratio if above else -log_ratio) - np.log(ratio)
    return np.where(finite, 1.0 / (1.0 + np.exp(-3.0 * np.clip(beyond, -50.0, 50.0))), np.nan)


def _unaligned_component(alignment: np.ndarray, kurtosis: np.ndarray | None) -> np.ndarray:
    """How much the update looks like noise (``detection.noise_like``, made smooth): the
    logistic (slope 3) of how far ``alignment`` sits below ``UNALIGNED_Z`` times the logistic
    (slope 4) of how far the excess ``kurtosis`` sits inside ``NOISE_KURTOSIS``. Noise and
    random directions (alignment 3.6 and under, kurtosis within 0.3 of 0) score 0.9 and more;
    an honest update orthogonal to its cohort is heavy tailed (kurtosis 5.6 and up) and scores
    under 1e-6. Absolute, not cohort relative: a cohort that is half noise must not move it.
    NaN where either is unknown."""
    value = np.asarray(alignment, np.float64)
    shape = np.full(value.shape, np.nan) if kurtosis is None else np.asarray(kurtosis, float)
    with np.errstate(over="ignore", invalid="ignore"):
        direction = 1.0 / (1.0 + np.exp(-3.0 * (UNALIGNED_Z - value)))
        gaussian = 1.0 / (1.0 + np.exp(4.0 * (np.abs(shape) - NOISE_KURTOSIS)))
    return np.where(np.isfinite(value) & np.isfinite(shape), direction * gaussian, np.nan)


def _peer_cosine_component(median_cosine: np.ndarray, min_scale: float = 0.05) -> np.ndarray:
    """Logistic of the one-sided robust z of how far the median cosine to the other updates
    sits below the cohort's.

    The spread is at least ``min_scale`` and a quarter of the cohort's median: late in training
    honest updates are nearly orthogonal to one another (median cosines within a few hundredths
    of 0), and early, when they agree (median 0.45), an honest client that agrees a little less
    is no outlier. In the detection grid's fresh runs a floor of 0.03 flagged more honest
    clients at Dirichlet 0.1, and no quarter-median floor kept an honest outlier at Dirichlet 0.5
    flagged one round longer.
    """
    value = np.asarray(median_cosine, np.float64)
    finite = np.isfinite(value)
    if finite.sum() < 3:
        return np.full(value.shape, np.nan)
    med = float(np.median(value[finite]))
    mad = MAD_TO_SIGMA * float(np.median(np.abs(value[finite] - med)))
    scale = max(mad, min_scale, 0.25 * abs(med))
    return np.where(finite, _logistic_of_abs(np.maximum(med - value, 0.0) / scale), np.nan)


RADIAL_CHANCE_Z = 3.0
"""``radial`` is recorded as 0 where its size is under this many times ``1 / sqrt(d)``, the
spread of the cosine between the weights and a random direction: such an update grows or
shrinks them no more than chance would. From the random initialisation of the digits model
(d = 4,810, the line at 0.043) the honest updates of round 1 sit there (-0.011 to 0.028 on seed
1), or all shrink the weights (-0.050 to -0.008 on seed 3); on Fashion-MNIST (d = 56,714, the
line at 0.013) 95% of honest updates grow them by 0.036 or more in round 1 (0.021 in rounds
3-10)."""

SHRINK_STEPS_POWER = 0.5
SHRINK_STEPS_KNEE = 0.5
SHRINK_STEPS_FLOOR = 0.25
"""``shrinking`` of a client that took fewer local steps than the cohort's median is multiplied by
``ratio ** SHRINK_STEPS_POWER``, ``ratio = max(steps / median, SHRINK_STEPS_FLOOR)``, and under
``SHRINK_STEPS_KNEE`` in proportion to ``ratio`` (joining the power at the knee): a few steps on
one or two classes shrink the weights honestly. At Dirichlet 0.1 (Fashion-MNIST, ten seeds, no
attack) the 32 of 1,000 honest client-rounds with ``shrinking`` of 0.3 or more held a median of
116 examples against the cohort's 973; at Dirichlet 0.5 there were none. With the weight at 0.2,
live over ten seeds, the square root took the honest flags at Dirichlet 0.1 from 0.8% to 0.5% and
DBA's recall from 0.73 to 0.82 (docs/history/detection.md, "Updates that shrink the weights,
against the steps").

The knee: replayed over 1,015 ledgers (every attack on seeds 0-9 and 60-89, six on 90-99; no
attack at Dirichlet 0.1 on seventy seeds), the proportional discount under half the median took
honest client-rounds flagged at Dirichlet 0.1 from 55 to 40 of 7,000 and lost no attacker; the
proportional discount everywhere (a power of 1) took them to 33 but lost 9 of DBA's 444
attackers, and a knee of 0.8 lost 10 (DBA's attackers took most of their cohorts' median steps).
The other 140 runs of seeds 90-99, not chosen on, flag the same clients with it
(docs/history/detection.md, "The shrinking discount's knee").

The floor is what a claimed count can buy (a discount to ``SHRINK_STEPS_FLOOR /
sqrt(SHRINK_STEPS_KNEE)``, 0.35, at most): sign flippers claiming one example each
(``--attack-claim-examples 1``) kept recall 0.90 without a floor, against 0.98 unclaimed, and 0.96
with the square root's floor (five seeds); with the knee 89 of 90 (seeds 90-99; 90 without it).
The honest clients the discount is for took a median of 8 steps where their cohorts took about
30, so the floor leaves them their discount."""


def _shrinking_component(
    radial: np.ndarray, steps: np.ndarray | None = None, min_scale: float = 1e-3
) -> np.ndarray:
    """How far the update shrinks the weights it was trained from: ``-radial`` in units of the
    cohort's median ``|radial|``, clipped to ``[0, 1]``.

    Honest updates grow the weights: on Fashion-MNIST (10 of 50 per round, 10 rounds, three
    seeds) ``radial`` was below 0 in none of 600 honest client-rounds at Dirichlet 0.5 and iid
    (median 0.11 and 0.15) and in 5.3% at Dirichlet 0.1 (lowest -0.07); sign flippers were below 0
    in 99% of theirs (median -0.10), IPM and Fang's trim attack in all, label flippers in 54%.
    A sign flip shrinks the weights by as much as an honest update grows them, so it scores
    about 1 whatever share of the cohort flips: the scale is the median of the magnitudes, which
    flippers do not change, where the cohort's median ``radial`` would fall to 0 in a round
    that is half flippers. Since an honest client at Dirichlet 0.1 sometimes scores as high, it
    is added to the score with a small weight (:data:`ADDED_COMPONENTS`), never alone, and with
    ``steps`` (local steps per epoch) discounted for a client that took fewer steps than the
    cohort's median, down to 0.35 at most (:data:`SHRINK_STEPS_KNEE`). Claiming few examples to earn
    the discount costs the claimed weight and makes a full-size update a long one for ``norm_z``.

    It says nothing (0 for every client) in a round where not even a quarter of the cohort grows
    the weights beyond chance (:data:`RADIAL_CHANCE_Z`): from a random initialisation honest
    updates may all shrink them, and then shrinking tells no one apart.
    """
    value = np.asarray(radial, np.float64)
    finite = np.isfinite(value)
    if finite.sum() < 3:
        return np.full(value.shape, np.nan)
    if np.percentile(value[finite], 75) <= 0:  # the cohort does not grow them beyond chance
        return np.where(finite, 0.0, np.nan)
    scale = max(float(np.median(np.abs(value[finite]))), min_scale)
    shrinking = np.clip(-value / scale, 0.0, 1.0)
    if steps is not None:
        steps = np.maximum(np.asarray(steps, np.float64), 1.0)
        ratio = np.clip(steps / np.median(steps), SHRINK_STEPS_FLOOR, 1.0)
        below_knee = ratio * SHRINK_STEPS_KNEE ** (SHRINK_STEPS_POWER - 1.0)
        shrinking = shrinking * np.minimum(ratio**SHRINK_STEPS_POWER, below_knee)
    return np.where(finite, shrinking, np.nan)


def _history_component(error: np.ndarray, min_scale: float = 0.1) -> np.ndarray:
    """Logistic of the one-sided robust z of the forecast error (NaN for clients without one)."""
    return _above_cohort(error, min_scale)


def _one_sided_z(value: np.ndarray, min_scale: float, below: bool = False) -> np.ndarray:
    """Robust z of how far ``value`` sits above (or ``below``) the cohort's median, 0 on the
    other side (spread at least ``min_scale``; NaN where unknown or with fewer than 3 known)."""
    value = np.asarray(value, np.float64)
    finite = np.isfinite(value)
    if finite.sum() < 3:
        return np.full(value.shape, np.nan)
    med = np.median(value[finite])
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(value[finite] - med))), min_scale)
    gap = med - value if below else value - med
    return np.where(finite, np.maximum(gap, 0.0) / scale, np.nan)


MISLABELED_MIN_SCALE = 0.15
"""Least spread of the cohort's template cosines in ``mislabeled`` (cosine units). Honest
clients' cosines spread most in rounds 2-3 (10% under -0.13 at Dirichlet 0.5, median 0.21); a
floor of 0.1 flagged 6 more honest client-rounds in the 180 replayed runs, 0.2 and 0.3 found 1
and 5 attackers fewer."""


def _mislabeled_component(template_cosine: np.ndarray) -> np.ndarray:
    """Logistic of the one-sided robust z of how far the update's template cosine sits below the
    cohort's (``detection.class_template_cosines``): the class it raises most, raised along
    features the model holds against that class, as training on wrong labels does."""
    return _logistic_of_abs(_one_sided_z(template_cosine, MISLABELED_MIN_SCALE, below=True))


def _above_cohort(value: np.ndarray, min_scale: float) -> np.ndarray:
    """Logistic of the one-sided robust z of how far ``value`` sits above the cohort's median."""
    return _logistic_of_abs(_one_sided_z(value, min_scale))


def _inert_component(effect: np.ndarray, min_scale: float = 0.5) -> np.ndarray:
    """Logistic (centred at a z of 5) of the one-sided robust z of how far the log effect per
    unit norm sits below the cohort's: an update that moves the validation losses far less than
    its norm promises (a random direction). Centred further out than the others because it is
    sharp: centred at 4 with a spread of at least 0.3 (log units), honest clients of a fresh seed
    scored 0.26 and 0.38 (3 of 100 honest client-rounds flagged at Dirichlet 0.5)."""
    return _logistic_of_abs(_one_sided_z(effect, min_scale, below=True), center=5.0)


def _validation_component(
    metrics: dict[str, np.ndarray], min_scale: float = VALIDATION_MIN_SCALE
) -> np.ndarray:
    """The larger of the one-sided robust z's (logistic) of the loss change on the server's
    validation examples and of the largest per-class change, against the cohort's: an update
    that makes the global model worse than the cohort's updates do (Zeno's score, cohort
    relative). ``min_scale`` (nats) keeps a cohort of near-equal changes from turning small
    differences into large z."""
    component = _above_cohort(metrics[VALIDATION_METRIC], min_scale)
    if CLASS_VALIDATION_METRIC in metrics:
        component = np.fmax(component, _above_cohort(metrics[CLASS_VALIDATION_METRIC], min_scale))
    return component


_COMPONENTS = {
    "norm_z": _norm_component,
    "loss_z": lambda m: _logistic_of_abs(m["loss_z"]),
    "cosine": lambda m: _cosine_component(m["cosine"], m.get("median_cosine")),
    "krum_score": lambda m: _krum_component(m["krum_score"]),
    "trimmed_share": lambda m: _trimmed_component(m["trimmed_share"]),
    "distance": lambda m: _distance_component(m["distance"]),
    "collusion": lambda m: _smaller_than_cohort(m["pair_gap"], 0.7, _not_copies(m)),
    "centrality": lambda m: _smaller_than_cohort(
        1.0 - np.asarray(m.get("cohort_cosine", m["cosine"])), 0.7, _not_copies(m)
    ),
    "cluster": lambda m: np.asarray(m["cluster_outlier"], np.float64),
    "history": lambda m: _history_component(m[HISTORY_METRIC]),
    "zero_update": lambda m: _norm_ratio_component(m["norm"], ratio=100.0, above=False),
    "oversized": lambda m: _norm_ratio_component(
        m["norm"], ratio=10.0, above=True, scale=m.get(NORM_SCALE_METRIC)
    ),
    "validation": _validation_component,
    "unaligned": lambda m: _unaligned_component(m["alignment"], m.get("kurtosis")),
    "inert": lambda m: _inert_component(m[EFFECT_METRIC]),
    "shrinking": lambda m: _shrinking_component(m["radial"], m.get(STEPS_METRIC)),
    "boosted": lambda m: np.asarray(m["boosted_group"], np.float64),
    "mislabeled": lambda m: _mislabeled_component(m["template_cosine"]),
}
_SOURCES = {
    "zero_update": "norm",
    "oversized": "norm",
    "unaligned": "alignment",
    "collusion": "pair_gap",
    "centrality": "cosine",
    "cluster": "cluster_outlier",
    "history": HISTORY_METRIC,
    "validation": VALIDATION_METRIC,
    "inert": EFFECT_METRIC,
    "shrinking": "radial",
    "boosted": "boosted_group",
    "mislabeled": "template_cosine",
}  # components whose measurement has another name


def anomaly_components(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each measurement mapped to ``[0, 1]`` (NaN where unknown), as combined in the score."""
    return {
        name: np.asarray(fn(metrics), np.float64)
        for name, fn in _COMPONENTS.items()
        if _SOURCES.get(name, name) in metrics
    }


def anomaly_score(
    metrics: dict[str, np.ndarray], weights: dict[str, float] | None = None, power: float = 1.0
) -> np.ndarray:
    """One anomaly score in ``[0, 1]`` per client: the weighted power mean of the components,
    plus each of :data:`ADDED_COMPONENTS` times its weight, raised to the largest
    :data:`SHARP_COMPONENTS` value (with a positive weight) that reaches :data:`SHARP_FLOOR`.

    Args:
        metrics: the dict returned by :func:`client_metrics` (components whose key is absent are
            skipped).
        weights: component name to non-negative weight, any of ``norm_z``, ``cosine``,
            ``krum_score``, ``trimmed_share``, ``loss_z``, ``distance``, ``collusion``,
            ``centrality``, ``cluster``, ``history``, ``zero_update``, ``oversized``,
            ``unaligned``, ``validation``, ``inert``, ``shrinking``, ``boosted``,
            ``mislabeled``. Names left out get weight 0. Defaults to
            :data:`DEFAULT_ANOMALY_WEIGHTS`.
        power: exponent of the power mean, >= 1: 1 (default) is the weighted mean, 2 the
            quadratic mean; larger values move the score towards the largest component (see the
            module docstring for why 1).

    Returns:
        Float64 array of length K. A client with no usable component scores 0. The score is
        permutation equivariant: reordering the rows reorders the scores.
    """
    weights = DEFAULT_ANOMALY_WEIGHTS if weights is None else weights
    unknown = sorted(set(weights) - set(_COMPONENTS))
    if unknown:
        raise ValueError(
            f"unknown anomaly weight(s) {unknown}. Expected names among {sorted(_COMPONENTS)}."
        )
    bad = {name: w for name, w in weights.items() if not (np.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"anomaly weights must be finite and non-negative. Received: {bad}.")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"at least one anomaly weight must be positive. Received: {weights}.")

    if not power >= 1:
        raise ValueError(f"power must be >= 1. Received: power={power!r}.")

    components = anomaly_components(metrics)
    k = len(next(iter(metrics.values()))) if metrics else 0
    total = np.zeros(k)
    weight_sum = np.zeros(k)
    for name, w in weights.items():
        if w <= 0 or name not in components or name in ADDED_COMPONENTS:
            continue
        comp = components[name]
        known = np.isfinite(comp)
        total += np.where(known, w * np.power(np.where(known, comp, 0.0), power), 0.0)
        weight_sum += np.where(known, w, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(weight_sum > 0, total / np.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    score = np.power(mean, 1.0 / power)
    for name in ADDED_COMPONENTS:
        if weights.get(name, 0.0) > 0 and name in components:
            score = score + weights[name] * np.nan_to_num(components[name], nan=0.0)
    for name in SHARP_COMPONENTS:
        if weights.get(name, 0.0) > 0 and name in components:
            sharp = np.nan_to_num(components[name], nan=0.0)
            score = np.maximum(score, np.where(sharp >= SHARP_FLOOR, sharp, 0.0))
    return np.clip(score, 0.0, 1.0)


def component_parts(
    excess: Mapping[str, float],
    last: Mapping[str, float],
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each component's part in a client's anomaly score above the population's, to rank the
    signals behind a flag (``trust.explain``): its ``excess`` over the population times how much
    of the score one unit of it makes under ``weights`` (:data:`DEFAULT_ANOMALY_WEIGHTS` by
    default). That is its weight over the sum of the averaged weights for an averaged component,
    its weight for an added one, and all of it for a sharp one whose ``last`` value reached
    :data:`SHARP_FLOOR` (the score's floor). A component of weight 0 is measured, not scored,
    and has no part; nor has one without a positive excess.

      >>> weights = {"cosine": 0.3, "shrinking": 0.2, "collusion": 0.2}
      >>> component_parts({"cosine": 0.5, "shrinking": 0.5, "collusion": 0.9, "loss_z": 0.9},
      ...                 {"collusion": 0.95}, weights)
      {'cosine': 0.3, 'shrinking': 0.1, 'collusion': 0.9}
    """
    weights = DEFAULT_ANOMALY_WEIGHTS if weights is None else weights
    averaged = sum(w for n, w in weights.items() if w > 0 and n not in ADDED_COMPONENTS)

    def share(name: str) -> float:
        w = weights.get(name, 0.0)
        if w <= 0:
            return 0.0
        if name in ADDED_COMPONENTS:
            return w
        if name in SHARP_COMPONENTS and last.get(name, 0.0) >= SHARP_FLOOR:
            return 1.0
        return w / averaged

    parts = {n: share(n) * e for n, e in excess.items() if e > 0}
    return {n: part for n, part in parts.items() if part > 0}


def anomaly_as_original(
    metrics: dict[str, np.ndarray], score: np.ndarray, weights: dict[str, float] | None = None
) -> np.ndarray:
    """Each client's anomaly score had no other client sent its update: for the members of a
    group of copies (``pair_gap`` under ``COPY_GAP``) ``collusion`` is left out, as for an
    original :func:`detection.copied_originals` recognises; the others keep ``score``, their
    :func:`anomaly_score` under the same ``weights``. The trust book keeps the difference, so
    that a client found later to be the original its copies copied can have it back
    (``TrustBook.update``, ``as_original``).

    ``centrality`` stays: copies pull the cohort's median towards them, but a crafted vector
    (ALIE's) is central without its copies too, and a sender of one that once sent it alone,
    looking ordinary, passed for the original of its group and was unflagged (ALIE, seed 4).
    """
    grouped = ~_not_copies(metrics) if "pair_gap" in metrics else np.zeros(len(score), bool)
    if not grouped.any():
        return score
    without = {**(DEFAULT_ANOMALY_WEIGHTS if weights is None else weights), "collusion": 0.0}
    return np.where(grouped, anomaly_score(metrics, without), score)


def cohort_anomaly(
    updates: np.ndarray,
    weights: dict[str, float] | None = None,
    trained_from: np.ndarray | None = None,
    norm_scale: float | None = None,
    output_kernel: tuple[int, int] | None = None,
) -> np.ndarray:
    """Every row's anomaly score against its cohort, as the coordinator scores a round.

    The reference is the cohort's coordinate-wise median, as in ``Coordinator.finish_round``;
    losses and the per-client history are not known here (they stay out of the score). This is
    the scoring rule a detector-aware attacker evaluates (``fedwarden.attacks.detector_aware``).

    Args:
        updates: ``(K, d)`` update matrix.
        weights: component weights, :data:`DEFAULT_ANOMALY_WEIGHTS` by default.
        trained_from: ``(d,)`` global weights the updates were trained from, for ``shrinking``;
            None leaves it out, as when the coordinator does not know them.
        norm_scale: the earlier rounds' honest update norm, for ``oversized``; None leaves it
            out, as in a coordinator's first round.
        output_kernel: ``(inputs, classes)`` of the model's dense output layer, for
            ``mislabeled`` (with ``trained_from``); None leaves it out.

    Returns:
        Float64 array of length K.
    """
    updates = np.asarray(updates)
    metrics = client_metrics(
        updates, np.median(updates, axis=0), None, weights=trained_from, output_kernel=output_kernel
    )
    if norm_scale is not None:
        metrics[NORM_SCALE_METRIC] = np.full(len(updates), float(norm_scale))
    return anomaly_score(metrics, weights)
