"""Conversions between the wire messages (``fedwarden.v1``) and the records both sides use.

The coordinator and the agents convert at the edge with these functions and pass typed records
inside; neither side spells a message's fields anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.records import FIELDS, HISTORY_KEYS

CLIENT_ID_HEADER = "x-fedwarden-client-id"
"""gRPC metadata key naming the caller in token mode (mTLS takes the identity from the certificate)."""


@dataclass(frozen=True)
class TrainingSpec:
    """What an agent needs to build the model, validate its data and train (one per run)."""

    model: str | None
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    weight_shapes: tuple[tuple[int, ...], ...]
    learning_rate: float
    batch_size: int
    local_epochs: int
    seed: int = 0
    dtype: str = "float32"
    dp_sgd: dict[str, Any] | None = field(default=None)  # l2_norm_clip, noise_multiplier, ...

    @property
    def num_weights(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.weight_shapes))


def spec_to_proto(spec: TrainingSpec) -> pb.TrainingSpec:
    dp = spec.dp_sgd or {}
    return pb.TrainingSpec(
        model=spec.model or "",
        dataset=spec.dataset,
        input_shape=list(spec.input_shape),
        num_classes=spec.num_classes,
        dtype=spec.dtype,
        weight_shapes=[pb.Shape(dims=list(s)) for s in spec.weight_shapes],
        learning_rate=spec.learning_rate,
        batch_size=spec.batch_size,
        local_epochs=spec.local_epochs,
        seed=spec.seed,
        dp_sgd=pb.DPSGD(
            enabled=bool(dp),
            l2_norm_clip=dp.get("l2_norm_clip", 0.0),
            noise_multiplier=dp.get("noise_multiplier", 0.0),
            num_microbatches=dp.get("num_microbatches") or 0,
        ),
    )


def spec_from_proto(msg: pb.TrainingSpec) -> TrainingSpec:
    dp = None
    if msg.dp_sgd.enabled:
        dp = {
            "l2_norm_clip": msg.dp_sgd.l2_norm_clip,
            "noise_multiplier": msg.dp_sgd.noise_multiplier,
            "num_microbatches": msg.dp_sgd.num_microbatches or None,
        }
    return TrainingSpec(
        msg.model or None,
        msg.dataset,
        tuple(msg.input_shape),
        msg.num_classes,
        tuple(tuple(s.dims) for s in msg.weight_shapes),
        msg.learning_rate,
        msg.batch_size,
        msg.local_epochs,
        msg.seed,
        msg.dtype or "float32",
        dp,
    )


_TRUST_FLOATS = ("trust", "anomaly", "norm", "cosine", "evidence")
_ROUND_KINDS = {f.name: f.metadata["kind"] for f in FIELDS if f.name in HISTORY_KEYS}
"""The wire's ``ClientRound`` fields, as ``records.ClientRound`` declares them (no client_id)."""


def _present(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if row.get(k) is not None}


def trust_to_proto(
    rows: list[dict[str, Any]], last_round: int, history: list[dict[str, Any]] = ()
) -> pb.TrustReply:
    """``Ledger.list_clients()`` rows (and ``client_history`` rows) as a TrustReply."""
    clients = [
        pb.ClientTrust(
            client_id=row["client_id"],
            flagged=bool(row.get("flagged")),
            quarantined=bool(row.get("quarantined")),
            rounds=int(row.get("rounds") or 0),
            rejected=int(row.get("rejected") or 0),
            explanation=row.get("explanation") or "",
            **_present(row, (*_TRUST_FLOATS, "last_round")),
        )
        for row in rows
    ]
    rounds = [pb.ClientRound(**_round_fields(row)) for row in history]
    return pb.TrustReply(last_round=last_round, clients=clients, history=rounds)


def trust_from_proto(reply: pb.TrustReply) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(clients, history)``: rows shaped like ``Ledger.list_clients()`` and
    ``Ledger.client_history()``, as a remote coordinator holds them."""
    rows = []
    for c in reply.clients:
        row: dict[str, Any] = {
            "client_id": c.client_id,
            "flagged": c.flagged,
            "quarantined": c.quarantined,
            "rounds": c.rounds,
            "rejected": c.rejected,
            "explanation": c.explanation or None,
        }
        for key in (*_TRUST_FLOATS, "last_round"):
            row[key] = getattr(c, key) if c.HasField(key) else None
        rows.append(row)
    return rows, [_round_row(r) for r in reply.history]


def _round_row(msg: pb.ClientRound) -> dict[str, Any]:
    """A ``pb.ClientRound`` as a ``client_history`` row: an unset number or empty string is None."""
    row: dict[str, Any] = {}
    for key, kind in _ROUND_KINDS.items():
        value = getattr(msg, key)
        if kind is str:
            value = value or None
        elif kind is float and not msg.HasField(key):
            value = None
        row[key] = value
    return row


def _round_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A ``client_history`` row as ``pb.ClientRound`` fields: None is an unset optional number,
    an empty string or False."""
    fields: dict[str, Any] = {}
    for key, kind in _ROUND_KINDS.items():
        value = row.get(key)
        if kind is bool:
            fields[key] = bool(value)
        elif kind is str:
            fields[key] = value or ""
        elif kind is int:
            fields[key] = int(value)
        elif value is not None:
            fields[key] = value
    return fields
