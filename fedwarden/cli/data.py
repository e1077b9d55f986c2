"""``fedwarden data split``: one .npz per client from a built-in dataset, for demos and tests.

Writes ``OUT/c00.npz, c01.npz, ...`` (arrays ``x``, ``y``: a partition of the training split),
``OUT/test.npz`` (the held-out split, which no client holds) and ``OUT/split.json`` (what was done).
The held-out split depends on the dataset and ``--seed``: give ``fedwarden serve`` the same
``--dataset`` and ``--seed`` (or ``--eval-data OUT/test.npz``) so it evaluates on data no agent
trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedwarden.config import DATASETS, PARTITIONS, DataConfig, TrainingConfig


def client_ids(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"c{i:0{width}d}" for i in range(n)]


def split_dataset(
    dataset: str,
    clients: int,
    out: Path,
    *,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    data_dir: str | None = None,
) -> dict[str, int]:
    """Writes the split; returns the number of examples per client id."""
    import numpy as np

    from fedwarden.data.datasets import load_dataset
    from fedwarden.data.partition import partition as make_partition

    # The same checks, and messages, as the settings of a simulation.
    DataConfig(
        dataset=dataset, data_dir=data_dir, clients=clients, partition=partition, alpha=alpha,
        shards_per_client=shards_per_client,
    )  # fmt: skip
    TrainingConfig(seed=seed)
    ds = load_dataset(dataset, data_dir, seed)
    rng = np.random.default_rng([seed, 1])
    parts = make_partition(
        ds.y_train, clients, partition, rng, alpha=alpha, shards_per_client=shards_per_client
    )
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for cid, idx in zip(client_ids(clients), parts, strict=True):
        np.savez(out / f"{cid}.npz", x=ds.x_train[idx], y=ds.y_train[idx])
        sizes[cid] = int(len(idx))
    np.savez(out / "test.npz", x=ds.x_test, y=ds.y_test, num_classes=np.int64(ds.num_classes))
    manifest = {
        "dataset": dataset,
        "clients": clients,
        "partition": partition,
        "alpha": alpha,
        "shards_per_client": shards_per_client,
        "seed": seed,
        "input_shape": list(ds.input_shape),
        "num_classes": ds.num_classes,
        "test_examples": int(len(ds.y_test)),
        "examples": sizes,
    }
    (out / "split.json").write_text(json.dumps(manifest, indent=2))
    return sizes


def cmd_split(args: argparse.Namespace) -> int:
    out = Path(args.out)
    sizes = split_dataset(
        args.dataset,
        args.clients,
        out,
        partition=args.partition,
        alpha=args.alpha,
        shards_per_client=args.shards_per_client,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    print(
        f"wrote {len(sizes)} client files to {out}/ ({min(sizes.values())} to "
        f"{max(sizes.values())} examples each), test.npz and split.json"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="prepare local data files for agents",
        description="Data files for agents (fedwarden agent --data FILE.npz).",
    )
    sub = p.add_subparsers(dest="data_command", required=True)
    s = sub.add_parser(
        "split",
        help="split a dataset into one .npz per client",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    s.add_argument(
        "--dataset", required=True, help=f"{', '.join(DATASETS)}, or a .npz file with arrays x, y"
    )
    s.add_argument("--clients", type=int, required=True, help="number of client files to write")
    s.add_argument(
        "--partition", default="iid", choices=PARTITIONS, help="how to split (default: iid)"
    )
    s.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration for --partition dirichlet; smaller is more skewed "
        "(default: 0.5)",
    )
    s.add_argument(
        "--shards-per-client",
        type=int,
        default=2,
        help="label shards per client for --partition shards (default: 2)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the held-out split and the partition; give serve the same (default: 0)",
    )
    s.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(func=cmd_split)
