"""Benchmark: fedwarden's robust rules against Flower's ``flwr.server.strategy.aggregate``.

Usage::

    python bench/aggregators.py --clients 50 --dim 1000000 --json runs/bench-aggregators.json

Both sides aggregate the same float32 matrix (K x D standard normal rows, seeded), in the same
run: the matrix is saved once as ``.npy``; fedwarden is timed in this process, Flower in a worker
process (in Flower's venv) that loads the same file and times one call per request, so the two
sides alternate run by run and see the same machine load. For each rule the JSON records
``fedwarden_s`` and ``flower_s`` (best of ``--repeat`` / ``--flower-repeat`` runs; Flower's Bulyan
runs once), ``ratio = flower_s / fedwarden_s``, ``max_abs_diff`` between the two outputs and the
target ratio (median and trimmed mean >= 3x, Krum and Multi-Krum >= 15x). It also prints the time
of one read of the matrix, the memory floor no rule can beat. Flower has no geometric median: that
row has only fedwarden's time. On a shared machine the ratios move with the load (recorded in
the JSON); run it more than once.

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
from typing import Any

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

REPLY = "@@fedwarden-bench "  # marks the worker's replies among anything Flower prints


def flower_worker(matrix_path: str, out_dir: str, byzantine: int, trim_fraction: float) -> None:
    """Serves timing requests on stdin: one rule name per line, one timed run per request.

    Replies ``REPLY {"rule": ..., "seconds": ...}`` on stdout and saves the rule's output as
    ``OUT_DIR/<rule>.npy`` the first time.
    """
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
    print(
        REPLY + json.dumps({"flower_version": flwr.__version__, "rules": list(calls)}), flush=True
    )
    for line in sys.stdin:
        rule = line.strip()
        if rule == "quit":
            break
        seconds, out = best_time(calls[rule], 1)
        path = Path(out_dir) / f"{rule}.npy"
        if not path.exists():
            np.save(path, np.asarray(out[0]).reshape(-1))
        print(REPLY + json.dumps({"rule": rule, "seconds": seconds}), flush=True)


class FlowerClient:
    """The parent's end of a Flower worker process."""

    def __init__(self, python: Path, matrix: Path, out_dir: Path, byzantine: int, trim: float):
        cmd = [
            str(python),
            str(Path(__file__).resolve()),
            "--flower-worker",
            str(matrix),
            str(out_dir),
            "--byzantine",
            str(byzantine),
            "--trim-fraction",
            str(trim),
        ]
        self.out_dir = out_dir
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        self.info = self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"Flower worker exited with {self.process.wait()}")

    def time(self, rule: str) -> float:
        self.process.stdin.write(rule + "\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def output(self, rule: str) -> np.ndarray:
        return np.load(self.out_dir / f"{rule}.npy")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait()


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
    import fedwarden.aggregation as agg

    builders = {
        "median": lambda: agg.median(),
        "trimmed_mean": lambda: agg.trimmed_mean(trim_fraction),
        "krum": lambda: agg.krum(byzantine),
        "multi_krum": lambda: agg.multi_krum(byzantine),
        "bulyan": lambda: agg.bulyan(byzantine),
        "geometric_median": lambda: agg.geometric_median(),
    }
    return {rule: builders[rule]() for rule in rules}


def run_rule(
    rule: str,
    step: Any,
    x: np.ndarray,
    weights: np.ndarray,
    flower: FlowerClient | None,
    args: argparse.Namespace,
) -> dict:
    """Times one rule, alternating fedwarden and Flower runs so both see the same machine load."""
    fedwarden_s, flower_s, out = float("inf"), None, None
    flower_runs = 1 if rule == "bulyan" else args.flower_repeat
    if flower is None or rule not in flower.info["rules"]:
        flower_runs = 0
    for i in range(max(args.repeat, flower_runs)):
        if i < args.repeat:
            seconds, out = best_time(lambda: step(x, weights, step.init()), 1)
            fedwarden_s = min(fedwarden_s, seconds)
        if i < flower_runs:
            seconds = flower.time(rule)
            flower_s = seconds if flower_s is None else min(flower_s, seconds)
    row = {
        "fedwarden_s": fedwarden_s,
        "flower_s": flower_s,
        "ratio": None,
        "max_abs_diff": None,
        "target_ratio": TARGETS.get(rule),
    }
    if flower_s is not None:
        row["ratio"] = flower_s / fedwarden_s
        row["max_abs_diff"] = float(np.max(np.abs(flower.output(rule) - out.updates[0])))
        if row["target_ratio"] is not None:
            row["meets_target"] = row["ratio"] >= row["target_ratio"]
    shown = "" if flower_s is None else f", flower {flower_s:.3f} s"
    print(f"  {rule}: fedwarden {fedwarden_s:.3f} s{shown}", flush=True)
    return row


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
        flower_worker(*args.flower_worker, f, args.trim_fraction)
        return 0

    steps = fedwarden_steps(rules, f, args.trim_fraction)
    for step in steps.values():
        step.check(k)
    x = np.random.default_rng(args.seed).standard_normal((k, args.dim), dtype=np.float32)
    weights = np.ones(k)
    floor_s, _ = best_time(lambda: x.sum(), max(3, args.repeat))
    print(f"K={k} D={args.dim} float32, f={f}, trim_fraction={args.trim_fraction}")
    print(f"memory floor (one read of the {x.nbytes / 1e6:.0f} MB matrix): {floor_s:.4f} s")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="fedwarden-bench-") as tmp:
        flower = None
        if not args.no_flower:
            python = ensure_flower_venv(args.flower_venv)
            matrix = Path(tmp) / "updates.npy"
            np.save(matrix, x)
            flower = FlowerClient(python, matrix, Path(tmp), f, args.trim_fraction)
        results: dict[str, dict] = {}
        try:
            for rule, step in steps.items():
                results[rule] = run_rule(rule, step, x, weights, flower, args)
        finally:
            if flower is not None:
                flower.close()

    from fedwarden.aggregation.rules import ORDER_KERNEL

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
        "flower_version": flower.info["flower_version"] if flower else None,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": results,
    }
    print(
        f"\n{'rule':<18}{'fedwarden s':>12}{'flower s':>11}{'ratio':>9}{'target':>8}"
        f"{'max |diff|':>12}"
    )
    for rule, row in results.items():
        theirs = "-" if row["flower_s"] is None else f"{row['flower_s']:.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        target = "-" if row["target_ratio"] is None else f">={row['target_ratio']:.0f}x"
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        print(f"{rule:<18}{row['fedwarden_s']:>12.3f}{theirs:>11}{ratio:>9}{target:>8}{diff:>12}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
