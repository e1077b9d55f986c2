"""TensorBoard logs: read back with TensorBoard's own event reader and served by real TensorBoard."""

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from tests.prom import free_port

pytest.importorskip("tensorflow")
from fedwarden.server.tensorboard import TensorBoardWriter, trust_image  # noqa: E402

IDS = ["c00", "c01", "c02"]


def write_run(logdir, rounds=6):
    writer = TensorBoardWriter(logdir, malicious={"c02"})
    for r in range(1, rounds + 1):
        record = {
            "round": r,
            "accuracy": 0.5 + 0.05 * r,
            "loss": 1.0 / r,
            "attack_success_rate": None,
            "precision": 1.0,
            "recall": float("nan"),
            "measurements": {"clip/clip_rate": 0.25, "note": "text is skipped"},
        }
        clients = [{"client_id": c, "anomaly": 0.1 * i, "norm": 1.0 + i} for i, c in enumerate(IDS)]
        trust = {"c00": 0.9, "c01": 0.8, "c02": 1.0 - 0.1 * r}
        writer.write_round(record, clients, trust)
    writer.close()


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    values = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        values[tag] = [(e.step, e.tensor_proto) for e in events]
    return acc, values


def test_round_and_client_scalars_read_back(tmp_path):
    write_run(tmp_path / "run")
    acc, values = scalars(tmp_path / "run")
    import tensorflow as tf

    accuracy = [(s, float(tf.make_ndarray(t))) for s, t in values["round/accuracy"]]
    assert accuracy == [(r, pytest.approx(0.5 + 0.05 * r)) for r in range(1, 7)]
    trust = [float(tf.make_ndarray(t)) for _, t in values["client_trust/c02"]]
    assert trust == pytest.approx([1.0 - 0.1 * r for r in range(1, 7)])
    assert "aggregation/clip/clip_rate" in values
    assert "aggregation/note" not in values
    assert "detection/recall" not in values  # NaN is skipped, not written
    assert "round/attack_success_rate" not in values
    assert {"cohort/update_norm", "cohort/update_anomaly", "trust/heatmap"} <= set(values)


def test_trust_image_marks_malicious_rows_and_unknown_trust():
    image = trust_image(np.array([[np.nan, 1.0], [0.0, 0.5]]), [False, True])
    assert image.shape == (1, 2 * 6, 3 * 6, 3) and image.dtype == np.uint8
    cell = lambda row, col: image[0, row * 6, col * 6]  # noqa: E731
    assert list(cell(0, 0)) == [255, 255, 255]  # honest: no marker
    assert list(cell(1, 0)) == [0, 0, 0]  # malicious marker
    assert list(cell(0, 1)) == [153, 153, 153]  # no trust yet: grey
    assert list(cell(0, 2)) == [0, 255, 0] and list(cell(1, 1)) == [255, 0, 0]


@pytest.mark.integration
def test_tensorboard_server_serves_the_runs(tmp_path):
    for name in ("mean", "median"):
        write_run(tmp_path / "tb" / name)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        tags = _poll_json(proc, f"{base}/data/plugin/scalars/tags", lambda t: len(t) == 2)
        assert set(tags) == {"mean", "median"}
        assert {"round/accuracy", "client_trust/c00"} <= set(tags["median"])
        query = urllib.parse.urlencode({"run": "median", "tag": "round/accuracy"})
        points = _poll_json(proc, f"{base}/data/plugin/scalars/scalars?{query}", bool)
        assert [p[1] for p in points] == list(range(1, 7))
        assert points[-1][2] == pytest.approx(0.8)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _poll_json(proc, url, ready, timeout=120.0):
    """GETs url until ready(json) holds; TensorBoard loads the logdir in the background."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                last = json.loads(response.read())
            if ready(last):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.2)  # polling interval of a readiness check, not a wait for a result
    raise AssertionError(f"{url} not ready after {timeout} s; last answer {last!r}")


@pytest.mark.slow
def test_simulate_and_compare_write_tensorboard_runs(tmp_path):
    import fedwarden

    common = dict(clients=6, clients_per_round=6, rounds=2, local_epochs=1, progress=False)
    fedwarden.simulate(out=str(tmp_path / "sim"), attack="gaussian", aggregator="median", **common)
    _, values = scalars(tmp_path / "sim" / "tensorboard")
    assert [step for step, _ in values["round/accuracy"]] == [1, 2]
    assert "detection/recall" in values and any(t.startswith("client_trust/") for t in values)

    tb = tmp_path / "tb"
    fedwarden.compare(["gaussian"], ["mean", "median"], out=str(tmp_path / "grid"),
                      tensorboard=str(tb), **common)  # fmt: skip
    runs = sorted(p.name for p in tb.iterdir())
    assert len(runs) == 4 and all(any((tb / r).glob("events.out.tfevents.*")) for r in runs), runs
    assert not (tmp_path / "grid" / "runs" / runs[0] / "tensorboard").exists()
