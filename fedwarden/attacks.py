"""Attacks for simulations: data poisoning and model poisoning, numpy only.

One ``Attack`` per run, built by name with literature defaults filled in::

    attack = build_attack("alie", {"num_classes": 10})
    x, y = attack.poison_data(x, y, rng)           # data attacks; model attacks: unchanged
    bad = attack.craft(honest, own, rng)           # model attacks: (m, d) float32
    asr = attack.asr_inputs(x_test, y_test)        # backdoor / targeted flip, else None

Registry: ``ATTACKS`` maps a name to ``AttackSpec(kind, builder)``. A builder takes the
attack's parameters as keyword-only arguments (their defaults are the literature defaults),
checks them, and returns the function that does the work:

- data builder returns ``poison(x, y, rng) -> (x, y)``;
- model builder returns ``craft(honest, own, rng) -> (m, d)``, where ``honest`` is this
  round's honest updates (omniscient attacker, as in the papers; when no honest client was
  sampled it is the malicious clients' own updates, the non-omniscient variant) and ``own``
  the malicious clients' normally trained updates. Rule-aware builders (``agr_tailored``,
  ``alie_optimized``, ``ipm_optimized``) return ``craft(honest, own, rng, aggregate=...)``,
  marked ``uses_aggregate``: ``aggregate(updates (K, d)) -> (d,)`` is the aggregation rule in
  use, which the caller passes (this module sits below ``fedwarden.aggregation`` and never
  imports it). ``detector_aware`` also takes ``trained_from``, the global weights the round
  started from (``ROUND_CONTEXT``).

Adding an attack is one builder plus one registry line. When an attacker attacks (from a start
round on, in every round or, on-off, in a share of them) is :func:`attacks_in_round`'s.

``num_classes`` and ``output_kernel`` (the ``(inputs, classes)`` of the model's dense output
layer, or None) are context parameters: the runner passes them to every attack; they reach only
the attacks (and plugins) that take them and are never an error for the others.

Evaluation conventions: a data attack with a ``target`` parameter sets ``target_class``;
one with a ``trigger_size`` parameter stamps the built-in trigger (``Attack.trigger``) and
its attack success rate is measured on triggered non-target test inputs; one with
``source`` and ``target`` set is a targeted flip, measured on source-class test inputs.

Plugins: ``build_attack("package.module:callable", params)``.

- Model poisoning (the default): ``callable(honest_updates, num_malicious, rng, **params)``
  returns a ``(num_malicious, d)`` float array. A keyword parameter named ``aggregate`` or
  ``trained_from`` receives that round context (``ROUND_CONTEXT``) instead of a parameter; None
  where the caller does not know it (a red-team agent knows its weights, not the rule).
- Data poisoning: decorate the callable with ``@fedwarden_data_attack`` (from this module);
  ``callable(x, y, rng, **params)`` returns new ``(x, y)`` arrays.

Inputs reach plugins as read-only views (copy before editing). A plugin whose parameters do
not fit its signature, which raises, or returns the wrong shape or dtype or NaN/Inf, gets an
``AttackError`` naming the plugin and the problem.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from fedwarden.plugins import load_callable, parse_options

DataFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
ModelFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]

CONTEXT_PARAMS = ("num_classes", "output_kernel")
PERTURBATIONS = ("std", "unit_vec", "sign")
_DATA_KIND_ATTR = "fedwarden_attack_kind"


class AttackError(ValueError):
    """Bad attack name, parameter or plugin; the message says what was expected and received."""


def fedwarden_data_attack(fn: Callable) -> Callable:
    """Mark a plugin callable ``fn(x, y, rng, **params) -> (x, y)`` as a data-poisoning attack.

    Example::

        @fedwarden_data_attack
        def swap_3_and_8(x, y, rng):
            y = y.copy()
            y[y == 3] = 8
            return x.copy(), y
    """
    setattr(fn, _DATA_KIND_ATTR, "data")
    return fn


# ---------------------------------------------------------------------------- param checks


def _number(name: str, value: Any, *, positive: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise AttackError(f"{name} must be {kind}. Received: {name}={value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0.0 <= value <= 1.0:
        raise AttackError(f"{name} must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AttackError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return value


def _label(name: str, value: Any, num_classes: int | None) -> int:
    value = _count(name, value, 0)
    if num_classes is not None and value >= num_classes:
        raise AttackError(
            f"{name} must be a class in 0..{num_classes - 1}. Received: {name}={value!r}"
        )
    return value


def _num_classes(value: Any, attack: str, *, required: bool) -> int | None:
    if value is None:
        if required:
            raise AttackError(
                f"{attack} needs num_classes (the simulation runner passes it). "
                "Received: num_classes=None"
            )
        return None
    return _count("num_classes", value, 2)


# ---------------------------------------------------------------------------- helpers


def stamp_trigger(x: np.ndarray, size: int) -> np.ndarray:
    """Return a copy of ``x`` with a white ``size x size`` square in the bottom-right corner.

    Images ``(N, H, W)`` or ``(N, H, W, C)`` get the square on every channel; flat features
    ``(N, F)`` get their last ``size`` features set to 1.0 (Gu et al. 2017, BadNets).
    """
    x = np.array(x, copy=True)
    if x.ndim == 2:
        if size > x.shape[1]:
            raise AttackError(f"trigger_size={size} exceeds the {x.shape[1]} features")
        x[:, -size:] = 1.0
    elif x.ndim >= 3:
        if size > min(x.shape[1], x.shape[2]):
            raise AttackError(f"trigger_size={size} exceeds the image size {x.shape[1:3]}")
        x[:, -size:, -size:, ...] = 1.0
    else:
        raise AttackError(f"expected inputs shaped (N, F) or (N, H, W[, C]). Received {x.shape}")
    return x


def _reference(honest: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Honest updates in float64, or the attackers' own when no honest client was sampled."""
    return np.asarray(honest if len(honest) else own, dtype=np.float64)


def _rows(vector: np.ndarray, m: int) -> np.ndarray:
    return np.repeat(vector[None, :], m, axis=0)


def _largest_feasible(ok: Callable[[float], bool], start: float = 1.0, steps: int = 60) -> float:
    """Largest ``g >= 0`` with ``ok(g)``, assuming ``ok(0)`` and a feasible set ``[0, g*]``.

    Doubling finds an infeasible upper bound, then bisection narrows ``[lo, hi]``; the value
    returned is always one that passed ``ok``.
    """
    lo, hi = 0.0, start
    for _ in range(200):
        if not ok(hi):
            break
        lo, hi = hi, 2.0 * hi
    else:
        return lo
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def attacks_in_round(
    client_id: str, round_number: int, *, start_round: int = 1, rate: float = 1.0, seed: int = 0
) -> bool:
    """Whether an attacker attacks in ``round_number``: from ``start_round`` on, and with
    ``rate`` under 1 in about that share of its rounds (an on-off attacker: honest in the
    others, so its evidence builds slower). A coin drawn from the run's seed, the client and
    the round, so every process that trains the client (a simulation, a Ray actor, a red-team
    agent) decides alike."""
    if round_number < start_round:
        return False
    if rate >= 1.0:
        return True
    stream = [seed, 7, round_number, zlib.crc32(client_id.encode())]
    return bool(np.random.default_rng(stream).random() < rate)


# ---------------------------------------------------------------------------- data attacks


def no_attack() -> None:
    """No attack: honest behaviour for every client (the baseline run)."""
    return None


def label_flip(
    *, num_classes: int | None = None, source: int | None = None, target: int | None = None
) -> DataFn:
    """Label flipping: every label y -> C-1-y (Fang et al. 2020), or only source -> target.

    With ``source`` and ``target`` set it is the targeted flip of Tolpegin et al. 2020; the
    attack success rate is then measured on source-class test inputs.

    References:
        Fang et al., "Local Model Poisoning Attacks to Byzantine-Robust Federated
        Learning", USENIX Security 2020.
        Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems",
        ESORICS 2020.
    """
    targeted = source is not None or target is not None
    classes = _num_classes(num_classes, "label_flip (all labels)", required=not targeted)
    if targeted:
        if source is None or target is None:
            raise AttackError(
                "a targeted label_flip needs both source and target. "
                f"Received: source={source!r}, target={target!r}"
            )
        source, target = _label("source", source, classes), _label("target", target, classes)
        if source == target:
            raise AttackError(f"source and target must differ. Received: both {source}")

    def poison(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        if targeted:
            return x.copy(), np.where(y == source, target, y).astype(y.dtype)
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise AttackError(f"labels must be in 0..{classes - 1} for label_flip")
        return x.copy(), (classes - 1 - y).astype(y.dtype)

    return poison


def backdoor(
    *,
    target: int = 0,
    poison_fraction: float = 0.5,
    trigger_size: int = 3,
    boost: float = 1.0,
    num_classes: int | None = None,
) -> DataFn:
    """Backdoor: trigger stamped on poison_fraction=0.5 of samples relabelled to target=0.

    The trigger is a white ``trigger_size`` (3) square in the bottom-right corner of images
    (BadNets), or the last ``trigger_size`` features set to 1.0 for flat data. Exactly
    ``round(poison_fraction * N)`` samples, drawn without replacement, are replaced by their
    stamped, relabelled copies. ``boost`` > 1 also scales the update trained on them (model
    replacement, Bagdasaryan et al. 2020; the setting Sun et al. 2019 defend with norm clipping).

    References:
        Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model
        Supply Chain", 2017.
        Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020.
    """
    classes = _num_classes(num_classes, "backdoor", required=False)
    target = _label("target", target, classes)
    poison_fraction = _fraction("poison_fraction", poison_fraction)
    trigger_size = _count("trigger_size", trigger_size, 1)
    _number("boost", boost)

    def poison(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        chosen = rng.choice(len(y), size=round(poison_fraction * len(y)), replace=False)
        x_new, y_new = x.copy(), y.copy()
        x_new[chosen] = stamp_trigger(x[chosen], trigger_size)
        y_new[chosen] = target
        return x_new, y_new

    return poison


def dba(
    *,
    target: int = 0,
    poison_fraction: float = 0.3125,
    trigger_size: int = 4,
    num_parts: int = 4,
    boost: float = 1.0,
    num_classes: int | None = None,
) -> DataFn:
    """Distributed backdoor (DBA): each attacker trains on one part of the global trigger.

    The global trigger is the ``trigger_size`` (4) square of ``backdoor``; it is cut into
    ``num_parts`` (4) horizontal bands, so each local trigger is a 1 x 4 bar as in the paper's
    MNIST setting (the paper leaves a gap between the bars; here they touch). The k-th
    malicious client poisoned gets band k mod num_parts; ``poison_fraction`` = 20/64 of its
    samples (the paper's 20 poisoned images per batch of 64) carry its band and the label
    ``target``. The attack success rate is measured with the full trigger, as in the paper.

    References:
        Xie, Huang, Chen and Li, "DBA: Distributed Backdoor Attacks against Federated
        Learning", ICLR 2020.
    """
    classes = _num_classes(num_classes, "dba", required=False)
    target = _label("target", target, classes)
    poison_fraction = _fraction("poison_fraction", poison_fraction)
    trigger_size = _count("trigger_size", trigger_size, 1)
    num_parts = _count("num_parts", num_parts, 1)
    if num_parts > trigger_size:
        raise AttackError(
            f"num_parts must be at most trigger_size={trigger_size}. Received: num_parts={num_parts}"
        )
    _number("boost", boost)
    clients_poisoned = [0]

    def poison(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        part = clients_poisoned[0] % num_parts
        clients_poisoned[0] += 1
        chosen = rng.choice(len(y), size=round(poison_fraction * len(y)), replace=False)
        x_new, y_new = x.copy(), y.copy()
        x_new[chosen] = stamp_trigger_part(x[chosen], trigger_size, part, num_parts)
        y_new[chosen] = target
        return x_new, y_new

    return poison


def stamp_trigger_part(x: np.ndarray, size: int, part: int, num_parts: int) -> np.ndarray:
    """``stamp_trigger``'s square restricted to its ``part``-th of ``num_parts`` horizontal bands.

    Flat features ``(N, F)``: the matching slice of the last ``size`` features. The bands of all
    parts together are exactly ``stamp_trigger(x, size)``.
    """
    full = stamp_trigger(x, size)
    lo, hi = part * size // num_parts, (part + 1) * size // num_parts
    out = np.array(x, copy=True)
    if x.ndim == 2:
        columns = slice(x.shape[1] - size + lo, x.shape[1] - size + hi)
        out[:, columns] = full[:, columns]
    else:
        rows = slice(x.shape[1] - size + lo, x.shape[1] - size + hi)
        out[:, rows] = full[:, rows]
    return out


def label_noise(*, num_classes: int | None = None, fraction: float = 0.5) -> DataFn:
    """Random labels: a fraction (0.5, a project default) of labels redrawn uniformly.

    The new label is uniform over all classes, so it may equal the old one (the random-label
    setting of Zhang et al. 2017); ``round(fraction * N)`` samples are redrawn.

    References:
        Zhang et al., "Understanding Deep Learning Requires Rethinking Generalization",
        ICLR 2017.
    """
    classes = _num_classes(num_classes, "label_noise", required=True)
    fraction = _fraction("fraction", fraction)

    def poison(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        chosen = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
        y_new = y.copy()
        y_new[chosen] = rng.integers(0, classes, size=len(chosen))
        return x.copy(), y_new

    return poison


# ---------------------------------------------------------------------------- model attacks


def sign_flip(*, scale: float = 1.0) -> ModelFn:
    """Sign flipping: send -scale * own update, scale=1 (Karimireddy et al. 2021 bit-flipping).

    References:
        Allen-Zhu et al., "Byzantine-Resilient Non-Convex Stochastic Gradient Descent",
        ICLR 2021 (sign-flipping attack).
        Karimireddy et al., "Learning from History for Byzantine Robust Optimization",
        ICML 2021 (bit-flipping: send the negative of the true update).
    """
    scale = _number("scale", scale)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return -scale * np.asarray(own, dtype=np.float64)

    return craft


def scaling(*, boost: float | None = None) -> ModelFn:
    """Model replacement: own update * boost, default boost = n / m (Bagdasaryan et al. 2020).

    The paper scales by gamma = n / eta (n clients per round, eta the server learning rate);
    with m attackers sharing the job and eta = 1, each boosts by n / m, with n = h + m this
    round's cohort. Pass ``boost`` for a fixed factor (e.g. 10, or n / eta when eta != 1).
    Pair with a backdoored local dataset for the paper's backdoor-by-replacement.

    References:
        Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020.
    """
    boost = None if boost is None else _number("boost", boost)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = boost if boost is not None else (len(honest) + len(own)) / len(own)
        return factor * np.asarray(own, dtype=np.float64)

    return craft


def gaussian(*, sigma: float = 200.0, relative: bool = False) -> ModelFn:
    """Gaussian noise: updates drawn from N(0, sigma^2 I), sigma=200 (Blanchard et al. 2017).

    Each malicious client draws its own vector (one shared draw with ``collude``). With
    ``relative=True``, sigma is a multiplier of the honest updates' median per-coordinate
    standard deviation (a stealthier, scale-free variant; 200 still collapses plain
    averaging).

    References:
        Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
        Descent", NeurIPS 2017 (Gaussian Byzantine workers).
    """
    sigma = _number("sigma", sigma)
    if not isinstance(relative, bool):
        raise AttackError(f"relative must be true or false. Received: relative={relative!r}")

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spread = sigma
        if relative:
            spread = sigma * float(np.median(_reference(honest, own).std(axis=0)))
        return rng.normal(0.0, spread, size=own.shape)

    return craft


def alie(*, z: float | None = None) -> ModelFn:
    """A Little Is Enough: mean - z * std per coordinate, z from n and f (Baruch et al. 2019).

    Default z: s = floor(n/2 + 1) - f, z = Phi^{-1}((n - s) / n), with n = h + m this round's
    cohort and f = m; s is clamped to >= 1 when the attackers are a majority (the formula
    assumes f < n/2). The std is the population std (ddof=0) of the honest updates.

    References:
        Baruch et al., "A Little Is Enough: Circumventing Defenses For Distributed
        Learning", NeurIPS 2019.
    """
    z = None if z is None else _number("z", z, positive=False)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ref = _reference(honest, own)
        factor = alie_z(len(honest) + len(own), len(own)) if z is None else z
        return _rows(ref.mean(axis=0) - factor * ref.std(axis=0), len(own))

    return craft


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max for n clients of which f are malicious (Baruch et al. 2019, Sec. 3)."""
    s = max(math.floor(n / 2 + 1) - f, 1)
    p = (n - s) / n
    return NormalDist().inv_cdf(p) if 0.0 < p < 1.0 else 0.0


def ipm(*, epsilon: float = 0.1) -> ModelFn:
    """Inner Product Manipulation: -epsilon * mean of honest updates, epsilon=0.1 (Xie et al.).

    Small epsilon (0.1) keeps the malicious vectors close to the honest ones, which is what
    defeats Krum and median-type rules; against the plain mean, epsilon must exceed h / m
    to reverse the aggregate's direction.

    References:
        Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
        Product Manipulation", UAI 2019.
        Karimireddy et al., "Learning from History for Byzantine Robust Optimization",
        ICML 2021 (IPM with epsilon = 0.1).
    """
    epsilon = _number("epsilon", epsilon)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _rows(-epsilon * _reference(honest, own).mean(axis=0), len(own))

    return craft


def _optimized_attack(perturbation: str, use_sum: bool) -> ModelFn:
    """Shared body of min_max and min_sum: mean + gamma * perturbation, gamma maximised.

    Squared distances of the candidate ``mean + g * p`` to each honest ``x_i`` expand to
    ``a_i + 2 g b_i + g^2 c``, so each search step is O(h) after one pass over the data;
    honest pairwise distances come from one Gram matrix.
    """
    if perturbation not in PERTURBATIONS:
        raise AttackError(
            f"perturbation must be one of {', '.join(PERTURBATIONS)}. "
            f"Received: perturbation={perturbation!r}"
        )

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # One float64 copy, centred in place: distances are translation invariant and
        # centring avoids cancellation in the Gram-matrix expansion.
        centered = np.array(honest if len(honest) else own, dtype=np.float64)
        mean = centered.mean(axis=0)
        centered -= mean
        if perturbation == "std":
            p = -np.sqrt(np.einsum("ij,ij->j", centered, centered) / len(centered))
        elif perturbation == "sign":
            p = -np.sign(mean)
        else:
            norm = np.linalg.norm(mean)
            p = -mean / norm if norm > 0 else np.zeros_like(mean)
        a = np.einsum("ij,ij->i", centered, centered)  # ||mean - x_i||^2
        pair = np.maximum(a[:, None] + a[None, :] - 2.0 * (centered @ centered.T), 0.0)
        b = -(centered @ p)  # <mean - x_i, p>
        c = float(p @ p)
        if use_sum:
            bound = pair.sum(axis=1).max()
            a_sum, b_sum = a.sum(), b.sum()

            def ok(g: float) -> bool:
                return a_sum + 2.0 * g * b_sum + len(a) * g * g * c <= bound
        else:
            bound = pair.max()

            def ok(g: float) -> bool:
                return np.max(a + 2.0 * g * b + g * g * c) <= bound

        gamma = _largest_feasible(ok) if c > 0 else 0.0
        return _rows(mean + gamma * p, len(own))

    return craft


def min_max(*, perturbation: str = "std") -> ModelFn:
    """Min-Max (Shejwalkar & Houmansadr 2021): mean + gamma * p, max dist <= max honest pair dist.

    Perturbation p is -std (default, "inverse std"), "unit_vec" (-mean / ||mean||) or
    "sign" (-sign(mean)); gamma is the largest value meeting the bound, found by doubling
    and bisection (the paper's binary search, unbounded above).

    References:
        Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
        Attacks and Defenses for Federated Learning", NDSS 2021.
    """
    return _optimized_attack(perturbation, use_sum=False)


def min_sum(*, perturbation: str = "std") -> ModelFn:
    """Min-Sum (Shejwalkar & Houmansadr 2021): mean + gamma * p, sum of sq. dists <= max honest sum.

    The bound is the paper's max over honest i of sum_j ||x_i - x_j||^2 (the authors' code
    uses the min, a stricter bound). Perturbations as in ``min_max``.

    References:
        Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
        Attacks and Defenses for Federated Learning", NDSS 2021.
    """
    return _optimized_attack(perturbation, use_sum=True)


def random_direction(*, scale: float = 1.0) -> ModelFn:
    """Random directions at the honest scale: uniform unit vectors times the median honest norm.

    Norm-based filters cannot see it (its norm is typical); only its direction gives it away.
    A project attack for testing detection beyond norms; ``scale`` multiplies the norm.
    """
    scale = _number("scale", scale)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        norm = float(np.median(np.linalg.norm(_reference(honest, own), axis=1)))
        directions = rng.normal(size=own.shape)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return directions * norm * scale

    return craft


def free_rider() -> ModelFn:
    """Free rider: zero update, i.e. the received global model sent back (Fraboni et al. 2021).

    References:
        Fraboni, Vidal and Lorenzi, "Free-rider Attacks on Model Aggregation in Federated
        Learning", AISTATS 2021 (plain free-riding).
    """

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(own.shape, dtype=np.float32)

    return craft


# ---------------------------------------------------------------- rule-aware model attacks
#
# The strongest published attacks search their scale against the aggregation rule in use. The
# rule reaches them as ``aggregate(updates (K, d)) -> (d,)`` (attacks sit below aggregation, so
# the caller passes it: the simulation runner hands in its own chain). Without it they target
# the plain mean.

AggregateFn = Callable[[np.ndarray], np.ndarray]

ROUND_CONTEXT = ("aggregate", "trained_from")
"""What a craft function may ask of the round, by keyword: ``aggregate``, the rule in use, and
``trained_from``, the ``(d,)`` global weights the round's updates were trained from."""


def _takes(*context: str) -> Callable[[Callable], Callable]:
    """Marks a craft function that takes these of :data:`ROUND_CONTEXT` as keyword arguments."""

    def mark(craft: Callable) -> Callable:
        craft.round_context = context
        return craft

    return mark


_rule_aware = _takes("aggregate")


def _mean_rule(updates: np.ndarray) -> np.ndarray:
    return updates.mean(axis=0)


def _aggregated(aggregate: AggregateFn | None, bad: np.ndarray, honest: np.ndarray) -> np.ndarray:
    rule = aggregate or _mean_rule
    cohort = np.concatenate([bad, honest]).astype(np.float32)
    return np.asarray(rule(cohort), dtype=np.float64).reshape(-1)


def _halving_search(
    objective: Callable[[float], float], start: float = 10.0, tolerance: float = 1e-5
) -> float:
    """The scale search of Shejwalkar & Houmansadr 2021, Algorithm 1 (gamma_init=10, tau=1e-5).

    Steps up by half the last step while the objective grows, down otherwise, halving the step
    each time, until the step is below ``tolerance``. Unlike the paper's loop, which compares
    with the previous value only, it returns the best scale seen (0 if no scale beats doing
    nothing), so a rule that no scale can move gets the honest mean.
    """
    best_scale, best = 0.0, objective(0.0)
    scale, step, previous = start, start / 2.0, -np.inf
    while step > tolerance:
        value = objective(scale)
        if value > best:
            best_scale, best = scale, value
        scale = scale + step if value > previous else max(scale - step, 0.0)
        previous = value
        step /= 2.0
    return best_scale


def _direction(perturbation: str, centered: np.ndarray, mean: np.ndarray) -> np.ndarray:
    if perturbation == "std":
        return -np.sqrt((centered * centered).mean(axis=0))
    if perturbation == "sign":
        return -np.sign(mean)
    norm = np.linalg.norm(mean)
    return -mean / norm if norm > 0 else np.zeros_like(mean)


STEALTH = ("none", "min_max", "min_sum")


def _within(stealth: str, ref: np.ndarray) -> Callable[[np.ndarray], bool]:
    """Whether a crafted vector meets min-max's or min-sum's distance bound (always, for none)."""
    sq = (ref * ref).sum(axis=1)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2.0 * ref @ ref.T, 0.0)

    def ok(v: np.ndarray) -> bool:
        dist = np.maximum(sq - 2.0 * ref @ v + v @ v, 0.0)
        if stealth == "min_max":
            return bool(np.sqrt(dist.max()) <= np.sqrt(pair.max()))
        if stealth == "min_sum":
            return bool(dist.sum() <= pair.sum(axis=1).max())
        return True

    return ok


def _tailored(perturbation: str, start: float, tolerance: float, stealth: str = "none") -> ModelFn:
    """Mean + gamma * p with gamma maximising ||rule(crafted + honest) - honest mean||."""

    @_rule_aware
    def craft(honest, own, rng, aggregate=None) -> np.ndarray:
        ref = _reference(honest, own)
        mean = ref.mean(axis=0)
        p = _direction(perturbation, ref - mean, mean)
        m = len(own)
        within = _within(stealth, ref)

        def deviation(gamma: float) -> float:
            if not within(mean + gamma * p):
                return -np.inf
            bad = _rows(mean + gamma * p, m)
            return float(np.linalg.norm(_aggregated(aggregate, bad, ref) - mean))

        return _rows(mean + _halving_search(deviation, start, tolerance) * p, m)

    return craft


def agr_tailored(
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
    stealth: str = "none",
) -> ModelFn:
    """AGR-tailored (Shejwalkar & Houmansadr 2021): mean + gamma * p, gamma searched on the rule.

    Maximises the deviation ``||rule(malicious + honest) - honest mean||`` over gamma with the
    paper's halving search from ``gamma_init`` = 10 down to steps of ``tolerance`` = 1e-5, using
    the aggregation rule actually in use (passed by the caller; the mean without it). The
    perturbation p is -std (default), "unit_vec" or "sign", as in ``min_max``. ``gamma_init`` is
    the strength knob (it bounds the search at about 2 * gamma_init). ``stealth`` "min_max" or
    "min_sum" only accepts scales that also meet that attack's distance bound (the malicious
    update no farther from the honest ones than they are from each other), so distance-based
    detectors see nothing unusual: min-max and min-sum searched against the rule in use.

    References:
        Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
        Attacks and Defenses for Federated Learning", NDSS 2021 (AGR-tailored attacks).
    """
    _check_perturbation(perturbation)
    if stealth not in STEALTH:
        raise AttackError(f"stealth must be one of {', '.join(STEALTH)}. Received: {stealth!r}")
    return _tailored(
        perturbation, _number("gamma_init", gamma_init), _number("tolerance", tolerance), stealth
    )


def _check_perturbation(perturbation: str) -> None:
    if perturbation not in PERTURBATIONS:
        raise AttackError(
            f"perturbation must be one of {', '.join(PERTURBATIONS)}. "
            f"Received: perturbation={perturbation!r}"
        )


def alie_optimized(*, z_init: float = 1.0, tolerance: float = 1e-5) -> ModelFn:
    """ALIE with z optimised against the rule: mean - z * std, z maximising the deviation.

    Same crafted vector as ``alie``, but z is searched (halving search from ``z_init``, the
    strength knob) to maximise ``||rule(malicious + honest) - honest mean||`` for the rule in
    use, as the later literature runs ALIE (Shejwalkar & Houmansadr 2021 optimise the same
    -std direction), rather than the paper's closed-form z.

    References:
        Baruch et al., "A Little Is Enough: Circumventing Defenses For Distributed
        Learning", NeurIPS 2019.
        Shejwalkar and Houmansadr, NDSS 2021 (scale optimisation against the rule).
    """
    return _tailored("std", _number("z_init", z_init), _number("tolerance", tolerance))


IPM_EPSILONS = tuple(float(e) for e in np.geomspace(0.01, 100.0, 25))


def ipm_optimized(*, max_epsilon: float = 100.0) -> ModelFn:
    """IPM with epsilon optimised against the rule: -epsilon * honest mean, epsilon in [0.01, 100].

    Picks, from 25 log-spaced values between 0.01 and ``max_epsilon`` (the strength knob; 100
    is the paper's large setting, 0.1 its small one), the epsilon whose crafted updates make
    the rule's output have the lowest inner product with the honest mean, the quantity the
    attack is named after.

    References:
        Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
        Product Manipulation", UAI 2019.
    """
    max_epsilon = _number("max_epsilon", max_epsilon)
    candidates = [e for e in IPM_EPSILONS if e <= max_epsilon] or [max_epsilon]

    @_rule_aware
    def craft(honest, own, rng, aggregate=None) -> np.ndarray:
        ref = _reference(honest, own)
        mean = ref.mean(axis=0)

        def inner(epsilon: float) -> float:
            return float(_aggregated(aggregate, _rows(-epsilon * mean, len(own)), ref) @ mean)

        best = min(candidates, key=inner)
        return _rows(-best * mean, len(own))

    return craft


def fang_trim(*, b: float = 2.0) -> ModelFn:
    """Fang et al.'s full-knowledge trim attack: push every coordinate against the honest direction.

    For each coordinate j with honest direction s_j = sign(mean_j), the malicious values are
    drawn uniformly beyond the honest extreme on the other side: where s_j > 0, from
    [min_j / b, min_j] if min_j > 0 else [b * min_j, min_j]; where s_j <= 0, from
    [max_j, b * max_j] if max_j > 0 else [max_j, max_j / b]. b = 2 as in the paper; a larger b
    is a stronger (and more visible) attack. Built against trimmed mean and median.

    References:
        Fang, Cao, Jia and Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated
        Learning", USENIX Security 2020 (Section 4.3, full knowledge).
    """
    b = _number("b", b)
    if b <= 1.0:
        raise AttackError(f"b must be greater than 1. Received: b={b!r}")

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ref = _reference(honest, own)
        lo, hi = ref.min(axis=0), ref.max(axis=0)
        below = np.where(lo > 0, lo / b, b * lo), lo  # range under the honest minimum
        above = hi, np.where(hi > 0, b * hi, hi / b)  # range over the honest maximum
        push_down = ref.mean(axis=0) > 0
        start = np.where(push_down, below[0], above[0])
        stop = np.where(push_down, below[1], above[1])
        return start + rng.uniform(size=own.shape) * (stop - start)

    return craft


def _krum_choice(updates: np.ndarray, num_byzantine: int) -> int:
    sq = (updates * updates).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * updates @ updates.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    neighbours = max(len(updates) - num_byzantine - 2, 1)
    return int(np.argmin(np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)))


def fang_krum(*, threshold: float = 1e-5) -> ModelFn:
    """Fang et al.'s full-knowledge Krum attack: -lambda * s, the largest lambda Krum still picks.

    With s the sign of the honest mean update, every malicious client sends ``-lambda * s``
    (the paper's w'_1 with its copies at epsilon -> 0). lambda starts at the paper's upper bound,
    ``min_i sum_{l in Gamma_i} ||x_l - x_i|| / ((n - 2c - 1) sqrt(d)) + max_i ||x_i|| / sqrt(d)``
    over honest i (Gamma_i: its n - c - 2 nearest honest updates), and is halved until Krum with
    f = c picks a malicious update or lambda falls under ``threshold`` (1e-5, the paper's; the
    strength knob: a larger threshold gives up sooner). With n - 2c - 1 <= 0 the bound's first
    term is dropped.

    References:
        Fang, Cao, Jia and Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated
        Learning", USENIX Security 2020 (Section 4.2, full knowledge).
    """
    threshold = _number("threshold", threshold)

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ref = _reference(honest, own)
        h, d = ref.shape
        c = len(own)
        n = h + c
        s = np.sign(ref.mean(axis=0))
        dist = np.sqrt(np.maximum(((ref[:, None, :] - ref[None, :, :]) ** 2).sum(-1), 0.0))
        np.fill_diagonal(dist, np.inf)
        near = min(max(n - c - 2, 1), max(h - 1, 1))
        bound = np.max(np.linalg.norm(ref, axis=1)) / math.sqrt(d)
        if n - 2 * c - 1 > 0 and h > 1:
            spread = np.sort(dist, axis=1)[:, :near].sum(axis=1).min()
            bound += spread / ((n - 2 * c - 1) * math.sqrt(d))
        lam = bound
        while lam >= threshold:
            cohort = np.concatenate([_rows(-lam * s, c), ref])
            if _krum_choice(cohort, c) < c:
                return _rows(-lam * s, c)
            lam /= 2.0
        return _rows(-lam * s, c)

    return craft


def mimic() -> ModelFn:
    """Mimic (Karimireddy, He and Jaggi 2022): every attacker copies one chosen honest update.

    The copied client is the honest one farthest along the honest updates' top principal
    direction (found by power iteration), so the copies over-weight the direction in which the
    clients' data differ most; under heterogeneity this biases robust rules towards one
    client's data without ever sending an outlier. The paper estimates the direction over a
    warm-up phase with all workers present; with sampled cohorts this picks it afresh each
    round from the honest updates in it.

    References:
        Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
        Bucketing", ICLR 2022 (mimic attack).
    """

    def craft(honest: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ref = _reference(honest, own)
        centered = ref - ref.mean(axis=0)
        v = rng.normal(size=ref.shape[1])
        for _ in range(20):  # power iteration on centered^T centered
            v = centered.T @ (centered @ v)
            norm = np.linalg.norm(v)
            if norm == 0:
                break
            v /= norm
        chosen = int(np.argmax(np.abs(centered @ v)))
        return _rows(ref[chosen], len(own))

    return craft


# ---------------------------------------------------------------- detector-aware model attack

DEFAULT_SCORER = "fedwarden.aggregation.scoring:cohort_anomaly"
"""The scoring rule ``detector_aware`` evaluates, named rather than imported (attacks sit below
``fedwarden.aggregation``)."""


def detector_aware(
    *, score: Any = DEFAULT_SCORER, z: float = 1.0, direction: str = "mean",
    min_scale: float = 0.03, max_gamma: float = 64.0, output_kernel: Any = None,
) -> ModelFn:  # fmt: skip
    """An attacker that reads the detector: the strongest push whose anomaly stays unflagged.

    Each attacker starts from its own honestly trained update (so it keeps its own spread, its
    own history and no twin among the attackers) and adds ``gamma * n * p``: ``p`` the unit
    vector against the honest mean (``direction="mean"``, as IPM) or against the honest
    coordinate spread (``"std"``, as ALIE), ``n`` the attackers' median update norm. Given the
    global weights the round was trained from, ``p`` is made orthogonal to them, so the push
    leaves each update's inner product with the weights (what ``shrinking`` reads) as trained.
    gamma, the same for all attackers, is the largest (up to ``max_gamma``) for which
    ``score``, evaluated on the whole cohort, keeps every attacker at or below
    ``median + z * scale`` of the honest clients' scores (scale: 1.4826 MAD, at least
    ``min_scale``), found by doubling and bisection as the optimised attacks search their
    strength. The detector flags when a client's evidence, which grows with rounds seen, passes
    ``TrustPolicy.flag_z`` (4.98 at the default false-positive rate 0.003), so ``z`` is the
    strength knob: the same z every round adds up to at most 1.61 z of evidence (memory 0.6,
    ``evidence_rounds`` 3 in ``server/trust.py``), so a z near 3 stays under the line.

    What it cannot see: the server's per-client history signal, the population pool of earlier
    rounds and the cohort's example counts (the coordinator judges norms against local step
    counts); its own round's cohort stands in for the population.

    Args:
        score: ``score(updates (K, d)[, trained_from=(d,), norm_scale=x, output_kernel=(i, c)])
            -> (K,)`` anomaly scores, or its ``"module:callable"`` name (default: the
            coordinator's cohort scoring). It gets ``trained_from`` when it takes that keyword
            and the weights are known, ``norm_scale`` (the attackers' median own norm, standing
            in for the earlier rounds' honest norms the coordinator keeps) and ``output_kernel``
            (given) when it takes them.
        z: how many honest scales above the honest median each attacker may score.
        direction: ``"mean"`` or ``"std"``.
        min_scale: smallest scale of the honest scores.
        max_gamma: largest push, in units of the attackers' update norm.
        output_kernel: the model's output kernel shape (a context parameter the runner passes),
            for the scorer's ``mislabeled`` component.
    """
    z = _number("z", z, positive=False)
    min_scale = _number("min_scale", min_scale)
    max_gamma = _number("max_gamma", max_gamma)
    if direction not in ("mean", "std"):
        raise AttackError(f"direction must be mean or std. Received: direction={direction!r}")
    scorer = _load_plugin(score) if isinstance(score, str) else score
    if not callable(scorer):
        raise AttackError(f"score must be a callable or 'module:callable'. Received: {score!r}")
    found = _signature(scorer, skip=1)
    scorer_takes = {
        name
        for name in ("trained_from", "norm_scale", "output_kernel")
        if found is not None and (name in found[0] or found[1])
    }
    if output_kernel is None:
        scorer_takes.discard("output_kernel")

    @_takes("trained_from")
    def craft(honest, own, rng, trained_from=None) -> np.ndarray:
        own = np.asarray(own, np.float64)
        if len(honest) < 2:  # nothing to hide among: send the honest update
            return own
        ref = np.asarray(honest, np.float64)
        p = -ref.mean(axis=0) if direction == "mean" else -ref.std(axis=0)
        context: dict[str, Any] = {}
        if "output_kernel" in scorer_takes:
            context["output_kernel"] = tuple(output_kernel)
        if (
            "norm_scale" in scorer_takes
        ):  # its own honest training stands in for earlier rounds' norms
            context["norm_scale"] = float(np.median(np.linalg.norm(own, axis=1)))
        if trained_from is not None:
            w = np.asarray(trained_from, np.float64)
            if w @ w > 0:
                p = p - (p @ w) / (w @ w) * w
            if "trained_from" in scorer_takes:
                context["trained_from"] = trained_from
        norm = float(np.linalg.norm(p))
        if norm == 0:
            return own
        push = p / norm * float(np.median(np.linalg.norm(own, axis=1)))

        def unflagged(gamma: float) -> bool:
            cohort = np.concatenate([ref, own + gamma * push])
            scores = np.asarray(scorer(cohort, **context), np.float64)
            mine, theirs = scores[len(ref) :], scores[: len(ref)]
            med = float(np.median(theirs))
            scale = max(1.4826 * float(np.median(np.abs(theirs - med))), min_scale)
            return bool(np.max(mine) <= med + z * scale)

        if not unflagged(0.0):
            return own
        lo, hi = 0.0, min(0.25, max_gamma)
        while hi < max_gamma and unflagged(hi):
            lo, hi = hi, min(2.0 * hi, max_gamma)
        if unflagged(hi):
            return own + hi * push
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if unflagged(mid) else (lo, mid)
        return own + lo * push

    return craft


# ---------------------------------------------------------------------------- registry


class AttackSpec(NamedTuple):
    """A registry entry: ``kind`` ("data", "model" or "none") and the parameter-taking builder."""

    kind: str
    builder: Callable[..., Any]


ATTACKS: dict[str, AttackSpec] = {
    "none": AttackSpec("none", no_attack),
    "label_flip": AttackSpec("data", label_flip),
    "backdoor": AttackSpec("data", backdoor),
    "label_noise": AttackSpec("data", label_noise),
    "sign_flip": AttackSpec("model", sign_flip),
    "scaling": AttackSpec("model", scaling),
    "gaussian": AttackSpec("model", gaussian),
    "alie": AttackSpec("model", alie),
    "ipm": AttackSpec("model", ipm),
    "min_max": AttackSpec("model", min_max),
    "min_sum": AttackSpec("model", min_sum),
    "free_rider": AttackSpec("model", free_rider),
    "random_direction": AttackSpec("model", random_direction),
    "dba": AttackSpec("data", dba),
    "fang_trim": AttackSpec("model", fang_trim),
    "fang_krum": AttackSpec("model", fang_krum),
    "agr_tailored": AttackSpec("model", agr_tailored),
    "alie_optimized": AttackSpec("model", alie_optimized),
    "ipm_optimized": AttackSpec("model", ipm_optimized),
    "mimic": AttackSpec("model", mimic),
    "detector_aware": AttackSpec("model", detector_aware),
}


# ---------------------------------------------------------------------------- Attack


def _readonly(array: np.ndarray) -> np.ndarray:
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


class Attack:
    """One run's attack: what the malicious clients do to their data or their updates.

    Built by ``build_attack``; ``params`` holds every parameter with its default filled in.
    Inputs are never mutated.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        fn: Callable | None,
        params: dict[str, Any],
        collude: bool = False,
        plugin: bool = False,
        round_context: tuple[str, ...] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.params = params
        self.collude = collude
        target = params.get("target")
        self.target_class: int | None = target if kind == "data" and _is_int(target) else None
        self._fn = fn
        self._plugin = plugin
        # What the craft function asks of the round (ROUND_CONTEXT): rule-aware attacks search
        # their scale against the aggregation rule in use.
        if round_context is None:
            round_context = tuple(getattr(fn, "round_context", ()))
        self.round_context = round_context
        self.uses_aggregate = "aggregate" in self.round_context

    def __repr__(self) -> str:
        return (
            f"Attack(name={self.name!r}, kind={self.kind!r}, params={self.params!r}, "
            f"collude={self.collude!r})"
        )

    def _fail(self, problem: str) -> AttackError:
        who = f"attack plugin {self.name!r}" if self._plugin else f"attack {self.name!r}"
        return AttackError(f"{who} {problem}")

    def _call(self, *args: Any, **context: Any) -> Any:
        if not self._plugin:
            return self._fn(*args)
        try:
            return self._fn(*args, **context, **self.params)
        except Exception as error:
            raise self._fail(f"raised {type(error).__name__}: {error}") from error

    def poison_data(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """One malicious client's poisoned local data (new arrays); inputs if not a data attack."""
        if self.kind != "data":
            return x, y
        x, y = np.asarray(x), np.asarray(y)
        result = self._call(_readonly(x), _readonly(y), rng)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise self._fail(f"must return a tuple (x, y). Received: {type(result).__name__}")
        x_new, y_new = np.asarray(result[0]), np.asarray(result[1])
        if x_new.shape[1:] != x.shape[1:] or y_new.shape != (len(x_new),):
            expected = ", ".join(["N", *map(str, x.shape[1:])])
            raise self._fail(
                f"returned x {x_new.shape} and y {y_new.shape}; "
                f"expected x shaped ({expected}) and y shaped (N,)"
            )
        if not np.issubdtype(x_new.dtype, np.floating):
            raise self._fail(f"returned x of dtype {x_new.dtype}; expected a float array")
        if not np.issubdtype(y_new.dtype, np.integer):
            raise self._fail(f"returned y of dtype {y_new.dtype}; expected integer labels")
        if not np.isfinite(x_new).all():
            raise self._fail("returned x with NaN or Inf values")
        classes = self.params.get("num_classes")
        if classes is not None and y_new.size and (y_new.min() < 0 or y_new.max() >= classes):
            raise self._fail(f"returned labels outside 0..{classes - 1}")
        x_new = x_new.astype(x.dtype, copy=np.may_share_memory(x_new, x))
        y_new = y_new.astype(y.dtype, copy=np.may_share_memory(y_new, y))
        return x_new, y_new

    def craft(
        self,
        honest: np.ndarray,
        own: np.ndarray,
        rng: np.random.Generator,
        aggregate: AggregateFn | None = None,
        trained_from: np.ndarray | None = None,
    ) -> np.ndarray:
        """The ``(m, d)`` float32 updates the m malicious clients send instead of ``own``.

        ``honest`` is this round's ``(h, d)`` honest updates; ``own`` the ``(m, d)`` updates
        the malicious clients trained normally. ``aggregate(updates (K, d)) -> (d,)`` is the
        aggregation rule in use, for the attacks that search their scale against it
        (``uses_aggregate``); they target the mean without it. ``trained_from`` is the ``(d,)``
        global weights the updates were trained from, for the attacks that read them
        (``round_context``); None when unknown. A data attack returns ``own``, times its
        ``boost`` parameter when it has one (boosted data poisoning = model replacement).
        """
        if self.kind == "data":
            boost = self.params.get("boost", 1.0)
            return own if boost == 1.0 else np.asarray(own, np.float32) * np.float32(boost)
        if self.kind != "model":
            return own
        own = np.asarray(own)
        if own.ndim != 2:
            raise AttackError(f"own updates must be shaped (m, d). Received: {own.shape}")
        honest = np.asarray(honest)
        if honest.size == 0:
            honest = honest.reshape(0, own.shape[1])
        if honest.ndim != 2 or honest.shape[1] != own.shape[1]:
            raise AttackError(
                f"honest updates must be shaped (h, {own.shape[1]}). Received: {honest.shape}"
            )
        if len(own) == 0:
            return own.astype(np.float32)
        if trained_from is not None:
            trained_from = np.asarray(trained_from)
            if trained_from.shape != (own.shape[1],):
                raise AttackError(
                    f"trained_from must be shaped ({own.shape[1]},). Received: {trained_from.shape}"
                )
            trained_from = _readonly(trained_from)
        given = {"aggregate": aggregate, "trained_from": trained_from}
        context = {name: given[name] for name in self.round_context}
        if self._plugin:
            out = self._call(_readonly(honest), len(own), rng, **context)
        else:
            out = self._fn(_readonly(honest), _readonly(own), rng, **context)
        out = np.asarray(out)
        if out.shape != own.shape:
            raise self._fail(f"returned shape {out.shape}; expected {own.shape} (num_malicious, d)")
        if not np.issubdtype(out.dtype, np.floating):
            raise self._fail(f"returned dtype {out.dtype}; expected a float array")
        if not np.isfinite(out).all() and np.isfinite(honest).all() and np.isfinite(own).all():
            # Only the attack is to blame: from a diverged training's NaN or Inf it may send
            # them on, and the server rejects (and counts) those updates like any others.
            raise self._fail("returned NaN or Inf values")
        if self.collude:
            out = out[:1]
        return np.array(np.broadcast_to(out, own.shape), dtype=np.float32)

    def trigger(self, x: np.ndarray) -> np.ndarray:
        """Test inputs with the backdoor trigger stamped on; only for backdoor-style attacks."""
        if "trigger_size" not in self.params:
            raise AttackError(f"attack {self.name!r} has no trigger; only backdoor attacks do")
        return stamp_trigger(x, self.params["trigger_size"])

    def asr_inputs(
        self, x_test: np.ndarray, y_test: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Inputs and target labels for the attack success rate, or None for untargeted attacks.

        Backdoor: triggered test inputs whose true label is not the target. Targeted label
        flip: test inputs of the source class. Labels are all ``target_class``.
        """
        if self.target_class is None:
            return None
        y_test = np.asarray(y_test)
        if "trigger_size" in self.params:
            keep = y_test != self.target_class
            x = self.trigger(np.asarray(x_test)[keep])
        elif self.params.get("source") is not None:
            keep = y_test == self.params["source"]
            x = np.array(np.asarray(x_test)[keep])
        else:
            return None
        return x, np.full(len(x), self.target_class, dtype=y_test.dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- building


_REQUIRED = object()


def _signature(fn: Callable, skip: int) -> tuple[dict[str, Any], bool] | None:
    """Parameters after the first ``skip``: name -> default (``_REQUIRED`` if none), **kwargs?"""
    try:
        parameters = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return None
    named = {
        p.name: _REQUIRED if p.default is inspect.Parameter.empty else p.default
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _fill_params(who: str, params: dict[str, Any], named: dict[str, Any], var_kw: bool) -> dict:
    """Defaults filled in; context params the attack does not take dropped; unknown rejected."""
    params = {k: v for k, v in params.items() if k in named or var_kw or k not in CONTEXT_PARAMS}
    unknown = [] if var_kw else sorted(set(params) - set(named))
    if unknown:
        accepted = ", ".join(sorted(named)) or "(none)"
        raise AttackError(f"{who} has no parameter {unknown[0]!r}. Accepted: {accepted}")
    missing = [k for k, v in named.items() if v is _REQUIRED and k not in params]
    if missing:
        raise AttackError(f"{who} needs parameter {missing[0]!r}")
    return {**{k: v for k, v in named.items() if v is not _REQUIRED}, **params}


def _load_plugin(spec: str) -> Callable:
    return load_callable(spec, "attack plugin", AttackError)


def _build_plugin(spec: str, params: dict[str, Any], collude: bool) -> Attack:
    fn = _load_plugin(spec)
    kind = getattr(fn, _DATA_KIND_ATTR, "model")
    given = sorted(set(params) & set(ROUND_CONTEXT))
    if given:
        raise AttackError(
            f"attack plugin {spec!r}: {given[0]!r} comes from the round, not from a parameter; "
            "leave it out of --attack-param"
        )
    context: tuple[str, ...] = ()
    found = _signature(fn, skip=3)
    if found is not None:
        named, var_kw = found
        if kind == "model":
            context = tuple(name for name in ROUND_CONTEXT if name in named)
            named = {k: v for k, v in named.items() if k not in context}
        params = _fill_params(f"attack plugin {spec!r}", params, named, var_kw)
    return Attack(spec, kind, fn, params, collude, plugin=True, round_context=context)


def build_attack(name: str, params: dict[str, Any] | None = None, collude: bool = False) -> Attack:
    """Build the attack ``name`` (a key of ``ATTACKS`` or ``"package.module:callable"``).

    Args:
        name: registry name, or a plugin path (see the module docstring for the contracts).
        params: attack parameters; missing ones take the literature defaults. The context
            parameter ``num_classes`` is passed only to attacks that take it.
        collude: all malicious clients send one shared crafted update (the first row).

    Returns:
        An ``Attack``; ``repr`` shows every parameter.

    Raises:
        AttackError: unknown name (the message lists the accepted ones), unknown or invalid
            parameter (named, with the accepted ones), or a plugin that cannot be loaded.

    Example::

        attack = build_attack("min_max", {"perturbation": "sign"})
    """
    if not isinstance(collude, bool):
        raise AttackError(f"collude must be true or false. Received: collude={collude!r}")
    params = dict(params or {})
    if ":" in name:
        return _build_plugin(name, params, collude)
    spec = ATTACKS.get(name)
    if spec is None:
        raise AttackError(
            f"unknown attack {name!r}. Accepted: {', '.join(ATTACKS)}, "
            "or 'package.module:callable' for a plugin"
        )
    named, _ = _signature(spec.builder, skip=0)
    params = _fill_params(f"attack {name!r}", params, named, var_kw=False)
    try:
        fn = spec.builder(**params)
    except AttackError as error:
        raise AttackError(f"attack {name!r}: {error}") from None
    return Attack(name, spec.kind, fn, params, collude)


def describe_attacks() -> list[str]:
    """One line per registered attack: name, kind, defaults and source (for an ``attacks`` listing).

    Example::

        print("\n".join(describe_attacks()))
        # alie [model] z=None: A Little Is Enough: mean - z * std per coordinate, ...
    """
    lines = []
    for name, spec in ATTACKS.items():
        named, _ = _signature(spec.builder, skip=0)
        defaults = " ".join(f"{k}={v!r}" for k, v in named.items() if k not in CONTEXT_PARAMS)
        summary = (spec.builder.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name} [{spec.kind}]{' ' + defaults if defaults else ''}: {summary}")
    return lines


# ---------------------------------------------------------------------------- CLI params


def parse_attack_params(items: Sequence[str]) -> dict[str, Any]:
    """Parse repeatable ``--attack-param key=value`` items into a dict.

    Values become int, float, bool (true/false), None (none/null) or else str.

    Example::

        parse_attack_params(["boost=10", "perturbation=sign"])
        # {'boost': 10, 'perturbation': 'sign'}
    """
    return parse_options(items, "--attack-param", "boost=10 or z=1.5", AttackError)
