"""TensorBoard logs of a federation, written with TensorFlow's own summary writer.

One run directory per run (``compare`` writes one per cell, so TensorBoard overlays them), flushed
after every round so ``tensorboard --logdir`` shows a running simulation or deployment live:

* round scalars: ``round/accuracy``, ``round/loss``, ``round/attack_success_rate``,
  ``detection/precision``, ``detection/recall``, ``privacy/epsilon``, and every numeric
  aggregation measurement under ``aggregation/`` (clip norm, rows trimmed or selected, ...);
* per-client scalars ``client_trust/<id>`` and ``client_anomaly/<id>`` for each round's cohort,
  laid out by the custom scalars plugin as one chart of all clients each;
* histograms of the cohort's update norms and anomaly scores;
* the trust heatmap (clients x rounds, malicious clients marked on the left) as an image.

Example::

    writer = TensorBoardWriter("runs/tb/median", malicious={"c03"})
    writer.write_round(record, [row.to_dict() for row in outcome.clients], trust_snapshot)
    writer.close()
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.report import detection_summary
from fedwarden.server.callbacks import Callback

ROUND_SCALARS = {
    "accuracy": "round/accuracy",
    "loss": "round/loss",
    "attack_success_rate": "round/attack_success_rate",
    "precision": "detection/precision",
    "recall": "detection/recall",
    "epsilon": "privacy/epsilon",
    "duration_s": "round/duration_seconds",
}
CLIENT_SCALARS = {"trust": "client_trust", "anomaly": "client_anomaly"}
HEATMAP_EVERY = 5  # rounds between heatmap images (each is a full re-render)
HEATMAP_MAX_CLIENTS = 500  # beyond this the heatmap is not drawn (rows of a few pixels each)
_CELL = 6  # pixels per heatmap cell


class TensorBoardWriter:
    """Writes one run's rounds to ``logdir`` (created if missing).

    Args:
      logdir: the run's directory; TensorBoard shows it as one run.
      malicious: client ids marked on the heatmap (simulations know them; deployments do not).
    """

    def __init__(self, logdir: str | Path, malicious: set[str] | frozenset[str] = frozenset()):
        import tensorflow as tf

        self._tf = tf
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.malicious = set(malicious)
        self._writer = tf.summary.create_file_writer(str(self.logdir))
        self._trust_history: dict[str, list[float]] = {}
        self._rounds = 0
        self._write_layout()

    def _write_layout(self) -> None:
        from tensorboard.plugins.custom_scalar import layout_pb2
        from tensorboard.plugins.custom_scalar import summary as cs_summary

        charts = [
            layout_pb2.Chart(
                title=f"{name} (every client)",
                multiline=layout_pb2.MultilineChartContent(tag=[rf"^{prefix}/"]),
            )
            for name, prefix in CLIENT_SCALARS.items()
        ]
        layout = layout_pb2.Layout(category=[layout_pb2.Category(title="clients", chart=charts)])
        with self._writer.as_default():
            self._tf.summary.experimental.write_raw_pb(cs_summary.pb(layout).SerializeToString(), 0)

    def write_round(
        self,
        record: dict[str, Any],
        clients: list[dict[str, Any]],
        trust: dict[str, float | None],
    ) -> None:
        """Writes one round.

        Args:
          record: the round's record (``round`` plus any of the keys of ``ROUND_SCALARS`` and a
            ``measurements`` dict); None or non-finite values are skipped.
          clients: the round's scored client rows (``client_id``, ``anomaly``, ``norm``, ...).
          trust: every known client's trust after the round (None for a client not seen yet);
            the heatmap shows them all, up to ``HEATMAP_MAX_CLIENTS``.
        """
        tf = self._tf
        step = int(record["round"])
        with self._writer.as_default(step=step):
            for key, tag in ROUND_SCALARS.items():
                _scalar(tf, tag, record.get(key), step)
            for key, value in (record.get("measurements") or {}).items():
                _scalar(tf, f"aggregation/{key}", value, step)
            for row in clients:  # the cohort only: a population of 10,000 is not charted
                cid = row["client_id"]
                _scalar(tf, f"client_anomaly/{cid}", row.get("anomaly"), step)
                _scalar(tf, f"client_trust/{cid}", trust.get(cid), step)
            for key in ("norm", "anomaly"):
                values = [row[key] for row in clients if _finite(row.get(key))]
                if values:
                    tf.summary.histogram(f"cohort/update_{key}", np.array(values), step=step)
            if len(trust) <= HEATMAP_MAX_CLIENTS:
                for cid in trust:
                    self._trust_history.setdefault(cid, [math.nan] * self._rounds)
            for cid, history in self._trust_history.items():
                value = trust.get(cid)
                history.append(float(value) if _finite(value) else math.nan)
            self._rounds += 1
            if step % HEATMAP_EVERY == 0:
                self._heatmap(step)
        self._writer.flush()

    def _heatmap(self, step: int) -> None:
        ids = sorted(self._trust_history)
        if not ids:
            return
        trust = np.array([self._trust_history[c] for c in ids])
        self._tf.summary.image(
            "trust/heatmap", trust_image(trust, [c in self.malicious for c in ids]), step=step
        )

    def close(self) -> None:
        """Writes the last heatmap and closes the file."""
        if self._rounds and self._rounds % HEATMAP_EVERY:
            with self._writer.as_default():
                self._heatmap(self._rounds)
        self._writer.close()


def trust_image(trust: np.ndarray, malicious: list[bool]) -> np.ndarray:
    """A (1, H, W, 3) uint8 image of a clients x rounds trust matrix: red (0) to green (1), grey
    where a client had no trust yet, a black stripe on the left of malicious clients' rows."""
    t = np.clip(np.nan_to_num(trust, nan=-1.0), -1.0, 1.0)
    rgb = np.stack([1.0 - t, t, np.zeros_like(t)], axis=-1)
    rgb[t < 0] = 0.6
    marker = np.where(np.array(malicious)[:, None, None], 0.0, 1.0) * np.ones((len(t), 1, 3))
    rgb = np.concatenate([marker, rgb], axis=1)
    pixels = np.repeat(np.repeat(rgb, _CELL, axis=0), _CELL, axis=1)
    return (pixels[None] * 255).astype(np.uint8)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and math.isfinite(float(value))


def _scalar(tf: Any, tag: str, value: Any, step: int) -> None:
    if _finite(value):
        tf.summary.scalar(tag, float(value), step=step)


class TensorBoard(Callback):
    """The round driver's callback writing a run to TensorBoard (Keras' ``TensorBoard`` for
    federations): ``RoundDriver(..., callbacks=[TensorBoard("runs/tb/median")])``.

    Args:
      logdir: the run's directory.
      malicious: the known malicious clients (simulations); with them, each round also gets
        ``detection/precision`` and ``detection/recall`` of the clients flagged so far.
    """

    def __init__(self, logdir: str | Path, malicious: set[str] | frozenset[str] = frozenset()):
        self.logdir, self.malicious = Path(logdir), set(malicious)
        self.writer: TensorBoardWriter | None = None

    def on_run_begin(self, logs: dict[str, Any]) -> None:
        self.writer = TensorBoardWriter(self.logdir, self.malicious)

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        record = dict(logs)
        if self.malicious:
            record.update(detection(set(logs.get("flagged") or ()), self.malicious))
        snapshot = self.driver.coordinator.trust.snapshot()
        trust = {cid: state.trust for cid, state in snapshot.items()}
        for cid in self.driver.population or ():
            trust.setdefault(cid, None)
        clients = [row.to_dict() for row in self.driver.outcome.clients]
        self.writer.write_round(record, clients, trust)

    def on_run_end(self, logs: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()


def detection(flagged: set[str], malicious: set[str]) -> dict[str, float | None]:
    """Precision (None when nothing is flagged) and recall of ``flagged`` against ``malicious``."""
    summary = detection_summary([flagged], malicious)
    return {"precision": summary["precision"], "recall": summary["recall"]}


def log_dir(setting: str | None, out: Path) -> Path | None:
    """Where a run's TensorBoard logs go: ``setting``, ``out/tensorboard`` when None, or
    nowhere for ``"off"``."""
    if setting == "off":
        return None
    return Path(setting) if setting else Path(out) / "tensorboard"
