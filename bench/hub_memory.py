"""Benchmark: private memory of a ``fedwarden serve`` round whose updates arrive over the wire.

Usage::

    python bench/hub_memory.py --clients 200 --dim 1000000 --budget-mb 256 --threads 4

For each setting (without a budget, then with ``--budget-mb``), a fresh subprocess builds what
``fedwarden serve`` builds around a round: the hub, the gRPC servicer and a coordinator with the
``--chain`` chain (median by default) and that ``round_memory_budget``. It registers ``--clients``
agents, publishes a round the way ``HubTransport`` does (with the coordinator's ``open_round``
intake under a budget) and uploads one float32 update of ``--dim`` parameters per agent from
``--threads`` threads, each calling the servicer's ``SubmitUpdate`` with a chunk stream as a
gRPC worker thread does (no sockets; each thread encodes its update just before sending it);
then ``collect`` and ``finish_round``. It reports, in MB, the largest ``RssAnon``
(``/proc/self/status``: private memory, not the page cache holding a spilled matrix) sampled
every 10 ms above the process's before the uploads: ``uploads_mb`` while the updates arrive,
``round_mb`` over the whole round (uploads, aggregation, scoring, trust), after a tiny round
that loads the compiled kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_round(
    clients: int, dim: int, budget_mb: float | None, threads: int, chain: str
) -> dict[str, Any]:
    """One hub round in this process; call it in a fresh process so the peaks are this round's."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from memory import AnonPeak, _anon_mb

    from fedwarden.aggregation.chain import parse_chain
    from fedwarden.protocol.convert import TrainingSpec
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.protocol.transfer import CHUNK_SIZE, encode_vector, sha256_hex, split
    from fedwarden.server.admission import ClientUpdate
    from fedwarden.server.auth import Authenticator
    from fedwarden.server.coordinator import Coordinator
    from fedwarden.server.hub import Hub
    from fedwarden.server.optimizers import ServerOptimizer
    from fedwarden.server.service import FederationServicer
    from fedwarden.server.trust import TrustBook, TrustPolicy
    from tests.deploy_helpers import FakeContext, FakeLedger

    ids = [f"c{i:04d}" for i in range(clients)]
    tokens = {cid: secrets.token_hex(16) for cid in ids}
    spec = TrainingSpec(None, "digits", (8, 8, 1), 10, ((dim,),), 0.1, 16, 1)
    hub = Hub(1)
    servicer = FederationServicer(
        hub, Authenticator(tokens), spec, FakeLedger(), max_update_bytes=dim * 8,
        max_calls_per_client=1, registrations_per_minute=None,
    )  # fmt: skip
    sessions = {
        cid: servicer.Register(pb.RegisterRequest(client_id=cid), FakeContext(tok)).session_id
        for cid, tok in tokens.items()
    }
    spill = tempfile.TemporaryDirectory(prefix="fedwarden-spill-")
    coordinator = Coordinator(
        np.zeros(dim, np.float32),
        parse_chain(chain),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
        round_memory_budget=None if budget_mb is None else budget_mb * 2**20,
        spill_dir=spill.name,
    )
    intake = coordinator.open_round(1, ids) if budget_mb is not None else None
    task = hub.publish(1, 0, ids, b"", "", intake=intake)

    def upload(i: int) -> None:
        cid = ids[i]
        payload = encode_vector(np.random.default_rng([0, i]).standard_normal(dim, np.float32))

        def chunks():
            yield pb.UpdateChunk(header=pb.UpdateHeader(
                session_id=sessions[cid], task_id=task.task_id, round=1, num_examples=100,
                loss=0.5, dtype="float32", total_size=len(payload)))  # fmt: skip
            for seq, data in split(payload, CHUNK_SIZE):
                yield pb.UpdateChunk(chunk=pb.Chunk(seq=seq, data=data))
            yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256_hex(payload)))

        servicer.SubmitUpdate(chunks(), FakeContext(tokens[cid]))

    # numba loads the compiled kernels once per process (about 110 MB): a tiny round first
    tiny = Coordinator(np.zeros(64, np.float32), parse_chain(chain), ServerOptimizer("fedavg", 1.0),
                       TrustBook(TrustPolicy()))  # fmt: skip
    rng = np.random.default_rng(1)
    tiny.finish_round(1, ids, [ClientUpdate(c, 1, rng.standard_normal(64), 100) for c in ids])
    before = _anon_mb()
    start = time.perf_counter()
    with AnonPeak() as whole:
        with AnonPeak() as uploads, ThreadPoolExecutor(threads) as pool:
            list(pool.map(upload, range(clients)))
        uploads_s = time.perf_counter() - start
        updates, complete = hub.collect(clients, deadline=time.monotonic() + 60)
        outcome = coordinator.finish_round(1, ids, intake if intake is not None else updates)
    seconds = time.perf_counter() - start
    spill.cleanup()
    assert complete and len(outcome.admitted) == clients, outcome.rejected[:3]
    return {
        "clients": clients,
        "dim": dim,
        "chain": chain,
        "budget_mb": budget_mb,
        "threads": threads,
        "matrix_mb": clients * dim * 4 / 2**20,
        "update_mb": dim * 4 / 2**20,
        "uploads_mb": uploads.peak - before,
        "round_mb": whole.peak - before,
        "uploads_s": uploads_s,
        "round_s": seconds,
        "weights_sha256": hashlib.sha256(coordinator.weights.tobytes()).hexdigest(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--threads", type=int, default=4, help="upload threads (gRPC workers)")
    parser.add_argument("--chain", default="median")
    parser.add_argument(
        "--bounded-only",
        action="store_true",
        help="skip the run without a budget (K x d x 8 bytes)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        budget = None if args.worker == "none" else float(args.worker)
        print(json.dumps(run_round(args.clients, args.dim, budget, args.threads, args.chain)))
        return 0
    print(
        f"K={args.clients}, d={args.dim:,} float32: update matrix "
        f"{args.clients * args.dim * 4 / 2**20:.0f} MB; {args.threads} upload threads; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    results = []
    for budget in ([] if args.bounded_only else ["none"]) + [str(args.budget_mb)]:
        cmd = [sys.executable, __file__, "--worker", budget, "--clients", str(args.clients),
               "--dim", str(args.dim), "--threads", str(args.threads), "--chain", args.chain]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"budget {budget:>6} MB: uploads {r['uploads_mb']:7.0f} MB, whole round "
            f"{r['round_mb']:7.0f} MB of RssAnon above the start; {r['round_s']:.0f} s, "
            f"load {r['load_average'][0]:.1f}"
        )
    if len(results) == 2:
        same = results[0]["weights_sha256"] == results[1]["weights_sha256"]
        print(f"same weights with and without the budget: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
