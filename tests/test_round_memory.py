"""Memory of one coordinator round: the K x d update matrix is held once, plus small blocks.

``bench/memory.py`` measures the full-size case (K=100, d=1e6: a 381 MB matrix, under 2 GB
resident); this test checks the same property cheaply with tracemalloc, which sees numpy's
allocations: the peak of ``finish_round`` above what existed before, in units of the matrix size.
"""

import tracemalloc

import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy

K, D = 50, 200_000
MATRIX_BYTES = K * D * 4
# Column-block temporaries of scoring and the rules are a few MB whatever K and d: 0.6 of this
# 40 MB matrix leaves room for them, and not for one more full copy.
SLACK = 0.6


@pytest.mark.parametrize(
    "chain, copies",
    [
        ("median", 1),  # the stacked matrix
        ("trimmed_mean", 1),
        ("multi_krum", 1),
        ("mean", 1),
        ("clip:max_norm=1000+median", 2),  # clipping returns a clipped copy (inputs stay intact)
    ],
)
def test_finish_round_holds_the_update_matrix_a_constant_number_of_times(chain, copies):
    rng = np.random.default_rng(0)
    updates = [
        ClientUpdate(f"c{i:02d}", 1, rng.standard_normal(D, dtype=np.float32), 100, 0.5)
        for i in range(K)
    ]
    coordinator = Coordinator(
        np.zeros(D, np.float32),
        parse_chain(chain, num_byzantine_default=5),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
    )
    # numba loads its compiled kernels once per process (about 36 MB of Python objects, whatever
    # K and d): a round on a tiny model first, so that the peak below is this round's own.
    tiny = [ClientUpdate(u.client_id, 1, u.delta[:64], 100, 0.5) for u in updates]
    warm = Coordinator(np.zeros(64, np.float32), parse_chain(chain, num_byzantine_default=5),
                       ServerOptimizer("fedavg", 1.0), TrustBook(TrustPolicy()))  # fmt: skip
    warm.finish_round(1, [u.client_id for u in tiny], tiny)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outcome = coordinator.finish_round(1, [u.client_id for u in updates], updates)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(outcome.admitted) == K and "skipped" not in outcome.measurements
    held = (peak - before) / MATRIX_BYTES
    assert held <= copies + SLACK, f"{chain}: the round held {held:.2f} matrix-sized buffers"
