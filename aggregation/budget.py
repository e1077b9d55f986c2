"""A sampling-aware Byzantine budget: how many attackers a sampled cohort can hold.

When ``n`` of ``N`` clients are sampled each round and ``M = round(fraction * N)`` of them are
malicious, the attackers in a cohort follow a hypergeometric law. Its *expected* value
``fraction * n`` is a poor budget: with 10 of 50 clients sampled and 20% malicious, 3 or more
attackers sit in 31% of the rounds, and a rule sized for 2 then fails about every third round.
The default budget is the 99% quantile instead (5 there: 4 or fewer attackers in 98.2% of
rounds, 5 or fewer in 99.8%).

``check_budget`` says, before a run, whether a chain's assumptions hold at that budget and, if
not, which rules would and what cohort size would let the chosen one hold.

Example::

    f = byzantine_quantile(num_clients=50, fraction=0.2, cohort=10)   # 5
    problems = budget_problems("median", cohort=10, num_byzantine=f)    # ["median assumes ..."]
"""

from __future__ import annotations

import math

from fedwarden.aggregation.base import AggregationError

__all__ = [
    "BUDGET_QUANTILE",
    "budget_problems",
    "byzantine_quantile",
    "check_budget",
    "recommended_rules",
    "resolve_budget",
]

BUDGET_QUANTILE = 0.99

# Rules whose guarantee needs an honest majority of the rows they see, without an f parameter
# that their own ``check`` would test.
MAJORITY_RULES = (
    "median",
    "geometric_median",
    "centered_clipping",
    "signguard",
    "flame",
    "clipped_clustering",
    "dnc",
)
# Candidates offered when the chosen chain cannot hold, strongest assumptions last.
CANDIDATES = (
    "median",
    "geometric_median",
    "arc+median",
    "trimmed_mean",
    "multi_krum",
    "bulyan",
    "signguard",
    "clipped_clustering",
    "dnc",
)


def byzantine_quantile(
    num_clients: int, fraction: float, cohort: int, quantile: float = BUDGET_QUANTILE
) -> int:
    """The ``quantile`` of the number of attackers in a cohort sampled without replacement.

    Args:
      num_clients: N, clients in the federation.
      fraction: assumed malicious share, in [0, 1); ``round(fraction * N)`` attackers.
      cohort: n, clients sampled per round (capped at N).
      quantile: confidence, in (0, 1]; 0.99 by default.

    Returns:
      The smallest f with ``P(attackers in the cohort <= f) >= quantile`` (hypergeometric).
    """
    if num_clients < 1 or cohort < 1:
        raise AggregationError(
            f"the Byzantine budget needs num_clients >= 1 and cohort >= 1. Received: "
            f"num_clients={num_clients}, cohort={cohort}."
        )
    if not 0.0 <= fraction < 1.0:
        raise AggregationError(
            f"the assumed malicious fraction must be in [0, 1). Received: fraction={fraction}."
        )
    if not 0.0 < quantile <= 1.0:
        raise AggregationError(f"quantile must be in (0, 1]. Received: quantile={quantile}.")
    n = min(cohort, num_clients)
    bad = round(fraction * num_clients)
    total = math.comb(num_clients, n)
    cumulative = 0
    for f in range(min(bad, n) + 1):
        cumulative += math.comb(bad, f) * math.comb(num_clients - bad, n - f)
        if cumulative >= quantile * total - 1e-12 * total:
            return f
    return min(bad, n)


def resolve_budget(
    num_byzantine: int | float | None,
    num_clients: int,
    cohort: int,
    fraction: float,
    quantile: float = BUDGET_QUANTILE,
) -> int:
    """f per round from what the user gave: a count, a fraction, or nothing.

    Args:
      num_byzantine: an integer count is used as is; a float in (0, 1) is an assumed malicious
        fraction of the federation and becomes its quantile; None uses ``fraction``.
      num_clients, cohort: N and n.
      fraction: the assumed malicious share when ``num_byzantine`` is None.
      quantile: confidence of the quantile.
    """
    if num_byzantine is None:
        return byzantine_quantile(num_clients, fraction, cohort, quantile)
    if isinstance(num_byzantine, float) and not num_byzantine.is_integer():
        if not 0.0 < num_byzantine < 1.0:
            raise AggregationError(
                f"a Byzantine budget is a count (e.g. 3) or a fraction in (0, 1) (e.g. 0.2). "
                f"Received: {num_byzantine}."
            )
        return byzantine_quantile(num_clients, num_byzantine, cohort, quantile)
    return int(num_byzantine)


def _step_names(step: object) -> list[str]:
    """Names of the steps in a (possibly nested) chain."""
    children = getattr(step, "steps", None)
    if children is None:
        return [getattr(step, "name", "")]
    return [name for child in children for name in _step_names(child)]


def budget_problems(spec: str, cohort: int, num_byzantine: int, built=None) -> list[str]:
    """Why ``spec`` cannot guarantee anything with ``num_byzantine`` attackers in ``cohort``.

    Empty when its assumptions hold. Checks the chain's own ``check`` (krum's K > 2f + 2, a
    trimmed mean that would trim everything, ...) and the honest majority that median-type
    rules need (named chains such as ``auto`` are looked into). ``built``: ``spec`` already
    parsed with ``num_byzantine`` as its default f (parsed here when not given).
    """
    from fedwarden.aggregation.chain import parse_chain

    if built is None:
        built = parse_chain(spec, num_byzantine_default=num_byzantine)
    try:
        built.check(cohort)
    except AggregationError as err:
        return [str(err)]
    f = num_byzantine
    return [
        f"{name} assumes fewer than half of the {cohort} updates are malicious; the budget is {f}."
        for name in _step_names(built)
        if name in MAJORITY_RULES and 2 * f >= cohort
    ]


def recommended_rules(cohort: int, num_byzantine: int) -> list[str]:
    """Chains whose assumptions hold with ``num_byzantine`` attackers in a cohort of ``cohort``.

    FLTrust (no bound on the attackers, a server root set instead) always qualifies.
    """
    fits = [c for c in CANDIDATES if not budget_problems(c, cohort, num_byzantine)]
    return [*fits, "fltrust"]


def smallest_cohort(
    spec: str, num_clients: int, fraction: float, quantile: float = BUDGET_QUANTILE
) -> int | None:
    """The smallest cohort at which ``spec`` holds at the quantile budget, or None if none does."""
    for n in range(1, num_clients + 1):
        f = byzantine_quantile(num_clients, fraction, n, quantile)
        if not budget_problems(spec, n, f):
            return n
    return None


def check_budget(
    spec: str,
    num_clients: int,
    num_byzantine: int,
    population: int | None = None,
    fraction: float | None = None,
    built=None,
) -> None:
    """Raises AggregationError naming what would work when ``spec`` cannot hold at the budget.

    Args:
      spec: the chain string.
      num_clients: the cohort size K the chain sees.
      num_byzantine: the budget f.
      population, fraction: N and the assumed malicious share, to name the smallest cohort that
        would let ``spec`` hold (optional).
      built: ``spec`` already parsed with ``num_byzantine`` as its default f (optional).
    """
    problems = budget_problems(spec, num_clients, num_byzantine, built)
    if not problems:
        return
    hint = f"rules that hold at f={num_byzantine} of {num_clients}: "
    hint += ", ".join(recommended_rules(num_clients, num_byzantine))
    if population is not None and fraction is not None:
        n = smallest_cohort(spec, population, fraction)
        if n is not None:
            hint += f"; or sample {n} clients per round for {spec}"
    raise AggregationError(f"{' '.join(problems)} Fix: {hint}.")
