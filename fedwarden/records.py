"""The per-client records every layer shares: what one client did in one round, and its standing.

``ClientRound`` is the one declaration of a client's round: the coordinator builds one per scored
client (scores, then trust's verdict), and its fields drive the ledger's ``client_rounds``
columns (``LEDGER_COLUMNS``), the rounds ``fedwarden trust show`` prints and the wire carries
(``HISTORY_KEYS``, the proto's ``ClientRound``) and the per-client Prometheus gauges
(``GAUGES``). A new measurement is one new field here; the ledger gains its column when opened.

``ClientSummary`` is the other record: a client's standing across its rounds, what its latest
round left plus counts over all of them. It is also the trust book's state of the client
(``server/trust.py``), and its fields drive the ledger's ``clients`` columns (``CLIENT_COLUMNS``),
the ``trust list`` entries (``LIST_KEYS``), the proto's ``ClientTrust`` (``TRUST_KEYS``) and the
exporter's per-client rows. The summary fields a round's record also carries are trust's verdict
after that round (``VERDICT_KEYS``). A new standing is one new field here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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


def optional_float(value: Any) -> float | None:
    """A float field's value from a measurement (numpy scalars included): None for a missing
    or NaN one."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class _Record:
    """What both records do with plain rows (dicts keyed by field name)."""

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (a shallow copy), for consumers of plain rows."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Any:
        """The record of a ledger or wire row: each field converted to its kind (None stays
        None); a field the row lacks takes its default, a key that is no field is ignored."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in row:
                value, kind = row[f.name], f.metadata.get("kind", str)
                values[f.name] = value if value is None or kind is dict else kind(value)
        return cls(**values)


@dataclass(frozen=True)
class ClientRound(_Record):
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
                      "last update to the median of its cohort's unflagged clients."),
    )  # fmt: skip
    cohort_cosine: float | None = _field(float, shown=False)  # to the whole cohort's median
    distance: float | None = _field(float)
    krum_score: float | None = _field(float)
    trimmed_share: float | None = _field(float)
    loss: float | None = _field(float)
    loss_z: float | None = _field(float, stored=False, shown=False)
    pair_gap: float | None = _field(float)
    cluster_outlier: float | None = _field(float)
    median_cosine: float | None = _field(float, shown=False)
    alignment: float | None = _field(float, shown=False)
    kurtosis: float | None = _field(float, shown=False)
    radial: float | None = _field(float, shown=False)  # cosine to the weights trained from
    num_examples: float | None = _field(float, shown=False)  # as the client reported them
    local_steps: float | None = _field(float, shown=False)  # per epoch, from the bounded counts
    norm_scale: float | None = _field(float, shown=False)  # earlier rounds' unflagged norms
    history_error: float | None = _field(float)
    kinship: float | None = _field(float, shown=False)  # likeness to another client's past
    copied: float | None = _field(float, shown=False)  # 1: flagged clients sent copies of it
    boosted_group: float | None = _field(float, shown=False)  # 1: in a boosted group
    template_cosine: float | None = _field(float, shown=False)  # its raised class vs the model's
    validation_loss_change: float | None = _field(float, shown=False)  # server/validation.py
    validation_class_change: float | None = _field(float, shown=False)
    validation_effect: float | None = _field(float, shown=False)
    evidence: float | None = _field(
        float, gauge=("fedwarden_client_flag_evidence", "Evidence (a standard score) that the "
                      "client misbehaves; flagged above the false-positive rate's line."),
    )  # fmt: skip
    rejected_reason: str | None = _field(str)
    absent: bool = _field(bool)  # a change of standing in a round it sat out (association)
    explanation: str | None = _field(str)  # for a flagged client: which signals, by how much
    quarantined_since: int | None = _field(int, shown=False)
    signals: str | None = _field(str, shown=False)  # JSON: the anomaly components of the score
    evidence_state: str | None = _field(str, shown=False)  # JSON: the flag rule's running sums
    weight: float | None = _field(float, stored=False, shown=False)  # its aggregation weight
    signal_excess: dict = _field(dict, stored=False, shown=False)  # a flagged client's signals


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


def _summary(
    kind: type,
    *,
    default: Any = None,
    across: str | None = None,
    stored: bool = True,
    listed: bool = True,
    sent: bool = True,
) -> Any:
    """One ``ClientSummary`` field.

    Args:
      kind: ``float``, ``int``, ``bool`` or ``str``, as for ``ClientRound``.
      default: its value before any round (a ``bool`` is False); not None makes the column
        NOT NULL.
      across: how the ledger computes it over the client's ``client_rounds`` rows (an SQL
        aggregate); None: it is the ``ClientRound`` field of the same name in the client's
        latest round.
      stored: a column of the ledger's ``clients`` (else read from the latest round).
      listed: in ``trust list`` (``LIST_KEYS``).
      sent: a field of the proto's ``ClientTrust`` (``TRUST_KEYS``).
    """
    metadata = {"kind": kind, "across": across, "stored": stored, "listed": listed, "sent": sent}
    return field(default=False if kind is bool else default, metadata=metadata)


@dataclass(frozen=True)
class ClientSummary(_Record):
    """A client's standing after its latest round: that round's trust verdict and the counts
    over every round it took part in. One ledger ``clients`` row, one ``trust list`` entry.

    Example::

        with Ledger("runs/latest/ledger.sqlite", readonly=True) as ledger:
            lowest = ClientSummary.from_row(ledger.list_clients()[0])
        lowest.trust, lowest.rounds, lowest.flagged
    """

    client_id: str = field(metadata={"kind": str, "stored": False, "listed": True, "sent": True})
    trust: float | None = _summary(float)
    anomaly: float | None = _summary(float)
    flagged: bool = _summary(bool)
    quarantined: bool = _summary(bool)
    quarantined_since: int | None = _summary(int, listed=False, sent=False)
    rounds: int = _summary(int, default=0, across="SUM(NOT absent)")  # the rounds it took part in
    last_round: int | None = _summary(int, across="MAX(CASE WHEN absent THEN NULL ELSE round END)")
    rejected: int = _summary(int, default=0, across="SUM(rejected_reason IS NOT NULL)")
    evidence: float | None = _summary(float)
    explanation: str | None = _summary(str)
    signals: str | None = _summary(str, listed=False, sent=False)
    evidence_state: str | None = _summary(str, listed=False, sent=False)
    norm: float | None = _summary(float, stored=False, listed=False)
    cosine: float | None = _summary(float, stored=False, listed=False)


SUMMARY_FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(ClientSummary)

CLIENT_COLUMNS: dict[str, type] = {f.name: f.metadata["kind"] for f in SUMMARY_FIELDS
                                   if f.metadata["stored"]}  # fmt: skip
"""The ledger's ``clients`` columns besides its key (client_id), with their kinds."""

LIST_KEYS: tuple[str, ...] = tuple(f.name for f in SUMMARY_FIELDS if f.metadata["listed"])
"""Keys of each ``trust list --format json`` entry (the first five are the stable contract)."""

TRUST_KEYS: tuple[str, ...] = tuple(f.name for f in SUMMARY_FIELDS if f.metadata["sent"])
"""The fields of the proto's ``ClientTrust``."""

VERDICT_KEYS: tuple[str, ...] = tuple(
    f.name for f in SUMMARY_FIELDS if f.metadata["stored"] and f.name in LEDGER_COLUMNS
)
"""Trust's verdict on a client after a round: the ``ClientSummary`` fields its ``ClientRound``
of that round carries (``trust``, ``flagged``, ``evidence``, ... and the JSON ``signals`` and
``evidence_state`` a restart resumes from)."""


def list_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A ``trust list`` entry from a ledger or wire row: its ``LIST_KEYS``."""
    return {k: row.get(k) for k in LIST_KEYS}


def show_entry(client: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``trust show`` object: the client's ``list_entry`` plus ``history``, one dict of
    ``HISTORY_KEYS`` per round."""
    return {**list_entry(client), "history": [{k: r.get(k) for k in HISTORY_KEYS} for r in history]}
