"""One verdict, one defence: trust's verdict reaches the round's outcome, the ledger and the
exporter from one record, and every entry point builds its chain with one function."""

import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.config import RunConfig
from fedwarden.records import VERDICT_KEYS
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.defence import build_defence
from fedwarden.server.hub import client_rows
from fedwarden.server.ledger import Ledger
from fedwarden.server.metrics import MetricsExporter
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy
from fedwarden.simulations.preflight import check_run

D = 16


def _rounds(coordinator: Coordinator, rounds: int) -> list:
    """Rounds of nine honest clients and one that sends the honest direction reversed, large."""
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(10)]
    outcomes = []
    for r in range(1, rounds + 1):
        base = rng.normal(size=D).astype(np.float32)
        deltas = {c: base + 0.1 * rng.normal(size=D).astype(np.float32) for c in ids}
        deltas["c9"] = -20 * base
        updates = [ClientUpdate(c, r, deltas[c], 10, loss=0.5) for c in ids]
        outcomes.append(coordinator.finish_round(r, ids, updates))
    return outcomes


def test_the_outcome_row_carries_the_verdict_the_ledger_records(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        book = TrustBook(TrustPolicy(quarantine="downweight"), ledger)
        coordinator = Coordinator(
            np.zeros(D, np.float32), parse_chain("median"), ServerOptimizer("fedavg"), book
        )
        outcome = _rounds(coordinator, 3)[-1]
        stored = {row["client_id"]: row for row in ledger.round_rows(3)}
    assert "c9" in outcome.flagged  # the verdict has something to say
    for row in outcome.clients:
        verdict = {k: v for k, v in row.to_dict().items() if k in VERDICT_KEYS}
        assert verdict.pop("anomaly") == pytest.approx(stored[row.client_id]["anomaly"])
        assert verdict == {k: stored[row.client_id][k] for k in verdict}, row.client_id
    flagged = next(row for row in outcome.clients if row.client_id == "c9")
    assert flagged.quarantined and flagged.quarantined_since is not None
    assert flagged.signal_excess and max(flagged.signal_excess.values()) > 0


def test_the_exporter_shows_the_standing_of_a_client_whose_update_was_rejected():
    coordinator = Coordinator(
        np.zeros(D, np.float32), parse_chain("mean"), ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    good = np.ones(D, np.float32)
    bad = np.full(D, np.nan, np.float32)
    updates = [ClientUpdate("a", 1, good, 10), ClientUpdate("r", 1, bad, 10)]
    outcome = coordinator.finish_round(1, ["a", "r"], updates)
    assert [row.client_id for row in outcome.clients] == ["a"]  # r has no scored row
    exporter = MetricsExporter()
    exporter.update_clients(client_rows(coordinator.trust, {}))
    exported = exporter.registry.get_sample_value(
        "fedwarden_client_flag_evidence", {"client_id": "r"}
    )
    assert exported == pytest.approx(coordinator.trust.get("r").evidence)


def test_every_entry_point_builds_the_defence_one_way():
    settings = dict(clients=40, clients_per_round=10, rounds=5, dp="central", aggregator="median",
                    dp_noise_multiplier=1.0, dp_delta=1e-5, seed=3)  # fmt: skip
    config = RunConfig(**settings)
    simulation = build_defence(config)
    deployment = build_defence(RunConfig(**settings, target_epsilon=50.0), deployment=True)
    assert simulation.privacy.sampling_rate == pytest.approx(10 / 40)
    assert deployment.privacy.sampling_rate == 1.0  # a deployment does not know its population
    assert simulation.privacy.budget is None and deployment.privacy.budget == 50.0
    noise = [s for s in simulation.chain.steps if s.name == "gaussian_noise"]
    unseeded = [s for s in deployment.chain.steps if s.name == "gaussian_noise"]
    assert noise[0].seed == 3 and unseeded[0].seed is None
    assert repr(check_run(config)) == repr(simulation.aggregator)
    assert build_defence(config, aggregator=simulation.aggregator).aggregator is (
        simulation.aggregator
    )
