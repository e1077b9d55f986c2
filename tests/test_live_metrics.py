"""A real Prometheus server scrapes a live `fedwarden simulate --metrics-port` (issue 4)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prom import PrometheusServer, free_port, prometheus_binary


@pytest.mark.integration
def test_prometheus_scrapes_trust_scores_from_a_live_simulation(tmp_path: Path):
    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/system-deps)")
    port = free_port()
    # Many short rounds keep the simulation alive while Prometheus scrapes; it is stopped as soon
    # as the series has been read back, never waited out.
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedwarden",
            "simulate",
            "--rounds",
            "400",
            "--clients",
            "10",
            "--clients-per-round",
            "10",
            "--local-epochs",
            "1",
            "--attack",
            "gaussian",
            "--aggregator",
            "median",
            "--metrics-port",
            str(port),
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with PrometheusServer(
            [f"127.0.0.1:{port}"], tmp_path / "prom", scrape_interval="1s"
        ) as prom:
            series = prom.wait_for(
                "fedwarden_client_trust_score", lambda r: len(r) == 10, timeout=120
            )
            trust = {s["metric"]["client_id"]: float(s["value"][1]) for s in series}
            assert all(0.0 <= t <= 1.0 for t in trust.values())
            rounds = prom.wait_for(
                "fedwarden_round", lambda r: bool(r) and float(r[0]["value"][1]) >= 3, timeout=120
            )
            assert float(rounds[0]["value"][1]) >= 3
            # the attackers' trust falls below every honest client's and they are flagged, as
            # Prometheus sees it (the malicious set comes from the run's own results.json)
            results = json.loads((tmp_path / "run" / "results.json").read_text())
            malicious = {c for c, v in results["clients"].items() if v["malicious"]}
            assert len(malicious) == 2

            def ids(r):
                return {s["metric"]["client_id"] for s in r}

            prom.wait_for(
                "bottomk(2, fedwarden_client_trust_score)", lambda r: ids(r) == malicious,
                timeout=120,
            )  # fmt: skip
            prom.wait_for("fedwarden_client_flagged == 1", lambda r: ids(r) == malicious, 120)
        assert sim.poll() is None, sim.stderr.read()
    finally:
        sim.kill()
        sim.wait()
