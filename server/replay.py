"""A ledger's rounds decided again under other trust settings: what a flag line, an evidence
cap or other anomaly weights would have flagged, without running the federation again.

Every round's measurements are in the ledger (``client_rounds``), so the anomaly scores and the
flags that follow from them can be recomputed from its rows alone: the score with the given
weights (``aggregation/scoring.py``), then a fresh :class:`~fedwarden.server.trust.TrustBook`
under the given policy. The measurements themselves stay as recorded (the norm against the
step counts, the cosine to the reference the recorded flags shaped), and so does training: with
quarantine the clients a new line would have excluded still trained. The groups of copies are
read back from the rows (members of one group share a ``pair_gap`` under ``COPY_GAP`` or are
its recorded original, and have one norm), so an original found later gets its evidence back
as in the run (``TrustBook.update``, ``copies``). Flags by association are decided again from
the detector's forecasts the ledger keeps for every client-round (``histories``); a ledger
written before it kept them is replayed without association (``Ledger.records_histories``).

Example::

    with Ledger("runs/latest/ledger.sqlite", readonly=True) as ledger:
        flags = replay_flags(ledger, TrustPolicy(false_positive_rate=0.005))
    flags[-1]  # the clients flagged after the last round
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedwarden.aggregation.detection import COPY_GAP, HistoryForecast
from fedwarden.aggregation.scoring import (
    CLASS_VALIDATION_METRIC,
    EFFECT_METRIC,
    HISTORY_METRIC,
    METRIC_NAMES,
    NORM_SCALE_METRIC,
    STEPS_METRIC,
    VALIDATION_METRIC,
    anomaly_as_original,
    anomaly_components,
    anomaly_score,
    robust_z,
)
from fedwarden.server.trust import TrustBook, TrustPolicy

if TYPE_CHECKING:
    from fedwarden.server.ledger import Ledger

SCORED_KEYS = (*METRIC_NAMES, NORM_SCALE_METRIC, STEPS_METRIC, HISTORY_METRIC, VALIDATION_METRIC,
               CLASS_VALIDATION_METRIC, EFFECT_METRIC)  # fmt: skip
"""The recorded measurements the anomaly score reads (``loss_z`` is not stored: it is taken
again from the recorded losses)."""


def round_metrics(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The ``client_metrics`` of one round's scored rows, from their ledger columns: a key the
    round did not measure (every value missing) is left out, as the coordinator leaves it out."""
    metrics = {}
    for key in SCORED_KEYS:
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], np.float64)
        if np.isfinite(values).any():
            metrics[key] = values
    losses = [r.get("loss") for r in rows]
    if rows and all(loss is not None for loss in losses):
        metrics["loss_z"] = robust_z(np.array(losses, np.float64))
    return metrics


def recorded_copies(rows: list[dict[str, Any]]) -> np.ndarray:
    """``(K, K)`` booleans: the pairs of one round's scored rows that sent the same update, as
    their ledger columns show it (``copied`` marks an original whose ``pair_gap`` was measured
    without its copies)."""
    grouped = np.array(
        [(r.get("pair_gap") is not None and r["pair_gap"] < COPY_GAP) or r.get("copied") == 1
         for r in rows], bool,
    )  # fmt: skip
    norm = np.array([r["norm"] for r in rows], np.float64)
    same = np.isclose(norm[:, None], norm[None, :], rtol=1e-6, atol=0.0)
    twins = grouped[:, None] & grouped[None, :] & same
    np.fill_diagonal(twins, False)
    return twins


def replay_flags(
    ledger: Ledger,
    policy: TrustPolicy,
    anomaly_weights: dict[str, float] | None = None,
    last_round: int | None = None,
) -> list[set[str]]:
    """The clients flagged after each round 1..``last_round`` (default: the ledger's last) when
    the recorded measurements are scored with ``anomaly_weights`` (None: the defaults) and
    judged under ``policy``, association at ``policy.association_z`` when the ledger keeps the
    forecasts (``Ledger.records_histories``), else left out."""
    book = TrustBook(policy)
    history = HistoryForecast()  # the recorded forecasts and the copy groups read from the rows
    association = history.association if ledger.records_histories() else None
    last = ledger.last_round() if last_round is None else min(last_round, ledger.last_round())
    out: list[set[str]] = []
    for r in range(1, last + 1):
        rows = [row for row in ledger.round_rows(r) if not row.get("absent")]
        scored = [row for row in rows if row.get("norm") is not None]
        rejected = {row["client_id"]: 1 for row in rows if row.get("rejected_reason")}
        if association is not None:
            history.set_forecasts(ledger.round_histories(r))
        if scored or rejected:
            ids = [row["client_id"] for row in scored]
            metrics = round_metrics(scored)
            if "template_cosine" in metrics:
                history.record_template_cosines(ids, metrics["template_cosine"])
            anomaly = anomaly_score(metrics, anomaly_weights)
            alone = history.copies.add_round(ids, recorded_copies(scored))
            book.update(
                r, ids, anomaly, rejected, metrics=metrics,
                components=anomaly_components(metrics), association=association,
                copies=history.copies, alone=alone,
                as_original=anomaly_as_original(metrics, anomaly, anomaly_weights),
                weights=anomaly_weights,
            )  # fmt: skip
        out.append(book.flagged())
    return out
