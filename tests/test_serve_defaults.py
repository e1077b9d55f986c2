"""``fedwarden serve`` defaults to a robust chain (issue 13): median, unless --aggregator or the
config file names one, or central DP keeps the mean for its formal guarantee."""

from __future__ import annotations

import dataclasses

import pytest

from fedwarden.cli.main import build_parser
from fedwarden.cli.serve import SERVE_AGGREGATOR, deployment_config, serve_config
from fedwarden.config import Config, DeploymentConfig, flag_name
from fedwarden.errors import UsageError


def aggregator(tmp_path, *args: str) -> str:
    parsed = build_parser().parse_args(["serve", "--state-dir", str(tmp_path / "s"), *args])
    return serve_config(parsed).aggregator


def test_serve_defaults_to_the_median_and_simulate_keeps_the_mean(tmp_path):
    assert SERVE_AGGREGATOR == "median"
    assert aggregator(tmp_path) == "median"
    simulate = build_parser().parse_args(["simulate"])
    from fedwarden.cli.settings import config_from_args

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


# -- deployment is a section of the typed configuration ----------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"port": 70000}, "--port must be in [0, 65535]. Received: 70000"),
        ({"min_clients": 0}, "--min-clients must be >= 1. Received: 0"),
        ({"compression": "zip"}, "--compression must be one of none, gzip. Received: 'zip'"),
        ({"operator": "alice"}, "--operator must be a list of strings. Received: 'alice'"),
        ({"round_timeout": "soon"}, "--round-timeout must be a number. Received: 'soon'"),
        ({"host": "0.0.0.0"}, "Received: --host 0.0.0.0; use --tokens, or --allow-open-network"),
        ({"tokens": "missing.toml"}, "--tokens file not found: missing.toml"),
    ],
)
def test_the_deployment_section_is_checked_when_built(tmp_path, values, message):
    with pytest.raises(UsageError) as err:
        DeploymentConfig(state_dir=str(tmp_path), insecure=True, **values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_serve_flags_and_the_deployment_table_map_onto_the_section_once(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text('[deployment]\ninsecure = true\nmax_agents = "many"\n')
    parsed = build_parser().parse_args(
        ["serve", "--state-dir", str(tmp_path), "--config", str(toml)]
    )
    with pytest.raises(
        UsageError, match=r"\[deployment\] max_agents: --max-agents must be an integer"
    ):
        deployment_config(parsed)
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(DeploymentConfig):
        assert flag_name(f) in serve_help, f.name
    argv = ["serve", "--state-dir", str(tmp_path), "--insecure", "--operator", "a", "--operator",
            "b", "--overselect", "2"]  # fmt: skip
    deployment = deployment_config(build_parser().parse_args(argv))
    assert deployment == DeploymentConfig(
        state_dir=str(tmp_path), insecure=True, operator=["a", "b"], overselect=2.0
    )


def test_the_deployment_section_stays_out_of_a_run_s_recorded_settings(tmp_path):
    deployment = DeploymentConfig(state_dir=str(tmp_path), insecure=True)
    config = Config(deployment=deployment)
    assert config.deployment is deployment and "deployment" not in config.to_dict()
    assert config.to_dict() == Config().to_dict() and config.flat() == Config().flat()
