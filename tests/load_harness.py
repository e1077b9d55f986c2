"""Light agents and load runs against a real coordinator process (issue 9).

A ``LightAgent`` is the real ``fedwarden.clients.agent.Agent`` (registration, data validation, long polls,
heartbeats, chunked uploads, reconnects with backoff) with numpy softmax regression in place of
Keras, so one process can hold hundreds of agents. The coordinator is a real ``fedwarden serve``
process with the tiny model plugin (tests/tiny_model.py, 84 weights) on the synthetic dataset.

Measure a load run (what RELIABILITY.md reports)::

    .venv/bin/python -m tests.load_harness load --agents 200 --rounds 20 --json runs/load-200.json

``agent`` runs one light agent in this process (the fault tests start one that stalls in the
middle of its upload, to be killed there)::

    FEDWARDEN_TOKEN=... .venv/bin/python -m tests.load_harness agent --server 127.0.0.1:PORT \\
        --client-id c03 --data c03.npz --insecure --stall-upload
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedwarden.clients.agent import Agent, AgentError
from fedwarden.clients.training import LocalResult
from fedwarden.protocol.connection import Connection
from fedwarden.protocol.convert import TrainingSpec
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.transfer import sha256_hex, split
from tests.deploy_helpers import Proc

MODEL = "tests.tiny_model:linear"


class NumpyTrainer:
    """Softmax regression by full-batch gradient descent, on the tiny model's weight layout."""

    def __init__(self, spec: TrainingSpec):
        self.lr, self.epochs, self.classes = spec.learning_rate, spec.local_epochs, spec.num_classes

    def train(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> LocalResult:
        w, b = (a.astype(np.float64) for a in weights)
        x = x.reshape(len(x), -1)
        onehot = np.eye(self.classes)[y]
        loss = 0.0
        for _ in range(self.epochs):
            logits = x @ w + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
            grad = (p - onehot) / len(y)
            w, b = w - self.lr * (x.T @ grad), b - self.lr * grad.sum(0)
        delta = np.concatenate([(w - weights[0]).ravel(), (b - weights[1]).ravel()])
        return LocalResult(delta.astype(np.float32), loss, self.epochs, len(y))


class LightAgent(Agent):
    """The real agent with NumpyTrainer; ``stall_upload`` makes it stop in mid-upload."""

    def __init__(self, *args, stall_upload: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall_upload = stall_upload

    def _build_trainer(self, spec: TrainingSpec) -> NumpyTrainer:
        return NumpyTrainer(spec)

    def _update_stream(self, session_id, header, num_examples, loss, payload) -> Iterator:
        if not self.stall_upload:
            yield from super()._update_stream(session_id, header, num_examples, loss, payload)
            return
        stream = super()._update_stream(session_id, header, num_examples, loss, b"")
        first = next(stream)
        first.header.total_size = len(payload)
        yield first
        yield pb.UpdateChunk(chunk=pb.Chunk(seq=0, data=next(split(payload, 64))[1]))
        print(f"{self.client_id}: stalled mid-upload of round {header.round}", flush=True)
        time.sleep(3600)  # until killed
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256_hex(payload)))


def write_client_data(directory: Path, ids: list[str], seed: int = 0) -> dict[str, Path]:
    """The synthetic dataset's training split, shuffled and dealt out: one .npz per client."""
    from fedwarden.data.datasets import load_dataset

    data = load_dataset("synthetic", seed=seed)
    order = np.random.default_rng(seed).permutation(len(data.y_train))
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for cid, part in zip(ids, np.array_split(order, len(ids))):
        files[cid] = directory / f"{cid}.npz"
        np.savez(files[cid], x=data.x_train[part], y=data.y_train[part])
    return files


def write_tokens(path: Path, ids: list[str], operator: str | None = None) -> dict[str, str]:
    """A tokens file with a fresh random token per client (and operator); returns them."""
    tokens = {cid: secrets.token_hex(16) for cid in ids}
    lines = [f'{cid} = "{tok}"' for cid, tok in tokens.items()]
    if operator:
        tokens[operator] = secrets.token_hex(16)
        lines += ["", "[operators]", f'{operator} = "{tokens[operator]}"']
    path.write_text("\n".join(lines) + "\n")
    return tokens


def serve_args(
    state: Path, tokens: Path, rounds: int, min_clients: int, per_round: int, *extra: str
) -> list[str]:
    return ["serve", "--dataset", "synthetic", "--model", MODEL, "--seed", "0", "--lr", "0.5",
            "--local-epochs", "2", "--aggregator", "mean", "--rounds", str(rounds),
            "--min-clients", str(min_clients), "--clients-per-round", str(per_round),
            "--state-dir", str(state), "--tokens", str(tokens), "--port", "0",
            "--metrics-port", "0", *extra]  # fmt: skip


@dataclass
class AgentPool:
    """Light agents, one thread each, against one coordinator address."""

    address: str
    tokens: dict[str, str]
    files: dict[str, Path]
    options: dict = field(default_factory=dict)  # Agent keyword arguments
    tls_ca: str | None = None
    exit_codes: dict[str, int | str] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, ids: list[str]) -> None:
        for cid in ids:
            thread = threading.Thread(target=self._run, args=(cid,), name=f"agent-{cid}")
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def _run(self, cid: str) -> None:
        conn = Connection(
            self.address,
            client_id=cid,
            token=self.tokens[cid],
            tls_ca=self.tls_ca,
            insecure=self.tls_ca is None,
        )
        options = {"backoff_max_s": 1.0, "give_up_after_s": 300.0, **self.options}
        try:
            self.exit_codes[cid] = LightAgent(conn, str(self.files[cid]), **options).run()
        except AgentError as exc:
            self.exit_codes[cid] = f"refused: {exc}"
        except Exception as exc:  # reported by the test, not lost in a thread
            self.exit_codes[cid] = f"crashed: {type(exc).__name__}: {exc}"

    def join(self, timeout: float) -> dict[str, int | str]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return dict(self.exit_codes)


class Sampler:
    """Samples the coordinator's memory, threads and TCP connections every ``interval`` s."""

    def __init__(self, pid: int, port: int, interval: float = 0.5):
        import psutil

        self.process = psutil.Process(pid)
        self.port = port
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        import psutil

        while True:
            try:
                conns = self.process.net_connections(kind="tcp")
                self.samples.append(
                    {
                        "t": time.monotonic(),
                        "rss_mb": self.process.memory_info().rss / 2**20,
                        "threads": self.process.num_threads(),
                        "connections": sum(
                            c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
                            for c in conns
                        ),
                    }
                )
            except psutil.Error:
                return
            if self._stop.wait(interval):
                return

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def run_load(
    workdir: Path,
    agents: int,
    rounds: int,
    *,
    max_agents: int | None = None,
    round_timeout: float = 120,
    timeout: float = 1800,
) -> dict:
    """One coordinator, ``agents`` light agents, every agent in every round; the figures."""
    ids = [f"a{i:03d}" for i in range(agents)]
    files = write_client_data(workdir / "data", ids)
    tokens = write_tokens(workdir / "tokens.toml", ids)
    state = workdir / "state"
    args = serve_args(state, workdir / "tokens.toml", rounds, agents, agents, "--insecure",
                      "--max-agents", str(max_agents or agents), "--round-timeout", str(round_timeout))  # fmt: skip
    coordinator = Proc("coordinator", *args)
    try:
        port = int(coordinator.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 300).group(1))
        sampler = Sampler(coordinator.popen.pid, port)
        started = time.monotonic()
        pool = AgentPool(f"127.0.0.1:{port}", tokens, files)
        pool.start(ids)
        coordinator.wait_for(r"^round 1/", timeout)
        after_first = time.monotonic()
        coordinator.wait_for(rf"^round {rounds}/{rounds}", timeout)
        finished = time.monotonic()
        exits = pool.join(120)
        rc = coordinator.wait(120)
        samples = sampler.stop()
    finally:
        coordinator.stop()
    results = json.loads((state / "results.json").read_text())
    durations = np.array([r["duration_s"] for r in results["rounds"]])
    steady = [s for s in samples if after_first <= s["t"] <= finished] or samples
    return {
        "agents": agents,
        "rounds": [r["round"] for r in results["rounds"]],
        "admitted": [r["admitted"] for r in results["rounds"]],
        "accuracy": results["final"]["accuracy"],
        "coordinator_exit": rc,
        "agents_exit_0": sum(code == 0 for code in exits.values()),
        "agent_problems": sorted({str(c) for c in exits.values() if c != 0})[:5],
        "connections_held_max": max(s["connections"] for s in samples),
        "round_latency_s": {
            "p50": float(np.percentile(durations, 50)),
            "p99": float(np.percentile(durations, 99)),
            "max": float(durations.max()),
        },
        "coordinator_rss_mb": {
            "after_round_1": steady[0]["rss_mb"],
            "max": max(s["rss_mb"] for s in samples),
            "end": steady[-1]["rss_mb"],
        },
        "coordinator_threads_max": max(s["threads"] for s in samples),
        "wall_s_all_rounds": finished - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="measure one coordinator with N light agents")
    load.add_argument("--agents", type=int, default=200)
    load.add_argument("--rounds", type=int, default=20)
    load.add_argument("--workdir", default="runs/load")
    load.add_argument("--max-agents", type=int, help="the coordinator's --max-agents (--agents)")
    load.add_argument("--json", help="write the figures here too")
    agent = sub.add_parser("agent", help="run one light agent")
    agent.add_argument("--server", required=True)
    agent.add_argument("--client-id", required=True)
    agent.add_argument("--data", required=True)
    agent.add_argument("--insecure", action="store_true")
    agent.add_argument("--tls-ca")
    agent.add_argument("--stall-upload", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if args.command == "agent":
        import os

        logging.getLogger("fedwarden.agent").setLevel(logging.INFO)
        conn = Connection(args.server, client_id=args.client_id,
                          token=os.environ.get("FEDWARDEN_TOKEN"), tls_ca=args.tls_ca,
                          insecure=args.insecure)  # fmt: skip
        return LightAgent(conn, args.data, stall_upload=args.stall_upload).run()
    workdir = Path(args.workdir)
    figures = run_load(workdir, args.agents, args.rounds, max_agents=args.max_agents)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
