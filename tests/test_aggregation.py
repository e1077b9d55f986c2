"""Tests of the aggregation core: every rule against shared properties and slow references."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedwarden.aggregation._kernels as kernels
from fedwarden.aggregation import (
    REGISTRY,
    AggregationError,
    Step,
    bulyan,
    centered_clipping,
    chain,
    clip_by_norm,
    from_function,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    nearest_neighbor_mixing,
    parse_chain,
    trimmed_mean,
)

PROPERTY = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- slow, obviously-correct references


def ref_mean(x, w):
    return sum(w[i] * x[i] for i in range(len(x))) / w.sum()


def ref_median(x):
    k = len(x)
    return np.array([(np.sort(c)[(k - 1) // 2] + np.sort(c)[k // 2]) / 2 for c in x.T])


def ref_trimmed_mean(x, fraction):
    """Values, and trimmed shares with ties split evenly: the average over every client order."""
    k, d = x.shape
    t = math.floor(fraction * k + 1e-9)
    out, counts = [], np.zeros(k)
    orders = list(itertools.permutations(range(k))) if k <= 6 else [tuple(range(k))]
    for c in x.T:
        out.append(np.sort(c)[t : k - t].mean())
        for perm in orders:  # clients in this order, then a stable sort
            order = np.array(perm)[np.argsort(c[list(perm)], kind="stable")]
            for i in list(order[:t]) + list(order[k - t :]):
                counts[i] += 1 / len(orders)
    return np.array(out), counts / d


def ref_trimmed_counts(x: np.ndarray, t: int) -> np.ndarray:
    """Trimmed counts with a tied cut's slots split evenly among the rows tied at it."""
    k = len(x)
    counts = np.zeros(k)
    for column in x.T:
        ordered = np.sort(column)
        for cut, beyond in ((ordered[t - 1], column < ordered[t - 1]),
                            (ordered[k - t], column > ordered[k - t])):  # fmt: skip
            tied = column == cut
            counts += beyond + tied * (t - beyond.sum()) / tied.sum()
    return counts


def ref_sq_dist(x):
    k = len(x)
    return np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(k)] for i in range(k)])


def ref_pick(scores, x, rows):
    """Lowest score; near-ties go to the lexicographically smallest row (the rules' contract)."""
    best = min(scores)
    tied = [i for i, s in enumerate(scores) if s - best <= 1e-9 * max(abs(s), abs(best))]
    return min(tied, key=lambda i: tuple(x[rows[i]]))


def ref_krum_scores(x, f, rows=None):
    rows = list(range(len(x))) if rows is None else rows
    d = ref_sq_dist(x[rows])
    n = len(rows)
    neighbors = min(max(1, n - f - 2), n - 1)
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[:neighbors]) for i in range(n)]


def ref_krum(x, f):
    scores = ref_krum_scores(x, f)
    return x[ref_pick(scores, x, list(range(len(x))))]


def ref_multi_krum(x, f, m):
    scores = np.array(ref_krum_scores(x, f))
    order = sorted(range(len(x)), key=lambda i: (scores[i], tuple(x[i])))
    return x[order[:m]].mean(axis=0)


def ref_geometric_median(x, w, eps=1e-6, max_iter=100, tol=1e-8):
    alpha = w / w.sum()

    def objective(z):
        return sum(alpha[i] * np.linalg.norm(z - x[i]) for i in range(len(x)))

    z = ref_mean(x, w)
    value = objective(z)
    for _ in range(max_iter):
        beta = [alpha[i] / max(eps, np.linalg.norm(z - x[i])) for i in range(len(x))]
        z = sum(b * xi for b, xi in zip(beta, x, strict=True)) / sum(beta)
        previous, value = value, objective(z)
        if abs(previous - value) <= tol * value:
            break
    return z


def ref_bulyan(x, f):
    k = len(x)
    theta, beta = k - 2 * f, k - 4 * f
    remaining, chosen = list(range(k)), []
    for _ in range(theta):
        scores = ref_krum_scores(x, f, remaining)
        chosen.append(remaining.pop(ref_pick(scores, x, remaining)))
    out = []
    for c in x[chosen].T:
        s = np.sort(c)
        med = (s[(theta - 1) // 2] + s[theta // 2]) / 2
        closest = sorted(s, key=lambda v: (abs(v - med), v))[:beta]
        out.append(np.mean(closest))
    return np.array(out)


def ref_centered_clipping(x, radius, iterations, v=None):
    v = np.zeros(x.shape[1]) if v is None else v
    for _ in range(iterations):
        steps = [(xi - v) * min(1.0, radius / max(np.linalg.norm(xi - v), 1e-300)) for xi in x]
        v = v + sum(steps) / len(x)
    return v


def ref_nnm(x, f):
    k = len(x)
    out = []
    for i in range(k):
        d = [np.sum((x[i] - x[j]) ** 2) if j != i else -1.0 for j in range(k)]
        out.append(x[np.argsort(d, kind="stable")[: k - f]].mean(axis=0))
    return np.array(out)


def ref_clip(x, max_norm):
    return np.array([xi * min(1.0, max_norm / np.linalg.norm(xi)) for xi in x])


# ---------------------------------------------------------------- the catalogue every property runs over


def krum_f(k):
    """A Byzantine budget Krum accepts at k clients, with at least 2 neighbours counted."""
    return max(0, (k - 4) // 2)


def bulyan_f(k):
    return max(0, (k - 3) // 4)


@dataclass(frozen=True)
class Rule:
    id: str
    build: Callable[[int], Step]  # cohort size -> step
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x, w) -> (d,) or (K, d)
    min_clients: int = 1
    reduces: bool = True
    rtol: float = 1e-7  # iterative rules stop on a tolerance: rounding can move the last step


RULES = [
    Rule("mean", lambda k: mean(), ref_mean),
    Rule("median", lambda k: median(), lambda x, w: ref_median(x)),
    Rule(
        "trimmed_mean",
        lambda k: trimmed_mean(0.2),
        lambda x, w: ref_trimmed_mean(x, 0.2)[0],
    ),
    Rule("krum", lambda k: krum(krum_f(k)), lambda x, w: ref_krum(x, krum_f(len(x))), 4),
    Rule(
        "multi_krum",
        lambda k: multi_krum(krum_f(k)),
        lambda x, w: ref_multi_krum(x, krum_f(len(x)), len(x) - krum_f(len(x))),
        4,
    ),
    Rule("geometric_median", lambda k: geometric_median(), ref_geometric_median, rtol=1e-5),
    Rule("bulyan", lambda k: bulyan(bulyan_f(k)), lambda x, w: ref_bulyan(x, bulyan_f(len(x))), 3),
    Rule(
        "centered_clipping",
        lambda k: centered_clipping(radius=1.5, iterations=3),
        lambda x, w: ref_centered_clipping(x, 1.5, 3),
    ),
    Rule(
        "nnm",
        lambda k: nearest_neighbor_mixing((k - 1) // 2),
        lambda x, w: ref_nnm(x, (len(x) - 1) // 2),
        reduces=False,
    ),
    Rule("clip", lambda k: clip_by_norm(1.5), lambda x, w: ref_clip(x, 1.5), reduces=False),
    Rule(
        "chain",
        lambda k: chain(clip_by_norm(1.5), nearest_neighbor_mixing(1), median()),
        lambda x, w: ref_median(ref_nnm(ref_clip(x, 1.5), 1)),
        min_clients=2,
    ),
]
BY_ID = {r.id: r for r in RULES}
every_rule = pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])


def cohorts(min_clients=1, max_clients=11, max_dim=5):
    """(updates, weights, rng): float64 normal rows, weights in [0.5, 3]."""

    @st.composite
    def make(draw):
        k = draw(st.integers(min_clients, max_clients))
        d = draw(st.integers(1, max_dim))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return rng.normal(size=(k, d)), rng.uniform(0.5, 3.0, size=k), rng

    return make()


def run(step, x, w):
    return step(x, w, step.init())


# ---------------------------------------------------------------- properties of every rule


@every_rule
@PROPERTY
@given(data=st.data())
def test_agrees_with_reference(rule, data):
    x, w, _ = data.draw(cohorts(rule.min_clients))
    out = run(rule.build(len(x)), x, w)
    expected = np.asarray(rule.reference(x, w)).reshape(out.updates.shape)
    np.testing.assert_allclose(out.updates, expected, rtol=rule.rtol, atol=rule.rtol * 1e-2)
    assert out.updates.shape == ((1, x.shape[1]) if rule.reduces else x.shape)
    if rule.reduces:
        np.testing.assert_allclose(out.weights, [w.sum()])


@every_rule
@PROPERTY
@given(data=st.data())
def test_permutation_invariance(rule, data):
    x, w, rng = data.draw(cohorts(rule.min_clients))
    perm = rng.permutation(len(x))
    step = rule.build(len(x))
    out, shuffled = run(step, x, w), run(step, x[perm], w[perm])
    expected = out.updates if rule.reduces else out.updates[perm]
    np.testing.assert_allclose(shuffled.updates, expected, rtol=rule.rtol, atol=rule.rtol * 1e-2)
    assert out.per_client.keys() == shuffled.per_client.keys()
    for key, values in out.per_client.items():
        np.testing.assert_allclose(shuffled.per_client[key], values[perm], rtol=1e-7, err_msg=key)


@every_rule
@PROPERTY
@given(data=st.data())
def test_identical_rows_give_that_row(rule, data):
    x, w, _ = data.draw(cohorts(rule.min_clients))
    row = x[0] / max(1.0, np.linalg.norm(x[0]))  # within every clip radius of the catalogue
    same = np.tile(row, (len(x), 1))
    out = run(rule.build(len(x)), same, w)
    np.testing.assert_allclose(out.updates, np.tile(row, (len(out.updates), 1)), rtol=1e-12)


@every_rule
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_not_mutated_and_dtype_kept(rule, dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 70)).astype(dtype)
    w = rng.uniform(1, 2, size=9)
    x0, w0 = x.copy(), w.copy()
    step = rule.build(9)
    out = step(x, w, step.init())
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    assert out.updates.dtype == dtype
    assert not np.shares_memory(out.updates, x) and not np.shares_memory(out.weights, w)
    for values in out.per_client.values():
        assert values.shape == (9,)


def attacked(data, min_clients, max_byzantine):
    """Honest rows plus f rows of +-1e6 at random positions; returns (x, w, honest, f)."""
    x, w, rng = data.draw(cohorts(min_clients, max_clients=13))
    f = data.draw(st.integers(0, max_byzantine(len(x))), label="f")
    bad = rng.choice(len(x), f, replace=False)
    honest = np.setdiff1d(np.arange(len(x)), bad)
    x = x.copy()
    x[bad] = rng.choice([-1e6, 1e6], size=(f, x.shape[1])) * rng.uniform(1, 2, size=(f, 1))
    return x, w, x[honest], f


@pytest.mark.parametrize(
    "make, max_byzantine",
    [
        (lambda f: median(), lambda k: (k - 1) // 2),
        (lambda f: trimmed_mean(0.3), lambda k: math.floor(0.3 * k + 1e-9)),
        (lambda f: bulyan(f), lambda k: (k - 3) // 4),
    ],
    ids=["median", "trimmed_mean", "bulyan"],
)
@PROPERTY
@given(data=st.data())
def test_coordinatewise_rules_stay_in_honest_range(make, max_byzantine, data):
    x, w, honest, f = attacked(data, 3, max_byzantine)
    out = run(make(f), x, w).updates[0]
    assert np.all(out >= honest.min(axis=0) - 1e-12) and np.all(out <= honest.max(axis=0) + 1e-12)


@PROPERTY
@given(data=st.data())
def test_krum_returns_an_honest_update(data):
    x, w, honest, f = attacked(data, 3, lambda k: (k - 3) // 2)
    out = run(krum(f), x, w)
    assert any(np.array_equal(out.updates[0], h) for h in honest)
    assert out.per_client["selected"].sum() == 1


@PROPERTY
@given(data=st.data())
def test_multi_krum_averages_the_honest_updates(data):
    x, w, honest, f = attacked(data, 3, lambda k: (k - 3) // 2)
    out = run(multi_krum(f), x, w)
    np.testing.assert_allclose(out.updates[0], honest.mean(axis=0), rtol=1e-9, atol=1e-9)
    assert out.per_client["selected"].sum() == len(x) - f


@PROPERTY
@given(data=st.data())
def test_geometric_median_stays_near_the_honest_updates(data):
    x, _, honest, f = attacked(data, 1, lambda k: k // 4)
    out = run(geometric_median(), x, np.ones(len(x))).updates[0]
    centre = honest.mean(axis=0)
    radius = max(np.linalg.norm(h - centre) for h in honest)
    assert np.linalg.norm(out - centre) <= 3 * radius + 1e-6  # (2 - 2a) / (1 - 2a) <= 3, a <= 1/4


@PROPERTY
@given(data=st.data())
def test_centered_clipping_moves_at_most_radius_per_iteration(data):
    x, w, _, _ = attacked(data, 1, lambda k: k)
    step = centered_clipping(radius=0.5, iterations=2)
    start = np.ones(x.shape[1])
    out = step(x, w, start)
    assert np.linalg.norm(out.updates[0] - start) <= 2 * 0.5 + 1e-9
    np.testing.assert_array_equal(out.state, out.updates[0])


# ---------------------------------------------------------------- rule details


@pytest.fixture(params=["sort", "partition"])
def order_kernel(request, monkeypatch):
    """Runs a test with both order-statistic kernels and tiny column blocks (many blocks)."""
    monkeypatch.setattr(kernels, "SIMD_SORT", request.param == "sort")
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 1)  # 64 columns per block
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_statistics_over_many_blocks(order_kernel, dtype):
    rng = np.random.default_rng(0)
    k, d = 7, 64 * 300 + 5  # > 254 blocks: the trimmed-count accumulator is flushed
    x = rng.integers(-3, 4, size=(k, d)).astype(dtype)  # many ties
    x[:, ::2] = rng.normal(size=(k, (d + 1) // 2))
    np.testing.assert_array_equal(run(median(), x, None).updates[0], np.median(x, axis=0))
    out = run(trimmed_mean(0.3), x, None)
    s = np.sort(x, axis=0)
    np.testing.assert_allclose(out.updates[0], s[2:5].mean(axis=0), rtol=1e-6)
    low, high = x < s[1], x > s[k - 2]  # ties at a cut split the slots left evenly
    eq_low, eq_high = x == s[1], x == s[k - 2]
    shares = low + high + eq_low * ((2 - low.sum(0)) / eq_low.sum(0))
    shares = shares + eq_high * ((2 - high.sum(0)) / eq_high.sum(0))
    np.testing.assert_allclose(out.per_client["trimmed_share"], shares.sum(axis=1) / d, rtol=1e-9)
    bul = run(bulyan(1), x, None).updates[0]  # bulyan(1) on 7 clients: theta 5, beta 3
    assert bul.shape == (d,) and np.all(np.isfinite(bul))


@PROPERTY
@given(
    x=st.integers(2, 6).flatmap(
        lambda k: st.lists(
            st.lists(st.integers(0, 2), min_size=4, max_size=4), min_size=k, max_size=k
        )
    ),
    fraction=st.sampled_from([0.1, 0.2, 0.34, 0.45, 0.5]),
)
def test_trimmed_share_with_ties(x, fraction):
    x = np.array(x, np.float64)
    k = len(x)
    if 2 * math.floor(fraction * k + 1e-9) >= k:
        with pytest.raises(AggregationError, match="removes everything"):
            run(trimmed_mean(fraction), x, None)
        return
    out = run(trimmed_mean(fraction), x, None)
    values, shares = ref_trimmed_mean(x, fraction)
    np.testing.assert_allclose(out.updates[0], values, rtol=1e-12)
    np.testing.assert_allclose(out.per_client["trimmed_share"], shares, rtol=1e-9)
    t = out.measurements["trimmed_per_side"]
    assert out.per_client["trimmed_share"].sum() == pytest.approx(2 * t)


@PROPERTY
@given(
    x=st.integers(7, 11).flatmap(
        lambda k: st.lists(
            st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=k, max_size=k
        )
    )
)
def test_bulyan_with_ties_matches_reference(x):
    x = np.array(x, np.float64)
    np.testing.assert_allclose(run(bulyan(1), x, None).updates[0], ref_bulyan(x, 1), rtol=1e-12)


def test_bulyan_window_with_duplicates_at_the_cut():
    # f=1 of K=7: iterated Krum keeps the first five rows (theta=5); beta=3 values closest to
    # their median 0: 0, 0.3 and one of the tied -1.5 (not both: 0.3 is closer than the second).
    column = np.array([-1.5, -1.5, 0.0, 0.3, 9.0, 100.0, 200.0])
    out = run(bulyan(1), column[:, None], None)
    assert out.per_client["selected"].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert out.updates[0, 0] == pytest.approx(np.mean([-1.5, 0.0, 0.3]))


def test_median_float32_large_matches_numpy():
    x = np.random.default_rng(1).standard_normal((50, 100_003), dtype=np.float32)
    out = run(median(), x, None).updates
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], np.median(x, axis=0))


def test_krum_reports_scores_and_selection():
    x = np.array([[0.0, 0], [0, 1], [1, 0], [1, 1], [50, 50]])
    out = run(krum(1), x, np.ones(5))
    np.testing.assert_allclose(out.per_client["krum_score"], ref_krum_scores(x, 1))
    assert out.per_client["selected"].tolist() == [1, 0, 0, 0, 0]  # tie: smallest row wins
    out = run(multi_krum(1, num_selected=2), x, np.ones(5))
    assert out.per_client["selected"].sum() == 2 and out.per_client["selected"][4] == 0


@PROPERTY
@given(data=st.data())
def test_geometric_median_fixed_iterations_match_reference_exactly(data):
    x, w, _ = data.draw(cohorts())
    step = geometric_median(max_iter=7, tol=0.0)
    expected = ref_geometric_median(x, w, max_iter=7, tol=0.0)
    np.testing.assert_allclose(run(step, x, w).updates[0], expected, rtol=1e-9, atol=1e-12)


def test_geometric_median_weighted_and_reports_iterations():
    x = np.array([[0.0], [1.0], [10.0]])
    out = run(geometric_median(), x, np.array([1.0, 1.0, 5.0]))
    assert out.updates[0, 0] == pytest.approx(10.0, abs=1e-4)  # a majority of the weight
    assert 1 <= out.measurements["iterations"] <= 100
    assert "geometric_median(eps=1e-06, max_iter=100, tol=1e-08)" == repr(geometric_median())


def test_centered_clipping_state_carries_over():
    step = centered_clipping(radius=1.0, iterations=1)
    x = np.array([[4.0, 0.0], [4.0, 0.0]])
    state = step.init()
    assert state is None
    first = step(x, None, state)
    np.testing.assert_allclose(first.updates[0], [1.0, 0.0])
    second = step(x, None, first.state)
    np.testing.assert_allclose(second.updates[0], [2.0, 0.0])
    np.testing.assert_allclose(second.updates[0], ref_centered_clipping(x, 1.0, 1, first.state))
    assert second.measurements["clipped_count"] == 2
    with pytest.raises(AggregationError, match=r"shape \(2,\)"):
        step(x, None, np.zeros(3))


def test_clip_measurements():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = run(clip_by_norm(1.0), x, np.ones(3))
    np.testing.assert_allclose(out.updates, [[0.6, 0.8], [0.3, 0.4], [0, 0]])
    assert out.measurements == {"clipped_count": 1, "clip_norm": 1.0}
    np.testing.assert_allclose(out.per_client["norm"], [5.0, 0.5, 0.0])
    assert out.per_client["clipped"].tolist() == [1, 0, 0]


def test_reprs_show_every_hyperparameter():
    assert repr(trimmed_mean(0.2)) == "trimmed_mean(num_byzantine=None, trim_fraction=0.2)"
    assert trimmed_mean(num_byzantine=3).num_trimmed(20) == 3
    assert repr(multi_krum(2, 5)) == "multi_krum(num_byzantine=2, num_selected=5)"
    assert repr(bulyan(1)) == "bulyan(num_byzantine=1)"
    assert repr(centered_clipping(2.0, 3)) == "centered_clipping(radius=2.0, iterations=3)"
    assert repr(nearest_neighbor_mixing(1)) == "nearest_neighbor_mixing(num_byzantine=1)"
    assert repr(clip_by_norm(5)) == "clip_by_norm(max_norm=5.0)"
    assert repr(median()) == "median()" and repr(mean()) == "mean()"


# ---------------------------------------------------------------- impossible cohorts and bad arguments


def test_error_trimmed_mean_removes_everything():
    with pytest.raises(AggregationError, match="removes everything") as err:
        trimmed_mean(0.5).check(4)
    assert "num_clients=4" in str(err.value) and "trim fewer than" in str(err.value)
    with pytest.raises(AggregationError, match="removes everything"):
        run(trimmed_mean(0.5), np.zeros((4, 3)), None)
    trimmed_mean(0.5).check(5)  # 2 from each end of 5 leaves the median


def test_error_krum_too_few_clients():
    expected = (
        "krum needs num_clients > 2*num_byzantine + 2. Received: num_clients=5, "
        "num_byzantine=2; sample more clients or lower num_byzantine."
    )
    with pytest.raises(AggregationError) as err:
        krum(2).check(5)
    assert str(err.value) == expected
    with pytest.raises(AggregationError, match="multi_krum needs num_clients > 2"):
        run(multi_krum(2), np.zeros((6, 3)), None)
    with pytest.raises(AggregationError, match="num_selected=7, num_clients=6"):
        multi_krum(1, num_selected=7).check(6)


def test_error_bulyan_too_few_clients():
    with pytest.raises(AggregationError) as err:
        run(bulyan(2), np.zeros((10, 3)), None)
    assert str(err.value).startswith(
        "bulyan needs num_clients >= 4*num_byzantine + 3. Received: num_clients=10, "
        "num_byzantine=2; sample more clients"
    )
    bulyan(2).check(11)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: trimmed_mean(0.7), r"trim_fraction must be a number in \[0, 0.5\]"),
        (lambda: krum(-1), "num_byzantine=-1"),
        (lambda: bulyan(1.5), "num_byzantine=1.5"),
        (lambda: multi_krum(1, num_selected=0), "num_selected=0"),
        (lambda: centered_clipping(radius=0), "radius=0"),
        (lambda: geometric_median(eps=-1), "eps=-1"),
        (lambda: clip_by_norm(-2.0), "max_norm=-2.0"),
    ],
)
def test_error_bad_arguments(build, match):
    with pytest.raises(AggregationError, match=match):
        build()


def test_error_bad_cohorts():
    with pytest.raises(AggregationError, match="positive sum"):
        run(mean(), np.ones((2, 3)), np.zeros(2))
    with pytest.raises(AggregationError, match=r"\(K, d\) matrix"):
        run(median(), np.ones(3), None)
    with pytest.raises(AggregationError, match="at least one update"):
        run(median(), np.ones((0, 3)), None)


# ---------------------------------------------------------------- chains


def test_chain_clip_then_mean():
    x = np.array([[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]])
    w = np.array([1.0, 2.0, 1.0])
    step = chain(clip_by_norm(1.0), mean())
    out = run(step, x, w)
    np.testing.assert_allclose(out.updates[0], ref_mean(ref_clip(x, 1.0), w))
    np.testing.assert_allclose(out.weights, [4.0])
    assert out.measurements == {"clip_by_norm/clipped_count": 2, "clip_by_norm/clip_norm": 1.0}
    np.testing.assert_allclose(out.per_client["norm"], [5.0, 1.0, 50.0])
    assert repr(step) == "chain(clip_by_norm(max_norm=1.0), mean())"


def test_chain_state_lines_up():
    step = chain(clip_by_norm(10.0), centered_clipping(radius=1.0))
    state = step.init()
    assert state == (None, None)
    x = np.random.default_rng(0).normal(size=(5, 4))
    out = step(x, None, state)
    assert isinstance(out.state, tuple) and len(out.state) == 2
    np.testing.assert_array_equal(out.state[1], out.updates[0])
    again = step(x, None, list(out.state))  # a checkpoint read back as a list still fits
    np.testing.assert_allclose(again.updates[0], ref_centered_clipping(x, 1.0, 1, out.state[1]))
    for bad in [None, (None,), (None, None, None), "state"]:
        with pytest.raises(AggregationError, match="tuple of 2 child states"):
            step(x, None, bad)


def test_chain_per_client_keys():
    x = np.random.default_rng(0).normal(size=(6, 3)) * 3
    out = run(chain(clip_by_norm(1.0), centered_clipping(0.5), median()), x, None)
    assert set(out.per_client) == {
        "norm",
        "clipped",
        "clip_by_norm/clipped",
        "centered_clipping/clipped",
    }
    np.testing.assert_array_equal(
        out.per_client["clipped"], out.per_client["centered_clipping/clipped"]
    )
    out = run(chain(clip_by_norm(1.0), clip_by_norm(0.5), trimmed_mean(0.2)), x, None)
    assert "clip_by_norm_2/clipped_count" in out.measurements
    assert out.per_client["trimmed_share"].shape == (6,)


def test_chain_check_counts_rows():
    with pytest.raises(AggregationError, match="krum needs num_clients > 2"):
        chain(clip_by_norm(1.0), krum(2)).check(5)
    chain(clip_by_norm(1.0), krum(2)).check(7)
    chain(mean(), median()).check(3)  # the median sees the one reduced row
    with pytest.raises(AggregationError, match="call the builder"):
        chain(clip_by_norm(1.0), median)


def test_nested_chain():
    inner = chain(clip_by_norm(1.0), trimmed_mean(0.2))
    assert inner.keeps_rows is False and chain(clip_by_norm(1.0)).keeps_rows is True
    out = run(chain(inner), np.ones((5, 2)) * 3, None)
    assert "chain/clip_by_norm/clipped_count" in out.measurements


# ---------------------------------------------------------------- parse_chain


def test_parse_chain_every_registered_name():
    expected = {"mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"}
    expected |= {"bulyan", "centered_clipping", "nnm", "clip"}
    assert expected <= set(REGISTRY)
    options = {"centered_clipping": ":radius=1", "clip": ":max_norm=1"}
    x = np.random.default_rng(0).normal(size=(11, 4))
    for name in expected:
        step = parse_chain(name + options.get(name, ""), num_byzantine_default=1)
        step.check(11)
        assert run(step, x, None).updates.shape[1] == 4


@pytest.mark.parametrize(
    "spec, text",
    [
        ("trimmed_mean", "chain(trimmed_mean(num_byzantine=4, trim_fraction=None))"),
        (
            "trimmed_mean:trim_fraction=0.2",
            "chain(trimmed_mean(num_byzantine=4, trim_fraction=0.2))",
        ),
        ("clip:max_norm=5+median", "chain(clip_by_norm(max_norm=5.0), median())"),
        ("clip:max_norm=1e+3 + median", "chain(clip_by_norm(max_norm=1000.0), median())"),
        ("krum:num_byzantine=2", "chain(krum(num_byzantine=2))"),
        (
            "multi_krum:num_byzantine=1,num_selected=3",
            "chain(multi_krum(num_byzantine=1, num_selected=3))",
        ),
        (
            "multi_krum:num_byzantine=1:num_selected=3",
            "chain(multi_krum(num_byzantine=1, num_selected=3))",
        ),
        ("nnm+krum", "chain(nearest_neighbor_mixing(num_byzantine=4), krum(num_byzantine=4))"),
        ("krum:num_byzantine=0", "chain(krum(num_byzantine=0))"),
    ],
)
def test_parse_chain_specs(spec, text):
    assert repr(parse_chain(spec, num_byzantine_default=4)) == text


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            "trimed_mean",
            "unknown aggregation step 'trimed_mean'.*Accepted names: mean, median, trimmed_mean",
        ),
        ("trimmed_mean:trim=0.2", "accepted options: trim_fraction"),
        ("trimmed_mean:0.2", "must be key=value"),
        ("trimmed_mean:trim_fraction=0.9", r"trim_fraction must be a number in \[0, 0.5\]"),
        ("krum", "krum needs num_byzantine.*krum:num_byzantine=2"),
        ("", "non-empty string"),
        ("median+", "unknown aggregation step"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("plugins_aggregation:missing", "has no attribute 'missing'"),
        ("plugins_aggregation:not_a_step", "must build an aggregation step"),
    ],
)
def test_parse_chain_errors(spec, match, plugins):
    with pytest.raises(AggregationError, match=match):
        parse_chain(spec)


def test_parse_chain_check_before_running():
    with pytest.raises(AggregationError, match="num_clients=5, num_byzantine=2"):
        parse_chain("clip:max_norm=1+krum", num_byzantine_default=2).check(5)


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return "plugins_aggregation"


def test_plugin_plain_function(plugins):
    x = np.random.default_rng(0).normal(size=(4, 3))
    step = parse_chain(f"clip:max_norm=100+{plugins}:coordinate_max")
    np.testing.assert_array_equal(run(step, x, None).updates[0], x.max(axis=0))
    assert (
        repr(step)
        == f"chain(clip_by_norm(max_norm=100.0), from_function({plugins}:coordinate_max))"
    )
    with pytest.raises(ValueError, match="read-only"):
        run(parse_chain(f"{plugins}:mutating"), x, None)
    with pytest.raises(AggregationError, match=r"shape \(3,\).*Received shape \(2, 3\)"):
        run(parse_chain(f"{plugins}:wrong_shape"), x, None)


def test_plugin_factories(plugins):
    x = np.random.default_rng(0).normal(size=(7, 3))
    step = parse_chain(f"{plugins}:make_scaled_mean:scale=2")
    np.testing.assert_allclose(run(step, x, None).updates[0], 2 * x.mean(axis=0))
    step = parse_chain(f"{plugins}:ScaledMean")
    np.testing.assert_allclose(run(step, x, None).updates[0], x.mean(axis=0))
    step = parse_chain(f"{plugins}:make_robust", num_byzantine_default=2)
    assert repr(step) == "chain(krum(num_byzantine=2))"


def test_from_function_wraps_plain_functions():
    step = from_function(lambda u, w: np.median(u, axis=0), name="np_median")
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    out = run(step, x, None)
    assert out.updates.dtype == np.float32 and repr(step) == "from_function(np_median)"


def test_score_ties_break_lexicographically():
    from fedwarden.aggregation.rules import _lexicographic, _ranking

    rows = np.array([[1.0, 2, 3], [1, 2, 1], [0, 5, 5], [1, 2, 1], [1, 0, 9]])
    assert _lexicographic(rows).tolist() == [2, 4, 1, 3, 0]
    scores = np.array([1.0, 1.0, 1.0 + 1e-12, 0.5, 3.0])
    assert _ranking(scores, rows).tolist() == [3, 2, 1, 0, 4]


def test_gram_split_over_threads_gives_the_same_result(monkeypatch):
    x = np.random.default_rng(0).normal(size=(6, 5000)).astype(np.float32)
    monkeypatch.setattr(kernels, "_GRAM_BYTES", 1)  # 256 columns per block: 20 blocks
    one = kernels.gram(x, x[0])
    monkeypatch.setattr(kernels, "THREADS", 3)
    monkeypatch.setattr(kernels, "_THREAD_WORK", 0)
    np.testing.assert_array_equal(kernels.gram(x, x[0]), one)
    np.testing.assert_allclose(
        one[:6, :6], x.astype(np.float64) @ x.T.astype(np.float64), rtol=1e-5
    )
    out = run(multi_krum(1), x, None)
    np.testing.assert_allclose(
        out.per_client["krum_score"], ref_krum_scores(x.astype(np.float64), 1), rtol=1e-5
    )


def test_gram_takes_reference_rows_as_a_sequence_of_any_dtype(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3000)).astype(np.float32)
    a, w = rng.normal(size=3000), rng.normal(size=3000).astype(np.float32)  # float64, float32
    monkeypatch.setattr(kernels, "_GRAM_BYTES", 1)  # many blocks: each stacks its slices
    stacked = kernels.gram(x, np.stack([a, w]))
    np.testing.assert_array_equal(kernels.gram(x, [a, w]), stacked)
    full = np.vstack([x, a, w]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stacked, full @ full.T, rtol=1e-4, atol=1e-2)
