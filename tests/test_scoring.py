"""Per-client measurements and the anomaly score (aggregation/scoring.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedwarden.aggregation.scoring import (
    DEFAULT_ANOMALY_WEIGHTS,
    METRIC_NAMES,
    RADIAL_CHANCE_Z,
    SHARP_FLOOR,
    _shrinking_component,
    aligned_rows,
    anomaly_components,
    anomaly_score,
    boost_spread,
    boosted_groups,
    client_metrics,
    krum_scores,
    log_norm_spread,
    log_norm_z,
    own_reference_products,
    robust_z,
    trimmed_shares,
)
from tests.test_aggregation import ref_trimmed_counts


def honest_cohort(k: int = 12, d: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    return (direction + rng.normal(scale=0.5, size=(k, d))).astype(np.float32)


def test_metrics_have_expected_keys_shapes_and_values():
    updates = honest_cohort()
    aggregate = np.median(updates, axis=0)
    m = client_metrics(updates, aggregate, np.linspace(1, 2, len(updates)), {})
    assert set(m) == set(METRIC_NAMES)
    for values in m.values():
        assert values.shape == (len(updates),)
    np.testing.assert_allclose(m["norm"], np.linalg.norm(updates, axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        m["distance"], np.linalg.norm(updates - aggregate, axis=1), rtol=1e-4
    )
    expected_cos = (
        updates @ aggregate / (np.linalg.norm(updates, axis=1) * np.linalg.norm(aggregate))
    )
    np.testing.assert_allclose(m["cosine"], expected_cos, rtol=1e-4)
    assert np.all(np.isfinite(m["loss_z"]))


def test_krum_scores_match_a_direct_computation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 5))
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    f = (7 - 3) // 2
    expected = [np.sort(np.delete(sq[i], i))[: 7 - f - 2].sum() for i in range(7)]
    np.testing.assert_allclose(krum_scores(sq), expected)
    assert krum_scores(np.zeros((1, 1))).tolist() == [0.0]


def test_chain_measurements_are_used_when_present():
    updates = honest_cohort(k=5)
    given = {"krum_score": np.arange(5.0), "trimmed_share": np.full(5, 0.4)}
    m = client_metrics(updates, updates.mean(0), None, given)
    np.testing.assert_array_equal(m["krum_score"], np.arange(5.0))
    np.testing.assert_array_equal(m["trimmed_share"], np.full(5, 0.4))
    with pytest.raises(ValueError, match="krum_score"):
        client_metrics(updates, updates.mean(0), None, {"krum_score": np.zeros(4)})


def test_trimmed_shares_average_to_twice_the_trim():
    updates = honest_cohort(k=20)
    shares = trimmed_shares(updates, 0.1)
    assert shares.mean() == pytest.approx(2 * 2 / 20)
    assert np.isnan(trimmed_shares(updates[:2])).all()


@pytest.mark.parametrize("values", ["continuous", "few_levels"])
def test_trimmed_shares_match_a_sort_of_every_column_with_ties_split(values):
    """The blocked order statistics give a sort's answer; the slots of a cut several rows tie at
    are split evenly among them."""
    rng = np.random.default_rng(3)
    for k, d, ratio in [(5, 700, 0.2), (11, 3000, 0.1), (40, 1500, 0.3), (7, 1, 0.45)]:
        if values == "continuous":
            x = rng.standard_normal((k, d)).astype(np.float32)
        else:  # most columns have tied cut values
            x = rng.integers(0, 3, (k, d)).astype(np.float32)
        t = max(1, int(np.floor(ratio * k)))
        expected = ref_trimmed_counts(x, t)
        np.testing.assert_allclose(trimmed_shares(x, ratio), expected / d, rtol=1e-9)


def test_robust_z_handles_degenerate_scales():
    assert robust_z(np.ones(5)).tolist() == [0.0] * 5
    z = robust_z(np.array([1.0, 1.0, 1.0, 1.0, 9.0]))  # MAD is 0: falls back to the mean deviation
    assert z[-1] > 3 and np.allclose(z[:4], 0)


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "noise"])
def test_outlier_gets_the_highest_anomaly(attack):
    updates = honest_cohort()
    rng = np.random.default_rng(5)
    bad = {
        "scaled": 10 * updates[0],
        "sign_flip": -updates.mean(0),
        "noise": rng.normal(scale=3.0, size=updates.shape[1]),
    }[attack]
    updates[4] = bad
    losses = np.full(len(updates), 0.5) + rng.normal(scale=0.02, size=len(updates))
    m = client_metrics(updates, np.median(updates, axis=0), losses, {})
    scores = anomaly_score(m)
    assert np.argmax(scores) == 4
    # the flag rule (server/trust.py) is relative: what counts is the distance to the cohort
    assert scores[4] > 0.25 and scores[4] > 8 * np.max(np.delete(scores, 4))


def test_scores_lie_in_unit_interval_even_for_extreme_inputs():
    rng = np.random.default_rng(2)
    updates = rng.normal(size=(9, 50)) * np.logspace(-6, 6, 9)[:, None]
    updates[3] = 0.0
    m = client_metrics(updates, np.zeros(50), rng.exponential(size=9), {})
    scores = anomaly_score(m)
    assert np.all((scores >= 0) & (scores <= 1)) and np.all(np.isfinite(scores))
    for comp in anomaly_components(m).values():
        finite = comp[np.isfinite(comp)]
        assert np.all((finite >= 0) & (finite <= 1))


def test_permutation_equivariance():
    updates = honest_cohort(k=15)
    updates[2] *= 8
    updates[:, ::7] = 0  # as a model's inputs that are never lit give: tied at both cuts
    losses = np.random.default_rng(3).uniform(0.4, 0.6, size=15)
    aggregate = np.median(updates, axis=0)
    perm = np.random.default_rng(4).permutation(15)
    a = anomaly_score(client_metrics(updates, aggregate, losses, {}))
    b = anomaly_score(client_metrics(updates[perm], aggregate, losses[perm], {}))
    np.testing.assert_allclose(b, a[perm], rtol=1e-6, atol=1e-9)


def test_inputs_are_not_modified():
    updates = honest_cohort(k=6)
    before = updates.copy()
    client_metrics(updates, updates.mean(0), None, {})
    np.testing.assert_array_equal(updates, before)


def test_weights_are_configurable():
    updates = honest_cohort()
    updates[1] = -updates[1]  # opposite direction, same norm
    m = client_metrics(updates, np.median(updates, axis=0), None, {})
    only_norm = anomaly_score(m, {"norm_z": 1.0})
    only_cosine = anomaly_score(m, {"cosine": 1.0})
    assert only_cosine[1] > 0.9
    assert only_norm[1] < 0.5  # its norm is ordinary
    np.testing.assert_allclose(only_cosine, anomaly_components(m)["cosine"])
    # scaling every weight changes nothing
    doubled = {k: 2 * v for k, v in DEFAULT_ANOMALY_WEIGHTS.items()}
    np.testing.assert_allclose(anomaly_score(m, doubled), anomaly_score(m))


def test_power_mean_combination():
    updates = honest_cohort()
    updates[0] = -updates[0]
    m = client_metrics(updates, np.median(updates, axis=0), None, {})
    comps = anomaly_components(m)
    weights = {"cosine": 0.5, "norm_z": 0.25, "krum_score": 0.25}
    plain = sum(w * comps[k] for k, w in weights.items()) / sum(weights.values())
    np.testing.assert_allclose(anomaly_score(m, weights, power=1), plain)
    np.testing.assert_allclose(anomaly_score(m, weights), plain)  # power 1 is the default
    quadratic = anomaly_score(m, weights, power=3)
    assert np.all(quadratic >= plain - 1e-12)  # power mean inequality
    assert quadratic[0] > plain[0] + 0.1  # strong direction evidence is not averaged away
    with pytest.raises(ValueError, match="power"):
        anomaly_score(m, weights, power=0.5)


def test_missing_losses_are_left_out_not_counted():
    updates = honest_cohort()
    m = client_metrics(updates, np.median(updates, axis=0), None, {})
    assert np.isnan(m["loss_z"]).all()
    without = anomaly_score(m)
    no_loss_weight = anomaly_score(m, {**DEFAULT_ANOMALY_WEIGHTS, "loss_z": 0.0})
    np.testing.assert_allclose(without, no_loss_weight)


@pytest.mark.parametrize(
    "weights, message",
    [({"nrom_z": 1.0}, "unknown"), ({"cosine": -1.0}, "non-negative"), ({"cosine": 0}, "positive")],
)
def test_bad_weights_are_rejected(weights, message):
    m = client_metrics(honest_cohort(k=4), np.zeros(300), None, {})
    with pytest.raises(ValueError, match=message):
        anomaly_score(m, weights)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="aggregate"):
        client_metrics(np.zeros((3, 4)), np.zeros(5), None, {})
    with pytest.raises(ValueError, match="losses"):
        client_metrics(np.zeros((3, 4)), np.zeros(4), np.zeros(2), {})


def weighted_mean(m: dict) -> np.ndarray:
    """The default weights' plain mean of the components each client has (no floor)."""
    comps = anomaly_components(m)
    total = weight = 0.0
    for name, w in DEFAULT_ANOMALY_WEIGHTS.items():
        if w > 0 and name in comps:
            known = np.isfinite(comps[name])
            total = total + np.where(known, w * np.nan_to_num(comps[name]), 0.0)
            weight = weight + np.where(known, w, 0.0)
    return total / weight


def test_a_sharp_component_floors_the_score_only_once_it_says_yes():
    twins = honest_cohort(k=10, seed=1)
    # two honest clients on the same data: each other's nearest update, not copies
    twins[1] = twins[0] + 0.15 * (twins[1] - twins[0])
    m = client_metrics(twins, np.median(twins, axis=0), None, {})
    collusion = anomaly_components(m)["collusion"]
    assert 0.2 < collusion[0] < SHARP_FLOOR  # they show in the signal...
    score = anomaly_score(m)
    np.testing.assert_allclose(score[:2], weighted_mean(m)[:2])  # ...but only in the mean
    assert np.all(score[:2] < collusion[:2])

    copies = honest_cohort(k=10, seed=1)
    copies[1] = copies[0]  # a copied update
    m = client_metrics(copies, np.median(copies, axis=0), None, {})
    collusion = anomaly_components(m)["collusion"]
    assert collusion[0] > 0.9
    assert np.all(anomaly_score(m)[:2] >= collusion[:2])  # the floor carries it


def test_centrality_is_measured_against_the_whole_cohorts_median():
    """``cosine`` is to the reference of the trusted rows (the coordinator's: the clients not
    flagged), ``cohort_cosine`` to the whole cohort's median, and centrality reads the latter:
    ALIE-style copies that own the cohort's median are central to it, not to the honest
    clients' median."""
    honest = honest_cohort(k=6, d=300)
    crafted = np.repeat((honest.mean(axis=0) - honest.std(axis=0))[None], 4, axis=0)  # ALIE, z=1
    updates = np.vstack([honest, crafted]).astype(np.float32)
    cohort_median = np.median(updates, axis=0)
    trusted = np.arange(10) < 6
    m = client_metrics(updates, cohort_median, None, {}, trusted=trusted)
    unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
    np.testing.assert_allclose(m["cohort_cosine"], unit @ cohort_median
                               / np.linalg.norm(cohort_median), rtol=1e-5)  # fmt: skip
    central = anomaly_components(m)["centrality"]
    assert central[6:].min() > 0.9 > 0.1 > central[:6].max()
    honest_view = anomaly_components({**m, "cohort_cosine": m["cosine"]})["centrality"]
    assert honest_view.max() < 0.1  # to the trusted reference the copies are nothing special
    m_all = client_metrics(updates, cohort_median, None, {})
    np.testing.assert_allclose(m_all["cohort_cosine"], m_all["cosine"])
    np.testing.assert_allclose(anomaly_components(m_all)["centrality"], central, atol=1e-4)


@pytest.mark.parametrize("kept", [3, 4, 5, 6])
def test_each_row_is_measured_against_the_median_of_the_trusted_rows_and_itself(kept):
    rng = np.random.default_rng(kept)
    updates = rng.normal(size=(8, 700)).astype(np.float32)
    updates[:, :5] = 0.0  # ties at the order statistics
    trusted = np.arange(8) < kept
    dots, ref_sq = own_reference_products(updates, trusted, block_bytes=8 * 8 * 256)
    x = updates.astype(np.float64)
    for i in range(8):
        rows = trusted.copy()
        rows[i] = True
        own = np.median(x[rows], axis=0)
        assert dots[i] == pytest.approx(x[i] @ own, rel=1e-9)
        assert ref_sq[i] == pytest.approx(own @ own, rel=1e-9)
    m = client_metrics(updates, np.median(updates, axis=0), None, {}, trusted=trusted)
    own0 = np.median(x[trusted | (np.arange(8) == 7)], axis=0)
    assert m["distance"][7] == pytest.approx(np.linalg.norm(x[7] - own0), rel=1e-6)
    with pytest.raises(ValueError, match="trusted must mark at least 2"):
        own_reference_products(updates, np.arange(8) < 1)


def test_updates_that_shrink_the_weights_score_as_shrinking_even_as_half_the_cohort():
    """Honest training grows the weights it starts from; a sign flip shrinks them. The radial
    cosine is measured against the server's weights, which no client shapes, so five flippers of
    ten score as one does."""
    rng = np.random.default_rng(3)
    d = 400
    weights = rng.normal(size=d)
    honest = 0.3 * weights + rng.normal(size=(10, d))  # grow the weights, each its own way
    for flippers in (1, 5):
        updates = honest.copy()
        updates[:flippers] *= -1
        m = client_metrics(updates.astype(np.float32), np.median(updates, axis=0), None, {},
                           weights=weights.astype(np.float32))  # fmt: skip
        expected = updates @ weights / (np.linalg.norm(updates, axis=1) * np.linalg.norm(weights))
        np.testing.assert_allclose(m["radial"], expected, rtol=1e-4)
        shrinking = anomaly_components(m)["shrinking"]
        assert np.all(shrinking[:flippers] > 0.6) and np.all(shrinking[flippers:] == 0.0)
    without = client_metrics(honest, np.median(honest, axis=0), None, {})
    assert np.all(np.isnan(without["radial"]))
    assert np.all(np.isnan(anomaly_components(without)["shrinking"]))  # left out, not evidence


def test_shrinking_says_nothing_while_the_cohort_does_not_grow_the_weights():
    """From a random initialisation honest updates can be as good as orthogonal to the weights
    (digits, round 1: cosines within chance) or all shrink them: no client stands out for it."""
    rng = np.random.default_rng(4)
    d = 2500
    weights = rng.normal(size=d)
    chance = RADIAL_CHANCE_Z / np.sqrt(d)
    for pull in (0.0, -0.3):  # orthogonal but for chance; every update shrinking the weights
        updates = pull * weights + rng.normal(size=(10, d))
        m = client_metrics(updates, np.median(updates, axis=0), None, {}, weights=weights)
        raw = updates @ weights / (np.linalg.norm(updates, axis=1) * np.linalg.norm(weights))
        np.testing.assert_allclose(m["radial"], np.where(np.abs(raw) < chance, 0.0, raw))
        assert np.all(anomaly_components(m)["shrinking"] == 0.0)
    grow = 0.3 * weights + rng.normal(size=(10, d))  # the same flipper among growers stands out
    grow[0] *= -1
    m = client_metrics(grow, np.median(grow, axis=0), None, {}, weights=weights)
    shrinking = anomaly_components(m)["shrinking"]
    assert shrinking[0] > 0.6 and np.all(shrinking[1:] == 0.0)


def test_shrinking_adds_to_the_score_and_dilutes_nothing():
    updates = honest_cohort(k=10).astype(np.float64)
    weights = np.median(updates, axis=0) + np.random.default_rng(5).normal(size=updates.shape[1])
    updates[0] *= -1
    m = client_metrics(updates, np.median(updates, axis=0), None, {}, weights=weights)
    without = anomaly_score(m, {**DEFAULT_ANOMALY_WEIGHTS, "shrinking": 0.0})
    with_it = anomaly_score(m)
    shrinking = anomaly_components(m)["shrinking"]
    np.testing.assert_allclose(
        with_it, np.clip(without + DEFAULT_ANOMALY_WEIGHTS["shrinking"] * shrinking, 0, 1)
    )
    assert shrinking[0] > 0.6 and np.array_equal(with_it[1:], without[1:])


def test_oversized_reads_the_smaller_of_the_cohort_median_and_the_earlier_norm_scale():
    from fedwarden.aggregation.scoring import anomaly_components

    norm = np.array([1.0, 1.1, 0.9, 1.2, 0.8, 40.0, 41.0, 39.0, 40.5, 39.5])
    alone = anomaly_components({"norm": norm})["oversized"]
    assert alone.max() < 0.01  # the cohort's median sits between the halves
    scaled = anomaly_components({"norm": norm, "norm_scale": np.full(10, 1.0)})["oversized"]
    assert scaled[5:].min() > 0.95 and scaled[:5].max() < 0.01
    # a scale above the cohort's median changes nothing (honest norms fall over training)
    same = anomaly_components({"norm": norm, "norm_scale": np.full(10, 100.0)})["oversized"]
    np.testing.assert_array_equal(same, alone)


def cohort_with_steps(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Update norms that grow with the square root of the local steps, one client that took a
    single step, and a last one sending five times the norm its 15 steps make."""
    rng = np.random.default_rng(seed)
    steps = np.array([1, 10, 12, 14, 15, 16, 18, 20, 22, 25, 15], np.float64)
    norm = np.sqrt(steps) * np.exp(rng.normal(scale=0.1, size=steps.size))
    norm[-1] *= 5
    return norm, steps


def test_a_norm_its_step_count_explains_is_no_outlier_and_a_boost_still_is():
    """FMNIST at Dirichlet 0.1: honest clients with fewer examples than one batch take one step
    per epoch and were flagged for their small norms; the steps explain them."""
    norm, steps = cohort_with_steps()
    plain, fitted = log_norm_z(norm), log_norm_z(norm, steps=steps)
    assert plain[0] < -3 and abs(fitted[0]) < 1
    assert fitted[-1] > 3 and np.all(np.abs(fitted[:-1]) < 1)


def test_the_norm_scale_pools_the_earlier_rounds_spreads():
    """One round's ten norms can be unusually alike; the scale is the median spread of this
    round and the earlier ones, so a boost five times the steps' norm is a z of about
    ``log(5) / (1.5 * 0.6)`` after rounds of spread 0.6, not of this round's 0.18."""
    norm, steps = cohort_with_steps()
    assert log_norm_spread(norm) == pytest.approx(0.18, abs=0.01)
    pooled = log_norm_z(norm, steps=steps, earlier_spreads=[0.6] * 4)
    assert pooled[-1] == pytest.approx(np.log(5) / 0.9, abs=0.25)
    assert log_norm_z(norm, steps=steps)[-1] > 2.5 * pooled[-1]


def test_boosted_norms_do_not_widen_the_spread_that_judges_them():
    """Four of ten updates boosted 2.5 times (scaling with four attackers) triple the round's
    spread: pooled over such rounds, the boosted rows sit at a z of about 1. Rows more than
    three earlier spreads above the median are left out of it, so the pool stays near the honest
    rows' spread and the boosted rows sit at 1.7 and more. An honest round's upper tail within
    the line is kept."""
    honest = np.exp(np.array([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2]))
    norm = np.concatenate([honest, 2.5 * np.exp(np.array([-0.1, 0.0, 0.1, 0.15]))])
    assert log_norm_spread(norm) > 2.5 * log_norm_spread(honest)
    assert log_norm_spread(norm, earlier_spreads=[0.2]) == pytest.approx(log_norm_spread(honest))
    trimmed, untrimmed = [0.2], [0.2]
    for _ in range(4):
        trimmed.append(log_norm_spread(norm, earlier_spreads=trimmed))
        untrimmed.append(log_norm_spread(norm))
    assert log_norm_z(norm, earlier_spreads=trimmed)[6:].min() > 1.6
    assert log_norm_z(norm, earlier_spreads=untrimmed)[6:].max() < 1.1
    tail = np.exp(np.array([-0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.5, 0.8]))
    assert log_norm_spread(tail, earlier_spreads=[0.3]) == log_norm_spread(tail)


ROUND_STEPS = np.array([2, 5, 10, 20, 40, 60, 8, 15, 25, 30], np.float64)


def boosted_round(boost: float = 2.5, seed: int = 0) -> np.ndarray:
    """Norms that grow with the square root of :data:`ROUND_STEPS`, the last four boosted by one
    factor (scaling with four attackers of ten)."""
    rng = np.random.default_rng(seed)
    norm = np.sqrt(ROUND_STEPS) * np.exp(rng.normal(scale=0.07, size=10))
    return norm * np.r_[np.ones(6), np.full(4, boost)]


def test_updates_boosted_by_one_factor_are_a_group_and_one_long_update_is_not():
    """A boost of 2.5 sits at a norm_z under 2 when four of ten share it (the norms' spread is
    wide for the steps); against the lower half of the cohort, less what the steps explain, it
    is a group far out. One honest update as long, or a long one beside a noise vector a hundred
    times longer, is no group."""
    norm = boosted_round()
    plain = [log_norm_spread(norm)] * 4
    assert log_norm_z(norm, steps=ROUND_STEPS, earlier_spreads=plain)[6:].max() < 2
    spreads = [boost_spread(norm, ROUND_STEPS)] * 4
    groups = boosted_groups(norm, ROUND_STEPS, earlier_spreads=spreads)
    np.testing.assert_array_equal(groups, [0] * 6 + [1] * 4)
    alone = boosted_round(boost=1.0)
    alone[9] *= 2.5
    assert not boosted_groups(alone, ROUND_STEPS, earlier_spreads=spreads).any()
    noise = alone.copy()
    noise[8] *= 100.0
    assert not boosted_groups(noise, ROUND_STEPS, earlier_spreads=spreads).any()
    assert np.isnan(boosted_groups(np.r_[0.0, norm])[0])


def test_a_group_of_aligned_updates_standing_apart_is_boosted_under_the_boost_line():
    """Four attackers of ten boosting by 2 sit under BOOST_Z, ten spreads and more above the
    honest rest: a group standing apart when every one of them points where the cohort does.
    One of them pointing elsewhere (an honest client beside flagged attackers, say), one long
    update alone, or two boosted by factors far apart, is no group."""
    norm = boosted_round(boost=2.0)
    spreads = [boost_spread(norm, ROUND_STEPS)] * 4

    everyone = np.ones(10, bool)

    def groups(norm, aligned=everyone):
        return boosted_groups(norm, ROUND_STEPS, earlier_spreads=spreads, aligned=aligned)

    assert not boosted_groups(norm, ROUND_STEPS, earlier_spreads=spreads).any()
    np.testing.assert_array_equal(groups(norm), [0] * 6 + [1] * 4)
    assert not groups(norm, aligned=np.r_[np.ones(8, bool), False, True]).any()
    alone = boosted_round(boost=1.0)
    alone[9] *= 2.0
    assert not groups(alone).any()
    unlike = boosted_round(boost=1.0)
    unlike[8] *= 2.0
    unlike[9] *= 3.5  # ten spreads above the other: not one factor
    assert not groups(unlike).any()
    unlike[9] *= 2.3 / 3.5
    np.testing.assert_array_equal(groups(unlike), [0] * 8 + [1] * 2)
    assert not groups(boosted_round(boost=1.6)).any()  # under ten spreads above the rest


def test_client_metrics_mark_boosted_updates_that_point_with_the_cohort():
    """Through ``client_metrics``: four honest updates of ten sent twice over are a boosted
    group; the same lengths in directions of their own are not (they do not point with it)."""
    honest = honest_cohort(k=10)
    boosted = honest * np.r_[np.ones(6), np.full(4, 2.0)][:, None].astype(np.float32)
    metrics = client_metrics(boosted, np.median(boosted, axis=0), None)
    np.testing.assert_array_equal(metrics["boosted_group"], [0] * 6 + [1] * 4)
    rng = np.random.default_rng(5)
    elsewhere = boosted.copy()
    for i in (8, 9):
        direction = rng.normal(size=boosted.shape[1])
        elsewhere[i] = direction * np.linalg.norm(boosted[i]) / np.linalg.norm(direction)
    metrics = client_metrics(elsewhere, np.median(elsewhere, axis=0), None)
    assert not np.nan_to_num(metrics["boosted_group"]).any()


def test_aligned_rows_are_those_whose_cosines_are_not_far_below_the_cohorts():
    cosine = np.array([0.6, 0.62, 0.58, 0.61, 0.59, 0.1, np.nan])
    median_cosine = np.array([0.3, 0.31, 0.29, 0.3, -0.2, 0.3, 0.3])
    np.testing.assert_array_equal(
        aligned_rows(cosine, median_cosine), [True, True, True, True, False, False, True]
    )


def test_norms_the_steps_explain_are_no_boosted_group():
    """Clients that took sixteen times the steps send longer updates, honestly: the steps'
    line is taken out first."""
    steps = np.r_[np.full(6, 10.0), np.full(4, 160.0)]
    rng = np.random.default_rng(1)
    norm = np.sqrt(steps) * np.exp(rng.normal(scale=0.07, size=10))
    np.testing.assert_array_equal(boosted_groups(norm), [0] * 6 + [1] * 4)  # as they are
    assert not boosted_groups(norm, steps=steps).any()


def test_copies_of_one_short_vector_do_not_make_the_lower_half():
    """IPM: four attackers send one short vector. As the lower half they would put every honest
    update far above it; copies are left out of it, so nobody is a boosted group."""
    honest = honest_cohort(k=6)
    ipm = np.repeat(-0.1 * honest.mean(axis=0, keepdims=True), 4, axis=0)
    updates = np.vstack([honest, ipm])
    metrics = client_metrics(updates, np.median(updates, axis=0), None)
    assert not np.nan_to_num(metrics["boosted_group"]).any()
    assert boosted_groups(metrics["norm"])[:6].all()  # the lower half made of the copies


def test_norms_that_shrink_with_the_steps_are_compared_as_they_are():
    """The steps' slope is kept within [0, 1]: more steps never explain a shorter update, so a
    cohort whose norms fall with the steps is measured as without them."""
    norm, steps = cohort_with_steps()
    np.testing.assert_allclose(log_norm_z(norm, steps=steps[::-1]), log_norm_z(norm))


def test_shrinking_is_discounted_for_clients_that_took_fewer_steps_than_the_median():
    """At Dirichlet 0.1 honest clients with a few steps on one or two classes shrink the weights;
    the component is multiplied by ``sqrt(steps / median)`` below the median, in proportion to
    ``steps / median`` under half of it (joining the root there), never raised above, and never
    by less than 0.35, whatever a client claims."""
    radial = np.array([-0.2, -0.2, -0.2, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    steps = np.array([1.0, 6.0, 9.0, 16.0, 64.0, 16, 16, 16, 16, 16, 16])
    plain = _shrinking_component(radial)
    discounted = _shrinking_component(radial, steps)
    assert plain[:5] == pytest.approx([1.0] * 5)
    half = math.sqrt(0.5)  # the root at the knee, which the proportional part joins
    assert discounted[:5] == pytest.approx([0.25 / 0.5 * half, 6 / 8 * half, 0.75, 1.0, 1.0])
    assert np.all(discounted[5:] == 0.0)
    metrics = {"radial": radial, "local_steps": steps}
    np.testing.assert_allclose(anomaly_components(metrics)["shrinking"], discounted)


def test_a_sign_flipper_that_claims_one_step_is_caught_by_its_norm_instead():
    """Claiming few examples earns the shrinking discount, but the norm is then judged against
    one step: a full-size flipped update scores above every honest client all the same."""
    norm, steps = cohort_with_steps()
    norm, steps = norm[:-1], steps[:-1].copy()  # honest clients only
    rng = np.random.default_rng(4)
    d = 300
    weights = rng.normal(size=d)
    directions = rng.normal(size=(len(norm), d)) + 0.5 * weights
    updates = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norm[:, None]
    updates[5] *= -1  # the flipper, 16 steps' worth of update
    steps[5] = 1.0  # ... claiming one
    m = client_metrics(updates, np.median(updates, axis=0), None, {}, weights=weights,
                       steps=steps)  # fmt: skip
    m["local_steps"] = steps
    score = anomaly_score(m)
    assert m["norm_z"][5] > 3
    assert score[5] > np.delete(score, 5).max()


def test_an_update_others_copied_is_judged_central_by_the_median_without_its_copies():
    """Four copies of one honest client's outlying update put the cohort's median on it (its
    centrality 0.85 against the whole cohort's median); once it is recognised as their
    original, how central it is comes from the median of the others and itself, so it is not
    central. A vector built at the honest mean (ALIE's kind) stays central however it is
    measured."""
    rng = np.random.default_rng(6)
    d = 400
    base = rng.normal(size=d)
    honest = base + 0.8 * rng.normal(size=(5, d))
    outlier = base + 2.0 * rng.normal(size=d)
    suspect = np.r_[np.zeros(6, bool), np.ones(4, bool)]  # the copiers are flagged
    no_history = np.full(10, np.nan)
    own = np.r_[np.ones(6), np.zeros(4)]

    def centrality(row: np.ndarray) -> float:
        updates = np.vstack([honest, row, np.tile(row, (4, 1))])
        metrics = client_metrics(
            updates, np.median(updates, axis=0), None, suspect=suspect,
            history_error=no_history, own_rounds=own,
        )  # fmt: skip
        assert metrics["copied"].tolist() == [0] * 5 + [1] + [0] * 4
        apart = np.median(np.vstack([honest, row]), axis=0)
        cos = row @ apart / np.linalg.norm(row) / np.linalg.norm(apart)
        assert metrics["cohort_cosine"][5] == pytest.approx(cos)
        return float(anomaly_components(metrics)["centrality"][5])

    assert centrality(outlier) < 0.1
    assert centrality(honest.mean(axis=0)) > 0.5
