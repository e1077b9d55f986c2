"""Benchmark: peak resident memory of one coordinator round with many large updates.

Usage::

    python bench/memory.py --clients 100 --dim 1000000 --json runs/bench-memory.json

For each aggregation chain, a fresh subprocess builds ``--clients`` float32 updates of ``--dim``
parameters (standard normal, seeded; the updates a transport would hand over), a ``Coordinator``
with that chain, and runs ``finish_round`` once: admission, the update matrix, the chain, the
per-client scores, trust, the server step. It reports, in MB:

- ``baseline_mb``: resident memory after the imports;
- ``inputs_mb``: what the updates themselves add (K x d x 4 bytes, the client results as received);
- ``peak_mb``: the process's peak resident memory (``getrusage``), the figure the 2 GB target is
  about; ``round_extra_mb`` = peak - resident before the round: what ``finish_round`` adds;
- ``matrix_mb`` (K x d x 4) and ``round_copies``: ``round_extra_mb / matrix_mb``, the number of
  update-matrix-sized buffers the round holds at its peak (the stacked matrix is one);
- ``kernel_load_s``: loading what a process's first round needs (the compiled kernels,
  HDBSCAN), once per process; a coordinator starts it on a thread when it is built, so in a run
  it overlaps the first round's training; the bench waits for it before timing the rounds;
- ``round_s``: the wall time of the first ``finish_round``; with ``--rounds N`` > 1,
  ``warm_round_s`` is the best of the next N - 1 rounds on the same coordinator (same updates,
  new round numbers), the time a round takes in a running server, and ``kernel`` the
  order-statistic path that ran.

``phases_s`` breaks the reported round's wall time down (the best warm round, else the first;
seconds, each phase without the timed phases it calls, ``other`` the rest): admission's checks
(``Admission.check``), copying the updates into the matrix (``UpdateMatrix.append``), the
order-statistics pass (median and trimmed counts, ``_kernels``), the rest of the chain, the Gram
matrix, the rest of ``client_metrics``, the history sketch (``_kernels.count_sketch``) and trust.
``--phases`` prints each as seconds and as a multiple of ``floor_s``.

The run imports numpy and the round's modules only, so the figures are the round's;
``--with-tensorflow`` imports TensorFlow first, as a simulation or ``fedwarden serve`` process
does, and so shows the resident memory such a process reaches.

Every line also gives what the figures need to be compared across machines and loads: the CPU's
vector extensions (``cpu``), the order-statistic kernel that ran, the load average, and
``floor_s``, one read of a K x d float32 matrix timed in the same process just before the round
(``np.sum(axis=0)`` over up to 100 rows, scaled to K), so that ``round_s / floor_s`` stays
meaningful on a busy machine.

``--stream`` hands ``finish_round`` a generator that builds each update when the coordinator
asks for it (so the updates are never all in memory), and ``--budget-mb MB`` sets the
coordinator's ``round_memory_budget``: a larger matrix is spilled to a memory-mapped file in a
temporary directory. The private memory is then what counts: ``peak_anon_mb`` is the largest
``RssAnon`` (``/proc/self/status``: anonymous pages, not the page cache that holds the spilled
file) seen by a thread sampling it every 10 ms during the round, and ``anon_extra_mb`` the same
above the resident anonymous memory before the round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHAINS = ("median", "trimmed_mean", "multi_krum", "clip:max_norm=1000+median")
TARGET_MB = 2048


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Largest ``RssAnon`` seen by a thread that samples it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, _anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _anon_mb())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())


def cpu_extensions() -> str:
    """The CPU's widest vector extensions as numpy sees them (``AVX512F AVX2``, ``AVX2``, ...)."""
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    names = ("AVX512F", "AVX512_SKX", "AVX2", "FMA3", "ASIMD", "SVE")
    return " ".join(n for n in names if features.get(n)) or "none of " + ",".join(names)


def memory_floor(clients: int, dim: int, seed: int) -> float:
    """Seconds for one read of a (clients, dim) float32 matrix (up to 100 rows timed, scaled)."""
    import numpy as np

    rows = min(clients, 100)
    sample = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sample.sum(axis=0)
        best = min(best, time.perf_counter() - start)
    del sample
    return best * clients / rows


# Phase: the functions whose calls it times, "module:Class.attribute" (timing wraps them).
PHASES = {
    "admission": ["fedwarden.server.admission:Admission.check"],
    "copy": ["fedwarden.server.update_matrix:UpdateMatrix.append"],
    "order_pass": [
        "fedwarden.aggregation._kernels:median_and_trimmed_counts",
        "fedwarden.aggregation._kernels:median",
        "fedwarden.aggregation._kernels:trimmed_mean",
        "fedwarden.aggregation._kernels:trimmed_counts",
    ],
    "chain_rest": ["fedwarden.server.coordinator:Coordinator._aggregate"],
    "gram": ["fedwarden.aggregation._kernels:gram", "fedwarden.aggregation.rules:gram"],
    "metrics_rest": ["fedwarden.server.coordinator:client_metrics"],
    "sketch": ["fedwarden.aggregation._kernels:count_sketch"],
    "trust": ["fedwarden.server.trust:TrustBook.update"],
}


class PhaseTimer:
    """Exclusive wall time per phase: a call's time minus that of the timed calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name in PHASES}
        self._inner: list[float] = []  # time of timed calls inside each running timed call

    def wrap(self, phase: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[phase] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    def install(self) -> None:
        """Wraps every function of ``PHASES`` where its callers look it up."""
        import importlib

        for phase, targets in PHASES.items():
            for target in targets:
                module_name, _, path = target.partition(":")
                owner: Any = importlib.import_module(module_name)
                *parents, name = path.split(".")
                for parent in parents:
                    owner = getattr(owner, parent)
                setattr(owner, name, self.wrap(phase, getattr(owner, name)))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def run_chain(
    chain: str,
    clients: int,
    dim: int,
    byzantine: int,
    seed: int,
    with_tensorflow: bool = False,
    rounds: int = 1,
    stream: bool = False,
    budget_mb: float | None = None,
) -> dict[str, Any]:
    """One round in this process; call it in a fresh process so the peak is this round's."""
    sys.path.insert(0, str(ROOT))
    if with_tensorflow:
        import tensorflow as tf

        tf.constant(0.0)  # starts the runtime, as any simulation does
    import numpy as np

    from fedwarden.aggregation import warm_up
    from fedwarden.aggregation.chain import parse_chain
    from fedwarden.server.admission import ClientUpdate
    from fedwarden.server.coordinator import Coordinator
    from fedwarden.server.optimizers import ServerOptimizer
    from fedwarden.server.trust import TrustBook, TrustPolicy

    baseline = _rss_mb()
    ids = [f"c{i:03d}" for i in range(clients)]

    def generate(number: int):  # one update at a time, the same ones every round
        for i, cid in enumerate(ids):
            rng = np.random.default_rng([seed, i])
            yield ClientUpdate(
                cid, number, rng.standard_normal(dim, dtype=np.float32), 100, float(rng.random())
            )

    held = None if stream else list(generate(1))
    start = time.perf_counter()
    warm_up(background=False)
    kernel_load = time.perf_counter() - start
    spill = tempfile.TemporaryDirectory(prefix="fedwarden-spill-")
    coordinator = Coordinator(
        np.zeros(dim, np.float32),
        parse_chain(chain, num_byzantine_default=byzantine),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
        round_memory_budget=None if budget_mb is None else budget_mb * 2**20,
        spill_dir=spill.name,
    )

    def updates(number: int):
        if held is None:
            return generate(number)
        return [ClientUpdate(u.client_id, number, u.delta, u.num_examples, u.loss) for u in held]

    phases = PhaseTimer()
    phases.install()
    floor = memory_floor(clients, dim, seed)
    before, anon_before = _rss_mb(), _anon_mb()
    with AnonPeak() as anon:
        start = time.perf_counter()
        outcome = coordinator.finish_round(1, ids, updates(1))
        seconds = time.perf_counter() - start
        warm = []
        breakdown = dict(phases.seconds, other=seconds - sum(phases.seconds.values()))
        for number in range(2, rounds + 1):
            batch = updates(number)
            phases.reset()
            start = time.perf_counter()
            coordinator.finish_round(number, ids, batch)
            warm.append(time.perf_counter() - start)
            if warm[-1] == min(warm):  # the phases of the round warm_round_s reports
                breakdown = dict(phases.seconds, other=warm[-1] - sum(phases.seconds.values()))
    spill.cleanup()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from fedwarden.aggregation._kernels import order_kernel

    matrix_mb = clients * dim * 4 / 2**20
    return {
        "chain": chain,
        "admitted": len(outcome.admitted),
        "baseline_mb": baseline,
        "inputs_mb": before - baseline,
        "peak_mb": peak,
        "round_extra_mb": peak - before,
        "matrix_mb": matrix_mb,
        "round_copies": (peak - before) / matrix_mb,
        "kernel_load_s": kernel_load,
        "round_s": seconds,
        "warm_round_s": min(warm) if warm else None,
        "kernel": order_kernel(clients),
        "cpu": cpu_extensions(),
        "floor_s": floor,
        "phases_s": breakdown,
        "peak_anon_mb": anon.peak,
        "anon_extra_mb": anon.peak - anon_before,
        "stream": stream,
        "budget_mb": budget_mb,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--byzantine", type=int, default=10, help="f for multi_krum")
    parser.add_argument("--chains", default=",".join(CHAINS), help="comma-separated chain specs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds per chain; the first is timed apart"
    )
    parser.add_argument(
        "--with-tensorflow",
        action="store_true",
        help="import TensorFlow first (a simulation's RSS)",
    )
    parser.add_argument(
        "--stream", action="store_true", help="hand over the updates one at a time (a generator)"
    )
    parser.add_argument(
        "--budget-mb", type=float, default=None, help="the coordinator's round_memory_budget"
    )
    parser.add_argument(
        "--phases", action="store_true", help="print the reported round's time per phase"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_chain(
            args.worker,
            args.clients,
            args.dim,
            args.byzantine,
            args.seed,
            args.with_tensorflow,
            args.rounds,
            args.stream,
            args.budget_mb,
        )
        print(json.dumps(result))
        return 0
    results = []
    print(
        f"K={args.clients}, d={args.dim:,} float32: update matrix "
        f"{args.clients * args.dim * 4 / 2**20:.0f} MB; load {os.getloadavg()[0]:.1f}"
        + ("; TensorFlow imported" if args.with_tensorflow else "")
        + ("; updates streamed" if args.stream else "")
        + ("" if args.budget_mb is None else f"; round memory budget {args.budget_mb:g} MB")
    )
    print(
        f"{'chain':28} {'peak_mb':>8} {'inputs':>7} {'round+':>7} {'copies':>6} {'anon_pk':>7}"
        f" {'anon+':>6} {'load_s':>6} {'round_s':>7} {'warm_s':>7} {'floor_s':>7} {'xfloor':>6} {'load':>5}"
        f"  kernel / cpu"
    )
    for chain in args.chains.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", chain]
        cmd += ["--clients", str(args.clients), "--dim", str(args.dim)]
        cmd += ["--byzantine", str(args.byzantine), "--seed", str(args.seed)]
        cmd += ["--rounds", str(args.rounds)]
        cmd += ["--with-tensorflow"] if args.with_tensorflow else []
        cmd += ["--stream"] if args.stream else []
        cmd += [] if args.budget_mb is None else ["--budget-mb", str(args.budget_mb)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        best = r["warm_round_s"] or r["round_s"]
        print(
            f"{chain:28} {r['peak_mb']:8.0f} {r['inputs_mb']:7.0f} {r['round_extra_mb']:7.0f} "
            f"{r['round_copies']:6.2f} {r['peak_anon_mb']:7.0f} {r['anon_extra_mb']:6.0f} "
            f"{r['kernel_load_s']:6.2f} {r['round_s']:7.2f} "
            + ("      -" if r["warm_round_s"] is None else f"{r['warm_round_s']:7.2f}")
            + f" {r['floor_s']:7.3f} {best / r['floor_s']:6.1f} {r['load_average'][0]:5.1f}"
            + f"  {r['kernel']} / {r['cpu']}"
        )
        if args.phases:
            floor = r["floor_s"]
            print(f"  {'round by phase':26} {'s':>7} {'xfloor':>7}")
            for name, value in r["phases_s"].items():
                print(f"  {name:26} {value:7.3f} {value / floor:7.1f}")
    # Spilled, the page cache holds the matrix: private (anonymous) memory is the figure.
    worst = max(r["peak_anon_mb"] if args.budget_mb else r["peak_mb"] for r in results)
    verdict = "under" if worst < TARGET_MB else "OVER"
    kind = "private (RssAnon)" if args.budget_mb else "resident"
    print(f"largest {kind} peak {worst:.0f} MB: {verdict} the {TARGET_MB} MB target")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "clients": args.clients,
            "dim": args.dim,
            "byzantine": args.byzantine,
            "with_tensorflow": args.with_tensorflow,
            "target_mb": TARGET_MB,
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "results": results,
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0 if worst < TARGET_MB else 2


if __name__ == "__main__":
    sys.exit(main())
