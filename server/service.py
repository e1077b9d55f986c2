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
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from fedwarden.server.auth import Authenticator, AuthError, Identity
from fedwarden.server.hub import Hub, Task, UnknownSession
from fedwarden.server.ledger import Ledger

MAX_WAIT_S = 30.0


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

    def _identity(self, context: grpc.ServicerContext, update: bool = False) -> Identity:
        common_name = None
        if self.auth.mutual_tls:
            names = context.auth_context().get("x509_common_name") or []
            common_name = names[0].decode(errors="replace") if names else None
        try:
            return self.auth.identify(context.invocation_metadata(), common_name)
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
        except grpc.RpcError:
            damaged(grpc.StatusCode.CANCELLED, "the update stream was cut off mid-upload")
        update = ClientUpdate(client_id, header.round, delta, int(header.num_examples), loss)
        try:
            status = self.hub.submit(client_id, header.session_id, header.task_id, update)
        except UnknownSession as exc:
            self._refuse(context, client_id, "unknown_session", grpc.StatusCode.NOT_FOUND, str(exc))
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
