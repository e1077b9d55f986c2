"""The one round loop of every run: simulations, ``fedwarden serve`` and ``--engine tff``.

A run is a :class:`RoundDriver` over three pieces:

- a **transport** (:class:`Transport`) that selects a cohort with ``Coordinator.select`` and
  returns its updates: simulated clients trained in this process
  (``fedwarden.simulations.runner``, native or TFF training), agents over gRPC
  (``fedwarden.server.serve``), or a test's fake;
- the **coordinator** (``Coordinator.finish_round``): admission, aggregation, scores, trust;
- **callbacks** (``fedwarden.server.callbacks``), Keras style, for everything around a round:
  the privacy account and its budget stop, metrics, checkpoint and ``results.json``, progress,
  pause. Each hook defaults to a no-op and receives a plain dict.

The driver keeps the run's :class:`History` (the rounds of ``results.json``, trust and flags per
round, example counts), which the checkpoint carries; :func:`results` turns it into
``results.json``, the same for a simulation and a deployment; :func:`check_resume` is the one
test of whether a checkpoint may be continued by the current settings.

Example (a transport that trains nobody; see tests/test_driver.py for more)::

    class Idle:
        def collect(self, round_number, coordinator):
            return Cohort(coordinator.select(["a", "b"], 2, rng), [])

    driver = RoundDriver(coordinator, Idle(), evaluate=lambda w: (0.0, 1.0, None), rounds=3)
    driver.run()  # "done"
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedwarden import report
from fedwarden.errors import UsageError
from fedwarden.results import describe_step
from fedwarden.server import checkpoint, faults
from fedwarden.server.admission import ClientUpdate, RoundIntake
from fedwarden.server.coordinator import Coordinator, RoundOutcome

Evaluate = Callable[[np.ndarray], tuple[float, float, float | None]]
"""Flat weights -> (loss, accuracy, attack success rate or None) on held-out data."""

log = logging.getLogger("fedwarden.driver")


@dataclass
class Cohort:
    """What a transport gathered for one round: who was selected and what came back.

    ``updates``: a list; or, under a round memory budget, an iterable that produces them one at
    a time, or the ``RoundIntake`` (``Coordinator.open_round``) they were admitted into as
    they arrived, so that the round never holds them all. Once the round ran, the driver's
    ``cohort`` holds their receipts instead (``RoundOutcome.received``: ids and example counts,
    no values).
    """

    selected: list[str]
    updates: Iterable[ClientUpdate] | RoundIntake
    attempt: int = 0  # earlier attempts at this round that the transport abandoned


class Transport(Protocol):
    def collect(self, round_number: int, coordinator: Coordinator) -> Cohort | None:
        """Selects a cohort (``coordinator.select``), sends it ``coordinator.weights`` and
        returns its updates; None when the round could not run this time (too few agents, an
        abandoned attempt, a stop request): the driver asks again after its callbacks ran."""


@dataclass
class ModelAverage:
    """The mean of the global models after rounds ``first`` up to the run's last, the model a
    run hands back under ``--average-last-rounds``: one running sum, carried by the checkpoint.

    Each round's model rests on one sampled cohort (and, under a filtering rule, on the part of
    it the rule kept), so consecutive rounds' accuracies swing by points; their mean, as in
    stochastic weight averaging, does not follow any one round's swing.
    """

    first: int
    total: np.ndarray | None = None
    count: int = 0

    def add(self, round_number: int, weights: np.ndarray) -> None:
        if round_number < self.first:
            return
        if self.total is None:
            self.total = np.zeros(np.shape(weights), np.float64)
        self.total += weights  # in place: one vector for the whole window
        self.count += 1

    def model(self) -> np.ndarray | None:
        """The mean so far (float32), or None before the window's first round."""
        return None if self.total is None else (self.total / self.count).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "total": self.total, "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ModelAverage:
        total = state.get("total")
        return cls(
            int(state["first"]), None if total is None else np.asarray(total), int(state["count"])
        )


@dataclass
class History:
    """What a run has done so far, as ``results.json`` and the trust plot need it.

    ``rounds`` are the per-round records of ``results.json``; ``trust`` holds one value per
    round per client (None before it was scored), ``flagged`` the flagged set after each round,
    ``examples`` each client's latest admitted example count.
    """

    rounds: list[dict[str, Any]] = field(default_factory=list)
    trust: dict[str, list[float | None]] = field(default_factory=dict)
    flagged: list[list[str]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    average: ModelAverage | None = None

    def add(
        self, record: dict[str, Any], outcome: RoundOutcome, updates: list[ClientUpdate],
        snapshot: dict[str, Any], population: Iterable[str] | None,
    ) -> None:  # fmt: skip
        self.rounds.append(record)
        for u in updates:
            if u.client_id in outcome.admitted:
                self.examples[u.client_id] = int(u.num_examples)
        ids = list(population) if population is not None else sorted({*self.trust, *snapshot})
        for cid in ids:
            series = self.trust.setdefault(cid, [])
            series += [None] * (len(self.rounds) - 1 - len(series))
            series.append(snapshot[cid].trust if cid in snapshot else None)
        self.flagged.append(sorted(outcome.flagged))

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "trust_by_round": self.trust,
            "flagged_by_round": self.flagged,
            "examples": self.examples,
            **({} if self.average is None else {"model_average": self.average.state_dict()}),
        }

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> History:
        """From a checkpoint's payload (older ones carry only ``rounds`` and ``examples``)."""
        return cls(
            list(saved.get("rounds", [])),
            dict(saved.get("trust_by_round", {})),
            list(saved.get("flagged_by_round", [])),
            dict(saved.get("examples", {})),
            ModelAverage.from_state(saved["model_average"]) if "model_average" in saved else None,
        )


RESUMABLE_CHANGES = frozenset({"rounds", "out", "progress", "metrics_port"})
"""Settings that may differ between a run and its resumption."""


def _leaves(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("attack_params", "anomaly_weights"):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(
    saved: dict[str, Any], config: dict[str, Any], shapes: Sequence[Sequence[int]], where: Path
) -> None:
    """Refuses to continue a checkpoint made with another model or other settings.

    Args:
      saved: the checkpoint's payload (``config`` and ``layout`` when it has them).
      config: the current ``RunConfig.to_dict()``.
      shapes: the current model's weight shapes.
      where: the directory named in the message.

    Raises:
      UsageError: naming every setting that changed, except ``RESUMABLE_CHANGES``.
    """
    if "layout" in saved and tuple(map(tuple, saved["layout"])) != tuple(map(tuple, shapes)):
        raise UsageError(
            f"{where} holds a run of another model (weight shapes {saved['layout']}); use the "
            "same model or another directory"
        )
    if "config" not in saved:
        return
    before, now = _leaves(saved["config"]), _leaves(config)
    changed = sorted(
        k
        for k in {*before, *now}
        if k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise UsageError(
            f"cannot resume {where}: its checkpoint was made with other settings ({diffs}); "
            "use the same settings or another directory"
        )


def unwritable(state_dir: Path, round_number: int, exc: Exception) -> UsageError:
    """The error that stops a run whose state dir cannot be written (e.g. disk full)."""
    saved = checkpoint.list_checkpoints(state_dir)
    kept = f"round {saved[0][0]}" if saved else "nothing"
    return UsageError(
        f"round {round_number}: cannot write the state dir {state_dir} "
        f"({type(exc).__name__}: {exc}); the coordinator stops, its last checkpoint is "
        f"{kept}: free space or fix the directory, then restart with the same --state-dir "
        "to resume from it"
    )


@dataclass
class RunInfo:
    """What ``results.json`` says about a run besides its rounds.

    ``population`` maps every client to its example count when the run knows them beforehand
    (a simulation), else None (a deployment: clients appear as they are scored).
    ``malicious`` is the ground truth, None when unknown (``unknown`` says why in
    ``final.detection``); ``attacks(client_id, round)`` whether a malicious client attacked in
    a round (an on-off or held-back attacker sends honest updates in others), None when every
    malicious client attacks whenever it is sampled.
    """

    config: dict[str, Any]
    population: dict[str, int] | None = None
    malicious: frozenset[str] | None = None
    attack: dict[str, Any] | None = None  # fedwarden.results.describe_attack
    attacks: Callable[[str, int], bool] | None = None
    unknown: str = "no ground truth"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "deployment"

    def attacked_rounds(self, rounds: list[dict[str, Any]]) -> dict[str, list[int]] | None:
        """For each malicious client that attacked, the rounds of ``rounds`` (results.json
        records) in which it was sampled and attacked, in one pass over the cohorts; None
        without ground truth."""
        if self.malicious is None:
            return None
        attacks = self.attacks or (lambda cid, r: True)
        out: dict[str, list[int]] = {}
        for r in rounds:
            for cid in r["selected"]:
                if cid in self.malicious and attacks(cid, r["round"]):
                    out.setdefault(cid, []).append(r["round"])
        return out


def results(
    info: RunInfo, history: History, coordinator: Coordinator, privacy: dict[str, Any] | None
) -> dict[str, Any]:
    """``results.json``: per-round records, final metrics, privacy spent, per-client trust."""
    last = history.rounds[-1]
    snapshot = coordinator.trust.snapshot()
    if info.population is not None:
        ids, examples = list(info.population), info.population
    else:
        ids, examples = sorted({*snapshot, *history.examples}), history.examples
    attacked = info.attacked_rounds(history.rounds)
    if attacked is None:
        detection = {"precision": None, "recall": None, "note": info.unknown}
    else:
        flagged = [set(f) for f in history.flagged]
        selected = [set(r["selected"]) for r in history.rounds]
        detection = report.detection_summary(flagged, set(info.malicious), set(attacked), selected)
    return {
        "config": info.config,
        **info.extra,
        "rounds": history.rounds,
        "final": {
            "accuracy": last["accuracy"],
            "loss": last["loss"],
            "attack_success_rate": last["attack_success_rate"],
            "detection": detection,
            "privacy": privacy,
        },
        "clients": {
            cid: {
                "malicious": None if info.malicious is None else cid in info.malicious,
                "trust": snapshot[cid].trust if cid in snapshot else None,
                "flagged": bool(snapshot[cid].flagged) if cid in snapshot else False,
                "num_examples": examples.get(cid),
                "attacked_rounds": None if attacked is None else attacked.get(cid, []),
            }
            for cid in ids
        },
        "aggregator": describe_step(coordinator.chain),
        "attack": info.attack,
    }


class RoundDriver:
    """Runs rounds ``coordinator.round + 1 .. rounds`` over a transport, with callbacks.

    Args:
      coordinator: the round logic; its ``round`` is the last completed round.
      transport: returns each round's cohort (:class:`Transport`).
      evaluate: flat weights -> (loss, accuracy, attack success rate or None).
      rounds: the last round to run.
      callbacks: ``fedwarden.server.callbacks.Callback`` objects, called in order; a callback
        may add keys to the round's record (the privacy account adds ``epsilon``) for the ones
        after it, so the checkpoint goes last.
      history: what a resumed run has done so far.
      population: every client id when the run knows them (trust is recorded for each).
      state_dir: where the run persists (named when it cannot be written).
      average_last: the run hands back the mean of the global models of its last
        ``average_last`` rounds (:class:`ModelAverage`); the last round is evaluated on it and
        its record keeps the last round's own model under ``last_model``. 1: the last model; a
        run stopped before its last round also hands back its last model.

    ``run`` returns why it ended: ``"done"``, or the reason given to ``stop`` (a callback's
    ``"budget"``, a signal's ``"stopped"``).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        transport: Transport,
        evaluate: Evaluate,
        rounds: int,
        callbacks: Sequence[Any] = (),
        *,
        history: History | None = None,
        population: Iterable[str] | None = None,
        state_dir: Path | None = None,
        average_last: int = 1,
    ):
        self.coordinator = coordinator
        self.transport = transport
        self.evaluate = evaluate
        self.rounds = rounds
        self.callbacks = list(callbacks)
        self.history = history or History()
        self.population = list(population) if population is not None else None
        self.state_dir = state_dir
        self.outcome: RoundOutcome | None = None  # the last round's, for callbacks
        self.cohort: Cohort | None = None
        self.stop_reason: str | None = None
        if average_last > 1:
            self._average_from(max(1, rounds - average_last + 1))
        for callback in self.callbacks:
            callback.set_driver(self)

    def _average_from(self, first: int) -> None:
        saved = self.history.average
        if saved is not None and saved.first == first:
            return
        done = self.coordinator.round
        if done >= first:  # a resumed run whose --rounds moved the window over rounds it ran
            log.warning(
                "the model average of rounds %d-%d can only hold rounds %d-%d: the models of "
                "rounds %d-%d were not kept",
                first, self.rounds, done + 1, self.rounds, first, done,
            )  # fmt: skip
        self.history.average = ModelAverage(max(first, done + 1))

    def final_weights(self) -> np.ndarray:
        """The model the run hands back: under ``average_last``, once the last round ran, the
        mean of the window's models; else (no averaging, or a run stopped before its last
        round) the last round's model."""
        average = self.history.average
        if average is None or self.coordinator.round < self.rounds:
            return self.coordinator.weights
        return average.model()

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: str = "stopped") -> None:
        """Ends the run before its next round (the first reason given wins)."""
        self.stop_reason = self.stop_reason or reason

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def run(self) -> str:
        self._call("on_run_begin", {"first_round": self.coordinator.round + 1})
        round_number = self.coordinator.round + 1
        while round_number <= self.rounds and not self.stopping:
            self._call("on_round_begin", round_number, {})
            if self.stopping:
                break
            start = time.perf_counter()
            cohort = self.transport.collect(round_number, self.coordinator)
            if cohort is None:
                continue
            self._round(round_number, cohort, start)
            del cohort  # its updates, if a list, are not kept while the next cohort trains
            round_number += 1
        reason = self.stop_reason or "done"
        self._call("on_run_end", {"reason": reason, "rounds": len(self.history.rounds)})
        return reason

    def _round(self, round_number: int, cohort: Cohort, start: float) -> None:
        faults.point("aggregate", round_number)
        try:
            outcome = self.coordinator.finish_round(round_number, cohort.selected, cohort.updates)
        except (OSError, sqlite3.Error) as exc:  # the ledger could not be written
            raise unwritable(self.state_dir or Path("."), round_number, exc) from None
        faults.point("ledger", round_number)
        average = self.history.average
        if average is not None:
            average.add(round_number, self.coordinator.weights)
        loss, accuracy, asr = self.evaluate(self.coordinator.weights)
        handed_back = {}
        if average is not None and round_number == self.rounds:
            last = {"accuracy": accuracy, "loss": loss, "attack_success_rate": asr}
            handed_back = {"last_model": last, "averaged_rounds": [average.first, round_number]}
            loss, accuracy, asr = self.evaluate(self.final_weights())
        record = {
            "round": round_number,
            "accuracy": accuracy,
            "loss": loss,
            "attack_success_rate": asr,
            "flagged": outcome.flagged,
            "selected": outcome.selected,
            "admitted": len(outcome.admitted),
            "rejected": len(outcome.rejected),
            "rejections": [
                {"client_id": r.client_id, "reason": r.reason} for r in outcome.rejected
            ],
            "attempts": cohort.attempt + 1,
            "duration_s": time.perf_counter() - start,
            "measurements": checkpoint.jsonable(outcome.measurements),
            **handed_back,
        }
        # The updates may have been a generator or an intake: what the callbacks read of them
        # (ids, example counts) is in the receipts.
        self.outcome, self.cohort = outcome, replace(cohort, updates=outcome.received)
        self.history.add(
            record, outcome, outcome.received, self.coordinator.trust.snapshot(), self.population
        )
        self._call("on_round_end", round_number, record)
