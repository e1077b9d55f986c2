"""The simulation runner, `fedwarden simulate` / `compare`, and the Foundation acceptance figures."""

import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedwarden.cli.main import main
from fedwarden.config import RunConfig, make_config
from fedwarden.errors import UsageError
from fedwarden.server import checkpoint
from fedwarden.simulations.compare import compare
from fedwarden.simulations.runner import simulate

TINY = dict(clients=6, clients_per_round=4, rounds=3, local_epochs=1, progress=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedwarden", *args], capture_output=True, text=True, timeout=300
    )


def test_results_follow_the_contract(tmp_path: Path):
    config = make_config(
        {},
        {
            **TINY,
            "attack": "gaussian",
            "malicious_fraction": 0.34,
            "aggregator": "median",
            "out": str(tmp_path),
        },
    )
    results = simulate(config)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["config"]["aggregator"] == "median"
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3]
    for r in on_disk["rounds"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
        assert r["attack_success_rate"] is None and isinstance(r["flagged"], list)
    final = on_disk["final"]
    assert final["accuracy"] == on_disk["rounds"][-1]["accuracy"]
    assert set(final["detection"]) >= {"precision", "recall"}
    assert len(on_disk["clients"]) == 6
    assert sum(c["malicious"] for c in on_disk["clients"].values()) == 2
    for name in ("rounds.csv", "accuracy.png", "trust.png", "ledger.sqlite", "metrics.prom"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert results["final"] == final


def test_same_seed_same_results_and_other_seed_differs(tmp_path: Path):
    base = make_config({}, {**TINY, "seed": 7, "out": str(tmp_path / "a")})
    first = simulate(base)
    second = simulate(replace(base, out=str(tmp_path / "b")))
    other = simulate(replace(base, seed=8, out=str(tmp_path / "c")))
    accuracy = lambda res: [r["accuracy"] for r in res["rounds"]]  # noqa: E731
    assert accuracy(first) == accuracy(second)
    assert [r["loss"] for r in first["rounds"]] == [r["loss"] for r in second["rounds"]]
    assert accuracy(first) != accuracy(other)


def test_toml_config_and_flags_override(tmp_path: Path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'rounds = 2\nclients = 6\nclients_per_round = 3\naggregator = "median"\n'
        "[trust]\ndecay = 0.9\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--config",
            str(cfg),
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (
        config["rounds"] == 1 and config["aggregator"] == "median" and config["trust_decay"] == 0.9
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar"], "--dataset must be one of digits"),
        (["--aggregator", "avg"], "avg"),
        (["--attack", "meteor"], "meteor"),
        (
            ["--clients", "5", "--clients-per-round", "8"],
            "--clients-per-round (8) cannot exceed --clients (5)",
        ),
        (["--aggregator", "trimmed_mean:trim_fraction=0.5"], "trim"),
        (
            ["--clients", "5", "--clients-per-round", "5", "--aggregator", "krum:num_byzantine=2"],
            "krum needs",
        ),
        (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], "not found in /nonexistent"),
        (["--partition", "zipf"], "invalid choice: 'zipf'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = run_cli("simulate", *args, "--rounds", "1", "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0]


def test_bad_toml_key_names_the_key(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("roundz = 3\n")
    result = run_cli("simulate", "--config", str(cfg))
    assert result.returncode == 2 and "unknown keys roundz" in result.stderr


def test_every_simulate_option_has_help():
    result = run_cli("simulate", "--help")
    assert result.returncode == 0
    for option in (
        "--aggregator",
        "--attack",
        "--malicious-fraction",
        "--partition",
        "--alpha",
        "--clients-per-round",
        "--server-optimizer",
        "--seed",
        "--out",
        "--config",
    ):
        assert option in result.stdout


@pytest.mark.slow
def test_foundation_acceptance_on_digits(tmp_path: Path):
    """Issue 2, done-when: 20 clients all sampled, 20 rounds, 20% gaussian attackers."""
    base = RunConfig(
        clients=20,
        clients_per_round=20,
        rounds=20,
        attack="gaussian",
        malicious_fraction=0.2,
        progress=False,
    )
    compare(base, ["gaussian"], ["mean", "trimmed_mean", "median", "multi_krum"], tmp_path)
    matrix = json.loads((tmp_path / "matrix.json").read_text())
    clean, attacked = matrix["none"], matrix["gaussian"]
    acc = {g: attacked[g]["accuracy"] for g in attacked}
    assert clean["mean"]["accuracy"] >= 0.90
    assert acc["mean"] <= acc["trimmed_mean"] - 0.2
    assert acc["trimmed_mean"] >= clean["mean"]["accuracy"] - 0.05
    assert acc["median"] >= clean["mean"]["accuracy"] - 0.07
    assert acc["multi_krum"] >= clean["mean"]["accuracy"] - 0.07
    assert (tmp_path / "matrix.png").stat().st_size > 0
    assert "| gaussian |" in (tmp_path / "matrix.md").read_text()


def test_resume_continues_where_the_run_stopped_with_identical_results(tmp_path: Path):
    settings = {
        **TINY,
        "rounds": 5,
        "attack": "gaussian",
        "malicious_fraction": 0.34,
        "aggregator": "median",
    }
    straight = simulate(make_config({}, {**settings, "out": str(tmp_path / "straight")}))
    partial = make_config({}, {**settings, "rounds": 3, "out": str(tmp_path / "resumed")})
    simulate(partial)
    resumed = simulate(replace(partial, rounds=5), resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5]
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in straight["rounds"]]
    assert resumed["clients"] == straight["clients"]


def test_a_detector_aware_attacker_reads_the_weights_its_round_was_trained_from(
    tmp_path: Path, monkeypatch
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import attack_plugins

    settings = {
        **TINY,
        "clients_per_round": 6,  # both attackers and four honest clients every round
        "rounds": 1,
        "attack": "detector_aware",
        "attack_params": {"score": "attack_plugins:recording_score"},
        "malicious_fraction": 0.34,
        "out": str(tmp_path),
    }
    config = make_config({}, settings)
    simulate(config)
    after_round_1 = checkpoint.read(checkpoint.path_for(tmp_path / "checkpoints", 1))
    attack_plugins.SCORED_WITH_WEIGHTS.clear()
    simulate(replace(config, rounds=2), resume=True)
    seen = attack_plugins.SCORED_WITH_WEIGHTS
    assert seen and all(np.array_equal(v, after_round_1["coordinator"]["weights"]) for v in seen)


def test_an_on_off_attacker_attacks_in_the_rounds_its_coin_gives_and_trains_honestly_in_others(
    tmp_path: Path,
):
    from fedwarden.attacks import attacks_in_round
    from fedwarden.server.ledger import Ledger

    settings = {**TINY, "clients": 10, "clients_per_round": 10, "rounds": 6, "attack": "scaling",
                "attack_params": {"boost": 50.0}, "attack_rate": 0.5, "malicious_fraction": 0.3,
                "seed": 3, "out": str(tmp_path)}  # fmt: skip
    results = simulate(make_config({}, settings))
    malicious = sorted(c for c, v in results["clients"].items() if v["malicious"])
    with Ledger(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        rows = [row for r in range(1, 7) for row in ledger.round_rows(r)]
    honest_norm = np.median([r["norm"] for r in rows if r["client_id"] not in malicious])
    boosted = {(r["round"], r["client_id"]) for r in rows if r["client_id"] in malicious
               and (r["rejected_reason"] or r["norm"] > 10 * honest_norm)}  # fmt: skip
    coin = {(r, c) for r in range(1, 7) for c in malicious
            if attacks_in_round(c, r, rate=0.5, seed=3)}  # fmt: skip
    assert boosted == coin and 0 < len(coin) < 18
    attacked = {(r, c) for c, v in results["clients"].items() for r in v["attacked_rounds"]}
    assert attacked == coin
    detection = results["final"]["detection"]
    assert detection["attacked"] == len({c for _, c in coin})
    found = {c for c, v in results["clients"].items() if v["flagged"]} & {c for _, c in coin}
    assert detection["recall_attacked"] == len(found) / detection["attacked"]


def last_checkpoint(directory: Path) -> int:
    return (
        max((r for r, _ in checkpoint.list_checkpoints(directory)), default=0)
        if directory.exists()
        else 0
    )


def test_sigkill_mid_run_then_resume_loses_and_repeats_no_round(tmp_path: Path):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "fedwarden.cli.main",
        "simulate",
        "--clients",
        "6",
        "--clients-per-round",
        "4",
        "--local-epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [*args, "--rounds", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while last_checkpoint(out / "checkpoints") < 3:  # poll what the other process writes
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint of round 3"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    result = run_cli("simulate", *args[4:], "--rounds", "8", "--resume")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == list(range(1, 9))
    with sqlite3.connect(out / "ledger.sqlite") as db:
        rows = db.execute("SELECT round, COUNT(*) FROM client_rounds GROUP BY round").fetchall()
    assert [r for r, _ in rows] == list(range(1, 9)) and all(n == 4 for _, n in rows)


def test_resume_with_other_settings_is_refused(tmp_path: Path):
    config = make_config({}, {**TINY, "rounds": 1, "out": str(tmp_path)})
    simulate(config)
    with pytest.raises(UsageError, match="aggregator: 'mean' -> 'median'"):
        simulate(replace(config, rounds=2, aggregator="median"), resume=True)
