"""``fedwarden serve``: run a coordinator for remote agents (see server/serve.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from fedwarden.errors import UsageError

DESCRIPTION = """Run a coordinator: agents (fedwarden agent) on other machines connect over gRPC,
train on their own data and submit updates; the coordinator aggregates them with the same round
logic, defences and trust scores as simulations. Secure by default: TLS with --tls-cert/--tls-key,
agents authenticated by --tokens and/or client certificates (--tls-client-ca); --insecure allows
plaintext. Checkpoints after every round into --state-dir; restarted with the same --state-dir it
resumes at the next round. SIGTERM stops it gracefully. Exits when the rounds are done.

Central DP (--dp central) needs --dp-delta and is accounted without subsampling (sampling rate
1: a deployment does not know its population). --target-epsilon E is then a budget: the
coordinator publishes fedwarden_dp_epsilon after every round and stops cleanly (exit 0) before
a round that would take epsilon above E, so --rounds is an upper bound. With
--dp-noise-multiplier the noise is as given; without, it is solved so that --rounds rounds spend
E."""


# Settings a coordinator has no use for: its clients are the agents that connect, with their own
# data; attacks are rehearsed with red-team agents; it trains nothing itself; it writes --state-dir.
SERVE_SKIPS = frozenset(
    {
        "clients", "partition", "alpha", "shards_per_client",
        "attack", "attack_params", "malicious_fraction", "attack_start_round", "attack_rate",
        "collude", "engine", "out", "progress",
    }
)  # fmt: skip


SERVE_AGGREGATOR = "median"
"""serve's chain when neither --aggregator nor --config names one. Real agents report their own
example counts and send whatever values they like: a coordinate-wise median stays within the
honest clients' values with any cohort of which fewer than half are hostile, needs no norm bound
that depends on the model, and ignores the counts. With --dp central the default stays ``mean``,
the only chain whose epsilon is a formal guarantee (its clip bounds each client)."""


def serve_config(args: argparse.Namespace):
    """The coordinator's RunConfig: its cohort is also its (unknown) population."""
    from fedwarden.cli.settings import config_from_args
    from fedwarden.config import load_toml

    cohort = args.clients_per_round
    overrides = {} if cohort is None else {"clients": max(cohort, 1)}  # a bad cohort: its own error
    overrides.update(out=args.state_dir, progress=False, deployment=True)
    config = config_from_args(args, SERVE_SKIPS, **overrides)
    named = args.aggregator is not None or (
        getattr(args, "config", None) and "aggregator" in load_toml(args.config, deployment=True)
    )
    if named or config.dp == "central":
        return config
    return config_from_args(args, SERVE_SKIPS, aggregator=SERVE_AGGREGATOR, **overrides)


def deployment_config(args: argparse.Namespace):
    """The deployment section: the ``[deployment]`` table of ``--config``, then the flags given."""
    from fedwarden.config import DeploymentConfig, deployment_from

    names = [f.name for f in dataclasses.fields(DeploymentConfig)]
    return deployment_from(
        getattr(args, "config", None), {name: getattr(args, name, None) for name in names}
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from fedwarden.cli.settings import check_out_dir, check_port_free
    from fedwarden.protocol.connection import require_protocol
    from fedwarden.simulations.preflight import check_run

    config = serve_config(args)
    if config.dp == "central" and config.dp_delta is None:
        raise UsageError(
            "--dp central in serve needs --dp-delta (e.g. 1e-5): the default 1/n^1.1 needs a "
            "population size, which a deployment does not know"
        )
    deployment = deployment_config(args)
    if config.model and not deployment.eval_data and args.dataset is None:
        raise UsageError("--model needs --eval-data FILE.npz (or --dataset NAME) to evaluate on")
    from fedwarden.server.defence import smallest_cohort

    cohort = smallest_cohort(config, deployment)
    aggregator = check_run(config, cohort=cohort, deployment=True)
    require_protocol()
    from fedwarden.server.serve import Server

    server = Server(dataclasses.replace(config.sections, deployment=deployment), aggregator)
    check_port_free(config.metrics_port, deployment.metrics_host)
    check_port_free(deployment.port, deployment.host, "--port")
    check_out_dir(Path(deployment.state_dir), replaces=False)  # restarted: it resumes
    logging.getLogger("fedwarden.serve").setLevel(logging.INFO)
    logging.getLogger("fedwarden.checkpoint").setLevel(logging.INFO)
    return server.run()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fedwarden.cli.settings import add_flag, add_settings
    from fedwarden.config import DeploymentConfig

    p = subparsers.add_parser(
        "serve", help="run a coordinator for remote agents", description=DESCRIPTION
    )
    add_settings(p, SERVE_SKIPS)
    (aggregator,) = [a for a in p._actions if "--aggregator" in a.option_strings]
    aggregator.help = aggregator.help.replace(
        "(default: mean)", f"(default: {SERVE_AGGREGATOR}; mean with --dp central)"
    )
    g = p.add_argument_group("deployment")
    for f in dataclasses.fields(DeploymentConfig):
        add_flag(g, f)
    (state_dir,) = [a for a in g._group_actions if a.dest == "state_dir"]
    state_dir.required = True
    p.set_defaults(func=cmd_serve)
