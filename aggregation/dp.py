"""Central differential privacy as aggregation steps: DP-FedAvg, plain Gaussian noise, and which
chains carry a formal guarantee.

``central_dp`` is the whole DP-FedAvg aggregation in one step: clip every update to norm C, sum,
add N(0, (z*C)^2) per coordinate, divide by the *expected* number of clients (a fixed denominator,
so the division does not depend on who took part). The noise and the adaptive clip come from
tensorflow-privacy's DP queries (``GaussianSumQuery`` / ``QuantileAdaptiveClipSumQuery`` inside a
``NormalizedQuery``): clipping and summing run as one compiled loop, the noise eagerly. The
query's global state is kept in the step state, so a checkpoint carries the adaptive clip norm.

The non-private adaptive clip for robust chains, ``adaptive_clip_by_norm``, is in
``fedwarden.aggregation.clipping`` (chain name ``adaptive_clip``); the TensorFlow plumbing the
queries need (seeding TF's global generator, the compiled accumulation) in ``_tf_queries``.

Why only ``central_dp`` is formal: under add/remove-one-client adjacency, adding or removing one
client changes the *sum of clipped updates* by a vector of norm at most C, so Gaussian noise of std
z*C gives the subsampled-Gaussian guarantee that ``fedwarden.aggregation.accounting.central_epsilon``
computes. A robust rule of clipped updates (coordinate-wise median, trimmed mean, Krum, ...) has no
such bound: adding one client moves the order statistics of every coordinate, by up to the spread
of the cohort (not C/n), so its sensitivity depends on the other clients' data. The Gaussian
mechanism's calibration does not apply as stated, and ``clip -> median -> gaussian_noise`` carries
no epsilon, however much noise it adds. ``is_formal_dp`` tells the two apart.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy".
  McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (DP-FedAvg).
  Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedwarden.aggregation._tf_queries import (
    compiled_accumulate,
    flatten_state,
    round_seed,
    tf_global_seed,
)
from fedwarden.aggregation.accounting import DPConfigError
from fedwarden.aggregation.base import AggregationError, StepOutput, as_cohort
from fedwarden.aggregation.clipping import ClipByNorm


@dataclass
class CentralDPState:
    """Round-to-round state of ``central_dp``: the DP query's global state, flattened to numpy.

    ``query_state`` is ``tf.nest.flatten`` of the tensorflow-privacy query's global state (clip
    norm, noise std, quantile-estimator state); ``round`` counts calls and keys the noise seed.
    """

    query_state: tuple[np.ndarray, ...]
    round: int = 0


def adaptive_noise_split(
    noise_multiplier: float, expected_clients: float, clipped_count_stddev: float | None = None
) -> tuple[float, float]:
    """Splits a total noise multiplier between the clipped sum and the clipped-count query.

    The clipped count (each client contributes +-1/2, sensitivity 1/2) gets std ``sigma_b``, i.e.
    noise multiplier ``2 * sigma_b``; the sum gets ``z_v`` with ``z_v**-2 + (2 sigma_b)**-2 =
    z**-2``, so the two Gaussians together are exactly one Gaussian mechanism of multiplier ``z``
    (Andrew et al. 2021, Sec. 3.1; the same rule as TFF's ``adaptive_clip_noise_params``).

    Returns:
      ``(value_noise_multiplier, clipped_count_stddev)``; the default ``sigma_b`` is
      ``expected_clients / 20``.
    """
    if noise_multiplier == 0:
        return 0.0, 0.0 if clipped_count_stddev is None else float(clipped_count_stddev)
    if clipped_count_stddev is None:
        clipped_count_stddev = 0.05 * expected_clients
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise DPConfigError(
            f"clipped_count_stddev={clipped_count_stddev:g} is too small for "
            f"noise_multiplier={noise_multiplier:g}: it must exceed noise_multiplier / 2 (the "
            "default is expected_clients / 20). Raise clipped_count_stddev or expected_clients, "
            "or use a fixed clip (adaptive=False)."
        )
    value = (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5
    if value >= 2 * noise_multiplier:
        warnings.warn(
            f"adaptive clipping needs {value / noise_multiplier:.2f}x the noise on the sum to keep "
            f"noise_multiplier={noise_multiplier:g}; raise clipped_count_stddev or sample more "
            "clients per round.",
            stacklevel=3,
        )
    return float(value), float(clipped_count_stddev)


class CentralDP:
    """DP-FedAvg aggregation: clip, sum, Gaussian noise, divide by ``expected_clients``.

    Output is one row (the noised mean) with weight 1. Measurements: ``clip_norm`` (the clip used
    this round), ``clipped_count``, ``clip_rate``, ``noise_std`` (std of the noise on the returned
    mean, per coordinate), and with ``adaptive=True`` also ``next_clip_norm``. Per client:
    ``clipped`` (bool, norm above the clip). ``clipped_count`` is the exact, un-noised count for
    the server's own monitoring; the private count feeds only the clip update.

    WARNING: client ``weights`` are ignored; every admitted client counts once (DP-FedAvg's uniform
    weighting; example-count weights would change the sensitivity). Leave quarantined clients out
    of the cohort instead of down-weighting them. Updates must be finite (admission checks this).

    WARNING: ``seed`` makes the noise repeatable, for simulations and tests. Anyone who knows the
    seed can regenerate and subtract the noise, so deployments leave ``seed=None`` (TF's own,
    unseeded randomness).
    """

    name = "central_dp"
    formal_dp = True

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        seed: int | None = None,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        if not clip_norm > 0:
            raise DPConfigError(f"clip_norm must be positive. Received: clip_norm={clip_norm}.")
        if not noise_multiplier >= 0:
            raise DPConfigError(
                f"noise_multiplier must be >= 0. Received: noise_multiplier={noise_multiplier}."
            )
        if not expected_clients > 0:
            raise DPConfigError(
                "expected_clients must be positive (clients_per_round, or sampling rate times "
                f"clients). Received: expected_clients={expected_clients}."
            )
        if not 0.0 <= target_quantile <= 1.0:
            raise DPConfigError(
                f"target_quantile must be in [0, 1]. Received: target_quantile={target_quantile}."
            )
        if not clip_learning_rate >= 0:
            raise DPConfigError(
                "clip_learning_rate must be >= 0. "
                f"Received: clip_learning_rate={clip_learning_rate}."
            )
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = float(expected_clients)
        self.seed = seed
        self.adaptive = bool(adaptive)
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        if self.adaptive:
            self.value_noise_multiplier, self.clipped_count_stddev = adaptive_noise_split(
                self.noise_multiplier, self.expected_clients, clipped_count_stddev
            )
        else:
            self.value_noise_multiplier, self.clipped_count_stddev = self.noise_multiplier, None
        self._query: Any = None
        self._template: Any = None
        self._accumulate: Any = None

    def _get_query(self) -> Any:
        if self._query is None:
            import tensorflow_privacy as tfp

            if self.adaptive:
                inner = tfp.QuantileAdaptiveClipSumQuery(
                    initial_l2_norm_clip=self.clip_norm,
                    noise_multiplier=self.value_noise_multiplier,
                    target_unclipped_quantile=self.target_quantile,
                    learning_rate=self.clip_learning_rate,
                    clipped_count_stddev=self.clipped_count_stddev,
                    expected_num_records=self.expected_clients,
                    geometric_update=True,
                )
            else:
                inner = tfp.GaussianSumQuery(
                    l2_norm_clip=self.clip_norm, stddev=self.noise_multiplier * self.clip_norm
                )
            self._query = tfp.NormalizedQuery(inner, denominator=self.expected_clients)
            self._template = self._query.initial_global_state()
            self._accumulate = compiled_accumulate(self._query)
        return self._query

    def __getstate__(self) -> dict[str, Any]:
        # The TF query and its compiled loop are rebuilt on demand; the hyperparameters suffice.
        return {**vars(self), "_query": None, "_template": None, "_accumulate": None}

    def _pack(self, flat: tuple[np.ndarray, ...]) -> Any:
        import tensorflow as tf

        self._get_query()
        return tf.nest.pack_sequence_as(self._template, [tf.constant(x) for x in flat])

    def init(self) -> CentralDPState:
        return CentralDPState(query_state=flatten_state(self._get_query().initial_global_state()))

    def current_clip(self, state: CentralDPState) -> float:
        """The clip norm this state will apply next round."""
        return self._clip_of(self._pack(state.query_state))

    def _clip_of(self, global_state: Any) -> float:
        sum_state = global_state.numerator_state
        return float((sum_state.sum_state if self.adaptive else sum_state).l2_norm_clip)

    def check(self, num_clients: int) -> None:
        if num_clients < 0:
            raise AggregationError(f"num_clients must be >= 0. Received: {num_clients}.")

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, state: CentralDPState | None
    ) -> StepOutput:
        import tensorflow as tf

        updates, weights = as_cohort(updates, weights)
        self.check(updates.shape[0])
        if state is None:
            state = self.init()
        query = self._get_query()
        global_state = self._pack(state.query_state)
        clip = self._clip_of(global_state)
        records = updates.astype(np.float32, copy=False)

        params = query.derive_sample_params(global_state)
        records = tf.convert_to_tensor(records)
        sample_state = self._accumulate(params, records)
        seed = None if self.seed is None else round_seed(self.seed, state.round)
        with tf_global_seed(seed):
            result, new_global_state, _ = query.get_noised_result(sample_state, global_state)

        clipped = tf.norm(records, axis=1).numpy() > clip
        k = len(clipped)
        measurements = {
            "clip_norm": clip,
            "clipped_count": float(clipped.sum()),
            "clip_rate": float(clipped.mean()) if k else 0.0,
            "noise_std": self.value_noise_multiplier * clip / self.expected_clients,
        }
        new_state = CentralDPState(flatten_state(new_global_state), state.round + 1)
        if self.adaptive:
            measurements["next_clip_norm"] = self._clip_of(new_global_state)
        mean = np.asarray(result, dtype=updates.dtype)[None, :]
        return StepOutput(
            updates=mean,
            weights=np.ones(1),
            state=new_state,
            measurements=measurements,
            per_client={"clipped": clipped},
        )

    def __repr__(self) -> str:
        params = (
            f"clip_norm={self.clip_norm!r}, noise_multiplier={self.noise_multiplier!r}, "
            f"expected_clients={self.expected_clients!r}, seed={self.seed!r}, "
            f"adaptive={self.adaptive!r}"
        )
        if self.adaptive:
            params += (
                f", target_quantile={self.target_quantile!r}, "
                f"clip_learning_rate={self.clip_learning_rate!r}, "
                f"clipped_count_stddev={self.clipped_count_stddev!r}"
            )
        return f"CentralDP({params})"


def central_dp(
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    seed: int | None = None,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> CentralDP:
    """DP-FedAvg as one aggregation step (McMahan et al. 2018; adaptive clip: Andrew et al. 2021).

    Args:
      clip_norm: L2 clip norm C (the initial one when ``adaptive``).
      noise_multiplier: z; the noise on the clipped sum has std z*C. With ``adaptive`` this is the
        total multiplier, split between the sum and the clipped count (``adaptive_noise_split``),
        so ``accounting.central_epsilon(z, q, rounds, delta)`` holds for both modes. 0 means no
        noise (not private; for tests and baselines).
      expected_clients: the fixed denominator, ``q * num_clients`` under Poisson sampling.
      seed: makes the noise repeatable (simulations); None for deployments (see ``CentralDP``).
      adaptive: move the clip geometrically towards the ``target_quantile`` of update norms.
      target_quantile: share of updates that should end up unclipped (0.5 = median norm).
      clip_learning_rate: geometric step; the clip changes by at most ``exp(rate)`` per round.
      clipped_count_stddev: noise std on the clipped count; default ``expected_clients / 20``.

    Returns:
      A ``CentralDP`` step; its state is a ``CentralDPState`` (picklable).

    Example:
      >>> step = central_dp(clip_norm=1.0, noise_multiplier=1.1, expected_clients=10, seed=0)
      >>> out = step(np.ones((10, 4)), np.ones(10), step.init())  # doctest: +SKIP
      >>> out.updates.shape  # doctest: +SKIP
      (1, 4)
    """
    return CentralDP(
        clip_norm,
        noise_multiplier,
        expected_clients,
        seed=seed,
        adaptive=adaptive,
        target_quantile=target_quantile,
        clip_learning_rate=clip_learning_rate,
        clipped_count_stddev=clipped_count_stddev,
    )


@dataclass
class GaussianNoiseState:
    """State of ``gaussian_noise``: the generator's entropy and the number of rounds done."""

    entropy: int
    round: int = 0


class GaussianNoise:
    """Adds N(0, stddev^2) per coordinate to a one-row aggregate.

    For robust-plus-noise chains such as ``clip -> median -> gaussian_noise``. Such a chain carries
    NO formal DP guarantee (see the module docstring); use ``central_dp`` for that. Measurements:
    ``noise_std``.
    """

    name = "gaussian_noise"
    formal_dp = False

    def __init__(self, stddev: float, seed: int | None = None) -> None:
        if not stddev >= 0:
            raise AggregationError(f"stddev must be >= 0. Received: stddev={stddev}.")
        self.stddev = float(stddev)
        self.seed = seed

    def init(self) -> GaussianNoiseState:
        entropy = np.random.SeedSequence(self.seed).entropy
        return GaussianNoiseState(entropy=int(entropy))

    def check(self, num_clients: int) -> None:
        if num_clients != 1:
            raise AggregationError(
                "gaussian_noise adds noise to a single aggregate row. Received: "
                f"{num_clients} rows; put a rule that reduces the cohort (mean, median, ...) "
                "before it."
            )

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, state: GaussianNoiseState | None
    ) -> StepOutput:
        updates, weights = as_cohort(updates, weights)
        self.check(updates.shape[0])
        if state is None:
            state = self.init()
        rng = np.random.default_rng(np.random.SeedSequence([state.entropy, state.round]))
        noised = updates + rng.normal(0.0, self.stddev, size=updates.shape).astype(updates.dtype)
        return StepOutput(
            updates=noised,
            weights=weights.copy(),
            state=GaussianNoiseState(state.entropy, state.round + 1),
            measurements={"noise_std": self.stddev},
        )

    def __repr__(self) -> str:
        return f"GaussianNoise(stddev={self.stddev!r}, seed={self.seed!r})"


def gaussian_noise(stddev: float, seed: int | None = None) -> GaussianNoise:
    """Gaussian noise on a one-row aggregate, with no formal DP guarantee (see ``GaussianNoise``).

    Args:
      stddev: noise std per coordinate, in the units of the aggregate.
      seed: repeatable noise; None draws fresh entropy (kept in the state, so resuming from a
        checkpoint continues the same stream).
    """
    return GaussianNoise(stddev, seed)


def _record_wise(step: Any) -> bool:
    declared = getattr(step, "dp_record_wise", None)
    if declared is not None:
        return bool(declared)
    return type(step) is ClipByNorm  # a fixed clip maps each row on its own


def _flatten_steps(step: Any) -> list[Any]:
    children = getattr(step, "steps", None)
    if children is None:
        return [step]
    return [leaf for child in children for leaf in _flatten_steps(child)]


def is_formal_dp(step: Any) -> bool:
    """True iff ``step`` (a single step or a chain) is DP-FedAvg with a formal guarantee.

    The rule: exactly one step with ``formal_dp = True`` (``central_dp``), and every step before
    it is record-wise (a fixed ``clip_by_norm``, or any step declaring ``dp_record_wise = True``:
    each output row depends only on its own input row). Steps after it only see the noised
    aggregate: post-processing, which keeps the guarantee. Anything that mixes clients before the
    noise (a robust rule, an adaptive clip driven by un-noised norms, mixing) voids it, as does
    noise from ``gaussian_noise``, which is not calibrated to a sensitivity.
    """
    steps = _flatten_steps(step)
    mechanisms = [i for i, s in enumerate(steps) if getattr(s, "formal_dp", False)]
    if len(mechanisms) != 1:
        return False
    return all(_record_wise(s) for s in steps[: mechanisms[0]])
