"""``fedwarden agent``: train one client's local data for a remote coordinator."""

from __future__ import annotations

import argparse
import logging

from fedwarden.errors import UsageError

DESCRIPTION = """Join a coordinator (fedwarden serve) as one client: validate the local data
against the task, then fetch the global weights, train locally and submit the update, round
after round; the data never leaves this machine. TLS is the default (the server's certificate is
checked against --tls-ca, or the system's roots); --tls-cert/--tls-key add a client certificate
(mutual TLS); --insecure allows plaintext on a trusted network. The agent reconnects with backoff
when the coordinator restarts, exits 0 when training is over, and exits 2 with a message when its
credentials are refused or its data does not fit the task. Rows of the data with a problem (NaN,
values out of range, unknown labels, duplicates) are skipped and reported with their row numbers;
--strict refuses to train instead.

Red team: --attack NAME makes this agent an attacker, to rehearse an attack on your own
deployment with the same attacks as simulations (fedwarden attacks lists them). Nothing it sends
marks it as one; --red-team-report FILE records what it sent each round, and fedwarden trust
report scores the coordinator's flags against that file. Attacks that need the other clients'
updates estimate them from this agent's own data (see clients/red_team.py)."""


def cmd_agent(args: argparse.Namespace) -> int:
    from fedwarden.protocol.connection import connection_from_args, require_protocol

    for flag, value in (("--poll-wait", args.poll_wait), ("--backoff-max", args.backoff_max)):
        if not value > 0:
            raise UsageError(f"{flag} must be > 0 seconds. Received: {value}")
    if args.give_up_after < 0:
        raise UsageError(
            f"--give-up-after must be >= 0 seconds (0: never). Received: {args.give_up_after}"
        )
    require_protocol()
    from fedwarden.clients.agent import Agent, SpecPin
    from fedwarden.data.validation import DataError

    conn = connection_from_args(args, client_id=args.client_id, compression=args.compression)
    red_team = None
    if args.attack:
        from fedwarden.attacks import parse_attack_params
        from fedwarden.clients.red_team import RedTeam

        red_team = RedTeam(
            args.attack,
            parse_attack_params(args.attack_param or []),
            args.client_id,
            start_round=args.attack_start_round,
            rate=args.attack_rate,
            cohort=args.attack_cohort,
            report=args.red_team_report,
            claim_examples=args.attack_claim_examples,
        )
    elif args.attack_param or args.red_team_report or args.attack_claim_examples is not None:
        raise UsageError(
            "--attack-param, --attack-claim-examples and --red-team-report need --attack NAME"
        )
    give_up = None if args.give_up_after <= 0 else args.give_up_after
    pin = SpecPin(args.pin_model, args.min_dp_noise_multiplier, args.max_dp_l2_clip)
    agent = Agent(
        conn,
        args.data,
        poll_wait_s=args.poll_wait,
        give_up_after_s=give_up,
        backoff_max_s=args.backoff_max,
        red_team=red_team,
        strict=args.strict,
        pin=pin,
    )
    logging.getLogger("fedwarden.agent").setLevel(logging.INFO)
    try:
        return agent.run()
    except DataError as exc:
        raise UsageError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fedwarden.protocol.connection import add_connection_options

    p = subparsers.add_parser(
        "agent", help="train local data for a remote coordinator", description=DESCRIPTION
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument(
        "--client-id",
        required=True,
        metavar="ID",
        help="this client's id; must match the identity of the token or certificate",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="local training data: FILE.npz with arrays x (features) and y (integer labels), "
        "or FILE.csv with a header line, a 'label' column (integer class) and one column per "
        "feature (the task's input flattened row-major, e.g. 64 for digits)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse to train if any row of the data has a problem (NaN, out of range, unknown "
        "label, duplicate, unparseable); by default those rows are skipped and reported",
    )
    pins = p.add_argument_group("what this agent accepts from the coordinator")
    pins.add_argument(
        "--pin-model",
        metavar="FACTORY",
        help="refuse a task unless the coordinator's spec names this model: 'default' (the "
        "dataset's own) or package.module:function; without it the agent imports whatever "
        "model the spec names",
    )
    pins.add_argument(
        "--min-dp-noise-multiplier",
        type=float,
        metavar="Z",
        help="refuse a task unless it trains with DP-SGD at a noise multiplier of at least Z",
    )
    pins.add_argument(
        "--max-dp-l2-clip",
        type=float,
        metavar="C",
        help="refuse a task unless it trains with DP-SGD at a per-example clip of at most C",
    )
    add_connection_options(p)
    p.add_argument(
        "--compression",
        default="none",
        choices=("none", "gzip"),
        help="compress what the agent sends (default: none)",
    )
    p.add_argument(
        "--poll-wait",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds each task request may wait at the coordinator (default: 20)",
    )
    p.add_argument(
        "--backoff-max",
        type=float,
        default=8.0,
        metavar="S",
        help="longest delay between reconnection attempts (default: 8)",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=600.0,
        metavar="S",
        help="exit 1 after this long without reaching the coordinator; 0: never (default: 600)",
    )
    g = p.add_argument_group("red team (rehearse an attack on your own deployment)")
    g.add_argument(
        "--attack",
        metavar="NAME",
        help="attack to run: a name from `fedwarden attacks` (data or model poisoning), or "
        "package.module:callable",
    )
    g.add_argument(
        "--attack-param",
        action="append",
        metavar="KEY=VALUE",
        help="attack parameter, repeatable (e.g. boost=10); literature defaults otherwise",
    )
    g.add_argument(
        "--attack-start-round",
        type=int,
        default=1,
        metavar="R",
        help="first round to attack in; honest before (default: 1)",
    )
    g.add_argument(
        "--attack-rate",
        type=float,
        default=1.0,
        metavar="X",
        help="share of its rounds it attacks in, honest in the others: an on-off attacker "
        "(default: 1)",
    )
    g.add_argument(
        "--attack-cohort",
        type=int,
        default=10,
        metavar="N",
        help="clients per round the attacker assumes, for attacks that depend on it "
        "(scaling's boost, ALIE's z, the estimated honest updates) (default: 10)",
    )
    g.add_argument(
        "--attack-claim-examples",
        type=int,
        default=None,
        metavar="N",
        help="report N examples with every attacking update, whatever the agent trained on "
        "(a lie about its weight; default: the true count)",
    )
    g.add_argument(
        "--red-team-report",
        metavar="FILE",
        help="append one JSON line per update sent: round, attack, params, whether it "
        "attacked, update norm, the coordinator's answer (for fedwarden trust report)",
    )
    p.set_defaults(func=cmd_agent)
