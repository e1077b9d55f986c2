"""Test helper: a real Prometheus server that scrapes given targets, and a way to query it.

Reusable by any test that wants to see metrics the way Prometheus sees them (the exporter unit
test, or a live ``fedwarden simulate --metrics-port``)::

    with PrometheusServer(["127.0.0.1:9100"], tmp_path) as prom:
        result = prom.wait_for('fedwarden_client_trust_score{client_id="c01"}')

Ports come from the OS; waiting is polling with a deadline, never a fixed sleep. Tests skip
when :func:`prometheus_binary` is None (``scripts/system-deps`` installs Debian's prometheus).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server binary, None if not installed."""
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    """Path of ``promtool``, None if not installed."""
    return shutil.which("promtool")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); connection errors raise ``OSError``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def poll(
    check: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Calls ``check`` until it returns a truthy value (returned) or ``timeout`` seconds pass
    (``TimeoutError`` naming ``what`` and the last exception, if any)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


class PrometheusServer:
    """A throwaway Prometheus scraping ``targets`` (``host:port`` of /metrics endpoints).

    Args:
        targets: scrape targets, all in one job (``job`` label).
        workdir: directory for the config, the TSDB and the log (e.g. pytest's ``tmp_path``).
        scrape_interval: how often to scrape, a Prometheus duration such as ``"1s"``.
        job: the job name.
        metrics_path: path scraped on each target.
    """

    def __init__(
        self,
        targets: list[str],
        workdir: str | Path,
        scrape_interval: str = "1s",
        job: str = "fedwarden",
        metrics_path: str = "/metrics",
    ):
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.job = job
        self.metrics_path = metrics_path
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _write_config(self) -> Path:
        targets = ", ".join(f"'{t}'" for t in self.targets)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  scrape_timeout: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            f"  - job_name: '{self.job}'\n"
            f"    metrics_path: '{self.metrics_path}'\n"
            "    static_configs:\n"
            f"      - targets: [{targets}]\n"
        )
        return config

    def start(self, timeout: float = 90.0, attempts: int = 3) -> PrometheusServer:
        """Starts Prometheus and waits until it reports ready (retrying if its port was taken)."""
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (see scripts/system-deps)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        for attempt in range(attempts):
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            try:
                poll(self._ready, timeout, what=f"prometheus ready on port {self.port}")
                return self
            except RuntimeError:  # exited early, e.g. the port was taken meanwhile
                self.stop()
                if attempt == attempts - 1:
                    raise
            except TimeoutError as err:
                self.stop()
                raise TimeoutError(f"{err}\n--- prometheus log ---\n{self.log_tail()}") from err
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"prometheus exited with code {self._proc.returncode}:\n{self.log_tail()}"
            )
        status, _ = http_get(f"{self.url}/-/ready", timeout=2)
        return status == 200

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; the ``result`` list of a vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        status, body = http_get(url)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise ValueError(f"query {expr!r} failed ({status}): {data}")
        return data["data"]["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 60.0,
    ) -> list[dict[str, Any]]:
        """Polls ``expr`` until ``predicate(result)`` holds; returns that result."""
        holder: list[list[dict[str, Any]]] = []

        def check() -> bool:
            result = self.query(expr)
            holder[:] = [result]
            return predicate(result)

        try:
            poll(check, timeout, interval=0.25, what=f"{expr!r} to match")
        except TimeoutError as err:
            targets = self.query("up")
            raise TimeoutError(
                f"{err}; last result {holder[0] if holder else None}; up={targets}\n"
                f"--- prometheus log ---\n{self.log_tail()}"
            ) from err
        return holder[0]

    def stop(self) -> None:
        """Stops Prometheus (SIGTERM, then SIGKILL after 20 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
