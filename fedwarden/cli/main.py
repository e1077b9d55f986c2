"""The ``fedwarden`` command: simulate, compare, serve, agent, data, trust.

Every subcommand's ``--help`` explains every option. Bad input ends with one line naming the
problem and exit code 2, never a traceback.
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

from fedwarden.config import (  # noqa: E402
    DATASETS,
    DP_MODES,
    ENGINES,
    PARTITIONS,
    QUARANTINE_POLICIES,
    SERVER_OPTIMIZERS,
    RunConfig,
    load_toml,
    make_config,
)
from fedwarden.errors import UsageError  # noqa: E402

RUN_OPTIONS: list[tuple[str, Any, str]] = [
    (
        "dataset",
        str,
        f"dataset: {', '.join(DATASETS)}, or a .npz file with arrays x, y (default digits)",
    ),
    (
        "data-dir",
        str,
        "directory of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)",
    ),
    (
        "model",
        str,
        "user model as package.module:function(input_shape, num_classes) -> keras.Model",
    ),
    ("partition", str, f"how data is split among clients: {', '.join(PARTITIONS)} (default iid)"),
    (
        "alpha",
        float,
        "Dirichlet concentration for --partition dirichlet; smaller is more skewed (0.5)",
    ),
    ("shards-per-client", int, "label shards per client for --partition shards (2)"),
    ("clients", int, "number of clients (20)"),
    ("clients-per-round", int, "clients sampled each round (20)"),
    ("rounds", int, "federated rounds (20)"),
    ("local-epochs", int, "local epochs per round (2)"),
    ("batch-size", int, "local batch size (16)"),
    ("lr", float, "client learning rate, SGD (0.2)"),
    ("server-optimizer", str, f"server optimizer: {', '.join(SERVER_OPTIMIZERS)} (fedavg)"),
    ("server-lr", float, "server learning rate (1.0)"),
    ("server-momentum", float, "momentum for fedavgm (0.9)"),
    ("attack", str, "attack name, or package.module:callable (none); see `fedwarden attacks`"),
    ("malicious-fraction", float, "fraction of clients that are malicious (0.2)"),
    ("attack-start-round", int, "first round in which attackers attack (1)"),
    (
        "aggregator",
        str,
        "aggregation chain, e.g. mean, median, trimmed_mean:trim_fraction=0.2, "
        "clip:max_norm=5+median, krum:num_byzantine=2, or package.module:callable",
    ),
    (
        "num-byzantine",
        int,
        "f assumed by krum, multi_krum, bulyan (default: expected attackers per round)",
    ),
    ("trust-decay", float, "weight of history in the trust score's moving average (0.7)"),
    ("trust-flag-below", float, "flag a client whose trust falls below this (0.55)"),
    ("trust-unflag-above", float, "unflag once trust rises above this; hysteresis (0.7)"),
    ("quarantine", str, f"what flagged clients get: {', '.join(QUARANTINE_POLICIES)} (none)"),
    ("quarantine-downweight", float, "weight multiplier under --quarantine downweight (0.1)"),
    (
        "probation-rounds",
        int,
        "rounds an excluded client waits before it may earn its way back (3)",
    ),
    ("dp", str, f"server-side differential privacy: {', '.join(DP_MODES)} (none)"),
    ("dp-clip", float, "DP-FedAvg: L2 clip of each client update (1.0)"),
    ("dp-noise-multiplier", float, "DP noise multiplier, central or DP-SGD"),
    ("dp-target-quantile", float, "adaptive clip: target quantile of update norms (0.5)"),
    ("dp-delta", float, "delta for epsilon reports (default 1/n^1.1)"),
    ("target-epsilon", float, "solve for the noise multiplier that meets this epsilon"),
    ("dp-accountant", str, "rdp or pld (rdp)"),
    ("dp-l2-clip", float, "DP-SGD per-example L2 clip (1.0)"),
    ("dp-microbatches", int, "DP-SGD microbatches; must divide --batch-size"),
    ("engine", str, f"client training engine: {', '.join(ENGINES)} (native)"),
    ("seed", int, "random seed; same seed, same results (0)"),
    ("metrics-port", int, "serve Prometheus /metrics on this port while running"),
]
FLAGS = [
    ("collude", "attackers share one crafted update"),
    ("dp-adaptive-clip", "adapt the DP clip norm to --dp-target-quantile (Andrew et al. 2021)"),
    ("dp-sgd", "train clients with DP-SGD (tensorflow-privacy)"),
]


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with the same keys as these flags; flags win")
    for name, kind, text in RUN_OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    for name, text in FLAGS:
        parser.add_argument(f"--{name}", action="store_true", default=None, help=text)
    parser.add_argument(
        "--attack-param",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="attack parameter (repeatable), e.g. --attack-param boost=10",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    file_values = load_toml(args.config) if args.config else {}
    flags = {
        name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in RUN_OPTIONS
    }
    flags.update(
        {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in FLAGS}
    )
    if args.attack_param:
        from fedwarden.attacks import parse_attack_params

        flags["attack_params"] = {
            **file_values.get("attack_params", {}),
            **parse_attack_params(args.attack_param),
        }
    if args.no_progress:
        flags["progress"] = False
    if getattr(args, "out", None):
        flags["out"] = args.out
    flags.update(overrides)
    return make_config(file_values, flags)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedwarden.simulations.runner import simulate

    config = config_from_args(args)
    results = simulate(config, resume=args.resume)
    print(summary_table(results))
    print_privacy(results["final"].get("privacy"))
    print(
        f"results in {config.out}/ (results.json, rounds.csv, accuracy.png, trust.png, ledger.sqlite)"
    )
    return 0


def summary_table(results: dict) -> str:
    """The end-of-run table: accuracy, attack success, detection, the least trusted clients."""
    from fedwarden.simulations.report import fmt, markdown_table

    final, det = results["final"], results["final"]["detection"]
    rows = [
        ["test accuracy", fmt(final["accuracy"])],
        ["test loss", fmt(final["loss"])],
        ["attack success rate", fmt(final["attack_success_rate"])],
        ["detection precision / recall", f"{fmt(det['precision'])} / {fmt(det['recall'])}"],
        ["first detection (round)", fmt(det["first_detection_round"])],
    ]
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


def cmd_compare(args: argparse.Namespace) -> int:
    from fedwarden.simulations.compare import compare

    attacks = [a for a in args.attacks.split(",") if a]
    aggregators = [a for a in args.aggregators.split(",") if a]
    if not attacks or not aggregators:
        raise UsageError("--attacks and --aggregators each need at least one name")
    base = config_from_args(args, attack=next((a for a in attacks if a != "none"), "none"))
    table = compare(base, attacks, aggregators, Path(args.out or "runs/compare"))
    print(table)
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


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedwarden", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected update")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "simulate",
        help="run one federated simulation",
        description="Run many clients on this machine, with attacks and defences. "
        "With no options: digits, 20 clients, 20 rounds, no attack, mean.",
    )
    add_run_options(p)
    p.add_argument("--out", help="output directory (runs/latest)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (after a crash, or "
        "with a larger --rounds)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "compare",
        help="run every attack against every aggregator",
        description="Runs each (attack, aggregator) pair on the same data split and "
        "seed, plus a clean baseline; writes matrix.json/.md/.png.",
    )
    add_run_options(p)
    p.add_argument("--attacks", required=True, help="comma-separated attack names")
    p.add_argument("--aggregators", required=True, help="comma-separated aggregator chains")
    p.add_argument("--out", help="output directory (runs/compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("attacks", help="list the built-in attacks with their default parameters")
    p.set_defaults(func=cmd_attacks)

    from fedwarden.cli import agent, data, serve, trust

    trust.add_trust_parser(sub)
    serve.add_parser(sub)
    agent.add_parser(sub)
    data.add_parser(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from fedwarden.aggregation.base import AggregationError
    from fedwarden.attacks import AttackError

    errors: list[type[BaseException]] = [UsageError, AggregationError, AttackError]
    try:
        from fedwarden.aggregation.accounting import DPConfigError

        errors.append(DPConfigError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except user_errors() as exc:
        print(f"fedwarden {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
