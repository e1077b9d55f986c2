"""Splitting a training set among clients: iid, Dirichlet label skew, and label shards.

Each function returns one array of example indices per client. Client sizes may be uneven
(Dirichlet and shards produce that naturally); every client gets at least ``min_size`` examples.
"""

from __future__ import annotations

import numpy as np

from fedwarden.errors import UsageError


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 2,
) -> list[np.ndarray]:
    if len(labels) < num_clients * min_size:
        raise UsageError(
            f"{len(labels)} training examples are too few for {num_clients} clients "
            f"(each needs at least {min_size}); use fewer clients."
        )
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng, min_size)
    if scheme == "shards":
        return shards(labels, num_clients, shards_per_client, rng)
    raise UsageError(f"unknown partition {scheme!r}. Accepted values: iid, dirichlet, shards")


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Per class, client shares drawn from Dirichlet(alpha); small alpha means strong label skew.

    References: Hsu et al. 2019, "Measuring the effects of non-identical data distribution".
    """
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise UsageError(
        f"Dirichlet partition with alpha={alpha} left a client with fewer than {min_size} "
        f"examples in {max_tries} tries; raise --alpha or use fewer clients."
    )


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sort by label, cut into equal shards, deal ``shards_per_client`` to each client.

    References: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks".
    """
    if shards_per_client < 1:
        raise UsageError(f"--shards-per-client must be positive. Received: {shards_per_client}")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    dealt = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]
