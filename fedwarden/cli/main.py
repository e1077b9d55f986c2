"""The fedwarden command: simulate, compare, serve, agent, data, trust.

Every subcommand's ``--help`` lists its options by group (data, model and training; attack;
defence; trust; privacy; output), each default once. Settings come from ``fedwarden.config``
(the one place that declares and checks them) and are checked before TensorFlow is imported.
Every user error ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Hides CUDA plugin noise on CPU-only machines. Set, not defaulted: importing jax (via
# tensorflow) sets it to 1 in the parent environment, which child processes inherit.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("FEDWARDEN_TF_LOG_LEVEL", "3")
# gRPC's C core logs connection failures (a TLS handshake with a plaintext server) to stderr on
# its own lines; the error that follows names them, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from fedwarden.cli.settings import (  # noqa: E402
    add_settings,
    check_out_dir,
    check_port_free,
    config_from_args,
)
from fedwarden.config import FLAT, flag_name  # noqa: E402
from fedwarden.errors import UsageError  # noqa: E402

DESCRIPTION = (
    "Federated training of Keras models that holds up when some clients are poisoned: "
    "simulations with attacks and defences, a coordinator and agents for real deployments, "
    "and per-client trust scores."
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that say what to do instead."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{_hint(self.prog, message)}\n")


def _hint(prog: str, message: str) -> str:
    if "unrecognized arguments" not in message:
        return f" (see {prog} --help)"
    given = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
    known = {flag_name(f) for _, f in FLAT.values()} | {"--attack-param", "--no-progress"}
    elsewhere = [flag for flag in given if flag in known]
    if not elsewhere:
        return f" (see {prog} --help)"
    return (
        f"; {', '.join(elsewhere)} {'is a setting' if len(elsewhere) == 1 else 'are settings'} "
        f"{prog} does not use (see {prog} --help)"
    )


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("fedwarden")
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """``--version``, looked up only when asked (reading package metadata takes a while)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"fedwarden {version()}")
        parser.exit(0)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedwarden.simulations.preflight import check_run

    config = config_from_args(args)
    if args.ray_address and config.round_memory_budget is not None:
        raise UsageError(
            f"--round-memory-budget {config.round_memory_budget:g} cannot bound a round trained "
            "on Ray: the actors return the cohort's updates together. Received: --ray-address "
            f"{args.ray_address}; drop one of the two"
        )
    aggregator = check_run(config)
    check_port_free(config.metrics_port)
    check_out_dir(Path(config.out), resume=args.resume, rounds=config.rounds)
    from fedwarden.simulations.runner import simulate  # TensorFlow from here on

    if args.ray_address:
        from fedwarden.simulations.ray_cohort import simulate_on_ray

        results = simulate_on_ray(
            config, args.ray_address, args.resume, args.ray_actors, aggregator
        )
    else:
        results = simulate(config, resume=args.resume, aggregator=aggregator)
    print(summary_table(results))
    print_privacy(results["final"].get("privacy"))
    print(
        f"results in {config.out}/ (results.json, rounds.csv, accuracy.png, trust.png, ledger.sqlite)"
    )
    return 0


def summary_table(results: dict) -> str:
    """The end-of-run table: accuracy, attack success, detection, the least trusted clients."""
    from fedwarden.report import attackers_found, fmt, honest_flags, markdown_table

    final, det = results["final"], results["final"]["detection"]
    rows = [
        ["test accuracy", fmt(final["accuracy"])],
        ["test loss", fmt(final["loss"])],
        ["attack success rate", fmt(final["attack_success_rate"])],
        ["detection precision / recall", f"{fmt(det['precision'])} / {fmt(det['recall'])}"],
        ["first detection (round)", fmt(det["first_detection_round"])],
    ]
    if det.get("attacked"):  # on-off or held-back attackers, or some never sampled
        rows.append(
            ["recall, attackers that attacked", f"{fmt(det['recall_attacked'])} "
             f"({attackers_found(det)} of {det['attacked']})"]
        )  # fmt: skip
    if det.get("honest_client_rounds"):
        rows.append(
            ["honest client-rounds flagged", f"{honest_flags(det)}, longest streak "
             f"{det['longest_honest_streak']}"]
        )  # fmt: skip
    clients = results["clients"]
    scored = sorted(
        (c for c in clients if clients[c]["trust"] is not None), key=lambda c: clients[c]["trust"]
    )
    flagged = [c for c in scored if clients[c]["flagged"]]
    rows.append(["flagged clients", " ".join(flagged) or "-"])
    rows.append(
        [
            "least trusted",
            " ".join(
                f"{c} ({clients[c]['trust']:.2f}{', malicious' if clients[c]['malicious'] else ''})"
                for c in scored[:3]
            ),
        ]
    )
    return markdown_table(["after " + str(len(results["rounds"])) + " rounds", ""], rows)


COMPARE_SKIPS = frozenset({"attack", "aggregator", "metrics_port"})


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of distinct non-negative integers, in the order given."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise UsageError(
            f"--seeds must be comma-separated integers >= 0, e.g. 0,1,2. Received: {text!r}"
        )
    return list(dict.fromkeys(seeds))


def cmd_compare(args: argparse.Namespace) -> int:
    from fedwarden.simulations.preflight import cell_config, check_run

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    aggregators = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    if not attacks or not aggregators:
        raise UsageError(
            "--attacks and --aggregators each need at least one name. Received: "
            f"--attacks {args.attacks!r} --aggregators {args.aggregators!r}"
        )
    out = Path(args.out or "runs/compare")
    base = config_from_args(
        args, COMPARE_SKIPS, attack=next((a for a in attacks if a != "none"), "none"), out=str(out)
    )
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    for attack in attacks:
        for aggregator in aggregators:
            check_run(cell_config(base, attack, aggregator))
    check_out_dir(out)
    from fedwarden.simulations.compare import compare  # TensorFlow from here on

    ray = {"ray_address": args.ray_address, "cpus_per_run": args.ray_cpus_per_run}
    print(compare(base, attacks, aggregators, out, seeds=seeds, **ray))
    print()
    print((out / "detection.md").read_text(), end="")
    return 0


def print_privacy(privacy: dict | None) -> None:
    if not privacy:
        return
    central = privacy.get("central")
    if central:
        if central["target_epsilon"] is not None:
            print(
                f"noise multiplier {central['noise_multiplier']:.4g} solved for target epsilon "
                f"{central['target_epsilon']:g} over {central['rounds']} rounds"
            )
        kind = (
            "a formal guarantee (clip + mean + Gaussian noise, Poisson client sampling)"
            if central["formal_guarantee"]
            else "NOT a formal guarantee: noise after a robust rule has no bounded sensitivity"
        )
        print(
            f"central DP: epsilon {central['epsilon']:.3g} at delta {central['delta']:.3g}, {kind}"
        )
    client = privacy.get("client")
    if client:
        print(f"DP-SGD: worst client epsilon {client['epsilon']:.3g} (delta {client['delta']})")


def cmd_attacks(args: argparse.Namespace) -> int:
    from fedwarden.attacks import describe_attacks

    print("\n".join(describe_attacks()))
    print("or package.module:callable (see fedwarden/attacks.py for the plugin contract)")
    return 0


def add_ray_address(group: Any, purpose: str) -> None:
    """``--ray-address``: the same cluster address for ``simulate`` and ``compare``, which run
    different things there (``purpose``)."""
    group.add_argument(
        "--ray-address", metavar="ADDRESS",
        help=f"{purpose}: auto (the one `ray start` made on this machine), HOST:PORT of its "
        "head, or local (docs/scale.md)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedwarden",
        allow_abbrev=False,
        description=DESCRIPTION,
        epilog="`fedwarden COMMAND --help` lists each command's options.",
    )
    parser.add_argument("--version", action=VersionAction, help="show the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected update")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="run one federated simulation",
        description="Run many clients on this machine, with attacks and defences. "
        "With no options: digits, 20 clients, 20 rounds, no attack, mean.",
    )
    add_settings(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (after a crash, or "
        "with a larger --rounds)",
    )
    add_ray_address(p, "the Ray cluster whose actors train each round's clients (the coordinator "
                    "stays here)")  # fmt: skip
    p.add_argument(
        "--ray-actors", type=int, metavar="N",
        help="Ray actors holding the clients' data (default: one per CPU of the cluster)",
    )  # fmt: skip
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "compare",
        help="run every attack against every aggregator",
        description="Runs each (attack, aggregator) pair on the same data split and "
        "seed, plus a clean baseline; writes matrix.json, matrix.md, matrix.png and "
        "detection.md (each cell's precision, recall and honest client-rounds flagged), and "
        "each run's outputs under OUT/runs/.",
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--attacks", required=True, metavar="A,B,...",
        help="comma-separated attack names (see `fedwarden attacks`)",
    )  # fmt: skip
    g.add_argument(
        "--aggregators", required=True, metavar="CHAIN,CHAIN,...",
        help="comma-separated aggregation chains, e.g. mean,median,clip:max_norm=5+median",
    )  # fmt: skip
    g.add_argument(
        "--seeds", metavar="S,S,...",
        help="comma-separated seeds, e.g. 0,1,2: each cell reports the mean and standard "
        "deviation over them (default: --seed)",
    )  # fmt: skip
    add_ray_address(g, "the Ray cluster that runs each (attack, aggregator, seed) as a task")
    g.add_argument(
        "--ray-cpus-per-run", type=float, default=1.0, metavar="N",
        help="CPUs each Ray task asks for (default: 1)",
    )  # fmt: skip
    add_settings(p, COMPARE_SKIPS)
    p.set_defaults(func=cmd_compare, out=None)
    for action in p._actions:  # compare's own default output directory
        if action.dest == "out":
            action.help = "output directory (default: runs/compare)"

    p = sub.add_parser("attacks", help="list the built-in attacks with their default parameters")
    p.set_defaults(func=cmd_attacks)

    from fedwarden.cli import agent, data, serve, trust

    trust.add_trust_parser(sub)
    serve.add_parser(sub)
    agent.add_parser(sub)
    data.add_parser(sub)
    _strict(parser)
    return parser


def _strict(parser: argparse.ArgumentParser) -> None:
    """No abbreviated flags (``serve --clients`` must not mean --clients-per-round), and each
    subcommand's parser recorded, to report what it does not accept."""
    parser.allow_abbrev = False
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _strict(child)


# Errors that mean bad input, by the module that defines them: checked only once that module has
# been imported (whatever raised one imported it), so catching them loads nothing.
USER_ERRORS = (
    ("fedwarden.aggregation.base", "AggregationError"),
    ("fedwarden.attacks", "AttackError"),
    ("fedwarden.aggregation.accounting", "DPConfigError"),
)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UsageError):
        return True
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`fedwarden trust list ... | head`): nothing is wrong, and
        # nothing more can be written; keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:  # argparse exits (--help, --version, a bad flag): a return code for callers of main()
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's parser, which knows what it would ignore
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"fedwarden {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
