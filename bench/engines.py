"""Benchmark: the quick digits variant of ``bench/simulation.py`` (native vs TFF engine).

Usage::

    python bench/engines.py --rounds 12 --repeat 2 --json runs/bench-engines.json

The workload is the TFF acceptance scenario: digits, 10 clients all sampled each round, 20%
gaussian attackers, median, 2 local epochs of batch 16, learning rate 0.2, seed 0. Everything
else (one subprocess per run, alternating engines, what is measured and written) is
``bench/simulation.py``'s, and so are the options: any of them overrides these defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulation import WORKLOAD, main  # noqa: E402

DIGITS = {
    **WORKLOAD,
    "dataset": "digits",
    "clients": 10,
    "clients_per_round": 10,
    "rounds": 12,
    "attack": "gaussian",
}

if __name__ == "__main__":
    sys.exit(main(defaults=DIGITS))
