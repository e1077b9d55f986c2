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
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import Counter, Gauge

from fedwarden.config import RunConfig
from fedwarden.errors import UsageError
from fedwarden.protocol.convert import TrainingSpec
from fedwarden.protocol.transfer import encode_vector, sha256_hex
from fedwarden.server import checkpoint, faults
from fedwarden.server.auth import AllowList, Authenticator, load_tokens
from fedwarden.server.hub import Hub, client_rows, record_silence
from fedwarden.server.service import CallGuard, CallLimits, FederationServicer, add_to_server

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


@dataclass
class ServeOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    min_clients: int = 2
    round_timeout_s: float = 120.0
    eval_data: str | None = None
    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    insecure: bool = False
    operators: list[str] = field(default_factory=list)
    compression: str = "none"
    max_agents: int = 64
    liveness_s: float = 10.0
    heartbeat_s: float = 2.0
    linger_s: float = 15.0  # after the last round, how long to wait for agents to hear DONE
    allow_clients: str | None = None
    allow_open_network: bool = False
    stall_timeout_s: float = 10.0
    min_transfer_rate: float = 64 * 1024
    idle_timeout_s: float = 300.0
    overselect: float = 1.3
    max_attempts: int = 5
    max_silences: int = 3
    bench_rounds: int = 5
    metrics_web_config: str | None = None

    def check(self) -> None:
        """Refuses insecure or contradictory settings with a message that says what to pass."""
        tls_files = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.insecure and any(tls_files):
            raise UsageError("--insecure (plaintext) cannot be combined with --tls-* options")
        if not self.insecure:
            if not (self.tls_cert and self.tls_key):
                raise UsageError(
                    "TLS needs --tls-cert and --tls-key (PEM files; see docs/deploy.md "
                    "to make them), or --insecure for plaintext on a trusted network"
                )
            if not (self.tokens or self.tls_client_ca):
                raise UsageError(
                    "no client authentication: pass --tokens FILE.toml and/or "
                    "--tls-client-ca FILE so each agent's identity comes from its "
                    "credentials (or --insecure for an open demo)"
                )
            if self.tls_client_ca and not (self.tokens or self.allow_clients):
                raise UsageError(
                    "mutual TLS needs --allow-clients FILE (client ids, optionally with "
                    "certificate fingerprints) or --tokens: otherwise every certificate the "
                    "CA ever signed is a training identity"
                )
        if self.insecure and not self.tokens and not _loopback(self.host):
            if not self.allow_open_network:
                raise UsageError(
                    f"an open coordinator (--insecure without --tokens) listens on loopback "
                    f"only. Received: --host {self.host}; use --tokens, or "
                    "--allow-open-network if anyone who can reach it may train"
                )
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--tokens", self.tokens),
            ("--eval-data", self.eval_data),
            ("--allow-clients", self.allow_clients),
            ("--metrics-web-config", self.metrics_web_config),
        ):
            if path and not Path(path).is_file():
                raise UsageError(f"{flag} file not found: {path}")
        if self.min_clients < 1:
            raise UsageError(
                f"--min-clients must be a positive integer. Received: {self.min_clients}"
            )
        if self.round_timeout_s <= 0:
            raise UsageError(f"--round-timeout must be positive. Received: {self.round_timeout_s}")
        for flag, value in (
            ("--stall-timeout", self.stall_timeout_s),
            ("--min-transfer-rate", self.min_transfer_rate),
            ("--idle-timeout", self.idle_timeout_s),
        ):
            if value <= 0:
                raise UsageError(f"{flag} must be positive. Received: {value}")
        if self.metrics_web_config:
            from fedwarden.server.metrics import WebConfig

            try:
                WebConfig.load(self.metrics_web_config)
            except (ValueError, ImportError) as exc:
                raise UsageError(f"--metrics-web-config: {exc}") from None
        if self.overselect < 1:
            raise UsageError(f"--overselect must be at least 1. Received: {self.overselect}")
        for flag, count in (("--max-attempts", self.max_attempts),
                            ("--max-silences", self.max_silences)):  # fmt: skip
            if count < 1:
                raise UsageError(f"{flag} must be a positive integer. Received: {count}")
        if self.compression not in COMPRESSION:
            raise UsageError(
                f"unknown compression {self.compression!r}. Accepted values: "
                f"{', '.join(COMPRESSION)}"
            )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def call_limits(options: ServeOptions) -> CallLimits:
    """Every call may wait on an agent; streaming calls are two per agent, and the unary calls
    (Register, Heartbeat, GetTrust) keep one worker per agent plus a few of their own."""
    streams = 2 * options.max_agents
    return CallLimits(
        max_calls=streams + options.max_agents + 8,
        max_streams=streams,
        stall_s=options.stall_timeout_s,
        min_rate=options.min_transfer_rate,
    )


@dataclass
class EvalData:
    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int


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


class Server:
    """One coordinator process: gRPC service, round loop, checkpoints, metrics.

    Example::

        Server(config, ServeOptions(Path("runs/serve"), insecure=True)).run()
    """

    def __init__(self, config: RunConfig, options: ServeOptions):
        options.check()
        self.config = config
        self.options = options
        self._stop = False
        self.port: int | None = None
        self.metrics_port: int | None = None

    @property
    def stopping(self) -> bool:
        return self._stop

    def request_stop(self, *_: Any) -> None:
        """Graceful stop (SIGTERM): abandon the round in progress, keep the last checkpoint."""
        self._stop = True

    # -- setup -------------------------------------------------------------------------------

    def _authenticator(self) -> Authenticator:
        o = self.options
        tokens, operator_tokens = load_tokens(o.tokens) if o.tokens else ({}, {})
        auth = Authenticator(
            tokens,
            operator_tokens,
            mutual_tls=bool(o.tls_client_ca),
            operator_names=o.operators,
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
        idle_ms = int(o.idle_timeout_s * 1000)
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

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        from fedwarden.models import Evaluator, build_model
        from fedwarden.server.coordinator import Coordinator
        from fedwarden.server.defence import build_chain, central_privacy, trust_policy
        from fedwarden.server.ledger import Ledger
        from fedwarden.server.metrics import MetricsExporter
        from fedwarden.server.optimizers import ServerOptimizer
        from fedwarden.server.trust import TrustBook
        from fedwarden.weights import WeightLayout

        c, o = self.config, self.options
        auth = self._authenticator()
        data = load_eval_data(c, o.eval_data)
        input_shape = tuple(int(d) for d in data.x.shape[1:])
        model = build_model(c.model, data.name, input_shape, data.num_classes, c.seed)
        evaluator = Evaluator(model)
        layout = WeightLayout.of(model.get_weights())
        # A deployment does not know its population, nor sample it the Poisson way the
        # accountant assumes: central DP is accounted without subsampling (rate 1, conservative).
        privacy = central_privacy(c, c.clients_per_round, budget=True)
        chain = build_chain(c, privacy, seed=None)
        chain.check(min(o.min_clients, c.clients_per_round))

        o.state_dir.mkdir(parents=True, exist_ok=True)
        saved = checkpoint.load_latest(o.state_dir)
        done = 0 if saved is None else int(saved["round"])
        if saved is not None and tuple(map(tuple, saved["layout"])) != layout.shapes:
            raise UsageError(
                f"{o.state_dir} holds a run of another model (weight shapes "
                f"{saved['layout']}); use a new --state-dir"
            )
        try:
            ledger = Ledger(o.state_dir / "ledger.sqlite")
            if ledger.last_round() < done:
                log.warning(
                    "ledger ends at round %d but the checkpoint at %d: trust restarts from the "
                    "ledger",
                    ledger.last_round(),
                    done,
                )
            if ledger.last_round() > done:
                print(
                    f"fedwarden serve: the ledger holds rounds after {done}, the last checkpoint"
                    " (a crash before it was written): they are dropped and will be re-run",
                    flush=True,
                )
            ledger.truncate_after(done)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"cannot open the trust ledger in {o.state_dir}: {exc}") from None
        policy = trust_policy(c)
        coordinator = Coordinator(
            layout.flatten(model.get_weights()),
            chain,
            ServerOptimizer(c.server_optimizer, c.server_lr, c.server_momentum),
            TrustBook(policy, ledger),
            anomaly_weights=c.anomaly_weights,
        )
        state: dict[str, Any] = {"rounds": [], "examples": {}}
        if saved is not None:
            coordinator.load_state_dict(saved["coordinator"])
            state = {"rounds": saved["rounds"], "examples": saved["examples"]}
            print(f"fedwarden serve: resuming after round {done} from {o.state_dir}", flush=True)

        spec = TrainingSpec(
            c.model,
            data.name,
            input_shape,
            data.num_classes,
            layout.shapes,
            c.lr,
            c.batch_size,
            c.local_epochs,
            c.seed,
            dp_sgd={
                "l2_norm_clip": c.dp_l2_clip,
                "noise_multiplier": c.dp_sgd_noise_multiplier,
                "num_microbatches": c.dp_microbatches,
            }
            if c.dp_sgd
            else None,
        )
        hub = Hub(
            c.rounds,
            liveness_s=o.liveness_s,
            heartbeat_interval_s=o.heartbeat_s,
            max_silences=o.max_silences,
            bench_rounds=o.bench_rounds,
            poll_to_select=auth.open,
        )
        hub.set_last_round(done)
        exporter = MetricsExporter()
        metrics = ServeMetrics(exporter.registry)
        if state["rounds"]:  # a restarted coordinator shows trust before its first round
            last = state["rounds"][-1]
            exporter.restore(done, last["accuracy"], last["loss"], ledger.list_clients())
        if privacy is not None and done:
            exporter.set_dp_epsilon(privacy.epsilon(done))

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
            max_update_bytes=layout.size * 8,
            on_rejected=on_rejected,
        )
        guard = CallGuard(call_limits(o))
        guard.start()
        grpc_server = self._grpc_server(servicer, guard)
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
        todo = f"rounds {done + 1}..{c.rounds}" if done < c.rounds else "every round is done"
        security = "plaintext" if o.insecure else ("mutual TLS" if o.tls_client_ca else "TLS")
        print(
            f"fedwarden serve: listening on {o.host}:{self.port} ({security}"
            f"{', tokens' if o.tokens else ''}); metrics on "
            f"{f'{o.metrics_host}:{self.metrics_port}' if metrics_server else 'none'}; {todo}",
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
        loop = _RoundLoop(
            self, coordinator, evaluator, layout, data, hub, exporter, metrics, privacy, state
        )
        if state["rounds"]:  # a crash between the checkpoint and results.json loses nothing
            try:
                checkpoint.write_json_atomic(o.state_dir / "results.json", loop.results())
            except OSError as exc:
                grpc_server.stop(0)
                raise unwritable(o.state_dir, done, exc) from None
        try:
            ending = loop.run(done + 1)
            if ending != "stopped":
                hub.finish()
                hub.wait_told_done(o.linger_s)
                final = state["rounds"][-1]["accuracy"] if state["rounds"] else float("nan")
                why = (
                    f"{c.rounds} rounds"
                    if ending == "done"
                    else f"privacy budget spent after round {hub.last_round} (epsilon "
                    f"{privacy.epsilon(hub.last_round):.4g} <= target {privacy.budget:g})"
                )
                print(
                    f"fedwarden serve: done, {why}, accuracy {final:.3f}; results in "
                    f"{o.state_dir}/results.json",
                    flush=True,
                )
            else:
                print(
                    f"fedwarden serve: stopped after round {hub.last_round}; the checkpoint is "
                    f"kept, restart with the same --state-dir to resume",
                    flush=True,
                )
        finally:
            grpc_server.stop(grace=2).wait(5)
            guard.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
            ledger.close()
        return 0


def unwritable(state_dir: Path, round_number: int, exc: Exception) -> UsageError:
    """The error that stops a coordinator whose state dir cannot be written (e.g. disk full)."""
    saved = checkpoint.list_checkpoints(state_dir)
    kept = f"round {saved[0][0]}" if saved else "nothing"
    return UsageError(
        f"round {round_number}: cannot write the state dir {state_dir} "
        f"({type(exc).__name__}: {exc}); the coordinator stops, its last checkpoint is "
        f"{kept}: free space or fix the directory, then restart with the same --state-dir "
        "to resume from it"
    )


@dataclass
class _RoundLoop:
    server: Server
    coordinator: Any  # fedwarden.server.coordinator.Coordinator
    evaluator: Any  # fedwarden.models.Evaluator
    layout: Any  # fedwarden.weights.WeightLayout
    data: EvalData
    hub: Hub
    exporter: Any  # fedwarden.server.metrics.MetricsExporter
    metrics: ServeMetrics
    privacy: Any  # fedwarden.server.defence.CentralPrivacy or None
    state: dict[str, Any]  # "rounds" (results.json records), "examples" (per client)

    @property
    def c(self) -> RunConfig:
        return self.server.config

    @property
    def o(self) -> ServeOptions:
        return self.server.options

    def stopping(self) -> bool:
        return self.server.stopping

    def held(self, round_number: int) -> bool:
        """True while ``STATE_DIR/PAUSE`` exists, unless it names a later round to hold before."""
        try:
            text = (self.o.state_dir / PAUSE_FILE).read_text().strip()
        except FileNotFoundError:
            return False
        return not (text.isdigit() and int(text) > round_number)

    def run(self, first_round: int) -> str:
        """Runs rounds from ``first_round``: "done" (every round), "budget" (the privacy budget
        allows no more) or "stopped" (a stop was requested)."""
        round_number, attempt, waiting_since, held = first_round, 0, None, False
        while round_number <= self.c.rounds:
            if self.stopping():
                return "stopped"
            if self.privacy is not None and not self.privacy.allows(round_number):
                spent = self.privacy.epsilon(round_number - 1) if round_number > 1 else 0.0
                print(
                    f"round {round_number}: not started: it would take epsilon from {spent:.4g} "
                    f"to {self.privacy.epsilon(round_number):.4g}, above the target "
                    f"{self.privacy.budget:g} (delta {self.privacy.delta:g}); stopping with the "
                    f"checkpoint of round {round_number - 1}",
                    flush=True,
                )
                return "budget"
            if self.held(round_number):
                if not held:
                    print(
                        f"round {round_number}: held by {self.o.state_dir / PAUSE_FILE}; delete "
                        "it to continue",
                        flush=True,
                    )
                held = True
                time.sleep(0.5)
                continue
            held = False
            live = self.hub.wait_for_clients(self.o.min_clients, timeout=0.5)
            self.metrics.agents.set(len(live))
            if len(live) < self.o.min_clients:
                now = time.monotonic()
                if waiting_since is None or now - waiting_since > 30:
                    benched = self.hub.benched_clients()
                    print(
                        f"round {round_number}: waiting for agents ({len(live)} of "
                        f"{self.o.min_clients} connected"
                        + (f"; benched for silence: {', '.join(benched)}" if benched else "")
                        + ")",
                        flush=True,
                    )
                    waiting_since = now
                continue
            waiting_since = None
            rng = np.random.default_rng([self.c.seed, 5, round_number, attempt])
            # Over-selection (Bonawitz et al. 2019): the round closes at clients_per_round answers.
            want = math.ceil(self.c.clients_per_round * self.o.overselect)
            selected = self.coordinator.select(live, want, rng)
            if not selected:
                log.warning("round %d: every live agent is quarantined; waiting", round_number)
                self.hub.wait_for_clients(len(live) + 1, timeout=1.0)
                continue
            if self._round(round_number, attempt, selected):
                round_number, attempt = round_number + 1, 0
            elif not self.stopping():
                attempt += 1
                if attempt >= self.o.max_attempts:
                    raise UsageError(
                        f"round {round_number}: {attempt} attempts abandoned (--max-attempts); "
                        f"silent so far: {self.hub.silences or 'nobody'}. The checkpoint of "
                        f"round {round_number - 1} is kept: restart with the same --state-dir "
                        "once enough agents answer"
                    )
        return "done"

    def _round(self, round_number: int, attempt: int, selected: list[str]) -> bool:
        start = time.perf_counter()
        payload = encode_vector(self.coordinator.weights, "float32")
        self.hub.publish(
            round_number, attempt, selected, payload, sha256_hex(payload),
            target=self.c.clients_per_round,
        )  # fmt: skip
        faults.point("collect", round_number)
        need = min(self.o.min_clients, len(selected))
        updates, complete = self.hub.collect(
            need, time.monotonic() + self.o.round_timeout_s, stop=self.stopping
        )
        answered = len({u.client_id for u in updates if u.client_id in selected})
        if not complete:
            self.exporter.update_clients(client_rows(self.coordinator.trust, self.hub.silences))
            if not self.stopping():
                self.metrics.abandoned.inc()
                print(
                    f"round {round_number}: only {answered} of {len(selected)} selected agents "
                    f"answered within {self.o.round_timeout_s:g} s (need {need}); re-running the "
                    "round with a new selection",
                    flush=True,
                )
            return False
        faults.point("aggregate", round_number)
        try:
            outcome = self.coordinator.finish_round(round_number, selected, updates)
        except (OSError, sqlite3.Error) as exc:  # the ledger could not be written
            raise unwritable(self.o.state_dir, round_number, exc) from None
        silent = self.hub.take_silence()
        try:
            record_silence(self.coordinator.trust, round_number, silent)
        except (OSError, sqlite3.Error) as exc:
            raise unwritable(self.o.state_dir, round_number, exc) from None
        faults.point("ledger", round_number)
        loss, accuracy = self.evaluator.evaluate(
            self.layout.unflatten(self.coordinator.weights), self.data.x, self.data.y
        )
        elapsed = time.perf_counter() - start
        self.exporter.observe_round(round_number, accuracy, loss, elapsed, outcome.clients)
        self.exporter.update_clients(client_rows(self.coordinator.trust, self.hub.silences))
        for r in outcome.rejected:
            self.exporter.count_rejected(r.reason, client_id=r.client_id)
        for u in updates:
            if u.client_id in outcome.admitted:
                self.state["examples"][u.client_id] = int(u.num_examples)
        record: dict[str, Any] = {}
        if self.privacy is not None:
            record["epsilon"] = self.privacy.epsilon(round_number)
            self.exporter.set_dp_epsilon(record["epsilon"])
            for key, value in outcome.measurements.items():
                if key.endswith("clip_rate"):
                    self.exporter.set_gauge("fedwarden_dp_clip_rate", value)
                elif key.endswith("/clip_norm"):
                    self.exporter.set_gauge("fedwarden_dp_clip_norm", value)
        self.state["rounds"].append(
            {
                **record,
                "round": round_number,
                "accuracy": accuracy,
                "loss": loss,
                "attack_success_rate": None,
                "flagged": outcome.flagged,
                "selected": outcome.selected,
                "admitted": len(outcome.admitted),
                "rejected": len(outcome.rejected),
                "rejections": [
                    {"client_id": r.client_id, "reason": r.reason} for r in outcome.rejected
                ],
                "attempts": attempt + 1,
                "duration_s": elapsed,
                "measurements": checkpoint.jsonable(outcome.measurements),
            }
        )
        try:
            checkpoint.save(
                self.o.state_dir,
                round_number,
                {
                    "coordinator": self.coordinator.state_dict(),
                    "layout": self.layout.shapes,
                    "config": self.c.to_dict(),
                    **self.state,
                },
            )
            faults.point("results", round_number)
            checkpoint.write_json_atomic(self.o.state_dir / "results.json", self.results())
        except OSError as exc:
            raise unwritable(self.o.state_dir, round_number, exc) from None
        self.hub.set_last_round(round_number)
        print(
            f"round {round_number}/{self.c.rounds}: accuracy {accuracy:.3f}, loss {loss:.3f}, "
            f"{len(outcome.admitted)} of {len(selected)} updates admitted, "
            f"{len(outcome.rejected)} rejected, flagged {outcome.flagged or '-'} "
            f"({elapsed:.1f} s)",
            flush=True,
        )
        return True

    def results(self) -> dict[str, Any]:
        """results.json, with the simulations' contract (ground truth about attackers: null)."""
        rounds = self.state["rounds"]
        last = rounds[-1]
        snapshot = self.coordinator.trust.snapshot()
        ids = sorted(set(snapshot) | set(self.state["examples"]))
        o = self.o
        return {
            "config": self.c.to_dict(),
            "deployment": {
                "state_dir": str(o.state_dir),
                "min_clients": o.min_clients,
                "round_timeout_s": o.round_timeout_s,
                "transport": "plaintext"
                if o.insecure
                else ("mutual TLS" if o.tls_client_ca else "TLS"),
                "eval_data": o.eval_data or f"{self.data.name} test split",
            },
            "rounds": rounds,
            "final": {
                "accuracy": last["accuracy"],
                "loss": last["loss"],
                "attack_success_rate": None,
                "detection": {
                    "precision": None,
                    "recall": None,
                    "note": "unknown in a deployment: no ground truth",
                },
                "privacy": self.privacy_report(len(rounds)),
            },
            "clients": {
                cid: {
                    "malicious": None,
                    "trust": snapshot[cid].trust if cid in snapshot else None,
                    "flagged": bool(snapshot[cid].flagged) if cid in snapshot else False,
                    "num_examples": self.state["examples"].get(cid),
                }
                for cid in ids
            },
            "aggregator": repr(self.coordinator.chain),
            "attack": None,
        }

    def privacy_report(self, rounds_run: int) -> dict[str, Any] | None:
        if self.privacy is None:
            return None
        report = self.privacy.report(rounds_run)
        report["client_sampling"] = "none assumed (sampling rate 1): a conservative bound"
        return {"central": report}
