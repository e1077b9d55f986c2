"""Benchmark: a 10,000-client Fashion-MNIST federation, 100 clients per round, on this machine.

Usage::

    python bench/clients.py --json runs/bench-clients.json

The workload of ``fedwarden simulate --dataset fashion_mnist --clients 10000
--clients-per-round 100``: 10,000 iid clients of 6 training examples each, 100 sampled per
round, 2 local epochs of batch 16, learning rate 0.2, mean, no attack, 5 rounds, seed 0, native
engine, one run. A client's data is an index array into the one training array the run loads
(``fedwarden.simulations.runner.Federation.parts``); the selected clients' examples are gathered
when they train, and one model (with a copy per core) trains every client. Before the run this
prints what the client data costs: the index arrays of all clients against the shared training
images. The run itself is ``bench/simulation.py``'s (a subprocess; peak resident memory of its
process tree sampled every 50 ms, ``python_maxrss_mb`` from ``getrusage``, round times,
updates/s); its options override these defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation import WORKLOAD, main, parse_args  # noqa: E402

TEN_THOUSAND = {
    **WORKLOAD,
    "dataset": "fashion_mnist",
    "clients": 10_000,
    "clients_per_round": 100,
    "rounds": 5,
    "aggregator": "mean",
}


def client_data_footprint(workload: dict) -> None:
    """Prints the bytes of all clients' index arrays against the one shared training array."""
    from fedwarden.config import make_config
    from fedwarden.simulations.runner import make_federation

    fed = make_federation(make_config({}, {**workload, "progress": False}))
    index_mb = sum(part.nbytes for part in fed.parts.values()) / 2**20
    shared_mb = (fed.dataset.x_train.nbytes + fed.dataset.y_train.nbytes) / 2**20
    sizes = [len(part) for part in fed.parts.values()]
    print(
        f"{len(fed.parts)} clients ({min(sizes)}-{max(sizes)} examples each): index arrays "
        f"{index_mb:.2f} MB in all, into one shared training set of {shared_mb:.0f} MB",
        flush=True,
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--worker" not in argv:
        if "--engines" not in argv:
            argv += ["--engines", "native"]
        if "--repeat" not in argv:
            argv += ["--repeat", "1"]
        args = parse_args(argv, TEN_THOUSAND)
        client_data_footprint({key: getattr(args, key) for key in WORKLOAD})
    sys.exit(main(argv, defaults=TEN_THOUSAND))
