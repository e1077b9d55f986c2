"""The Python API (fedwarden/api.py) and its runnable example (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedwarden
from fedwarden.aggregation.rules import median
from fedwarden.config import Config, TrainingConfig
from fedwarden.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_runs_and_writes_valid_results(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout and "after 2 rounds" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["aggregator"] == "trimmed_mean" and len(results["rounds"]) == 2
    # the clipped median keeps the two honest updates' coordinates, not the outlier's
    assert "aggregate of two honest updates and one outlier: [1.2" in result.stdout


def test_chain_takes_strings_steps_or_both():
    updates = np.array([[1.0, 1.0], [1.2, 0.8], [1000.0, -1000.0]], np.float32)
    weights = np.ones(3)
    from_string = fedwarden.chain("clip:max_norm=5+median")
    mixed = fedwarden.chain("clip:max_norm=5", median())
    a = from_string(updates, weights, from_string.init()).updates
    b = mixed(updates, weights, mixed.init()).updates
    assert np.array_equal(a, b) and repr(from_string) == repr(mixed)


def test_bad_settings_fail_before_tensorflow_loads():
    code = (
        "import sys, fedwarden\n"
        "try:\n"
        "    fedwarden.simulate(clients=3, clients_per_round=5)\n"
        "except fedwarden.errors.UsageError as e:\n"
        "    print(e, '|', 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == (
        "--clients-per-round (5) cannot exceed --clients (3); lower --clients-per-round or add "
        "clients | False"
    ), result.stderr


def test_nested_and_flat_settings_are_the_same_run():
    nested = Config(training=TrainingConfig(rounds=3, seed=4))
    assert nested.flat() == fedwarden.RunConfig(rounds=3, seed=4)
    assert nested.flat().sections == nested
    with pytest.raises(UsageError, match="--rounds must be >= 1. Received: 0"):
        TrainingConfig(rounds=0)


def test_toml_section_tables_flat_keys_and_prefixed_tables_map_to_the_same_settings(tmp_path):
    from fedwarden.config import load_toml

    path = tmp_path / "run.toml"
    path.write_text(
        'aggregator = "median"\n[training]\nrounds = 3\n[attack]\nname = "alie"\n'
        '[trust]\ndecay = 0.8\nquarantine = "exclude"\n[dp]\nclip = 0.5\n'
    )
    assert load_toml(path) == {
        "aggregator": "median", "rounds": 3, "attack": "alie", "trust_decay": 0.8,
        "quarantine": "exclude", "dp_clip": 0.5,
    }  # fmt: skip


def test_the_settings_page_is_generated_from_the_configuration():
    from fedwarden.config import FLAT, settings_markdown

    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == settings_markdown(), "regenerate docs/settings.md with settings_markdown()"
    assert all(f"`{f.name}`" in page for _, f in FLAT.values())
