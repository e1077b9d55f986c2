"""From a run configuration to the aggregation chain, its privacy accounting and the trust policy.

One place for both simulations and the gRPC coordinator. With ``dp = "central"``:

* aggregator ``mean`` becomes DP-FedAvg (``central_dp``: clip, sum, Gaussian noise, divide by the
  expected cohort), which carries a formal (epsilon, delta) guarantee under Poisson client sampling;
* any robust aggregator becomes ``clip + <aggregator> + gaussian_noise`` with the same clip and noise
  scale. That chain is allowed and often useful against poisoning, but its epsilon is *not* a
  guarantee: a median or trimmed mean of clipped updates does not have the clipped sum's
  sensitivity (see ``aggregation/dp.py``). Results and the CLI say which case a run is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedwarden.aggregation.accounting import (
    DPConfigError,
    central_epsilon,
    default_delta,
    validate_dp,
)
from fedwarden.aggregation.base import AggregationError
from fedwarden.aggregation.budget import check_budget, resolve_budget
from fedwarden.aggregation.chain import Chain, parse_chain
from fedwarden.aggregation.clipping import clip_by_norm
from fedwarden.aggregation.dp import central_dp, gaussian_noise, is_formal_dp
from fedwarden.config import DeploymentConfig, RunConfig
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.ledger import Ledger
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy
from fedwarden.server.validation import ValidationProbe

log = logging.getLogger("fedwarden.defence")


@dataclass(frozen=True)
class CentralPrivacy:
    noise_multiplier: float
    clip: float
    sampling_rate: float
    delta: float
    accountant: str
    formal: bool
    solved_for: float | None = None  # the target epsilon the noise multiplier was solved for
    budget: float | None = None  # a run that stops before its epsilon would exceed this

    def epsilon(self, rounds: int) -> float:
        return central_epsilon(
            self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant
        )

    def allows(self, rounds: int) -> bool:
        """Whether ``rounds`` rounds in all stay within the budget (always, without one)."""
        return self.budget is None or self.epsilon(rounds) <= self.budget

    def report(self, rounds: int) -> dict:
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "rounds": rounds,
            "accountant": self.accountant,
            "clip": self.clip,
            "formal_guarantee": self.formal,
            "client_sampling": "poisson",
            "target_epsilon": self.solved_for,
            **({"epsilon_budget": self.budget} if self.budget is not None else {}),
        }


def trust_policy(config: RunConfig) -> TrustPolicy:
    return TrustPolicy(
        decay=config.trust_decay,
        flag_below=config.trust_flag_below,
        unflag_above=config.trust_unflag_above,
        quarantine=config.quarantine,
        downweight=config.quarantine_downweight,
        probation_rounds=config.probation_rounds,
        flag_rule=config.trust_flag_rule,
        false_positive_rate=config.trust_false_positive_rate,
        evidence_rounds=config.trust_evidence_rounds,
        association_z=config.trust_association_z,
    )


def parse_aggregator(config: RunConfig) -> Chain:
    """The run's ``--aggregator`` chain, with the run's Byzantine budget as the default f.

    Parsed once per run (``fedwarden.simulations.preflight.check_run`` returns it) and passed to
    :func:`build_defence`; whether central DP is formal is read from it."""
    return parse_chain(config.aggregator, num_byzantine_default=byzantine_budget(config))


def _is_plain_mean(aggregator: Chain) -> bool:
    steps = aggregator.steps if isinstance(aggregator, Chain) else (aggregator,)
    return len(steps) == 1 and getattr(steps[0], "name", None) == "mean"


def central_privacy(
    config: RunConfig,
    num_clients: int,
    *,
    budget: bool = False,
    aggregator: Chain | None = None,
) -> CentralPrivacy | None:
    """Validates the central DP settings (noise solved from --target-epsilon when given).

    With ``budget`` (the coordinator), --target-epsilon is also a budget: the run stops before a
    round that would exceed it (``CentralPrivacy.allows``), and it may come with
    --dp-noise-multiplier, which is then used as given (not solved for --rounds). The guarantee
    is formal when the aggregator is a plain mean (``aggregator``: the parsed ``--aggregator``,
    parsed here when not given).
    """
    if config.dp != "central":
        return None
    rate = config.clients_per_round / num_clients
    delta = config.dp_delta or default_delta(num_clients)
    target = config.target_epsilon
    if target is not None and not target > 0:
        raise DPConfigError(f"target_epsilon must be > 0. Received: target_epsilon={target}.")
    solve = None if budget and config.dp_noise_multiplier is not None else target
    noise = validate_dp(
        mode="central",
        noise_multiplier=config.dp_noise_multiplier,
        clip_norm=config.dp_clip,
        target_epsilon=solve,
        delta=delta,
        sampling_rate=rate,
        rounds=config.rounds,
        accountant=config.dp_accountant,
    )
    formal = _is_plain_mean(aggregator or parse_aggregator(config))
    privacy = CentralPrivacy(
        noise, config.dp_clip, rate, delta, config.dp_accountant, formal, solve,
        target if budget else None,
    )  # fmt: skip
    if privacy.budget is not None and not privacy.allows(1):
        raise DPConfigError(
            f"target_epsilon={target} is spent by a single round: epsilon {privacy.epsilon(1):.4g}"
            f" with noise_multiplier={noise:g} at delta={delta:g}. Raise the target or the noise."
        )
    return privacy


def byzantine_budget(config: RunConfig) -> int:
    """f per round: ``num_byzantine`` as given (a count, or a fraction in (0, 1)), else the 99%
    quantile of the attackers a sampled cohort holds at ``malicious_fraction``
    (``fedwarden.aggregation.budget``)."""
    return resolve_budget(
        config.num_byzantine, config.clients, config.clients_per_round, config.malicious_fraction
    )


def warn_if_budget_unmet(config: RunConfig, aggregator: Chain | None = None) -> str | None:
    """Logs (and returns) why the chain's assumptions fail at the budget, naming what would hold.

    ``aggregator`` is the parsed ``--aggregator`` (parsed when not given)."""
    try:
        check_budget(
            config.aggregator, config.clients_per_round, byzantine_budget(config), config.clients,
            config.malicious_fraction, built=aggregator,
        )  # fmt: skip
    except AggregationError as err:
        message = str(err)
        if config.quarantine == "none":
            message += (
                " Excluding flagged clients (--quarantine exclude) kept auto above the published"
                " anchors at 40% malicious on Fashion-MNIST (docs/results.md)."
            )
        log.warning("Byzantine budget: %s", message)
        return message
    return None


def build_chain(
    config: RunConfig,
    privacy: CentralPrivacy | None,
    seed: int | None,
    aggregator: Chain | None = None,
) -> Chain:
    """The aggregation chain for a run; ``seed`` None draws DP noise unseeded (deployments).

    ``aggregator`` is the parsed ``--aggregator`` (parsed here when not given)."""
    robust = aggregator or parse_aggregator(config)
    warn_if_budget_unmet(config, robust)
    if privacy is None:
        return robust
    expected = config.clients_per_round
    if privacy.formal:
        chain = Chain(
            central_dp(
                privacy.clip,
                privacy.noise_multiplier,
                expected,
                seed=seed,
                adaptive=config.dp_adaptive_clip,
                target_quantile=config.dp_target_quantile,
            )
        )
    else:
        chain = Chain(
            clip_by_norm(privacy.clip),
            robust,
            gaussian_noise(privacy.noise_multiplier * privacy.clip / expected, seed=seed),
        )
    assert is_formal_dp(chain) == privacy.formal, chain
    return chain


@dataclass(frozen=True)
class Defence:
    """A run's defence, built once from its settings by :func:`build_defence`.

    Attributes:
      aggregator: the parsed ``--aggregator``, the robust rule before central DP wraps it.
      privacy: the central DP mechanism's accounting; None without ``--dp central``.
      chain: what the coordinator aggregates with: ``aggregator``, wrapped in central DP.
    """

    aggregator: Chain
    privacy: CentralPrivacy | None
    chain: Chain


def build_defence(
    config: RunConfig, *, deployment: bool = False, aggregator: Chain | None = None
) -> Defence:
    """The run's aggregator, central privacy and chain: what ``simulate``, ``serve`` and the
    settings check (``fedwarden.simulations.preflight.check_run``) all build, in one place.

    Args:
      config: the run's settings.
      deployment: a coordinator for remote agents (``serve``). It does not know its population
        nor samples it the Poisson way, so central DP is accounted with sampling rate 1 (a
        conservative bound), ``--target-epsilon`` is also a budget the run stops at, and the DP
        noise is unseeded (anyone who knows a seed can subtract the noise). Otherwise a
        simulation: sampling rate ``clients_per_round / clients``, noise seeded by ``seed``.
      aggregator: the parsed ``--aggregator`` when the caller has it (``check_run`` returns
        it); parsed here when None.

    Returns:
      A :class:`Defence`. Raises ``AggregationError`` for a chain that does not parse and
      ``DPConfigError`` for central DP settings the accountant refuses.

    Example::

        defence = build_defence(RunConfig(aggregator="clip:max_norm=5+median"))
        defence.chain(updates, weights, defence.chain.init())
    """
    if aggregator is None:
        aggregator = parse_aggregator(config)
    population = config.clients_per_round if deployment else config.clients
    privacy = central_privacy(config, population, budget=deployment, aggregator=aggregator)
    chain = build_chain(config, privacy, None if deployment else config.seed, aggregator)
    return Defence(aggregator, privacy, chain)


def smallest_cohort(config: RunConfig, options: DeploymentConfig) -> int:
    """The fewest updates a deployment's round may aggregate: an attempt closes with
    ``min_clients`` answers when fewer than ``clients_per_round`` come in time, so the chain must
    run on that many."""
    return min(options.min_clients, config.clients_per_round)


def build_coordinator(
    config: RunConfig,
    weights: np.ndarray,
    chain: Chain,
    ledger: Ledger | None,
    validation: ValidationProbe | None = None,
    output_layer: int = 0,
    output_kernel: tuple[int, int] | None = None,
) -> Coordinator:
    """The run's coordinator: ``chain``, the server optimizer, trust (persisted in ``ledger``),
    the admission limits of ``config`` and the ``validation`` probe if any, from the initial
    flat ``weights``, whose last ``output_layer`` coordinates are the model's output layer (a
    dense kernel of shape ``output_kernel`` and its bias, when known)."""
    return Coordinator(
        weights,
        chain,
        ServerOptimizer(config.server_optimizer, config.server_lr, config.server_momentum),
        TrustBook(trust_policy(config), ledger),
        anomaly_weights=config.anomaly_weights,
        max_update_norm=config.max_update_norm,
        max_weight_ratio=config.max_weight_ratio,
        round_memory_budget=None
        if config.round_memory_budget is None
        else config.round_memory_budget * 2**20,
        spill_dir=config.out,
        validation=validation,
        batch_size=config.batch_size,
        full_batches=config.dp_sgd,
        output_layer=output_layer,
        output_kernel=output_kernel,
    )
