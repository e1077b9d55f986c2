"""The Prometheus exporter (server/metrics.py), checked by its parser, promtool and Prometheus."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedwarden.server.metrics import MetricsExporter

try:
    from tests.prom import PrometheusServer, http_get, prometheus_binary, promtool_binary
except ImportError:  # tests/ is not a package and pytest put tests/ itself on sys.path
    from prom import PrometheusServer, http_get, prometheus_binary, promtool_binary

CLIENT_METRICS = (
    "fedwarden_client_trust_score",
    "fedwarden_client_anomaly_score",
    "fedwarden_client_update_norm",
    "fedwarden_client_cosine_similarity",
    "fedwarden_client_flagged",
)


def client(cid: str, trust: float, **extra) -> dict:
    row = {"client_id": cid, "trust": trust, "anomaly": 1 - trust, "norm": 10 * (1 - trust),
           "cosine": trust, "flagged": trust < 0.5}  # fmt: skip
    return {**row, **extra}


def samples(exporter: MetricsExporter) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed back from the exposition text."""
    text = exporter.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def client_ids(exporter: MetricsExporter, metric: str = "fedwarden_client_trust_score") -> set:
    return {dict(labels)["client_id"] for name, labels in samples(exporter) if name == metric}


def test_metric_names_types_and_labels():
    exporter = MetricsExporter()
    exporter.observe_round(3, 0.91, 0.3, 1.5, [client("c01", 0.9), client("c02", 0.2)])
    exporter.count_rejected("non_finite", 2)
    exporter.set_dp_epsilon(1.25)
    text = exporter.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected_types = {
        **{name: "gauge" for name in CLIENT_METRICS},
        "fedwarden_clients_flagged": "gauge",
        "fedwarden_round": "gauge",
        "fedwarden_rounds": "counter",  # exposed as fedwarden_rounds_total
        "fedwarden_round_duration_seconds": "histogram",
        "fedwarden_test_accuracy": "gauge",
        "fedwarden_test_loss": "gauge",
        "fedwarden_updates_rejected": "counter",
        "fedwarden_dp_epsilon": "gauge",
    }
    for name, kind in expected_types.items():
        assert families[name].type == kind, name
    for name in CLIENT_METRICS:
        assert {tuple(s.labels) for s in families[name].samples} == {("client_id",)}
    s = samples(exporter)
    assert s[("fedwarden_client_trust_score", (("client_id", "c02"),))] == 0.2
    assert s[("fedwarden_client_flagged", (("client_id", "c02"),))] == 1.0
    assert s[("fedwarden_client_flagged", (("client_id", "c01"),))] == 0.0
    assert s[("fedwarden_clients_flagged", ())] == 1.0
    assert s[("fedwarden_rounds_total", ())] == 1.0
    assert s[("fedwarden_round", ())] == 3.0
    assert s[("fedwarden_test_accuracy", ())] == 0.91
    assert s[("fedwarden_round_duration_seconds_count", ())] == 1.0
    assert s[("fedwarden_updates_rejected_total", (("reason", "non_finite"),))] == 2.0
    assert s[("fedwarden_dp_epsilon", ())] == 1.25
    assert all(name.startswith("fedwarden_") for name in families)


def test_each_exporter_has_its_own_registry():
    a, b = MetricsExporter(), MetricsExporter()  # no "Duplicated timeseries"
    a.observe_round(1, None, None, 0.1, [client("x", 0.5)])
    assert client_ids(a) == {"x"} and client_ids(b) == set()
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("fedwarden_round") is None


def test_cardinality_cap_keeps_the_least_trusted():
    exporter = MetricsExporter(max_client_series=3)
    rows = [client(f"c{i:02d}", trust) for i, trust in enumerate([0.9, 0.1, 0.8, 0.3, 0.95, 0.2])]
    exporter.observe_round(1, 0.5, 1.0, 0.1, rows)
    for metric in CLIENT_METRICS:
        assert client_ids(exporter, metric) == {"c01", "c03", "c05"}, metric
    assert exporter.labelled_clients() == ["c01", "c05", "c03"]
    # the count of flagged clients covers everyone, not only the labelled ones
    assert samples(exporter)[("fedwarden_clients_flagged", ())] == 3.0


def test_series_of_clients_that_drop_out_disappear():
    exporter = MetricsExporter(max_client_series=2)
    exporter.observe_round(1, None, None, 0.1, [client("a", 0.2), client("b", 0.3)])
    exporter.set_dp_epsilon(2.0, client_id="a")
    assert client_ids(exporter, "fedwarden_client_dp_epsilon") == {"a"}
    # next round only c is scored; a recovers: it drops out of the two least trusted
    exporter.observe_round(2, None, None, 0.1, [client("a", 0.9), client("c", 0.1)])
    for metric in (*CLIENT_METRICS, "fedwarden_client_dp_epsilon"):
        assert "a" not in client_ids(exporter, metric), metric
    assert client_ids(exporter) == {"b", "c"}  # b was not in round 2 and keeps its series
    exporter.forget_client("b")
    assert client_ids(exporter) == {"a", "c"}  # room again for a
    exporter.forget_client("a")
    exporter.forget_client("c")
    assert client_ids(exporter) == set()


def test_missing_values_remove_only_that_series():
    exporter = MetricsExporter()
    exporter.observe_round(1, None, None, 0.1, [client("a", 0.4)])
    exporter.observe_round(2, None, None, 0.1, [client("a", 0.4, norm=None, cosine=float("nan"))])
    assert "a" in client_ids(exporter)
    assert client_ids(exporter, "fedwarden_client_update_norm") == set()
    assert client_ids(exporter, "fedwarden_client_cosine_similarity") == set()


def test_set_gauge():
    exporter = MetricsExporter()
    exporter.set_gauge("fedwarden_dp_clip_rate", 0.25)
    exporter.set_gauge("fedwarden_dp_clip_norm", 3.0)
    exporter.set_gauge("fedwarden_dp_clip_rate", 0.5)
    exporter.set_flag_line(4.98)
    s = samples(exporter)
    assert s[("fedwarden_dp_clip_rate", ())] == 0.5 and s[("fedwarden_dp_clip_norm", ())] == 3.0
    assert s[("fedwarden_flag_evidence_line", ())] == 4.98
    assert b"# HELP fedwarden_flag_evidence_line Evidence above which" in exporter.render()
    for bad in ("clip_rate", "fedwarden_Clip", "fedwarden_x_total", "fedwarden_round"):
        with pytest.raises(ValueError):
            exporter.set_gauge(bad, 1.0)


def test_write_textfile_is_atomic_and_parseable(tmp_path):
    exporter = MetricsExporter()
    exporter.observe_round(1, 0.8, 0.5, 2.0, [client("a", 0.3)])
    path = tmp_path / "fedwarden.prom"
    exporter.write_textfile(path)
    exporter.write_textfile(path)  # replacing an existing file
    assert [p.name for p in tmp_path.iterdir()] == ["fedwarden.prom"]  # no temporary left
    names = {f.name for f in text_string_to_metric_families(path.read_text())}
    assert "fedwarden_client_trust_score" in names


def test_promtool_accepts_the_textfile(tmp_path):
    promtool = promtool_binary()
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/system-deps)")
    exporter = MetricsExporter()
    exporter.observe_round(4, 0.8, 0.5, 2.0, [client("a", 0.3), client("b", 0.9)])
    exporter.count_rejected("wrong_shape")
    exporter.set_dp_epsilon(0.7)
    exporter.set_dp_epsilon(0.2, client_id="a")
    exporter.set_gauge("fedwarden_dp_clip_rate", 0.1)
    path = tmp_path / "fedwarden.prom"
    exporter.write_textfile(path)
    with open(path, "rb") as f:
        result = subprocess.run([promtool, "check", "metrics"], stdin=f, capture_output=True,
                                timeout=60)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_serve_answers_metrics_and_shuts_down():
    exporter = MetricsExporter()
    exporter.observe_round(1, None, None, 0.1, [client("c01", 0.6)])
    server = exporter.serve(0)
    try:
        status, body = http_get(server.url)
        assert status == 200 and b'fedwarden_client_trust_score{client_id="c01"} 0.6' in body
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
        assert http_get(server.url.replace("/metrics", "/nope"))[0] == 404
    finally:
        server.shutdown()
    with pytest.raises(OSError):
        http_get(server.url, timeout=2)


@pytest.mark.integration
def test_real_prometheus_scrapes_the_exporter(tmp_path):
    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/system-deps)")
    exporter = MetricsExporter()
    exporter.observe_round(1, 0.7, 0.6, 0.5, [client("c01", 0.25), client("c02", 0.8)])
    server = exporter.serve(0)
    try:
        with PrometheusServer([f"127.0.0.1:{server.port}"], tmp_path, scrape_interval="1s") as prom:
            result = prom.wait_for('fedwarden_client_trust_score{client_id="c01"}')
            assert float(result[0]["value"][1]) == pytest.approx(0.25)
            assert result[0]["metric"]["job"] == "fedwarden"
            # a change in the exporter shows up in a later scrape
            exporter.observe_round(2, 0.75, 0.5, 0.5, [client("c01", 0.15)])
            prom.wait_for(
                'fedwarden_client_trust_score{client_id="c01"}',
                lambda r: bool(r) and float(r[0]["value"][1]) == pytest.approx(0.15),
            )
            flagged = prom.wait_for("fedwarden_clients_flagged")
            assert float(flagged[0]["value"][1]) == 1.0
    finally:
        server.shutdown()
