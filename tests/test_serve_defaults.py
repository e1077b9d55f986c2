"""``fedwarden serve`` defaults to a robust chain (issue 13): median, unless --aggregator or the
config file names one, or central DP keeps the mean for its formal guarantee."""

from __future__ import annotations

import pytest

from fedwarden.cli.main import build_parser
from fedwarden.cli.serve import SERVE_AGGREGATOR, serve_config


def aggregator(tmp_path, *args: str) -> str:
    parsed = build_parser().parse_args(["serve", "--state-dir", str(tmp_path / "s"), *args])
    return serve_config(parsed).aggregator


def test_serve_defaults_to_the_median_and_simulate_keeps_the_mean(tmp_path):
    assert SERVE_AGGREGATOR == "median"
    assert aggregator(tmp_path) == "median"
    simulate = build_parser().parse_args(["simulate"])
    from fedwarden.cli.main import config_from_args

    assert config_from_args(simulate).aggregator == "mean"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--aggregator", "mean"], "mean"),
        (["--aggregator", "clip:max_norm=5+trimmed_mean"], "clip:max_norm=5+trimmed_mean"),
        (["--dp", "central", "--dp-delta", "1e-5", "--dp-noise-multiplier", "1"], "mean"),
        (["--config", "CFG"], "krum"),
    ],
)
def test_a_named_chain_or_central_dp_overrides_the_serve_default(tmp_path, args, expected):
    config = tmp_path / "serve.toml"
    config.write_text('[defence]\naggregator = "krum"\n')
    assert aggregator(tmp_path, *[str(config) if a == "CFG" else a for a in args]) == expected


def test_serve_help_states_its_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "default: median; mean with --dp central" in " ".join(help_text.split())
