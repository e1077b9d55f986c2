"""Every order-statistic kernel path against slow references (aggregation/_kernels.py).

Each test runs once per path (``numba`` sorting networks, ``numpy-sort``, ``numpy-partition``),
forced the way ``FEDWARDEN_KERNEL`` forces it, with tiny column blocks and three threads so that
blocks, thread ranges and their seams are all exercised on small inputs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedwarden.aggregation._kernels as kernels
from fedwarden.aggregation import bulyan, median, trimmed_mean
from fedwarden.aggregation.scoring import (
    median_and_trimmed_shares,
    order_statistics_scope,
    share_order_statistics,
    trimmed_shares,
)
from tests.test_aggregation import ref_bulyan, ref_median, ref_trimmed_counts, ref_trimmed_mean

# The path fixture only sets module attributes: sharing it between examples is what is meant.
PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=kernels.PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(kernels, "PATH", request.param)
    monkeypatch.setattr(kernels, "THREADS", 3)
    monkeypatch.setattr(kernels, "_THREAD_VALUES", 0)  # every input is split between threads
    monkeypatch.setattr(kernels, "_NETWORK_BYTES", 1)  # 16 columns per network block
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 1)  # 64 columns per numpy block
    return request.param


@st.composite
def matrices(draw, min_rows=1, max_rows=40, max_cols=150):
    """(K, d) float32 or float64 normal values, some columns small integers (many ties)."""
    k = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, max_cols))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(k, d))
    ties = rng.random(d) < 0.3
    x[:, ties] = rng.integers(-2, 3, size=(k, int(ties.sum())))
    return x.astype(dtype)


def sequential_mean(rows: np.ndarray) -> np.ndarray:
    """Rows added one after the other in their dtype, divided by their count in that dtype."""
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total / rows.dtype.type(len(rows))


@PROPERTY
@given(x=matrices())
def test_median_equals_the_sorted_middle(path, x):
    out = kernels.median(x)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, ref_median(x))
    np.testing.assert_array_equal(out, np.median(x, axis=0))


@PROPERTY
@given(x=matrices(min_rows=3), data=st.data())
def test_trimmed_mean_and_counts_match_a_sort_of_every_column(path, x, data):
    k = len(x)
    t = data.draw(st.integers(0, (k - 1) // 2))
    out, trimmed = kernels.trimmed_mean(x, t)
    expected = np.sort(x, axis=0)[t : k - t].mean(axis=0)
    assert out.dtype == x.dtype
    if path == "numba":  # summed from the smallest up (t = 0: in row order) in the input dtype
        np.testing.assert_array_equal(
            out, sequential_mean(np.sort(x, axis=0)[t : k - t] if t else x)
        )
    else:  # numpy sums a partitioned or pairwise order
        np.testing.assert_allclose(out, expected, rtol=1e-5 if x.dtype == np.float32 else 1e-12,
                                   atol=1e-6 if x.dtype == np.float32 else 1e-14)  # fmt: skip
    np.testing.assert_allclose(trimmed.sum(), 2 * t * x.shape[1])
    if t:
        np.testing.assert_allclose(
            kernels.trimmed_counts(x, t), ref_trimmed_counts(x, t), rtol=1e-12
        )
        np.testing.assert_allclose(kernels.trimmed_counts(x, t), trimmed, rtol=1e-12)


@PROPERTY
@given(
    x=st.integers(2, 6).flatmap(
        lambda k: st.lists(
            st.lists(st.integers(0, 2), min_size=40, max_size=40), min_size=k, max_size=k
        )  # fmt: skip
    ),
    fraction=st.sampled_from([0.2, 0.34, 0.45]),
)
def test_split_shares_average_every_client_order(path, x, fraction):
    x = np.array(x, np.float64)
    if 2 * int(fraction * len(x) + 1e-9) >= len(x):
        return
    out = trimmed_mean(fraction)(x, None, None)
    values, shares = ref_trimmed_mean(x, fraction)  # averaged over every permutation of rows
    np.testing.assert_allclose(out.updates[0], values, rtol=1e-12)
    np.testing.assert_allclose(out.per_client["trimmed_share"], shares, rtol=1e-9)


@PROPERTY
@given(x=matrices(min_rows=3, max_rows=23, max_cols=40), data=st.data())
def test_bulyan_coordinate_step_matches_reference(path, x, data):
    f = data.draw(st.integers(0, (len(x) - 3) // 4))
    x = x.astype(np.float64)  # the reference sums in float64
    np.testing.assert_allclose(
        bulyan(f)(x, None, None).updates[0], ref_bulyan(x, f), rtol=1e-12, atol=1e-15
    )


def test_a_clients_trimmed_share_does_not_depend_on_its_place_in_the_cohort(path):
    # Columns where every update is 0 (inputs a model never sees lit, units that never fire)
    # are tied at both cuts: each row is trimmed in 2t / K of them, not the first and last rows
    # in all of them.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(21, 500)).astype(np.float32)
    x[:, :150] = 0
    x[:, 150:250] = rng.integers(-1, 2, size=(21, 100))
    shares = trimmed_shares(x, 0.1)
    np.testing.assert_allclose(shares * 500, ref_trimmed_counts(x, 2), rtol=1e-9)
    for order in (np.arange(21)[::-1], rng.permutation(21)):
        np.testing.assert_allclose(trimmed_shares(x[order], 0.1), shares[order], rtol=1e-9)
    zeros_only = trimmed_shares(np.zeros((21, 150), np.float32), 0.1)
    np.testing.assert_allclose(zeros_only, 4 / 21)


@PROPERTY
@given(x=matrices(min_rows=3), data=st.data())
def test_median_and_counts_from_one_pass_equal_the_separate_kernels(path, x, data):
    t = data.draw(st.integers(1, (len(x) - 1) // 2))
    med, counts = kernels.median_and_trimmed_counts(x, t)
    assert med.dtype == x.dtype and counts.dtype == np.float64
    np.testing.assert_array_equal(med, np.median(x, axis=0))
    np.testing.assert_allclose(counts, ref_trimmed_counts(x, t), rtol=1e-12)


def test_scoring_reference_and_shares_equal_median_and_trimmed_shares(path):
    rng = np.random.default_rng(6)
    for k in (1, 2, 9, 30):  # below 3 rows there is nothing to trim: NaN shares, a median still
        x = rng.integers(-2, 3, size=(k, 700)).astype(np.float32)
        med, shares = median_and_trimmed_shares(x)
        np.testing.assert_array_equal(med, np.median(x, axis=0))
        np.testing.assert_array_equal(shares, trimmed_shares(x))


def test_a_registered_matrix_gets_one_order_pass_for_every_caller(path, monkeypatch):
    x = np.random.default_rng(7).integers(-2, 3, size=(21, 900)).astype(np.float32)
    passes = []
    over_columns = kernels._over_columns

    def counted(fn, d, k, *align):  # every pass over the columns goes through here
        passes.append(k)
        return over_columns(fn, d, k, *align)

    monkeypatch.setattr(kernels, "_over_columns", counted)
    with order_statistics_scope():
        share_order_statistics(x)
        chain_median = median()(np.asarray(x), None, None).updates[0]  # a view: served
        reference, shares = median_and_trimmed_shares(x)
        again = trimmed_shares(x[:, :])
        assert len(passes) == 1
        other = kernels.median(x.copy())  # another buffer: computed apart
    assert len(passes) == 2
    np.testing.assert_array_equal(chain_median, np.median(x, axis=0))
    np.testing.assert_array_equal(reference, chain_median)
    np.testing.assert_array_equal(other, chain_median)
    np.testing.assert_allclose(shares, ref_trimmed_counts(x, 2) / 900, rtol=1e-12)
    np.testing.assert_array_equal(again, shares)
    median_and_trimmed_shares(x)  # the scope has ended: nothing is cached
    assert len(passes) == 3


@PROPERTY
@given(x=matrices(max_rows=11, max_cols=300), data=st.data())
def test_count_sketch_equals_bincount_bit_for_bit(path, monkeypatch, x, data):
    dim = data.draw(st.integers(1, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    bucket = rng.integers(0, dim, x.shape[1], dtype=np.int64)
    sign = rng.choice(np.array([-1.0, 1.0]), x.shape[1])
    out = kernels.count_sketch(x, bucket, sign, dim)
    expected = np.array([np.bincount(bucket, row * sign, dim) for row in x])
    np.testing.assert_array_equal(out, expected.reshape(len(x), dim))


def test_results_do_not_depend_on_blocks_or_threads(path, monkeypatch):
    x = np.random.default_rng(4).standard_normal((33, 1000), dtype=np.float32)
    first = [
        median()(x, None, None).updates,
        *kernels.trimmed_mean(x, 4),
        bulyan(3)(x, None, None).updates,
    ]
    monkeypatch.setattr(kernels, "THREADS", 1)
    monkeypatch.setattr(kernels, "_NETWORK_BYTES", 1 << 15)
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 1 << 19)
    again = [
        median()(x, None, None).updates,
        *kernels.trimmed_mean(x, 4),
        bulyan(3)(x, None, None).updates,
    ]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_large_cohorts_and_other_dtypes_leave_the_networks(path, monkeypatch):
    monkeypatch.setattr(kernels, "NETWORK_MAX_CLIENTS", 8)
    numpy_path = "numpy-sort" if kernels.SIMD_SORT else "numpy-partition"
    assert kernels.order_kernel(9) == (numpy_path if path == "numba" else path)
    assert kernels.order_kernel(8, np.float16) == (numpy_path if path == "numba" else path)
    if path == "numba":
        assert kernels.order_kernel(8, np.float64) == "numba"
    x = np.random.default_rng(5).standard_normal((9, 300)).astype(np.float16)
    np.testing.assert_array_equal(kernels.median(x), np.median(x, axis=0))


@pytest.mark.parametrize("n", range(1, 17))
def test_networks_sort_and_select_every_zero_one_input(n):
    pytest.importorskip("numba")
    from fedwarden.aggregation._networks import network

    # 0-1 principle: a comparator network that orders every 0/1 input orders every input.
    inputs = np.array(list(itertools.product([0, 1], repeat=n)), np.int8).T  # (n, 2^n)
    expected = np.sort(inputs, axis=0)
    for positions in (None, ((n - 1) // 2, n // 2), (0, n - 1)):
        values = inputs.copy()
        for a, b in network(n, positions):
            values[a], values[b] = (
                np.minimum(values[a], values[b]),
                np.maximum(values[a], values[b]),
            )
        wanted = range(n) if positions is None else positions
        for p in wanted:
            np.testing.assert_array_equal(values[p], expected[p])
    assert len(network(n, ((n - 1) // 2, n // 2))) <= len(network(n))


def test_batcher_network_sizes():
    pytest.importorskip("numba")
    from fedwarden.aggregation._networks import network

    # Batcher's merge-exchange sort on 2^p inputs has (p^2 - p + 4) 2^(p-2) - 1 comparators.
    for p in range(1, 8):
        assert len(network(2**p)) == (p * p - p + 4) * 2 ** (p - 2) - 1
    assert len(network(50)) == 403


def run_with(kernel: str) -> subprocess.CompletedProcess:
    code = "import fedwarden.aggregation._kernels as k; print(k.PATH)"
    env = {**os.environ, "FEDWARDEN_KERNEL": kernel}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_forces_a_path():
    assert run_with("numpy-partition").stdout.strip() == "numpy-partition"
    assert run_with("auto").stdout.strip() in kernels.PATHS
    bad = run_with("fast")
    assert bad.returncode != 0 and "FEDWARDEN_KERNEL must be auto or one of" in bad.stderr


def test_warm_up_loads_everything_a_first_round_needs():
    """After ``warm_up``, a first round at a realistic shape loads no kernel and imports nothing:
    the first round of a process then costs what the later ones do."""
    code = """
import sys, numpy as np
from fedwarden.aggregation import warm_up
from fedwarden.aggregation import _networks as nets
from fedwarden.aggregation.chain import parse_chain
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy

warm_up(background=False)
kernels = [nets.median_columns, nets.trim_columns, nets.bulyan_columns, nets.sketch_rows]
loaded = [len(k.signatures) for k in kernels]
modules = set(sys.modules)
rng = np.random.default_rng(0)
ids = [f"c{i}" for i in range(12)]
for chain in ("median", "trimmed_mean:trim_fraction=0.2", "bulyan:num_byzantine=2"):
    coordinator = Coordinator(np.zeros(3000, np.float32), parse_chain(chain),
                              ServerOptimizer("fedavg", 1.0), TrustBook(TrustPolicy()))
    updates = [ClientUpdate(c, 1, rng.standard_normal(3000, dtype=np.float32), 10, 0.5)
               for c in ids]
    coordinator.finish_round(1, ids, updates)
import json
new = sorted(set(sys.modules) - modules - {"json"})
print(json.dumps([min(loaded), [len(k.signatures) for k in kernels] == loaded, new]))
"""
    env = {**os.environ, "FEDWARDEN_KERNEL": "numba"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    fewest, unchanged, new_modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert fewest >= 1 and unchanged
    assert not [m for m in new_modules if m.split(".")[0] in ("numba", "sklearn", "scipy")]
