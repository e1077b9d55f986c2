"""Published properties of the pre-aggregators and filtering rules (issue 17), and the budget."""

import math
import pickle

import numpy as np
import pytest

from fedwarden.aggregation.base import AggregationError
from fedwarden.aggregation.budget import byzantine_quantile, check_budget, recommended_rules
from fedwarden.aggregation.chain import chain, parse_chain
from fedwarden.aggregation.filtering import (
    clipped_clustering,
    dnc,
    flame,
    fltrust,
    signguard,
)
from fedwarden.aggregation.preaggregation import (
    adaptive_robust_clipping,
    arc_clipped_count,
    bucketing,
    client_momentum,
)
from fedwarden.aggregation.rules import krum, median


def cohort(h=8, m=2, d=200, seed=0, spread=0.05):
    """Honest updates around a shared direction and ``m`` placeholder rows for attackers."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.1, d)
    honest = (base + rng.normal(0.0, spread, (h, d))).astype(np.float32)
    return honest, base, rng


def run(step, updates, **kwargs):
    return step(updates, np.ones(len(updates)), step.init(), **kwargs)


# ---------------------------------------------------------------- bucketing


def test_bucketing_averages_a_random_partition_into_buckets():
    honest, _, _ = cohort(h=10)
    out = run(bucketing(bucket_size=2), honest)
    assert out.updates.shape == (5, honest.shape[1])
    members = out.per_client["bucket"]
    assert sorted(np.bincount(members.astype(int))) == [2] * 5
    for b in range(5):
        np.testing.assert_allclose(out.updates[b], honest[members == b].mean(0), rtol=1e-6)
    np.testing.assert_allclose(out.updates.mean(0), honest.mean(0), rtol=1e-5, atol=1e-7)
    assert out.weights.sum() == 10


def test_bucketing_divides_the_honest_variance_by_the_bucket_size():
    # Karimireddy et al. 2022, Lemma 1: bucket means of s iid updates have variance sigma^2 / s.
    rng = np.random.default_rng(1)
    updates = rng.normal(0.0, 1.0, (400, 50)).astype(np.float32)
    out = run(bucketing(bucket_size=4), updates)
    ratio = out.updates.var(axis=0).mean() / updates.var(axis=0).mean()
    assert 0.18 < ratio < 0.33


def test_bucketing_state_repeats_and_advances():
    honest, _, _ = cohort(h=10)
    step = bucketing(bucket_size=2, seed=3)
    first = step(honest, np.ones(10), step.init())
    again = step(honest, np.ones(10), step.init())
    np.testing.assert_array_equal(first.per_client["bucket"], again.per_client["bucket"])
    later = [step(honest, np.ones(10), first.state).per_client["bucket"] for _ in range(2)]
    np.testing.assert_array_equal(later[0], later[1])  # the input state is never mutated


def test_bucketing_assumption_and_rows_seen_by_the_next_rule():
    with pytest.raises(AggregationError, match="bucket_size <= 1"):
        bucketing(bucket_size=2, num_byzantine=3).check(10)
    chain(bucketing(bucket_size=2, num_byzantine=1), krum(1)).check(10)  # krum sees 5 > 4
    with pytest.raises(AggregationError, match="num_clients=5"):
        chain(bucketing(bucket_size=2, num_byzantine=1), krum(2)).check(10)
    parse_chain("bucketing:bucket_size=2+median", num_byzantine_default=1).check(10)


# ---------------------------------------------------------------- ARC


def test_arc_clips_exactly_k_largest_to_the_next_norm():
    # Allouah et al. 2024: k = floor(2 (f/n) (n - f)) updates clipped to the (k+1)-th norm.
    assert arc_clipped_count(10, 2) == 3 and arc_clipped_count(10, 0) == 0
    honest, _, _ = cohort(h=10)
    honest[[1, 4, 7]] *= np.array([5.0, 20.0, 50.0], np.float32)[:, None]
    out = run(adaptive_robust_clipping(2), honest)
    norms = np.linalg.norm(honest.astype(np.float64), axis=1)
    after = np.linalg.norm(out.updates.astype(np.float64), axis=1)
    fourth = np.sort(norms)[-4]
    np.testing.assert_allclose(after[[1, 4, 7]], fourth, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(10), [1, 4, 7])
    np.testing.assert_array_equal(out.updates[untouched], honest[untouched])
    cos = (out.updates[7] @ honest[7]) / (after[7] * norms[7])
    assert cos == pytest.approx(1.0, abs=1e-6)  # direction kept
    assert out.per_client["clipped"].sum() == 3


def test_arc_needs_an_honest_majority():
    with pytest.raises(AggregationError, match="num_byzantine < num_clients / 2"):
        adaptive_robust_clipping(5).check(10)


# ---------------------------------------------------------------- client momentum


def test_client_momentum_keeps_per_client_state_and_shrinks_noise():
    # Karimireddy et al. 2021: momentum's stationary variance is (1 - beta) / (1 + beta) sigma^2.
    step = client_momentum(beta=0.9)
    state = step.init()
    rng = np.random.default_rng(0)
    sent = []
    for _ in range(600):
        noisy = rng.normal(1.0, 1.0, (2, 20)).astype(np.float32)
        out = step(noisy, np.ones(2), state, client_ids=["a", "b"])
        state = out.state
        sent.append(out.updates[0])
    ratio = np.var(np.array(sent[100:]), axis=0).mean()
    assert ratio == pytest.approx(0.1 / 1.9, rel=0.3)
    assert set(state) == {"a", "b"}


def test_client_momentum_in_a_chain_gets_ids_and_survives_a_checkpoint():
    step = chain(client_momentum(beta=0.5), median())
    assert step.uses_client_ids
    x = np.ones((3, 4), np.float32)
    out = step(x, np.ones(3), step.init(), client_ids=["a", "b", "c"])
    state = pickle.loads(pickle.dumps(out.state))
    out = step(3 * x[:2], np.ones(2), state, client_ids=["a", "c"])
    momenta = out.state[0]
    np.testing.assert_allclose(momenta["a"], 2.0)  # 0.5 * 1 + 0.5 * 3
    np.testing.assert_allclose(momenta["b"], 1.0)  # not sampled: unchanged
    np.testing.assert_allclose(out.updates[0], 2.0)


# ---------------------------------------------------------------- filtering rules


def test_signguard_drops_scaled_and_sign_flipped_updates():
    honest, _, _ = cohort(h=8, d=1000)
    bad = np.concatenate([-honest[:2], 20.0 * honest[2:4]])
    updates = np.concatenate([bad, honest])
    out = run(signguard(), updates)
    np.testing.assert_array_equal(out.per_client["selected"][:4], 0.0)
    assert out.per_client["selected"][4:].sum() >= 7
    norms = np.linalg.norm(updates, axis=1)
    assert np.linalg.norm(out.updates[0]) <= np.median(norms) * (1 + 1e-5)


def test_dnc_removes_attackers_that_share_a_direction():
    honest, base, rng = cohort(h=8, d=500, spread=0.1)
    shift = rng.normal(0.0, 1.0, 500)
    bad = (honest.mean(0) + 0.3 * shift / np.linalg.norm(shift) * 10).astype(np.float32)
    updates = np.concatenate([np.repeat(bad[None], 2, 0), honest])
    out = run(dnc(num_byzantine=2, subsample=200), updates)
    np.testing.assert_array_equal(out.per_client["selected"][:2], 0.0)
    assert out.per_client["selected"][2:].sum() >= 6


def test_flame_excludes_a_minority_cluster_and_clips_to_the_median_norm():
    honest, _, rng = cohort(h=7, d=300)
    other = rng.normal(0.0, 0.1, 300)
    bad = (other + rng.normal(0.0, 0.01, (3, 300))).astype(np.float32)
    updates = np.concatenate([bad, honest])
    out = run(flame(noise_factor=0.0), updates)
    np.testing.assert_array_equal(out.per_client["selected"][:3], 0.0)
    assert out.per_client["selected"][3:].sum() >= 6  # HDBSCAN may call an honest edge point noise
    bound = np.median(np.linalg.norm(updates.astype(np.float64), axis=1))
    assert np.linalg.norm(out.updates[0]) <= bound * (1 + 1e-6)
    noisy = run(flame(noise_factor=0.5), updates)
    assert np.std(noisy.updates[0] - out.updates[0]) == pytest.approx(0.5 * bound, rel=0.2)


def test_clipped_clustering_keeps_the_larger_cluster_and_remembers_norms():
    honest, _, _ = cohort(h=7, d=300)
    updates = np.concatenate([-3.0 * honest[:3], honest])
    step = clipped_clustering()
    out = run(step, updates)
    np.testing.assert_array_equal(out.per_client["selected"][:3], 0.0)
    assert out.per_client["selected"][3:].sum() == 7
    assert out.state.shape == (10,)
    again = step(updates, np.ones(10), out.state)
    assert again.state.shape == (20,)


def test_clipped_clustering_sets_aside_random_directions_before_they_set_the_bound():
    # Round one of Gaussian attackers at 40%: six noise updates of ten. The median norm is a
    # noise norm, so without the alignment test the noise is averaged in unclipped.
    honest, base, rng = cohort(h=4, d=5000)
    noise = rng.normal(0.0, 200.0, (6, 5000)).astype(np.float32)
    out = run(clipped_clustering(), np.concatenate([noise, honest]))
    assert out.measurements["unaligned_count"] == 6
    np.testing.assert_array_equal(out.per_client["selected"][:6], 0.0)
    np.testing.assert_allclose(out.state, np.linalg.norm(honest.astype(np.float64), axis=1))
    assert np.linalg.norm(out.updates[0]) <= np.linalg.norm(honest, axis=1).max() * (1 + 1e-6)
    cosine = out.updates[0] @ base / (np.linalg.norm(out.updates[0]) * np.linalg.norm(base))
    assert cosine > 0.9


def test_clipped_clustering_keeps_every_update_when_the_dimension_is_too_small_to_tell():
    # With d = 20 a random direction's cosine to a fixed one has sd 0.22: no test is possible.
    honest, _, rng = cohort(h=4, d=20)
    noise = rng.normal(0.0, 1.0, (3, 20)).astype(np.float32)
    out = run(clipped_clustering(), np.concatenate([noise, honest]))
    assert out.measurements["unaligned_count"] == 0
    assert out.state.shape == (7,)


def test_clipped_clustering_keeps_an_honest_update_that_no_other_shares():
    honest, _, rng = cohort(h=6, d=3000)
    honest[:, :300] = 0.0
    loner = np.zeros(3000, np.float32)
    loner[:300] = rng.laplace(size=300)  # its own classes' coordinates, heavy tailed
    out = run(clipped_clustering(), np.vstack([honest, loner]))
    assert out.measurements["unaligned_count"] == 0 and out.state.shape == (7,)


def test_clipped_clustering_bounds_a_first_round_that_half_the_cohort_attacks():
    # Five identical large crafted updates against five honest ones, in a first round: whichever
    # cluster wins the tie, no update counts for more than the honest norms.
    honest, base, _ = cohort(h=5, d=2000)
    crafted = np.repeat((-10.0 * base)[None], 5, 0).astype(np.float32)
    out = run(clipped_clustering(), np.concatenate([crafted, honest]))
    largest_honest = np.linalg.norm(honest.astype(np.float64), axis=1).max()
    assert out.measurements["clip_norm"] <= largest_honest
    assert np.linalg.norm(out.updates[0]) <= largest_honest * (1 + 1e-6)


def test_clipped_clustering_counts_copies_of_one_update_once():
    # Mimic: three attackers resend the honest update farthest from the rest. Without the rule
    # the four equal rows move the clipping bound and weigh four times in the clustering; with
    # it the round aggregates as if the copies had not come.
    honest, base, rng = cohort(h=7, d=2000, spread=0.1)
    honest[0] = (0.3 * base + rng.normal(0.0, 0.1, 2000)).astype(np.float32)
    copies = np.repeat(honest[:1], 3, 0)
    step = clipped_clustering()
    alone = run(step, honest)
    copied = run(step, np.concatenate([honest, copies]))
    assert copied.measurements["copies_count"] == 3
    np.testing.assert_array_equal(copied.per_client["selected"][7:], 0.0)
    np.testing.assert_array_equal(copied.per_client["selected"][:7], alone.per_client["selected"])
    np.testing.assert_allclose(copied.updates, alone.updates, rtol=1e-6)
    np.testing.assert_array_equal(copied.state, alone.state)


def test_clipped_clustering_keeps_nothing_when_no_update_has_a_partner():
    rng = np.random.default_rng(3)
    out = run(clipped_clustering(), rng.normal(0.0, 1.0, (5, 4000)).astype(np.float32))
    assert out.measurements["unaligned_count"] == 5
    assert not out.updates.any() and out.state.shape == (0,)


def test_fltrust_trusts_by_direction_and_bounds_the_norm_by_the_server_update():
    # Cao et al. 2021: ReLU(cosine) trust and rescaling to ||g0|| bound every contribution, even
    # with a malicious majority.
    honest, base, _ = cohort(h=3, d=200)
    bad = np.concatenate([-5.0 * honest, 100.0 * np.repeat(-base[None], 4, 0)]).astype(np.float32)
    updates = np.concatenate([bad, honest])
    step = fltrust()
    with pytest.raises(AggregationError, match="bind_reference"):
        run(step, updates)
    step.bind_reference(lambda: base)
    out = run(step, updates)
    np.testing.assert_array_equal(out.per_client["trust"][:7], 0.0)
    assert (out.per_client["trust"][7:] > 0).all()
    assert np.linalg.norm(out.updates[0]) <= np.linalg.norm(base) * (1 + 1e-6)
    assert out.updates[0] @ base > 0


def test_new_rules_parse_from_chain_strings():
    for spec in ("arc+median", "client_momentum+centered_clipping:radius=1", "signguard", "dnc",
                 "flame", "clipped_clustering", "bucketing:bucket_size=2+median"):  # fmt: skip
        parse_chain(spec, num_byzantine_default=1).check(10)


# ---------------------------------------------------------------- Byzantine budget


def test_budget_is_the_hypergeometric_quantile():
    f = byzantine_quantile(50, 0.2, 10, 0.99)

    # P(X <= f) >= 0.99 > P(X <= f - 1) for X ~ Hypergeometric(50, 10, 10).
    def cdf(k):
        return sum(math.comb(10, i) * math.comb(40, 10 - i) for i in range(k + 1)) / math.comb(
            50, 10
        )

    assert cdf(f) >= 0.99 > cdf(f - 1)
    assert f == 5
    assert byzantine_quantile(50, 0.0, 10, 0.99) == 0
    assert byzantine_quantile(100, 0.2, 100, 0.99) == 20  # everyone sampled


def test_budget_check_names_what_would_work():
    with pytest.raises(AggregationError, match="krum") as err:
        check_budget("krum", num_clients=10, num_byzantine=5)
    assert "median" in str(err.value) or "fltrust" in str(err.value)
    assert "fltrust" in recommended_rules(10, 5)
    check_budget("median", num_clients=10, num_byzantine=4)


def test_auto_is_the_documented_chain_and_its_budget_is_checked_inside():
    from fedwarden.aggregation.recommended import AUTO_SPEC

    built = parse_chain("auto", num_byzantine_default=2)
    assert repr(built) == f"chain({parse_chain(AUTO_SPEC, num_byzantine_default=2)!r})"
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(10, 20)).astype(np.float32)
    out = built(updates, np.ones(10), built.init())
    assert out.updates.shape == (1, 20)
    assert all(key.startswith("auto/") for key in out.measurements)
    with pytest.raises(AggregationError, match="fltrust"):
        check_budget("auto", num_clients=10, num_byzantine=5)


def test_every_new_stateful_step_survives_a_checkpoint(tmp_path):
    from fedwarden.server import checkpoint

    step = chain(client_momentum(), bucketing(bucket_size=1), signguard(), clipped_clustering())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 30)).astype(np.float32)
    ids = [f"c{i}" for i in range(6)]
    first = step(x, np.ones(6), step.init(), client_ids=ids)
    checkpoint.save(tmp_path, 1, {"chain_state": first.state})
    restored = checkpoint.load_latest(tmp_path)["chain_state"]
    again = step(x, np.ones(6), restored, client_ids=ids)
    expected = step(x, np.ones(6), first.state, client_ids=ids)
    np.testing.assert_array_equal(again.updates, expected.updates)
    for name in ("dnc", "flame"):
        other = parse_chain(name, num_byzantine_default=1)
        out = other(x, np.ones(6), other.init())
        checkpoint.save(tmp_path / name, 1, {"s": out.state})
        back = checkpoint.load_latest(tmp_path / name)["s"]
        np.testing.assert_array_equal(
            other(x, np.ones(6), back).updates, other(x, np.ones(6), out.state).updates
        )


def test_the_budget_warning_names_exclusion_only_when_flags_exclude_nobody():
    from fedwarden.config import make_config
    from fedwarden.server.defence import warn_if_budget_unmet

    base = {"aggregator": "auto", "malicious_fraction": 0.4, "clients": 50, "clients_per_round": 10}
    message = warn_if_budget_unmet(make_config({}, {**base, "quarantine": "none"}))
    assert "fltrust" in message and "--quarantine exclude" in message
    excluded = warn_if_budget_unmet(make_config({}, base))  # auto excludes unless told otherwise
    assert "fltrust" in excluded and "--quarantine exclude" not in excluded
    assert warn_if_budget_unmet(make_config({}, {**base, "malicious_fraction": 0.0})) is None


def test_auto_excludes_flagged_clients_unless_the_run_says_otherwise():
    from fedwarden.config import make_config
    from fedwarden.server.defence import trust_policy

    def policy(**settings):
        return trust_policy(make_config({}, settings)).quarantine

    assert policy(aggregator="auto") == "exclude"
    assert policy(aggregator="auto", quarantine="none") == "none"
    assert policy(aggregator="median") == "none"
    assert policy(aggregator="median", quarantine="downweight") == "downweight"
