"""``fedwarden agent``: train one client's local data for a remote coordinator."""

from __future__ import annotations

import argparse
import logging

from clients.data import DataError
from fedwarden.errors import UsageError

DESCRIPTION = """Join a coordinator (fedwarden serve) as one client: validate the local data
against the task, then fetch the global weights, train locally and submit the update, round
after round; the data never leaves this machine. TLS is the default (the server's certificate is
checked against --tls-ca, or the system's roots); --tls-cert/--tls-key add a client certificate
(mutual TLS); --insecure allows plaintext on a trusted network. The agent reconnects with backoff
when the coordinator restarts, exits 0 when training is over, and exits 2 with a message when its
credentials are refused or its data does not fit the task."""


def cmd_agent(args: argparse.Namespace) -> int:
    from clients.connection import connection_from_args, require_protocol

    require_protocol()
    from clients.agent import Agent

    conn = connection_from_args(args, client_id=args.client_id, compression=args.compression)
    give_up = None if args.give_up_after <= 0 else args.give_up_after
    agent = Agent(
        conn,
        args.data,
        poll_wait_s=args.poll_wait,
        give_up_after_s=give_up,
        backoff_max_s=args.backoff_max,
    )
    logging.getLogger("fedwarden.agent").setLevel(logging.INFO)
    try:
        return agent.run()
    except DataError as exc:
        raise UsageError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from clients.connection import add_connection_options

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
        metavar="FILE.npz",
        help="local training data: arrays x (features) and y (integer labels)",
    )
    add_connection_options(p)
    p.add_argument(
        "--compression",
        default="none",
        choices=("none", "gzip"),
        help="compress what the agent sends (default none)",
    )
    p.add_argument(
        "--poll-wait",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds each task request may wait at the coordinator (20)",
    )
    p.add_argument(
        "--backoff-max",
        type=float,
        default=8.0,
        metavar="S",
        help="longest delay between reconnection attempts (8)",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=600.0,
        metavar="S",
        help="exit 1 after this long without reaching the coordinator; 0 = never (600)",
    )
    p.set_defaults(func=cmd_agent)
