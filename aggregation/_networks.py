"""Sorting-network kernels for the order statistics, compiled by numba.

Private to ``aggregation`` and imported only when the ``numba`` kernel path runs (``_kernels``):
importing numba costs about a second, which a process that never aggregates should not pay.

The update matrix is ``(K, d)`` with each row contiguous, so a block of ``width`` columns is K
short contiguous rows. A sorting network is a fixed list of compare-exchanges ``(a, b)``, ``a <
b``, that sorts any input; applying each one to the whole block at once (``min`` into row a,
``max`` into row b, over ``width`` columns) sorts every column of the block, with no branch that
depends on the data. The compiler turns those loops into plain SIMD minimum and maximum
instructions of whatever width the CPU has (SSE, AVX2, AVX-512, NEON), so the speed does not
hang on one instruction set.

The network is Batcher's odd-even merge sort (``K log^2 K / 4`` compare-exchanges, 403 for
K=50), pruned to what the caller reads: a compare-exchange whose outputs no later needed
position depends on is dropped (the median of 50 needs 330 of the 403).

References:
  Batcher 1968, "Sorting networks and their applications".
  Knuth, "The Art of Computer Programming", vol. 3, section 5.3.4 (networks for sorting and
  selection).

Every kernel takes the full matrix and a column range ``[start, stop)``; callers share the columns
between threads (the kernels release the GIL). Nothing here modifies its input.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit


def _batcher(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for ``n`` inputs, as compare-exchanges in order.

    Built for the next power of two; the padding inputs are taken as +inf, so a compare-exchange
    that touches one never moves anything and is left out.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:  # merge sorted runs of length p into runs of length 2p
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=128)
def network(n: int, positions: tuple[int, ...] | None = None) -> np.ndarray:
    """The ``(m, 2)`` compare-exchanges that put ``positions`` (default: all) of ``n`` in order.

    After the network, the value at each position in ``positions`` is the one a full sort puts
    there; the others hold the rest of the values in some order.
    """
    pairs = _batcher(n)
    if positions is not None:
        needed, kept = set(positions), []
        for a, b in reversed(pairs):  # a comparator matters if a needed position reads it
            if a in needed or b in needed:
                kept.append((a, b))
                needed.update((a, b))
        pairs = kept[::-1]
    out = np.array(pairs, np.int64).reshape(-1, 2)
    out.flags.writeable = False
    return out


@njit(nogil=True, cache=True)
def _sort_block(buf, pairs, n):  # pragma: no cover - compiled
    for p in range(pairs.shape[0]):
        low = buf[pairs[p, 0]]
        high = buf[pairs[p, 1]]
        for j in range(n):
            u = low[j]
            v = high[j]
            low[j] = u if u < v else v
            high[j] = v if u < v else u


@njit(nogil=True, cache=True)
def _load(buf, x, rows, start, n):  # pragma: no cover - compiled
    for r in range(rows.shape[0]):
        src = x[rows[r]]
        dst = buf[r]
        for j in range(n):
            dst[j] = src[start + j]


@njit(nogil=True, cache=True)
def median_columns(x, pairs, half, out, start, stop, width):  # pragma: no cover - compiled
    """``out[start:stop]``: the median of each column (mean of the middle two when K is even)."""
    k = x.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    rows = np.arange(k)
    buf = np.empty((k, width), x.dtype)
    for s in range(start, stop, width):
        n = min(stop, s + width) - s
        _load(buf, x, rows, s, n)
        _sort_block(buf, pairs, n)
        a, b = buf[lo], buf[hi]
        for j in range(n):
            out[s + j] = a[j] if lo == hi else a[j] * half + b[j] * half  # halves: no overflow


@njit(nogil=True, cache=True)
def trim_columns(
    x, pairs, t, keep, out, med, half, counts, shared, start, stop, width
):  # pragma: no cover - compiled
    """Trimmed means, medians and per-row trimmed counts of the columns ``[start, stop)``.

    Drops the ``t`` smallest and ``t`` largest values of each column. Unless ``out`` is empty,
    writes the mean of the rest to it: summed from the smallest up and divided by ``keep`` (the
    count, in the input dtype), as ``np.sort(x, axis=0)[t:K - t].mean(axis=0)`` does. Unless
    ``med`` is empty, writes each column's median to it, as ``median_columns`` does (``pairs``
    must then order the middle positions too). Adds to ``counts[i]`` the columns where
    row i is trimmed. Where a cut value is tied (more rows equal to it than slots left), the
    rows strictly beyond the cut are trimmed and the ``need`` slots left are split among the
    tied rows, ``need / tied`` to each, added to ``shared``.
    """
    k = x.shape[0]
    rows = np.arange(k)
    buf = np.empty((k, width), x.dtype)
    acc = np.empty(width, x.dtype)
    cut_lo = np.empty(width, x.dtype)
    cut_hi = np.empty(width, x.dtype)
    open_lo = np.empty(width, np.bool_)  # the cut is not tied: rows equal to it are trimmed
    open_hi = np.empty(width, np.bool_)
    below = np.empty(width, x.dtype)  # a row is trimmed low where its value < below[j]
    above = np.empty(width, x.dtype)  # and high where its value > above[j]
    inf = x.dtype.type(np.inf)
    for s in range(start, stop, width):
        n = min(stop, s + width) - s
        _load(buf, x, rows, s, n)
        _sort_block(buf, pairs, n)
        if med.shape[0]:
            a, b = buf[(k - 1) // 2], buf[k // 2]
            for j in range(n):
                med[s + j] = a[j] if k % 2 else a[j] * half + b[j] * half
        if out.shape[0]:
            acc[:n] = 0
            for r in range(t, k - t):
                row = buf[r]
                for j in range(n):
                    acc[j] += row[j]
            for j in range(n):
                out[s + j] = acc[j] / keep
        if t == 0:
            continue
        for j in range(n):
            cut_lo[j] = buf[t - 1, j]
            cut_hi[j] = buf[k - t, j]
            open_lo[j] = buf[t, j] != cut_lo[j]
            open_hi[j] = buf[k - t - 1, j] != cut_hi[j]
            # At an open cut the rows equal to it are trimmed too: v <= cut is v < the next
            # float up (an open low cut is never +inf, an open high cut never -inf).
            below[j] = np.nextafter(cut_lo[j], inf) if open_lo[j] else cut_lo[j]
            above[j] = np.nextafter(cut_hi[j], -inf) if open_hi[j] else cut_hi[j]
        for i in range(k):
            src = x[i]
            c = np.int32(0)  # kept int32 (numba widens int32 sums): 8 columns per AVX2 add
            for j in range(n):
                v = src[s + j]
                c = np.int32(c + np.int32(v < below[j]) + np.int32(v > above[j]))
            counts[i] += c
        for j in range(n):
            if not open_lo[j]:
                _share_tied(x, s + j, cut_lo[j], t, True, shared)
            if not open_hi[j]:
                _share_tied(x, s + j, cut_hi[j], t, False, shared)


@njit(nogil=True, cache=True)
def _share_tied(x, col, cut, t, low, shared):  # pragma: no cover - compiled
    k = x.shape[0]
    beyond, tied = 0, 0
    for i in range(k):
        v = x[i, col]
        if v == cut:
            tied += 1
        elif (v < cut) == low:
            beyond += 1
    need = t - beyond
    for i in range(k):
        if x[i, col] == cut:
            shared[i] += need / tied


@njit(nogil=True, cache=True)
def bulyan_columns(x, rows, pairs, f, half, count, out, start, stop, width):  # pragma: no cover
    """Bulyan's coordinate step on the selected ``rows``, columns ``[start, stop)``.

    For each column, the mean of the ``beta = theta - 2f`` selected values closest to their
    median, ties to the smaller value, summed in the input dtype from the smallest up and divided
    by ``count`` (``beta`` in the input dtype).
    """
    theta = rows.shape[0]
    beta = theta - 2 * f
    lo, hi = (theta - 1) // 2, theta // 2
    buf = np.empty((theta, width), x.dtype)
    med = np.empty(width, x.dtype)
    first = np.empty(width, np.int64)
    acc = np.empty(width, x.dtype)
    zero = half - half  # 0 in the input dtype: float32 sums stay float32
    for s in range(start, stop, width):
        n = min(stop, s + width) - s
        _load(buf, x, rows, s, n)
        _sort_block(buf, pairs, n)
        for j in range(n):
            med[j] = buf[lo, j] * half + buf[hi, j] * half
            first[j] = 0
            acc[j] = zero
        # The beta closest values are a run of the sorted column; it starts after every i whose
        # value lies farther below the median than the value beta places on lies above it.
        for i in range(2 * f):
            low, high = buf[i], buf[i + beta]
            for j in range(n):
                first[j] += med[j] - low[j] > high[j] - med[j]
        for r in range(theta):
            row = buf[r]
            for j in range(n):
                inside = first[j] <= r and r < first[j] + beta
                acc[j] += row[j] if inside else zero
        for j in range(n):
            out[s + j] = acc[j] / count


@njit(nogil=True, cache=True)
def sketch_rows(x, code, out, first, last):  # pragma: no cover - compiled
    """Count sketch of the rows ``[first, last)``: adds ``sign[j] * x[i, j]`` to ``out[i, bucket[j]]``,
    where ``code[j] = 2 * bucket[j] + (sign[j] < 0)`` (signs are +-1).

    Each row's bucket sums are taken over ``j`` in ascending order from 0, the order in which
    ``np.bincount(bucket, x[i] * sign)`` adds them, so the sums are the same to the last bit.
    Four rows go through the columns together, their four sums of a bucket side by side in one
    cache line, so one read of ``code`` and one line of sums serve four rows.
    """
    d = x.shape[1]
    dim = out.shape[1]
    sums = np.empty((dim, 4))
    i = first
    while i + 4 <= last:
        sums[:] = 0.0
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for j in range(d):
            c = code[j]
            b = c >> 1
            g = 1.0 - 2.0 * (c & 1)
            sums[b, 0] += g * x0[j]
            sums[b, 1] += g * x1[j]
            sums[b, 2] += g * x2[j]
            sums[b, 3] += g * x3[j]
        for b in range(dim):
            for r in range(4):
                out[i + r, b] = sums[b, r]
        i += 4
    for r in range(i, last):
        src = x[r]
        acc = out[r]
        for j in range(d):
            c = code[j]
            acc[c >> 1] += (1.0 - 2.0 * (c & 1)) * src[j]
