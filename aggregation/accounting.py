"""Privacy accounting for central DP-FedAvg and client-side DP-SGD, on top of ``dp_accounting``.

Nothing here reimplements an accountant: every epsilon comes from ``dp_accounting``'s RDP or PLD
accountant composing ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` events.

Central DP-FedAvg: each round the server Poisson-samples clients, each independently with rate
``q = clients_per_round / clients`` (``poisson_sample``), clips every update to norm C, sums, adds
N(0, (z*C)^2) noise and divides by the *expected* cohort size. One round is the subsampled Gaussian
mechanism with noise multiplier z under add/remove-one-client adjacency (user-level DP), so
``rounds`` rounds compose to ``central_epsilon(z, q, rounds, delta)``.

WARNING: the bound assumes Poisson sampling. Sampling a fixed number of clients without replacement
is a different mechanism; the runner must use ``poisson_sample`` when DP is on.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD, moments accountant).
  Mironov 2017, "Renyi Differential Privacy"; Mironov, Talwar, Zhang 2019 (sampled Gaussian RDP).
  McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (DP-FedAvg).
  Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACCOUNTANTS = ("rdp", "pld")
MAX_NOISE_MULTIPLIER = 1e3


class DPConfigError(ValueError):
    """A DP setting is invalid or unreachable; the message names the value and the fix."""


def _make_accountant(accountant: str) -> Any:  # a dp_accounting.PrivacyAccountant
    import dp_accounting  # here, not at the top: it loads scipy (1 s), which a CLI check should not

    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise DPConfigError(
        f"accountant must be one of {ACCOUNTANTS}. Received: accountant={accountant!r}."
    )


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise DPConfigError(
            f"delta must be in (0, 1). Received: delta={delta}; a common choice is "
            "default_delta(num_clients) = 1 / num_clients**1.1."
        )


def _check_rate(sampling_rate: float, label: str = "sampling_rate") -> None:
    if not 0.0 < sampling_rate <= 1.0:
        raise DPConfigError(f"{label} must be in (0, 1]. Received: {label}={sampling_rate}.")


def composed_epsilon(
    events: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of a sequence of Poisson-sampled Gaussian mechanisms.

    Args:
      events: ``(noise_multiplier, sampling_rate, count)`` triples; each is
        ``PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(noise_multiplier))`` composed
        ``count`` times, and all triples are composed together.
      delta: target delta.
      accountant: ``"rdp"`` (``dp_accounting.rdp.RdpAccountant``) or ``"pld"``
        (``dp_accounting.pld.PLDAccountant``).

    Returns:
      Epsilon (``math.inf`` if any composed event has zero noise, 0.0 if nothing was composed).
    """
    import dp_accounting

    _check_delta(delta)
    acc = _make_accountant(accountant)
    composed = False
    for noise_multiplier, sampling_rate, count in events:
        if count < 0:
            raise DPConfigError(f"count must be >= 0. Received: count={count}.")
        if count == 0:
            continue
        _check_rate(sampling_rate)
        if noise_multiplier < 0:
            raise DPConfigError(
                f"noise_multiplier must be >= 0. Received: noise_multiplier={noise_multiplier}."
            )
        if noise_multiplier == 0:
            return math.inf
        event = dp_accounting.PoissonSampledDpEvent(
            float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        )
        acc.compose(dp_accounting.SelfComposedDpEvent(event, int(count)))
        composed = True
    return float(acc.get_epsilon(delta)) if composed else 0.0


def central_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of DP-FedAvg after ``rounds`` rounds (user-level, add/remove-one-client adjacency).

    Assumes Poisson sampling of clients with rate ``q = clients_per_round / clients`` (see
    ``poisson_sample``) and Gaussian noise of std ``noise_multiplier * clip`` on the clipped sum.
    With adaptive clipping pass the *total* noise multiplier: ``central_dp`` splits it so the sum
    and clipped-count Gaussians together compose to exactly this one (Andrew et al. 2021).

    Example:
      >>> round(central_epsilon(1.0, 0.1, 100, 1e-5), 1)  # doctest: +SKIP
      3.4
    """
    return composed_epsilon([(noise_multiplier, sampling_rate, rounds)], delta, accountant)


def dpsgd_epsilon(
    noise_multiplier: float, batch_size: int, num_examples: int, steps: int, delta: float
) -> float:
    """Epsilon of DP-SGD (example-level) after ``steps`` steps, RDP accountant.

    The sampling rate is ``batch_size / num_examples`` (capped at 1). As in Abadi et al. 2016 and
    tensorflow-privacy's own analysis, shuffled fixed-size batches are accounted as if they were
    Poisson-sampled; this is the customary approximation, not an exact bound for shuffling.
    """
    if batch_size < 1 or num_examples < 1:
        raise DPConfigError(
            "batch_size and num_examples must be >= 1. "
            f"Received: batch_size={batch_size}, num_examples={num_examples}."
        )
    rate = min(1.0, batch_size / num_examples)
    return composed_epsilon([(noise_multiplier, rate, steps)], delta, "rdp")


def default_delta(n: int) -> float:
    """The delta used when none is given: ``1 / n**1.1``, just below 1/n for n clients/examples."""
    if n < 2:
        raise DPConfigError(f"default_delta needs n >= 2. Received: n={n}.")
    return 1.0 / n**1.1


def solve_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier (within ``tol``) with ``central_epsilon <= target_epsilon``.

    Brent/bisection search by ``dp_accounting.calibrate_dp_mechanism`` over [1e-3, 1e3]; the
    returned value always satisfies the target (the calibrator rounds towards more noise).

    Raises:
      DPConfigError: the target cannot be reached with ``noise_multiplier <= 1e3``.
    """
    if not target_epsilon > 0:
        raise DPConfigError(
            f"target_epsilon must be > 0. Received: target_epsilon={target_epsilon}."
        )
    if rounds < 1:
        raise DPConfigError(f"rounds must be >= 1. Received: rounds={rounds}.")
    import dp_accounting

    _check_rate(sampling_rate)
    _check_delta(delta)

    def eps(z: float) -> float:
        return central_epsilon(z, sampling_rate, rounds, delta, accountant)

    hi = MAX_NOISE_MULTIPLIER
    if eps(hi) > target_epsilon:
        raise DPConfigError(
            f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier={hi:g} gives "
            f"epsilon={eps(hi):.4g} at delta={delta:g} over rounds={rounds} with "
            f"sampling_rate={sampling_rate:g}. Raise target_epsilon or delta, run fewer rounds, "
            "or sample fewer clients per round."
        )
    lo = 0.5
    while eps(lo) <= target_epsilon:
        if lo <= 1e-3:
            return lo
        lo /= 4.0
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            lambda z: dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    sampling_rate, dp_accounting.GaussianDpEvent(z)
                ),
                rounds,
            ),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=tol,
        )
    )


def poisson_sample(client_ids: Sequence[Any], rate: float, rng: np.random.Generator) -> list[Any]:
    """Poisson sampling: each client joins the round independently with probability ``rate``.

    The cohort size varies from round to round (it may even be empty); that is what the central
    accountant assumes. Order of ``client_ids`` is kept.
    """
    _check_rate(rate, "rate")
    mask = rng.random(len(client_ids)) < rate
    return [c for c, keep in zip(client_ids, mask, strict=True) if keep]


def validate_dp(
    *,
    mode: str | None = "central",
    noise_multiplier: float | None = None,
    clip_norm: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    sampling_rate: float | None = None,
    rounds: int | None = None,
    batch_size: int | None = None,
    num_microbatches: int | None = None,
    accountant: str = "rdp",
) -> float | None:
    """Checks DP settings for the CLI and returns the noise multiplier to use.

    Args:
      mode: ``"central"`` (DP-FedAvg), ``"dp_sgd"`` (client-side) or ``None``/``"off"``.
      noise_multiplier: given noise multiplier; leave None to solve it from ``target_epsilon``.
      clip_norm: clip norm (central) or per-example/microbatch ``l2_norm_clip`` (DP-SGD).
      target_epsilon: solve the noise multiplier for this epsilon (needs ``delta``,
        ``sampling_rate`` and ``rounds``; for DP-SGD pass the batch sampling rate and the number
        of local steps as ``rounds``).
      delta: target delta.
      sampling_rate: clients_per_round / clients (central) or batch_size / examples (DP-SGD).
      rounds: rounds (central) or optimizer steps (DP-SGD) the budget must cover.
      batch_size, num_microbatches: DP-SGD only; microbatches must divide the batch size.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      The noise multiplier (given or solved), or None when DP is off.

    Raises:
      DPConfigError: with the offending value and how to fix it.
    """
    if mode in (None, "off"):
        return None
    if mode not in ("central", "dp_sgd"):
        raise DPConfigError(
            f"DP mode must be 'central', 'dp_sgd' or 'off'. Received: mode={mode!r}."
        )
    if clip_norm is not None and not clip_norm > 0:
        raise DPConfigError(
            f"clip_norm must be > 0 with DP on. Received: clip_norm={clip_norm}; "
            "set the clip to about the median update norm (e.g. 1.0) or use adaptive clipping."
        )
    if mode == "dp_sgd" and num_microbatches is not None:
        if num_microbatches < 1 or batch_size is None or batch_size % num_microbatches:
            raise DPConfigError(
                f"num_microbatches must divide batch_size. Received: "
                f"num_microbatches={num_microbatches}, batch_size={batch_size}; pick a divisor of "
                "the batch size, or leave num_microbatches unset for one example per microbatch."
            )
    if delta is not None:
        _check_delta(delta)
    if sampling_rate is not None:
        _check_rate(sampling_rate)
    if target_epsilon is not None:
        if noise_multiplier is not None:
            raise DPConfigError(
                f"give either noise_multiplier or target_epsilon, not both. Received: "
                f"noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon}."
            )
        missing = [
            n
            for n, v in (("delta", delta), ("sampling_rate", sampling_rate), ("rounds", rounds))
            if v is None
        ]
        if missing:
            raise DPConfigError(f"target_epsilon={target_epsilon} also needs {', '.join(missing)}.")
        return solve_noise_multiplier(target_epsilon, sampling_rate, rounds, delta, accountant)
    if noise_multiplier is None or not noise_multiplier > 0:
        raise DPConfigError(
            f"noise_multiplier must be > 0 with DP on. Received: noise_multiplier="
            f"{noise_multiplier}; set a positive value (about 1.0 is typical), give a "
            "target_epsilon instead, or turn DP off."
        )
    return float(noise_multiplier)


@dataclass
class ClientPrivacyAccount:
    """Each client's DP-SGD privacy spent, composed over every step of every round it trained.

    ``record`` is called after a client's local training; ``epsilon`` composes, with the RDP
    accountant, one ``PoissonSampledDpEvent(batch_size / examples, GaussianDpEvent(z))`` per step
    (grouped by local data size, which sets the rate, when it changes between rounds).

    WARNING: as in Abadi et al. 2016 and tensorflow-privacy, shuffled fixed-size batches are
    accounted as Poisson sampling, the customary approximation. The account is per client and
    example-level; it says nothing about user-level (whole-client) privacy.

    Example:
      >>> account = ClientPrivacyAccount(noise_multiplier=1.1, batch_size=32)
      >>> account.record("c01", num_examples=600, epochs=1)
      19
      >>> account.epsilon("c01", delta=1e-5) > 0  # doctest: +SKIP
      True
    """

    noise_multiplier: float
    batch_size: int
    # client id -> {local examples: steps taken with that many examples}
    steps_by_size: dict[str, dict[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DPConfigError(f"batch_size must be >= 1. Received: batch_size={self.batch_size}.")
        if not self.noise_multiplier >= 0:
            raise DPConfigError(
                "noise_multiplier must be >= 0. "
                f"Received: noise_multiplier={self.noise_multiplier}."
            )

    def record(
        self, client_id: str, num_examples: int, epochs: int = 1, steps: int | None = None
    ) -> int:
        """Adds one round of local training; returns the steps counted.

        ``steps`` defaults to ``epochs * ceil(num_examples / batch_size)`` (Keras ``fit`` with the
        last short batch kept); pass it when the trainer counts differently.
        """
        if num_examples < 1:
            raise DPConfigError(
                f"num_examples must be >= 1. Received: num_examples={num_examples} for "
                f"client {client_id!r}."
            )
        if steps is None:
            steps = epochs * math.ceil(num_examples / self.batch_size)
        if steps < 0:
            raise DPConfigError(f"steps must be >= 0. Received: steps={steps}.")
        by_size = self.steps_by_size.setdefault(client_id, {})
        by_size[int(num_examples)] = by_size.get(int(num_examples), 0) + int(steps)
        return int(steps)

    def steps(self, client_id: str) -> int:
        """Total DP-SGD steps the client has taken."""
        return sum(self.steps_by_size.get(client_id, {}).values())

    def epsilon(self, client_id: str, delta: float) -> float:
        """The client's epsilon at ``delta`` over all its recorded steps (0.0 if none).

        With one data size this is ``dpsgd_epsilon(z, batch_size, examples, steps, delta)``.
        """
        by_size = self.steps_by_size.get(client_id, {})
        if len(by_size) == 1:
            ((num_examples, steps),) = by_size.items()
            return dpsgd_epsilon(self.noise_multiplier, self.batch_size, num_examples, steps, delta)
        events = [
            (self.noise_multiplier, min(1.0, self.batch_size / n), steps)
            for n, steps in by_size.items()
        ]
        return composed_epsilon(events, delta, "rdp")

    def epsilons(self, delta: float) -> dict[str, float]:
        """Epsilon at ``delta`` for every client with recorded steps."""
        return {cid: self.epsilon(cid, delta) for cid in self.steps_by_size}


def dp_sgd_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round of DP-SGD: full batches of ``min(batch_size, n)`` only (the
    accounting and microbatching assume a fixed size), ``epochs`` passes."""
    return epochs * (num_examples // min(batch_size, num_examples))
