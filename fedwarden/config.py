"""Run configuration: defaults, then a TOML file, then command-line flags (each overrides the last).

A TOML file uses the flag names with underscores. Tables flatten into prefixed keys, so
``[trust] decay = 0.8`` is the same as ``trust_decay = 0.8`` and ``--trust-decay 0.8``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedwarden.errors import UsageError

DATASETS = ("digits", "fashion_mnist", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
QUARANTINE_POLICIES = ("none", "exclude", "downweight")
DP_MODES = ("none", "central")
ENGINES = ("native", "tff")


@dataclass
class RunConfig:
    # data and model
    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    # federation
    clients: int = 20
    clients_per_round: int = 20
    rounds: int = 20
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.2
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    # attack
    attack: str = "none"
    attack_params: dict[str, Any] = field(default_factory=dict)
    malicious_fraction: float = 0.2
    attack_start_round: int = 1
    collude: bool = False
    # defence
    aggregator: str = "mean"
    num_byzantine: int | None = None
    trust_decay: float = 0.7
    trust_flag_below: float = 0.55
    trust_unflag_above: float = 0.7
    quarantine: str = "none"
    quarantine_downweight: float = 0.1
    probation_rounds: int = 3
    anomaly_weights: dict[str, float] = field(default_factory=dict)
    # differential privacy
    dp: str = "none"
    dp_clip: float = 1.0
    dp_noise_multiplier: float | None = None
    dp_adaptive_clip: bool = False
    dp_target_quantile: float = 0.5
    dp_delta: float | None = None
    target_epsilon: float | None = None
    dp_accountant: str = "rdp"
    dp_sgd: bool = False
    dp_l2_clip: float = 1.0
    dp_microbatches: int | None = None
    # run
    engine: str = "native"
    seed: int = 0
    out: str = "runs/latest"
    metrics_port: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_malicious(self) -> int:
        return 0 if self.attack == "none" else int(round(self.malicious_fraction * self.clients))

    @property
    def byzantine_budget(self) -> int:
        """f assumed by Krum-type rules: the configured value, else the expected attackers per round."""
        if self.num_byzantine is not None:
            return self.num_byzantine
        expected = self.malicious_fraction * self.clients_per_round
        return (
            int(round(expected))
            if self.attack != "none"
            else max(1, int(0.2 * self.clients_per_round))
        )


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict) and name not in ("attack_params", "anomaly_weights"):
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    values = _flatten(table)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(
            f"config file {path}: unknown keys {', '.join(unknown)}. "
            f"Accepted keys: {', '.join(sorted(FIELDS))}"
        )
    return values


def make_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """Merges file values and flags (flags win; None means 'not given') and validates the result."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    config = RunConfig(**merged)
    validate(config)
    return config


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise UsageError(f"unknown {name} {value!r}. Accepted values: {', '.join(accepted)}")


def validate(c: RunConfig) -> None:
    """Checks what can be checked without loading data; the messages name the value and the fix."""
    if c.dataset not in DATASETS and not c.dataset.endswith(".npz"):
        raise UsageError(
            f"unknown dataset {c.dataset!r}. Accepted values: "
            f"{', '.join(DATASETS)}, or a path to a .npz file with arrays x and y"
        )
    _choice("partition", c.partition, PARTITIONS)
    _choice("server optimizer", c.server_optimizer, SERVER_OPTIMIZERS)
    _choice("quarantine policy", c.quarantine, QUARANTINE_POLICIES)
    _choice("dp mode", c.dp, DP_MODES)
    _choice("engine", c.engine, ENGINES)
    for name in ("clients", "clients_per_round", "rounds", "local_epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive integer. "
                f"Received: {getattr(c, name)}"
            )
    if c.clients_per_round > c.clients:
        raise UsageError(
            f"--clients-per-round ({c.clients_per_round}) cannot exceed --clients "
            f"({c.clients}); lower --clients-per-round or add clients."
        )
    if not 0.0 <= c.malicious_fraction < 1.0:
        raise UsageError(
            f"--malicious-fraction must be in [0, 1). Received: {c.malicious_fraction}"
        )
    if c.attack != "none" and c.num_malicious == 0:
        raise UsageError(
            f"--malicious-fraction {c.malicious_fraction} of {c.clients} clients is no "
            "attacker at all; raise the fraction or use --attack none."
        )
    if c.alpha <= 0:
        raise UsageError(f"--alpha must be positive. Received: {c.alpha}")
    if c.lr <= 0 or c.server_lr <= 0:
        raise UsageError(
            f"learning rates must be positive. Received: lr={c.lr}, server_lr={c.server_lr}"
        )
