"""Per-client trust: an exponentially weighted average of good behaviour, with flags and quarantine.

After each round, for every client that took part::

    trust_t = decay * trust_{t-1} + (1 - decay) * (1 - anomaly_t)

where ``anomaly_t`` is the client's anomaly score (``aggregation/scoring.py``) and a rejected
update counts as anomaly 1.0. Clients not selected keep their trust.

Flags use hysteresis: a client is flagged when its trust drops below ``flag_below`` and stays
flagged until it rises above ``unflag_above``, so a client hovering near one threshold does not
flap. A flagged client is quarantined according to the policy:

- ``"none"``: flagged only (reported, weight unchanged).
- ``"downweight"``: still selected, its aggregation weight multiplied by ``downweight``.
- ``"exclude"``: not selected for ``probation_rounds`` rounds; then it may be selected again
  (on probation) and its updates are scored, so it can earn its trust back, but aggregated with
  weight 0 until its trust rises above ``unflag_above``. A probation round that lowers its trust
  starts a new exclusion period.

Example::

    book = TrustBook(TrustPolicy(quarantine="exclude"), ledger=Ledger("runs/x/ledger.sqlite"))
    cohort = [c for c in candidates if not book.is_excluded(c)]
    ...
    states = book.update(round, ids, anomaly_score(metrics), rejected={}, metrics=metrics)
    weights = weights * [book.weight_multiplier(c) for c in ids]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedwarden.server.ledger import Ledger

QUARANTINE_MODES = ("none", "exclude", "downweight")


@dataclass
class TrustPolicy:
    """How trust moves and what happens to clients that lose it.

    Args:
        decay: EWMA weight of the history, in [0, 1); higher is slower to react and to forgive.
        flag_below: a client whose trust drops below this is flagged.
        unflag_above: a flagged client is unflagged (and released) once its trust rises above
            this; must exceed ``flag_below`` (hysteresis).
        quarantine: ``"none"``, ``"exclude"`` or ``"downweight"`` (see the module docstring).
        downweight: weight multiplier of a quarantined client under ``"downweight"``, in [0, 1].
        probation_rounds: under ``"exclude"``, rounds a quarantined client is not selected
            before it may be sampled again on probation.
        initial_trust: trust of a client never seen before, in [0, 1].
    """

    decay: float = 0.7
    flag_below: float = 0.55
    unflag_above: float = 0.7
    quarantine: str = "none"
    downweight: float = 0.1
    probation_rounds: int = 3
    initial_trust: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(
                f"trust decay must be in [0, 1) (the EWMA weight of history). "
                f"Received: decay={self.decay!r}."
            )
        if not 0.0 <= self.flag_below < 1.0:
            raise ValueError(
                f"flag_below must be in [0, 1). Received: flag_below={self.flag_below!r}."
            )
        if not self.flag_below < self.unflag_above < 1.0:
            raise ValueError(
                "unflag_above must be above flag_below (hysteresis) and below 1. Received: "
                f"flag_below={self.flag_below!r}, unflag_above={self.unflag_above!r}."
            )
        if self.quarantine not in QUARANTINE_MODES:
            raise ValueError(
                f"quarantine must be one of {', '.join(QUARANTINE_MODES)}. "
                f"Received: quarantine={self.quarantine!r}."
            )
        if not 0.0 <= self.downweight <= 1.0:
            raise ValueError(
                f"downweight must be in [0, 1]. Received: downweight={self.downweight!r}."
            )
        if isinstance(self.probation_rounds, bool) or not isinstance(self.probation_rounds, int):
            raise ValueError(
                f"probation_rounds must be an integer. Received: {self.probation_rounds!r}."
            )
        if self.probation_rounds < 0:
            raise ValueError(f"probation_rounds must be >= 0. Received: {self.probation_rounds}.")
        if not 0.0 <= self.initial_trust <= 1.0:
            raise ValueError(
                f"initial_trust must be in [0, 1]. Received: initial_trust={self.initial_trust!r}."
            )


@dataclass
class ClientTrust:
    """One client's trust state after its latest round (norm and cosine as last measured)."""

    client_id: str
    trust: float
    anomaly: float | None = None
    flagged: bool = False
    quarantined: bool = False
    quarantined_since: int | None = None
    rounds: int = 0
    last_round: int | None = None
    rejected: int = 0
    norm: float | None = None
    cosine: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (the shape ``MetricsExporter.observe_round`` takes)."""
        return dataclasses.asdict(self)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class TrustBook:
    """In-memory trust state of every client seen, persisted through an optional ledger.

    Args:
        policy: the trust policy.
        ledger: when given, each :meth:`update` records the round in it (one transaction), and
            construction loads the clients already in it (a restart; truncate the ledger to the
            checkpoint's round first).
    """

    def __init__(self, policy: TrustPolicy, ledger: Ledger | None = None):
        self.policy = policy
        self.ledger = ledger
        self._clients: dict[str, ClientTrust] = {}
        self._round = 0
        if ledger is not None:
            self._round = ledger.last_round()
            for row in ledger.list_clients():
                self._clients[row["client_id"]] = ClientTrust(
                    client_id=row["client_id"],
                    trust=policy.initial_trust if row["trust"] is None else float(row["trust"]),
                    anomaly=_opt_float(row["anomaly"]),
                    flagged=bool(row["flagged"]),
                    quarantined=bool(row["quarantined"]),
                    quarantined_since=row["quarantined_since"],
                    rounds=int(row["rounds"]),
                    last_round=row["last_round"],
                    rejected=int(row["rejected"]),
                    norm=_opt_float(row["norm"]),
                    cosine=_opt_float(row["cosine"]),
                )

    @property
    def last_round(self) -> int:
        """The latest round passed to :meth:`update` (or loaded from the ledger), 0 if none."""
        return self._round

    def update(
        self,
        round: int,
        client_ids: list[str],
        anomaly: np.ndarray,
        rejected: dict[str, int] | None = None,
        *,
        metrics: dict[str, np.ndarray] | None = None,
        losses: np.ndarray | None = None,
        reasons: dict[str, str] | None = None,
    ) -> dict[str, ClientTrust]:
        """Applies one round's anomaly scores; returns the new state of every client touched.

        Args:
            round: the round number; must be larger than the last round applied.
            client_ids: the clients whose updates were admitted, aligned with ``anomaly``.
            anomaly: ``(K,)`` anomaly scores in [0, 1].
            rejected: client_id to the number of its updates rejected at admission this round;
                such a client's round counts as anomaly 1.0 (whether or not it is also in
                ``client_ids``).
            metrics: the round's ``client_metrics`` (aligned with ``client_ids``), recorded in
                the ledger and kept as the clients' latest norm and cosine.
            losses: ``(K,)`` reported losses, recorded in the ledger.
            reasons: client_id to the rejection reason, recorded in the ledger (default
                ``"rejected"``).
        """
        round = int(round)
        if round <= self._round:
            raise ValueError(
                f"rounds must increase: last round applied is {self._round}, received "
                f"round={round}. To replay rounds, truncate the ledger and build a new TrustBook."
            )
        client_ids = [str(c) for c in client_ids]
        anomaly = np.asarray(anomaly, np.float64).reshape(-1)
        if anomaly.shape != (len(client_ids),):
            raise ValueError(
                f"anomaly must have one score per client id, shape ({len(client_ids)},). "
                f"Received shape {anomaly.shape}."
            )
        if len(set(client_ids)) != len(client_ids):
            raise ValueError(f"client_ids must be unique. Received: {client_ids}.")
        if not np.all(np.isfinite(anomaly)) or np.any((anomaly < 0) | (anomaly > 1)):
            raise ValueError(f"anomaly scores must be finite and in [0, 1]. Received: {anomaly}.")
        rejected = {str(c): int(n) for c, n in (rejected or {}).items() if int(n) > 0}
        reasons = reasons or {}

        scores = dict(zip(client_ids, anomaly.tolist(), strict=True))
        for cid in rejected:
            scores[cid] = 1.0
        index = {cid: i for i, cid in enumerate(client_ids)}

        touched: dict[str, ClientTrust] = {}
        for cid, score in scores.items():
            state = self._clients.get(cid) or ClientTrust(cid, trust=self.policy.initial_trust)
            self._step(state, round, score, rejected.get(cid, 0))
            i = index.get(cid)
            if metrics is not None and i is not None:
                state.norm = _opt_float(metrics["norm"][i]) if "norm" in metrics else None
                state.cosine = _opt_float(metrics["cosine"][i]) if "cosine" in metrics else None
            self._clients[cid] = state
            touched[cid] = dataclasses.replace(state)
        self._round = round

        if self.ledger is not None:
            rows = round_rows(touched, client_ids, metrics, losses, rejected, reasons)
            self.ledger.record_round(round, rows)
        return touched

    def _step(self, state: ClientTrust, round: int, anomaly: float, n_rejected: int) -> None:
        p = self.policy
        previous = state.trust
        state.trust = p.decay * previous + (1.0 - p.decay) * (1.0 - anomaly)
        state.anomaly = anomaly
        state.rounds += 1
        state.last_round = round
        state.rejected += n_rejected
        if not state.flagged and state.trust < p.flag_below:
            state.flagged = True
        elif state.flagged and state.trust > p.unflag_above:
            state.flagged = False
        if p.quarantine == "none" or not state.flagged:
            state.quarantined, state.quarantined_since = False, None
        elif not state.quarantined:
            state.quarantined, state.quarantined_since = True, round
        elif p.quarantine == "exclude" and state.trust < previous:
            state.quarantined_since = round  # misbehaved on probation: exclusion starts again

    def is_excluded(self, client_id: str, round: int | None = None) -> bool:
        """True if selection must skip the client in ``round`` (default: the next round).

        Only under ``quarantine="exclude"``, for the ``probation_rounds`` rounds after the
        quarantine began (or last restarted).
        """
        state = self._clients.get(client_id)
        if self.policy.quarantine != "exclude" or state is None or not state.quarantined:
            return False
        round = self._round + 1 if round is None else int(round)
        return round - (state.quarantined_since or 0) <= self.policy.probation_rounds

    def weight_multiplier(self, client_id: str) -> float:
        """Factor for the client's aggregation weight: 1.0, 0.0 if excluded, ``downweight``."""
        state = self._clients.get(client_id)
        if state is None or not state.quarantined:
            return 1.0
        return 0.0 if self.policy.quarantine == "exclude" else float(self.policy.downweight)

    def get(self, client_id: str) -> ClientTrust | None:
        """A copy of one client's state, None if never seen."""
        state = self._clients.get(client_id)
        return None if state is None else dataclasses.replace(state)

    def flagged(self) -> set[str]:
        """The ids of the clients currently flagged."""
        return {cid for cid, s in self._clients.items() if s.flagged}

    def snapshot(self) -> dict[str, ClientTrust]:
        """A copy of every client's state, by client_id."""
        return {cid: dataclasses.replace(s) for cid, s in self._clients.items()}

    def __repr__(self) -> str:
        return (
            f"TrustBook(policy={self.policy!r}, clients={len(self._clients)}, round={self._round})"
        )


def round_rows(
    states: dict[str, ClientTrust],
    client_ids: list[str],
    metrics: dict[str, np.ndarray] | None = None,
    losses: np.ndarray | None = None,
    rejected: dict[str, int] | None = None,
    reasons: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Ledger rows (``Ledger.record_round``) for the clients in ``states``, sorted by client_id.

    Each row has the trust state (client_id, anomaly, trust, flagged, quarantined,
    quarantined_since), the client's measurements when ``metrics`` / ``losses`` are given
    (``client_ids`` gives their row order; a client absent from it, whose update was rejected,
    gets none) and ``rejected_reason`` for a rejected client.
    """
    index = {cid: i for i, cid in enumerate(client_ids)}
    rejected = rejected or {}
    reasons = reasons or {}
    loss_values = None if losses is None else np.asarray(losses, np.float64).reshape(-1)
    rows = []
    for cid in sorted(states):
        s = states[cid]
        row: dict[str, Any] = {
            "client_id": cid,
            "anomaly": s.anomaly,
            "trust": s.trust,
            "flagged": s.flagged,
            "quarantined": s.quarantined,
            "quarantined_since": s.quarantined_since,
        }
        i = index.get(cid)
        if i is not None:
            for key, values in (metrics or {}).items():
                row[key] = _opt_float(values[i])
            if loss_values is not None:
                row["loss"] = _opt_float(loss_values[i])
        if cid in rejected:
            row["rejected_reason"] = reasons.get(cid, "rejected")
        rows.append(row)
    return rows
