"""Acceptance scenarios on digits from the issues: attacks against defences, and detection."""

import json
from pathlib import Path

import pytest

from fedwarden.config import RunConfig, make_config
from fedwarden.server.ledger import Ledger
from fedwarden.simulations.compare import compare
from fedwarden.simulations.runner import simulate

pytestmark = pytest.mark.slow


def test_robust_rules_hold_against_the_attack_suite(tmp_path: Path):
    """Issue 3: 20 clients all sampled, 20% malicious, 20 rounds."""
    attacks = ["alie", "ipm", "min_max", "label_flip", "scaling", "backdoor"]
    base = RunConfig(attack="alie", malicious_fraction=0.2, progress=False)
    compare(base, attacks, ["mean", "trimmed_mean", "median"], tmp_path)
    matrix = json.loads((tmp_path / "matrix.json").read_text())
    clean = max(matrix["none"][g]["accuracy"] for g in ("trimmed_mean", "median"))
    for attack in attacks:
        best = max(matrix[attack][g]["accuracy"] for g in ("trimmed_mean", "median"))
        assert best >= clean - 0.10, (attack, best, clean)
    backdoor = matrix["backdoor"]
    assert backdoor["mean"]["attack_success_rate"] is not None
    assert backdoor["mean"]["attack_success_rate"] > backdoor["median"]["attack_success_rate"]
    assert matrix["alie"]["mean"]["attack_success_rate"] is None


@pytest.mark.parametrize("attack", ["gaussian", "scaling", "random_direction"])
def test_scores_find_exactly_the_malicious_clients(attack, tmp_path: Path):
    """Issue 4: 20 clients, 10 per round, 20% malicious, trimmed mean, 20 rounds."""
    config = make_config(
        {},
        {
            "clients_per_round": 10,
            "attack": attack,
            "aggregator": "trimmed_mean",
            "progress": False,
            "out": str(tmp_path),
        },
    )
    results = simulate(config)
    detection = results["final"]["detection"]
    assert detection["precision"] >= 0.9 and detection["recall"] >= 0.9
    malicious = {c for c, v in results["clients"].items() if v["malicious"]}
    with Ledger(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        lowest = [row["client_id"] for row in ledger.list_clients()[: len(malicious)]]
    assert set(lowest) == malicious


def test_excluding_flagged_clients_pays_under_the_mean(tmp_path: Path):
    """Issue 18's quarantine table (docs/results.md, "What quarantine adds"): digits, 10 of 20
    clients per round, 20% Gaussian attackers, plain mean, 20 rounds: flags only 0.64, with
    ``--quarantine exclude`` 0.87."""
    accuracy = {}
    for quarantine in ("none", "exclude"):
        config = make_config(
            {},
            {
                "clients_per_round": 10,
                "attack": "gaussian",
                "aggregator": "mean",
                "quarantine": quarantine,
                "progress": False,
                "out": str(tmp_path / quarantine),
            },
        )
        accuracy[quarantine] = simulate(config)["final"]["accuracy"]
    assert accuracy["exclude"] >= accuracy["none"] + 0.1, accuracy
    assert accuracy["exclude"] >= 0.8, accuracy
