"""Test-only fault injection: a coordinator that kills itself at a chosen point of a round.

``FEDWARDEN_FAULT=<point>:<round>`` in the environment of ``fedwarden serve`` sends SIGKILL to
the process when it reaches ``point`` of round ``round``, as a crash or a power cut would stop
it there. Tests use it to show that a restart with the same state dir loses no round and
repeats none (tests/test_faults.py). Points, in the order a round reaches them:

- ``collect``: the task is published, agents are training and uploading;
- ``aggregate``: the updates are in, nothing is aggregated yet;
- ``ledger``: the round is aggregated and the trust ledger written, the checkpoint not yet;
- ``checkpoint``: halfway through writing the checkpoint file (its temporary file is on disk);
- ``results``: the checkpoint is written, results.json not yet.

Unset (always, outside tests) it costs one environment lookup per point.
"""

from __future__ import annotations

import os
import signal

POINTS = ("collect", "aggregate", "ledger", "checkpoint", "results")
ENV = "FEDWARDEN_FAULT"


def point(name: str, round: int) -> None:
    """Dies here (SIGKILL, no cleanup) when ``FEDWARDEN_FAULT`` names this point and round."""
    if os.environ.get(ENV) == f"{name}:{round}":
        os.kill(os.getpid(), signal.SIGKILL)
