"""Red-team agents: the simulations' attacks, run by a real agent against a real coordinator.

``fedwarden agent ... --attack NAME`` turns an agent into an attacker with the same
implementations as ``fedwarden simulate`` (``fedwarden/attacks.py``, plugins included). Nothing
it sends marks it: it registers, trains and submits like any agent, so the coordinator's
detection is tested for real. Only the agent's own ``--red-team-report FILE`` says what it did.

- Data attacks (``label_flip``, ``backdoor``, ``label_noise``, data plugins) poison the local
  data once, when the task's spec arrives; from ``--attack-start-round`` on the agent trains on
  the poisoned copy (and a ``boost`` parameter scales the update, as in simulations).
- Model attacks replace the trained update by ``Attack.craft(honest, own, rng)``.

Non-omniscient form. In simulations a model attack sees this round's honest updates. A real agent
sees only its own data and the global model, so it passes as ``honest`` a stand-in: ``h = n - 1``
rows for a cohort of ``n = --attack-cohort`` clients (the agent does not know the real one; it
assumes n, default 10), built by ``honest_reference`` from *estimate samples*:

- attacks that need the honest spread get ``ESTIMATE_SAMPLES`` samples: the agent's own honest
  update plus ``ESTIMATE_SAMPLES - 1`` updates trained from the same global model on bootstrap
  resamples of its clean local data; the rows then have exactly the samples' per-coordinate mean
  and standard deviation. Per attack, that estimates:

  - ``alie``: the honest mean and per-coordinate std (mean - z * std; z from n and m = 1);
  - ``ipm``: the honest mean (-epsilon * mean);
  - ``min_max`` / ``min_sum``: the mean, the std (the default perturbation) and the honest
    pairwise distances that bound gamma;
  - ``random_direction``: the median honest norm;
  - ``gaussian`` with ``relative=true``: the median per-coordinate std;
  - plugins: whatever they compute from ``honest_updates`` (their contract hands them the rows).

- attacks that use only their own update or the cohort size get the own honest update repeated
  (no extra training): ``sign_flip``, ``scaling`` (default boost n / m = n, the assumed cohort),
  ``gaussian`` (absolute sigma), ``free_rider``, and the data attacks' ``boost``.

Resampling one client's data shows the spread due to sampling, not the spread between clients
with different data, so the estimated std is smaller than the real one under non-iid data: ALIE
and min-max then stay closer to the honest mean than their omniscient forms (stealthier, weaker).
Recent global-model deltas are not used: they show the previous round's aggregate after the
server optimizer, not this round's spread, and only when the agent was selected twice running.
Attackers do not collude across agents (there is no side channel between them). The extra
trainings make a spread-estimating agent slower to answer; the coordinator does not score
timing, but a real one might.

Report (JSON lines, appended): one object per update sent, with keys ``client_id``, ``round``,
``attack``, ``params``, ``attacking``, ``update_norm`` (what was sent), ``trained_norm`` (the
update trained locally: honestly, or on the poisoned data), ``estimate_samples``, ``cohort``,
``claimed_examples`` (the count reported instead of the true one, ``--attack-claim-examples``;
null when it told the truth) and ``status`` (the coordinator's answer: ACCEPTED, LATE or
REJECTED). ``fedwarden trust report`` scores a ledger against it.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedwarden.attacks import (
    CONTEXT_PARAMS,
    Attack,
    AttackError,
    attacks_in_round,
    build_attack,
)
from fedwarden.errors import UsageError

ESTIMATE_SAMPLES = 4
"""The own honest update plus this many minus one bootstrap updates, for spread estimates."""

SPREAD_ATTACKS = frozenset({"alie", "ipm", "min_max", "min_sum", "random_direction"})
UNKNOWN_CLASSES = 2**31 - 1
"""Stands in for num_classes before the task says it, so options are checked at start-up."""

TrainFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]
"""``train(x, y, rng) -> update``: one local training from this round's global model."""


def needs_spread(attack: Attack) -> bool:
    """Whether ``attack.craft`` reads the honest updates' values (not just their count)."""
    if attack.kind != "model":
        return False
    if ":" in attack.name:  # a plugin gets honest_updates by contract
        return True
    return attack.name in SPREAD_ATTACKS or (
        attack.name == "gaussian" and bool(attack.params.get("relative"))
    )


def honest_reference(samples: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, d)`` float32 stand-ins for the other clients' honest updates.

    Args:
        samples: ``(k, d)`` updates the agent trained honestly (its own first).
        rows: how many honest clients to stand in for (the assumed cohort minus one).
        rng: draws the rows' directions.

    Returns:
        With one sample, that sample repeated (a read-only view, no copy). With ``k >= 2``, rows
        ``mean + std * z``, where ``z`` is Gaussian noise standardized per coordinate, so that
        the rows' per-coordinate mean and population std equal the samples' mean and sample std
        (ddof=1) exactly (for ``rows >= 2``; one row is the mean).
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or len(samples) == 0:
        raise ValueError(f"samples must be shaped (k >= 1, d). Received: {samples.shape}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1. Received: rows={rows}")
    if len(samples) == 1:
        return np.broadcast_to(samples[0].astype(np.float32), (rows, samples.shape[1]))
    mean, std = samples.mean(axis=0), samples.std(axis=0, ddof=1)
    if rows == 1:
        return mean[None, :].astype(np.float32)
    z = rng.standard_normal((rows, samples.shape[1]))
    z -= z.mean(axis=0)
    scale = z.std(axis=0)
    z /= np.where(scale > 0, scale, 1.0)
    return (mean + std * z).astype(np.float32)


def bootstrap_updates(
    x: np.ndarray, y: np.ndarray, train: TrainFn, count: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``count`` updates, each trained on a resample (with replacement, same size) of ``x, y``."""
    updates = []
    for _ in range(count):
        idx = rng.integers(0, len(y), size=len(y))
        updates.append(np.asarray(train(x[idx], y[idx], rng), dtype=np.float32))
    return updates


class RedTeam:
    """One agent's attack: which data it trains on, what update it sends, and its report.

    Args:
        attack: an attack name or ``package.module:callable`` (see ``fedwarden attacks``).
        params: the attack's parameters (``--attack-param``), literature defaults for the rest.
        client_id: this agent's id (for the report and per-agent random streams).
        start_round: first round in which it attacks; before, it behaves honestly.
        rate: share of its rounds from ``start_round`` on in which it attacks; under 1 an on-off
            attacker, honest in the others (``attacks_in_round``).
        cohort: the number of clients per round the attacker assumes (``--attack-cohort``).
        report: the JSON-lines report file (appended to), or None.
        estimate_samples: samples for spread estimates (see the module docstring).
        claim_examples: the example count it reports while attacking, whatever it trained on
            (``--attack-claim-examples``, as in simulations); None reports the true count.

    Example::

        red = RedTeam("alie", {}, "c04", cohort=5)
        red.bind(num_classes=10, x=x, y=y, seed=0)
        x_round, y_round = red.local_data(3, x, y)
        sent = red.craft(3, honest_update, train)   # train(x, y, rng) -> update
        red.record(3, "ACCEPTED")
    """

    def __init__(
        self,
        attack: str,
        params: dict[str, Any],
        client_id: str,
        *,
        start_round: int = 1,
        rate: float = 1.0,
        cohort: int = 10,
        report: str | Path | None = None,
        estimate_samples: int = ESTIMATE_SAMPLES,
        claim_examples: int | None = None,
    ):
        if start_round < 1:
            raise UsageError(f"--attack-start-round must be >= 1. Received: {start_round}")
        if not 0.0 < rate <= 1.0:
            raise UsageError(f"--attack-rate must be in (0, 1]. Received: {rate}")
        if cohort < 2:
            raise UsageError(
                f"--attack-cohort must be >= 2 (this agent and at least one honest client). "
                f"Received: {cohort}"
            )
        if estimate_samples < 2:
            raise UsageError(f"estimate_samples must be >= 2. Received: {estimate_samples}")
        if claim_examples is not None and claim_examples < 1:
            raise UsageError(f"--attack-claim-examples must be >= 1. Received: {claim_examples}")
        self.claim_examples = claim_examples
        self.name, self.params, self.client_id = attack, dict(params), client_id
        self.start_round, self.rate = start_round, float(rate)
        self.cohort, self.estimate_samples = cohort, estimate_samples
        self.attack = self._build(UNKNOWN_CLASSES)  # fails fast on names and parameters
        if self.attack.kind == "none":
            raise UsageError("--attack none is an honest agent: leave --attack out")
        self.report = Path(report) if report else None
        if self.report is not None:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            self.report.touch()
        self._seed = 0
        self._clean: tuple[np.ndarray, np.ndarray] | None = None
        self._poisoned: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"RedTeam(attack={self.attack!r}, start_round={self.start_round}, rate={self.rate}, "
            f"cohort={self.cohort}, estimate_samples={self.estimate_samples})"
        )

    def _build(self, num_classes: int, output_kernel: tuple[int, int] | None = None) -> Attack:
        context = {"num_classes": num_classes, "output_kernel": output_kernel}
        try:
            return build_attack(self.name, {**context, **self.params})
        except AttackError as exc:
            raise UsageError(str(exc)) from None

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, *stream, zlib.crc32(self.client_id.encode())])

    def attacking(self, round_number: int) -> bool:
        return attacks_in_round(self.client_id, round_number, start_round=self.start_round,
                                rate=self.rate, seed=self._seed)  # fmt: skip

    def reported_examples(self, round_number: int, trained_on: int) -> int:
        """The example count to send with this round's update: the claim once attacking."""
        if self.claim_examples is not None and self.attacking(round_number):
            return self.claim_examples
        return trained_on

    def bind(
        self, num_classes: int, x: np.ndarray, y: np.ndarray, seed: int,
        output_kernel: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        """Takes the task's classes (and its model's output kernel shape, for the attacks that
        read the detector) and the validated local data; poisons it for data attacks."""
        self.attack = self._build(num_classes, output_kernel)
        self._seed = seed
        self._clean = (x, y)
        self._poisoned = self.attack.poison_data(x, y, self._rng(2))

    def local_data(
        self, round_number: int, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The data to train on this round: the poisoned copy once a data attack is on."""
        if self.attack.kind == "data" and self.attacking(round_number):
            return self._poisoned
        return x, y

    def craft(
        self,
        round_number: int,
        trained: np.ndarray,
        train: TrainFn,
        trained_from: np.ndarray | None = None,
    ) -> np.ndarray:
        """The update to send this round, given the one trained (on ``local_data``) from the
        flat global weights ``trained_from`` (for the attacks that read them)."""
        trained = np.asarray(trained, dtype=np.float32)
        attacking = self.attacking(round_number)
        sent, samples = trained, 1
        if attacking:
            rng = self._rng(4, round_number)
            estimate = [trained]
            if needs_spread(self.attack):
                x, y = self._clean
                estimate += bootstrap_updates(x, y, train, self.estimate_samples - 1, rng)
            samples = len(estimate)
            honest = honest_reference(np.stack(estimate), self.cohort - 1, rng)
            sent = self.attack.craft(honest, trained[None, :], rng, trained_from=trained_from)[0]
        self._pending = {
            "client_id": self.client_id,
            "round": round_number,
            "attack": self.attack.name,
            "params": {k: v for k, v in self.attack.params.items() if k not in CONTEXT_PARAMS},
            "attacking": attacking,
            "update_norm": float(np.linalg.norm(sent)),
            "trained_norm": float(np.linalg.norm(trained)),
            "estimate_samples": samples,
            "cohort": self.cohort,
            "claimed_examples": self.claim_examples if attacking else None,
        }
        return sent

    def record(self, round_number: int, status: str) -> dict[str, Any] | None:
        """Appends the round's line (what ``craft`` sent, and the coordinator's answer)."""
        line, self._pending = self._pending, None
        if line is None or line["round"] != round_number:
            return None
        line["status"] = status
        line["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.report is not None:
            with self.report.open("a") as f:
                f.write(json.dumps(line) + "\n")
        return line


def read_reports(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every line of the red-team reports; a missing or unreadable file is a UsageError."""
    lines: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"red-team report not found: {path}")
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(line, dict) or not {"client_id", "round", "attacking"} <= set(line):
                raise UsageError(
                    f"{path}:{number}: not a red-team report line (needs client_id, round, "
                    "attacking)"
                )
            lines.append(line)
    return lines
