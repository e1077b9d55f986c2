"""The run configuration: one typed, nested object, each section validated when it is built.

Sections (frozen dataclasses; their defaults are the only defaults):

* ``data``: dataset, partition and the number of clients;
* ``model``: the Keras model;
* ``training``: rounds, cohort, local and server optimisation, engine, seed;
* ``attack``: the simulated attack and who runs it;
* ``defence``: the aggregation chain;
* ``trust``: trust scores, flags and quarantine;
* ``central_dp``: DP-FedAvg on the server (``--dp central``);
* ``dp_sgd``: DP-SGD on the clients (``--dp-sgd``);
* ``output``: where results go and how progress shows;
* ``deployment``: ``fedwarden serve``'s own options (listening, security, cohort timing); only
  serve sets it, by its flags or a ``[deployment]`` table (``deployment_from``).

Three ways in, each mapped onto the sections once:

* Python: ``RunConfig(rounds=5, attack="alie")`` (the flat names, as below) or
  ``Config(training=TrainingConfig(rounds=5))``; ``RunConfig.sections`` is the nested ``Config``;
* TOML: tables named like the sections (``[training] rounds = 5``, ``[trust] decay = 0.8``) or
  the flat names at the top level (``rounds = 5``, ``trust_decay = 0.8``);
* flags: the flat names with dashes (``--rounds 5``, ``--trust-decay 0.8``).

The flat name of a field is its section field name unless the field says otherwise
(``trust.decay`` is ``trust_decay``, ``central_dp.noise_multiplier`` is ``dp_noise_multiplier``,
``dp_sgd.noise_multiplier`` is ``dp_sgd_noise_multiplier``). Every check here is plain Python:
a bad setting is refused in milliseconds, before TensorFlow is imported. Checks that need the
aggregation rules or the attacks (a chain's cohort size, an attack's parameters) are in
``fedwarden.simulations.preflight``.

Example::

    config = RunConfig(clients=10, attack="gaussian", aggregator="median")
    config.sections.training.clients_per_round  # 10: every client, unless given
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedwarden.errors import UsageError

DATASETS = ("digits", "fashion_mnist", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
FLAG_RULES = ("evidence", "threshold")
QUARANTINE_POLICIES = ("none", "exclude", "downweight")
DP_MODES = ("none", "central")
DP_ACCOUNTANTS = ("rdp", "pld")
ENGINES = ("native", "tff")
COMPRESSIONS = ("none", "gzip")


def count_or_fraction(text: str) -> int | float:
    """A count (``3``) or a fraction (``0.2``), as ``--num-byzantine`` takes."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def option(
    default: Any,
    help: str,
    *,
    kind: type | None = None,
    flat: str | None = None,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    metavar: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A configuration field: its default, help, type and range, declared once.

    Args:
      default: the default value (None: not set).
      help: one line for ``--help``.
      kind: ``int``, ``float``, ``str``, ``bool``, ``dict`` or ``list`` (of strings, a repeatable
        flag); default: the type of ``default``.
      flat: the flat name (TOML top level, keyword of ``RunConfig``, flag with dashes), if it is
        not the field's own name.
      choices: the accepted strings.
      low, high: the accepted range; ``low_open``/``high_open`` exclude the bound itself.
      metavar: the placeholder in ``--help``.
      default_text: what ``--help`` says the default is, when it is not ``default`` itself.
    """
    kind = kind or type(default)
    metadata = dict(
        help=help, kind=kind, flat=flat, choices=choices, low=low, high=high,
        low_open=low_open, high_open=high_open, metavar=metavar,
        default_text=default_text,
    )  # fmt: skip
    if kind in (dict, list):
        return field(default_factory=lambda: kind(default or ()), metadata=metadata)
    return field(default=default, metadata=metadata)


def flat_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flat") or f.name


def flag_name(f: dataclasses.Field) -> str:
    return "--" + flat_name(f).replace("_", "-")


def _describe_range(m: dict[str, Any]) -> str:
    low, high = m["low"], m["high"]
    if low is not None and high is not None:
        return (
            f"in {'(' if m['low_open'] else '['}{low:g}, {high:g}{')' if m['high_open'] else ']'}"
        )
    if low is not None:
        return f"{'>' if m['low_open'] else '>='} {low:g}"
    return f"{'<' if m['high_open'] else '<='} {high:g}"


_KIND_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    count_or_fraction: "a number",
    list: "a list of strings",
}


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """Checks one field's value against its declared type, choices and range; returns it
    (an int where a float is expected becomes a float)."""
    m, name = f.metadata, flag_name(f)
    if value is None:
        if f.default is None:
            return None
        raise UsageError(f"{name} needs a value. Received: None")
    kind = m["kind"]
    if kind is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{flat_name(f)} must be a table of key = value. Received: {value!r}")
        return dict(value)
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{name} must be a list of strings. Received: {value!r}")
        return list(value)
    accepted = (int, float) if kind in (float, count_or_fraction) else kind
    wrong = isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted)
    if wrong:
        raise UsageError(
            f"{name} must be {_KIND_WORDS[kind]}. Received: {value!r} ({type(value).__name__})"
        )
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number. Received: {value}")
    if m["choices"] and value not in m["choices"]:
        raise UsageError(f"{name} must be one of {', '.join(m['choices'])}. Received: {value!r}")
    low, high = m["low"], m["high"]
    if (
        (low is not None and (value <= low if m["low_open"] else value < low))
        or (high is not None and (value >= high if m["high_open"] else value > high))
    ):  # fmt: skip
        raise UsageError(f"{name} must be {_describe_range(m)}. Received: {value!r}")
    return value


class Section:
    """A group of settings checked when built: each field, then ``check()`` across fields."""

    title: ClassVar[str]
    key: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field of the section."""


@dataclass(frozen=True)
class DataConfig(Section):
    title: ClassVar[str] = "data"
    key: ClassVar[str] = "data"

    dataset: str = option(
        "digits",
        f"{', '.join(DATASETS)}, or FILE.npz with arrays x and y",
        metavar="NAME",
    )
    data_dir: str | None = option(
        None, "directory of the Fashion-MNIST IDX files", default_text="/usr/share/datasets/fashion-mnist",
        kind=str, metavar="DIR",
    )  # fmt: skip
    clients: int = option(20, "number of clients", low=1, metavar="N")
    partition: str = option("iid", "how the data is split among clients", choices=PARTITIONS)
    alpha: float = option(
        0.5, "Dirichlet concentration of --partition dirichlet; smaller is more skewed",
        low=0, low_open=True,
    )  # fmt: skip
    shards_per_client: int = option(2, "label shards per client of --partition shards", low=1)

    def check(self) -> None:
        if self.dataset not in DATASETS and not self.dataset.endswith(".npz"):
            raise UsageError(
                f"--dataset must be one of {', '.join(DATASETS)}, or a path to a .npz file with "
                f"arrays x and y. Received: {self.dataset!r}"
            )


@dataclass(frozen=True)
class ModelConfig(Section):
    title: ClassVar[str] = "model"
    key: ClassVar[str] = "model"

    name: str | None = option(
        None,
        "your model: package.module:function(input_shape, num_classes) -> keras.Model",
        kind=str,
        flat="model",
        metavar="MODULE:FUNCTION",
        default_text="the dataset's own",
    )  # fmt: skip

    def check(self) -> None:
        if self.name is not None and ":" not in self.name:
            raise UsageError(f"--model must be package.module:function. Received: {self.name!r}")


@dataclass(frozen=True)
class TrainingConfig(Section):
    title: ClassVar[str] = "training"
    key: ClassVar[str] = "training"

    rounds: int = option(20, "federated rounds", low=1, metavar="N")
    clients_per_round: int | None = option(
        None,
        "clients sampled each round",
        default_text="every client",
        kind=int,
        low=1,
        metavar="K",
    )
    local_epochs: int = option(2, "local epochs per round", low=1, metavar="N")
    batch_size: int = option(16, "local batch size", low=1, metavar="B")
    lr: float = option(0.2, "client learning rate (SGD)", low=0, low_open=True)
    server_optimizer: str = option("fedavg", "server optimizer", choices=SERVER_OPTIMIZERS)
    server_lr: float = option(1.0, "server learning rate", low=0, low_open=True)
    server_momentum: float = option(
        0.9, "momentum of --server-optimizer fedavgm", low=0, high=1, high_open=True
    )
    engine: str = option("native", "client training engine", choices=ENGINES)
    seed: int = option(0, "random seed; same seed, same results", low=0)
    eval_subset: int | None = option(
        None,
        "test examples evaluated between rounds (a fixed seeded subset); the last round uses all",
        default_text="the whole test split every round",
        kind=int,
        low=1,
        metavar="N",
    )
    average_last_rounds: int = option(
        1,
        "the run hands back the mean of the global models of its last N rounds, and its last "
        "round is evaluated on that model (the last model's figures stay in the round's "
        "last_model); 1: the last round's model",
        low=1,
        metavar="N",
    )


@dataclass(frozen=True)
class AttackConfig(Section):
    title: ClassVar[str] = "attack"
    key: ClassVar[str] = "attack"

    name: str = option(
        "none", "attack name (see `fedwarden attacks`), or package.module:callable",
        flat="attack", metavar="NAME",
    )  # fmt: skip
    params: dict = option(
        {}, "attack parameters", kind=dict, flat="attack_params", metavar="KEY=VALUE"
    )
    malicious_fraction: float = option(
        0.2, "fraction of clients that are malicious", low=0, high=1, high_open=True
    )
    start_round: int = option(
        1, "first round in which attackers attack", low=1, flat="attack_start_round"
    )
    rate: float = option(
        1.0, "share of an attacker's rounds in which it attacks: below 1 an on-off attacker, "
        "honest in the others (a coin per client and round, seeded by the run)",
        low=0, high=1, low_open=True, flat="attack_rate", metavar="X",
    )  # fmt: skip
    collude: bool = option(False, "attackers share one crafted update")
    claim_examples: int | None = option(
        None, "attackers report this many training examples whatever they hold (a client's "
        "word: it sets their weight and the local steps their updates are judged against)",
        kind=int, low=1, flat="attack_claim_examples", metavar="N",
    )  # fmt: skip

    def check(self) -> None:
        if self.claim_examples is not None and self.name == "none":
            raise UsageError(
                "--attack-claim-examples has no effect without --attack. Received: "
                f"{self.claim_examples}"
            )
        if self.params and self.name == "none":
            raise UsageError(
                f"--attack-param has no effect without --attack. Received: {self.params}"
            )


@dataclass(frozen=True)
class DefenceConfig(Section):
    title: ClassVar[str] = "defence"
    key: ClassVar[str] = "defence"

    aggregator: str = option(
        "mean",
        "aggregation chain: mean, median, trimmed_mean:trim_fraction=0.2, "
        "clip:max_norm=5+median, krum, ..., or package.module:callable",
        metavar="CHAIN",
    )
    num_byzantine: int | float | None = option(
        None,
        "f assumed by krum, multi_krum, bulyan, nnm, trimmed_mean: a count per round, or the "
        "assumed malicious fraction of the federation in (0, 1), turned into the 0.99 quantile of "
        "attackers a sampled cohort holds",
        kind=count_or_fraction,
        low=0,
        metavar="F",
        default_text="the attackers a sampled cohort holds at --malicious-fraction",
    )
    max_update_norm: float | None = option(
        None, "admission refuses an update whose L2 norm exceeds this (a bound no honest client "
        "reaches; none by default)", kind=float, low=0, low_open=True, metavar="NORM",
    )  # fmt: skip
    max_weight_ratio: float = option(
        4.0, "a client weighs at most this multiple of the cohort's median example count, "
        "whatever count it reports", low=1, metavar="R",
    )  # fmt: skip
    round_memory_budget: float | None = option(
        None, "MB of private memory for a round's update matrix (cohort x parameters x 4 bytes): "
        "a larger one is spilled to a memory-mapped file in the output or state directory and "
        "read in column blocks; the updates go into it as they arrive (chains of clip, mean, "
        "median, trimmed_mean, krum, multi_krum, gaussian_noise; native engine; none: always in "
        "memory)", kind=float, low=0, low_open=True, metavar="MB",
    )  # fmt: skip

    def check(self) -> None:
        if not self.aggregator.strip():
            raise UsageError("--aggregator needs a chain, e.g. median. Received: ''")
        f = self.num_byzantine
        if isinstance(f, float) and not 0 < f < 1:
            raise UsageError(
                f"--num-byzantine must be a count (an integer >= 0) or a fraction in (0, 1). "
                f"Received: {f}"
            )


@dataclass(frozen=True)
class TrustConfig(Section):
    title: ClassVar[str] = "trust"
    key: ClassVar[str] = "trust"

    decay: float = option(
        0.7, "weight of history in the trust score's moving average",
        low=0, high=1, high_open=True, flat="trust_decay",
    )  # fmt: skip
    flag_below: float = option(
        0.55, "flag a client whose trust falls below this",
        low=0, high=1, high_open=True, flat="trust_flag_below",
    )  # fmt: skip
    unflag_above: float = option(
        0.7, "unflag it once its trust rises above this (hysteresis)",
        low=0, high=1, high_open=True, flat="trust_unflag_above",
    )  # fmt: skip
    flag_rule: str = option(
        "evidence", "evidence: flag on a client's anomaly against the population's, weighed by "
        "rounds seen (server/trust.py); threshold: flag below --trust-flag-below",
        choices=FLAG_RULES, flat="trust_flag_rule",
    )  # fmt: skip
    false_positive_rate: float = option(
        0.003, "nominal share of honest clients flagged under --trust-flag-rule evidence",
        low=0, high=0.5, low_open=True, high_open=True, flat="trust_false_positive_rate",
    )  # fmt: skip
    evidence_rounds: int = option(
        3, "rounds of a steady excess that count as independent evidence under --trust-flag-rule "
        "evidence; later rounds add no more (an honest client's data is the same every round)",
        low=1, flat="trust_evidence_rounds",
    )  # fmt: skip
    association_z: float = option(
        2.5, "under --trust-flag-rule evidence, also flag a client whose updates deviate like "
        "those of the clients flagged on their own evidence (or, near the flag line, of others "
        "near it), by this robust z among the clients not flagged (server/trust.py); 0: off",
        low=0, flat="trust_association_z",
    )  # fmt: skip
    quarantine: str | None = option(
        None, "what flagged clients get", kind=str, choices=QUARANTINE_POLICIES,
        default_text="exclude for the auto chain, else none",
    )  # fmt: skip
    quarantine_downweight: float = option(
        0.1, "weight multiplier under --quarantine downweight", low=0, high=1
    )
    probation_rounds: int = option(
        3, "rounds an excluded client waits before it may earn its way back", low=0
    )
    anomaly_weights: dict = option(
        {}, "weights of the anomaly measurements (TOML only; see aggregation/scoring.py)",
        kind=dict,
    )  # fmt: skip
    validation_examples: int = option(
        0, "held-out examples the server measures each update's effect on (the anomaly "
        "score's validation and inert components, server/validation.py); 0: none", low=0,
    )  # fmt: skip

    def check(self) -> None:
        if not self.flag_below < self.unflag_above:
            raise UsageError(
                f"--trust-unflag-above must be above --trust-flag-below (hysteresis). Received: "
                f"flag_below={self.flag_below}, unflag_above={self.unflag_above}; raise "
                "--trust-unflag-above or lower --trust-flag-below"
            )
        for key, weight in self.anomaly_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise UsageError(
                    f"anomaly_weights must map measurement names to numbers >= 0. "
                    f"Received: {key} = {weight!r}"
                )


@dataclass(frozen=True)
class CentralDPConfig(Section):
    title: ClassVar[str] = "central differential privacy (DP-FedAvg)"
    key: ClassVar[str] = "central_dp"

    mode: str = option("none", "server-side differential privacy", choices=DP_MODES, flat="dp")
    clip: float = option(1.0, "L2 clip of each client update", low=0, low_open=True, flat="dp_clip")
    noise_multiplier: float | None = option(
        None, "noise std / clip of the central mechanism", default_text="solved from --target-epsilon",
        kind=float, low=0, flat="dp_noise_multiplier", metavar="Z",
    )  # fmt: skip
    target_epsilon: float | None = option(
        None, "solve the noise multiplier for this epsilon (serve: stop before exceeding it)",
        kind=float, low=0, low_open=True, metavar="EPS",
    )  # fmt: skip
    delta: float | None = option(
        None, "delta of the epsilon reports, central and DP-SGD", default_text="1/n^1.1",
        kind=float, low=0, high=1, low_open=True, high_open=True, flat="dp_delta",
    )  # fmt: skip
    accountant: str = option(
        "rdp", "privacy accountant", choices=DP_ACCOUNTANTS, flat="dp_accountant"
    )
    adaptive_clip: bool = option(
        False, "adapt the clip to --dp-target-quantile (Andrew et al. 2021)",
        flat="dp_adaptive_clip",
    )  # fmt: skip
    target_quantile: float = option(
        0.5, "adaptive clip: target quantile of the update norms",
        low=0, high=1, low_open=True, high_open=True, flat="dp_target_quantile",
    )  # fmt: skip

    def check(self) -> None:
        if self.mode == "none":
            given = [
                flag
                for flag, value in (
                    ("--dp-noise-multiplier", self.noise_multiplier),
                    ("--target-epsilon", self.target_epsilon),
                    ("--dp-adaptive-clip", self.adaptive_clip or None),
                )
                if value is not None
            ]
            if given:
                raise UsageError(
                    f"{', '.join(given)} need --dp central. Received: --dp none; add --dp "
                    "central (DP-SGD's noise on the clients is --dp-sgd-noise-multiplier)"
                )
        elif self.noise_multiplier is None and self.target_epsilon is None:
            raise UsageError(
                "--dp central needs --dp-noise-multiplier Z or --target-epsilon EPS. "
                "Received: neither"
            )


@dataclass(frozen=True)
class DPSGDConfig(Section):
    title: ClassVar[str] = "DP-SGD on the clients"
    key: ClassVar[str] = "dp_sgd"

    enabled: bool = option(
        False, "train every client with DP-SGD (tensorflow-privacy)", flat="dp_sgd"
    )
    l2_clip: float = option(1.0, "per-example L2 clip", low=0, low_open=True, flat="dp_l2_clip")
    noise_multiplier: float | None = option(
        None, "noise std / clip of DP-SGD", kind=float, low=0,
        flat="dp_sgd_noise_multiplier", metavar="Z",
    )  # fmt: skip
    microbatches: int | None = option(
        None, "microbatches per batch; must divide --batch-size", default_text="one per example",
        kind=int, low=1, flat="dp_microbatches", metavar="M",
    )  # fmt: skip

    def check(self) -> None:
        if self.enabled and self.noise_multiplier is None:
            raise UsageError(
                "--dp-sgd needs --dp-sgd-noise-multiplier Z (e.g. 1.1). Received: none"
            )
        if not self.enabled and (self.noise_multiplier is not None or self.microbatches):
            raise UsageError(
                "--dp-sgd-noise-multiplier and --dp-microbatches only apply with --dp-sgd. "
                f"Received: noise_multiplier={self.noise_multiplier}, "
                f"microbatches={self.microbatches}; add --dp-sgd"
            )


@dataclass(frozen=True)
class OutputConfig(Section):
    title: ClassVar[str] = "output"
    key: ClassVar[str] = "output"

    out: str = option("runs/latest", "output directory", metavar="DIR")
    metrics_port: int | None = option(
        None, "serve Prometheus /metrics on this port while running",
        kind=int, low=0, high=65535, metavar="PORT",
    )  # fmt: skip
    progress: bool = option(True, "progress bar")
    tensorboard: str | None = option(
        None, "TensorBoard log directory ('off': none); `tensorboard --logdir DIR` shows it live",
        kind=str, metavar="DIR", default_text="OUT/tensorboard",
    )  # fmt: skip


@dataclass(frozen=True)
class DeploymentConfig(Section):
    """``fedwarden serve``'s own options: listening, security, cohort timing, hostile clients.

    Set by ``fedwarden serve`` only (flags of its deployment group, or a ``[deployment]``
    table); not part of the flat ``RunConfig``, nor of the settings a run's results record.
    The web config of ``--metrics-web-config`` is parsed by the server layer, when serving.
    """

    title: ClassVar[str] = "deployment (fedwarden serve)"
    key: ClassVar[str] = "deployment"

    eval_data: str | None = option(
        None, "held-out data (arrays x, y; optional num_classes) to evaluate on", kind=str,
        metavar="FILE.npz", default_text="the test split of --dataset",
    )  # fmt: skip
    min_clients: int = option(
        2, "agents that must be connected before a round starts, and updates needed to close "
        "a round at its timeout", low=1, metavar="N",
    )  # fmt: skip
    round_timeout: float = option(
        120.0, "seconds to wait for the selected agents; with fewer than --min-clients updates "
        "by then the round is re-run with a new selection", low=0, low_open=True, metavar="S",
    )  # fmt: skip
    host: str = option(
        "127.0.0.1", "address to listen on; 0.0.0.0 for every interface", metavar="HOST"
    )
    port: int = option(50051, "gRPC port; 0: any free port", low=0, high=65535, metavar="PORT")
    metrics_host: str = option(
        "127.0.0.1", "address of /metrics; 0.0.0.0 to let Prometheus scrape it", metavar="HOST"
    )
    state_dir: str | None = option(
        None, "checkpoints, ledger.sqlite and results.json; reuse it to resume. While a file "
        "PAUSE exists there no new round starts (holding a number N: from round N on)",
        kind=str, metavar="DIR",
    )  # fmt: skip
    tokens: str | None = option(
        None, 'per-client tokens: lines of client_id = "token"; an [operators] table names who '
        "may read trust (fedwarden trust list --server)", kind=str, metavar="FILE.toml",
    )  # fmt: skip
    tls_cert: str | None = option(None, "server certificate (PEM)", kind=str, metavar="FILE")
    tls_key: str | None = option(None, "server private key (PEM)", kind=str, metavar="FILE")
    tls_client_ca: str | None = option(
        None, "CA (PEM) that signs client certificates: turns on mutual TLS, and the "
        "certificate's common name is the client id", kind=str, metavar="FILE",
    )  # fmt: skip
    operator: list = option(
        [], "certificate common name allowed to read trust (repeatable)", kind=list, metavar="CN"
    )
    insecure: bool = option(
        False, "plaintext gRPC; without --tokens, agent identities are not checked. Only on a "
        "trusted network",
    )  # fmt: skip
    compression: str = option("none", "compress what the coordinator sends", choices=COMPRESSIONS)
    max_agents: int = option(64, "agents served at once; sizes the thread pool", low=1, metavar="N")
    allow_clients: str | None = option(
        None, "allow-list of training identities: lines of client_id, optionally followed by "
        "sha256:<certificate fingerprint>; re-read when it changes (delete a line to revoke). "
        "Required for mutual TLS without --tokens", kind=str, metavar="FILE",
    )  # fmt: skip
    allow_open_network: bool = option(
        False, "let an open coordinator (--insecure without --tokens: anyone can claim any id) "
        "listen on a non-loopback --host",
    )  # fmt: skip
    stall_timeout: float = option(
        10.0, "a call waiting on its agent with no byte moving for this long is cancelled",
        low=0, low_open=True, metavar="S",
    )  # fmt: skip
    min_transfer_rate: float = option(
        65536.0, "uploads and task downloads must average this rate, after --stall-timeout of "
        "grace", low=0, low_open=True, metavar="BYTES/S",
    )  # fmt: skip
    max_inflight_upload_mb: float | None = option(
        None, "MB the uploads in progress may hold together (each reserves its declared size "
        "when its header arrives); one that would pass it is refused at once, unread, with "
        "RESOURCE_EXHAUSTED and its agent retries with backoff. At least one update as float64",
        kind=float, low=0, low_open=True, metavar="MB",
        default_text="--round-memory-budget if set (at least one update as float64), else "
        "every selected agent's update as float64 and at least 64",
    )  # fmt: skip
    idle_timeout: float = option(
        300.0, "connections with no call for this long are closed", low=0, low_open=True,
        metavar="S",
    )  # fmt: skip
    overselect: float = option(
        1.3, "select F times --clients-per-round agents; a round closes once "
        "--clients-per-round of them answered", low=1, metavar="F",
    )  # fmt: skip
    max_attempts: int = option(
        5, "attempts at one round before the coordinator stops (exit 2, checkpoint kept)",
        low=1, metavar="N",
    )  # fmt: skip
    max_silences: int = option(
        3, "an agent selected and silent N attempts in a row is benched", low=1, metavar="N"
    )
    bench_rounds: int = option(5, "rounds a benched agent is not selected for", low=0, metavar="N")
    metrics_web_config: str | None = option(
        None, "TLS and basic auth for /metrics, in the Prometheus exporter-toolkit web config "
        "format (tls_server_config, basic_auth_users with bcrypt hashes)", kind=str,
        metavar="FILE.yml",
    )  # fmt: skip

    def check(self) -> None:
        """Refuses a missing state dir, insecure or contradictory settings and missing files,
        each with a message that says what to pass."""
        if self.state_dir is None:
            raise UsageError("fedwarden serve needs --state-dir DIR. Received: none")
        tls_files = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.insecure and any(tls_files):
            raise UsageError("--insecure (plaintext) cannot be combined with --tls-* options")
        if not self.insecure:
            if not (self.tls_cert and self.tls_key):
                raise UsageError(
                    "TLS needs --tls-cert and --tls-key (PEM files; see docs/deploy.md "
                    "to make them), or --insecure for plaintext on a trusted network"
                )
            if not (self.tokens or self.tls_client_ca):
                raise UsageError(
                    "no client authentication: pass --tokens FILE.toml and/or "
                    "--tls-client-ca FILE so each agent's identity comes from its "
                    "credentials (or --insecure for an open demo)"
                )
            if self.tls_client_ca and not (self.tokens or self.allow_clients):
                raise UsageError(
                    "mutual TLS needs --allow-clients FILE (client ids, optionally with "
                    "certificate fingerprints) or --tokens: otherwise every certificate the "
                    "CA ever signed is a training identity"
                )
        if self.insecure and not self.tokens and not is_loopback(self.host):
            if not self.allow_open_network:
                raise UsageError(
                    f"an open coordinator (--insecure without --tokens) listens on loopback "
                    f"only. Received: --host {self.host}; use --tokens, or "
                    "--allow-open-network if anyone who can reach it may train"
                )
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens", "eval_data",
                     "allow_clients", "metrics_web_config"):  # fmt: skip
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise UsageError(f"--{name.replace('_', '-')} file not found: {path}")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def deployment_from(file_path: str | None, flag_values: dict[str, Any]) -> DeploymentConfig:
    """The deployment section: the ``[deployment]`` table of ``file_path`` (keys by their flag
    names with underscores, ``--state-dir`` excepted), then the flags that were given (not None)."""
    fields = {f.name: f for f in dataclasses.fields(DeploymentConfig)}
    values: dict[str, Any] = {}
    if file_path:
        for raw_key, value in read_toml(file_path).get("deployment", {}).items():
            key = raw_key.replace("-", "_")
            where = f"config file {file_path}: [deployment] {raw_key}"
            if key not in fields or key == "state_dir":
                accepted = ", ".join(sorted(set(fields) - {"state_dir"}))
                raise UsageError(
                    f"{where} is not an option of fedwarden serve's deployment group "
                    f"(--state-dir is a flag only). Accepted: {accepted}"
                )
            try:
                values[key] = check_value(fields[key], value)
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
    values.update({k: v for k, v in flag_values.items() if k in fields and v is not None})
    return DeploymentConfig(**values)


SECTIONS: tuple[type[Section], ...] = (
    DataConfig,
    ModelConfig,
    TrainingConfig,
    AttackConfig,
    DefenceConfig,
    TrustConfig,
    CentralDPConfig,
    DPSGDConfig,
    OutputConfig,
)


def _fields() -> Iterator[tuple[type[Section], dataclasses.Field]]:
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            yield section, f


FLAT: dict[str, tuple[type[Section], dataclasses.Field]] = {
    flat_name(f): (section, f) for section, f in _fields()
}
"""Every flat name -> (its section, its field)."""


@dataclass(frozen=True)
class Config:
    """The nested configuration; checks across sections when built.

    Attributes are the sections; ``flat()`` gives the ``RunConfig`` view.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    dp_sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    deployment: DeploymentConfig | None = None
    """``fedwarden serve``'s section; None for simulations. Not in ``flat()`` nor ``to_dict()``."""

    def __post_init__(self) -> None:
        d, t, a, s = self.data, self.training, self.attack, self.dp_sgd
        if t.clients_per_round is None:
            object.__setattr__(
                self, "training", dataclasses.replace(t, clients_per_round=d.clients)
            )
        elif t.clients_per_round > d.clients:
            raise UsageError(
                f"--clients-per-round ({t.clients_per_round}) cannot exceed --clients "
                f"({d.clients}); lower --clients-per-round or add clients"
            )
        if self.trust.quarantine is None:
            # auto is the defence for federations nobody vouches for: at 40% malicious its chain
            # alone fell inside the published anchors in two runs of nine (ALIE, Fang's trim and
            # the AGR-tailored attack), and with flagged clients excluded all nine ended above
            # them, at no cost without attack (docs/history/aggregation.md, "Quarantine at
            # 40%"). A chain named by hand runs as named.
            policy = "exclude" if self.defence.aggregator.strip() == "auto" else "none"
            object.__setattr__(self, "trust", dataclasses.replace(self.trust, quarantine=policy))
        if a.name != "none" and num_malicious(a, d.clients) == 0:
            raise UsageError(
                f"--malicious-fraction {a.malicious_fraction} of {d.clients} clients is no "
                "attacker at all; raise the fraction or use --attack none"
            )
        if t.average_last_rounds > t.rounds:
            raise UsageError(
                f"--average-last-rounds ({t.average_last_rounds}) is more than --rounds "
                f"({t.rounds}); lower it or raise --rounds"
            )
        if a.name != "none" and a.start_round > t.rounds:
            raise UsageError(
                f"--attack-start-round ({a.start_round}) is after the last round "
                f"({t.rounds}); lower it or raise --rounds"
            )
        if s.enabled and s.microbatches and t.batch_size % s.microbatches:
            raise UsageError(
                f"--dp-microbatches must divide --batch-size. Received: "
                f"microbatches={s.microbatches}, batch_size={t.batch_size}"
            )

    def flat(self) -> Any:
        """The ``RunConfig`` view."""
        return RunConfig(**self.to_flat_dict())

    def to_flat_dict(self) -> dict[str, Any]:
        return {
            flat_name(f): getattr(getattr(self, section.key), f.name) for section, f in _fields()
        }

    def to_dict(self) -> dict[str, Any]:
        """The nested form, as in a TOML file (and ``results.json``'s ``settings``)."""
        return {s.key: dataclasses.asdict(getattr(self, s.key)) for s in SECTIONS}


def num_malicious(attack: AttackConfig, clients: int) -> int:
    return 0 if attack.name == "none" else int(round(attack.malicious_fraction * clients))


def build_config(values: dict[str, Any]) -> Config:
    """The nested ``Config`` from flat names (``{"rounds": 5, "trust_decay": 0.8}``)."""
    unknown = sorted(set(values) - set(FLAT))
    if unknown:
        raise UsageError(
            f"unknown settings {', '.join(unknown)}. Accepted: {', '.join(sorted(FLAT))}"
        )
    per_section: dict[str, dict[str, Any]] = {s.key: {} for s in SECTIONS}
    for name, value in values.items():
        section, f = FLAT[name]
        per_section[section.key][f.name] = value
    return Config(**{s.key: s(**per_section[s.key]) for s in SECTIONS})


def _flat_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    fields = []
    for name, (_, f) in FLAT.items():
        default = (
            dataclasses.field(default_factory=f.default_factory)
            if f.default is dataclasses.MISSING
            else dataclasses.field(default=f.default)
        )
        fields.append((name, Any, default))
    fields.append(("sections", Config, dataclasses.field(init=False, repr=False, compare=False)))
    return fields


class _FlatView:
    """Methods of ``RunConfig``, the flat view of a ``Config``."""

    def __post_init__(self) -> None:
        sections = build_config({name: getattr(self, name) for name in FLAT})
        object.__setattr__(self, "sections", sections)
        for name, value in sections.to_flat_dict().items():  # resolved: clients_per_round, floats
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FLAT}

    @property
    def num_malicious(self) -> int:
        return num_malicious(self.sections.attack, self.clients)


RunConfig = dataclasses.make_dataclass("RunConfig", _flat_fields(), bases=(_FlatView,), frozen=True)
RunConfig.__module__ = __name__
RunConfig.__doc__ = """The flat view of a ``Config``: every setting by its flat name.

``RunConfig(rounds=5, trust_decay=0.8)`` builds and checks the sections (``config.sections`` is
the nested ``Config``); ``dataclasses.replace(config, rounds=3)`` builds a new, checked one.
The fields are generated from the sections, so a default is written once, in its section.
"""


def settings_markdown() -> str:
    """docs/settings.md: every setting by section, with its flag, TOML key, default and range."""
    lines = [
        "# Settings",
        "",
        "Generated from `fedwarden/config.py` (`fedwarden.config.settings_markdown()`; a test keeps",
        "this page in step). Flags take the flat name with dashes; a TOML file takes the flat name",
        "at its top level or the field name inside the section's table (`[training] rounds = 5`).",
    ]
    for section in (*SECTIONS, DeploymentConfig):
        lines += ["", f"## {section.title} (`[{section.key}]`)", ""]
        lines += [
            "| flag | TOML in the table | default | accepted | meaning |",
            "|---|---|---|---|---|",
        ]
        for f in dataclasses.fields(section):
            m = f.metadata
            if m["kind"] in (dict, list):
                default = str(m["kind"]())
            else:
                default = m["default_text"] or ("-" if f.default is None else f.default)
            if m["choices"]:
                accepted = ", ".join(m["choices"])
            elif m["low"] is not None or m["high"] is not None:
                accepted = _describe_range(m)
            else:
                accepted = _KIND_WORDS.get(m["kind"], "a table")
            if f.name == "params":
                flag = "`--attack-param KEY=VALUE`"
            elif m["kind"] is dict:
                flag = "TOML only"
            elif m["kind"] is list:
                flag = f"`{flag_name(f)} {m['metavar']}` (repeatable)"
            elif f.name == "state_dir":
                flag = "`--state-dir` (flag only)"
            elif m["kind"] is bool and f.default:
                flag = f"`--no-{flat_name(f).replace('_', '-')}`"
            else:
                flag = f"`{flag_name(f)}`"
            cells = (flag, f"`{f.name}`", str(default), accepted, m["help"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _flatten_table(table: dict[str, Any], path: str) -> dict[str, Any]:
    """Flat names from a TOML table: section tables, flat keys, or prefixed tables
    (``[dp] clip = 1`` is ``dp_clip``); a setting given twice is refused."""
    sections = {s.key: s for s in SECTIONS}
    pairs: list[tuple[str, Any]] = []
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        is_table = isinstance(value, dict) and (
            key not in FLAT or FLAT[key][1].metadata["kind"] is not dict
        )
        if key in sections and is_table:
            names = {f.name: flat_name(f) for f in dataclasses.fields(sections[key])}
            for sub, sub_value in value.items():
                sub = sub.replace("-", "_")
                pairs.append((names.get(sub, sub if sub in FLAT else f"{key}_{sub}"), sub_value))
        elif is_table:
            pairs += [(f"{key}_{k}", v) for k, v in _flatten_table(value, path).items()]
        else:
            pairs.append((key, value))
    flat: dict[str, Any] = {}
    for name, value in pairs:
        if name in flat:
            raise UsageError(f"config file {path}: {name} is set twice; keep one")
        flat[name] = value
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as tables, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None


def load_toml(path: str | Path, *, deployment: bool = False) -> dict[str, Any]:
    """The flat settings of a TOML file, each type- and range-checked (errors name the file).

    A ``[deployment]`` table holds ``fedwarden serve``'s own options (``host``, ``port``,
    ``round_timeout``, ...); with ``deployment`` it is left for serve to read, else refused.
    """
    table = dict(read_toml(path))
    if "deployment" in table and not deployment:
        raise UsageError(
            f"config file {path}: [deployment] holds fedwarden serve's options; this command "
            "does not use them"
        )
    table.pop("deployment", None)
    values = _flatten_table(table, str(path))
    unknown = sorted(set(values) - set(FLAT))
    if unknown:
        raise UsageError(
            f"config file {path}: unknown keys {', '.join(unknown)}. "
            f"Accepted keys: {', '.join(sorted(FLAT))} (or the same inside "
            f"[{'], ['.join(s.key for s in SECTIONS)}] tables)"
        )
    for name, value in values.items():
        try:
            check_value(FLAT[name][1], value)
        except UsageError as exc:
            raise UsageError(f"config file {path}: {name}: {exc}") from None
    return values


def make_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """Merges file values and flags (flags win; None means 'not given') and validates the result."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    return RunConfig(**merged)


def validate(config: RunConfig) -> None:
    """Kept for callers of the old API: a ``RunConfig`` is validated when it is built."""
    RunConfig(**config.to_dict())
