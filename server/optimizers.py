"""Server optimizers: apply the round's aggregate update to the global weights (flat vectors).

The aggregate is a pseudo-gradient pointing downhill (mean of local minus global weights), so every
optimizer moves the weights along it. State is a dict of numpy arrays, checkpointed with the model.

References: McMahan et al. 2017 (FedAvg); Hsu et al. 2019 (FedAvgM); Reddi et al. 2021, "Adaptive
Federated Optimization" (FedAdam).
"""

from __future__ import annotations

import numpy as np

from fedwarden.errors import UsageError


class ServerOptimizer:
    def __init__(
        self,
        name: str = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ):
        if name not in ("fedavg", "fedavgm", "fedadam"):
            raise UsageError(
                f"unknown server optimizer {name!r}. Accepted values: fedavg, fedavgm, fedadam"
            )
        self.name, self.lr, self.momentum = name, lr, momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def __repr__(self) -> str:
        return (
            f"ServerOptimizer(name={self.name!r}, lr={self.lr}, momentum={self.momentum}, "
            f"beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"
        )

    def init(self, size: int) -> dict[str, np.ndarray]:
        if self.name == "fedavg":
            return {}
        if self.name == "fedavgm":
            return {"velocity": np.zeros(size, np.float32)}
        return {"m": np.zeros(size, np.float32), "v": np.full(size, self.tau**2, np.float32)}

    def step(
        self, weights: np.ndarray, aggregate: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self.name == "fedavg":
            return weights + self.lr * aggregate, state
        if self.name == "fedavgm":
            velocity = self.momentum * state["velocity"] + aggregate
            return weights + self.lr * velocity, {"velocity": velocity}
        m = self.beta1 * state["m"] + (1 - self.beta1) * aggregate
        v = self.beta2 * state["v"] + (1 - self.beta2) * aggregate**2
        return weights + self.lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}
