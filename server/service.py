"""The gRPC servicer: translates ``fedwarden.v1`` messages to and from the hub, nothing more.

Every call is authenticated first (``server/auth.py``): the identity comes from the caller's
token or client certificate, so an agent can only ever act as itself; SubmitUpdate carries no
client id at all. Round logic lives in ``Coordinator``; sessions and the current task in ``Hub``.

Hostile or broken uploads are refused on arrival with a status that says why (a damaged or cut
stream, another client's session, bad credentials, an unknown dtype, too many concurrent calls)
and reported through ``on_rejected(client_id, reason, detail)`` with a reason of
``fedwarden.server.admission.ARRIVAL_REASONS``; an oversized update is not read and goes to admission as
``oversized``. One identity holds at most ``max_calls_per_client`` streaming calls at once, so a
client cannot take every worker thread away from the others.

Uploads in progress hold at most ``max_inflight_bytes`` together: each reserves its declared
size when its header arrives and gives it back when it ends, however it ends (handed to the hub,
refused, cut off, cancelled, or an exception). One that would pass the bound is refused at once
with RESOURCE_EXHAUSTED (reason ``upload_memory``), its payload unread; agents retry with backoff.

Every call runs under a :class:`CallGuard` when the servicer is added to a server with
:func:`add_to_server`: the number of calls in progress is capped overall and for streaming calls
(so Register and Heartbeat always find a worker), every call has a deadline, and a call that
waits on its client must move at least ``min_rate`` bytes a second and never stall for
``stall_s``: a stream that sends a header and then nothing is cancelled and refused as
``too_slow``. Unary methods are registered as client-streaming handlers that read their one
request under the guard, because gRPC reads a unary request on a worker thread before the
handler runs, where no deadline can reach it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np

from fedwarden.protocol.convert import TrainingSpec, spec_to_proto, trust_to_proto
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
from fedwarden.protocol.transfer import (
    CHUNK_SIZE,
    VECTOR_DTYPES,
    Assembler,
    TransferError,
    decode_vector,
    split,
)
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.auth import Authenticator, AuthError, Identity, fingerprint
from fedwarden.server.hub import Hub, Task, UnknownSession
from fedwarden.server.ledger import Ledger

log = logging.getLogger("fedwarden.serve")

MAX_WAIT_S = 30.0
SERVICE = "fedwarden.v1.Federation"


@dataclass(frozen=True)
class CallLimits:
    """What one call may take.

    Args:
        max_calls: calls in progress at once, every kind and identity together; more are
            refused with RESOURCE_EXHAUSTED. Size the worker pool to this.
        max_streams: streaming calls (GetTask, SubmitUpdate) in progress at once; below
            ``max_calls`` so that short unary calls always find a worker.
        stall_s: longest a call may wait on its client without a byte moving.
        min_rate: bytes per second a transfer must average: a transfer of ``n`` bytes gets
            ``stall_s + n / min_rate`` seconds.
    """

    max_calls: int = 200
    max_streams: int = 128
    stall_s: float = 10.0
    min_rate: float = 64 * 1024

    def __post_init__(self) -> None:
        if not 0 < self.max_streams < self.max_calls:
            raise ValueError(
                "CallLimits needs 0 < max_streams < max_calls (unary calls need workers of "
                f"their own). Received: max_streams={self.max_streams}, "
                f"max_calls={self.max_calls}."
            )
        if self.stall_s <= 0 or self.min_rate <= 0:
            raise ValueError(
                "CallLimits needs stall_s > 0 and min_rate > 0. Received: "
                f"stall_s={self.stall_s}, min_rate={self.min_rate}."
            )


class TooSlow(grpc.RpcError):
    """The guard cancelled the call: past its deadline or below the minimum transfer rate."""


class _Call:
    __slots__ = ("context", "stream", "deadline", "waiting", "last_progress", "expired")

    def __init__(self, context: grpc.ServicerContext, stream: bool, now: float, stall_s: float):
        self.context = context
        self.stream = stream
        self.deadline = now + stall_s  # until the call says what it expects
        self.waiting = True  # on the client (reading its messages or sending to it)
        self.last_progress = now
        self.expired = ""  # why the guard cancelled it


class CallGuard:
    """Caps, deadlines and the minimum transfer rate of every call, enforced by one watchdog
    thread that cancels calls past their deadline or stalled on their client.

    Args:
        limits: the caps and rates.
        clock: monotonic seconds.
        tick_s: how often the watchdog looks.
    """

    def __init__(
        self,
        limits: CallLimits = CallLimits(),
        *,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.25,
    ):
        self.limits = limits
        self.clock = clock
        self.tick_s = tick_s
        self.cancelled = 0
        self._calls: set[_Call] = set()
        self._streams = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="fedwarden-calls", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def in_progress(self) -> tuple[int, int]:
        """``(calls, streaming calls)`` in progress."""
        with self._lock:
            return len(self._calls), self._streams

    @contextmanager
    def call(
        self,
        context: grpc.ServicerContext,
        stream: bool,
        on_full: Callable[[str], None] = lambda detail: None,
    ) -> Iterator[_Call]:
        """Holds a call slot for the duration of a call; when none is free, calls
        ``on_full(detail)`` and aborts with RESOURCE_EXHAUSTED."""
        limits = self.limits
        with self._lock:
            full = len(self._calls) >= limits.max_calls
            full_streams = stream and self._streams >= limits.max_streams
            if not (full or full_streams):
                call = _Call(context, stream, self.clock(), limits.stall_s)
                self._calls.add(call)
                self._streams += stream
        if full or full_streams:
            what = (
                f"{limits.max_streams} streaming calls"
                if full_streams
                else (f"{limits.max_calls} calls")
            )
            detail = f"the coordinator is serving {what}, its limit; retry with backoff"
            on_full(detail)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
        try:
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)
                self._streams -= stream

    def expect(self, call: _Call, nbytes: int, server_wait_s: float = 0.0) -> None:
        """The call's deadline from now: ``server_wait_s`` (the coordinator holding it, e.g. a
        long poll) plus ``nbytes`` at the minimum rate, plus ``stall_s``."""
        now = self.clock()
        call.last_progress = now
        call.deadline = (
            now + server_wait_s + self.limits.stall_s + max(nbytes, 0) / self.limits.min_rate
        )

    def progress(self, call: _Call) -> None:
        call.last_progress = self.clock()

    def _watch(self) -> None:
        while not self._stop.wait(self.tick_s):
            now = self.clock()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                if call.expired:
                    continue
                if now > call.deadline:
                    call.expired = "past its deadline (too slow for the minimum transfer rate)"
                elif call.waiting and now - call.last_progress > self.limits.stall_s:
                    call.expired = (
                        f"stalled: nothing received or sent for {self.limits.stall_s:g} s"
                    )
                else:
                    continue
                self.cancelled += 1
                call.context.cancel()


def _guarded_requests(
    guard: CallGuard, call: _Call, requests: Iterator, expect: Callable[[object], int | None]
) -> Iterator:
    """The client's messages, each one counted as progress; ``expect(msg)`` may name the bytes
    that are still to come (an update header's size) to set the call's deadline."""
    while True:
        call.waiting = True
        try:
            msg = next(requests)
        except StopIteration:
            if call.expired:  # a cancelled stream may end rather than raise
                raise TooSlow(call.expired) from None
            return
        except grpc.RpcError:
            if call.expired:
                raise TooSlow(call.expired) from None
            raise
        finally:
            call.waiting = False
        guard.progress(call)
        nbytes = expect(msg)
        if nbytes is not None:
            guard.expect(call, nbytes)
        yield msg


class FederationServicer(pb_grpc.FederationServicer):
    """Args:
    hub: sessions and the current task.
    auth: maps credentials to identities.
    spec: the training spec sent to agents.
    ledger: the trust ledger GetTrust reads (``list_clients``, ``get_client``,
        ``client_history``).
    max_update_bytes: larger declared updates are refused without being read.
    on_rejected: called as ``(client_id, reason, detail)`` for every update refused on
        arrival (client_id is "" when the caller could not be identified).
    max_calls_per_client: streaming calls (GetTask, SubmitUpdate) one identity may hold at
        once; more are refused with RESOURCE_EXHAUSTED (an agent needs two).
    max_inflight_bytes: declared bytes that uploads in progress may hold together; an upload
        that would pass it is refused with RESOURCE_EXHAUSTED without being read. None: no
        bound.
    registrations_per_minute: in open mode (identities not authenticated), registrations one
        source address may make per minute (a burst of as many, refilled evenly); None: no cap.
    """

    def __init__(
        self,
        hub: Hub,
        auth: Authenticator,
        spec: TrainingSpec,
        ledger: Ledger,
        *,
        max_update_bytes: int,
        chunk_size: int = CHUNK_SIZE,
        on_rejected: Callable[[str, str, str], None] | None = None,
        max_calls_per_client: int = 4,
        max_inflight_bytes: int | None = None,
        registrations_per_minute: int | None = 60,
    ):
        self.hub = hub
        self.auth = auth
        self.spec = spec_to_proto(spec)
        self.ledger = ledger
        self.max_update_bytes = max_update_bytes
        self.chunk_size = chunk_size
        self.on_rejected = on_rejected or (lambda client_id, reason, detail: None)
        self.max_calls_per_client = max_calls_per_client
        self._calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        self.max_inflight_bytes = max_inflight_bytes
        self._inflight_bytes = 0  # under _calls_lock
        self.registrations_per_minute = registrations_per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def _refuse(
        self,
        context: grpc.ServicerContext,
        client_id: str,
        reason: str,
        code: grpc.StatusCode,
        detail: str,
    ) -> NoReturn:
        self.on_rejected(client_id, reason, detail)
        context.abort(code, detail)
        raise AssertionError("context.abort returned")  # it raises; keeps type checkers sure

    @contextmanager
    def _call_slot(self, client_id: str, context: grpc.ServicerContext, update: bool):
        """Holds one of the identity's streaming-call slots for the duration of a call."""
        with self._calls_lock:
            held = self._calls.get(client_id, 0)
            if held < self.max_calls_per_client:
                self._calls[client_id] = held + 1
        if held >= self.max_calls_per_client:
            detail = (
                f"{client_id!r} already holds {held} streaming calls (the limit is "
                f"{self.max_calls_per_client}); retry when one has finished"
            )
            if update:
                self._refuse(context, client_id, "busy", grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
        try:
            yield
        finally:
            with self._calls_lock:
                left = self._calls[client_id] - 1
                if left:
                    self._calls[client_id] = left
                else:
                    del self._calls[client_id]

    def inflight_bytes(self) -> int:
        """Declared bytes reserved by the uploads in progress."""
        with self._calls_lock:
            return self._inflight_bytes

    @contextmanager
    def _upload_reservation(self, client_id: str, context: grpc.ServicerContext, nbytes: int):
        """Holds ``nbytes`` of the in-flight upload bound for the duration of an upload."""
        limit = self.max_inflight_bytes
        with self._calls_lock:
            held = self._inflight_bytes
            fits = limit is None or held + nbytes <= limit
            if fits:
                self._inflight_bytes = held + nbytes
        if not fits:
            self._refuse(
                context,
                client_id,
                "upload_memory",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"uploads in progress hold {held} of the {limit} bytes the coordinator allows "
                f"(--max-inflight-upload-mb) and this one declares {nbytes}; retry with backoff",
            )
        try:
            yield
        finally:
            with self._calls_lock:
                self._inflight_bytes -= nbytes

    def _identity(self, context: grpc.ServicerContext, update: bool = False) -> Identity:
        common_name = cert_print = None
        if self.auth.mutual_tls:
            peer = context.auth_context()
            names = peer.get("x509_common_name") or []
            common_name = names[0].decode(errors="replace") if names else None
            pems = peer.get("x509_pem_cert") or []
            cert_print = fingerprint(pems[0]) if pems else None
        try:
            return self.auth.identify(context.invocation_metadata(), common_name, cert_print)
        except AuthError as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
            )
            if update:
                self._refuse(context, "", "unauthenticated", code, str(exc))
            context.abort(code, str(exc))
            raise  # abort raises; this line keeps type checkers sure we never fall through

    def _agent(self, context: grpc.ServicerContext, update: bool = False) -> str:
        identity = self._identity(context, update)
        if not identity.may_train:
            detail = f"{identity.name!r} is an operator identity; it cannot train"
            if update:
                self._refuse(
                    context, "", "unauthenticated", grpc.StatusCode.PERMISSION_DENIED, detail
                )
            context.abort(grpc.StatusCode.PERMISSION_DENIED, detail)
        return identity.name

    def _unknown_session(self, context: grpc.ServicerContext, exc: UnknownSession) -> None:
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterReply:
        client_id = self._agent(context)
        if self.auth.open and self.registrations_per_minute is not None:
            self._rate_limit_registration(context)
        if request.client_id and request.client_id != client_id:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"these credentials identify {client_id!r}, not {request.client_id!r}",
            )
        session_id = self.hub.register(client_id)
        return pb.RegisterReply(
            session_id=session_id,
            last_round=self.hub.last_round,
            total_rounds=self.hub.total_rounds,
            done=self.hub.done,
            spec=self.spec,
            heartbeat_interval_s=self.hub.heartbeat_interval_s,
        )

    def _rate_limit_registration(self, context: grpc.ServicerContext) -> None:
        """A token bucket per source address: in open mode anyone can claim any id, so ids
        are not a unit to cap; the address they come from is."""
        source = _source(context.peer())
        rate = self.registrations_per_minute / 60.0
        now = time.monotonic()
        with self._calls_lock:
            if len(self._buckets) > 10_000:  # forget the sources that are full again
                self._buckets = {
                    k: (t, w) for k, (t, w) in self._buckets.items() if t + (now - w) * rate < 1
                }
            tokens, when = self._buckets.get(source, (float(self.registrations_per_minute), now))
            tokens = min(float(self.registrations_per_minute), tokens + (now - when) * rate)
            allowed = tokens >= 1.0
            self._buckets[source] = (tokens - allowed, now)
        if not allowed:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{source} registered more than {self.registrations_per_minute} times in a "
                "minute; this open coordinator caps registrations per address",
            )

    def GetTask(
        self, request: pb.TaskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskChunk]:
        client_id = self._agent(context)
        with self._call_slot(client_id, context, update=False):
            yield from self._task_stream(client_id, request, context)

    def _task_stream(
        self, client_id: str, request: pb.TaskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskChunk]:
        wait = min(max(request.wait_s, 0.0), MAX_WAIT_S)
        try:
            task = self.hub.wait_task(
                client_id,
                request.session_id,
                request.last_task_id,
                wait,
                gone=lambda: not context.is_active(),
            )
        except UnknownSession as exc:
            self._unknown_session(context, exc)
        if task == "done":
            yield pb.TaskChunk(
                header=pb.TaskHeader(status=pb.TaskHeader.DONE, total_rounds=self.hub.total_rounds)
            )
            return
        if not isinstance(task, Task):
            yield pb.TaskChunk(
                header=pb.TaskHeader(
                    status=pb.TaskHeader.NO_TASK, total_rounds=self.hub.total_rounds
                )
            )
            return
        yield pb.TaskChunk(
            header=pb.TaskHeader(
                status=pb.TaskHeader.TASK,
                task_id=task.task_id,
                round=task.round,
                total_rounds=self.hub.total_rounds,
                total_size=len(task.payload),
                sha256=task.sha256,
                spec=self.spec,
            )
        )
        for seq, data in split(task.payload, self.chunk_size):
            yield pb.TaskChunk(chunk=pb.Chunk(seq=seq, data=data))

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.SubmitReply:
        client_id = self._agent(context, update=True)
        with self._call_slot(client_id, context, update=True):
            return self._receive_update(client_id, request_iterator, context)

    def _receive_update(
        self,
        client_id: str,
        request_iterator: Iterator[pb.UpdateChunk],
        context: grpc.ServicerContext,
    ) -> pb.SubmitReply:
        def damaged(code: grpc.StatusCode, detail: str) -> NoReturn:
            self._refuse(context, client_id, "damaged_stream", code, detail)

        try:
            first = next(request_iterator, None)
        except TooSlow as exc:
            self._refuse(context, client_id, "too_slow", grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"upload cancelled: {exc}")  # fmt: skip
        except grpc.RpcError:
            first = None
        if first is None or first.WhichOneof("part") != "header":
            damaged(grpc.StatusCode.INVALID_ARGUMENT, "an update stream starts with a header")
        header = first.header
        try:
            self.hub.check_session(client_id, header.session_id)
        except UnknownSession as exc:
            self._refuse(context, client_id, "unknown_session", grpc.StatusCode.NOT_FOUND, str(exc))
        if header.dtype not in VECTOR_DTYPES:
            self._refuse(
                context,
                client_id,
                "wrong_dtype",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown dtype {header.dtype!r}; send float32 or float64",
            )
        loss = header.loss if header.HasField("loss") else None
        if header.total_size > self.max_update_bytes:
            # Not read: admission rejects it as oversized and charges it to the sender's trust.
            update = ClientUpdate(
                client_id,
                header.round,
                np.zeros(0, np.float32),
                int(header.num_examples),
                loss,
                metadata={"declared_bytes": int(header.total_size)},
            )
            status = self.hub.submit(client_id, header.session_id, header.task_id, update)
            return pb.SubmitReply(
                status=pb.SubmitReply.LATE if status == "late" else pb.SubmitReply.REJECTED,
                detail=f"update of {header.total_size} bytes exceeds the limit of "
                f"{self.max_update_bytes} bytes",
            )
        with self._upload_reservation(client_id, context, header.total_size):
            assembler = Assembler(header.total_size)
            trailer = None
            try:
                for msg in request_iterator:
                    part = msg.WhichOneof("part")
                    if part == "chunk":
                        assembler.add(msg.chunk.seq, msg.chunk.data)
                    elif part == "trailer":
                        trailer = msg.trailer
                        break
                    else:
                        raise TransferError(f"unexpected {part} in the middle of an update stream")
                if trailer is None:
                    raise TransferError("the update stream ended without its sha256 trailer")
                delta = decode_vector(assembler.finish(trailer.sha256), header.dtype)
            except TransferError as exc:
                damaged(grpc.StatusCode.DATA_LOSS, f"update not received intact: {exc}")
            except TooSlow as exc:
                self._refuse(context, client_id, "too_slow", grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"upload cancelled: {exc}")  # fmt: skip
            except grpc.RpcError:
                damaged(grpc.StatusCode.CANCELLED, "the update stream was cut off mid-upload")
            update = ClientUpdate(client_id, header.round, delta, int(header.num_examples), loss)
            try:
                status = self.hub.submit(client_id, header.session_id, header.task_id, update)
            except UnknownSession as exc:
                self._refuse(
                    context, client_id, "unknown_session", grpc.StatusCode.NOT_FOUND, str(exc)
                )
        if status == "late":
            return pb.SubmitReply(
                status=pb.SubmitReply.LATE,
                detail=f"task {header.task_id} is closed; the update was dropped",
            )
        return pb.SubmitReply(status=pb.SubmitReply.ACCEPTED)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        client_id = self._agent(context)
        try:
            self.hub.heartbeat(client_id, request.session_id)
        except UnknownSession as exc:
            self._unknown_session(context, exc)
        return pb.HeartbeatReply(last_round=self.hub.last_round, done=self.hub.done)

    def GetTrust(self, request: pb.TrustRequest, context: grpc.ServicerContext) -> pb.TrustReply:
        identity = self._identity(context)
        if not identity.may_read_trust:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name!r} may not read trust; use an operator token or "
                "certificate (see docs/deploy.md)",
            )
        if not request.client_id:
            return trust_to_proto(self.ledger.list_clients(), self.hub.last_round)
        client = self.ledger.get_client(request.client_id)
        if client is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown client {request.client_id!r}")
        history = self.ledger.client_history(request.client_id)
        return trust_to_proto([client], self.hub.last_round, history)


def _source(peer: str) -> str:
    """The address of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``), no port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def _guarded_responses(
    guard: CallGuard, call: _Call, responses: Iterator, expect: Callable[[object], int | None]
) -> Iterator:
    """Yields the servicer's messages; while gRPC sends one (blocked when the client does not
    read) the call waits on its client and the watchdog watches it."""
    call.waiting = False
    for msg in responses:
        nbytes = expect(msg)
        if nbytes is not None:
            guard.expect(call, nbytes)
        call.waiting = True
        yield msg
        call.waiting = False
        guard.progress(call)


def _one_request(guard: CallGuard, call: _Call, requests: Iterator, method: str):
    """The single request of a unary method, read under the guard."""
    try:
        for msg in _guarded_requests(guard, call, requests, lambda msg: None):
            return msg
    except TooSlow as exc:
        call.context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} cancelled: {exc}")
    call.context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message")


def add_to_server(servicer: FederationServicer, server: grpc.Server, guard: CallGuard) -> None:
    """Registers ``servicer`` on ``server`` with every call under ``guard``.

    The wire contract is unchanged: unary methods are served as client-streaming handlers that
    read one message, which is the same thing on the wire.
    """

    def unary(method: str, request_type, reply_type) -> grpc.RpcMethodHandler:
        handler = getattr(servicer, method)

        def behaviour(requests: Iterator, context: grpc.ServicerContext):
            with guard.call(context, stream=False) as call:
                request = _one_request(guard, call, requests, method)
                call.waiting = False
                return handler(request, context)

        return grpc.stream_unary_rpc_method_handler(
            behaviour, request_type.FromString, reply_type.SerializeToString
        )

    def get_task(requests: Iterator, context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:
        with guard.call(context, stream=True) as call:
            request = _one_request(guard, call, requests, "GetTask")
            guard.expect(call, 0, server_wait_s=min(max(request.wait_s, 0.0), MAX_WAIT_S) + 1)

            def size(chunk: pb.TaskChunk) -> int | None:
                return chunk.header.total_size if chunk.WhichOneof("part") == "header" else None

            yield from _guarded_responses(guard, call, servicer.GetTask(request, context), size)

    def submit_update(requests: Iterator, context: grpc.ServicerContext) -> pb.SubmitReply:
        def busy(detail: str) -> None:
            servicer.on_rejected("", "busy", detail)

        with guard.call(context, stream=True, on_full=busy) as call:

            def size(chunk: pb.UpdateChunk) -> int | None:
                return chunk.header.total_size if chunk.WhichOneof("part") == "header" else None

            try:
                return servicer.SubmitUpdate(
                    _guarded_requests(guard, call, requests, size), context
                )
            finally:
                call.waiting = False

    handlers = {
        "Register": unary("Register", pb.RegisterRequest, pb.RegisterReply),
        "Heartbeat": unary("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatReply),
        "GetTrust": unary("GetTrust", pb.TrustRequest, pb.TrustReply),
        "GetTask": grpc.stream_stream_rpc_method_handler(
            get_task, pb.TaskRequest.FromString, pb.TaskChunk.SerializeToString
        ),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            submit_update, pb.UpdateChunk.FromString, pb.SubmitReply.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
