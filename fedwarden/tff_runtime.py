"""Housekeeping for TFF's local runtime: its worker process, and tracing under op determinism.

TFF's default execution context (``set_sync_local_cpp_execution_context``) runs computations in
a ``worker_binary`` child process. In tensorflow-federated 0.87 nothing stops that child at
interpreter exit, so every script or test run would leave one behind, holding a port, memory and
the parent's stdout (a shell pipe such as ``python run.py | tail`` then never ends).
``stop_workers_at_exit()`` registers an ``atexit`` hook that interrupts (SIGINT, what TFF itself
sends) and reaps this process's own ``worker_binary`` children, found by parent pid in ``/proc``;
other processes' workers are never touched. Elsewhere than Linux it does nothing.

``tracing_without_determinism()`` lets TFF trace computations with unseeded random ops (its DP
aggregators take no seed) in a process that enabled ``tf.config.experimental.
enable_op_determinism()``, as simulations do; TF refuses to build such ops otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from collections.abc import Iterator

from tensorflow.python.framework import config as tf_config

_registered = False


def worker_pids() -> list[int]:
    """Pids of the ``worker_binary`` processes whose parent is this process."""
    me, pids = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if name == "worker_binary" and len(fields) > 1 and int(fields[1]) == me:
            pids.append(int(entry))
    return pids


def stop_workers(timeout_s: float = 5.0) -> None:
    """Interrupts this process's TFF workers and waits for them (SIGKILL after ``timeout_s``)."""
    pids = worker_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done or time.monotonic() > deadline:
                if not done:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                break
            time.sleep(0.05)


def stop_workers_at_exit() -> None:
    """Registers :func:`stop_workers` to run at interpreter exit (once per process)."""
    global _registered
    if not _registered:
        atexit.register(stop_workers)
        _registered = True


@contextlib.contextmanager
def tracing_without_determinism() -> Iterator[None]:
    """Disables TF op determinism inside the block (restored after), for tracing unseeded ops.

    The computation then runs in TFF's worker process, which never had determinism enabled, so
    this changes what TF accepts at trace time, not what the computation does.
    """
    enabled = tf_config.is_op_determinism_enabled()
    if enabled:
        tf_config.disable_op_determinism()
    try:
        yield
    finally:
        if enabled:
            tf_config.enable_op_determinism()
