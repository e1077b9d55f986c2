"""Robust aggregation: composable steps over the round's ``(K, d)`` update matrix.

Numpy in, numpy out, no I/O. A step maps ``(updates, weights, state)`` to a
:class:`~fedwarden.aggregation.base.StepOutput`; ``chain`` composes steps and ``parse_chain`` builds a chain
from a command-line string::

    from fedwarden.aggregation import chain, clip_by_norm, trimmed_mean, parse_chain

    step = chain(clip_by_norm(5.0), trimmed_mean(trim_fraction=0.2))
    step.check(num_clients=20)
    out = step(updates, weights, step.init())
    same = parse_chain("clip:max_norm=5+trimmed_mean:trim_fraction=0.2")

Central DP steps live in ``fedwarden.aggregation.dp`` and per-client anomaly scoring in
``fedwarden.aggregation.scoring``; they are imported from there (not here) to keep this import light.
"""

from fedwarden.aggregation._kernels import new_rows, row_allocator
from fedwarden.aggregation.base import AggregationError, StatelessStep, Step, StepOutput, as_cohort
from fedwarden.aggregation.chain import REGISTRY, Chain, chain, parse_chain
from fedwarden.aggregation.clipping import ClipByNorm, clip_by_norm, clip_rows
from fedwarden.aggregation.rules import (
    Bulyan,
    CenteredClipping,
    FunctionRule,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    NearestNeighborMixing,
    TrimmedMean,
    bulyan,
    centered_clipping,
    from_function,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    nearest_neighbor_mixing,
    trimmed_mean,
)
from fedwarden.aggregation.warmup import warm_up

__all__ = [
    "REGISTRY",
    "AggregationError",
    "Bulyan",
    "CenteredClipping",
    "Chain",
    "ClipByNorm",
    "FunctionRule",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NearestNeighborMixing",
    "StatelessStep",
    "Step",
    "StepOutput",
    "TrimmedMean",
    "as_cohort",
    "bulyan",
    "centered_clipping",
    "chain",
    "clip_by_norm",
    "clip_rows",
    "from_function",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "nearest_neighbor_mixing",
    "new_rows",
    "parse_chain",
    "row_allocator",
    "trimmed_mean",
    "warm_up",
]
