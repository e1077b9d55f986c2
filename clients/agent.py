"""The agent: one client's process on its own machine. Its data never leaves it; updates do.

The agent checks its data file, registers with the coordinator (its identity comes from its
token or certificate), validates the data against the training spec it receives, and then
long-polls for tasks: fetch the global weights, train with ``LocalTrainer``, submit the update.
When the coordinator goes away (a restart, a network cut) it reconnects with exponential
backoff and jitter and registers again; when the coordinator says training is over it exits 0.
A refused credential or unfit data stops it at once with a message naming the problem.

Data (.npz or .csv, see ``fedwarden/data/validation.py``) is validated against the task before any training:
rows with a problem (NaN, values out of range, unknown labels, duplicates, ...) are skipped and
reported in the log with their row numbers and counts; with ``strict`` any problem stops the
agent instead. Whole-file problems (wrong schema, shape or dtype) always stop it.

With a ``RedTeam`` (``--attack``, see ``clients/red_team.py``) it attacks: it trains on poisoned
data or replaces its update, and sends nothing else that sets it apart from an honest agent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from fedwarden.clients.red_team import RedTeam
from fedwarden.data.validation import LocalData, Validation, load_data, validate
from fedwarden.errors import UsageError
from fedwarden.protocol.connection import Connection, describe
from fedwarden.protocol.convert import TrainingSpec, spec_from_proto
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2_grpc as pb_grpc
from fedwarden.protocol.transfer import (
    Assembler,
    TransferError,
    decode_vector,
    encode_vector,
    sha256_hex,
    split,
)
from fedwarden.weights import WeightLayout

log = logging.getLogger("fedwarden.agent")

AGENT_VERSION = "fedwarden-agent/1"
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
FATAL = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
)


UPLOAD_RETRY_S = 120.0
"""How long the agent sends one update again while the coordinator answers RESOURCE_EXHAUSTED
(about serve's default --round-timeout); then it registers again and fetches the current task."""


class AgentError(UsageError):
    """The agent cannot go on: refused credentials, unfit data, an incompatible coordinator."""


@dataclass(frozen=True)
class SpecPin:
    """What this agent accepts from the coordinator's training spec; a spec that differs is
    refused before any model code is imported or any training runs.

    Args:
      model: the model factory the agent will build: ``"default"`` (the dataset's own model) or
        ``package.module:function``; None accepts whatever the spec names.
      min_dp_noise_multiplier: DP-SGD must be on with at least this noise multiplier.
      max_dp_l2_clip: DP-SGD must be on with a per-example clip of at most this norm.
    """

    model: str | None = None
    min_dp_noise_multiplier: float | None = None
    max_dp_l2_clip: float | None = None

    def problem(self, spec: TrainingSpec) -> str | None:
        """Why ``spec`` is refused, or None."""
        named = spec.model or "default"
        if self.model is not None and named != self.model:
            return (
                f"the coordinator's spec names the model {named!r}; this agent is pinned to "
                f"{self.model!r} (--pin-model)"
            )
        if self.min_dp_noise_multiplier is None and self.max_dp_l2_clip is None:
            return None
        dp = spec.dp_sgd
        if not dp:
            return "the coordinator's spec turns DP-SGD off; this agent requires it"
        if (
            self.min_dp_noise_multiplier is not None
            and dp["noise_multiplier"] < self.min_dp_noise_multiplier
        ):
            return (
                f"the coordinator's spec sets the DP-SGD noise multiplier to "
                f"{dp['noise_multiplier']:g}; this agent requires at least "
                f"{self.min_dp_noise_multiplier:g} (--min-dp-noise-multiplier)"
            )
        if self.max_dp_l2_clip is not None and dp["l2_norm_clip"] > self.max_dp_l2_clip:
            return (
                f"the coordinator's spec sets the DP-SGD clip to {dp['l2_norm_clip']:g}; this "
                f"agent requires at most {self.max_dp_l2_clip:g} (--max-dp-l2-clip)"
            )
        return None


class Agent:
    """Args:
    connection: how to reach the coordinator, with the client id and credentials.
    data_path: the local .npz file (arrays x, y).
    poll_wait_s: how long each GetTask call may wait for a task.
    backoff_initial_s, backoff_max_s: reconnect delays double from the first to the cap.
    give_up_after_s: exit 1 after this long without reaching the coordinator (None: never).
    red_team: makes this agent an attacker (a rehearsal; see clients/red_team.py).
    strict: refuse to train when any row of the data has a problem (default: skip those rows
        and report them).
    pin: the model and minimum DP-SGD setting this agent accepts (``SpecPin``); None accepts
        any spec.
    """

    def __init__(
        self,
        connection: Connection,
        data_path: str,
        *,
        poll_wait_s: float = 20.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 8.0,
        give_up_after_s: float | None = 600.0,
        red_team: RedTeam | None = None,
        strict: bool = False,
        pin: SpecPin | None = None,
    ):
        if not connection.client_id:
            raise UsageError("the agent needs --client-id")
        self.conn = connection
        self.client_id = connection.client_id
        self.data_path = data_path
        self.poll_wait_s = poll_wait_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.give_up_after_s = give_up_after_s
        self.red_team = red_team
        self.strict = strict
        self.pin = pin
        self.data_report: dict | None = None  # what validation kept and skipped, for the task
        self.rounds_done: list[int] = []
        self._spec: TrainingSpec | None = None
        self._trainer = None
        self._data: tuple[np.ndarray, np.ndarray] | None = None
        self._last_task_id = ""
        self._raw: LocalData | None = None
        self._registered = False

    def run(self) -> int:
        """Trains until the coordinator says training is over (0) or gives up (1)."""
        self._raw = load_data(self.data_path)
        self._check(validate(self._raw))  # what can be checked before the task is known
        failures, failing_since = 0, None
        while True:
            attempt_started = time.monotonic()
            with self.conn.channel() as channel:
                try:
                    self._serve_session(pb_grpc.FederationStub(channel))
                    log.info(
                        "%s: the coordinator says training is over (%d rounds trained here)",
                        self.client_id,
                        len(self.rounds_done),
                    )
                    return 0
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code in REFUSED:
                        raise AgentError(
                            f"the coordinator at {self.conn.server} refused "
                            f"{self.client_id!r}: {describe(exc)}"
                        ) from None
                    if code in FATAL:
                        raise AgentError(
                            f"coordinator {self.conn.server}: {describe(exc)}"
                        ) from None
                    if code == grpc.StatusCode.NOT_FOUND:  # session forgotten: register again
                        log.info("%s: %s; registering again", self.client_id, exc.details())
                        continue
                    if self._registered:
                        failures, failing_since = 0, None
                    # Counted from the start of the attempt that failed, not from its end.
                    failing_since = failing_since or attempt_started
                    waited = time.monotonic() - failing_since
                    if self.give_up_after_s is not None and waited > self.give_up_after_s:
                        log.error(
                            "%s: giving up: no coordinator at %s for %.0f s (%s)",
                            self.client_id,
                            self.conn.server,
                            waited,
                            describe(exc),
                        )
                        return 1
                    delay = self._backoff(failures)
                    if self.give_up_after_s is not None:  # no sleeping past the deadline
                        delay = min(delay, max(0.0, self.give_up_after_s - waited) + 0.05)
                    failures += 1
                    log.warning(
                        "%s: coordinator unreachable (%s); retrying in %.1f s",
                        self.client_id,
                        describe(exc),
                        delay,
                    )
                    time.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row: doubling, capped, jittered."""
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures, 30))
        return delay * random.uniform(0.5, 1.0)

    # -- one session --------------------------------------------------------------------------

    def _serve_session(self, stub: pb_grpc.FederationStub) -> None:
        self._registered = False
        meta = self.conn.metadata()
        reply = stub.Register(
            pb.RegisterRequest(
                client_id=self.client_id,
                num_examples=len(self._raw.index),
                agent_version=AGENT_VERSION,
            ),
            timeout=15,
            metadata=meta,
        )
        self._registered = True
        log.info(
            "%s: registered with %s (last round %d of %d)",
            self.client_id,
            self.conn.server,
            reply.last_round,
            reply.total_rounds,
        )
        self._prepare(spec_from_proto(reply.spec))
        if reply.done:
            return
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat,
            daemon=True,
            args=(stub, reply.session_id, reply.heartbeat_interval_s, stop),
        )
        beat.start()
        try:
            while True:
                header, payload = self._fetch(stub, reply.session_id)
                if header.status == pb.TaskHeader.DONE:
                    return
                if header.status != pb.TaskHeader.TASK:
                    continue
                self._prepare(spec_from_proto(header.spec))
                self._train_and_submit(stub, reply.session_id, header, payload)
        finally:
            stop.set()
            beat.join(2.0)  # no heartbeat may start on the channel the caller is about to close

    def _prepare(self, spec: TrainingSpec) -> None:
        """Validates the data against the spec and builds the trainer (once per spec)."""
        if spec == self._spec:
            return
        problem = self.pin.problem(spec) if self.pin else None
        if problem:
            raise AgentError(f"refusing the task: {problem}")
        from fedwarden.data.datasets import feature_range

        checked = validate(
            self._raw, spec.input_shape, spec.num_classes, feature_range(spec.dataset)
        )
        self._check(checked)
        if checked.problems:
            log.warning("%s: skipping rows of its data: %s", self.client_id, checked.report())
        self.data_report = checked.to_dict()
        self._data = checked.x, checked.y
        self._trainer = self._build_trainer(spec)
        if self.red_team is not None:
            try:
                self.red_team.bind(
                    spec.num_classes, *self._data, seed=spec.seed,
                    output_kernel=WeightLayout(spec.weight_shapes).output_kernel(),
                )  # fmt: skip
            except UsageError as exc:
                raise AgentError(f"red team: {exc}") from None
        self._spec = spec
        log.info(
            "%s: %d examples fit the task (%s, input %s, %d classes)",
            self.client_id,
            len(self._data[1]),
            spec.dataset,
            spec.input_shape,
            spec.num_classes,
        )

    def _build_trainer(self, spec: TrainingSpec):
        """The local trainer for the task (``train(weights, x, y, rng)`` returns the update)."""
        from fedwarden.clients.training import DPSGDSettings, LocalTrainer
        from fedwarden.models import build_model

        model = build_model(spec.model, spec.dataset, spec.input_shape, spec.num_classes, spec.seed)
        if WeightLayout.of(model.get_weights()).shapes != spec.weight_shapes:
            raise AgentError(
                f"the model built here ({spec.model or 'default'}) does not match the "
                "coordinator's weight layout; install the same model code"
            )
        dp = None
        if spec.dp_sgd:
            dp = DPSGDSettings(
                spec.dp_sgd["l2_norm_clip"],
                spec.dp_sgd["noise_multiplier"],
                spec.dp_sgd["num_microbatches"],
            )
        return LocalTrainer(model, spec.learning_rate, spec.batch_size, spec.local_epochs, dp)

    def _check(self, checked: Validation) -> None:
        """Stops the agent on a whole-file problem, or on any problem with ``strict``."""
        if checked.fatal:
            raise AgentError(f"refusing to train: {checked.describe()}")
        if self.strict and checked.problems:
            raise AgentError(
                f"refusing to train: {checked.describe()} (--strict: without it the agent "
                f"would skip these {checked.skipped} of {checked.total} rows)"
            )

    def _fetch(self, stub, session_id: str) -> tuple[pb.TaskHeader, bytes | None]:
        stream = stub.GetTask(
            pb.TaskRequest(
                session_id=session_id, last_task_id=self._last_task_id, wait_s=self.poll_wait_s
            ),
            timeout=self.poll_wait_s + 300,
            metadata=self.conn.metadata(),
        )
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise AgentError("the coordinator sent a task stream without a header")
        header = first.header
        if header.status != pb.TaskHeader.TASK:
            return header, None
        assembler = Assembler(header.total_size)
        try:
            for msg in stream:
                assembler.add(msg.chunk.seq, msg.chunk.data)
            return header, assembler.finish(header.sha256)
        except TransferError as exc:
            log.warning(
                "%s: task %s arrived damaged (%s); fetching again",
                self.client_id,
                header.task_id,
                exc,
            )
            return pb.TaskHeader(status=pb.TaskHeader.NO_TASK), None

    def _train_and_submit(
        self, stub, session_id: str, header: pb.TaskHeader, payload: bytes
    ) -> None:
        spec = self._spec
        weights = decode_vector(payload, "float32")
        if weights.size != spec.num_weights:
            raise AgentError(
                f"task {header.task_id} holds {weights.size} weights; the spec says "
                f"{spec.num_weights}"
            )
        from fedwarden.weights import WeightLayout

        layout = WeightLayout(spec.weight_shapes)
        global_weights = layout.unflatten(weights)
        x, y = self._data
        red = self.red_team
        if red is not None:
            x, y = red.local_data(header.round, x, y)
        rng = np.random.default_rng(
            [spec.seed, 3, header.round, zlib.crc32(self.client_id.encode())]
        )
        start = time.perf_counter()
        result = self._trainer.train(global_weights, x, y, rng)
        delta = result.delta
        if red is not None:
            delta = red.craft(
                header.round,
                delta,
                lambda xs, ys, r: self._trainer.train(global_weights, xs, ys, r).delta,
                weights,
            )
        update = encode_vector(delta, "float32")
        examples = result.num_examples
        if red is not None:
            examples = red.reported_examples(header.round, examples)
        reply = self._submit(stub, session_id, header, examples, result.loss, update)
        self._last_task_id = header.task_id
        line = red.record(header.round, pb.SubmitReply.Status.Name(reply.status)) if red else None
        if line and line["attacking"]:
            log.info(
                "%s: red team: round %d: sent %s update of norm %.4g (trained: %.4g)",
                self.client_id,
                header.round,
                line["attack"],
                line["update_norm"],
                line["trained_norm"],
            )
        if reply.status == pb.SubmitReply.ACCEPTED:
            self.rounds_done.append(header.round)
            log.info(
                "%s: round %d: trained on %d examples in %.1f s (loss %.3f), update submitted",
                self.client_id,
                header.round,
                result.num_examples,
                time.perf_counter() - start,
                result.loss,
            )
        else:
            log.warning(
                "%s: round %d: update not taken (%s): %s",
                self.client_id,
                header.round,
                pb.SubmitReply.Status.Name(reply.status),
                reply.detail,
            )

    def _submit(
        self,
        stub,
        session_id: str,
        header: pb.TaskHeader,
        num_examples: int,
        loss: float,
        payload: bytes,
    ) -> pb.SubmitReply:
        """SubmitUpdate. While the coordinator answers RESOURCE_EXHAUSTED (its upload slots or
        upload memory are taken) the same update is sent again with backoff, for up to
        ``UPLOAD_RETRY_S``; any other error, or one past that, goes to ``run``."""
        started, failures = time.monotonic(), 0
        while True:
            try:
                return stub.SubmitUpdate(
                    self._update_stream(session_id, header, num_examples, loss, payload),
                    timeout=300,
                    metadata=self.conn.metadata(),
                )
            except grpc.RpcError as exc:
                busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                if not busy or time.monotonic() - started > UPLOAD_RETRY_S:
                    raise
                delay = self._backoff(failures)
                failures += 1
                log.info(
                    "%s: round %d: the coordinator cannot take the update yet (%s); sending it "
                    "again in %.1f s",
                    self.client_id,
                    header.round,
                    describe(exc),
                    delay,
                )
            time.sleep(delay)

    def _update_stream(
        self, session_id: str, header: pb.TaskHeader, num_examples: int, loss: float, payload: bytes
    ) -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(
            header=pb.UpdateHeader(
                session_id=session_id,
                task_id=header.task_id,
                round=header.round,
                num_examples=num_examples,
                loss=loss,
                dtype="float32",
                total_size=len(payload),
            )
        )
        for seq, data in split(payload):
            yield pb.UpdateChunk(chunk=pb.Chunk(seq=seq, data=data))
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256_hex(payload)))

    def _heartbeat(self, stub, session_id: str, interval: float, stop: threading.Event) -> None:
        interval = interval if interval > 0 else 2.0
        while not stop.wait(interval):
            try:
                stub.Heartbeat(
                    pb.HeartbeatRequest(session_id=session_id),
                    timeout=interval * 2,
                    metadata=self.conn.metadata(),
                )
            except grpc.RpcError as exc:  # the main loop notices and reconnects
                log.debug("%s: heartbeat failed: %s", self.client_id, describe(exc))
            except ValueError:  # the channel closed under a heartbeat: the session is over
                return
