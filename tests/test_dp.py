"""Differential privacy: accounting, DP-FedAvg, plain noise, formal-DP detection, DP-SGD."""

from __future__ import annotations

import math
import pickle

import dp_accounting
import numpy as np
import pytest

from fedwarden.aggregation.accounting import (
    DPConfigError,
    central_epsilon,
    default_delta,
    dpsgd_epsilon,
    poisson_sample,
    solve_noise_multiplier,
    validate_dp,
)
from fedwarden.aggregation.base import AggregationError, StepOutput
from fedwarden.aggregation.chain import chain, parse_chain
from fedwarden.aggregation.clipping import adaptive_clip_by_norm, clip_by_norm
from fedwarden.aggregation.dp import central_dp, gaussian_noise, is_formal_dp
from fedwarden.aggregation.rules import median

DELTA = 1e-5


def _clipped_mean(updates: np.ndarray, clip: float, denominator: float) -> np.ndarray:
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    return (updates * np.minimum(1.0, clip / norms)).sum(axis=0) / denominator


# --- accounting ---------------------------------------------------------------------------------


def test_central_epsilon_agrees_with_independent_rdp():
    z, q, rounds = 1.1, 0.05, 200
    orders = [1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0]
    acc = dp_accounting.rdp.RdpAccountant(orders=orders)
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count=rounds
    )
    expected = acc.get_epsilon(DELTA)
    assert central_epsilon(z, q, rounds, DELTA) == pytest.approx(expected, rel=0.10)


def test_rdp_and_pld_are_close():
    rdp = central_epsilon(1.0, 0.1, 50, DELTA, accountant="rdp")
    pld = central_epsilon(1.0, 0.1, 50, DELTA, accountant="pld")
    assert pld <= rdp * 1.01  # PLD is the tighter accountant
    assert pld == pytest.approx(rdp, rel=0.2)


def test_epsilon_edge_cases():
    assert central_epsilon(1.0, 0.1, 0, DELTA) == 0.0
    assert central_epsilon(0.0, 0.1, 10, DELTA) == math.inf
    with pytest.raises(DPConfigError, match="accountant"):
        central_epsilon(1.0, 0.1, 10, DELTA, accountant="moments")
    with pytest.raises(DPConfigError, match="sampling_rate=1.5"):
        central_epsilon(1.0, 1.5, 10, DELTA)
    with pytest.raises(DPConfigError, match="delta=2"):
        central_epsilon(1.0, 0.1, 10, 2)


def test_solve_noise_multiplier_hits_target():
    target, q, rounds = 2.0, 0.1, 50
    z = solve_noise_multiplier(target, q, rounds, DELTA)
    eps = central_epsilon(z, q, rounds, DELTA)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.02)
    # A little less noise would overshoot: z is (close to) the smallest that works.
    assert central_epsilon(z * 0.98, q, rounds, DELTA) > target


def test_solve_noise_multiplier_unreachable():
    with pytest.raises(DPConfigError, match="unreachable"):
        solve_noise_multiplier(1e-4, 1.0, 10_000, 1e-9)


def test_dpsgd_epsilon_falls_with_noise():
    eps = [dpsgd_epsilon(z, 32, 1000, 300, DELTA) for z in (0.7, 1.0, 1.5, 3.0)]
    assert all(math.isfinite(e) for e in eps)
    assert eps == sorted(eps, reverse=True) and eps[0] > eps[-1]


def test_default_delta_rule():
    assert default_delta(100) == pytest.approx(100**-1.1)
    assert default_delta(100) < 1 / 100


def test_poisson_sample():
    ids = [f"c{i:03d}" for i in range(1000)]
    a = poisson_sample(ids, 0.1, np.random.default_rng(3))
    b = poisson_sample(ids, 0.1, np.random.default_rng(3))
    assert a == b and a == sorted(a)
    assert 60 < len(a) < 140
    assert poisson_sample(ids, 1.0, np.random.default_rng(0)) == ids
    with pytest.raises(DPConfigError, match="rate=0"):
        poisson_sample(ids, 0.0, np.random.default_rng(0))


def test_validate_dp_messages():
    assert validate_dp(mode="off", noise_multiplier=0.0) is None
    assert validate_dp(noise_multiplier=1.1, clip_norm=1.0) == 1.1
    with pytest.raises(DPConfigError, match="noise_multiplier=0"):
        validate_dp(noise_multiplier=0.0, clip_norm=1.0)
    with pytest.raises(DPConfigError, match="clip_norm=0"):
        validate_dp(noise_multiplier=1.0, clip_norm=0.0)
    with pytest.raises(DPConfigError, match="num_microbatches=3, batch_size=32"):
        validate_dp(mode="dp_sgd", noise_multiplier=1.0, batch_size=32, num_microbatches=3)
    with pytest.raises(DPConfigError, match="unreachable"):
        validate_dp(target_epsilon=1e-4, delta=1e-9, sampling_rate=1.0, rounds=10_000)
    with pytest.raises(DPConfigError, match="needs delta"):
        validate_dp(target_epsilon=1.0, sampling_rate=0.1, rounds=10)
    with pytest.raises(DPConfigError, match="mode='local'"):
        validate_dp(mode="local", noise_multiplier=1.0)
    z = validate_dp(target_epsilon=3.0, delta=DELTA, sampling_rate=0.1, rounds=20)
    assert central_epsilon(z, 0.1, 20, DELTA) <= 3.0


# --- central_dp -------------------------------------------------------------------------------


def test_central_dp_without_noise_is_clipped_sum_over_expected():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(6, 40)) * np.array([[0.01], [0.1], [1], [2], [5], [0.2]])
    updates = updates.astype(np.float32)
    step = central_dp(clip_norm=1.0, noise_multiplier=0.0, expected_clients=8, seed=0)
    out = step(updates, np.ones(6), step.init())
    assert isinstance(out, StepOutput) and out.updates.shape == (1, 40)
    np.testing.assert_allclose(out.updates[0], _clipped_mean(updates, 1.0, 8), rtol=0, atol=1e-6)
    clipped = np.linalg.norm(updates, axis=1) > 1.0
    np.testing.assert_array_equal(out.per_client["clipped"], clipped)
    assert out.measurements["clipped_count"] == clipped.sum()
    assert out.measurements["clip_rate"] == pytest.approx(clipped.mean())
    assert out.measurements["clip_norm"] == 1.0 and out.measurements["noise_std"] == 0.0


def test_central_dp_noise_std():
    rng = np.random.default_rng(1)
    updates = rng.normal(size=(5, 20_000)).astype(np.float32) * 0.01
    step = central_dp(clip_norm=2.0, noise_multiplier=1.5, expected_clients=10, seed=7)
    out = step(updates, np.ones(5), step.init())
    noise = out.updates[0] - _clipped_mean(updates, 2.0, 10)
    assert out.measurements["noise_std"] == pytest.approx(0.3)
    assert noise.std() == pytest.approx(1.5 * 2.0 / 10, rel=0.03)
    assert abs(noise.mean()) < 0.01


def test_central_dp_empty_round_is_pure_noise():
    step = central_dp(clip_norm=1.0, noise_multiplier=1.0, expected_clients=4, seed=0)
    out = step(np.zeros((0, 1000), np.float32), np.zeros(0), step.init())
    assert out.updates.shape == (1, 1000)
    assert out.updates.std() == pytest.approx(0.25, rel=0.15)


def test_adaptive_clip_moves_to_target_quantile():
    rng = np.random.default_rng(2)
    directions = rng.normal(size=(20, 10))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    updates = directions * np.linspace(1.0, 20.0, 20)[:, None]  # median norm ~10.5
    step = central_dp(
        clip_norm=0.5, noise_multiplier=0.5, expected_clients=20, seed=3, adaptive=True
    )
    state = step.init()
    clips = []
    for _ in range(40):
        out = step(updates, np.ones(20), state)
        state = out.state
        clips.append(out.measurements["clip_norm"])
    assert clips[1] > clips[0]  # everything was clipped, so the clip grows
    assert 6.0 < step.current_clip(state) < 16.0
    assert 0.2 <= out.measurements["clip_rate"] <= 0.8
    assert out.measurements["next_clip_norm"] == pytest.approx(step.current_clip(state))


def test_adaptive_noise_split_keeps_total_multiplier():
    step = central_dp(1.0, 1.0, expected_clients=100, adaptive=True)  # clipped_count_stddev 5
    z_v, sigma_b = step.value_noise_multiplier, step.clipped_count_stddev
    assert sigma_b == 5.0 and z_v > 1.0
    assert z_v**-2 + (2 * sigma_b) ** -2 == pytest.approx(1.0)


def test_same_seed_same_output_and_state_round_trips():
    rng = np.random.default_rng(4)
    updates = rng.normal(size=(8, 300)).astype(np.float32)
    step = central_dp(1.0, 1.0, 8, seed=11, adaptive=True, clipped_count_stddev=1.0)

    def run(state, rounds):
        outs = []
        for _ in range(rounds):
            out = step(updates, np.ones(8), state)
            state = out.state
            outs.append(out.updates)
        return outs, state

    a, state_a = run(step.init(), 3)
    b, _ = run(step.init(), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])  # fresh noise every round

    # Resume from a pickled state (and a pickled step): the same continuation.
    restored = pickle.loads(pickle.dumps(state_a))
    step2 = pickle.loads(pickle.dumps(step))
    cont, _ = run(state_a, 2)
    out = step2(updates, np.ones(8), restored)
    np.testing.assert_array_equal(out.updates, cont[0])
    assert step.current_clip(restored) == step.current_clip(state_a)

    other = central_dp(1.0, 1.0, 8, seed=12, adaptive=True, clipped_count_stddev=1.0)
    assert not np.array_equal(other(updates, np.ones(8), other.init()).updates, a[0])


def test_seeded_noise_leaves_tf_random_stream_alone():
    import tensorflow as tf

    step = central_dp(1.0, 1.0, expected_clients=2, seed=5)
    tf.random.set_seed(123)
    expected = tf.random.normal([4]).numpy(), tf.random.normal([4]).numpy()
    tf.random.set_seed(123)
    first = tf.random.normal([4]).numpy()
    step(np.ones((2, 3), np.float32), np.ones(2), step.init())
    second = tf.random.normal([4]).numpy()
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_array_equal(second, expected[1])


def test_central_dp_bad_config():
    with pytest.raises(DPConfigError, match="clip_norm=0"):
        central_dp(clip_norm=0.0, noise_multiplier=1.0, expected_clients=10)
    with pytest.raises(DPConfigError, match="noise_multiplier=-1"):
        central_dp(clip_norm=1.0, noise_multiplier=-1.0, expected_clients=10)
    with pytest.raises(DPConfigError, match="expected_clients=0"):
        central_dp(clip_norm=1.0, noise_multiplier=1.0, expected_clients=0)
    with pytest.raises(DPConfigError, match="clipped_count_stddev=0.5"):
        central_dp(1.0, 1.0, expected_clients=10, adaptive=True)  # default stddev 10/20 too small
    with pytest.raises(DPConfigError, match="target_quantile=1.5"):
        central_dp(1.0, 1.0, expected_clients=10, adaptive=True, target_quantile=1.5)
    assert "noise_multiplier=1.0" in repr(central_dp(1.0, 1.0, 10))


# --- gaussian_noise and formal DP ---------------------------------------------------------------


def test_gaussian_noise_step():
    step = gaussian_noise(0.5, seed=0)
    row = np.zeros((1, 20_000), np.float32)
    a = step(row, np.ones(1), step.init())
    b = step(row, np.ones(1), step.init())
    np.testing.assert_array_equal(a.updates, b.updates)
    assert a.updates.std() == pytest.approx(0.5, rel=0.03)
    assert not np.array_equal(step(row, np.ones(1), a.state).updates, a.updates)
    assert pickle.loads(pickle.dumps(a.state)) == a.state
    with pytest.raises(AggregationError, match="3 rows"):
        step(np.zeros((3, 5)), np.ones(3), step.init())


class _Composite:
    """Anything exposing ``steps`` is walked like a chain."""

    def __init__(self, *steps):
        self.steps = steps


def test_is_formal_dp():
    dp = central_dp(1.0, 1.0, 10)
    noise = gaussian_noise(0.1)
    assert dp.formal_dp and is_formal_dp(dp)
    assert not noise.formal_dp and not is_formal_dp(noise)
    assert is_formal_dp(chain(dp))
    assert is_formal_dp(chain(clip_by_norm(5.0), dp))  # a fixed clip is record-wise
    assert is_formal_dp(chain(dp, gaussian_noise(0.1)))  # after the mechanism: post-processing
    assert not is_formal_dp(chain(median(), noise))
    assert not is_formal_dp(chain(clip_by_norm(1.0), median(), noise))
    assert not is_formal_dp(chain(median(), dp))  # a robust rule before the mechanism
    assert not is_formal_dp(chain(adaptive_clip_by_norm(), dp))  # bound learned from all clients
    assert not is_formal_dp(chain(dp, central_dp(1.0, 1.0, 10)))
    assert is_formal_dp(_Composite(chain(clip_by_norm(5.0)), dp))
    parsed = parse_chain(
        "clip:max_norm=5+central_dp:clip_norm=1,noise_multiplier=1,expected_clients=4"
    )
    assert is_formal_dp(parsed)
    assert not is_formal_dp(parse_chain("clip:max_norm=1+median+gaussian_noise:stddev=0.01"))


def test_central_dp_and_noise_inside_chains():
    rng = np.random.default_rng(5)
    updates = rng.normal(size=(6, 30)).astype(np.float32)
    step = chain(clip_by_norm(5.0), central_dp(1.0, 0.0, expected_clients=6, seed=0))
    out = step(updates, np.ones(6), step.init())
    np.testing.assert_allclose(out.updates[0], _clipped_mean(updates, 1.0, 6), atol=1e-6)
    assert out.measurements["central_dp/clip_norm"] == 1.0
    assert out.per_client["central_dp/clipped"].shape == (6,)

    robust = chain(clip_by_norm(1.0), median(), gaussian_noise(0.1, seed=0))
    out = robust(updates, np.ones(6), robust.init())
    assert out.updates.shape == (1, 30) and out.measurements["gaussian_noise/noise_std"] == 0.1


def test_adaptive_clip_by_norm_tracks_median_norm():
    rng = np.random.default_rng(6)
    directions = rng.normal(size=(11, 5))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    updates = directions * np.arange(1.0, 12.0)[:, None]  # median norm 6
    step = adaptive_clip_by_norm(initial_norm=0.5, target_quantile=0.5, learning_rate=0.3)
    state = step.init()
    for _ in range(40):
        out = step(updates, np.ones(11), state)
        state = out.state
    assert 4.5 < step.clip_norm(state) < 8.0
    assert np.linalg.norm(out.updates, axis=1).max() <= out.measurements["clip_norm"] * (1 + 1e-5)
    restored = pickle.loads(pickle.dumps(state))
    assert step.clip_norm(restored) == step.clip_norm(state)
    assert "target_quantile=0.5" in repr(step)
    from_string = parse_chain("adaptive_clip:initial_norm=0.5:learning_rate=0.3+median")
    assert repr(from_string.steps[0]) == repr(step)  # in the chain registry


# --- DP-SGD -----------------------------------------------------------------------------------


def test_dp_sgd_fit_runs_and_account_reports_epsilon():
    import tensorflow as tf

    from fedwarden.clients.dp_sgd import ClientPrivacyAccount, dp_optimizer, per_example_loss

    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = tf.keras.Sequential([tf.keras.Input(shape=(6,)), tf.keras.layers.Dense(2)])
    model.compile(
        optimizer=dp_optimizer(l2_norm_clip=1.0, noise_multiplier=1.1, learning_rate=0.1),
        loss=per_example_loss(from_logits=True),
    )
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # short last batch is fine
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))

    account = ClientPrivacyAccount(noise_multiplier=1.1, batch_size=16)
    assert account.record("c01", num_examples=70, epochs=2) == 10
    eps = account.epsilon("c01", DELTA)
    assert math.isfinite(eps) and eps > 0
    assert eps == pytest.approx(dpsgd_epsilon(1.1, 16, 70, 10, DELTA))
    account.record("c01", num_examples=70, epochs=1)
    account.record("c01", num_examples=90, epochs=1)
    assert account.steps("c01") == 10 + 5 + 6
    assert account.epsilon("c01", DELTA) > eps
    assert account.epsilon("c99", DELTA) == 0.0
    assert set(account.epsilons(DELTA)) == {"c01"}


def test_dp_sgd_bad_config():
    from fedwarden.clients.dp_sgd import ClientPrivacyAccount, dp_optimizer

    with pytest.raises(DPConfigError, match="l2_norm_clip=0"):
        dp_optimizer(0.0, 1.0)
    with pytest.raises(DPConfigError, match="num_microbatches=0"):
        dp_optimizer(1.0, 1.0, num_microbatches=0)
    with pytest.raises(DPConfigError, match="batch_size=0"):
        ClientPrivacyAccount(noise_multiplier=1.0, batch_size=0)


def test_central_dp_is_formal_for_a_plain_mean_however_it_is_spelled():
    from fedwarden.config import RunConfig
    from fedwarden.server.defence import central_privacy

    def formal(aggregator: str) -> bool:
        config = RunConfig(dp="central", dp_noise_multiplier=1.0, aggregator=aggregator)
        return central_privacy(config, config.clients).formal

    assert formal("mean") and formal(" mean ")
    assert not formal("median") and not formal("clip:max_norm=1+mean")
