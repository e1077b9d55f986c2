"""Differential privacy in whole runs: accounting in results, formal vs not, CLI errors, effect."""

import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from fedwarden.config import make_config
from fedwarden.simulations.runner import simulate

SMALL = dict(clients=20, clients_per_round=10, rounds=4, local_epochs=1, progress=False)


def independent_rdp_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    orders = [1 + x / 4 for x in range(1, 60)] + list(range(16, 128))
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return accountant.get_epsilon(delta)


def test_central_dp_run_reports_a_formal_epsilon_that_matches_dp_accounting(tmp_path: Path):
    config = make_config(
        {},
        {
            **SMALL,
            "dp": "central",
            "dp_noise_multiplier": 0.8,
            "dp_clip": 0.5,
            "out": str(tmp_path),
        },
    )
    results = simulate(config)
    central = results["final"]["privacy"]["central"]
    assert central["formal_guarantee"] is True and central["sampling_rate"] == 0.5
    assert central["rounds"] == 4 and central["noise_multiplier"] == 0.8
    expected = independent_rdp_epsilon(0.8, 0.5, 4, central["delta"])
    assert central["epsilon"] == pytest.approx(expected, rel=0.10)
    per_round = [r["epsilon"] for r in results["rounds"]]
    assert per_round == sorted(per_round) and per_round[-1] == pytest.approx(central["epsilon"])
    assert "fedwarden_dp_epsilon" in (tmp_path / "metrics.prom").read_text()


def test_robust_rule_with_noise_is_flagged_as_not_formal(tmp_path: Path):
    config = make_config(
        {},
        {
            **SMALL,
            "dp": "central",
            "dp_noise_multiplier": 0.8,
            "aggregator": "median",
            "out": str(tmp_path),
        },
    )
    central = simulate(config)["final"]["privacy"]["central"]
    assert central["formal_guarantee"] is False


def test_target_epsilon_is_met(tmp_path: Path):
    config = make_config(
        {}, {**SMALL, "dp": "central", "target_epsilon": 5.0, "out": str(tmp_path)}
    )
    central = simulate(config)["final"]["privacy"]["central"]
    assert central["epsilon"] <= 5.0 and central["epsilon"] == pytest.approx(5.0, rel=0.05)
    assert central["target_epsilon"] == 5.0 and central["noise_multiplier"] > 0


def test_dp_sgd_reports_per_client_epsilon_falling_with_more_noise(tmp_path: Path):
    eps = {}
    for z in (0.8, 2.0):
        config = make_config(
            {},
            {
                **SMALL,
                "rounds": 2,
                "dp_sgd": True,
                "dp_sgd_noise_multiplier": z,
                "out": str(tmp_path / str(z)),
            },
        )
        client = simulate(config)["final"]["privacy"]["client"]
        assert set(client["per_client"]) <= {f"c{i:02d}" for i in range(20)}
        assert client["epsilon"] == max(client["per_client"].values())
        eps[z] = client["epsilon"]
    assert 0 < eps[2.0] < eps[0.8]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dp", "central", "--dp-noise-multiplier", "0"], "noise_multiplier must be > 0"),
        (
            ["--dp", "central", "--dp-noise-multiplier", "1", "--dp-clip", "0"],
            "--dp-clip must be > 0",
        ),
        (
            [
                "--dp",
                "central",
                "--target-epsilon",
                "1e-6",
                "--dp-delta",
                "1e-12",
                "--rounds",
                "1000",
            ],
            "is unreachable",
        ),
        (
            ["--dp-sgd", "--dp-sgd-noise-multiplier", "1", "--dp-microbatches", "5"],
            "--dp-microbatches must divide --batch-size",
        ),
    ],
)
def test_bad_dp_settings_exit_2_with_one_line(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedwarden", "simulate", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_clipping_and_weak_noise_blunt_a_boosted_backdoor(tmp_path: Path):
    """Sun et al. 2019: norm clipping plus weak DP noise limits model-replacement backdoors."""
    base = {"attack": "backdoor", "attack_params": {"boost": 5.0}, "progress": False}
    plain = simulate(make_config({}, {**base, "out": str(tmp_path / "plain")}))["final"]
    defended = simulate(
        make_config(
            {},
            {
                **base,
                "dp": "central",
                "dp_clip": 0.3,
                "dp_noise_multiplier": 0.1,
                "out": str(tmp_path / "dp"),
            },
        )
    )["final"]
    assert plain["attack_success_rate"] >= defended["attack_success_rate"] + 0.2
    assert defended["accuracy"] >= 0.8
