"""``fedwarden trust``: per-client trust from a ledger file (or, later, a running coordinator).

::

    fedwarden trust list --ledger runs/latest/ledger.sqlite            # lowest trust first
    fedwarden trust list --ledger runs/latest/ledger.sqlite --format json
    fedwarden trust show c07 --ledger runs/latest/ledger.sqlite        # c07's round history

The ledger is opened read-only, so this works while a run is writing it. Problems (a missing
file, an unknown client) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedwarden.errors import UsageError

LIST_KEYS = ("client_id", "trust", "anomaly", "flagged", "quarantined", "rounds", "last_round",
             "rejected")  # fmt: skip
"""Keys of each ``trust list --format json`` entry (the first five are the stable contract)."""

HISTORY_KEYS = ("round", "anomaly", "trust", "flagged", "quarantined", "norm", "norm_z", "cosine",
                "distance", "krum_score", "trimmed_share", "loss", "rejected_reason")  # fmt: skip
"""Keys of each round in ``trust show --format json``."""


def add_trust_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``trust list`` and ``trust show`` to a ``fedwarden`` subparsers object.

    Each leaf parser sets ``func``, which takes the parsed args and returns the exit code
    (raising :class:`UsageError` for bad input).
    """
    trust = subparsers.add_parser(
        "trust",
        help="per-client trust scores from a ledger",
        description="Read per-client trust, anomaly and flags from a run's SQLite ledger "
        "(safe while the run is writing it).",
    )
    sub = trust.add_subparsers(dest="trust_command", required=True, metavar="{list,show}")

    def common(p: argparse.ArgumentParser) -> None:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--ledger", metavar="FILE", help="the run's ledger, e.g. runs/latest/ledger.sqlite"
        )
        source.add_argument(
            "--server", metavar="HOST:PORT",
            help="ask a running coordinator instead of a ledger file (needs an operator token or "
            "certificate; see the connection options)",
        )  # fmt: skip
        from clients.connection import add_connection_options

        add_connection_options(p.add_argument_group("connection (with --server)"))
        p.add_argument(
            "--format", choices=("table", "json"), default="table",
            help="table for people (default) or json for tools",
        )  # fmt: skip

    p = sub.add_parser(
        "list",
        help="every client, lowest trust first",
        description="Every client with its trust, last anomaly score, flag, quarantine and "
        "round counts, lowest trust first. JSON: a list of objects with keys "
        + ", ".join(LIST_KEYS) + ".",
    )  # fmt: skip
    common(p)
    p.set_defaults(func=cmd_trust_list)

    p = sub.add_parser(
        "show",
        help="one client's per-round history",
        description="One client's state and its per-round measurements. JSON: an object with "
        "the keys of `trust list` plus history, a list of rounds with keys "
        + ", ".join(HISTORY_KEYS) + ".",
    )  # fmt: skip
    p.add_argument("client_id", metavar="CLIENT_ID", help="the client, e.g. c07")
    common(p)
    p.set_defaults(func=cmd_trust_show)
    return trust


def query_server(address: str, client_id: str | None = None,
                 args: argparse.Namespace | None = None) -> Any:  # fmt: skip
    """The ``list`` rows (or, with ``client_id``, the ``show`` object) from a running coordinator
    at ``address``, over its GetTrust RPC (credentials from the connection options in ``args``)."""
    from clients.connection import query_trust

    args = args or argparse.Namespace(server=address)
    args.server = address
    return query_trust(args, client_id)


def _open(path: str):
    from server.ledger import Ledger, LedgerError

    try:
        return Ledger(path, readonly=True)
    except LedgerError as err:
        raise UsageError(str(err)) from err


def _list_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.server:
        return query_server(args.server, args=args)
    with _open(args.ledger) as ledger:
        return [{k: row.get(k) for k in LIST_KEYS} for row in ledger.list_clients()]


def _show_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.server:
        return query_server(args.server, args.client_id, args)
    with _open(args.ledger) as ledger:
        client = ledger.get_client(args.client_id)
        if client is None:
            known = [r["client_id"] for r in ledger.list_clients()]
            hint = f" (known: {', '.join(sorted(known)[:10])}{', ...' if len(known) > 10 else ''})"
            raise UsageError(
                f"unknown client {args.client_id!r} in {args.ledger}" + (hint if known else "")
            )
        history = ledger.client_history(args.client_id)
    data = {k: client.get(k) for k in LIST_KEYS}
    data["history"] = [{k: row.get(k) for k in HISTORY_KEYS} for row in history]
    return data


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """Left-aligned columns with a header; None shows as ``-``."""
    cells = [list(keys)] + [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def cmd_trust_list(args: argparse.Namespace) -> int:
    rows = _list_rows(args)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows, LIST_KEYS))
    else:
        print("no clients in the ledger yet")
    return 0


def cmd_trust_show(args: argparse.Namespace) -> int:
    data = _show_data(args)
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(format_table([data], LIST_KEYS))
    print()
    print(format_table(data["history"], HISTORY_KEYS))
    return 0


def trust_main(argv: list[str] | None = None) -> int:
    """``fedwarden trust ...`` on its own (tests, or before the main CLI wires it in)."""
    parser = argparse.ArgumentParser(prog="fedwarden")
    add_trust_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fedwarden trust: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(trust_main())
