"""``fedwarden serve``: the round loop over connected agents, crash-safe.

Each round: wait for ``min_clients`` live agents, select K (``Coordinator.select``), publish the
task, collect updates until every selected agent answered, or the round timeout passed with at
least ``min(min_clients, K)`` of them (otherwise the attempt is abandoned and the round re-run
with a fresh selection); late updates are dropped and counted. Then ``Coordinator.finish_round``
(admission, aggregation, scores, trust), evaluation on held-out data, the ledger, the metrics,
and a checkpoint of everything needed to resume, followed by ``results.json``.

Crash safety: the trust ledger is written during ``finish_round``, the checkpoint after it. A
coordinator killed at any point restarts from the newest checkpoint that verifies (round R) and
first truncates the ledger to R, so no round is repeated or lost and trust matches the weights.
SIGTERM (or Ctrl-C) abandons a round in progress, keeps the last checkpoint and exits 0. When
the state dir cannot be written (disk full, permissions) the coordinator stops with a one-line
message and exit code 2, keeping nothing of the round it could not persist; restarted once the
problem is fixed, it resumes after the last round it did persist. ``server/faults.py`` kills it
at chosen points of a round, for the tests of all this.

Privacy budget: with ``--dp central --target-epsilon E`` the accountant runs in the loop. After
every round the coordinator publishes ``fedwarden_dp_epsilon``; before starting a round it asks
whether that round would take epsilon above E, and if so it stops cleanly (checkpoint kept, one
log line, agents told training is over, exit 0): ``--rounds`` is an upper bound. The noise
multiplier is ``--dp-noise-multiplier`` when given, else solved so that ``--rounds`` rounds
spend exactly E. Epsilon is accounted with sampling rate 1 (see ``run``) at ``--dp-delta``.

Holding: while ``STATE_DIR/PAUSE`` exists no new round starts (``echo 5 > PAUSE``: hold before
round 5), e.g. to look at trust before going on, or to upgrade the coordinator between rounds.
"""

from __future__ import annotations

import logging
import math
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import Counter, Gauge

from fedwarden.aggregation.chain import Chain
from fedwarden.config import Config, DeploymentConfig, RunConfig
from fedwarden.errors import UsageError
from fedwarden.protocol.convert import TrainingSpec
from fedwarden.protocol.transfer import encode_vector, sha256_hex
from fedwarden.server import checkpoint, faults
from fedwarden.server.auth import AllowList, Authenticator, load_tokens
from fedwarden.server.callbacks import (
    Callback,
    Checkpoint,
    LambdaCallback,
    MetricsExport,
    Pause,
    PrivacyAccount,
    Reports,
)
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.defence import build_coordinator, build_defence, smallest_cohort
from fedwarden.server.driver import Cohort, History, RoundDriver, RunInfo, check_resume, unwritable
from fedwarden.server.hub import Hub, client_rows, record_silence
from fedwarden.server.ledger import Ledger
from fedwarden.server.metrics import MetricsExporter
from fedwarden.server.service import CallGuard, CallLimits, FederationServicer, add_to_server
from fedwarden.server.tensorboard import TensorBoard, log_dir
from fedwarden.server.validation import ValidationProbe, held_out_indices
from fedwarden.weights import WeightLayout

log = logging.getLogger("fedwarden.serve")

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second coordinator on the same port fails instead of sharing it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 8 << 20),
]
PAUSE_FILE = "PAUSE"
"""In the state dir: while it exists the coordinator starts no new round (agents stay connected).
Empty, it holds before the next round; holding a number N, before round N."""
COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


LIVENESS_S = 10.0
"""An agent with no call for this long is not live (not selected)."""
HEARTBEAT_S = 2.0
"""How often agents are told to call in while they wait."""
LINGER_S = 15.0
"""After the last round, how long to wait for agents to hear DONE."""


def check_web_config(options: DeploymentConfig) -> None:
    """Parses ``--metrics-web-config`` (the one deployment check that needs the server layer)."""
    if options.metrics_web_config:
        from fedwarden.server.metrics import WebConfig

        try:
            WebConfig.load(options.metrics_web_config)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"--metrics-web-config: {exc}") from None


def call_limits(options: DeploymentConfig) -> CallLimits:
    """Every call may wait on an agent; streaming calls are two per agent, and the unary calls
    (Register, Heartbeat, GetTrust) keep one worker per agent plus a few of their own."""
    streams = 2 * options.max_agents
    return CallLimits(
        max_calls=streams + options.max_agents + 8,
        max_streams=streams,
        stall_s=options.stall_timeout,
        min_rate=options.min_transfer_rate,
    )


UPDATE_BYTES_PER_WEIGHT = 8
"""The widest dtype an update may come in (float64); a larger declared update is not read."""
MIN_INFLIGHT_UPLOAD_MB = 64.0
"""Without --round-memory-budget, the in-flight upload bound is never below this."""


def inflight_upload_bytes(config: RunConfig, options: DeploymentConfig, num_weights: int) -> int:
    """The bytes uploads in progress may hold together (``--max-inflight-upload-mb``).

    By default the round's memory budget; without one, every selected agent's update at once,
    and at least ``MIN_INFLIGHT_UPLOAD_MB``. Never below one update, so that an upload alone
    always gets through: a smaller explicit bound is refused.
    """
    update = num_weights * UPDATE_BYTES_PER_WEIGHT
    if options.max_inflight_upload_mb is not None:
        limit = int(options.max_inflight_upload_mb * 2**20)
        if limit < update:
            raise UsageError(
                f"--max-inflight-upload-mb must hold one update of this model ({num_weights} "
                f"weights as float64: {update / 2**20:.3g} MB). Received: "
                f"{options.max_inflight_upload_mb:g}"
            )
        return limit
    if config.round_memory_budget is not None:
        return max(int(config.round_memory_budget * 2**20), update)
    selected = math.ceil(config.clients_per_round * options.overselect)
    return max(int(MIN_INFLIGHT_UPLOAD_MB * 2**20), selected * update)


@dataclass
class EvalData:
    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


def load_eval_data(config: RunConfig, eval_data: str | None) -> EvalData:
    """The held-out data: ``--eval-data FILE.npz``, else the test split of ``--dataset``."""
    if eval_data:
        from fedwarden.data.validation import DataError, check_arrays, load_npz

        try:
            x, y = load_npz(eval_data)
        except DataError as exc:
            raise UsageError(str(exc)) from None
        with np.load(eval_data) as f:
            stored = int(f["num_classes"]) if "num_classes" in f.files else None
        problems = check_arrays(x, y)
        if problems:
            raise UsageError(f"--eval-data {eval_data}: " + "; ".join(p.message for p in problems))
        num_classes = stored or int(y.max()) + 1
        return EvalData(Path(eval_data).stem, x.astype(np.float32), y.astype(np.int64), num_classes)
    from fedwarden.data.datasets import load_dataset

    ds = load_dataset(config.dataset, config.data_dir, config.seed)
    return EvalData(ds.name, ds.x_test, ds.y_test, ds.num_classes)


class ServeMetrics:
    """The transport's own series, in the exporter's registry."""

    def __init__(self, registry):
        self.late = Counter(
            "fedwarden_updates_late",
            "Updates that arrived after their round closed (dropped, not charged to trust).",
            registry=registry,
        )
        self.abandoned = Counter(
            "fedwarden_round_attempts_abandoned",
            "Round attempts abandoned because too few updates arrived in time.",
            registry=registry,
        )
        self.agents = Gauge(
            "fedwarden_agents_connected", "Agents with a live session.", registry=registry
        )
        self.upload_bytes = Gauge(
            "fedwarden_upload_bytes_in_flight",
            "Declared bytes reserved by the uploads in progress.",
            registry=registry,
        )
        self.upload_limit = Gauge(
            "fedwarden_upload_bytes_limit",
            "Bytes the uploads in progress may hold together (--max-inflight-upload-mb).",
            registry=registry,
        )


class Server:
    """One coordinator process: gRPC service, round loop, checkpoints, metrics.

    Args:
      config: the run's ``Config``, its ``deployment`` section set (checked when it was built).
      aggregator: the parsed ``--aggregator`` (``check_run`` returns it; parsed when not given).

    Example::

        deployment = DeploymentConfig(state_dir="runs/serve", insecure=True)
        Server(Config(deployment=deployment)).run()
    """

    def __init__(self, config: Config, aggregator: Chain | None = None):
        if config.deployment is None:
            raise UsageError("Server needs Config(deployment=DeploymentConfig(state_dir=...)). "
                             "Received: deployment=None")  # fmt: skip
        check_web_config(config.deployment)
        self.config = config.flat()
        self.options = config.deployment
        self.state_dir = Path(config.deployment.state_dir)
        self.aggregator = aggregator
        self._stop = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.driver: RoundDriver | None = None

    @property
    def stopping(self) -> bool:
        return self._stop

    def request_stop(self, *_: Any) -> None:
        """Graceful stop (SIGTERM): abandon the round in progress, keep the last checkpoint."""
        self._stop = True
        if self.driver is not None:
            self.driver.stop("stopped")

    # -- setup -------------------------------------------------------------------------------

    def _authenticator(self) -> Authenticator:
        o = self.options
        tokens, operator_tokens = load_tokens(o.tokens) if o.tokens else ({}, {})
        auth = Authenticator(
            tokens,
            operator_tokens,
            mutual_tls=bool(o.tls_client_ca),
            operator_names=o.operator,
            allow=AllowList(o.allow_clients) if o.allow_clients else None,
        )
        if auth.open:
            log.warning(
                "open coordinator: agent identities are not authenticated (--insecure "
                "without --tokens); use this only on a trusted network"
            )
        elif o.insecure:
            log.warning("plaintext transport (--insecure): tokens travel unencrypted")
        return auth

    def _grpc_server(self, servicer: FederationServicer, guard: CallGuard) -> grpc.Server:
        o = self.options
        limits = guard.limits
        # One worker per call the guard admits, and gRPC refuses any call beyond that: no call
        # ever queues behind a stalled one. Idle connections and silent handshakes are closed.
        idle_ms = int(o.idle_timeout * 1000)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=limits.max_calls + 2, thread_name_prefix="fedwarden-grpc"
            ),
            options=[
                *SERVER_OPTIONS,
                ("grpc.max_connection_idle_ms", idle_ms),
                ("grpc.server_handshake_timeout_ms", int(limits.stall_s * 1000)),
                ("grpc.keepalive_time_ms", min(idle_ms, 60_000)),
                ("grpc.keepalive_timeout_ms", int(limits.stall_s * 1000)),
                ("grpc.max_concurrent_streams", 16),
            ],
            maximum_concurrent_rpcs=limits.max_calls + 2,
            compression=COMPRESSION[o.compression],
        )
        add_to_server(servicer, server, guard)
        address = f"{o.host}:{o.port}"
        try:
            if o.insecure:
                port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(Path(o.tls_key).read_bytes(), Path(o.tls_cert).read_bytes())],
                    root_certificates=Path(o.tls_client_ca).read_bytes()
                    if o.tls_client_ca
                    else None,
                    require_client_auth=bool(o.tls_client_ca),
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise UsageError(f"cannot listen on {address}: {exc}") from None
        if not port:
            raise UsageError(f"cannot listen on {address} (in use, or not an address of this host)")
        self.port = port
        return server

    # -- the run, in its seams ------------------------------------------------------------------

    def run(self) -> int:
        """Serves rounds until ``--rounds`` are done, the privacy budget is spent or a stop is
        requested; returns the exit code (0). Raises UsageError for what the user must fix."""
        from fedwarden.models import Evaluator, build_model  # TensorFlow: only when serving

        c, o = self.config, self.options
        auth = self._authenticator()
        data = load_eval_data(c, o.eval_data)
        model = build_model(c.model, data.name, data.input_shape, data.num_classes, c.seed)
        evaluator, layout = Evaluator(model), WeightLayout.of(model.get_weights())
        defence = build_defence(c, deployment=True, aggregator=self.aggregator)
        privacy, chain = defence.privacy, defence.chain
        chain.check(smallest_cohort(c, o))
        saved, ledger = self._open_state(layout)
        probe = self._probe(data, evaluator, layout)
        coordinator = build_coordinator(
            c, layout.flatten(model.get_weights()), chain, ledger, probe,
            layout.output_layer_size(), layout.output_kernel(),
        )  # fmt: skip
        history = None
        if saved is not None:
            coordinator.load_state_dict(saved["coordinator"])
            history = History.from_state(saved)
            print(f"fedwarden serve: resuming after round {coordinator.round} from "
                  f"{self.state_dir}", flush=True)  # fmt: skip
        done = coordinator.round
        hub = Hub(
            c.rounds,
            liveness_s=LIVENESS_S,
            heartbeat_interval_s=HEARTBEAT_S,
            max_silences=o.max_silences,
            bench_rounds=o.bench_rounds,
            poll_to_select=auth.open,
        )
        hub.set_last_round(done)
        exporter = MetricsExporter()
        metrics = ServeMetrics(exporter.registry)
        # the agents' DP-SGD is counted from the example counts they report
        account = PrivacyAccount.for_run(
            c, privacy, lambda cid: self.driver.history.examples.get(cid, 1), exporter, saved,
            sampling_note="none assumed (sampling rate 1): a conservative bound",
        )  # fmt: skip
        writer = Checkpoint(self.state_dir, self.state_dir / "results.json", self._run_info(data),
                            account, shapes=layout.shapes)  # fmt: skip
        tb = log_dir(c.tensorboard, self.state_dir)
        self.driver = RoundDriver(
            coordinator,
            HubTransport(hub, c, o, metrics, exporter, lambda: self.stopping),
            lambda weights: (*evaluator.evaluate(layout.unflatten(weights), data.x, data.y), None),
            c.rounds,
            [
                account,
                *([] if tb is None else [TensorBoard(tb)]),
                Pause(self.state_dir / PAUSE_FILE),
                MetricsExport(
                    exporter, self.state_dir / "metrics.prom", per_client_rejections=True
                ),
                Silences(hub, exporter, self.state_dir),
                writer,
                LambdaCallback(on_round_end=lambda r, logs: hub.set_last_round(r)),
                Reports(
                    self.state_dir,
                    f"{c.dataset}: deployment, aggregator={c.aggregator}",
                    c.aggregator,
                ),  # fmt: skip
                RoundLog(c.rounds),
            ],
            history=history,
            state_dir=self.state_dir,
            average_last=c.average_last_rounds,
        )
        if self._stop:
            self.driver.stop("stopped")
        if history is not None and history.rounds:
            # a restarted coordinator shows trust before its first round
            last = history.rounds[-1]
            exporter.restore(done, last["accuracy"], last["loss"], ledger.list_clients())
            if privacy is not None:
                exporter.set_dp_epsilon(privacy.epsilon(done))
        spec = self._spec(data, layout)
        grpc_server, metrics_server = self._start(
            hub, auth, spec, ledger, layout, exporter, metrics
        )
        try:
            self._announce(done, metrics_server is not None, privacy)
            if history is not None and history.rounds:
                try:  # a crash between the checkpoint and results.json loses nothing
                    writer.write_results()
                except OSError as exc:
                    raise unwritable(self.state_dir, done, exc) from None
            self._finish(self.driver.run(), hub, privacy)
        finally:
            grpc_server.stop(grace=2).wait(5)
            self.guard.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
            ledger.close()
        return 0

    def _probe(
        self, data: EvalData, evaluator: Any, layout: WeightLayout
    ) -> ValidationProbe | None:
        """``--validation-examples`` of the evaluation data, for each update's loss change."""
        size = self.config.validation_examples
        if size == 0:
            return None
        idx = held_out_indices(len(data.y), size, self.config.seed)
        x = data.x[idx]
        return ValidationProbe(
            lambda flat: evaluator.predict(layout.unflatten(flat), x), data.y[idx], data.num_classes
        )

    def _open_state(self, layout: WeightLayout) -> tuple[dict[str, Any] | None, Ledger]:
        """The newest checkpoint that verifies (checked against these settings) and the ledger,
        truncated to the checkpoint's round so that trust matches the weights."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        saved = checkpoint.load_latest(self.state_dir)
        done = 0 if saved is None else int(saved["round"])
        if saved is not None:
            check_resume(saved, self.config.to_dict(), layout.shapes, self.state_dir)
        try:
            ledger = Ledger(self.state_dir / "ledger.sqlite")
            if ledger.last_round() < done:
                log.warning("ledger ends at round %d but the checkpoint at %d: trust restarts "
                            "from the ledger", ledger.last_round(), done)  # fmt: skip
            if ledger.last_round() > done:
                print(
                    f"fedwarden serve: the ledger holds rounds after {done}, the last checkpoint"
                    " (a crash before it was written): they are dropped and will be re-run",
                    flush=True,
                )
            ledger.truncate_after(done)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"cannot open the trust ledger in {self.state_dir}: {exc}") from None
        return saved, ledger

    def _run_info(self, data: EvalData) -> RunInfo:
        o = self.options
        return RunInfo(
            self.config.to_dict(),
            unknown="unknown in a deployment: no ground truth",
            extra={
                "deployment": {
                    "state_dir": str(self.state_dir),
                    "min_clients": o.min_clients,
                    "round_timeout_s": o.round_timeout,
                    "transport": self._security(),
                    "eval_data": o.eval_data or f"{data.name} test split",
                }
            },
        )

    def _security(self) -> str:
        o = self.options
        return "plaintext" if o.insecure else ("mutual TLS" if o.tls_client_ca else "TLS")

    def _spec(self, data: EvalData, layout: WeightLayout) -> TrainingSpec:
        c = self.config
        dp_sgd = {
            "l2_norm_clip": c.dp_l2_clip,
            "noise_multiplier": c.dp_sgd_noise_multiplier,
            "num_microbatches": c.dp_microbatches,
        }
        return TrainingSpec(
            c.model, data.name, data.input_shape, data.num_classes, layout.shapes, c.lr,
            c.batch_size, c.local_epochs, c.seed, dp_sgd=dp_sgd if c.dp_sgd else None,
        )  # fmt: skip

    def _start(self, hub, auth, spec, ledger, layout, exporter, metrics):
        """Starts the gRPC service (and /metrics); returns both servers."""
        c, o = self.config, self.options

        def on_late(client_id: str, task_id: str) -> None:
            metrics.late.inc()
            exporter.count_rejected("late")
            log.info("late update from %s for task %s dropped", client_id, task_id)

        def on_rejected(client_id: str, reason: str, detail: str) -> None:
            exporter.count_rejected(reason, client_id=client_id or None)
            log.warning(
                "update from %s refused on arrival (%s): %s",
                client_id or "an unidentified caller",
                reason,
                detail,
            )

        hub.on_late = on_late
        servicer = FederationServicer(
            hub,
            auth,
            spec,
            ledger,
            max_update_bytes=layout.size * UPDATE_BYTES_PER_WEIGHT,
            on_rejected=on_rejected,
            max_inflight_bytes=inflight_upload_bytes(c, o, layout.size),
        )
        metrics.upload_bytes.set_function(servicer.inflight_bytes)
        metrics.upload_limit.set(servicer.max_inflight_bytes)
        self.guard = CallGuard(call_limits(o))
        self.guard.start()
        grpc_server = self._grpc_server(servicer, self.guard)
        metrics_server = (
            exporter.serve(c.metrics_port, host=o.metrics_host, web_config=o.metrics_web_config)
            if c.metrics_port is not None
            else None
        )
        self.metrics_port = metrics_server.port if metrics_server else None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        grpc_server.start()
        return grpc_server, metrics_server

    def _announce(self, done: int, metrics: bool, privacy: Any) -> None:
        c, o = self.config, self.options
        todo = f"rounds {done + 1}..{c.rounds}" if done < c.rounds else "every round is done"
        print(
            f"fedwarden serve: listening on {o.host}:{self.port} ({self._security()}"
            f"{', tokens' if o.tokens else ''}); "
            f"{f'metrics on {o.metrics_host}:{self.metrics_port}' if metrics else 'no live metrics (--metrics-port)'}"
            f"; {todo}",
            flush=True,
        )
        if privacy is not None:
            how = "given" if privacy.solved_for is None else f"solved for {c.rounds} rounds"
            budget = (
                f"; stops before epsilon would exceed {privacy.budget:g}"
                if privacy.budget is not None
                else ""
            )
            print(
                f"fedwarden serve: central DP, noise multiplier {privacy.noise_multiplier:.4g} "
                f"({how}), delta {privacy.delta:g}, accounted with sampling rate 1{budget}",
                flush=True,
            )

    def _finish(self, ending: str, hub: Hub, privacy: Any) -> None:
        """Tells agents training is over (unless stopped) and says how the run ended."""
        if ending == "stopped":
            print(
                f"fedwarden serve: stopped after round {hub.last_round}; the checkpoint is "
                f"kept, restart with the same --state-dir to resume",
                flush=True,
            )
            return
        hub.finish()
        hub.wait_told_done(LINGER_S)
        rounds = self.driver.history.rounds
        final = rounds[-1]["accuracy"] if rounds else float("nan")
        why = (
            f"{self.config.rounds} rounds"
            if ending == "done"
            else f"privacy budget spent after round {hub.last_round} (epsilon "
            f"{privacy.epsilon(hub.last_round):.4g} <= target {privacy.budget:g})"
        )
        print(f"fedwarden serve: done, {why}, accuracy {final:.3f}; results in "
              f"{self.state_dir}/results.json", flush=True)  # fmt: skip


class HubTransport:
    """The deployment's transport: the round's cohort among the agents connected to the hub.

    Waits for ``min_clients`` live agents, selects K (``[seed, 5, round, attempt]``), publishes
    the weights and collects updates until every selected agent answered, or the round timeout
    passed with at least ``min(min_clients, K)`` of them; otherwise the attempt is abandoned
    (None) and the driver asks again, for a fresh selection.
    """

    def __init__(
        self,
        hub: Hub,
        config: RunConfig,
        options: DeploymentConfig,
        metrics: ServeMetrics,
        exporter: Any,
        stopping: Callable[[], bool],
    ):
        self.hub, self.c, self.o = hub, config, options
        self.metrics, self.exporter, self.stopping = metrics, exporter, stopping
        self.attempts: dict[int, int] = {}  # round -> attempts abandoned so far
        self._waiting_since: float | None = None

    def collect(self, round_number: int, coordinator: Coordinator) -> Cohort | None:
        live = self.hub.wait_for_clients(self.o.min_clients, timeout=0.5)
        self.metrics.agents.set(len(live))
        if len(live) < self.o.min_clients:
            now = time.monotonic()
            if self._waiting_since is None or now - self._waiting_since > 30:
                benched = self.hub.benched_clients()
                print(
                    f"round {round_number}: waiting for agents ({len(live)} of "
                    f"{self.o.min_clients} connected"
                    + (f"; benched for silence: {', '.join(benched)}" if benched else "")
                    + ")",
                    flush=True,
                )
                self._waiting_since = now
            return None
        self._waiting_since = None
        attempt = self.attempts.get(round_number, 0)
        rng = np.random.default_rng([self.c.seed, 5, round_number, attempt])
        # Over-selection (Bonawitz et al. 2019): the round closes at clients_per_round answers.
        want = math.ceil(self.c.clients_per_round * self.o.overselect)
        selected = coordinator.select(live, want, rng)
        if not selected:
            log.warning("round %d: every live agent is quarantined; waiting", round_number)
            self.hub.wait_for_clients(len(live) + 1, timeout=1.0)
            return None
        payload = encode_vector(coordinator.weights, "float32")
        # Under a memory budget each update goes into the round's matrix as it arrives.
        bounded = coordinator.round_memory_budget is not None
        intake = coordinator.open_round(round_number, selected) if bounded else None
        self.hub.publish(
            round_number, attempt, selected, payload, sha256_hex(payload),
            target=self.c.clients_per_round, intake=intake,
        )  # fmt: skip
        faults.point("collect", round_number)
        need = min(self.o.min_clients, len(selected))
        updates, complete = self.hub.collect(
            need, time.monotonic() + self.o.round_timeout, stop=self.stopping
        )
        if complete:
            return Cohort(selected, updates if intake is None else intake, attempt)
        if intake is not None:
            intake.close()
        self.exporter.update_clients(client_rows(coordinator.trust, self.hub.silences))
        if not self.stopping():
            self.attempts[round_number] = attempt + 1
            self.metrics.abandoned.inc()
            answered = len({u.client_id for u in updates if u.client_id in selected})
            print(
                f"round {round_number}: only {answered} of {len(selected)} selected agents "
                f"answered within {self.o.round_timeout:g} s (need {need}); re-running the "
                "round with a new selection",
                flush=True,
            )
            if attempt + 1 >= self.o.max_attempts:
                raise UsageError(
                    f"round {round_number}: {attempt + 1} attempts abandoned (--max-attempts); "
                    f"silent so far: {self.hub.silences or 'nobody'}. The checkpoint of "
                    f"round {round_number - 1} is kept: restart with the same --state-dir "
                    "once enough agents answer"
                )
        return None


class Silences(Callback):
    """Records the selected agents that stayed silent this round in the ledger (before the
    checkpoint; their trust is left unchanged, silence is not evidence of poisoning) and exports
    every client's row with its silence count."""

    def __init__(self, hub: Hub, exporter: Any, state_dir: Path):
        self.hub, self.exporter, self.state_dir = hub, exporter, state_dir

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        trust = self.driver.coordinator.trust
        try:
            record_silence(trust, round, self.hub.take_silence())
        except (OSError, sqlite3.Error) as exc:
            raise unwritable(self.state_dir, round, exc) from None
        self.exporter.update_clients(client_rows(trust, self.hub.silences))


class RoundLog(Callback):
    """One line per round on stdout: accuracy, loss, admissions, rejections, flags, time."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        print(
            f"round {round}/{self.rounds}: accuracy {logs['accuracy']:.3f}, loss "
            f"{logs['loss']:.3f}, {logs['admitted']} of {len(logs['selected'])} updates "
            f"admitted, {logs['rejected']} rejected, flagged {logs['flagged'] or '-'} "
            f"({logs['duration_s']:.1f} s)",
            flush=True,
        )
