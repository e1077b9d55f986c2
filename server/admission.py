"""Admission: every client update is checked before it reaches the update matrix.

A rejected update is never silently dropped: it comes back with a reason, which the coordinator logs,
counts (``fedwarden_updates_rejected_total{reason}``) and charges to the client's trust.

The gRPC transport refuses some updates on arrival, before admission (``ARRIVAL_REASONS``): they
are logged and counted under the same metric but not charged to trust, because a network fault
(an agent killed mid-upload, a cut connection) looks the same as a hostile stream, and an update
that never arrived cannot be attributed with certainty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from fedwarden.server.update_matrix import UpdateMatrix

REASONS = (
    "wrong_round",
    "not_selected",
    "duplicate",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "too_large",
    "bad_example_count",
    "oversized",
    "overflow",  # finite on its own, but it made the round's aggregate non-finite
)
ARRIVAL_REASONS = (
    "damaged_stream",  # gap, wrong chunk order, overflow, short, bad digest, cut off mid-upload
    "unknown_session",  # a session id the sender does not hold (e.g. another client's)
    "unauthenticated",  # missing or invalid credentials, or an identity that may not train
    "wrong_dtype",  # a dtype name the protocol does not know
    "busy",  # too many concurrent calls from one identity, or in all
    "upload_memory",  # the uploads in progress would hold more than --max-inflight-upload-mb
    "too_slow",  # stalled, or below the minimum transfer rate: cancelled by the call guard
    "late",  # for a task that is closed (an earlier round, or a re-run attempt)
)


@dataclass
class ClientUpdate:
    """What any transport (simulated client, gRPC agent, TFF) hands to the round logic."""

    client_id: str
    round: int
    delta: np.ndarray  # flat vector in the model's weight layout
    num_examples: int
    loss: float | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class Rejection:
    client_id: str
    reason: str
    detail: str


def admit(
    updates: Iterable[ClientUpdate],
    round_number: int,
    selected: set[str],
    size: int,
    max_norm: float | None = None,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Splits the round's updates into admitted ones and rejections (first problem found wins)."""
    admitted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    gate = Admission(round_number, selected, size, max_norm)
    for u in updates:
        rejection = gate.check(u)
        if rejection:
            rejected.append(rejection)
        else:
            admitted.append(replace(u, delta=u.delta.astype(np.float32, copy=False)))
    return admitted, rejected


class Admission:
    """One round's admission, one update at a time (for transports that stream updates).

    ``check`` returns the update's ``Rejection``, or None when it is admitted (it then counts as
    seen, so a second update from the same client is a ``duplicate``).
    """

    def __init__(
        self, round_number: int, selected: set[str], size: int, max_norm: float | None = None
    ):
        self.round_number, self.selected = round_number, selected
        self.size, self.max_norm = size, max_norm
        self.seen: set[str] = set()

    def check(self, u: ClientUpdate) -> Rejection | None:
        problem = _problem(u, self.round_number, self.selected, self.seen, self.size, self.max_norm)
        if problem:
            return Rejection(u.client_id, *problem)
        self.seen.add(u.client_id)
        return None


NO_DELTA = np.zeros(0, np.float32)
"""The delta of a receipt: an update once its values are in the round's matrix, or dropped."""


def receipt(u: ClientUpdate) -> ClientUpdate:
    """``u`` without its values: who sent what, for what round, with how many examples."""
    return replace(u, delta=NO_DELTA)


class RoundIntake:
    """One round's updates as they arrive: each is admitted and, if admitted, copied into the
    round's update matrix at once, so the transport's copy of it can go (``Coordinator.open_round``
    makes one; ``Coordinator.finish_round`` takes it instead of the updates).

    Not thread-safe: a concurrent transport calls ``add`` under its own lock (``server/hub.py``).

    Attributes:
      round: the round the updates answer.
      selected: the cohort.
      admitted: the admitted updates, each ``delta`` a row of ``store`` (a view, not a copy).
      rejected: one ``Rejection`` per refused update, in arrival order.
      received: every update handed in, in arrival order, as its ``receipt`` (no values).
      store: the round's :class:`~fedwarden.server.update_matrix.UpdateMatrix`.
    """

    def __init__(self, gate: Admission, selected: list[str], store: UpdateMatrix):
        self.round, self.selected, self.gate, self.store = gate.round_number, selected, gate, store
        self.admitted: list[ClientUpdate] = []
        self.rejected: list[Rejection] = []
        self.received: list[ClientUpdate] = []

    def add(self, u: ClientUpdate) -> Rejection | None:
        """Admits ``u`` into the next row of the matrix, or returns why it is refused."""
        self.received.append(receipt(u))
        rejection = self.gate.check(u)
        if rejection:
            self.rejected.append(rejection)
        else:
            self.admitted.append(replace(u, delta=self.store.append(u.delta)))
        return rejection

    def close(self) -> None:
        """Releases the matrix (and deletes its spill file): for an attempt that is abandoned."""
        self.store.close()


def _problem(
    u: ClientUpdate,
    round_number: int,
    selected: set[str],
    seen: set[str],
    size: int,
    max_norm: float | None,
) -> tuple[str, str] | None:
    if u.round != round_number:
        return "wrong_round", f"update is for round {u.round}, the current round is {round_number}"
    if u.client_id not in selected:
        return "not_selected", f"{u.client_id} was not selected for round {round_number}"
    if u.client_id in seen:
        return "duplicate", f"{u.client_id} already submitted for round {round_number}"
    declared = u.metadata.get("declared_bytes")
    if declared is not None:
        return "oversized", f"update of {declared} bytes declared; the model has {size} values"
    delta = u.delta
    if not isinstance(delta, np.ndarray) or delta.shape != (size,):
        return "wrong_shape", f"expected {size} values, received shape {np.shape(delta)}"
    if delta.dtype not in (np.float32, np.float64):
        return "wrong_dtype", f"expected float32 or float64, received {delta.dtype}"
    # Checked in the model's dtype: a float64 value beyond float32's range is finite here but
    # infinite once converted, and the update matrix is float32.
    with np.errstate(over="ignore"):
        values = delta.astype(np.float32, copy=False)
    if not np.all(np.isfinite(values)):
        return "non_finite", f"{int(np.sum(~np.isfinite(values)))} NaN or Inf values as float32"
    if max_norm is not None:
        norm = float(np.linalg.norm(values.astype(np.float64)))
        if norm > max_norm:
            return "too_large", f"L2 norm {norm:.3g} exceeds the limit {max_norm:g}"
    if not isinstance(u.num_examples, int | np.integer) or u.num_examples <= 0:
        return (
            "bad_example_count",
            f"num_examples must be a positive integer, received {u.num_examples!r}",
        )
    return None
