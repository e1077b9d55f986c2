"""What happens around a round, as callbacks of ``fedwarden.server.driver.RoundDriver``.

Keras style: subclass :class:`Callback` and override the hooks you need; each defaults to a
no-op. ``self.driver`` is the driver (its ``coordinator``, ``history``, ``outcome`` and
``cohort`` of the last round); ``logs`` is a plain dict. ``on_round_end`` receives the round's
record for ``results.json``: a callback may add keys to it for the callbacks after it.

Hooks, in the order a run reaches them:

- ``on_run_begin(logs)``: ``logs["first_round"]``;
- ``on_round_begin(round, logs)``: before the transport is asked for the round; called again for
  the same round when the transport could not run it (too few agents). Call
  ``self.driver.stop(reason)`` to end the run here;
- ``on_round_end(round, logs)``: the round is aggregated, evaluated and in the history;
- ``on_run_end(logs)``: ``logs["reason"]`` ("done", "budget", "stopped"), ``logs["rounds"]``.

Example::

    class PrintAccuracy(Callback):
        def on_round_end(self, round, logs):
            print(round, logs["accuracy"])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedwarden import report
from fedwarden.aggregation.accounting import ClientPrivacyAccount, default_delta, dp_sgd_steps
from fedwarden.server import checkpoint, faults
from fedwarden.server.driver import RunInfo, results, unwritable

log = logging.getLogger("fedwarden.driver")


class Callback:
    """Base class: every hook does nothing."""

    driver: Any = None

    def set_driver(self, driver: Any) -> None:
        self.driver = driver

    def on_run_begin(self, logs: dict[str, Any]) -> None:
        pass

    def on_round_begin(self, round: int, logs: dict[str, Any]) -> None:
        pass

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        pass

    def on_run_end(self, logs: dict[str, Any]) -> None:
        pass


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_round_end=lambda r, logs: ...)``."""

    def __init__(self, **hooks: Callable[..., None]):
        for name, hook in hooks.items():
            if not hasattr(Callback, name) or not name.startswith("on_"):
                raise TypeError(f"unknown hook {name!r}; hooks are on_run_begin, "
                                "on_round_begin, on_round_end, on_run_end")  # fmt: skip
            setattr(self, name, hook)


DP_GAUGES = {"clip_rate": "fedwarden_dp_clip_rate", "clip_norm": "fedwarden_dp_clip_norm"}
"""Chain measurement (``"<step>/<name>"``) -> the gauge that exports it under central DP."""


def dp_gauges(measurements: dict[str, Any]) -> dict[str, float]:
    """The DP gauges a round's chain measurements set (the last step reporting one wins)."""
    gauges = {}
    for key, value in measurements.items():
        name = DP_GAUGES.get(key.rsplit("/", 1)[-1])
        if name is not None:
            gauges[name] = float(value)
    return gauges


class PrivacyAccount(Callback):
    """The privacy spent by a run, for central DP and DP-SGD alike, and its budget stop.

    Args:
      central: ``fedwarden.server.defence.CentralPrivacy`` or None. With a ``budget``, the run
        stops (reason ``"budget"``) before a round that would take epsilon above it.
      client: the DP-SGD account (``fedwarden.aggregation.accounting.ClientPrivacyAccount``)
        or None. Every update of the round adds its client's local steps to it.
      local_steps: a client's DP-SGD steps in one round from its example count
        (``dp_sgd_steps``); the same formula the trainer uses.
      client_delta: client id -> the delta its epsilon is stated at.
      client_settings: the DP-SGD settings reported beside the epsilons.
      exporter: a ``MetricsExporter`` to publish epsilons and the DP gauges, or None.
      sampling_note: replaces the central report's ``client_sampling`` (a deployment does not
        sample the Poisson way).

    Adds ``epsilon`` (central) to each round's record; :meth:`report` is ``final.privacy``.
    """

    def __init__(
        self,
        central: Any = None,
        client: Any = None,
        client_delta: Callable[[str], float] | None = None,
        client_settings: dict[str, Any] | None = None,
        exporter: Any = None,
        sampling_note: str | None = None,
        local_steps: Callable[[int], int] | None = None,
    ):
        self.central, self.client, self.client_delta = central, client, client_delta
        self.local_steps = local_steps
        self.client_settings = client_settings or {}
        self.exporter = exporter
        self.sampling_note = sampling_note

    @classmethod
    def for_run(
        cls,
        config: Any,
        central: Any,
        examples: Callable[[str], int],
        exporter: Any = None,
        saved: dict[str, Any] | None = None,
        sampling_note: str | None = None,
    ) -> PrivacyAccount:
        """A run's account from its settings, the same for a simulation and a deployment.

        Args:
          config: the run's ``fedwarden.config.RunConfig`` (DP-SGD on or off, its noise, clip
            and delta, the batch size and local epochs its steps follow from).
          central: ``fedwarden.server.defence.CentralPrivacy`` or None.
          examples: a client's example count, for its default delta (``1/n^1.1``).
          exporter: as for the constructor.
          saved: a checkpoint to resume from: its DP-SGD account carries on.
          sampling_note: as for the constructor.

        Returns:
          The account; with DP-SGD on, ``client`` is a ``ClientPrivacyAccount``.
        """
        client = None
        if config.dp_sgd:
            client = (saved or {}).get("dp_sgd") or ClientPrivacyAccount(
                config.dp_sgd_noise_multiplier, config.batch_size
            )
        return cls(
            central,
            client,
            lambda cid: config.dp_delta or default_delta(examples(cid)),
            {
                "delta": config.dp_delta or "1/n_local^1.1 per client",
                "noise_multiplier": config.dp_sgd_noise_multiplier,
                "l2_clip": config.dp_l2_clip,
            },
            exporter,
            sampling_note=sampling_note,
            local_steps=lambda n: dp_sgd_steps(n, config.batch_size, config.local_epochs),
        )

    def on_round_begin(self, round: int, logs: dict[str, Any]) -> None:
        privacy = self.central
        if privacy is None or privacy.allows(round):
            return
        spent = privacy.epsilon(round - 1) if round > 1 else 0.0
        print(
            f"round {round}: not started: it would take epsilon from {spent:.4g} to "
            f"{privacy.epsilon(round):.4g}, above the target {privacy.budget:g} (delta "
            f"{privacy.delta:g}); stopping with the checkpoint of round {round - 1}",
            flush=True,
        )
        self.driver.stop("budget")

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        if self.client is not None:
            # Rejected updates were trained too; only an implausible example count is not used.
            implausible = {r.client_id for r in self.driver.outcome.rejected
                           if r.reason == "bad_example_count"}  # fmt: skip
            for u in self.driver.cohort.updates:
                if u.client_id not in implausible and int(u.num_examples) >= 1:
                    n = int(u.num_examples)
                    self.client.record(u.client_id, n, steps=self.local_steps(n))
        if self.central is not None:
            logs["epsilon"] = self.central.epsilon(round)
            if self.exporter is not None:
                self.exporter.set_dp_epsilon(logs["epsilon"])
                for name, value in dp_gauges(self.driver.outcome.measurements).items():
                    self.exporter.set_gauge(name, value)
        if self.client is not None and self.exporter is not None:
            for cid in self.driver.outcome.selected:
                if self.client.steps(cid):
                    self.exporter.set_dp_epsilon(self.client_epsilon(cid), client_id=cid)

    def client_epsilon(self, cid: str) -> float:
        return self.client.epsilon(cid, self.client_delta(cid))

    def report(self, rounds: int) -> dict[str, Any] | None:
        """``final.privacy`` of ``results.json`` after ``rounds`` rounds (None without DP)."""
        report: dict[str, Any] = {}
        if self.central is not None:
            report["central"] = self.central.report(rounds)
            if self.sampling_note:
                report["central"]["client_sampling"] = self.sampling_note
        if self.client is not None:
            ids = sorted(self.client.steps_by_size)
            per_client = {cid: self.client_epsilon(cid) for cid in ids if self.client.steps(cid)}
            report["client"] = {
                "epsilon": max(per_client.values(), default=0.0),
                **self.client_settings,
                "accountant": "rdp",
                "per_client": per_client,
            }
        return report or None


class MetricsExport(Callback):
    """Round, accuracy, loss, per-client trust and rejections to a ``MetricsExporter``; with
    ``textfile``, also ``metrics.prom`` (node_exporter's textfile collector) after each round;
    with ``per_client_rejections``, rejections are counted per client too."""

    def __init__(
        self, exporter: Any, textfile: Path | None = None, per_client_rejections: bool = False
    ):
        self.exporter, self.textfile = exporter, textfile
        self.per_client = per_client_rejections

    def on_run_begin(self, logs: dict[str, Any]) -> None:
        policy = self.driver.coordinator.trust.policy
        if policy.flag_rule == "evidence":
            self.exporter.set_flag_line(policy.flag_z)

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        outcome = self.driver.outcome
        # Also the clients trust changed without a scored row: a flag by association changes
        # in rounds a client sat out, and a rejected client's trust falls.
        rows = [state.to_dict() for state in outcome.unscored]
        rows += [row.to_dict() for row in outcome.clients]
        self.exporter.observe_round(round, logs["accuracy"], logs["loss"], logs["duration_s"], rows)
        for r in outcome.rejected:
            if self.per_client:
                self.exporter.count_rejected(r.reason, client_id=r.client_id)
            else:
                self.exporter.count_rejected(r.reason)
        if self.textfile is not None:
            self.exporter.write_textfile(self.textfile)


class Checkpoint(Callback):
    """After every round: the checkpoint (everything a restart needs), then ``results.json``.

    Args:
      state_dir: where the checkpoint files go.
      results_path: where ``results.json`` goes.
      info: what ``results.json`` says about the run besides its rounds.
      privacy: the run's :class:`PrivacyAccount` (its report is ``final.privacy``; its DP-SGD
        account is checkpointed as ``dp_sgd``), or None.
      shapes: the model's weight shapes, checked on resume.

    A directory that cannot be written stops the run with a one-line ``UsageError``.
    """

    def __init__(
        self,
        state_dir: Path,
        results_path: Path,
        info: RunInfo,
        privacy: PrivacyAccount | None = None,
        shapes: Any = None,
    ):
        self.state_dir, self.results_path, self.info = state_dir, results_path, info
        self.privacy, self.shapes = privacy, shapes

    def results(self) -> dict[str, Any]:
        history = self.driver.history
        report = self.privacy.report(len(history.rounds)) if self.privacy else None
        return results(self.info, history, self.driver.coordinator, report)

    def write_results(self) -> None:
        checkpoint.write_json_atomic(self.results_path, self.results())

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        payload = {
            "coordinator": self.driver.coordinator.state_dict(),
            "layout": self.shapes,
            "config": self.info.config,
            **self.driver.history.state_dict(),
            **({} if self.privacy is None else {"dp_sgd": self.privacy.client}),
        }
        try:
            checkpoint.save(self.state_dir, round, payload)
            faults.point("results", round)
            self.write_results()
        except OSError as exc:
            raise unwritable(self.state_dir, round, exc) from None


class Pause(Callback):
    """Holds before a round while ``pause_file`` exists (unless it names a later round).

    Empty, the file holds before the next round; holding a number N, before round N. The hold
    ends when the file goes or the run is asked to stop.
    """

    def __init__(self, pause_file: Path, poll_s: float = 0.5):
        self.pause_file, self.poll_s = pause_file, poll_s

    def held(self, round: int) -> bool:
        try:
            text = self.pause_file.read_text().strip()
        except FileNotFoundError:
            return False
        return not (text.isdigit() and int(text) > round)

    def on_round_begin(self, round: int, logs: dict[str, Any]) -> None:
        announced = False
        while self.held(round) and not self.driver.stopping:
            if not announced:
                print(f"round {round}: held by {self.pause_file}; delete it to continue",
                      flush=True)  # fmt: skip
                announced = True
            time.sleep(self.poll_s)


class Reports(Callback):
    """The files people read, the same for a simulation and a deployment: ``rounds.csv`` after
    every round, ``accuracy.png`` and ``trust.png`` (trust per client per round, ``malicious``
    marked) when the run ends.

    Args:
      out: the run's directory.
      title: the accuracy plot's title.
      label: the accuracy line's label (the aggregator).
      malicious: the known malicious clients (simulations; a deployment knows none).
    """

    def __init__(
        self, out: Path, title: str, label: str, malicious: set[str] | frozenset[str] = frozenset()
    ):
        self.out, self.title, self.label, self.malicious = Path(out), title, label, set(malicious)

    def on_round_end(self, round: int, logs: dict[str, Any]) -> None:
        report.write_rounds_csv(self.driver.history.rounds, self.out / "rounds.csv")

    def on_run_end(self, logs: dict[str, Any]) -> None:
        history = self.driver.history
        if not history.rounds:
            return
        report.write_rounds_csv(history.rounds, self.out / "rounds.csv")
        report.plot_accuracy({self.label: history.rounds}, self.out / "accuracy.png", self.title)
        report.plot_trust_heatmap(history.trust, self.malicious, self.out / "trust.png")
