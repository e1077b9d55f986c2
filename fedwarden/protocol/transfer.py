"""Chunked transfer of large payloads (global weights, client updates) over gRPC streams.

A payload is cut into chunks numbered 0, 1, 2, ...; the receiver knows the total size and the
sha256 of the whole payload up front (or, for an update, from the trailer), rejects gaps,
duplicates and overflow as they happen, and verifies the digest at the end. Chunks of 1 MiB stay
well below gRPC's 4 MB default message limit whatever the model's size.

Example::

    payload = encode_vector(weights)
    chunks = list(split(payload))
    assembler = Assembler(len(payload))
    for seq, data in chunks:
        assembler.add(seq, data)
    assert decode_vector(assembler.finish(sha256_hex(payload)), "float32").shape == weights.shape
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

CHUNK_SIZE = 1 << 20
VECTOR_DTYPES = {
    "float32": "<f4",
    "float64": "<f8",
    "float16": "<f2",
    "int32": "<i4",
    "int64": "<i8",
}
"""Dtype names a payload may declare, and their little-endian wire formats. Only float32 and
float64 updates pass admission; the others decode so admission can reject them with a reason."""


class TransferError(ValueError):
    """A chunk stream is malformed: a gap, an overflow, a wrong size or digest."""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_vector(vector: np.ndarray, dtype: str = "float32") -> bytes:
    """A flat vector as little-endian bytes of ``dtype``."""
    return np.ascontiguousarray(np.ravel(vector), VECTOR_DTYPES[dtype]).tobytes()


def decode_vector(payload: bytes, dtype: str) -> np.ndarray:
    """The flat vector a payload holds (read-only view on ``payload``)."""
    if dtype not in VECTOR_DTYPES:
        raise TransferError(f"unknown dtype {dtype!r}. Accepted values: {', '.join(VECTOR_DTYPES)}")
    wire = np.dtype(VECTOR_DTYPES[dtype])
    if len(payload) % wire.itemsize:
        raise TransferError(f"{len(payload)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(payload, wire).astype(wire.newbyteorder("="), copy=False)


def split(payload: bytes | memoryview, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    """Yields ``(seq, chunk)``; an empty payload is one empty chunk, so a stream is never empty."""
    view = memoryview(payload)
    if len(view) == 0:
        yield 0, b""
        return
    for seq, start in enumerate(range(0, len(view), chunk_size)):
        yield seq, bytes(view[start : start + chunk_size])


class Assembler:
    """Reassembles a chunk stream of a declared total size, checking each chunk as it arrives."""

    def __init__(self, total_size: int, limit: int | None = None):
        if total_size < 0 or (limit is not None and total_size > limit):
            raise TransferError(f"declared size {total_size} bytes is outside [0, {limit}]")
        self.total_size = total_size
        self._buffer = bytearray()
        self._next_seq = 0

    def add(self, seq: int, data: bytes) -> None:
        if seq != self._next_seq:
            raise TransferError(f"chunk {seq} arrived where chunk {self._next_seq} was expected")
        if len(self._buffer) + len(data) > self.total_size:
            raise TransferError(
                f"chunks exceed the declared size of {self.total_size} bytes at chunk {seq}"
            )
        self._buffer += data
        self._next_seq += 1

    def finish(self, expected_sha256: str) -> bytes:
        if len(self._buffer) != self.total_size:
            raise TransferError(
                f"received {len(self._buffer)} of {self.total_size} bytes ({self._next_seq} chunks)"
            )
        payload = bytes(self._buffer)
        self._buffer = bytearray()
        digest = sha256_hex(payload)
        if digest != expected_sha256.lower():
            raise TransferError(
                f"sha256 mismatch: payload {digest[:16]}..., sender said {expected_sha256[:16]}..."
            )
        return payload
