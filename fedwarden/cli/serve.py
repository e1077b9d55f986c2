"""``fedwarden serve``: run a coordinator for remote agents (see server/serve.py)."""

from __future__ import annotations

import argparse
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
        "attack", "attack_params", "malicious_fraction", "attack_start_round", "collude",
        "engine", "out", "progress",
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
    from fedwarden.cli.main import config_from_args
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


def apply_deployment_table(args: argparse.Namespace) -> None:
    """``[deployment]`` of ``--config``: serve's own options by their flag names with underscores
    (``host = "0.0.0.0"``, ``round_timeout = 60``, ``operator = ["alice"]``), for each option not
    given as a flag; checked against the option's type and choices."""
    from fedwarden.config import read_toml

    if not getattr(args, "config", None):
        return
    table = read_toml(args.config).get("deployment", {})
    parser = args._parser
    group = next(g for g in parser._action_groups if g.title == "deployment")
    actions = {a.dest: a for a in group._group_actions}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        action = actions.get(key)
        where = f"config file {args.config}: [deployment] {raw_key}"
        if action is None or key == "state_dir":
            raise UsageError(
                f"{where} is not an option of fedwarden serve's deployment group (--state-dir is "
                f"a flag only). Accepted: {', '.join(sorted(set(actions) - {'state_dir'}))}"
            )
        if getattr(args, key) != parser.get_default(key):
            continue  # the flag was given: it wins
        setattr(args, key, _deployment_value(where, action, value))


def _deployment_value(where: str, action: argparse.Action, value):
    if action.nargs == 0:  # a switch (--insecure)
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(action, argparse._AppendAction):
        expected = "a list of strings"
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif action.type in (int, float):
        expected = "an integer" if action.type is int else "a number"
        ok = not isinstance(value, bool) and isinstance(
            value, (int, float) if action.type is float else int
        )
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise UsageError(f"{where} must be {expected}. Received: {value!r}")
    if action.choices and value not in action.choices:
        raise UsageError(f"{where} must be one of {', '.join(action.choices)}. Received: {value!r}")
    return float(value) if action.type is float else value


def cmd_serve(args: argparse.Namespace) -> int:
    from fedwarden.cli.main import check_out_dir, check_port_free
    from fedwarden.protocol.connection import require_protocol
    from fedwarden.simulations.preflight import check_run

    apply_deployment_table(args)
    config = serve_config(args)
    if config.dp == "central" and config.dp_delta is None:
        raise UsageError(
            "--dp central in serve needs --dp-delta (e.g. 1e-5): the default 1/n^1.1 needs a "
            "population size, which a deployment does not know"
        )
    if args.model and not args.eval_data and args.dataset is None:
        raise UsageError("--model needs --eval-data FILE.npz (or --dataset NAME) to evaluate on")
    if args.port and not 0 < args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535]. Received: {args.port}")
    if args.max_agents < 1:
        raise UsageError(f"--max-agents must be a positive integer. Received: {args.max_agents}")
    check_run(config, cohort=min(args.min_clients, config.clients_per_round), deployment=True)
    require_protocol()
    from fedwarden.server.serve import ServeOptions, Server

    options = ServeOptions(
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        min_clients=args.min_clients,
        round_timeout_s=args.round_timeout,
        eval_data=args.eval_data,
        tokens=args.tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
        operators=args.operator or [],
        compression=args.compression,
        max_agents=args.max_agents,
        allow_clients=args.allow_clients,
        allow_open_network=args.allow_open_network,
        stall_timeout_s=args.stall_timeout,
        min_transfer_rate=args.min_transfer_rate,
        idle_timeout_s=args.idle_timeout,
        overselect=args.overselect,
        max_attempts=args.max_attempts,
        max_silences=args.max_silences,
        bench_rounds=args.bench_rounds,
        metrics_web_config=args.metrics_web_config,
    )
    options.check()
    check_port_free(config.metrics_port, args.metrics_host)
    check_port_free(args.port, args.host, "--port")
    check_out_dir(Path(args.state_dir), replaces=False)  # restarted: it resumes
    logging.getLogger("fedwarden.serve").setLevel(logging.INFO)
    logging.getLogger("fedwarden.checkpoint").setLevel(logging.INFO)
    return Server(config, options).run()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fedwarden.cli.main import add_settings

    p = subparsers.add_parser(
        "serve", help="run a coordinator for remote agents", description=DESCRIPTION
    )
    add_settings(p, SERVE_SKIPS)
    (aggregator,) = [a for a in p._actions if "--aggregator" in a.option_strings]
    aggregator.help = aggregator.help.replace(
        "(default: mean)", f"(default: {SERVE_AGGREGATOR}; mean with --dp central)"
    )
    g = p.add_argument_group("deployment")
    g.add_argument(
        "--eval-data",
        metavar="FILE.npz",
        help="held-out data (arrays x, y; optional num_classes) to evaluate on; "
        "default: the test split of --dataset",
    )
    g.add_argument(
        "--min-clients",
        type=int,
        default=2,
        metavar="N",
        help="agents that must be connected before a round starts, and updates needed "
        "to close a round at its timeout (default: 2)",
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the selected agents; with fewer than --min-clients "
        "updates by then the round is re-run with a new selection (default: 120)",
    )
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)",
    )
    g.add_argument(
        "--port", type=int, default=50051, help="gRPC port; 0: any free port (default: 50051)"
    )
    g.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of /metrics; 0.0.0.0 to let Prometheus scrape it (default: 127.0.0.1)",
    )
    g.add_argument(
        "--state-dir",
        required=True,
        metavar="DIR",
        help="checkpoints, ledger.sqlite and results.json; reuse it to resume. While a file "
        "PAUSE exists there no new round starts (holding a number N: from round N on)",
    )
    g.add_argument(
        "--tokens",
        metavar="FILE.toml",
        help='per-client tokens: lines of client_id = "token"; an [operators] table '
        "names who may read trust (fedwarden trust list --server)",
    )
    g.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    g.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="CA (PEM) that signs client certificates: turns on mutual TLS, and the "
        "certificate's common name is the client id",
    )
    g.add_argument(
        "--operator",
        action="append",
        metavar="CN",
        help="certificate common name allowed to read trust (repeatable)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC; without --tokens, agent identities are not checked. "
        "Only on a trusted network",
    )
    g.add_argument(
        "--compression",
        default="none",
        choices=("none", "gzip"),
        help="compress what the coordinator sends (default: none)",
    )
    g.add_argument(
        "--max-agents",
        type=int,
        default=64,
        metavar="N",
        help="agents served at once; sizes the thread pool (default: 64)",
    )
    add_hostile_client_options(g)
    p.set_defaults(func=cmd_serve)


def add_hostile_client_options(g: argparse._ArgumentGroup) -> None:
    """Options that bound what one client (or a crowd of fake ones) can take from the server."""
    g.add_argument(
        "--allow-clients",
        metavar="FILE",
        help="allow-list of training identities: lines of client_id, optionally followed by "
        "sha256:<certificate fingerprint>; re-read when it changes (delete a line to revoke). "
        "Required for mutual TLS without --tokens",
    )
    g.add_argument(
        "--allow-open-network",
        action="store_true",
        help="let an open coordinator (--insecure without --tokens: anyone can claim any id) "
        "listen on a non-loopback --host",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a call waiting on its agent with no byte moving for this long is cancelled (default: 10)",
    )
    g.add_argument(
        "--min-transfer-rate",
        type=float,
        default=64 * 1024,
        metavar="BYTES/S",
        help="uploads and task downloads must average this rate, after --stall-timeout of "
        "grace (default: 65536)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="connections with no call for this long are closed (default: 300)",
    )
    g.add_argument(
        "--overselect",
        type=float,
        default=1.3,
        metavar="F",
        help="select F times --clients-per-round agents; a round closes once "
        "--clients-per-round of them answered (default: 1.3)",
    )
    g.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        metavar="N",
        help="attempts at one round before the coordinator stops (exit 2, checkpoint kept) (default: 5)",
    )
    g.add_argument(
        "--max-silences",
        type=int,
        default=3,
        metavar="N",
        help="an agent selected and silent N attempts in a row is benched (default: 3)",
    )
    g.add_argument(
        "--bench-rounds",
        type=int,
        default=5,
        metavar="N",
        help="rounds a benched agent is not selected for (default: 5)",
    )
    g.add_argument(
        "--metrics-web-config",
        metavar="FILE.yml",
        help="TLS and basic auth for /metrics, in the Prometheus exporter-toolkit web config "
        "format (tls_server_config, basic_auth_users with bcrypt hashes)",
    )
