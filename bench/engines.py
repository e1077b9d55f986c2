"""Benchmark: cost per round of the native and the TFF engine on the same workload.

Usage::

    python bench/engines.py --rounds 12 --repeat 2 --json runs/bench-engines.json

The workload is the TFF acceptance scenario: digits, 10 clients all sampled each round, 20%
gaussian attackers, median, 2 local epochs of batch 16 (the defaults), seed 0. Each engine runs
``--repeat`` times, alternating native and tff so both see the same machine load. Per run it
records the wall time, the setup (wall time minus the rounds: data, model and, for TFF, tracing
the computation), the first round (TFF starts its worker process and loads the computation
there) and the median of the later rounds, the steady cost per round. A round is everything the
runner times: local training, attacks, admission, aggregation, scoring, trust, evaluation.
The JSON keeps every run and the final accuracies; the best run per engine is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedwarden.config import make_config
from simulations.runner import simulate


def run_once(engine: str, rounds: int, out: Path) -> dict:
    config = make_config(
        {},
        {
            "dataset": "digits",
            "clients": 10,
            "clients_per_round": 10,
            "rounds": rounds,
            "attack": "gaussian",
            "malicious_fraction": 0.2,
            "aggregator": "median",
            "seed": 0,
            "engine": engine,
            "progress": False,
            "out": str(out),
        },
    )
    start = time.perf_counter()
    results = simulate(config)
    wall = time.perf_counter() - start
    durations = [r["duration_s"] for r in results["rounds"]]
    return {
        "engine": engine,
        "wall_s": wall,
        "setup_s": wall - sum(durations),
        "first_round_s": durations[0],
        "round_s": statistics.median(durations[1:]),
        "accuracy": results["final"]["accuracy"],
        "detection": results["final"]["detection"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for engine in ("native", "tff"):
                runs.append(run_once(engine, args.rounds, Path(tmp) / f"{engine}{i}"))
    best = {
        e: min((r for r in runs if r["engine"] == e), key=lambda r: r["round_s"])
        for e in ("native", "tff")
    }
    print(
        f"{'engine':8} {'round_s':>8} {'first_s':>8} {'setup_s':>8} {'wall_s':>8} {'accuracy':>8}"
    )
    for e, r in best.items():
        print(
            f"{e:8} {r['round_s']:8.3f} {r['first_round_s']:8.3f} {r['setup_s']:8.2f} "
            f"{r['wall_s']:8.2f} {r['accuracy']:8.4f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        args.json.write_text(json.dumps({"runs": runs, "best": best, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
