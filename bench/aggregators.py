"""Benchmark: fedwarden's robust rules against Flower's ``flwr.server.strategy.aggregate``.

Usage::

    python bench/aggregators.py --clients 50 --dim 1000000 --json runs/bench-aggregators.json

Both sides aggregate the same float32 matrix (K x D standard normal rows, seeded), in the same
run: the matrix is saved once as ``.npy``; fedwarden is timed in this process, Flower in a
subprocess that loads the same file and writes its timings and outputs back. For each rule the
JSON records ``fedwarden_s`` and ``flower_s`` (best of ``--repeat`` / ``--flower-repeat`` runs;
Flower's Bulyan runs once), ``ratio = flower_s / fedwarden_s``, ``max_abs_diff`` between the two
outputs and the target ratio (median and trimmed mean >= 3x, Krum and Multi-Krum >= 15x). It also
prints the time of one read of the matrix, the memory floor no rule can beat. Flower has no
geometric median: that row has only fedwarden's time.

Flower runs from a separate venv, ``bench/.flwr-venv``, which this script creates on first use
(``python -m venv``, then ``pip install flwr==1.12.0 numpy==<this numpy>``), so the product's
lock stays free of Flower and both sides use the same numpy. Flower 1.12.0 is pinned because it
is the newest release whose requirements accept the product's pinned stack, protobuf 4.25 (TF 2.14
needs protobuf<5) and numpy 1.25 (TFF 0.87 needs numpy~=1.25): it asks ``protobuf>=4.25.2,<5`` and
``numpy>=1.21,<2``, while 1.13.1 and 1.14.0 ask ``numpy>=1.26``. ``--no-flower`` times fedwarden
alone.

Flower's inputs are ``[([row], 1) for row in X]`` (every client with one example, so its weighted
Multi-Krum average is the uniform one fedwarden computes). Its Bulyan runs Krum's double Python
loop once per selected client, so expect 20 s to a minute for it at K=50, D=1e6.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLOWER_VERSION = "1.12.0"
FLOWER_VENV = ROOT / "bench" / ".flwr-venv"
RULES = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median")
TARGETS = {"median": 3.0, "trimmed_mean": 3.0, "krum": 15.0, "multi_krum": 15.0}


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---------------------------------------------------------------- Flower side (runs in its venv)


def flower_worker(
    matrix_path: str,
    out_dir: str,
    rules: list[str],
    byzantine: int,
    trim_fraction: float,
    repeat: int,
) -> None:
    """Times Flower's functions on the saved matrix; writes timings.json and one .npy per rule."""
    import flwr
    from flwr.server.strategy import aggregate as fa

    x = np.load(matrix_path)
    k = len(x)
    results = [([row], 1) for row in x]
    calls = {
        "median": lambda: fa.aggregate_median(results),
        "trimmed_mean": lambda: fa.aggregate_trimmed_avg(results, trim_fraction),
        "krum": lambda: fa.aggregate_krum(results, byzantine, 0),
        "multi_krum": lambda: fa.aggregate_krum(results, byzantine, k - byzantine),
        # aggregate_bulyan pops from the list it is given: hand it a copy every time
        "bulyan": lambda: fa.aggregate_bulyan(
            list(results), byzantine, fa.aggregate_krum, to_keep=0
        ),
    }
    timings = {}
    for rule in rules:
        if rule not in calls:
            continue
        seconds, out = best_time(calls[rule], 1 if rule == "bulyan" else repeat)
        timings[rule] = seconds
        np.save(Path(out_dir) / f"{rule}.npy", np.asarray(out[0]).reshape(-1))
        print(f"  flower {rule}: {seconds:.3f} s", flush=True)
    info = {"flower_version": flwr.__version__, "numpy": np.__version__, "timings": timings}
    (Path(out_dir) / "timings.json").write_text(json.dumps(info))


def ensure_flower_venv(venv: Path) -> Path:
    """Creates ``venv`` with Flower and this process's numpy unless it already has them."""
    python = venv / "bin" / "python"
    check = f"import flwr, numpy; assert flwr.__version__ == '{FLOWER_VERSION}'"
    check += f" and numpy.__version__ == '{np.__version__}'"
    if (
        python.exists()
        and subprocess.run([python, "-c", check], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating {venv} with flwr=={FLOWER_VERSION} numpy=={np.__version__} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            f"flwr=={FLOWER_VERSION}",
            f"numpy=={np.__version__}",
        ],
        check=True,
    )
    return python


# ---------------------------------------------------------------- fedwarden side


def fedwarden_steps(rules: list[str], byzantine: int, trim_fraction: float) -> dict:
    sys.path.insert(0, str(ROOT))
    import aggregation as agg

    builders = {
        "median": lambda: agg.median(),
        "trimmed_mean": lambda: agg.trimmed_mean(trim_fraction),
        "krum": lambda: agg.krum(byzantine),
        "multi_krum": lambda: agg.multi_krum(byzantine),
        "bulyan": lambda: agg.bulyan(byzantine),
        "geometric_median": lambda: agg.geometric_median(),
    }
    return {rule: builders[rule]() for rule in rules}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50, help="K, rows of the update matrix")
    p.add_argument("--dim", type=int, default=1_000_000, help="D, columns of the update matrix")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--byzantine",
        type=int,
        default=None,
        help="f for krum, multi_krum, bulyan (default: K // 10)",
    )
    p.add_argument("--trim-fraction", type=float, default=0.1)
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, from {RULES}")
    p.add_argument("--repeat", type=int, default=5, help="fedwarden runs per rule (best kept)")
    p.add_argument(
        "--flower-repeat",
        type=int,
        default=3,
        help="Flower runs per rule (best kept; Bulyan runs once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flower", action="store_true", help="time fedwarden only")
    p.add_argument("--flower-venv", type=Path, default=FLOWER_VENV)
    p.add_argument(
        "--flower-worker", nargs=2, metavar=("MATRIX", "OUT_DIR"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        p.error(f"unknown rules {unknown}; choose from {', '.join(RULES)}")
    k = args.clients
    f = k // 10 if args.byzantine is None else args.byzantine

    if args.flower_worker:
        flower_worker(*args.flower_worker, rules, f, args.trim_fraction, args.flower_repeat)
        return 0

    steps = fedwarden_steps(rules, f, args.trim_fraction)
    for step in steps.values():
        step.check(k)
    x = np.random.default_rng(args.seed).standard_normal((k, args.dim), dtype=np.float32)
    weights = np.ones(k)
    floor_s, _ = best_time(lambda: x.sum(), max(3, args.repeat))
    print(f"K={k} D={args.dim} float32, f={f}, trim_fraction={args.trim_fraction}")
    print(f"memory floor (one read of the {x.nbytes / 1e6:.0f} MB matrix): {floor_s:.4f} s")

    results: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    for rule, step in steps.items():
        seconds, out = best_time(lambda step=step: step(x, weights, step.init()), args.repeat)
        outputs[rule] = out.updates[0]
        results[rule] = {
            "fedwarden_s": seconds,
            "flower_s": None,
            "ratio": None,
            "max_abs_diff": None,
            "target_ratio": TARGETS.get(rule),
        }
        print(f"  fedwarden {rule}: {seconds:.3f} s", flush=True)

    flower_info: dict = {}
    if not args.no_flower:
        python = ensure_flower_venv(args.flower_venv)
        with tempfile.TemporaryDirectory(prefix="fedwarden-bench-") as tmp:
            matrix = Path(tmp) / "updates.npy"
            np.save(matrix, x)
            cmd = [
                str(python),
                str(Path(__file__).resolve()),
                "--flower-worker",
                str(matrix),
                tmp,
                "--clients",
                str(k),
                "--byzantine",
                str(f),
                "--rules",
                ",".join(rules),
                "--trim-fraction",
                str(args.trim_fraction),
                "--flower-repeat",
                str(args.flower_repeat),
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ""})
            flower_info = json.loads((Path(tmp) / "timings.json").read_text())
            for rule, seconds in flower_info["timings"].items():
                theirs = np.load(Path(tmp) / f"{rule}.npy")
                row = results[rule]
                row["flower_s"] = seconds
                row["ratio"] = seconds / row["fedwarden_s"]
                row["max_abs_diff"] = float(np.max(np.abs(theirs - outputs[rule])))
                if row["target_ratio"] is not None:
                    row["meets_target"] = row["ratio"] >= row["target_ratio"]

    from aggregation.rules import ORDER_KERNEL

    report = {
        "clients": k,
        "dim": args.dim,
        "dtype": "float32",
        "byzantine": f,
        "trim_fraction": args.trim_fraction,
        "seed": args.seed,
        "memory_floor_s": floor_s,
        "numpy": np.__version__,
        "order_kernel": ORDER_KERNEL,
        "flower_version": flower_info.get("flower_version"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "results": results,
    }
    print(
        f"\n{'rule':<18}{'fedwarden s':>12}{'flower s':>11}{'ratio':>9}{'target':>8}"
        f"{'max |diff|':>12}"
    )
    for rule, row in results.items():
        flower = "-" if row["flower_s"] is None else f"{row['flower_s']:.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        target = "-" if row["target_ratio"] is None else f">={row['target_ratio']:.0f}x"
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        print(f"{rule:<18}{row['fedwarden_s']:>12.3f}{flower:>11}{ratio:>9}{target:>8}{diff:>12}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
