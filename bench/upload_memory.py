"""Benchmark: the coordinator's private memory while authenticated uploads hold their payloads.

Usage::

    python bench/upload_memory.py --uploads 32 --dim 1000000 --limits none,16,64

For each ``--limits`` entry (MB of ``--max-inflight-upload-mb``; ``none``: no bound), a fresh
coordinator subprocess serves the real servicer, hub and call guard on a loopback port, with
round 1 open for ``--uploads`` identities. Each identity uploads a float32 update of ``--dim``
weights, every chunk, and withholds the trailer: the hostile pattern of issue 16's leftover
(valid tokens, uploads kept open within the transfer-rate guard). Once every upload is refused
or has handed its last chunk to gRPC, the coordinator's ``RssAnon`` (``/proc/PID/status``,
private memory) is sampled for 2 s; the report gives the uploads held and refused and the peak
above the coordinator's memory before the uploads, in MB. Then the uploads are cut off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tokens(n: int) -> dict[str, str]:
    return {f"c{i:03d}": f"{i:032d}" for i in range(n)}


def anon_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/PID/status")


def coordinator(uploads: int, dim: int, limit_mb: float | None) -> None:
    """Serves until killed; prints its port."""
    sys.path.insert(0, str(ROOT))
    import grpc
    import numpy as np

    from fedwarden.protocol.convert import TrainingSpec
    from fedwarden.protocol.transfer import encode_vector, sha256_hex
    from fedwarden.server.auth import Authenticator
    from fedwarden.server.hub import Hub
    from fedwarden.server.service import CallGuard, CallLimits, FederationServicer, add_to_server

    ids = tokens(uploads)
    spec = TrainingSpec(None, "digits", (8, 8, 1), 10, ((dim,),), 0.1, 16, 1)
    hub = Hub(3)
    servicer = FederationServicer(
        hub, Authenticator(ids), spec, ledger=None, max_update_bytes=dim * 8,
        max_inflight_bytes=None if limit_mb is None else int(limit_mb * 2**20),
        registrations_per_minute=None,
    )  # fmt: skip
    guard = CallGuard(CallLimits(max_calls=3 * uploads + 8, max_streams=2 * uploads, stall_s=60))
    guard.start()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=3 * uploads + 10),
        options=[("grpc.max_receive_message_length", 8 << 20)],
    )
    add_to_server(servicer, server, guard)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    weights = encode_vector(np.zeros(dim, np.float32))
    hub.publish(1, 0, list(ids), weights, sha256_hex(weights))
    del weights
    print(port, flush=True)
    threading.Event().wait()


def attack(pid: int, port: int, uploads: int, dim: int) -> dict:
    """Opens the uploads against the coordinator ``pid`` listening on ``port``."""
    sys.path.insert(0, str(ROOT))
    import grpc
    import numpy as np

    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
    from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
    from fedwarden.protocol.transfer import split

    payload = np.full(dim, 0.01, np.float32).tobytes()
    release = threading.Event()
    before = anon_mb(pid)
    calls, sent, channels = [], [], []
    for cid, token in tokens(uploads).items():
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        channels.append(channel)
        stub = pb_grpc.FederationStub(channel)
        meta = (("authorization", f"Bearer {token}"),)
        session = stub.Register(pb.RegisterRequest(client_id=cid), metadata=meta).session_id
        task = list(stub.GetTask(pb.TaskRequest(session_id=session, wait_s=5), metadata=meta))
        done = threading.Event()
        sent.append(done)

        def stream(session=session, task_id=task[0].header.task_id, done=done):
            yield pb.UpdateChunk(header=pb.UpdateHeader(
                session_id=session, task_id=task_id, round=1, num_examples=1, dtype="float32",
                total_size=len(payload)))  # fmt: skip
            for seq, data in split(payload):
                yield pb.UpdateChunk(chunk=pb.Chunk(seq=seq, data=data))
            done.set()
            release.wait(120)  # the trailer never comes

        calls.append(stub.SubmitUpdate.future(stream(), metadata=meta, timeout=120))
    while not all(call.done() or done.is_set() for call, done in zip(calls, sent)):
        time.sleep(0.05)
    refused = [call for call in calls if call.done()]
    peak = anon_mb(pid)
    for _ in range(20):  # the coordinator may still be reading what was sent
        time.sleep(0.1)
        peak = max(peak, anon_mb(pid))
    codes = sorted({call.exception().code().name for call in refused if call.exception()})
    for call in calls:
        call.cancel()
    release.set()
    for channel in channels:
        channel.close()
    return {
        "held": uploads - len(refused),
        "refused": len(refused),
        "refusal_codes": codes,
        "declared_held_mb": round((uploads - len(refused)) * len(payload) / 2**20, 1),
        "peak_above_before_mb": round(peak - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument(
        "--limits", default="none,16,64", help="MB, comma-separated; none: no bound"
    )
    parser.add_argument("--serve", type=str, help=argparse.SUPPRESS)  # the subprocess's limit
    args = parser.parse_args()
    if args.serve is not None:
        coordinator(args.uploads, args.dim, None if args.serve == "none" else float(args.serve))
        return
    for limit in args.limits.split(","):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--uploads", str(args.uploads), "--dim", str(args.dim),
             "--serve", limit], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            port = int(proc.stdout.readline())
            row = {"limit_mb": limit, "uploads": args.uploads, "dim": args.dim}
            row.update(attack(proc.pid, port, args.uploads, args.dim))
            print(json.dumps(row), flush=True)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
