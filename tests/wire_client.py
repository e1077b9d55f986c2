"""A federation client written against ``fedwarden_v1.proto`` alone, for hostile-client tests.

The gRPC code is generated at test time from the ``.proto`` file (grpc_tools.protoc into a
directory the caller gives, usually a pytest tmp dir) and imported from there. Nothing here
imports the project: a test that drives a live ``fedwarden serve`` with this client holds the
wire contract, not the implementation (tests/test_wire.py checks that this module and the
generated code pull in no ``fedwarden`` module).

Unlike the real agent, the client sends whatever it is told: any dtype, any values, any
``num_examples`` (up to 2**64-1), a header and then nothing, chunks out of order, a wrong digest.

Example::

    wire = generate(Path("fedwarden/protocol/proto/fedwarden_v1.proto"), tmp_path)
    client = WireClient(wire, "127.0.0.1:50051", token="...")
    client.register("c03")
    task = client.wait_task(timeout=60)
    reply = client.submit(task, np.full(task.size, 1e300), dtype="float64")
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np

PROTO = Path(__file__).resolve().parents[1] / "fedwarden/protocol/proto/fedwarden_v1.proto"
WIRE_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int32": "<i4", "int64": "<i8"}
CHUNK = 1 << 20


@dataclass(frozen=True)
class Wire:
    """The generated modules: ``pb`` (messages) and ``pb_grpc`` (the Federation stub)."""

    pb: ModuleType
    pb_grpc: ModuleType


def generate(proto: Path, out_dir: Path) -> Wire:
    """Compiles ``proto`` with grpc_tools.protoc into ``out_dir`` and imports the result.

    The generated modules keep protoc's own names (``fedwarden_v1_pb2``, ``..._pb2_grpc``) and
    are imported from ``out_dir``; once imported in a process they are reused.

    Args:
      proto: the ``.proto`` file.
      out_dir: where protoc writes the Python code (created if missing).

    Returns:
      The generated message and service modules.
    """
    from grpc_tools import protoc

    stem = proto.stem
    if f"{stem}_pb2_grpc" not in sys.modules:
        out_dir.mkdir(parents=True, exist_ok=True)
        include = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}", proto.name]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        sys.path.insert(0, str(out_dir))
        try:
            importlib.invalidate_caches()
            importlib.import_module(f"{stem}_pb2")
            importlib.import_module(f"{stem}_pb2_grpc")
        finally:
            sys.path.remove(str(out_dir))
    return Wire(sys.modules[f"{stem}_pb2"], sys.modules[f"{stem}_pb2_grpc"])


@dataclass
class Task:
    """A task as the coordinator sent it: the header, the global weights and their layout."""

    header: object  # TaskHeader
    payload: bytes

    @property
    def round(self) -> int:
        return self.header.round

    @property
    def size(self) -> int:
        """Number of weights in the model."""
        return int(sum(int(np.prod(s.dims)) for s in self.header.spec.weight_shapes))

    def weights(self) -> np.ndarray:
        """The global model as one flat vector, in the spec's dtype."""
        return np.frombuffer(self.payload, WIRE_DTYPES[self.header.spec.dtype or "float32"])


def encode(values: np.ndarray | float, size: int, dtype: str) -> bytes:
    """``values`` (a vector, or one value repeated ``size`` times) as little-endian ``dtype``."""
    array = np.broadcast_to(np.asarray(values), (size,)) if np.ndim(values) == 0 else values
    return np.ascontiguousarray(np.ravel(array), WIRE_DTYPES[dtype]).tobytes()


class WireClient:
    """One identity talking to a coordinator over gRPC.

    Args:
      wire: the generated modules (``generate``).
      address: ``host:port``.
      token: the bearer token sent with every call (None: no ``authorization`` metadata).
      root_ca, cert, key: PEM bytes for TLS (``root_ca``) and mutual TLS (``cert``, ``key``);
        without ``root_ca`` the channel is plaintext.
      server_name: the name to check the server certificate against (TLS only).
    """

    def __init__(
        self,
        wire: Wire,
        address: str,
        token: str | None = None,
        *,
        root_ca: bytes | None = None,
        cert: bytes | None = None,
        key: bytes | None = None,
        server_name: str | None = None,
    ):
        self.wire, self.pb = wire, wire.pb
        # own subchannel pool: each client is its own TCP connection, like a separate agent
        options = [("grpc.use_local_subchannel_pool", 1)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_ca is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_ca, key, cert)
            self.channel = grpc.secure_channel(address, creds, options=options)
        self.stub = wire.pb_grpc.FederationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.session_id = ""
        self.spec = None
        self.last_task_id = ""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------------

    def register(self, client_id: str, num_examples: int = 0, timeout: float = 30):
        """Register; keeps the session id and the training spec. Returns the RegisterReply."""
        reply = self.stub.Register(
            self.pb.RegisterRequest(
                client_id=client_id, num_examples=num_examples, agent_version="wire-client"
            ),
            metadata=self.metadata,
            timeout=timeout,
        )
        self.session_id, self.spec = reply.session_id, reply.spec
        return reply

    def poll(self, wait_s: float = 5, timeout: float | None = None) -> Task:
        """One GetTask call: the header (TASK, NO_TASK or DONE) and, for a task, the weights."""
        chunks = self.stub.GetTask(
            self.pb.TaskRequest(
                session_id=self.session_id, last_task_id=self.last_task_id, wait_s=wait_s
            ),
            metadata=self.metadata,
            timeout=timeout if timeout is not None else wait_s + 30,
        )
        header, parts = None, []
        for chunk in chunks:
            if chunk.HasField("header"):
                header = chunk.header
            else:
                if chunk.chunk.seq != len(parts):
                    raise AssertionError(f"task chunk {chunk.chunk.seq} out of order")
                parts.append(chunk.chunk.data)
        payload = b"".join(parts)
        if header is None:
            raise AssertionError("GetTask ended without a header")
        if header.status == self.pb.TaskHeader.TASK:
            if hashlib.sha256(payload).hexdigest() != header.sha256:
                raise AssertionError("task payload does not match its sha256")
            self.last_task_id = header.task_id
        return Task(header, payload)

    def wait_task(self, timeout: float = 120, wait_s: float = 5) -> Task:
        """Polls until a TASK or DONE header comes (NO_TASK means poll again)."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.poll(wait_s=min(wait_s, max(deadline - time.monotonic(), 0.1)))
            if task.header.status != self.pb.TaskHeader.NO_TASK:
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"no task within {timeout} s")

    def update_messages(
        self,
        task: Task,
        values: np.ndarray | float | bytes,
        *,
        dtype: str = "float32",
        num_examples: int = 1,
        loss: float | None = 0.5,
        chunk_size: int = CHUNK,
        total_size: int | None = None,
        sha256: str | None = None,
        round: int | None = None,
        task_id: str | None = None,
    ) -> list:
        """The UpdateChunk messages of one upload, to send, cut short, reorder or corrupt.

        ``values`` is a vector, one value (repeated for every weight) or raw payload bytes.
        Every field of the header and trailer can be overridden.
        """
        payload = values if isinstance(values, bytes) else encode(values, task.size, dtype)
        header = self.pb.UpdateHeader(
            session_id=self.session_id,
            task_id=task.header.task_id if task_id is None else task_id,
            round=task.round if round is None else round,
            num_examples=num_examples,
            dtype=dtype,
            total_size=len(payload) if total_size is None else total_size,
        )
        if loss is not None:
            header.loss = loss
        msgs = [self.pb.UpdateChunk(header=header)]
        for seq, start in enumerate(range(0, max(len(payload), 1), chunk_size)):
            data = payload[start : start + chunk_size]
            msgs.append(self.pb.UpdateChunk(chunk=self.pb.Chunk(seq=seq, data=data)))
        digest = sha256 if sha256 is not None else hashlib.sha256(payload).hexdigest()
        msgs.append(self.pb.UpdateChunk(trailer=self.pb.UpdateTrailer(sha256=digest)))
        return msgs

    def send(self, messages: Iterable, timeout: float = 30):
        """SubmitUpdate with any message stream. Returns the SubmitReply (RpcError on abort)."""
        return self.stub.SubmitUpdate(iter(messages), metadata=self.metadata, timeout=timeout)

    def submit(self, task: Task, values: np.ndarray | float | bytes, timeout: float = 30, **kw):
        """Upload ``values`` for ``task`` (options as ``update_messages``); the SubmitReply."""
        return self.send(self.update_messages(task, values, **kw), timeout=timeout)

    def heartbeat(self, timeout: float = 10):
        return self.stub.Heartbeat(
            self.pb.HeartbeatRequest(session_id=self.session_id),
            metadata=self.metadata,
            timeout=timeout,
        )

    def trust(self, client_id: str = "", timeout: float = 10):
        """GetTrust: every client (lowest trust first), or one client with its round history."""
        return self.stub.GetTrust(
            self.pb.TrustRequest(client_id=client_id), metadata=self.metadata, timeout=timeout
        )


def held_open(messages: Iterable, release) -> Iterator:
    """Yields ``messages``, then keeps the stream open (sending nothing) until ``release`` (a
    threading.Event) is set: a slow or stalled uploader."""
    yield from messages
    release.wait()
