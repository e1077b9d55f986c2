"""TFF's own aggregators as fedwarden steps, for the chains TFF already provides.

TensorFlow Federated ships mean-based aggregation: the weighted mean (``tff.aggregators.
MeanFactory``), L2 clipping in front of it (``tff.aggregators.clipping_factory``) and DP-FedAvg
(``tff.aggregators.DifferentiallyPrivateFactory``, the core of ``tff.learning.dp_aggregator``).
For those chains fedwarden does not reimplement the arithmetic on the TFF engine: it runs TFF's
aggregation process, wrapped as a step, so the coordinator, scoring and trust stay unchanged::

    chain = parse_chain("clip:max_norm=2+mean")
    step = tff_step(chain)        # TFFAggregatorStep(clipping_factory(2.0, MeanFactory()))
    out = step(updates, weights, step.init())

``tff_factory(chain)`` says which chains map (None for the rest: median, Krum, trimmed mean and
every other robust rule run as fedwarden numpy code). ``tests/test_tff_engine.py`` checks that
both paths give the same aggregate.

The step feeds the ``(K, d)`` matrix to the aggregation process as K values placed at
``tff.CLIENTS`` (row i is client i) and gets one value back at ``tff.SERVER``: TFF's aggregators
are anonymous, so they report no per-client measurements; scoring measures the rows itself.

WARNING: TFF's DP factories draw their noise from TF's unseeded randomness (they take no seed),
so a ``central_dp`` chain run through TFF is not repeatable across runs, unlike fedwarden's seeded
``central_dp``. The privacy guarantee is the same (same query, same clip, same noise scale).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedwarden import tff_runtime
from fedwarden.aggregation.base import AggregationError, StepOutput, as_cohort
from fedwarden.aggregation.chain import Chain
from fedwarden.aggregation.clipping import ClipByNorm
from fedwarden.aggregation.dp import CentralDP
from fedwarden.aggregation.rules import Mean

__all__ = ["TFFAggregatorStep", "tff_factory", "tff_step"]


def _steps(chain: Any) -> list[Any]:
    if isinstance(chain, Chain):
        return [s for child in chain.steps for s in _steps(child)]
    return [chain]


def tff_factory(chain: Any) -> tff.aggregators.AggregationFactory | None:
    """The TFF aggregation factory computing the same aggregate as ``chain``, or None.

    Maps (nested chains are flattened first):

    - ``mean`` -> ``MeanFactory()`` (weighted by the client weights);
    - ``clip:max_norm=C + mean`` -> ``clipping_factory(C, MeanFactory())`` (a fixed clip only);
    - ``central_dp(C, z, n)`` -> ``DifferentiallyPrivateFactory.gaussian_fixed(z, n, C)``, or
      ``gaussian_adaptive`` with the same initial clip, target quantile, learning rate and
      clipped-count noise when ``adaptive=True`` (unweighted, like ``central_dp``).

    Anything else (a robust rule, a plugin, noise after a robust rule) returns None.
    """
    steps = _steps(chain)
    kinds = [type(s) for s in steps]
    if kinds == [Mean]:
        return tff.aggregators.MeanFactory()
    if kinds == [ClipByNorm, Mean]:
        return tff.aggregators.clipping_factory(steps[0].max_norm, tff.aggregators.MeanFactory())
    if kinds == [CentralDP]:
        dp = steps[0]
        factory = tff.aggregators.DifferentiallyPrivateFactory
        if not dp.adaptive:
            return factory.gaussian_fixed(dp.noise_multiplier, dp.expected_clients, dp.clip_norm)
        return factory.gaussian_adaptive(
            dp.noise_multiplier,
            dp.expected_clients,
            initial_l2_norm_clip=dp.clip_norm,
            target_unclipped_quantile=dp.target_quantile,
            learning_rate=dp.clip_learning_rate,
            clipped_count_stddev=dp.clipped_count_stddev,
        )
    return None


def tff_step(chain: Any) -> Any:
    """``chain`` run by TFF's aggregator when ``tff_factory`` maps it, else ``chain`` itself."""
    factory = tff_factory(chain)
    if factory is None:
        return chain
    return TFFAggregatorStep(
        factory, formal_dp=any(isinstance(s, CentralDP) for s in _steps(chain))
    )


def _scalars(prefix: str, value: Any, into: dict[str, float]) -> None:
    """Flattens TFF's nested measurements into ``{"a/b": float}``; empty structures vanish."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _scalars(f"{prefix}/{key}" if prefix else str(key), inner, into)
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _scalars(f"{prefix}/{i}", inner, into)
    elif np.ndim(value) == 0:
        into[prefix] = float(value)


class TFFAggregatorStep:
    """A TFF aggregation factory run as a fedwarden step: ``(K, d)`` rows in, one row out.

    Args:
      factory: a ``tff.aggregators`` weighted or unweighted factory for a float32 vector.
      formal_dp: declares the factory a DP-FedAvg mechanism (``fedwarden.aggregation.dp.is_formal_dp``).

    The aggregation process is built on the first call, for the update dimension seen then
    (later calls must keep it). The step state is the TFF process state as a tuple of numpy
    leaves (``tf.nest.flatten``; None before the first call), so a checkpoint pickles it and
    carries, for example, the adaptive clip of ``gaussian_adaptive``. Measurements are TFF's, flattened to
    ``"<key>/<key>"`` scalars (``clipped_count``, ``clipping_norm``, ``dp_query_metrics/...``).
    Unweighted factories ignore the client weights, like ``central_dp``.
    """

    name = "tff"
    keeps_rows = False

    def __init__(self, factory: tff.aggregators.AggregationFactory, formal_dp: bool = False):
        if not isinstance(
            factory,
            tff.aggregators.WeightedAggregationFactory
            | tff.aggregators.UnweightedAggregationFactory,
        ):
            raise AggregationError(
                f"factory must be a tff.aggregators aggregation factory. Received: {factory!r}."
            )
        self.factory = factory
        self.formal_dp = formal_dp
        self.weighted = isinstance(factory, tff.aggregators.WeightedAggregationFactory)
        self._process: Any = None
        self._template: Any = None
        self._size: int | None = None

    def __repr__(self) -> str:
        return f"TFFAggregatorStep({type(self.factory).__name__}, formal_dp={self.formal_dp})"

    def _build(self, size: int) -> Any:
        if self._process is None:
            tff_runtime.stop_workers_at_exit()
            value_type = tff.TensorType(np.float32, [size])
            with tff_runtime.tracing_without_determinism():  # TFF's DP noise ops take no seed
                if self.weighted:
                    self._process = self.factory.create(value_type, tff.TensorType(np.float32))
                else:
                    self._process = self.factory.create(value_type)
            self._template = self._process.initialize()
            self._size = size
        elif size != self._size:
            raise AggregationError(
                f"{self!r} was built for updates of {self._size} values. Received: {size}; "
                "build a new step for another model."
            )
        return self._process

    def init(self) -> Any:
        """None: the TFF process state is created on the first call, once the size is known."""
        return None

    def check(self, num_clients: int) -> None:
        if num_clients < 1:
            raise AggregationError(f"{self!r} needs at least one update. Received: 0.")

    def __call__(self, updates: np.ndarray, weights: np.ndarray, state: Any) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        self.check(updates.shape[0])
        process = self._build(updates.shape[1])
        state = self._template if state is None else tf.nest.pack_sequence_as(self._template, state)
        # One value per client, in row order: CLIENTS-placed arguments are lists in TFF's
        # Python execution context.
        values = [row for row in updates.astype(np.float32)]
        if self.weighted:
            output = process.next(state, values, [np.float32(w) for w in weights])
        else:
            output = process.next(state, values)
        measurements: dict[str, float] = {}
        _scalars("", output.measurements, measurements)
        aggregate = np.asarray(output.result, np.float32)[None, :]
        leaves = tuple(np.asarray(leaf) for leaf in tf.nest.flatten(output.state))
        return StepOutput(aggregate, np.array([weights.sum()]), leaves, measurements)
