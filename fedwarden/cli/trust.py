"""``fedwarden trust``: per-client trust from a ledger file (or, later, a running coordinator).

::

    fedwarden trust list --ledger runs/latest/ledger.sqlite            # lowest trust first
    fedwarden trust list --ledger runs/latest/ledger.sqlite --format json
    fedwarden trust show c07 --ledger runs/latest/ledger.sqlite        # c07's round history
    fedwarden trust report --ledger state/ledger.sqlite --red-team c04.jsonl  # a rehearsal's score
    fedwarden trust replay --ledger runs/latest/ledger.sqlite --trust-false-positive-rate 0.005

The ledger is opened read-only, so this works while a run is writing it. Problems (a missing
file, an unknown client) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedwarden.config import TrustConfig
from fedwarden.errors import UsageError
from fedwarden.records import HISTORY_KEYS, LIST_KEYS, list_entry, show_entry


def add_trust_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``trust list``, ``show``, ``report`` and ``replay`` to a ``fedwarden`` subparsers
    object.

    Each leaf parser sets ``func``, which takes the parsed args and returns the exit code
    (raising :class:`UsageError` for bad input).
    """
    trust = subparsers.add_parser(
        "trust",
        help="per-client trust scores from a ledger",
        description="Read per-client trust, anomaly and flags from a run's SQLite ledger "
        "(safe while the run is writing it).",
    )
    sub = trust.add_subparsers(
        dest="trust_command", required=True, metavar="{list,show,report,replay}"
    )

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
        from fedwarden.protocol.connection import add_connection_options

        add_connection_options(p.add_argument_group("connection (with --server)"))
        add_format(p)

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

    p = sub.add_parser(
        "report",
        help="score the flags against red-team reports",
        description="Score a deployment's flags against what red-team agents (fedwarden agent "
        "--attack ... --red-team-report FILE) say they did: the attackers are the clients whose "
        "report shows an attacking update the coordinator took (not LATE). Precision and "
        "recall of the flags at the last round in the ledger, the first round any attacker was "
        "flagged, and per attacker the rounds from its first attack to its flag: the same "
        "figures simulations report.",
    )  # fmt: skip
    p.add_argument("--ledger", required=True, metavar="FILE", help="the coordinator's ledger")
    p.add_argument(
        "--red-team", required=True, action="extend", nargs="+", metavar="FILE",
        help="red-team report(s) (JSON lines), one per red-team agent",
    )  # fmt: skip
    add_format(p)
    p.set_defaults(func=cmd_trust_report)

    p = sub.add_parser(
        "replay",
        help="what other trust settings would have flagged",
        description="Decide a ledger's rounds again from its recorded measurements under other "
        "trust settings (the flag line, the evidence cap, the anomaly weights) and compare the "
        "flags with the recorded ones, without running the federation again "
        "(server/replay.py). Settings not given stay at the run's own, from the results.json "
        "beside the ledger (else the defaults). Flags by association are decided again from "
        "the detector's forecasts the ledger keeps (a ledger written before it kept them is "
        "replayed without association). When the ledger sits in a simulation's output "
        "directory, its results.json names the attackers and precision and recall are shown.",
    )  # fmt: skip
    p.add_argument(
        "--ledger", required=True, nargs="+", metavar="FILE",
        help="the run's ledger; several (a grid's, runs/*/ledger.sqlite) give one row each and "
        "their totals",
    )  # fmt: skip
    defaults = TrustConfig()
    p.add_argument(
        "--trust-false-positive-rate", type=float, default=None, metavar="X",
        help=f"nominal share of honest client-rounds flagged (default: the run's, from the "
        f"results.json beside the ledger, else {defaults.false_positive_rate})",
    )  # fmt: skip
    p.add_argument(
        "--trust-evidence-rounds", type=int, default=None, metavar="N",
        help=f"rounds of a steady excess that count as independent evidence (default: the "
        f"run's, else {defaults.evidence_rounds})",
    )  # fmt: skip
    p.add_argument(
        "--trust-association-z", type=float, default=None, metavar="Z",
        help=f"line of the flags by association, 0 for none (default: the run's, else "
        f"{defaults.association_z})",
    )  # fmt: skip
    p.add_argument(
        "--anomaly-weights", type=_weights, default=None, metavar="JSON",
        help="component weights as in a run's anomaly_weights, e.g. '{\"norm_z\": 0.2, "
        "\"cosine\": 0.15}' (names left out weigh 0; default: the run's, else the scoring's)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=None, metavar="N",
        help="replay rounds 1..N (default: every round in the ledger)",
    )  # fmt: skip
    add_format(p)
    p.set_defaults(func=cmd_trust_replay)
    return trust


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", choices=("table", "json"), default="table",
        help="table for people (default) or json for tools",
    )  # fmt: skip


def query_server(address: str, client_id: str | None = None,
                 args: argparse.Namespace | None = None) -> Any:  # fmt: skip
    """The ``list`` rows (or, with ``client_id``, the ``show`` object) from a running coordinator
    at ``address``, over its GetTrust RPC (credentials from the connection options in ``args``)."""
    from fedwarden.protocol.connection import query_trust

    args = args or argparse.Namespace(server=address)
    args.server = address
    try:
        return query_trust(args, client_id)
    except UsageError as err:
        raise UsageError(f"{err}{_connection_hint(str(err), args)}") from None


def _connection_hint(message: str, args: argparse.Namespace) -> str:
    """What to try when the coordinator could not be asked (the gRPC message alone rarely says)."""
    text = message.lower()
    if not getattr(args, "insecure", False) and ("handshake" in text or "ssl" in text):
        return (
            "; if the coordinator runs without TLS (serve --insecure), pass --insecure; else "
            "check --tls-ca"
        )
    if "unauthenticated" in text:
        return (
            "; reading trust needs an operator's credentials: a token from the [operators] "
            "table of serve --tokens, or a certificate named by serve --operator"
        )
    return ""


def _open(path: str):
    from fedwarden.server.ledger import Ledger, LedgerError

    try:
        return Ledger(path, readonly=True)
    except LedgerError as err:
        raise UsageError(str(err)) from err


def _list_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.server:
        return query_server(args.server, args=args)
    with _open(args.ledger) as ledger:
        return [list_entry(row) for row in ledger.list_clients()]


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
        return show_entry(client, ledger.client_history(args.client_id))


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


def flags_by_round(ledger: Any) -> list[set[str]]:
    """The flagged clients after each round 1..last (a client keeps its flag between rounds)."""
    flagged: dict[str, bool] = {}
    out = []
    for r in range(1, ledger.last_round() + 1):
        for row in ledger.round_rows(r):
            flagged[row["client_id"]] = bool(row["flagged"])
        out.append({c for c, f in flagged.items() if f})
    return out


def red_team_scores(flagged: list[set[str]], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Detection figures of ``flags_by_round`` output against red-team report lines.

    Returns ``fedwarden.report.detection_summary``'s precision, recall and
    first_detection_round, plus ``rounds``, ``flagged`` (at the last round), ``false_positives``
    and ``attackers``: per attacker its attack, first attacking round, first round flagged after
    it and ``rounds_to_detection`` (rounds from its first attack to its flag, both counted).
    """
    from fedwarden.report import detection_summary

    rounds = len(flagged)
    attackers: dict[str, dict[str, Any]] = {}
    for line in sorted(reports, key=lambda line: line["round"]):
        cid, r = str(line["client_id"]), int(line["round"])
        if line["attacking"] and line.get("status") != "LATE" and r <= rounds:
            attackers.setdefault(cid, {"attack": line.get("attack"), "first_attack_round": r})
    for cid, a in attackers.items():
        caught = [r for r in range(a["first_attack_round"], rounds + 1) if cid in flagged[r - 1]]
        a["first_flagged_round"] = caught[0] if caught else None
        a["rounds_to_detection"] = caught[0] - a["first_attack_round"] + 1 if caught else None
    final = flagged[-1] if flagged else set()
    return {
        **detection_summary(flagged, set(attackers)),
        "rounds": rounds,
        "flagged": sorted(final),
        "false_positives": sorted(final - set(attackers)),
        "attackers": dict(sorted(attackers.items())),
    }


def flag_explanations(ledger: Any, client_ids: set[str]) -> dict[str, str | None]:
    """Each client's latest explanation in the ledger: why it is flagged (None if it is not)."""
    out = {}
    for cid in sorted(client_ids):
        row = ledger.get_client(cid)
        out[cid] = None if row is None else row.get("explanation")
    return out


def cmd_trust_report(args: argparse.Namespace) -> int:
    from fedwarden.clients.red_team import read_reports

    reports = read_reports(args.red_team)
    with _open(args.ledger) as ledger:
        scores = red_team_scores(flags_by_round(ledger), reports)
        scores["explanations"] = flag_explanations(ledger, set(scores["flagged"]))
    if args.format == "json":
        print(json.dumps(scores, indent=2))
        return 0
    print(
        f"{scores['rounds']} rounds in the ledger; attackers (from the red-team reports): "
        f"{', '.join(scores['attackers']) or 'none'}; flagged at the last round: "
        f"{', '.join(scores['flagged']) or 'none'}"
    )
    share = {k: "-" if scores[k] is None else f"{scores[k]:.2f}" for k in ("precision", "recall")}
    print(
        f"precision {share['precision']}  recall {share['recall']}  "
        f"first detection round {_fmt(scores['first_detection_round'])}"
    )
    rows = [{"client_id": c, **a} for c, a in scores["attackers"].items()]
    if rows:
        print()
        print(format_table(rows, ("client_id", "attack", "first_attack_round",
                                  "first_flagged_round", "rounds_to_detection")))  # fmt: skip
    if scores["explanations"]:
        print()
        print("why each flagged client is flagged:")
        for cid, why in scores["explanations"].items():
            mark = "" if cid in scores["attackers"] else " (false positive)"
            print(f"  {cid}{mark}: {why or '-'}")
    return 0


def _weights(text: str) -> dict[str, float]:
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"--anomaly-weights must be a JSON object of names to weights, e.g. "
            f"'{{\"norm_z\": 0.2}}' ({exc}). Received: {text!r}"
        ) from None
    if not isinstance(weights, dict):
        raise argparse.ArgumentTypeError(
            f"--anomaly-weights must be a JSON object of names to weights. Received: {text!r}"
        )
    return weights


def _results_beside(ledger_path: str) -> dict:
    """The results.json of the run whose output directory holds the ledger, {} when there is
    none or it cannot be read."""
    from pathlib import Path

    try:
        results = json.loads((Path(ledger_path).parent / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def _clients_field(results: dict, key: str, kind: type) -> dict[str, Any] | None:
    """Each client's ``key`` in a results.json, None unless every client gives one of ``kind``
    (no results, a deployment's, or one written before the field was)."""
    try:
        values = {cid: c.get(key) for cid, c in results["clients"].items()}
    except (KeyError, TypeError, AttributeError):
        return None
    return values if all(isinstance(v, kind) for v in values.values()) else None


def _attackers(results: dict) -> set[str] | None:
    """The malicious clients a simulation's results name, None when they do not say (no
    results, or a deployment's, which knows no ground truth)."""
    malicious = _clients_field(results, "malicious", bool)
    return None if malicious is None else {cid for cid, m in malicious.items() if m}


def _attacked(results: dict, rounds: int) -> set[str] | None:
    """The clients a simulation's results say attacked in a round up to ``rounds`` that they
    were sampled in, None when they do not say (results written before they did)."""
    attacked = _clients_field(results, "attacked_rounds", list)
    if attacked is None:
        return None
    return {cid for cid, rs in attacked.items() if any(r <= rounds for r in rs)}


def _replay_settings(args: argparse.Namespace, config: dict) -> tuple[Any, Any, str]:
    """The trust policy and anomaly weights a replay decides with: the options given, else the
    run's own (the trust settings of ``config``, a results.json's ``config``, turned into a
    policy as a run does, ``server/defence.py``), else the defaults. The third item says where
    the settings not given came from."""
    from dataclasses import fields, replace

    from fedwarden.config import RunConfig
    from fedwarden.server.defence import trust_policy

    # a results.json of another version may hold settings this one lacks, and lack others
    known = {f.name for f in fields(RunConfig)}
    recorded = {
        k: v for k, v in (config if isinstance(config, dict) else {}).items()
        if k in known and (k.startswith("trust_") or k == "anomaly_weights")
    }  # fmt: skip
    given = {"false_positive_rate": args.trust_false_positive_rate,
             "evidence_rounds": args.trust_evidence_rounds,
             "association_z": args.trust_association_z}  # fmt: skip
    try:
        run = RunConfig(**recorded)
        policy = replace(trust_policy(run), **{k: v for k, v in given.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    weights = args.anomaly_weights if args.anomaly_weights is not None else run.anomaly_weights
    source = "the run's results.json" if recorded else "the defaults"
    return policy, weights or None, source


def replay_summary(
    ledger: Any, replayed: list[set[str]], attackers: set[str] | None,
    attacked: set[str] | None = None,
) -> dict:  # fmt: skip
    """The recorded and the replayed flags of the same rounds side by side: the clients flagged
    after the last one, the client-rounds flagged (a client flagged after a round it took part
    in), and with ``attackers`` precision and recall over the attackers that took part and the
    honest client-rounds flagged, with the longest honest streak; with
    ``attacked`` (those that attacked in a replayed round they took part in) also the recall
    over them, ``recall_attacked``."""
    from fedwarden.report import detection_summary

    rounds = len(replayed)
    recorded = flags_by_round(ledger)[:rounds]
    took_part = [
        {row["client_id"] for row in ledger.round_rows(r) if not row.get("absent")}
        for r in range(1, rounds + 1)
    ]  # fmt: skip
    seen = set().union(*took_part)
    attacked = None if attacked is None else attacked & seen
    out: dict[str, Any] = {"rounds": rounds}
    for name, flags in (("recorded", recorded), ("replayed", replayed)):
        final = flags[-1] if flags else set()
        side: dict[str, Any] = {
            "flagged": sorted(final),
            "flagged_client_rounds": sum(len(f & p) for f, p in zip(flags, took_part)),
        }
        if attackers is not None:
            side.update(detection_summary(flags, attackers & seen, attacked, took_part))
        out[name] = side
    recorded_final, replayed_final = (set(out[k]["flagged"]) for k in ("recorded", "replayed"))
    out["newly_flagged"] = sorted(replayed_final - recorded_final)
    out["no_longer_flagged"] = sorted(recorded_final - replayed_final)
    why = flag_explanations(ledger, recorded_final)
    out["recorded_by_association"] = sorted(
        c for c, text in why.items() if (text or "").startswith("association")
    )
    out["attackers"] = None if attackers is None else sorted(attackers & seen)
    out["attacked"] = None if attacked is None else sorted(attacked)
    return out


def _replay_one(path: str, args: argparse.Namespace) -> tuple[dict, Any]:
    """One ledger replayed under ``args``' settings (else its run's): :func:`replay_summary`
    with the settings used (``"settings"``), and the trust policy it was decided under."""
    from fedwarden.server.replay import replay_flags

    results = _results_beside(path)
    policy, weights, source = _replay_settings(args, results.get("config", {}))
    with _open(path) as ledger:
        if ledger.last_round() == 0:
            raise UsageError(f"{path} records no round yet; replay a ledger after its run")
        try:
            replayed = replay_flags(ledger, policy, weights, args.rounds)
        except ValueError as exc:  # an unknown or negative anomaly weight
            raise UsageError(str(exc)) from None
        attacked = _attacked(results, len(replayed))
        summary = replay_summary(ledger, replayed, _attackers(results), attacked)
        kept = ledger.records_histories()
    associates = kept and policy.flag_rule == "evidence" and policy.association_z > 0
    summary["settings"] = {
        "flag_rule": policy.flag_rule,
        "false_positive_rate": policy.false_positive_rate,
        "flag_line": policy.flag_z,
        "evidence_rounds": policy.evidence_rounds,
        "association_line": policy.association_z if associates else None,
        "association_replayable": kept,
        "anomaly_weights": weights,
        "other_settings_from": source,
    }
    return summary, policy


def cmd_trust_replay(args: argparse.Namespace) -> int:
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1. Received: {args.rounds}")
    if len(args.ledger) > 1:
        return _replay_runs(args)
    path = args.ledger[0]
    summary, policy = _replay_one(path, args)
    settings = summary["settings"]
    weights, kept = settings["anomaly_weights"], settings["association_replayable"]
    associates = settings["association_line"] is not None
    if args.format == "json":
        print(json.dumps(summary, indent=2))
        return 0
    rule = (
        f"false-positive rate {policy.false_positive_rate} (flag line {policy.flag_z:.2f}), "
        f"evidence rounds {policy.evidence_rounds}" if policy.flag_rule == "evidence"
        else f"trust threshold {policy.flag_below} (unflag above {policy.unflag_above})"
    )  # fmt: skip
    print(
        f"rounds 1-{summary['rounds']} of {path} replayed at {rule}, "
        f"{'default' if weights is None else json.dumps(weights)} anomaly weights "
        f"(other settings: {settings['other_settings_from']}); "
        + (f"association line {policy.association_z}" if associates else "association off"
           if kept else "flags by association not replayed (the ledger keeps no forecasts)")
    )  # fmt: skip
    keys = ["flagged_client_rounds"]
    if summary["attackers"] is not None:
        keys += ["honest_client_rounds_flagged", "longest_honest_streak", "precision", "recall",
                 "first_detection_round"]  # fmt: skip
        print(f"attackers that took part (results.json): {', '.join(summary['attackers'])}")
        if summary["attacked"] is not None:
            keys.insert(5, "recall_attacked")
            print(
                f"of them attacked in a round they took part in: {', '.join(summary['attacked'])}"
            )
    print()
    rows = [
        {"": k.replace("_", " "), **{side: summary[side][k] for side in ("recorded", "replayed")}}
        for k in keys
    ]
    print(format_table(rows, ("", "recorded", "replayed")))
    print()
    for label, key in (("flagged after the last round (replayed)", None),
                       ("newly flagged", "newly_flagged"),
                       ("no longer flagged", "no_longer_flagged")):  # fmt: skip
        clients = summary["replayed"]["flagged"] if key is None else summary[key]
        if key == "no_longer_flagged" and not associates:
            associated = set(summary["recorded_by_association"])
            clients = [f"{c} (by association in the run)" if c in associated else c
                       for c in clients]  # fmt: skip
        print(f"{label}: {', '.join(clients) or 'none'}")
    return 0


def _replay_runs(args: argparse.Namespace) -> int:
    """Several ledgers (a grid's runs) replayed under the same options: one row per ledger, the
    recorded and replayed attackers found and honest client-rounds flagged side by side, and
    their totals over the runs whose results.json names the attackers."""
    import os
    from pathlib import Path

    from fedwarden.report import detection_totals, honest_flags

    runs = []
    for path in args.ledger:
        summary = _replay_one(path, args)[0]
        runs.append({"ledger": path, **summary})
    judged = [r for r in runs if r["attackers"] is not None]
    total = {side: detection_totals([r[side] for r in judged]) for side in ("recorded", "replayed")}
    if args.format == "json":
        print(
            json.dumps({"runs": runs, "total": total, "runs_with_attackers": len(judged)}, indent=2)
        )
        return 0

    def found(d: dict) -> str:
        return f"{d['found']} of {d['attacked']}" if d.get("attacked") else "-"

    def cells(rec: dict, rep: dict, known: bool) -> list[str]:
        if not known:
            return ["-", "-", "-"]
        return [f"{found(rec)} -> {found(rep)}", f"{honest_flags(rec)} -> {honest_flags(rep)}",
                f"{rec['longest_honest_streak']} -> {rep['longest_honest_streak']}"]  # fmt: skip

    header = ("run", "flagged client-rounds", "attackers found", "honest client-rounds flagged",
              "longest honest streak")  # fmt: skip
    # each run named by where its ledger sits below the directory all of them share
    parents = [Path(r["ledger"]).resolve().parent for r in runs]
    shared = Path(os.path.commonpath(parents))
    rows = []
    for r, parent in zip(runs, parents):
        known = r["attackers"] is not None
        sides = [detection_totals([r[side]]) if known else {} for side in ("recorded", "replayed")]
        rows.append(dict(zip(header, [
            str(parent.relative_to(shared)) if parent != shared else parent.name,
            f"{r['recorded']['flagged_client_rounds']} -> {r['replayed']['flagged_client_rounds']}",
            *cells(*sides, known),
        ])))  # fmt: skip
    rows.append(dict(zip(header, [
        f"total ({len(judged)} of {len(runs)} runs name their attackers)",
        f"{sum(r['recorded']['flagged_client_rounds'] for r in runs)} -> "
        f"{sum(r['replayed']['flagged_client_rounds'] for r in runs)}",
        *cells(total["recorded"], total["replayed"], bool(judged)),
    ])))  # fmt: skip
    settings = runs[0]["settings"]
    given = [f"{flag} {value}" for flag, value in (
        ("--trust-false-positive-rate", args.trust_false_positive_rate),
        ("--trust-evidence-rounds", args.trust_evidence_rounds),
        ("--trust-association-z", args.trust_association_z),
        ("--anomaly-weights", None if args.anomaly_weights is None
         else json.dumps(args.anomaly_weights)),
    ) if value is not None]  # fmt: skip
    print(
        f"{len(runs)} ledgers, {f'rounds 1-{args.rounds}' if args.rounds else 'every round'} "
        "replayed at "
        f"{', '.join(given) or 'their own settings'} (settings not given: each run's "
        f"results.json, else the defaults; first run's flag line {settings['flag_line']:.2f}); "
        "recorded -> replayed"
    )  # fmt: skip
    print()
    print(format_table(rows, header))
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
