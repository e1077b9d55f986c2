"""Prometheus metrics of a fedwarden run: rounds, accuracy, per-client trust, rejections, DP.

The exporter owns its :class:`~prometheus_client.CollectorRegistry` (never the process-global
one), so several runs or tests in one process do not collide. Serve it over HTTP
(:meth:`MetricsExporter.serve`) for Prometheus to scrape, or write it for node_exporter's
textfile collector (:meth:`MetricsExporter.write_textfile`).

Per-client series carry one label, ``client_id``. To bound cardinality only the
``max_client_series`` least-trusted clients are labelled (the ones worth watching); a client
that leaves that set, or is forgotten, has its series removed.

Metrics (gauges unless marked):

- ``fedwarden_client_trust_score{client_id}``: trust in [0, 1] after the client's last round
- ``fedwarden_client_anomaly_score{client_id}``: anomaly in [0, 1] of its last round
- ``fedwarden_client_update_norm{client_id}``: L2 norm of its last admitted update
- ``fedwarden_client_cosine_similarity{client_id}``: cosine of that update to the aggregate
- ``fedwarden_client_flagged{client_id}``: 1 if flagged, else 0
- ``fedwarden_client_flag_evidence{client_id}``: evidence that the client misbehaves (a standard
  score; ``server/trust.py`` flags it above the line its false-positive rate sets)
- ``fedwarden_client_flag_signal_excess{client_id,signal}``: for a flagged client only, each
  signal's accumulated excess over the population (``collusion``, ``cosine``, ...; the signals
  the score weighs): why it is flagged and by how much, as ``fedwarden trust show`` explains it
- ``fedwarden_client_dp_epsilon{client_id}``: DP-SGD epsilon spent by the client
- ``fedwarden_client_refused_updates{client_id}``: its updates rejected at admission or refused
  on arrival, since the exporter started
- ``fedwarden_client_silent_attempts{client_id}``: round attempts it was selected for and did not
  answer, since the coordinator started (silence, not malice: it does not change trust)
- ``fedwarden_flag_evidence_line``: the evidence above which a client is flagged (under the
  evidence rule; :meth:`MetricsExporter.set_flag_line`)
- ``fedwarden_clients_flagged``: number of clients flagged (all, not only the labelled ones)
- ``fedwarden_round``: last completed round; ``fedwarden_rounds_total`` (counter): rounds
  completed by this process; ``fedwarden_round_duration_seconds`` (histogram): wall time
- ``fedwarden_test_accuracy``, ``fedwarden_test_loss``: held-out metrics of the last evaluation
- ``fedwarden_updates_rejected_total{reason}`` (counter): updates rejected at admission, or
  refused on arrival by the gRPC transport (reasons: ``server/admission.py``)
- ``fedwarden_dp_epsilon``: central DP epsilon spent so far
- ``fedwarden_dp_clip_rate``, ``fedwarden_dp_clip_norm``, ...: set with ``set_gauge``

Serving: loopback by default, at most ``max_connections`` connections at once (more are closed
on arrival), each with a ``timeout_s`` socket timeout (a client that sends or reads nothing is
dropped). A web config file in the Prometheus exporter-toolkit format adds TLS and basic auth::

    tls_server_config:
      cert_file: metrics.pem
      key_file: metrics.key
      client_ca_file: ca.pem              # optional: then client certificates are required
    basic_auth_users:
      prometheus: $2b$12$...              # bcrypt hash: htpasswd -nBC 12 "" | tr -d ':'

Example::

    exporter = MetricsExporter()
    server = exporter.serve(9100)
    exporter.observe_round(3, accuracy=0.91, loss=0.3, duration_s=2.1,
                           clients=[{"client_id": "c07", "trust": 0.2, "anomaly": 0.8,
                                     "norm": 41.0, "cosine": -0.9, "flagged": True}])
    server.shutdown()
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fedwarden.records import GAUGES, optional_float
from fedwarden.server.admission import ARRIVAL_REASONS, REASONS

ROUND_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

FLAG_LINE_GAUGE = "fedwarden_flag_evidence_line"

EXTRA_GAUGES = {
    FLAG_LINE_GAUGE: "Evidence above which a client is flagged (the trust policy's flag line).",
    "fedwarden_dp_clip_rate": "Share of client updates clipped in the last round.",
    "fedwarden_dp_clip_norm": "Clip norm applied in the last round (fixed or adaptive).",
    "fedwarden_dp_noise_multiplier": "Noise multiplier of the central DP mechanism.",
}
"""Unlabelled gauges known to :meth:`MetricsExporter.set_gauge` (others may be created)."""

_NAME = re.compile(r"^fedwarden_[a-z][a-z0-9_]*[a-z0-9]$")
_RESERVED_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created", "_info")

# Per-client gauges: key in the client rows, metric name, help. The round record's own
# (records.GAUGES: trust, anomaly, ...) and the transport's counts.
_CLIENT_GAUGES = (
    *((key, name, help) for key, (name, help) in GAUGES.items()),
    ("refused", "fedwarden_client_refused_updates", "Updates of the client rejected at admission "
     "or refused on arrival."),
    ("silent", "fedwarden_client_silent_attempts", "Round attempts the client was selected for "
     "and did not answer."),
)  # fmt: skip


class MetricsServer:
    """A running /metrics HTTP endpoint; ``shutdown()`` stops it and frees the port."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class MetricsExporter:
    """Prometheus metrics of one run, in their own registry.

    Args:
        registry: where to register the metrics (default: a new ``CollectorRegistry``).
        max_client_series: how many clients, the least trusted first, get per-client series.
    """

    def __init__(self, registry: CollectorRegistry | None = None, max_client_series: int = 100):
        if max_client_series < 0:
            raise ValueError(
                f"max_client_series must be >= 0. Received: max_client_series={max_client_series}."
            )
        self.registry = CollectorRegistry() if registry is None else registry
        self.max_client_series = max_client_series
        self._lock = threading.Lock()
        self._clients: dict[str, dict[str, Any]] = {}  # latest row of every client seen
        self._epsilons: dict[str, float] = {}  # per-client DP-SGD epsilon
        self._labelled: set[str] = set()
        r = self.registry
        self._client_gauges = {
            key: Gauge(name, text, ["client_id"], registry=r) for key, name, text in _CLIENT_GAUGES
        }
        self._client_epsilon = Gauge(
            "fedwarden_client_dp_epsilon", "DP-SGD epsilon spent by the client.", ["client_id"],
            registry=r,
        )  # fmt: skip
        self._signal_excess = Gauge(
            "fedwarden_client_flag_signal_excess", "A flagged client's accumulated excess over "
            "the population in one anomaly signal.", ["client_id", "signal"], registry=r,
        )  # fmt: skip
        self._signal_labels: dict[str, set[str]] = {}  # flagged clients' signal series
        self._clients_flagged = Gauge(
            "fedwarden_clients_flagged", "Number of clients currently flagged.", registry=r
        )
        self._round = Gauge("fedwarden_round", "Last completed round.", registry=r)
        self._rounds = Counter("fedwarden_rounds", "Rounds completed by this process.", registry=r)
        self._duration = Histogram(
            "fedwarden_round_duration_seconds", "Wall time of one round.",
            buckets=ROUND_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self._accuracy = Gauge(
            "fedwarden_test_accuracy", "Accuracy on held-out test data.", registry=r
        )
        self._loss = Gauge("fedwarden_test_loss", "Loss on held-out test data.", registry=r)
        self._rejected = Counter(
            "fedwarden_updates_rejected", "Client updates rejected at admission.", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in (*REASONS, *ARRIVAL_REASONS):  # zeros, so rates and sums exist from the start
            self._rejected.labels(reason=reason)
        self._epsilon = Gauge(
            "fedwarden_dp_epsilon", "Central DP epsilon spent so far (at the run's delta).",
            registry=r,
        )  # fmt: skip
        self._extra: dict[str, Gauge] = {}

    # -- rounds and clients ----------------------------------------------------------------

    def observe_round(
        self,
        round: int,
        accuracy: float | None,
        loss: float | None,
        duration_s: float,
        clients: list[dict[str, Any]],
    ) -> None:
        """Records one completed round.

        Args:
            round: the round number.
            accuracy, loss: held-out metrics; None leaves the previous values.
            duration_s: wall time of the round.
            clients: rows with ``client_id`` and any of ``trust``, ``anomaly``, ``norm``,
                ``cosine``, ``flagged`` (extra keys are ignored): this round's cohort or the
                whole trust snapshot. The exporter remembers each client's latest row, so a
                client not selected this round keeps its series. A None or NaN value removes
                that one series.
        """
        self._round.set(round)
        self._rounds.inc()
        self._duration.observe(max(float(duration_s), 0.0))
        self._set_test_metrics(accuracy, loss)
        self.update_clients(clients)

    def update_clients(self, clients: list[dict[str, Any]]) -> None:
        """Merges rows (``client_id`` and any per-client values) into the clients' latest rows,
        without counting a round: e.g. every known client's trust after a round."""
        with self._lock:
            for row in clients:
                cid = str(row["client_id"])
                self._clients[cid] = {**self._clients.get(cid, {}), **row, "client_id": cid}
            self._relabel()

    def restore(
        self, round: int, accuracy: float | None, loss: float | None, clients: list[dict[str, Any]]
    ) -> None:
        """Sets the last round's values and the clients' rows as a restarted process resumes
        (from its checkpoint and ledger), without counting a round this process did not run."""
        self._round.set(round)
        self._set_test_metrics(accuracy, loss)
        self.update_clients(clients)

    def _set_test_metrics(self, accuracy: float | None, loss: float | None) -> None:
        """The held-out metrics; a missing (None or NaN) one keeps its previous value."""
        if optional_float(accuracy) is not None:
            self._accuracy.set(float(accuracy))
        if optional_float(loss) is not None:
            self._loss.set(float(loss))

    def forget_client(self, client_id: str) -> None:
        """Drops a client that left the federation, with its series."""
        with self._lock:
            self._clients.pop(client_id, None)
            self._epsilons.pop(client_id, None)
            self._relabel()

    def labelled_clients(self) -> list[str]:
        """The clients that currently have per-client series, least trusted first."""
        with self._lock:
            return [cid for cid in self._ranked() if cid in self._labelled]

    def _ranked(self) -> list[str]:
        def key(cid: str) -> tuple[bool, float, str]:
            trust = optional_float(self._clients[cid].get("trust"))
            return (trust is None, 0.0 if trust is None else trust, cid)

        return sorted(self._clients, key=key)

    def _relabel(self) -> None:
        """Sets the series of the least-trusted clients and removes everyone else's."""
        keep = set(self._ranked()[: self.max_client_series])
        for cid in self._labelled - keep:
            for gauge in (*self._client_gauges.values(), self._client_epsilon):
                gauge.remove(cid)
        for cid in keep:
            row = self._clients[cid]
            for key, _, _ in _CLIENT_GAUGES:
                value = optional_float(row.get(key))
                if key == "flagged":
                    value = 1.0 if row.get(key) else 0.0
                if value is None:
                    self._client_gauges[key].remove(cid)
                else:
                    self._client_gauges[key].labels(client_id=cid).set(value)
            if cid in self._epsilons:
                self._client_epsilon.labels(client_id=cid).set(self._epsilons[cid])
        for cid in set(self._signal_labels) | keep:
            self._set_signal_excess(cid, cid in keep)
        self._labelled = keep
        self._clients_flagged.set(sum(bool(r.get("flagged")) for r in self._clients.values()))

    # -- counters and extra gauges ---------------------------------------------------------

    def _set_signal_excess(self, cid: str, labelled: bool) -> None:
        """A flagged, labelled client's positive signal excesses; nobody else has the series."""
        row = self._clients.get(cid, {})
        excess = (row.get("signal_excess") or {}) if labelled and row.get("flagged") else {}
        shown = {name: float(v) for name, v in excess.items() if optional_float(v) and v > 0}
        for name in self._signal_labels.get(cid, set()) - set(shown):
            self._signal_excess.remove(cid, name)
        for name, value in shown.items():
            self._signal_excess.labels(client_id=cid, signal=name).set(value)
        if shown:
            self._signal_labels[cid] = set(shown)
        else:
            self._signal_labels.pop(cid, None)

    def count_rejected(self, reason: str, n: int = 1, client_id: str | None = None) -> None:
        """Counts ``n`` updates rejected for ``reason`` (e.g. ``non_finite``), and against
        ``client_id`` when the sender is known (``fedwarden_client_refused_updates``)."""
        if n < 0:
            raise ValueError(f"n must be >= 0. Received: n={n}.")
        self._rejected.labels(reason=str(reason)).inc(n)
        if client_id is not None:
            with self._lock:
                row = self._clients.setdefault(client_id, {"client_id": client_id})
                row["refused"] = row.get("refused", 0) + n
                self._relabel()

    def set_dp_epsilon(self, epsilon: float, client_id: str | None = None) -> None:
        """Sets the central epsilon, or a client's DP-SGD epsilon when ``client_id`` is given.

        A client's epsilon is exported while the client is among the labelled clients.
        """
        if client_id is None:
            self._epsilon.set(float(epsilon))
            return
        with self._lock:
            self._epsilons[client_id] = float(epsilon)
            if client_id in self._labelled:
                self._client_epsilon.labels(client_id=client_id).set(float(epsilon))

    def set_flag_line(self, evidence: float) -> None:
        """The evidence above which a client is flagged (``TrustPolicy.flag_z``), for dashboards
        to draw beside ``fedwarden_client_flag_evidence``."""
        self.set_gauge(FLAG_LINE_GAUGE, evidence)

    def set_gauge(self, name: str, value: float, help: str | None = None) -> None:
        """Sets an unlabelled gauge such as ``fedwarden_dp_clip_rate``, creating it on first use.

        ``name`` must start with ``fedwarden_``, follow Prometheus naming (lowercase, digits,
        underscores), not end in a suffix reserved for other types (``_total``, ...), and not
        be one of the exporter's own metrics.
        """
        gauge = self._extra.get(name)
        if gauge is None:
            if not _NAME.match(name) or name.endswith(_RESERVED_SUFFIXES):
                raise ValueError(
                    "gauge names must look like fedwarden_<lowercase_words> and not end in "
                    f"{', '.join(_RESERVED_SUFFIXES)}. Received: {name!r}."
                )
            text = help or EXTRA_GAUGES.get(name, f"{name} as reported by the coordinator.")
            try:
                gauge = Gauge(name, text, registry=self.registry)
            except ValueError as err:  # already registered by the exporter itself
                raise ValueError(f"{name!r} is a built-in metric; use its own method.") from err
            self._extra[name] = gauge
        gauge.set(float(value))

    # -- output ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def write_textfile(self, path: str | os.PathLike) -> None:
        """Writes the metrics to ``path`` atomically (temporary file in the same directory, then
        rename), for node_exporter's textfile collector (which reads only ``*.prom`` files, so
        the temporary file is never half read)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.render())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def serve(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        web_config: str | os.PathLike | None = None,
        max_connections: int = 16,
        timeout_s: float = 5.0,
    ) -> MetricsServer:
        """Serves ``/metrics`` on ``host:port`` from a daemon thread (port 0: the OS picks one,
        read it from the returned server's ``port``).

        Args:
            port, host: where to listen (loopback unless told otherwise).
            web_config: an exporter-toolkit web config file (TLS, basic auth; see above).
            max_connections: connections served at once; more are closed on arrival.
            timeout_s: socket timeout of each connection (TLS handshake, request, response).
        """
        config = WebConfig.load(web_config) if web_config else WebConfig()
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s

            def do_GET(self) -> None:
                if not config.authorized(self.headers.get("Authorization")):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="fedwarden"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404, "try /metrics")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        httpd = _BoundedHTTPServer((host, port), Handler, max_connections, config.ssl_context())
        thread = threading.Thread(
            target=httpd.serve_forever, name=f"fedwarden-metrics-{port}", daemon=True
        )
        thread.start()
        return MetricsServer(httpd, thread)

    def __repr__(self) -> str:
        return f"MetricsExporter(max_client_series={self.max_client_series})"


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them: a connection beyond the
    cap is closed at once. TLS, when configured, is negotiated in the connection's thread under
    its socket timeout, so a silent client cannot hold the accept loop."""

    daemon_threads = True
    request_queue_size = 64  # a burst waits in the kernel, not for SYN retransmissions

    def __init__(self, address, handler, max_connections: int, tls: ssl.SSLContext | None):
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1. Received: {max_connections}.")
        self._slots = threading.BoundedSemaphore(max_connections)
        self._tls = tls
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            if self._tls is not None:
                request.settimeout(self.RequestHandlerClass.timeout)
                try:
                    request = self._tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request) -> None:
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        request.close()


class WebConfig:
    """TLS and basic auth of ``/metrics``, from a Prometheus exporter-toolkit web config file.

    Supported keys: ``tls_server_config`` (``cert_file``, ``key_file``, optional
    ``client_ca_file`` with ``client_auth_type`` ``RequireAndVerifyClientCert`` (the default
    with a CA) or ``VerifyClientCertIfGiven``, optional ``min_version`` ``TLS12``/``TLS13``) and
    ``basic_auth_users`` (user: bcrypt hash). Paths are relative to the file.
    """

    def __init__(self, tls: dict[str, Any] | None = None, users: dict[str, str] | None = None):
        self.tls = tls
        self.users = {u: h.encode() for u, h in (users or {}).items()}
        self._verified: set[bytes] = set()  # digests of header values that passed bcrypt

    @classmethod
    def load(cls, path: str | os.PathLike) -> WebConfig:
        import yaml

        path = Path(path)
        try:
            table = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"metrics web config {path}: {exc}") from None
        unknown = sorted(set(table) - {"tls_server_config", "basic_auth_users"})
        if not isinstance(table, dict) or unknown:
            raise ValueError(
                f"metrics web config {path}: supported keys are tls_server_config and "
                f"basic_auth_users. Received: {unknown or type(table).__name__}"
            )
        tls = table.get("tls_server_config")
        if tls is not None:
            if not isinstance(tls, dict) or not tls.get("cert_file") or not tls.get("key_file"):
                raise ValueError(
                    f"metrics web config {path}: tls_server_config needs cert_file and key_file"
                )
            tls = {k: str(path.parent / v) if k.endswith("_file") else v for k, v in tls.items()}
        users = table.get("basic_auth_users") or {}
        for user, hashed in users.items():
            if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ValueError(
                    f"metrics web config {path}: the password of {user!r} must be a bcrypt "
                    "hash ($2b$...), e.g. from htpasswd -nBC 12 USER"
                )
        if users:
            import bcrypt  # noqa: F401  (fail at startup, not at the first scrape)
        return cls(tls, users)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        tls = self.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = {"TLS13": ssl.TLSVersion.TLSv1_3}.get(
            tls.get("min_version", "TLS12"), ssl.TLSVersion.TLSv1_2
        )
        context.load_cert_chain(tls["cert_file"], tls["key_file"])
        if tls.get("client_ca_file"):
            context.load_verify_locations(tls["client_ca_file"])
            optional = tls.get("client_auth_type") == "VerifyClientCertIfGiven"
            context.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
        return context

    def authorized(self, header: str | None) -> bool:
        """True without users, else for ``Basic`` credentials whose password matches."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        digest = hashlib.sha256(header.encode()).digest()
        if any(hmac.compare_digest(digest, seen) for seen in self._verified):
            return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        import bcrypt

        hashed = self.users.get(user)
        if hashed is None or not bcrypt.checkpw(password.encode(), hashed):
            return False
        self._verified.add(digest)  # bcrypt is slow on purpose; Prometheus scrapes often
        return True
