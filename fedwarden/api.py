"""The Python API: a simulation in one call, and aggregation chains from strings.

Example::

    import fedwarden

    results = fedwarden.simulate(
        dataset="digits", clients=10, rounds=5, attack="gaussian", aggregator="median",
        out="runs/api", progress=False,
    )
    print(results["final"]["accuracy"], results["final"]["detection"])

    robust = fedwarden.chain("clip:max_norm=5+trimmed_mean:trim_fraction=0.2")
    out = robust(updates, weights, robust.init())  # updates (K, d), weights (K,)

The settings are those of ``fedwarden simulate`` with underscores (``clients_per_round=5``,
``trust_decay=0.8``; ``fedwarden simulate --help`` lists them by group), checked before
TensorFlow is imported: a bad one raises :class:`fedwarden.errors.UsageError` (or the
``AggregationError``/``AttackError`` of the step or attack at fault) with a one-line message.
"""

from __future__ import annotations

import os
from typing import Any

from fedwarden.config import Config, RunConfig


def _config(config: RunConfig | Config | None, settings: dict[str, Any]) -> RunConfig:
    if config is None:
        return RunConfig(**settings)
    if isinstance(config, Config):
        config = config.flat()
    return config.replace(**settings) if settings else config


def simulate(
    config: RunConfig | Config | None = None, /, *, resume: bool = False, **settings: Any
) -> dict[str, Any]:
    """Runs one federated simulation and writes its outputs to ``out`` (default runs/latest).

    Args:
      config: the settings as a ``RunConfig`` or a nested ``Config``; default: the defaults.
      resume: continue the run in ``out`` from its last checkpoint.
      **settings: settings by flat name, applied over ``config``
        (``rounds=5, attack="alie", aggregator="median"``).

    Returns:
      The contents of ``results.json`` (``fedwarden/schema/results.schema.json``, explained in
      docs/results-format.md): ``rounds`` (one record per round), ``final`` (accuracy, loss,
      attack success rate, detection, privacy), ``clients`` (trust and flag per client),
      ``config``, ``aggregator`` and ``attack``.
    """
    from fedwarden.simulations.preflight import check_run

    run = _config(config, settings)
    aggregator = check_run(run)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the CLI: no CUDA plugin noise
    from fedwarden.simulations.runner import simulate as run_simulation  # TensorFlow from here

    return run_simulation(run, resume=resume, aggregator=aggregator)


def compare(
    attacks: list[str],
    aggregators: list[str],
    config: RunConfig | Config | None = None,
    /,
    *,
    seeds: list[int] | None = None,
    ray_address: str | None = None,
    **settings: Any,
) -> str:
    """Runs every attack against every aggregator (plus a clean row) on one data split.

    Args:
      attacks: attack names, e.g. ``["gaussian", "alie"]``.
      aggregators: chain strings, e.g. ``["mean", "median"]``.
      config, **settings: the shared settings, as for :func:`simulate`; ``out`` is the grid's
        directory (matrix.json, matrix.md, matrix.png, and each run under ``out/runs``).
      seeds: run the grid for each of these seeds; each cell reports their mean and spread.
      ray_address: run each (attack, aggregator, seed) as a task on this Ray cluster
        (docs/scale.md).

    Returns:
      The markdown table written to ``matrix.md``.
    """
    from pathlib import Path

    from fedwarden.simulations.preflight import cell_config, check_run

    first = next((a for a in attacks if a != "none"), "none")
    base = _config(config, {"attack": first, **settings})
    for attack in ["none", *attacks]:
        for aggregator in aggregators:
            check_run(cell_config(base, attack, aggregator))
    from fedwarden.simulations.compare import compare as run_grid  # TensorFlow from here

    return run_grid(
        base, list(attacks), list(aggregators), Path(base.out), seeds, ray_address=ray_address
    )


def chain(*steps: Any) -> Any:
    """An aggregation chain from a chain string or from steps.

    ``chain("clip:max_norm=5+median")`` is ``chain(clip_by_norm(5.0), median())``; strings
    and steps may be mixed, each string adding its steps in place. The result is itself a step:
    ``chain(updates, weights, state)`` with ``state = chain.init()``.
    """
    from fedwarden.aggregation.chain import Chain, parse_chain

    flat: list[Any] = []
    for step in steps:
        flat.extend(parse_chain(step).steps if isinstance(step, str) else [step])
    return Chain(*flat)
