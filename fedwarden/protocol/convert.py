"""Conversions between the wire messages (``fedwarden.v1``) and the records both sides use.

The coordinator and the agents convert at the edge with these functions and pass typed records
inside; neither side spells a message's fields anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.records import FIELDS, HISTORY_KEYS, SUMMARY_FIELDS, TRUST_KEYS

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


# The record fields each message carries, with their kinds, and the value a missing one takes.
_TRUST = {f.name: f.metadata["kind"] for f in SUMMARY_FIELDS if f.name in TRUST_KEYS}
_HISTORY = {f.name: f.metadata["kind"] for f in FIELDS if f.name in HISTORY_KEYS}
_ZERO = {str: "", bool: False, float: 0.0, int: 0}


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


def _message(message_type: type, kinds: dict[str, type], row: dict[str, Any]) -> Any:
    """A row as a ``ClientTrust`` or ``ClientRound`` message: the record fields it carries
    (``kinds``), each converted to its kind. A missing or None value leaves an optional field
    unset and is "", False or 0 otherwise."""
    fields: dict[str, Any] = {}
    for name, kind in kinds.items():
        value = row.get(name)
        if value is None and message_type.DESCRIPTOR.fields_by_name[name].has_presence:
            continue
        fields[name] = kind(value or _ZERO[kind])
    return message_type(**fields)


def _row(msg: Any, kinds: dict[str, type]) -> dict[str, Any]:
    """A message as a row of its record fields: an unset optional field or "" is None."""
    row: dict[str, Any] = {}
    for name in kinds:
        value = getattr(msg, name)
        if (msg.DESCRIPTOR.fields_by_name[name].has_presence and not msg.HasField(name)) or (
            value == ""
        ):
            value = None
        row[name] = value
    return row


def trust_to_proto(
    rows: list[dict[str, Any]], last_round: int, history: list[dict[str, Any]] = ()
) -> pb.TrustReply:
    """``Ledger.list_clients()`` rows (and ``client_history`` rows) as a TrustReply.

    The messages carry ``records.TRUST_KEYS`` (``ClientSummary``'s sent fields) and
    ``records.HISTORY_KEYS`` (``ClientRound``'s shown fields); tests/test_records.py holds the
    proto's messages to them."""
    return pb.TrustReply(
        last_round=last_round,
        clients=[_message(pb.ClientTrust, _TRUST, row) for row in rows],
        history=[_message(pb.ClientRound, _HISTORY, row) for row in history],
    )


def trust_from_proto(reply: pb.TrustReply) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(clients, history)``: rows of ``TRUST_KEYS`` and ``HISTORY_KEYS``, shaped like
    ``Ledger.list_clients()`` and ``Ledger.client_history()``, as a remote coordinator holds
    them."""
    return (
        [_row(c, _TRUST) for c in reply.clients],
        [_row(r, _HISTORY) for r in reply.history],
    )
