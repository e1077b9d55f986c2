"""The per-client record keys (fedwarden/records.py) are what the wire carries: every key of a
``trust list`` row and of a ``trust show`` round survives the trip through the protocol."""

from fedwarden.protocol.convert import trust_from_proto, trust_to_proto
from fedwarden.protocol.proto_gen import fedwarden_v1_pb2 as pb
from fedwarden.records import HISTORY_KEYS, LIST_KEYS

TEXT = {"client_id": "c07", "rejected_reason": "non_finite", "explanation": "collusion +3.1"}
BOOL = {"flagged", "quarantined"}


def example(keys):
    return {
        k: TEXT.get(k, True if k in BOOL else 3 if k in ("round", "rounds", "last_round",
                                                          "rejected") else 0.25)
        for k in keys
    }  # fmt: skip


def test_every_record_key_crosses_the_wire():
    row, history = example(LIST_KEYS), example(HISTORY_KEYS)
    wire = trust_to_proto([row], last_round=3, history=[history]).SerializeToString()
    rows, rounds = trust_from_proto(pb.TrustReply.FromString(wire))
    assert {k: rows[0].get(k) for k in LIST_KEYS} == row
    assert {k: rounds[0].get(k) for k in HISTORY_KEYS} == history
