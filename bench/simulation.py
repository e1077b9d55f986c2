"""Benchmark: client updates per second of the native and the TFF engine on the same workload.

Usage::

    python bench/simulation.py --json runs/bench-simulation.json

The default workload: Fashion-MNIST (the Debian ``dataset-fashion-mnist`` files), the default CNN
(56,714 parameters), 100 clients with iid shares of 600 examples, 10 sampled per round, 2 local
epochs of batch 16, learning rate 0.2, coordinate-wise median, no attack, 10 rounds, seed 0. Both
engines train the same model from the same seed with the same batches, and the same code does
everything but local training (admission, aggregation, scoring, trust, evaluation on the 10,000
test images), so any difference in throughput is the engine's.

Every run happens in its own subprocess (``--repeat`` runs per engine, alternating native and
tff so both see the same machine load). The parent samples the resident memory of the whole
process tree (the run's Python process plus TFF's ``worker_binary`` children) every 50 ms and
records the peak of the sum. Per run the JSON records:

- ``round_s``: the median wall time of rounds 2..R (everything the runner times: training,
  aggregation, scoring, trust, evaluation, checkpoint), and ``updates_per_s`` = clients per
  round / ``round_s``; the first round (TFF starts its worker there) is kept apart as
  ``first_round_s``, and ``setup_s`` (data, model, tracing) is wall time minus all rounds;
- ``train_s`` and ``train_updates_per_s``: the same for local training alone;
- ``accuracy`` and ``loss`` after the last round, ``peak_rss_mb`` (process tree),
  ``python_maxrss_mb`` (the run's Python process alone, from ``getrusage``), load averages.

The best run per engine (lowest ``round_s``) goes in ``best``; ``ratio`` is native / tff of
``updates_per_s`` and of ``train_updates_per_s``, best against best and run by run (run i of
both engines ran back to back, under about the same load: the spread on a shared machine). ``bench/engines.py`` is the quick digits variant of the same benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = {
    "dataset": "fashion_mnist",
    "clients": 100,
    "clients_per_round": 10,
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "lr": 0.2,
    "aggregator": "median",
    "attack": "none",
    "seed": 0,
}


# ------------------------------------------------------------------ one run (in a subprocess)


class _TimedTrainer:
    """Delegates to a trainer and records the time of each round's local training."""

    def __init__(self, inner: Any, times: list[float]):
        self._inner, self._times = inner, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def train_cohort(self, *args: Any) -> Any:  # the runner trains each cohort with one call
        start = time.perf_counter()
        result = self._inner.train_cohort(*args)
        self._times.append(time.perf_counter() - start)
        return result


def run_engine(workload: dict[str, Any], engine: str, out: Path) -> dict[str, Any]:
    """Runs the workload on one engine in this process; timings, accuracy and own peak RSS."""
    import resource

    sys.path.insert(0, str(ROOT))
    from fedwarden.config import make_config
    from fedwarden.simulations.runner import Simulation

    start = time.perf_counter()
    config = make_config(
        {}, {**workload, "engine": engine, "progress": False, "out": str(out / engine)}
    )
    sim = Simulation(config)
    train_times: list[float] = []
    plain_trainer = sim.trainer

    def timed_trainer(c: Any) -> Any:
        trainer = plain_trainer(c)
        return _TimedTrainer(trainer, train_times) if c.engine == engine else trainer

    sim.trainer = timed_trainer  # type: ignore[method-assign]
    results = sim.run(config, Path(config.out))
    wall = time.perf_counter() - start
    rounds = [r["duration_s"] for r in results["rounds"]]
    steady = rounds[1:] or rounds
    per_round_train = statistics.median(train_times[1:] or train_times)
    k = workload["clients_per_round"]
    return {
        "engine": engine,
        "wall_s": wall,
        "setup_s": wall - sum(rounds),
        "first_round_s": rounds[0],
        "round_s": statistics.median(steady),
        "rounds_s": rounds,
        "updates_per_s": k / statistics.median(steady),
        "train_s": per_round_train,
        "train_updates_per_s": k / per_round_train,
        "accuracy": results["final"]["accuracy"],
        "loss": results["final"]["loss"],
        "python_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ------------------------------------------------------------------ the parent: runs and memory


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
    return total


def measure(workload: dict[str, Any], engine: str, tmp: Path) -> dict[str, Any]:
    """One run in a fresh subprocess, with the peak RSS of its process tree."""
    result_file = tmp / f"{engine}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--worker-result",
        str(result_file),
        "--workload",
        json.dumps(workload),
    ]
    load_before = os.getloadavg()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        tail = b"".join(stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{engine} run failed (exit {proc.returncode}):\n{tail}")
    run = json.loads(result_file.read_text())
    run.update(peak_rss_mb=peak / 2**20, load_before=load_before, load_after=os.getloadavg())
    return run


def summarize(runs: list[dict[str, Any]], engines: list[str]) -> dict[str, Any]:
    by_engine = {e: [r for r in runs if r["engine"] == e] for e in engines}
    best = {e: min(rs, key=lambda r: r["round_s"]) for e, rs in by_engine.items()}
    summary: dict[str, Any] = {"best": best, "spread": {}}
    for e, rs in by_engine.items():
        summary["spread"][e] = {
            key: [min(r[key] for r in rs), max(r[key] for r in rs)]
            for key in ("round_s", "updates_per_s", "train_updates_per_s", "peak_rss_mb")
        }
    if {"native", "tff"} <= set(engines):
        ratio = {}
        for key in ("updates_per_s", "train_updates_per_s"):
            # Run i of each engine ran back to back, under about the same load.
            pairs = [n[key] / t[key] for n, t in zip(by_engine["native"], by_engine["tff"])]
            ratio[key] = {
                "best": best["native"][key] / best["tff"][key],
                "paired": pairs,
            }
        summary["ratio"] = ratio
        summary["accuracy_diff"] = abs(best["native"]["accuracy"] - best["tff"]["accuracy"])
    return summary


def print_table(summary: dict[str, Any]) -> None:
    header = (
        f"{'engine':7} {'upd/s':>7} {'train upd/s':>11} {'round_s':>8} {'first_s':>8} "
        f"{'setup_s':>8} {'accuracy':>8} {'peak_rss':>9}"
    )
    print(header)
    for e, r in summary["best"].items():
        print(
            f"{e:7} {r['updates_per_s']:7.2f} {r['train_updates_per_s']:11.2f} "
            f"{r['round_s']:8.3f} {r['first_round_s']:8.3f} {r['setup_s']:8.2f} "
            f"{r['accuracy']:8.4f} {r['peak_rss_mb']:7.0f}MB"
        )
    if "ratio" in summary:
        ratio = summary["ratio"]
        for key, label in (("updates_per_s", "updates/s"), ("train_updates_per_s", "training")):
            paired = ", ".join(f"{p:.2f}" for p in ratio[key]["paired"])
            print(f"native/tff {label}: best {ratio[key]['best']:.2f}x; run by run {paired}")
        print(f"final accuracy difference {summary['accuracy_diff']:.4f}")


def parse_args(argv: list[str] | None, defaults: dict[str, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=defaults["dataset"])
    parser.add_argument("--clients", type=int, default=defaults["clients"])
    parser.add_argument("--clients-per-round", type=int, default=defaults["clients_per_round"])
    parser.add_argument("--rounds", type=int, default=defaults["rounds"])
    parser.add_argument("--local-epochs", type=int, default=defaults["local_epochs"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--aggregator", default=defaults["aggregator"])
    parser.add_argument("--attack", default=defaults["attack"])
    parser.add_argument("--malicious-fraction", type=float, default=None)
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--engines", default="native,tff", help="comma-separated: native,tff")
    parser.add_argument("--repeat", type=int, default=2, help="runs per engine (alternating)")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summary")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, defaults: dict[str, Any] = WORKLOAD) -> int:
    args = parse_args(argv, defaults)
    if args.worker:  # one run, in the subprocess the parent started
        with tempfile.TemporaryDirectory() as tmp:
            run = run_engine(json.loads(args.workload), args.worker, Path(tmp))
        args.worker_result.write_text(json.dumps(run))
        return 0
    workload = {key: getattr(args, key) for key in WORKLOAD}
    if args.malicious_fraction is not None:
        workload["malicious_fraction"] = args.malicious_fraction
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for engine in engines:
                run = measure(workload, engine, Path(tmp))
                print(
                    f"run {i + 1}/{args.repeat} {engine}: {run['updates_per_s']:.2f} updates/s, "
                    f"round {run['round_s']:.3f} s, accuracy {run['accuracy']:.4f}, "
                    f"peak {run['peak_rss_mb']:.0f} MB, load {run['load_before'][0]:.1f}",
                    flush=True,
                )
                runs.append(run)
    summary = summarize(runs, engines)
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        document = {"workload": workload, "machine": machine, "runs": runs, **summary}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
