"""Load what a process's first round would otherwise load, while its clients train.

The first ``finish_round`` of a process used to pay for importing numba and loading the
compiled order-statistic kernels from numba's cache, and for importing scikit-learn's HDBSCAN
for the cluster signal: 1-3 s on 2 cores, more than a warm round at K=100, d=1e6. A coordinator
starts :func:`warm_up` when it is built, so that cost overlaps the first round's training.
"""

from __future__ import annotations

import logging
import threading

from fedwarden.aggregation import _kernels

log = logging.getLogger(__name__)

_THREAD: threading.Thread | None = None


def _load() -> None:
    try:
        _kernels.load_compiled()
        import sklearn.cluster  # noqa: F401  (detection.cluster_outliers imports it on first use)
    except Exception:  # the round then loads what it needs itself, as it would without this
        log.debug("warm-up failed", exc_info=True)


def warm_up(background: bool = True) -> threading.Thread:
    """Start loading the first round's kernels and modules, once per process.

    Args:
        background: return at once, the loading running on a daemon thread; otherwise wait
            for it. Numba's dispatchers and Python's imports are locked, so a round that
            starts before the thread ends waits for what it needs instead of loading it twice.

    Returns:
        The loading thread (finished when ``background`` is False).
    """
    global _THREAD
    if _THREAD is None:
        _THREAD = threading.Thread(target=_load, name="fedwarden-warm-up", daemon=True)
        _THREAD.start()
    if not background:
        _THREAD.join()
    return _THREAD
