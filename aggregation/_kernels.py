"""Shared numeric kernels of the rules: order statistics over columns, one Gram matrix.

Private to ``aggregation``; numpy in, numpy out, no I/O. Nothing here mutates its input.

**Order statistics** (median, trimmed mean and its trimmed shares, Bulyan's coordinate step) run
on one of three paths, each exact (the same values a full sort of every column gives):

- ``numba``: sorting networks over blocks of columns, compiled by numba (``_networks``); SIMD
  minimum and maximum of whatever width the CPU has, so it is as fast on an AVX2 or ARM CPU as
  on one with AVX-512. Used for float32 and float64 cohorts of up to ``NETWORK_MAX_CLIENTS``
  rows; larger cohorts and other dtypes take the numpy path of this CPU.
- ``numpy-sort``: cache-sized blocks of columns copied into a transposed ``(B, K)`` buffer and
  sorted row by row with ``ndarray.sort``, which numpy >= 1.25 vectorises with AVX-512 only.
- ``numpy-partition``: the same blocks, ``np.partition`` at the needed order statistics.

``FEDWARDEN_KERNEL`` (``auto``, the default, or one of the three) chooses the path when the
module is imported; ``auto`` takes ``numba`` when it is installed, else ``numpy-sort`` on a CPU
where numpy's sort is vectorised and ``numpy-partition`` elsewhere. Each path shares the columns
between ``THREADS`` threads (numba's kernels and numpy's sorts release the GIL); per-client
counts are added in a fixed order, so the result does not depend on timing.

**Distances** come from one Gram matrix, ``||a - b||^2 = |a|^2 + |b|^2 - 2ab`` clamped at 0, with
the column blocks' products (BLAS ``syrk`` in the input dtype) summed in float64, over
``THREADS`` threads for large inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

PATHS = ("numba", "numpy-sort", "numpy-partition")
"""The order-statistic kernel paths ``FEDWARDEN_KERNEL`` can force."""

# Threads for large inputs (FEDWARDEN_AGGREGATION_THREADS overrides).
THREADS = max(1, int(os.environ.get("FEDWARDEN_AGGREGATION_THREADS", min(2, os.cpu_count() or 1))))
# Multiply-adds (Gram) or values (order statistics) below which work stays on the calling thread.
_THREAD_WORK = 1 << 26
_THREAD_VALUES = 1 << 20
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (owner pid, pool)

# Largest cohort sorted by a network (K log^2 K compare-exchanges per column, against O(K) for
# a selection): at d=20,000 (2 shared cores, load 23) the median of 1024 rows took 0.89 s as a
# network, 0.94 s with numpy's AVX-512 sort and 2.13 s with np.partition; 512 rows 0.32, 0.42,
# 1.08 s. Larger cohorts take the numpy path.
NETWORK_MAX_CLIENTS = 1024
# Bytes of one network block (K rows of `width` columns): stays in L1/L2 through the network.
_NETWORK_BYTES = 1 << 15
_MAX_WIDTH = 256
# Bytes of the transposed (B, K) buffer of the numpy path: fits in L2 with its source rows.
_BLOCK_BYTES = 1 << 19
# Bytes of one column block of the Gram accumulation (the block stays in L2 through syrk).
_GRAM_BYTES = 1 << 21
# Columns per float32 dot product in the norms (summed in float64 across blocks).
_NORM_COLUMNS = 1 << 16


def _simd_sort() -> bool:
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy >= 2 moved it; numpy 2 sorts with AVX2 too
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
        return bool(features.get("AVX512_SKX") or features.get("AVX2"))
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    return (major, minor) >= (1, 25) and bool(features.get("AVX512_SKX"))


SIMD_SORT = _simd_sort()
"""Whether numpy's sort is SIMD-vectorised on this CPU (``NPY_DISABLE_CPU_FEATURES`` counts)."""


def _path(value: str) -> str:
    if value == "auto":
        if importlib.util.find_spec("numba") is not None:
            return "numba"
        return "numpy-sort" if SIMD_SORT else "numpy-partition"
    if value not in PATHS:
        raise ValueError(
            f"FEDWARDEN_KERNEL must be auto or one of {', '.join(PATHS)}. Received: "
            f"FEDWARDEN_KERNEL={value!r}."
        )
    if value == "numba" and importlib.util.find_spec("numba") is None:
        raise ImportError(
            "FEDWARDEN_KERNEL=numba needs numba. Received: numba is not installed; install the "
            "locked requirements (requirements.lock) or choose another kernel."
        )
    return value


PATH = _path(os.environ.get("FEDWARDEN_KERNEL", "auto").strip().lower() or "auto")
"""The order-statistic path this process uses (tests set it to run every path)."""


def order_kernel(num_rows: int, dtype: Any = np.float32) -> str:
    """The path that computes order statistics of ``num_rows`` rows of ``dtype`` here."""
    if PATH == "numba":
        if np.dtype(dtype) in (np.float32, np.float64) and num_rows <= NETWORK_MAX_CLIENTS:
            return "numba"
        return "numpy-sort" if SIMD_SORT else "numpy-partition"
    return PATH


def _nets() -> Any:
    from fedwarden.aggregation import _networks  # imports numba: only when the path runs

    return _networks


def load_compiled() -> None:
    """Load the compiled order-statistic kernels (numba's on-disk cache) for float32 matrices,
    the first call's cost; a no-op off the ``numba`` path."""
    if PATH != "numba":
        return
    x = np.zeros((5, 16), np.float32)  # the dtype and layout the rounds' matrices have
    median(x)
    trimmed_mean(x, 1)
    median_and_trimmed_counts(x, 1)
    bulyan_mean(x, np.arange(5), 1)
    count_sketch(x, np.zeros(16, np.int64), np.ones(16), 4)


def _width(rows: int, dtype: np.dtype) -> int:
    """Columns per network block: a multiple of 16 that keeps ``rows`` rows in L1/L2."""
    return int(np.clip(_NETWORK_BYTES // (rows * dtype.itemsize) // 16 * 16, 16, _MAX_WIDTH))


def _column_ranges(d: int, work: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, d)`` cut into one contiguous range per thread (one range when ``work`` is small)."""
    threads = min(THREADS, max(1, d // max(align, 1))) if work >= _THREAD_VALUES else 1
    size = -(-d // threads)
    size = -(-size // align) * align
    return [(s, min(d, s + size)) for s in range(0, d, size)] or [(0, 0)]


def _over_columns(fn: Callable[[int, int], T], d: int, k: int, align: int = 1) -> list[T]:
    """``fn(start, stop)`` over column ranges, on the pool when the input is large, in order."""
    ranges = _column_ranges(d, k * d, align)
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    return list(_pool().map(lambda r: fn(*r), ranges))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child has no pool threads
        _POOL = (os.getpid(), ThreadPoolExecutor(THREADS, thread_name_prefix="fedwarden-agg"))
    return _POOL[1]


# ---------------------------------------------------------------- order statistics


def median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median ``(d,)`` in the input dtype; mean of the middle two when K is even.

    The mean is taken as ``0.5 * a + 0.5 * b`` in the input dtype (never overflows), the value
    ``np.median`` gives.
    """
    shared = _shared(updates)
    if shared is not None:
        return shared.statistics()[0].copy()
    k, d = updates.shape
    out = np.empty(d, updates.dtype)
    if order_kernel(k, updates.dtype) == "numba":
        nets = _nets()
        x = np.ascontiguousarray(updates)
        pairs = nets.network(k, tuple(sorted({(k - 1) // 2, k // 2})))
        width = _width(k, x.dtype)
        half = x.dtype.type(0.5)
        _over_columns(
            lambda s, e: nets.median_columns(x, pairs, half, out, s, e, width), d, k, width
        )
        return out
    lo, hi = (k - 1) // 2, k // 2

    def chunk(start: int, stop: int) -> None:
        for s, e, block in column_blocks(updates[:, start:stop]):
            order_rows(block, (lo, hi))
            if lo == hi:
                out[start + s : start + e] = block[:, lo]
            else:
                np.add(0.5 * block[:, lo], 0.5 * block[:, hi], out=out[start + s : start + e])

    _over_columns(chunk, d, k)
    return out


def trimmed_mean(updates: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise mean without the ``t`` smallest and largest values, and trimmed counts.

    Returns ``(mean (d,) in the input dtype, trimmed (K,) float64)``: ``trimmed[i]`` is the
    number of columns where row i was trimmed, at either end. Where several rows tie at a cut,
    the slots left are split evenly among them (``slots / tied`` each), so the counts do not
    depend on the row order and sum to ``2 t d``.
    """
    k, d = updates.shape
    out = np.empty(d, updates.dtype)
    if order_kernel(k, updates.dtype) == "numba":
        parts = _trim_numba(updates, t, out)
        return out, sum((c + s for c, s in parts), np.zeros(k))
    kth = (t - 1, t, k - t - 1, k - t) if t else ()

    def chunk(start: int, stop: int) -> np.ndarray:
        trimmed = np.zeros(k)
        for s, e, block in column_blocks(updates[:, start:stop]):
            order_rows(block, kth)
            mean = out[start + s : start + e]
            np.sum(block[:, t : k - t], axis=1, out=mean)
            mean /= mean.dtype.type(k - 2 * t)
            if t:
                trimmed += _trimmed_in_block(updates[:, start + s : start + e], block, t)
        return trimmed

    return out, sum(_over_columns(chunk, d, k), np.zeros(k))


def trimmed_counts(updates: np.ndarray, t: int) -> np.ndarray:
    """Per row, the number of columns where a ``t``-per-side trimmed mean trims it (float64).

    Where several rows tie at a cut, the slots left are split evenly among them, as in
    :func:`trimmed_mean`: a row's count is what it gets on average over every order of the rows,
    so it does not depend on where in the cohort the row sits. (Broken by row order, as a stable
    sort does, the first and last rows took the slots of every column where all updates are 0:
    14% of the digits model's weights, 4-9% of the Fashion-MNIST CNN's.)
    """
    shared = _shared(updates)
    if shared is not None and shared.t == t:
        return shared.statistics()[1].copy()
    k, d = updates.shape
    if order_kernel(k, updates.dtype) == "numba":
        return sum((c + s for c, s in _trim_numba(updates, t, None)), np.zeros(k))

    def chunk(start: int, stop: int) -> np.ndarray:
        counts = np.zeros(k)
        for s, e, block in column_blocks(updates[:, start:stop]):
            order_rows(block, (t - 1, t, k - t - 1, k - t))
            counts += _trimmed_in_block(updates[:, start + s : start + e], block, t)
        return counts

    return sum(_over_columns(chunk, d, k), np.zeros(k))


def median_and_trimmed_counts(updates: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`median` and :func:`trimmed_counts` (``t >= 1``) from one pass over the columns.

    Both read the same order statistics of each column block, so the pair costs about what the
    counts alone cost. Needs ``K >= 2 t + 1``.
    """
    shared = _shared(updates)
    if shared is not None and shared.t == t:
        med, counts = shared.statistics()
        return med.copy(), counts.copy()
    k, d = updates.shape
    if not 1 <= t <= (k - 1) // 2:
        raise ValueError(
            f"median_and_trimmed_counts needs 1 <= t <= (K - 1) / 2. Received: t={t}, K={k}."
        )
    med = np.empty(d, updates.dtype)
    if order_kernel(k, updates.dtype) == "numba":
        parts = _trim_numba(updates, t, None, med=med)
        return med, sum((c + s for c, s in parts), np.zeros(k))
    lo, hi = (k - 1) // 2, k // 2

    def chunk(start: int, stop: int) -> np.ndarray:
        counts = np.zeros(k)
        for s, e, block in column_blocks(updates[:, start:stop]):
            order_rows(block, (t - 1, t, lo, hi, k - t - 1, k - t))
            target = med[start + s : start + e]
            if lo == hi:
                target[...] = block[:, lo]
            else:
                np.add(0.5 * block[:, lo], 0.5 * block[:, hi], out=target)
            counts += _trimmed_in_block(updates[:, start + s : start + e], block, t)
        return counts

    return med, sum(_over_columns(chunk, d, k), np.zeros(k))


class _SharedStatistics:
    """The median and ``t``-trimmed counts of one registered matrix, computed once on demand."""

    def __init__(self, matrix: np.ndarray, t: int):
        self.matrix, self.t = matrix, t  # the reference keeps the buffer from being reused
        self._key = _array_key(matrix)
        self._values: tuple[np.ndarray, np.ndarray] | None = None

    def serves(self, updates: np.ndarray) -> bool:
        return _array_key(updates) == self._key

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self._values is None:
            self._values = _scope_off(median_and_trimmed_counts, self.matrix, self.t)
        return self._values


def _array_key(x: np.ndarray) -> tuple:
    """Same buffer, layout and dtype: any view of the registered matrix that reads the same
    values (``np.asarray`` of it, a full slice), never another matrix."""
    return (x.__array_interface__["data"][0], x.shape, x.strides, x.dtype.str)


_SCOPE: contextvars.ContextVar[list | None] = contextvars.ContextVar("order_scope", default=None)


@contextlib.contextmanager
def order_statistics_scope() -> Iterator[None]:
    """Within the block, the median and trimmed counts of a matrix registered with
    :func:`share_order_statistics` come from one pass, however many callers ask for them.

    The caller promises that a registered matrix does not change inside the block (steps never
    modify their inputs); leaving the block forgets every registration.
    """
    token = _SCOPE.set([])
    try:
        yield
    finally:
        _SCOPE.reset(token)


def share_order_statistics(matrix: np.ndarray, t: int) -> None:
    """Registers ``matrix`` (``K >= 2t + 1``, ``t >= 1``) in the current scope (no-op outside)."""
    registered = _SCOPE.get()
    if registered is not None and 1 <= t <= (matrix.shape[0] - 1) // 2 and matrix.shape[1]:
        registered[:] = [_SharedStatistics(matrix, t)]  # the latest matrix replaces the last


def _shared(updates: np.ndarray) -> _SharedStatistics | None:
    registered = _SCOPE.get()
    if not registered or not isinstance(updates, np.ndarray):
        return None
    return registered[0] if registered[0].serves(updates) else None


_ALLOCATE: contextvars.ContextVar[Callable[[tuple, Any], np.ndarray] | None] = (
    contextvars.ContextVar("row_allocator", default=None)
)


@contextlib.contextmanager
def row_allocator(allocate: Callable[[tuple, Any], np.ndarray]) -> Iterator[None]:
    """Within the block, steps that build a new ``(K, d)`` matrix (``clip_rows``) get its
    buffer from ``allocate(shape, dtype)``: the coordinator hands out memory-mapped files when the
    round's matrix is spilled, so the copy does not land in private memory either."""
    token = _ALLOCATE.set(allocate)
    try:
        yield
    finally:
        _ALLOCATE.reset(token)


def new_rows(shape: tuple, dtype: Any) -> np.ndarray:
    """An uninitialised matrix from the current :func:`row_allocator` (``np.empty`` outside)."""
    allocate = _ALLOCATE.get()
    return np.empty(shape, dtype) if allocate is None else allocate(shape, dtype)


def _scope_off(fn: Callable[..., T], *args: Any) -> T:
    token = _SCOPE.set(None)  # the computation itself must not look itself up
    try:
        return fn(*args)
    finally:
        _SCOPE.reset(token)


def _trim_numba(
    updates: np.ndarray,
    t: int,
    out: np.ndarray | None,
    med: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    nets = _nets()
    x = np.ascontiguousarray(updates)
    k, d = x.shape
    if out is None:  # the counts read only the values at the cuts and next to them
        positions = {t - 1, t, k - t - 1, k - t} if t else set()
    else:  # the mean adds the kept values in sorted order
        positions = set(range(max(t - 1, 0), k - max(t - 1, 0))) if t else set()
    if med is not None:
        positions |= {(k - 1) // 2, k // 2}
    pairs = nets.network(k, tuple(sorted(positions))) if positions else nets.network(0)
    width = _width(k, x.dtype)
    empty = np.empty(0, x.dtype)  # an empty output is not computed
    sink = empty if out is None else out
    middle = empty if med is None else med
    keep, half = x.dtype.type(k - 2 * t), x.dtype.type(0.5)

    def chunk(s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        counts, shared = np.zeros(k, np.int64), np.zeros(k)
        nets.trim_columns(x, pairs, t, keep, sink, middle, half, counts, shared, s, e, width)
        return counts, shared

    return _over_columns(chunk, d, k, width)


def _trimmed_in_block(source: np.ndarray, block: np.ndarray, t: int) -> np.ndarray:
    """Per-row trimmed counts of one block whose rows ``block`` (columns) hold the order stats;
    the slots left at a tied cut are split evenly among the tied rows."""
    k = source.shape[0]
    counts = np.zeros(k)
    for cut, inner, low in (
        (block[:, t - 1], block[:, t], True),
        (block[:, k - t], block[:, k - t - 1], False),
    ):
        beyond = source <= cut if low else source >= cut
        tied = np.flatnonzero(inner == cut)  # more rows at or beyond the cut than slots
        if len(tied):
            values, cuts = source[:, tied], cut[tied]
            equal = values == cuts
            strict = beyond[:, tied] & ~equal
            need = t - strict.sum(axis=0)
            beyond[:, tied] = False
            counts += strict.sum(axis=1) + equal @ (need / equal.sum(axis=0))
        counts += beyond.sum(axis=1)
    return counts


def bulyan_mean(updates: np.ndarray, rows: np.ndarray, f: int) -> np.ndarray:
    """Bulyan's coordinate step: per column, the mean of the ``beta = len(rows) - 2f`` values of
    the selected ``rows`` closest to their median (ties: the smaller value); ``(d,)``, input dtype.
    """
    k, d = updates.shape
    theta = len(rows)
    beta = theta - 2 * f
    out = np.empty(d, updates.dtype)
    if order_kernel(theta, updates.dtype) == "numba":
        nets = _nets()
        x = np.ascontiguousarray(updates)
        pairs = nets.network(theta)
        width = _width(theta, x.dtype)
        half, count = x.dtype.type(0.5), x.dtype.type(beta)
        picked = np.asarray(rows, np.int64)
        _over_columns(
            lambda s, e: nets.bulyan_columns(x, picked, pairs, f, half, count, out, s, e, width),
            d,
            theta,
            width,
        )
        return out
    lo, hi = (theta - 1) // 2, theta // 2
    window = np.arange(beta)

    def chunk(start: int, stop: int) -> None:
        for s, e, block in column_blocks(updates[:, start:stop], rows):
            block.sort(axis=1)
            target = out[start + s : start + e]
            if beta == theta:
                np.mean(block, axis=1, out=target)
                continue
            med = 0.5 * block[:, lo] + 0.5 * block[:, hi]
            # The beta values closest to the median are a run of the sorted row. The run starts
            # after every s whose value is farther below the median than the value beta places
            # on is above it (a monotone test, so counting finds the start; ties keep the
            # smaller value).
            farther = med[:, None] - block[:, : 2 * f] > block[:, beta:] - med[:, None]
            first = np.count_nonzero(farther, axis=1)
            picked = np.take_along_axis(block, first[:, None] + window, axis=1)
            np.mean(picked, axis=1, out=target)

    _over_columns(chunk, d, theta)
    return out


def column_blocks(
    updates: np.ndarray, rows: np.ndarray | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yields ``(start, stop, block)``, ``block`` a ``(stop - start, K)`` transposed column copy.

    ``rows`` (sorted indices) restricts the blocks to those rows. The block is a reused scratch
    buffer: callers may reorder it in place but must copy what they keep past the next iteration.
    """
    d = updates.shape[1]
    k = updates.shape[0] if rows is None else len(rows)
    columns = max(64, _BLOCK_BYTES // max(1, k * updates.dtype.itemsize))
    buffer = np.empty((min(columns, d), k), updates.dtype)
    for start in range(0, d, columns):
        stop = min(d, start + columns)
        block = buffer[: stop - start]
        source = updates[:, start:stop] if rows is None else updates[rows, start:stop]
        block[...] = source.T
        yield start, stop, block


def order_rows(block: np.ndarray, kth: Sequence[int]) -> None:
    """Puts the order statistics ``kth`` of every row of ``block`` in place (sorts or partitions).

    After the call ``block[:, i]`` is the i-th smallest of its row for every i in ``kth``, and the
    values between two consecutive ``kth`` positions lie between them.
    """
    if not len(kth):
        return
    if PATH == "numpy-sort" or (PATH != "numpy-partition" and SIMD_SORT):
        block.sort(axis=1)
    else:
        block.partition(sorted(set(kth)), axis=1)


# ---------------------------------------------------------------- distances


def gram(updates: np.ndarray, extra: np.ndarray | Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Float64 Gram matrix of the rows of ``updates``, with the rows of ``extra`` appended last.

    ``extra`` is a ``(d,)`` or ``(r, d)`` array or a sequence of ``(d,)`` vectors; a sequence
    is never stacked whole, only block by block, so references of another dtype or from
    different arrays cost no copy of their own.

    Products are taken in the input dtype over cache-sized column blocks (numpy runs ``b @ b.T``
    as a BLAS ``syrk``, and the products with ``extra`` as a ``gemm`` on the same block, so the
    block is never copied) and the blocks are summed in float64: float64 input is exact to
    rounding, float32 input has relative errors around 1e-6 of the squared norms, the precision
    of the data. The result is exactly symmetric, so equal distances compare equal.
    """
    k, d = updates.shape
    if extra is None:
        rows = []
    elif isinstance(extra, np.ndarray):
        rows = list(np.reshape(extra, (-1, d)))
    else:
        rows = [np.reshape(r, d) for r in extra]
    n = k + len(rows)
    # At least 8 n columns: each block's (n, n) product and its float64 sum then cost a small
    # fraction of the block's own work (at K=1000 and 2 MB blocks they cost more than the block).
    columns = max(256, _GRAM_BYTES // (n * updates.dtype.itemsize), 8 * n)
    starts = list(range(0, d, columns))

    def partial(chunk: list[int]) -> np.ndarray:
        g = np.zeros((n, n))
        for start in chunk:
            stop = min(d, start + columns)
            block = updates[:, start:stop]
            g[:k, :k] += block @ block.T
            if rows:
                tail = np.stack([r[start:stop] for r in rows]).astype(updates.dtype, copy=False)
                g[:k, k:] += block @ tail.T
                g[k:, k:] += tail @ tail.T
        g[k:, :k] = g[:k, k:].T
        return g

    g = np.zeros((n, n))
    for part in _map_chunks(partial, starts, work=n * n * d):
        g += part  # in chunk order: the same sum on every run
    return 0.5 * (g + g.T)


def _map_chunks(fn: Callable[[list[int]], T], items: list[int], work: int) -> list[T]:
    """``fn`` over contiguous chunks of ``items``, one per thread when ``work`` is large.

    BLAS releases the GIL, so big inputs use up to ``THREADS`` cores; small ones stay on the
    calling thread, where a pool would cost more than it saves. While the pool runs, BLAS is held
    to one thread per call: OpenBLAS's own threads on top of ours oversubscribe the cores (with
    its Haswell kernels, K=50 x 1e6 float32: 0.43 s against 0.27 s, load 17).
    """
    threads = min(THREADS, len(items)) if work >= _THREAD_WORK else 1
    if threads <= 1:
        return [fn(items)]
    size = -(-len(items) // threads)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with _one_blas_thread():
        return list(_pool().map(fn, chunks))


_BLAS: Any = None  # threadpoolctl's controller, built on first use (it scans the loaded libraries)


def _one_blas_thread() -> Any:
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # without threadpoolctl BLAS keeps its own threads
            _BLAS = False
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext()


def row_norms(updates: np.ndarray) -> np.ndarray:
    """Float64 L2 norm of every row: BLAS dot products over column blocks, summed in float64."""
    k, d = updates.shape
    sq = np.zeros(k)
    for i, row in enumerate(updates):  # one dot per client and block, no (K, d) temporary
        for start in range(0, d, _NORM_COLUMNS):
            part = row[start : start + _NORM_COLUMNS]
            sq[i] += float(np.dot(part, part))
    return np.sqrt(sq)


# ---------------------------------------------------------------- count sketch


def sketch_code(bucket: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """``2 * bucket + (sign < 0)`` as int32, the one array :func:`count_sketch`'s compiled pass
    reads per column (a quarter of the bytes of ``bucket`` and ``sign``). ``sign`` is +-1."""
    sign = np.asarray(sign)
    if not np.all(np.abs(sign) == 1) or (
        len(bucket) and not 0 <= np.min(bucket) <= np.max(bucket) < 2**30
    ):
        raise ValueError(
            "count_sketch needs signs of +1 or -1 and buckets in [0, 2**30). Received: signs "
            f"{np.unique(sign)[:5]}, buckets in [{np.min(bucket, initial=0)}, "
            f"{np.max(bucket, initial=0)}]."
        )
    code = np.asarray(bucket).astype(np.int32)
    code <<= 1
    code |= np.signbit(sign)
    return code


def count_sketch(
    updates: np.ndarray,
    bucket: np.ndarray,
    sign: np.ndarray,
    dim: int,
    code: np.ndarray | None = None,
) -> np.ndarray:
    """``(K, dim)`` float64: row i's ``np.bincount(bucket, updates[i] * sign, dim)``, bit for bit.

    On the ``numba`` path one compiled pass over the matrix, four rows at a time, the rows shared
    between ``THREADS`` threads; elsewhere a ``bincount`` per row. ``sign`` is +1 or -1 per
    column; ``code`` is ``sketch_code(bucket, sign)`` when the caller keeps it (it is computed
    otherwise).
    """
    k, d = updates.shape
    out = np.zeros((k, dim))
    if k == 0 or PATH != "numba" or updates.dtype not in (np.float32, np.float64):
        for i, row in enumerate(updates):
            out[i] = np.bincount(bucket, row * sign, dim)
        return out
    nets = _nets()
    x = np.ascontiguousarray(updates)
    code = sketch_code(bucket, sign) if code is None else code
    threads = min(THREADS, k) if k * d >= _THREAD_VALUES else 1
    size = -(-k // max(threads, 1))
    size = -(-size // 4) * 4  # whole groups of four rows per thread
    ranges = [(first, min(k, first + size)) for first in range(0, k, size)]

    def rows(r: tuple[int, int]) -> None:
        nets.sketch_rows(x, code, out, r[0], r[1])

    if len(ranges) == 1:
        rows(ranges[0])
    else:
        list(_pool().map(rows, ranges))
    return out


def sq_distances(g: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances from a Gram matrix, clamped at 0, zero diagonal."""
    sq = np.diag(g)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    np.fill_diagonal(dist, 0.0)
    return dist
