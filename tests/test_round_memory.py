"""Memory of one coordinator round: the K x d update matrix is held once, plus small blocks.

``bench/memory.py`` measures the full-size case (K=100, d=1e6: a 381 MB matrix, under 2 GB
resident); this test checks the same property cheaply with tracemalloc, which sees numpy's
allocations: the peak of ``finish_round`` above what existed before, in units of the matrix size.
"""

import time
import tracemalloc

import numpy as np
import pytest

from fedwarden.aggregation import median
from fedwarden.aggregation.base import StatelessStep, StepOutput
from fedwarden.aggregation.chain import chain, parse_chain
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


# ---------------------------------------------------------------- spilled rounds (issue 16)

SPILL_K, SPILL_D = 20, 200_000
SPILL_BYTES = SPILL_K * SPILL_D * 4


def spill_coordinator(chain: str, budget: float | None, directory) -> Coordinator:
    return Coordinator(
        np.zeros(SPILL_D, np.float32),
        parse_chain(chain, num_byzantine_default=3),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
        round_memory_budget=budget,
        spill_dir=directory,
    )


def stream(number: int, seen: list | None = None, directory=None):
    """The round's updates built one at a time; ``seen`` records the spill files mid-round."""
    for i in range(SPILL_K):
        rng = np.random.default_rng([number, i])
        scale = 8.0 if i < 3 else 1.0  # three outliers, so that scores and trust differ
        if seen is not None and i == SPILL_K // 2:
            seen.extend(p.name for p in directory.glob("round-matrix-*"))
        yield ClientUpdate(
            f"c{i:02d}", number, scale * rng.standard_normal(SPILL_D, dtype=np.float32), 50 + i,
            float(rng.random()),
        )  # fmt: skip


def field(row, key: str) -> float:
    """A client row's value, whether rows are dicts or records."""
    value = row[key] if isinstance(row, dict) else getattr(row, key)
    return np.nan if value is None else float(value)


@pytest.mark.parametrize(
    "chain", ["median", "trimmed_mean", "multi_krum", "mean", "clip:max_norm=1000+median"]
)
def test_a_spilled_round_equals_the_round_in_memory_and_leaves_no_file(chain, tmp_path):
    memory = spill_coordinator(chain, None, tmp_path / "unused")
    spilled = spill_coordinator(chain, 1024.0, tmp_path)  # 1 KB: every round spills
    for number in (1, 2):
        seen: list[str] = []
        a = memory.finish_round(number, [f"c{i:02d}" for i in range(SPILL_K)], stream(number))
        b = spilled.finish_round(
            number, [f"c{i:02d}" for i in range(SPILL_K)], stream(number, seen, tmp_path)
        )
        assert len(seen) == 1, "the matrix was not spilled to the state dir during the round"
        assert list(tmp_path.glob("round-matrix-*")) == [], "the spill file outlived the round"
        np.testing.assert_allclose(spilled.weights, memory.weights, rtol=1e-6, atol=1e-7)
        assert a.admitted == b.admitted and a.flagged == b.flagged
        for row_a, row_b in zip(a.clients, b.clients, strict=True):
            for key in ("anomaly", "trust", "norm", "cosine", "krum_score", "trimmed_share",
                        "pair_gap", "history_error", "kinship"):  # fmt: skip
                np.testing.assert_allclose(
                    field(row_b, key), field(row_a, key), rtol=1e-6, equal_nan=True
                )
    assert not (tmp_path / "unused").exists()  # in memory, nothing is written


def test_a_spilled_round_holds_blocks_not_the_matrix(tmp_path):
    coordinator = spill_coordinator("median", 1024.0, tmp_path)
    ids = [f"c{i:02d}" for i in range(SPILL_K)]
    coordinator.finish_round(1, ids, stream(1))  # kernels and the history sketch load once
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outcome = coordinator.finish_round(2, ids, stream(2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(outcome.admitted) == SPILL_K and "skipped" not in outcome.measurements
    held = (peak - before) / SPILL_BYTES
    # One update in flight (1/20 of the matrix) and the kernels' column blocks, a few MB.
    assert held < 0.4, f"a spilled round held {held:.2f} matrix-sized buffers"


def test_a_rule_that_copies_the_matrix_says_it_cannot_run_in_blocks(tmp_path):
    coordinator = spill_coordinator("geometric_median", 1024.0, tmp_path)
    with pytest.raises(ValueError, match="geometric_median.*cannot run in blocks"):
        coordinator.finish_round(1, [f"c{i:02d}" for i in range(SPILL_K)], stream(1))
    assert list(tmp_path.glob("round-matrix-*")) == []
    small = spill_coordinator("geometric_median", float(SPILL_BYTES), tmp_path)
    assert small.finish_round(1, [f"c{i:02d}" for i in range(SPILL_K)], stream(1)).admitted


def test_a_spilled_clip_writes_its_copy_to_a_file_not_to_private_memory(tmp_path):
    coordinator = spill_coordinator("clip:max_norm=1000+median", 1024.0, tmp_path)
    ids = [f"c{i:02d}" for i in range(SPILL_K)]
    coordinator.finish_round(1, ids, stream(1))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outcome = coordinator.finish_round(2, ids, stream(2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.measurements["clip_by_norm/clipped_count"] == 3  # the three outliers
    assert (peak - before) / SPILL_BYTES < 0.4
    assert list(tmp_path.glob("round-matrix-*")) == []


class _Unchanged(StatelessStep):
    """Passes the cohort on as it is: a chain that is not the plain median, with its values."""

    name = "unchanged"
    keeps_rows = True

    def apply(self, updates, weights):
        return StepOutput(updates, weights)


def test_the_median_chain_lends_its_median_to_scoring_with_the_same_scores(tmp_path):
    ids = [f"c{i:02d}" for i in range(SPILL_K)]
    plain = spill_coordinator("median", None, tmp_path)
    other = spill_coordinator("median", None, tmp_path)
    other.chain = chain(_Unchanged(), median())  # the scoring reference is computed apart
    other.chain_state = other.chain.init()
    for number in (1, 2):
        a = plain.finish_round(number, ids, stream(number))
        b = other.finish_round(number, ids, stream(number))
        np.testing.assert_array_equal(plain.weights, other.weights)
        for row_a, row_b in zip(a.clients, b.clients, strict=True):
            for key in ("anomaly", "trust", "cosine", "distance", "trimmed_share", "history_error"):
                assert field(row_a, key) == field(row_b, key) or np.isnan(field(row_a, key))


def test_a_spilled_round_with_a_weight_0_client_equals_the_round_in_memory(tmp_path):
    ids = [f"c{i:02d}" for i in range(SPILL_K)]
    rounds = []
    for budget in (None, 1024.0):
        coordinator = spill_coordinator("median", budget, tmp_path)
        coordinator.trust.weight_multiplier = lambda cid: 0.0 if cid == "c05" else 1.0
        rounds.append((coordinator.finish_round(1, ids, stream(1)), coordinator.weights))
        assert list(tmp_path.glob("round-matrix-*")) == []
    (a, weights_a), (b, weights_b) = rounds
    np.testing.assert_array_equal(weights_b, weights_a)
    assert [field(r, "weight") for r in b.clients] == [field(r, "weight") for r in a.clients]
    assert field(b.clients[5], "weight") == 0.0


def test_a_coordinator_with_a_budget_removes_spill_files_of_an_interrupted_round(tmp_path):
    (tmp_path / "round-matrix-abc.f32").write_bytes(b"\0" * 64)  # a killed round's file
    (tmp_path / "ledger.sqlite").write_bytes(b"kept")
    spill_coordinator("median", None, tmp_path)  # no budget: not its business
    assert (tmp_path / "round-matrix-abc.f32").exists()
    spill_coordinator("median", 1024.0, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]


# ------------------------------------------------ streaming transports under a budget (issue 16)

HUB_K, HUB_D = 60, 40_000  # a 9.6 MB round matrix, uploads of 160 KB
HUB_BUDGET = 2 << 20  # bytes: the matrix is spilled, and 2 MB is about 12 updates
HOSTILE = {"c00": "non_finite", "c01": "too_large", "c02": "wrong_shape", "c03": "oversized"}


def hub_delta(i: int) -> np.ndarray:
    delta = np.random.default_rng([7, i]).standard_normal(HUB_D, dtype=np.float32)
    cid = f"c{i:02d}"
    if HOSTILE.get(cid) == "non_finite":
        delta[5] = np.nan
    elif HOSTILE.get(cid) == "too_large":
        delta *= 1e3
    elif HOSTILE.get(cid) == "wrong_shape":
        delta = delta[:-1]
    return delta


def upload(servicer, sessions, task_id: str, i: int) -> None:
    """Client i's upload through the servicer (chunks, reassembly, decoding), as gRPC runs it;
    c03 declares more bytes than the limit. The payload exists only during the call."""
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.protocol.transfer import encode_vector, sha256_hex, split
    from tests.deploy_helpers import FakeContext

    cid = f"c{i:02d}"
    payload = encode_vector(hub_delta(i))
    size = HUB_D * 8 + 1 if HOSTILE.get(cid) == "oversized" else len(payload)
    session, token = sessions[cid]

    def chunks():
        yield pb.UpdateChunk(header=pb.UpdateHeader(
            session_id=session, task_id=task_id, round=1, num_examples=10 + i % 7, loss=0.5,
            dtype="float32", total_size=size))  # fmt: skip
        for seq, data in split(payload, chunk_size=1 << 16):
            yield pb.UpdateChunk(chunk=pb.Chunk(seq=seq, data=data))
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256_hex(payload)))

    servicer.SubmitUpdate(chunks(), FakeContext(token))


def hub_round(budget: float | None, order: list[int] | None = None, threads: int = 2):
    """One hub round of HUB_K selected clients (and ``c99``, registered, not selected; ``c04``
    sends twice), uploaded by ``threads`` threads in any order, or one by one in ``order``.
    Returns the outcome, the weights and the peak traced memory of the uploads."""
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from fedwarden.protocol.convert import TrainingSpec
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.server.auth import Authenticator
    from fedwarden.server.hub import Hub
    from fedwarden.server.service import FederationServicer
    from tests.deploy_helpers import FakeContext, FakeLedger

    ids = [f"c{i:02d}" for i in range(HUB_K)]
    tokens = {cid: secrets.token_hex(16) for cid in [*ids, "c99"]}
    spec = TrainingSpec(None, "digits", (8, 8, 1), 10, ((HUB_D,),), 0.1, 16, 1)
    hub = Hub(1)
    servicer = FederationServicer(hub, Authenticator(tokens), spec, FakeLedger(),
                                  max_update_bytes=HUB_D * 8, registrations_per_minute=None)  # fmt: skip
    sessions = {
        cid: (
            servicer.Register(pb.RegisterRequest(client_id=cid), FakeContext(tok)).session_id,
            tok,
        )  # fmt: skip
        for cid, tok in tokens.items()
    }
    coordinator = Coordinator(
        np.zeros(HUB_D, np.float32), parse_chain("clip:max_norm=300+median"),
        ServerOptimizer("fedavg", 1.0), TrustBook(TrustPolicy()), max_update_norm=1e4,
        round_memory_budget=budget,
    )  # fmt: skip
    intake = coordinator.open_round(1, ids) if budget is not None else None
    task = hub.publish(1, 0, ids, b"", "", intake=intake)
    senders = order or [*range(HUB_K), 4, 99]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: upload(servicer, sessions, task.task_id, i), senders))
        updates, complete = hub.collect(HUB_K, deadline=time.monotonic() + 5)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert complete
    outcome = coordinator.finish_round(1, ids, intake if intake is not None else updates)
    return outcome, coordinator.weights, peak


def test_a_hub_round_under_a_budget_holds_a_few_uploads_not_the_round_and_aggregates_the_same():
    streamed, weights, peak = hub_round(HUB_BUDGET)
    # what the round would have held without an intake: every decoded update at once
    assert peak < HUB_BUDGET, f"the uploads held {peak / 2**20:.1f} MB at once"
    arrival = [int(u.client_id[1:]) for u in streamed.received]
    assert sorted(arrival) == sorted([*range(HUB_K), 4, 99])
    held, weights_held, peak_held = hub_round(None, order=arrival, threads=1)
    assert peak_held > HUB_K * HUB_D * 4 * 0.9  # the same uploads, kept: the test can fail
    reasons = sorted((r.client_id, r.reason) for r in streamed.rejected)
    assert reasons == sorted([*HOSTILE.items(), ("c04", "duplicate"), ("c99", "not_selected")])
    assert sorted((r.client_id, r.reason) for r in held.rejected) == reasons
    assert streamed.admitted == held.admitted and len(streamed.admitted) == HUB_K - len(HOSTILE)
    np.testing.assert_allclose(weights, weights_held, rtol=1e-6, atol=1e-7)
    for a, b in zip(streamed.clients, held.clients, strict=True):
        assert a.client_id == b.client_id
        np.testing.assert_allclose(a.anomaly, b.anomaly, rtol=1e-6)


@pytest.mark.slow  # about a minute: TensorFlow, two 2-round digits runs
def test_a_simulation_under_a_budget_trains_its_cohort_a_few_updates_at_a_time(tmp_path):
    """The in-process transport hands the round a generator: at most one model copy's worth of
    trained updates (plus the one being admitted) exist at once, and the run's results are those
    of the same run with the whole cohort's updates handed over in a list."""
    import weakref

    from fedwarden.config import make_config
    from fedwarden.server.driver import Cohort
    from fedwarden.simulations.runner import InProcessClients, Simulation

    cohort = 10
    config = make_config({}, dict(clients=12, clients_per_round=cohort, rounds=2, local_epochs=1,
                                  progress=False, aggregator="median", attack="label_flip",
                                  malicious_fraction=0.2, round_memory_budget=0.001))  # fmt: skip

    class Counted(InProcessClients):
        """Counts the trained updates alive (made and not yet freed); ``listed``: the whole
        cohort in a list, as without a budget."""

        def __init__(self, run, listed: bool):
            super().__init__(run)
            self.listed, self.alive, self.peak = listed, 0, 0
            train = run.local_round

            def counted(*args):
                updates = train(*args)
                for u in updates:
                    self.alive += 1
                    weakref.finalize(u.delta, self.gone)
                self.peak = max(self.peak, self.alive)
                return updates

            run.local_round = counted

        def gone(self):
            self.alive -= 1

        def collect(self, round_number, coordinator):
            if not self.listed:
                return super().collect(round_number, coordinator)
            selected = self.select(round_number, coordinator)
            updates = self.run.local_round(round_number, selected, coordinator.weights)
            return Cohort(selected, updates)

    sim = Simulation(config)
    results, peaks = {}, {}
    for listed in (False, True):
        made: list[Counted] = []
        sim.transport = lambda run: made.append(Counted(run, listed)) or made[-1]  # noqa: B023
        out = tmp_path / f"listed-{listed}"
        results[listed] = sim.run(config, out)
        peaks[listed] = made[0].peak
        assert list(out.glob("round-matrix-*")) == []
    copies = sim.trainer(config).copies
    assert peaks[True] == cohort
    assert peaks[False] <= copies + 1 < cohort, peaks
    for a, b in zip(results[False]["rounds"], results[True]["rounds"], strict=True):
        assert {k: v for k, v in a.items() if k != "duration_s"} == {
            k: v for k, v in b.items() if k != "duration_s"
        }
    assert results[False]["clients"] == results[True]["clients"]


def test_serve_under_a_budget_fills_each_attempts_intake_and_closes_an_abandoned_one(tmp_path):
    """``HubTransport`` publishes every attempt with the round's intake; an attempt with too few
    answers is abandoned with its spill file, and the rounds end as without a budget."""
    from fedwarden.config import DeploymentConfig, RunConfig
    from fedwarden.server.admission import receipt
    from fedwarden.server.driver import RoundDriver
    from fedwarden.server.metrics import MetricsExporter
    from fedwarden.server.serve import HubTransport, ServeMetrics
    from tests.test_driver import IDS, FakeHub, evaluate, make_coordinator

    class IntakeHub(FakeHub):
        """Hands the answers to the attempt's intake, as ``Hub.submit`` does."""

        def publish(self, round, attempt, selected, payload, sha256, target=None, intake=None):
            super().publish(round, attempt, selected, payload, sha256, target)
            self.intake = intake

        def collect(self, min_updates, deadline, stop=lambda: False):
            updates, complete = super().collect(min_updates, deadline, stop)
            if self.intake is None:
                return updates, complete
            self.spilled.append(len(list(tmp_path.glob("round-matrix-*"))))
            for u in updates:
                self.intake.add(u)
            return [receipt(u) for u in updates], complete

    weights = {}
    for budget in (None, 1e-6):  # 1 byte: every round spills
        config = RunConfig(clients=4, clients_per_round=4, rounds=2, aggregator="median")
        options = DeploymentConfig(state_dir=str(tmp_path), insecure=True, min_clients=4,
                                   round_timeout=1.0, overselect=1.0)  # fmt: skip
        hub = IntakeHub(live=[IDS], answers=[False, True, True])
        hub.spilled = []
        exporter = MetricsExporter()
        transport = HubTransport(hub, config, options, ServeMetrics(exporter.registry), exporter,
                                 lambda: False)  # fmt: skip
        coordinator = make_coordinator()
        coordinator.round_memory_budget, coordinator.spill_dir = budget, tmp_path
        driver = RoundDriver(coordinator, transport, evaluate, 2)
        assert driver.run() == "done"
        assert [r["attempts"] for r in driver.history.rounds] == [2, 1]
        assert hub.spilled == ([] if budget is None else [1, 1, 1])  # one file per attempt
        assert list(tmp_path.glob("round-matrix-*")) == []
        weights[budget] = coordinator.weights
    np.testing.assert_array_equal(weights[1e-6], weights[None])
