"""Every Grafana panel's query, run against a real Prometheus scraping a live deployment.

Grafana itself cannot run here; Prometheus can, and a panel is only as good as its query. The
deployment holds what the dashboard is for: honest agents, a red-team agent that ends flagged, and
central DP, so every panel has something to show.
"""

import json

import pytest

from tests.deploy_helpers import (
    ROOT,
    SERVE_ARGS,
    TOKENS,
    Proc,
    split_data,
    write_tokens,
)
from tests.prom import PrometheusServer, poll, prometheus_binary

DASHBOARD = ROOT / "deploy/grafana/dashboards/fedwarden.json"
RED_TOKENS = {**TOKENS, "c04": "f" * 32}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def test_the_dashboard_has_queries():
    titles = {title for title, _ in panel_queries()}
    assert {"Trust per client", "Anomaly score per client", "Flagged clients",
            "Flag evidence per client", "Why flagged: signals"} <= titles  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_every_panel_returns_data_from_a_live_deployment(tmp_path, procs):
    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/system-deps)")
    split_dir, state = tmp_path / "split", tmp_path / "state"
    split_data(split_dir, 5)
    tokens = write_tokens(tmp_path / "tokens.toml", RED_TOKENS)
    state.mkdir()
    (state / "PAUSE").write_text("5")  # hold after round 4 while Prometheus is queried
    coordinator = Proc("coordinator", "serve", *SERVE_ARGS, "--aggregator", "mean",
                       *"--rounds 5 --min-clients 5 --clients-per-round 5 --port 0".split(),
                       "--dp", "central", "--dp-clip", "5", "--dp-noise-multiplier", "0.01", "--dp-delta", "1e-5",
                       "--metrics-port", "0", "--state-dir", str(state), "--tokens", str(tokens),
                       "--insecure")  # fmt: skip
    procs.append(coordinator)
    listening = coordinator.wait_for(
        r"listening on 127\.0\.0\.1:(\d+).*metrics on 127\.0\.0\.1:(\d+)", 120
    )
    port, metrics_port = int(listening.group(1)), int(listening.group(2))
    for cid, token in RED_TOKENS.items():
        attack = ["--attack", "gaussian", "--attack-cohort", "5"] if cid == "c04" else []
        procs.append(
            Proc(
                cid,
                "agent",
                "--server",
                f"127.0.0.1:{port}",
                "--client-id",
                cid,
                "--data",
                str(split_dir / f"{cid}.npz"),
                "--insecure",
                *attack,
                env={"FEDWARDEN_TOKEN": token},
            )  # fmt: skip
        )
    coordinator.wait_for(r"^round 5: held by", 600)

    queries = panel_queries()
    with PrometheusServer(
        [f"127.0.0.1:{metrics_port}"], tmp_path / "prom", scrape_interval="1s"
    ) as prom:

        def empty_panels() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries if not prom.query(expr)]

        try:
            poll(lambda: not empty_panels(), 60, what="every dashboard panel to return a series")
        except TimeoutError:
            pytest.fail("panels with no data: " + "; ".join(empty_panels()))
    # serve writes TensorBoard logs beside its state by default, flushed every round
    from tests.test_tensorboard import scalars

    _, values = scalars(state / "tensorboard")
    assert [step for step, _ in values["round/accuracy"]] == [1, 2, 3, 4]
    assert any(tag.startswith("client_trust/") for tag in values)
