"""The checks of a run that need the attacks and the aggregation rules, without TensorFlow.

``RunConfig`` checks each setting and the sections against each other when it is built;
``check_run`` adds what only the attack and the chain know (an attack's parameters, a rule's
cohort size, the DP settings the accountant accepts). Both take milliseconds, so every entry
point (``simulate``, ``compare``, ``serve``, ``fedwarden.simulate``) runs them before it loads
TensorFlow or any data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedwarden.config import DATASETS, RunConfig
from fedwarden.errors import UsageError

if TYPE_CHECKING:
    from fedwarden.aggregation.chain import Chain

# Classes of the built-in datasets (fedwarden.data.datasets), known without loading them.
BUILTIN_CLASSES = {"digits": 10, "fashion_mnist": 10, "synthetic": 4}


def num_classes(config: RunConfig) -> int:
    """The dataset's number of classes, read without loading its features."""
    if config.dataset in DATASETS:
        return BUILTIN_CLASSES[config.dataset]
    import numpy as np

    path = Path(config.dataset)
    if not path.is_file():
        raise UsageError(f"--dataset file not found: {path}")
    try:
        with np.load(path) as f:
            return int(f["y"].max()) + 1
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(
            f"--dataset {path} is not a .npz file with arrays x and y ({exc})"
        ) from None


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def check_run(config: RunConfig, *, cohort: int | None = None, deployment: bool = False) -> Chain:
    """Refuses a run that would fail after loading data: attack, chain and DP settings.

    Args:
      config: the run's settings (already checked one by one when built).
      cohort: the fewest updates a round may aggregate; default ``clients_per_round``.
      deployment: a coordinator (``serve``): central DP accounted without subsampling and
        --target-epsilon a budget; no attack.

    Returns:
      The parsed ``--aggregator`` (``server.defence.parse_aggregator``), for the run to build
      its chain from instead of parsing the string again.
    """
    from fedwarden.attacks import build_attack
    from fedwarden.server.defence import build_defence

    classes = None if deployment else num_classes(config)
    if not deployment:
        build_attack(
            config.attack, {"num_classes": classes, **config.attack_params}, collude=config.collude
        )
    with _quiet("fedwarden.defence"):  # its warnings come once, when the run builds its chain
        defence = build_defence(config, deployment=deployment)
    chain = defence.chain
    chain.check(cohort or config.clients_per_round)
    if config.round_memory_budget is not None:
        check_memory_budget(config, chain)
    if config.dp_sgd:
        from fedwarden.aggregation.accounting import validate_dp

        validate_dp(
            mode="dp_sgd",
            noise_multiplier=config.dp_sgd_noise_multiplier,
            clip_norm=config.dp_l2_clip,
            batch_size=config.batch_size,
            num_microbatches=config.dp_microbatches,
        )
    return defence.aggregator


def check_memory_budget(config: RunConfig, chain: Chain) -> None:
    """Refuses a ``--round-memory-budget`` the run could not keep, before the first round.

    The TFF engine returns the whole cohort's updates from one TFF call, so they are all held
    whatever the budget; a step outside ``BLOCKWISE_STEPS`` copies a spilled matrix into
    private memory (the coordinator would refuse it at the first round that spills, which
    depends on the model's size: refused here whatever the size).
    """
    from fedwarden.server.coordinator import copying_steps, step_names

    budget = f"--round-memory-budget {config.round_memory_budget:g}"
    if config.engine == "tff":
        raise UsageError(
            f"{budget} cannot bound a round of --engine tff: TFF trains the cohort in one call "
            "that returns every update at once. Received: --engine tff; use --engine native "
            "or drop the budget"
        )
    copying = copying_steps(chain)
    if copying:
        raise UsageError(
            f"{budget} needs a chain that reads a spilled update matrix in column blocks (mean, "
            f"median, trimmed_mean, krum, multi_krum, clip, gaussian_noise); "
            f"{', '.join(copying)} would copy it into memory. Received: --aggregator "
            f"{config.aggregator!r} (steps {', '.join(step_names(chain))}); use those steps "
            "or drop the budget"
        )


def cell_config(base: RunConfig, attack: str, aggregator: str) -> RunConfig:
    """One cell of ``fedwarden compare``: the base settings with this attack and aggregator
    (the clean row drops the attack parameters)."""
    params = base.attack_params if attack != "none" else {}
    return dataclasses.replace(
        base, attack=attack, attack_params=params, aggregator=aggregator, progress=False
    )
