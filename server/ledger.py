"""The trust ledger: per-client trust and per-round measurements in one SQLite file.

WAL journal mode lets ``fedwarden trust list`` (another process) read while a run writes; each
round is written in one transaction, so a reader sees a round entirely or not at all.

Tables:

- ``client_rounds``: one row per (round, client_id), a column per stored field of
  ``fedwarden.records.ClientRound``: the round's measurements (norm, cosine, ...), the anomaly
  score, the trust after the round, flagged/quarantined state, the flag evidence and, for a
  flagged client, the explanation; ``signals`` (JSON) holds the anomaly components behind the
  score and ``evidence_state`` (JSON) the running sums a restart resumes from; for a rejected
  update, the reason.
- ``clients``: one row per client, a column per stored field of
  ``fedwarden.records.ClientSummary``, derived from ``client_rounds`` in the same transaction:
  trust, anomaly, flagged, quarantined (and since when), ... as of its latest round, and the
  counts over its rounds (how many, the last, how many rejected). Deriving it (instead of
  incrementing counters) is what makes re-recording a round and ``truncate_after`` exact.
- ``histories``: one row per (round, client_id) of a client whose update the detector's history
  took in that round: its forecast deviation, the forecast of its part across the reference and
  that of its output layer's deviation after the round (``aggregation/detection.py``,
  ``HistoryForecast``), little-endian float32, ``sketch_dim`` each (the output layer's: its
  size up to that; 6 KB a client-round for the Fashion-MNIST CNN). ``trust replay`` decides
  flags by association again from them.
- ``meta``: key/value (``schema_version``, ``last_round``).

Resuming from a checkpoint taken after round R: ``ledger.truncate_after(R)``, then build the
``TrustBook`` on the ledger, which loads the clients' state as of round R.

Example::

    with Ledger("runs/demo/ledger.sqlite") as ledger:
        ledger.record_round(1, [{"client_id": "c01", "anomaly": 0.1, "trust": 0.98}])
        ledger.list_clients()   # [{"client_id": "c01", "trust": 0.98, ...}]
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.records import (
    CLIENT_COLUMNS,
    FIELDS,
    LEDGER_COLUMNS,
    SUMMARY_FIELDS,
    ClientRound,
    optional_float,
)

SCHEMA_VERSION = "2"

_SQL_TYPES = {float: "REAL", int: "INTEGER", str: "TEXT", bool: "INTEGER"}


def _columns(fields: tuple[dataclasses.Field, ...]) -> dict[str, str]:
    """Column -> SQL type of a record's stored fields; a field whose default is not None (a
    flag, a count) is NOT NULL with that default."""
    return {
        f.name: _SQL_TYPES[f.metadata["kind"]]
        + ("" if f.default is None else f" NOT NULL DEFAULT {int(f.default)}")
        for f in fields
        if f.metadata.get("stored")
    }


_ROUND_SQL = _columns(FIELDS)
_CLIENT_SQL = _columns(SUMMARY_FIELDS)

ROUND_COLUMNS = tuple(_ROUND_SQL)
"""Columns of ``client_rounds`` besides (round, client_id), the stored fields of
``fedwarden.records.ClientRound``; a row dict may omit any (NULL)."""

_BOOL_COLUMNS = tuple(c for c, kind in (*LEDGER_COLUMNS.items(), *CLIENT_COLUMNS.items())
                      if kind is bool)  # fmt: skip
_TEXT_COLUMNS = tuple(c for c, kind in LEDGER_COLUMNS.items() if kind is str)
_INT_COLUMNS = tuple(c for c, kind in LEDGER_COLUMNS.items() if kind is int)


def _table(fields: dict[str, str]) -> str:
    return ",\n    ".join(f"{c} {t}" for c, t in fields.items())


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    {_table(_CLIENT_SQL)}
);
CREATE TABLE IF NOT EXISTS client_rounds (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    {_table(_ROUND_SQL)},
    PRIMARY KEY (round, client_id)
);
CREATE INDEX IF NOT EXISTS client_rounds_by_client ON client_rounds (client_id, round);
CREATE TABLE IF NOT EXISTS histories (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    forecast BLOB NOT NULL,
    across BLOB NOT NULL,
    output BLOB,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

_FLOAT32 = np.dtype("<f4")
_HISTORY_SQL = {"output": "BLOB"}  # columns added to ``histories`` since it was made

_ACROSS = {f.name: f.metadata["across"] for f in SUMMARY_FIELDS if f.metadata.get("across")}
# Rebuilds the clients rows of the clients in the temp table `touched` from their history: a
# field computed across rounds from its aggregate, any other from the client's latest round.
_REFRESH_CLIENTS = f"""
INSERT OR REPLACE INTO clients (client_id, {", ".join(_CLIENT_SQL)})
SELECT r.client_id, {", ".join(f"agg.{c}" if c in _ACROSS else f"r.{c}" for c in _CLIENT_SQL)}
FROM (SELECT client_id, MAX(round) AS latest,
             {", ".join(f"{sql} AS {c}" for c, sql in _ACROSS.items())}
      FROM client_rounds WHERE client_id IN (SELECT client_id FROM touched)
      GROUP BY client_id) AS agg
JOIN client_rounds AS r ON r.client_id = agg.client_id AND r.round = agg.latest
"""

# The summary fields `clients` does not store, read from the client's latest round.
_LATEST = [f.name for f in SUMMARY_FIELDS[1:] if not f.metadata["stored"]]


class LedgerError(RuntimeError):
    """The ledger file is missing, unreadable or not a fedwarden ledger."""


def remove_ledger(path: str | os.PathLike) -> None:
    """Deletes a ledger with its ``-wal`` and ``-shm`` files (to start a run afresh).

    Deleting only the main file is unsafe: a ``-wal`` file left by a crashed run would be
    replayed into the next database created at the same path.
    """
    path = Path(path)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _sql_value(column: str, value: Any) -> Any:
    """Converts a row value (numpy scalars included) to what SQLite stores; NaN becomes NULL."""
    if column in _BOOL_COLUMNS:
        return int(bool(value))
    if value is None:
        return None
    if column in _TEXT_COLUMNS:
        return str(value)
    if column in _INT_COLUMNS:
        return int(value)
    return optional_float(value)


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    out = {col[0]: value for col, value in zip(cursor.description, row, strict=True)}
    for key in _BOOL_COLUMNS:
        if key in out and out[key] is not None:
            out[key] = bool(out[key])
    return out


class Ledger:
    """SQLite trust ledger (see the module docstring for the tables).

    Args:
        path: the database file; created with its tables unless ``readonly``.
        readonly: open an existing ledger for reading only (``fedwarden trust``); raises
            :class:`LedgerError` if the file is missing or has no ledger tables.

    One connection, guarded by a lock so the coordinator thread and a gRPC thread may share it.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            if not self.path.is_file():
                raise LedgerError(f"ledger file not found: {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            try:
                names = {
                    r[0]
                    for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
            except sqlite3.DatabaseError as err:
                self._conn.close()
                raise LedgerError(f"not a fedwarden ledger: {self.path} ({err})") from err
            if not {"clients", "client_rounds", "meta"} <= names:
                self._conn.close()
                raise LedgerError(f"not a fedwarden ledger (no trust tables): {self.path}")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A new ledger is private (trust history); SQLite gives its -wal and -shm files its mode.
        self.path.touch(mode=0o600)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._add_missing_columns()
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise LedgerError(f"cannot open ledger {self.path}: {err}") from err

    def _add_missing_columns(self) -> None:
        """Brings an older ledger (schema 1, from before the detection signals, or one that lacks
        a field added to ``ClientRound`` or ``ClientSummary`` since) to the current columns."""
        for table, columns in (
            ("client_rounds", _ROUND_SQL), ("clients", _CLIENT_SQL), ("histories", _HISTORY_SQL)
        ):  # fmt: skip
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self._conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
        )

    # -- writing -------------------------------------------------------------------------------

    def _write(self, fn) -> None:
        """Runs ``fn(conn)`` in one IMMEDIATE transaction (all or nothing)."""
        if self.readonly:
            raise LedgerError(f"ledger opened read-only: {self.path}")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _refresh(conn: sqlite3.Connection, client_ids: Iterable[str] | None) -> None:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS touched (client_id TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM touched")
        if client_ids is None:
            conn.execute("INSERT INTO touched SELECT client_id FROM clients")
            conn.execute("INSERT OR IGNORE INTO touched SELECT client_id FROM client_rounds")
        else:
            conn.executemany("INSERT OR IGNORE INTO touched VALUES (?)", [(c,) for c in client_ids])
        conn.execute(
            "DELETE FROM clients WHERE client_id IN (SELECT client_id FROM touched) "
            "AND client_id NOT IN (SELECT client_id FROM client_rounds)"
        )
        conn.execute(_REFRESH_CLIENTS)

    def record_round(self, round: int, rows: Sequence[ClientRound | dict[str, Any]]) -> None:
        """Records one round's rows (a ``ClientRound`` or a dict per client) in one transaction.

        Each row needs ``client_id``; a dict may carry any of :data:`ROUND_COLUMNS` (unknown keys
        are ignored, so a row may hold extra fields), a ``ClientRound`` carries them all. Recording a (round, client_id) again updates
        that row in place: the columns given replace the stored values, the others are kept. So a
        round replayed after a crash never counts twice, and two writers may each record their
        part of a row (trust state, measurements). The ``clients`` table is rebuilt from the
        history of the clients touched, in the same transaction.
        """
        round = int(round)
        if round < 0:
            raise ValueError(f"round must be non-negative. Received: round={round}.")
        rows = [r.to_dict() if isinstance(r, ClientRound) else r for r in rows]
        ids = [str(r["client_id"]) for r in rows]
        if len(set(ids)) != len(ids):
            dup = sorted({c for c in ids if ids.count(c) > 1})
            raise ValueError(f"round {round} has several rows for client(s) {dup}.")
        by_columns: dict[tuple[str, ...], list[tuple]] = {}
        for cid, row in zip(ids, rows, strict=True):
            cols = tuple(c for c in ROUND_COLUMNS if c in row)
            values = (round, cid, *(_sql_value(c, row[c]) for c in cols))
            by_columns.setdefault(cols, []).append(values)

        def write(conn: sqlite3.Connection) -> None:
            for cols, values in by_columns.items():
                names = ("round", "client_id", *cols)
                update = ", ".join(f"{c} = excluded.{c}" for c in cols)
                conn.executemany(
                    f"INSERT INTO client_rounds ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' for _ in names)}) ON CONFLICT (round, client_id) "
                    + (f"DO UPDATE SET {update}" if cols else "DO NOTHING"),
                    values,
                )
            self._refresh(conn, ids)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('last_round', ?) ON CONFLICT(key) DO "
                "UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (str(round),),
            )

        self._write(write)

    def record_histories(
        self, round: int, client_ids: Sequence[str], forecast: np.ndarray, across: np.ndarray,
        output: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """Records the detector's forecasts of the clients it took in ``round`` (row i of each
        array is ``client_ids[i]``'s; ``output``, the output layer's, may be None), replacing any
        recorded before."""
        rows = [forecast, across] + ([] if output is None else [output])
        if any(len(r) != len(client_ids) for r in rows):
            raise ValueError(
                f"need one row of each forecast per client. Received {len(client_ids)} ids and "
                f"{', '.join(str(len(r)) for r in rows)} rows."
            )
        blobs = [[np.asarray(row, _FLOAT32).tobytes() for row in r] for r in rows]
        if output is None:
            blobs.append([None] * len(client_ids))
        values = [(int(round), str(c), *b) for c, *b in zip(client_ids, *blobs, strict=True)]
        self._write(
            lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO histories (round, client_id, forecast, across, output) "
                "VALUES (?, ?, ?, ?, ?)",
                values,
            )
        )

    def truncate_after(self, round: int) -> None:
        """Forgets every round after ``round`` (to resume from a checkpoint taken at ``round``)."""
        round = int(round)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM client_rounds WHERE round > ?", (round,))
            conn.execute("DELETE FROM histories WHERE round > ?", (round,))
            self._refresh(conn, None)
            conn.execute(
                "UPDATE meta SET value = MIN(CAST(value AS INTEGER), ?) WHERE key = 'last_round'",
                (round,),
            )

        self._write(write)

    def set_meta(self, key: str, value: str) -> None:
        """Stores one key/value pair in ``meta`` (e.g. the run's config hash)."""
        self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value))
            )
        )

    # -- reading -------------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(sql, params)
            return [_row_dict(cursor, row) for row in cursor.fetchall()]

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def list_clients(self) -> list[dict[str, Any]]:
        """Every client, lowest trust first (ties by client_id): the fields of
        ``fedwarden.records.ClientSummary`` (a column a schema-1 ledger opened read-only lacks
        is absent)."""
        return self._query(
            f"SELECT c.*, {', '.join(f'r.{c}' for c in _LATEST)} "
            "FROM clients AS c LEFT JOIN client_rounds AS r "
            "ON r.client_id = c.client_id AND r.round = c.last_round "
            "ORDER BY c.trust IS NULL, c.trust, c.client_id"
        )

    def get_client(self, client_id: str) -> dict[str, Any] | None:
        """The client's ``clients`` row, or None if it never took part in a round."""
        rows = self._query("SELECT * FROM clients WHERE client_id = ?", (client_id,))
        return rows[0] if rows else None

    def client_history(self, client_id: str) -> list[dict[str, Any]]:
        """The client's ``client_rounds`` rows, oldest round first (empty if unknown)."""
        return self._query(
            "SELECT * FROM client_rounds WHERE client_id = ? ORDER BY round", (client_id,)
        )

    def rows_since(self, round: int) -> list[dict[str, Any]]:
        """All rows of the rounds after ``round``, by round then client_id."""
        return self._query(
            "SELECT * FROM client_rounds WHERE round > ? ORDER BY round, client_id", (int(round),)
        )

    def round_rows(self, round: int) -> list[dict[str, Any]]:
        """All rows of one round, by client_id."""
        return self._query(
            "SELECT * FROM client_rounds WHERE round = ? ORDER BY client_id", (int(round),)
        )

    def round_histories(
        self, round: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """The forecasts recorded for ``round`` (:meth:`record_histories`), by client_id; the
        output layer's None where none was recorded."""
        try:
            rows = self._query("SELECT * FROM histories WHERE round = ?", (int(round),))
        except sqlite3.OperationalError:  # a ledger written before they were kept, read-only
            return {}
        return {
            r["client_id"]: (
                np.frombuffer(r["forecast"], _FLOAT32), np.frombuffer(r["across"], _FLOAT32),
                None if r.get("output") is None else np.frombuffer(r["output"], _FLOAT32),
            )
            for r in rows
        }  # fmt: skip

    def records_histories(self) -> bool:
        """True if every round with scored updates has its forecasts recorded: false for a
        ledger written before they were, or resumed by a version that records them."""
        try:
            rows = self._query(
                "SELECT (SELECT COUNT(DISTINCT round) FROM client_rounds WHERE norm IS NOT NULL) "
                "= (SELECT COUNT(DISTINCT round) FROM histories) AS complete"
            )
        except sqlite3.OperationalError:  # no histories table
            return False
        return bool(rows[0]["complete"])

    def last_round(self) -> int:
        """The latest round recorded (0 for a new ledger)."""
        value = self.get_meta("last_round")
        return int(value) if value is not None else 0

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger(path={str(self.path)!r}, readonly={self.readonly})"
