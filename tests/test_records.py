"""The per-client records (fedwarden/records.py) are what the ledger stores and the wire carries:
every key of a ``trust list`` row and of a ``trust show`` round survives the trip through the
protocol, and the ledger's tables follow the records' fields."""

import dataclasses
import sqlite3

import numpy as np

from fedwarden.aggregation.scoring import HISTORY_METRIC, client_metrics
from fedwarden.protocol.convert import trust_from_proto, trust_to_proto
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.records import (
    CLIENT_COLUMNS,
    GAUGES,
    HISTORY_KEYS,
    LEDGER_COLUMNS,
    LIST_KEYS,
    TRUST_KEYS,
    ClientRound,
    ClientSummary,
    list_entry,
)
from fedwarden.server.ledger import Ledger
from fedwarden.server.metrics import MetricsExporter

TEXT = {"client_id": "c07", "rejected_reason": "non_finite", "explanation": "collusion +3.1"}
BOOL = {"flagged", "quarantined", "absent"}


def example(keys):
    return {
        k: TEXT.get(k, True if k in BOOL else 3 if k in ("round", "rounds", "last_round",
                                                          "rejected") else 0.25)
        for k in keys
    }  # fmt: skip


def test_every_record_key_crosses_the_wire():
    row, history = example(TRUST_KEYS), example(HISTORY_KEYS)
    wire = trust_to_proto([row], last_round=3, history=[history]).SerializeToString()
    rows, rounds = trust_from_proto(pb.TrustReply.FromString(wire))
    assert rows == [row] and rounds == [history]


def test_a_missing_value_crosses_the_wire_as_none_where_the_proto_can_say_so():
    (row,), _ = trust_from_proto(trust_to_proto([{"client_id": "c07"}], last_round=0))
    assert row["trust"] is None and row["last_round"] is None and row["explanation"] is None
    assert row["flagged"] is False and row["rounds"] == 0  # no presence on the wire: a zero


# -- one declaration, ClientRound, drives every place that lists a client's round ------------


def _fields(record=ClientRound, **metadata):
    """The names of ``record``'s fields whose metadata has these values."""
    return [f.name for f in dataclasses.fields(record)
            if all(f.metadata.get(k) == v for k, v in metadata.items())]  # fmt: skip


def test_the_ledger_columns_trust_show_keys_wire_fields_and_gauges_come_from_client_round():
    assert list(LEDGER_COLUMNS) == _fields(stored=True)
    assert HISTORY_KEYS == tuple(_fields(shown=True))
    assert set(pb.ClientRound.DESCRIPTOR.fields_by_name) == set(HISTORY_KEYS)
    assert GAUGES == {f.name: f.metadata["gauge"] for f in dataclasses.fields(ClientRound)
                      if f.metadata.get("gauge")}  # fmt: skip
    assert {"client_id", "anomaly", "trust", "norm", "weight", "signal_excess"} <= set(_fields())


def test_a_fresh_ledger_has_a_column_per_stored_field(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        columns = [r[1] for r in ledger._conn.execute("PRAGMA table_info(client_rounds)")]
    assert columns == ["round", "client_id", *LEDGER_COLUMNS]


def test_an_older_ledger_gains_the_columns_it_lacks_and_keeps_its_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.record_round(1, [{"client_id": "c01", "trust": 0.9, "norm": 2.0}])
    # an older schema: one round column and one clients column are missing
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE client_rounds DROP COLUMN history_error")
    conn.execute("ALTER TABLE clients DROP COLUMN evidence_state")
    conn.commit()
    conn.close()
    with Ledger(path) as ledger:
        (row,) = ledger.client_history("c01")
        ledger.record_round(2, [{"client_id": "c01", "history_error": 0.5}])
        assert ledger.client_history("c01")[1]["history_error"] == 0.5
    assert row["trust"] == 0.9 and row["norm"] == 2.0 and row["history_error"] is None


def test_a_round_record_survives_the_ledger_and_the_wire(tmp_path):
    record = ClientRound("c07", round=3, anomaly=0.8, trust=0.4, flagged=True, norm=41.0,
                         cosine=-0.2, loss=1.5, rejected_reason=None, explanation="norm +3.0",
                         weight=12.0, loss_z=2.0)  # fmt: skip
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record_round(3, [record.to_dict()])
        (stored,) = ledger.client_history("c07")
    assert {k: stored[k] for k in LEDGER_COLUMNS} == {
        k: v for k, v in record.to_dict().items() if k in LEDGER_COLUMNS
    }
    _, (crossed,) = trust_from_proto(
        pb.TrustReply.FromString(trust_to_proto([], 3, [stored]).SerializeToString())
    )
    assert crossed == {k: record.to_dict()[k] for k in HISTORY_KEYS}


def test_the_exporter_has_a_gauge_per_record_gauge_and_reads_it_from_the_round():
    exporter = MetricsExporter()
    row = ClientRound("c07", anomaly=0.75, trust=0.25, flagged=True, norm=3.0, cosine=0.5,
                      evidence=4.0)  # fmt: skip
    exporter.observe_round(1, 0.9, 0.1, 0.5, [row.to_dict()])
    text = exporter.render().decode()
    for field_name, (metric, _) in GAUGES.items():
        expected = float(getattr(row, field_name))
        assert f'{metric}{{client_id="c07"}} {expected}' in text, metric


def test_every_scoring_metric_is_a_client_round_field():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(6, 8)).astype(np.float32)
    metrics = client_metrics(matrix, np.median(matrix, axis=0), np.ones(6), {})
    assert set(metrics) | {HISTORY_METRIC} <= set(_fields()), "declare it in ClientRound"


# -- one declaration, ClientSummary, drives every place that lists a client's standing --------


def test_the_clients_columns_trust_list_keys_and_wire_fields_come_from_client_summary():
    assert list(CLIENT_COLUMNS) == _fields(ClientSummary, stored=True)
    assert LIST_KEYS == tuple(_fields(ClientSummary, listed=True))
    assert TRUST_KEYS == tuple(_fields(ClientSummary, sent=True))
    assert set(pb.ClientTrust.DESCRIPTOR.fields_by_name) == set(TRUST_KEYS)
    assert LIST_KEYS[:5] == ("client_id", "trust", "anomaly", "flagged", "quarantined")


def test_a_summary_field_not_counted_across_rounds_is_its_latest_rounds_field():
    latest = [f.name for f in dataclasses.fields(ClientSummary)[1:] if not f.metadata["across"]]
    assert set(latest) <= set(LEDGER_COLUMNS), "declare it in ClientRound (stored) too"


def test_a_fresh_ledger_has_a_clients_column_per_stored_summary_field(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        columns = [r[1] for r in ledger._conn.execute("PRAGMA table_info(clients)")]
    assert columns == ["client_id", *CLIENT_COLUMNS]


def test_an_older_clients_table_gains_its_missing_columns_and_recounts_them(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.record_round(1, [{"client_id": "c01", "trust": 0.9, "rejected_reason": "late"}])
    conn = sqlite3.connect(path)  # an older schema: a count and a latest-round column missing
    conn.execute("ALTER TABLE clients DROP COLUMN rejected")
    conn.execute("ALTER TABLE clients DROP COLUMN explanation")
    conn.commit()
    conn.close()
    with Ledger(path) as ledger:
        assert ledger.get_client("c01")["rejected"] == 0  # the new column's default
        ledger.record_round(2, [{"client_id": "c01", "trust": 0.8, "explanation": "norm +3.0"}])
        client = ledger.get_client("c01")
    assert (client["rejected"], client["rounds"], client["last_round"]) == (1, 2, 2)
    assert client["explanation"] == "norm +3.0" and client["trust"] == 0.8


def test_a_summary_from_the_ledger_is_the_trust_list_entry_on_both_sides_of_the_wire(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record_round(1, [ClientRound("c07", trust=0.5, anomaly=0.9, norm=4.0)])
        ledger.record_round(2, [ClientRound("c07", trust=0.3, anomaly=0.8, flagged=True,
                                            norm=6.0, cosine=-0.5, rejected_reason="late",
                                            explanation="norm +3.0")])  # fmt: skip
        (row,) = ledger.list_clients()
    summary = ClientSummary.from_row(row)
    assert summary == ClientSummary("c07", trust=0.3, anomaly=0.8, flagged=True, rounds=2,
                                    last_round=2, rejected=1, explanation="norm +3.0", norm=6.0,
                                    cosine=-0.5)  # fmt: skip
    (remote,), _ = trust_from_proto(
        pb.TrustReply.FromString(trust_to_proto([row], 2).SerializeToString())
    )
    assert ClientSummary.from_row(remote) == summary
    assert list_entry(remote) == list_entry(row) == {k: getattr(summary, k) for k in LIST_KEYS}
