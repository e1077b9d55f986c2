"""The per-client records every layer shares: what one client did in one round, and its trust.

``ClientRound`` is the one declaration of a client's round: the coordinator builds one per scored
client (scores, then trust's verdict), and its fields drive the ledger's ``client_rounds``
columns (``LEDGER_COLUMNS``), the rounds ``fedwarden trust show`` prints and the wire carries
(``HISTORY_KEYS``, the proto's ``ClientRound``) and the per-client Prometheus gauges
(``GAUGES``). A new measurement is one new field here; the ledger gains its column when opened.

``LIST_KEYS`` is the other record: a client's standing across rounds (``trust list``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LIST_KEYS = ("client_id", "trust", "anomaly", "flagged", "quarantined", "rounds", "last_round",
             "rejected", "evidence", "explanation")  # fmt: skip
"""Keys of each ``trust list --format json`` entry (the first five are the stable contract)."""


def _field(
    kind: type,
    *,
    stored: bool = True,
    shown: bool = True,
    gauge: tuple[str, str] | None = None,
) -> Any:
    """One ``ClientRound`` field.

    Args:
      kind: ``float``, ``int``, ``bool``, ``str`` or ``dict``: the ledger's SQL type and the
        wire's field type follow from it.
      stored: a column of the ledger's ``client_rounds``.
      shown: in ``trust show`` and on the wire (``HISTORY_KEYS``).
      gauge: ``(metric name, help)`` of the per-client Prometheus gauge, if it has one.
    """
    metadata = {"kind": kind, "stored": stored, "shown": shown, "gauge": gauge}
    if kind is dict:
        return field(default_factory=dict, metadata=metadata)
    return field(default=False if kind is bool else None, metadata=metadata)


@dataclass(frozen=True)
class ClientRound:
    """One client's round: its measurements against the cohort, its anomaly score and the trust
    verdict after the round. A measurement the round did not take is None (or NaN).

    Example::

        row = ClientRound("c07", round=3, anomaly=0.8, norm=41.0)
        row = dataclasses.replace(row, trust=0.4, flagged=True)
        row.to_dict()  # {"client_id": "c07", "round": 3, ...}, for the exporter and TensorBoard
    """

    client_id: str
    round: int | None = _field(int, stored=False)  # the ledger's key column, with client_id
    anomaly: float | None = _field(
        float,
        gauge=("fedwarden_client_anomaly_score", "Anomaly score in [0, 1] of the client's last round."),
    )  # fmt: skip
    trust: float | None = _field(
        float, gauge=("fedwarden_client_trust_score", "Trust score in [0, 1] of the client.")
    )
    flagged: bool = _field(
        bool, gauge=("fedwarden_client_flagged", "1 if the client is flagged, else 0.")
    )
    quarantined: bool = _field(bool)
    norm: float | None = _field(
        float,
        gauge=("fedwarden_client_update_norm", "L2 norm of the client's last admitted update."),
    )  # fmt: skip
    norm_z: float | None = _field(float)
    cosine: float | None = _field(
        float, gauge=("fedwarden_client_cosine_similarity", "Cosine similarity of the client's "
                      "last update to the robust aggregate."),
    )  # fmt: skip
    distance: float | None = _field(float)
    krum_score: float | None = _field(float)
    trimmed_share: float | None = _field(float)
    loss: float | None = _field(float)
    loss_z: float | None = _field(float, stored=False, shown=False)
    pair_gap: float | None = _field(float)
    cluster_outlier: float | None = _field(float)
    median_cosine: float | None = _field(float, shown=False)
    history_error: float | None = _field(float)
    evidence: float | None = _field(
        float, gauge=("fedwarden_client_flag_evidence", "Evidence (a standard score) that the "
                      "client misbehaves; flagged above the false-positive rate's line."),
    )  # fmt: skip
    rejected_reason: str | None = _field(str)
    explanation: str | None = _field(str)  # for a flagged client: which signals, by how much
    quarantined_since: int | None = _field(int, shown=False)
    signals: str | None = _field(str, shown=False)  # JSON: the anomaly components of the score
    evidence_state: str | None = _field(str, shown=False)  # JSON: the flag rule's running sums
    weight: float | None = _field(float, stored=False, shown=False)  # its aggregation weight
    signal_excess: dict = _field(dict, stored=False, shown=False)  # a flagged client's signals

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (a shallow copy), for consumers of plain rows."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(ClientRound)

LEDGER_COLUMNS: dict[str, type] = {f.name: f.metadata["kind"] for f in FIELDS
                                   if f.metadata.get("stored")}  # fmt: skip
"""The ledger's ``client_rounds`` columns besides its key (round, client_id), with their kinds."""

HISTORY_KEYS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.metadata.get("shown"))
"""Keys of each round in ``trust show --format json``, and the fields of the proto's
``ClientRound``."""

GAUGES: dict[str, tuple[str, str]] = {
    f.name: f.metadata["gauge"] for f in FIELDS if f.metadata.get("gauge")
}
"""Field -> (metric name, help) of each per-client gauge that comes from the round record."""


def list_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A ``trust list`` entry from a ledger or wire row: its ``LIST_KEYS``."""
    return {k: row.get(k) for k in LIST_KEYS}


def show_entry(client: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``trust show`` object: the client's ``list_entry`` plus ``history``, one dict of
    ``HISTORY_KEYS`` per round."""
    return {**list_entry(client), "history": [{k: r.get(k) for k in HISTORY_KEYS} for r in history]}
