"""Benchmark: fedwarden's robust rules against Flower's ``flwr.server.strategy.aggregate``.

Usage::

    python bench/aggregators.py --clients 50 --dim 1000000 --json runs/bench-aggregators.json
    python bench/aggregators.py --clients 10,50,200 --dim 1e5,1e6,1e7 --json runs/grid.json

Both sides aggregate the same float32 matrix (K x D standard normal rows, seeded), in the same
run: the matrix is saved once as ``.npy``; fedwarden is timed in this process, Flower in a worker
process (in Flower's venv) that loads the same file and times one call per request, so the two
sides alternate run by run and see the same machine load. For each rule the JSON records
``fedwarden_s`` and ``flower_s`` (best of ``--repeat`` / ``--flower-repeat`` runs; Flower's Bulyan
runs once), ``ratio = flower_s / fedwarden_s``, ``max_abs_diff`` between the two outputs, the
target ratio (issue 19: median and trimmed mean >= 5x, Krum and Multi-Krum >= 20x, Bulyan >=
40x), ``floor_ratio = fedwarden_s / memory_floor_s`` (median and trimmed mean: <= 10x), where the
memory floor is one read of the matrix, which no rule can beat, and ``kernel``, the path that
computed the rule (``numba``, ``numpy-sort`` or ``numpy-partition`` for order statistics, ``blas``
for the Gram-matrix rules). Flower has no geometric median: that row has only fedwarden's time.

Lists of ``--clients`` and ``--dim`` run every combination, each matrix at most
``--max-matrix-gb`` (larger ones are skipped and listed as such); Flower's Bulyan, whose cost
grows as K^3 d in Python loops, runs only up to ``--flower-bulyan-max`` values (K x D).

The JSON also records the CPU: its model, the vector extensions it reports, the numpy dispatch
targets enabled in this process (``NPY_DISABLE_CPU_FEATURES`` turns some off), OpenBLAS's kernel
(``OPENBLAS_CORETYPE``), numba's target (``NUMBA_CPU_NAME``) and ``FEDWARDEN_KERNEL``. On a
shared machine the ratios move with the load (recorded with every run); run it more than once.

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
TARGETS = {"median": 5.0, "trimmed_mean": 5.0, "krum": 20.0, "multi_krum": 20.0, "bulyan": 40.0}
FLOOR_TARGETS = {"median": 10.0, "trimmed_mean": 10.0}  # at most this many reads of the matrix
ENVIRONMENT = (
    "FEDWARDEN_KERNEL",
    "NPY_DISABLE_CPU_FEATURES",
    "OPENBLAS_CORETYPE",
    "NUMBA_CPU_NAME",
)
ORDER_RULES = ("median", "trimmed_mean", "bulyan")  # the rest run on BLAS (one Gram matrix)


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
    floor_s: float,
) -> dict:
    """Times one rule, alternating fedwarden and Flower runs so both see the same machine load.

    The first fedwarden call is timed apart (``first_call_s``: it includes loading or compiling
    the numba kernels) and not counted in the best time.
    """
    from fedwarden.aggregation._kernels import order_kernel

    k, d = x.shape
    start = time.perf_counter()
    out = step(x, weights, step.init())
    first_call_s = time.perf_counter() - start
    fedwarden_s, flower_s = float("inf"), None
    flower_runs = 1 if rule == "bulyan" else args.flower_repeat
    if flower is None or rule not in flower.info["rules"]:
        flower_runs = 0
    if rule == "bulyan" and k * d > args.flower_bulyan_max:
        flower_runs = 0
    for i in range(max(args.repeat, flower_runs)):
        if i < args.repeat:
            seconds, out = best_time(lambda: step(x, weights, step.init()), 1)
            fedwarden_s = min(fedwarden_s, seconds)
        if i < flower_runs:
            seconds = flower.time(rule)
            flower_s = seconds if flower_s is None else min(flower_s, seconds)
    rows = k - 2 * getattr(step, "num_byzantine", 0) if rule == "bulyan" else k
    row = {
        "kernel": order_kernel(rows, x.dtype) if rule in ORDER_RULES else "blas",
        "fedwarden_s": fedwarden_s,
        "first_call_s": first_call_s,
        "flower_s": flower_s,
        "ratio": None,
        "max_abs_diff": None,
        "target_ratio": TARGETS.get(rule),
        "floor_ratio": fedwarden_s / floor_s,
        "target_floor_ratio": FLOOR_TARGETS.get(rule),
        "load_average": os.getloadavg(),
    }
    if flower_s is not None:
        row["ratio"] = flower_s / fedwarden_s
        row["max_abs_diff"] = float(np.max(np.abs(flower.output(rule) - out.updates[0])))
    met = []
    if row["ratio"] is not None and row["target_ratio"] is not None:
        met.append(row["ratio"] >= row["target_ratio"])
    if row["target_floor_ratio"] is not None:
        met.append(row["floor_ratio"] <= row["target_floor_ratio"])
    if met:
        row["meets_target"] = all(met)
    shown = "" if flower_s is None else f", flower {flower_s:.3f} s"
    print(f"  {rule}: fedwarden {fedwarden_s:.3f} s{shown}", flush=True)
    return row


def _numbers(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def cpu_report() -> dict[str, Any]:
    """The CPU's model and vector extensions, and what numpy, OpenBLAS and numba make of them."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                if key.strip() in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    vector = sorted(
        f for f in flags if f.startswith(("avx", "sse4", "fma", "asimd", "sve", "neon", "amx"))
    )
    try:
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy >= 2
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    report: dict[str, Any] = {
        "model": model,
        "cpus": os.cpu_count(),
        "vector_extensions": vector,
        "numpy_dispatch_enabled": [f for f in __cpu_dispatch__ if __cpu_features__.get(f)],
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
    }
    try:
        from threadpoolctl import threadpool_info

        report["blas"] = [
            {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ]
    except ImportError:
        pass
    try:
        import numba

        report["numba"] = {"version": numba.__version__, "target": numba.config.CPU_NAME}
        if report["numba"]["target"] is None:
            import llvmlite.binding as llvm

            report["numba"]["target"] = llvm.get_host_cpu_name()
    except ImportError:
        pass
    return report


def run_size(
    k: int, dim: int, rules: list[str], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Every rule on one seeded K x D float32 matrix, fedwarden against Flower."""
    f = k // 10 if args.byzantine is None else args.byzantine
    steps = fedwarden_steps(rules, f, args.trim_fraction)
    usable = {}
    for rule, step in steps.items():
        try:
            step.check(k)
            usable[rule] = step
        except Exception as error:  # noqa: BLE001 - a rule the cohort cannot run is reported
            print(f"  {rule}: skipped ({error})")
    x = np.random.default_rng(args.seed).standard_normal((k, dim), dtype=np.float32)
    weights = np.ones(k)
    floor_s, _ = best_time(lambda: x.sum(), max(3, args.repeat))
    load_before = os.getloadavg()
    print(
        f"K={k} D={dim} float32 ({x.nbytes / 1e9:.2f} GB), f={f}, trim_fraction="
        f"{args.trim_fraction}; load {load_before[0]:.1f}; memory floor {floor_s:.4f} s",
        flush=True,
    )
    flower = None
    if not args.no_flower:
        python = ensure_flower_venv(args.flower_venv)
        matrix = tmp / "updates.npy"
        np.save(matrix, x)
        flower = FlowerClient(python, matrix, tmp, f, args.trim_fraction)
    results: dict[str, dict] = {}
    try:
        for rule, step in usable.items():
            results[rule] = run_rule(rule, step, x, weights, flower, args, floor_s)
    finally:
        if flower is not None:
            flower.close()
            for leftover in tmp.iterdir():
                leftover.unlink()
    return {
        "clients": k,
        "dim": dim,
        "dtype": "float32",
        "byzantine": f,
        "trim_fraction": args.trim_fraction,
        "seed": args.seed,
        "memory_floor_s": floor_s,
        "flower_version": flower.info["flower_version"] if flower else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }


def print_table(run: dict[str, Any]) -> None:
    print(
        f"\nK={run['clients']} D={run['dim']}  (load {run['load_average_before'][0]:.1f} -> "
        f"{run['load_average_after'][0]:.1f}, floor {run['memory_floor_s']:.4f} s)"
    )
    print(
        f"{'rule':<18}{'kernel':>16}{'fedwarden s':>12}{'flower s':>10}{'ratio':>8}{'target':>8}"
        f"{'x floor':>9}{'max |diff|':>11}"
    )
    for rule, row in run["results"].items():
        theirs = "-" if row["flower_s"] is None else f"{row['flower_s']:.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        target = "-" if row["target_ratio"] is None else f">={row['target_ratio']:.0f}x"
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        print(
            f"{rule:<18}{row['kernel']:>16}{row['fedwarden_s']:>12.4f}{theirs:>10}{ratio:>8}"
            f"{target:>8}{row['floor_ratio']:>8.1f}x{diff:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="50", help="K, rows of the matrix; a comma list runs each")
    p.add_argument(
        "--dim", default="1000000", help="D, columns; a comma list (1e6 works) runs each"
    )
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
    p.add_argument("--max-matrix-gb", type=float, default=4.0, help="skip larger K x D matrices")
    p.add_argument(
        "--flower-bulyan-max",
        type=float,
        default=5e7,
        help="largest K x D on which Flower's Bulyan runs (minutes beyond K=50, D=1e6)",
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

    if args.flower_worker:
        k = _numbers(args.clients)[0]
        byzantine = k // 10 if args.byzantine is None else args.byzantine
        flower_worker(*args.flower_worker, byzantine, args.trim_fraction)
        return 0

    report: dict[str, Any] = {
        "numpy": np.__version__,
        "cpu": cpu_report(),
        "runs": [],
        "skipped": [],
    }
    print(json.dumps(report["cpu"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="fedwarden-bench-") as tmp:
        for k in _numbers(args.clients):
            for dim in _numbers(args.dim):
                gb = k * dim * 4 / 1e9
                if gb > args.max_matrix_gb:
                    print(f"K={k} D={dim}: skipped, {gb:.1f} GB > --max-matrix-gb")
                    report["skipped"].append({"clients": k, "dim": dim, "matrix_gb": gb})
                    continue
                report["runs"].append(run_size(k, dim, rules, args, Path(tmp)))
                print_table(report["runs"][-1])
                if args.json:  # after every size: a long grid leaves what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(report, indent=2))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
