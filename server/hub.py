"""The meeting point of gRPC threads and the round loop: sessions, the current task, its updates.

The servicer (``server/service.py``) calls ``register``, ``heartbeat``, ``wait_task`` and
``submit`` from gRPC worker threads; the round loop (``server/serve.py``) calls ``live_clients``,
``publish``, ``collect`` and ``finish``. Everything is guarded by one condition variable, and
every wait has a deadline. No round logic lives here: the loop hands what ``collect`` returns to
``Coordinator.finish_round``; or, under a round memory budget, it publishes the attempt with the
round's ``RoundIntake`` (``Coordinator.open_round``), ``submit`` hands each update to it as it
arrives (admitted into the round's matrix, spilled when over the budget) and keeps only its
receipt: no update's values outlive the gRPC call that delivered them.

A task is one attempt at a round, named ``{instance}-{round}-{attempt}``: a coordinator that
restarts, or re-runs a round whose attempt timed out, publishes a new task id, and updates for
any other task id are late (dropped and counted, not charged to trust).

Silence: a session is offered for selection only while it is heard from (a poll, a heartbeat)
within ``liveness_s``; with ``poll_to_select`` (open mode, where anyone can register any number
of ids) only once it has asked for a task: a registration alone is not an agent.
``collect`` closes a round as soon as ``target`` selected clients answered (the round loop
selects more than it needs), or as soon as every selected client either answered or went quiet.
A selected client that did not answer an attempt that ran to its end (or whose session died) is
*silent*; silence is counted per client, apart from malice: it does not change trust. After
``max_silences`` silent attempts in a row a client is benched, not selected, for
``bench_rounds`` rounds; ``take_silence`` hands the round's silent clients to the ledger.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedwarden.records import ClientRound
from fedwarden.server.admission import ClientUpdate, RoundIntake, receipt
from fedwarden.server.trust import TrustBook, round_record

SILENT = "silent"
"""The ledger's ``rejected_reason`` of a round a selected client did not answer."""


@dataclass(frozen=True)
class Task:
    task_id: str
    round: int
    selected: frozenset[str]
    payload: bytes  # the global weights, float32 little-endian
    sha256: str


@dataclass
class _Session:
    session_id: str
    last_seen: float
    polling: int = 0  # GetTask calls in progress (a waiting agent is alive)
    told_done: bool = False
    polled: bool = False  # asked for a task at least once: an agent, not a bare registration


@dataclass
class Collected:
    updates: list[ClientUpdate]  # as they arrived; only their receipts when there is an intake
    answered: set[str] = field(default_factory=set)  # selected clients that submitted
    target: int = 0  # answers that close the attempt at once
    intake: RoundIntake | None = None  # where updates go as they arrive (a memory budget)


class UnknownSession(LookupError):
    """The session id is not (or no longer) known: the agent must register again."""


class Hub:
    """Thread-safe state shared by the servicer and the round loop.

    Args:
        total_rounds: rounds of the run (reported to agents).
        liveness_s: a session not heard from for this long is not offered for selection.
        heartbeat_interval_s: what agents are told to use.
        clock: monotonic seconds (tests pass a fake).
        max_silences: silent attempts in a row after which a client is benched.
        bench_rounds: rounds a benched client is not selected for.
        poll_to_select: offer a session for selection only once it asked for a task.
    """

    def __init__(
        self,
        total_rounds: int,
        *,
        liveness_s: float = 10.0,
        heartbeat_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_silences: int = 3,
        bench_rounds: int = 5,
        poll_to_select: bool = False,
    ):
        self.instance = secrets.token_hex(4)
        self.total_rounds = total_rounds
        self.liveness_s = liveness_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.max_silences = max_silences
        self.bench_rounds = bench_rounds
        self.poll_to_select = poll_to_select
        self.last_round = 0
        self.done = False
        self.late = 0
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._task: Task | None = None
        self._collected: Collected | None = None
        self.on_late: Callable[[str, str], None] = lambda client_id, task_id: None
        self.silences: dict[str, int] = {}  # per client, since the coordinator started
        self._silent_in_a_row: dict[str, int] = {}
        self._benched_until: dict[str, int] = {}  # client -> last round it sits out
        self._silent_this_round: set[str] = set()

    # -- servicer side ---------------------------------------------------------------------------

    def register(self, client_id: str) -> str:
        """Opens (or replaces) the client's session; returns the new session id."""
        with self._cond:
            session = _Session(secrets.token_hex(8), self.clock())
            self._sessions[client_id] = session
            self._cond.notify_all()
            return session.session_id

    def _session(self, client_id: str, session_id: str) -> _Session:
        session = self._sessions.get(client_id)
        if session is None or not secrets.compare_digest(session.session_id, session_id):
            raise UnknownSession(f"unknown session for {client_id}; register again")
        session.last_seen = self.clock()
        return session

    def heartbeat(self, client_id: str, session_id: str) -> None:
        with self._cond:
            session = self._session(client_id, session_id)
            if self.done:
                session.told_done = True

    def wait_task(
        self,
        client_id: str,
        session_id: str,
        last_task_id: str,
        timeout: float,
        gone: Callable[[], bool] = lambda: False,
    ) -> Task | str | None:
        """Blocks up to ``timeout`` s for a task for this client other than ``last_task_id``.

        Returns the Task, ``"done"`` when training is over, or None when the wait ran out or
        ``gone()`` turned true (the caller hung up: its thread is freed within a second).
        """
        deadline = self.clock() + max(0.0, timeout)
        with self._cond:
            session = self._session(client_id, session_id)
            session.polling += 1
            session.polled = True
            try:
                while True:
                    if self.done:
                        session.told_done = True
                        return "done"
                    task = self._task
                    if (
                        task is not None
                        and client_id in task.selected
                        and task.task_id != last_task_id
                        and client_id not in self._collected.answered
                    ):
                        return task
                    remaining = deadline - self.clock()
                    if remaining <= 0 or gone():
                        return None
                    self._cond.wait(min(remaining, 1.0))
            finally:
                session.polling -= 1
                session.last_seen = self.clock()

    def check_session(self, client_id: str, session_id: str) -> None:
        with self._cond:
            self._session(client_id, session_id)

    def submit(self, client_id: str, session_id: str, task_id: str, update: ClientUpdate) -> str:
        """Hands in an update: ``"accepted"`` for the open task, ``"late"`` otherwise.

        Admission (round, selection, duplicates, shape, dtype, finiteness) happens when the
        round closes, so every problem gets its reason and its trust charge in one place; or,
        when the attempt was published with an intake, here, in arrival order (the same order
        the round would admit them in), under the lock so that ``collect`` closes the intake
        only between two updates.
        """
        with self._cond:
            self._session(client_id, session_id)
            task, collected = self._task, self._collected
            if task is None or collected is None or task_id != task.task_id:
                self.late += 1
                late = True
            else:
                late = False
                if client_id in collected.answered or any(
                    u.client_id == client_id for u in collected.updates
                ):
                    # keep the evidence of a duplicate, not its payload
                    update = ClientUpdate(
                        client_id,
                        update.round,
                        np.zeros(0, np.float32),
                        update.num_examples,
                        update.loss,
                    )
                if collected.intake is not None:
                    collected.intake.add(update)  # its rejection, if any, counts at the round
                    update = receipt(update)
                collected.updates.append(update)
                if client_id in task.selected:
                    collected.answered.add(client_id)
                self._cond.notify_all()
        if late:
            self.on_late(client_id, task_id)
            return "late"
        return "accepted"

    # -- round-loop side -------------------------------------------------------------------------

    def _alive(self, client_id: str, now: float) -> bool:
        s = self._sessions.get(client_id)
        return s is not None and (s.polling > 0 or now - s.last_seen <= self.liveness_s)

    def live_clients(self) -> list[str]:
        """Clients to select from: a session heard from within ``liveness_s`` (or polling right
        now) that is not benched for silence (and, with ``poll_to_select``, asked for a task).
        Sessions silent for ten times ``liveness_s`` are forgotten (register again)."""
        with self._cond:
            now = self.clock()
            for c in [c for c, s in self._sessions.items()
                      if s.polling == 0 and now - s.last_seen > 10 * self.liveness_s]:  # fmt: skip
                del self._sessions[c]
            return sorted(
                c
                for c, s in self._sessions.items()
                if (s.polled or not self.poll_to_select)
                and self._alive(c, now)
                and not self.benched(c)
            )

    def benched(self, client_id: str) -> bool:
        """True while the client sits out rounds for repeated silence."""
        return self.last_round < self._benched_until.get(client_id, -1)

    def benched_clients(self) -> list[str]:
        with self._cond:
            return sorted(c for c in self._benched_until if self.benched(c))

    def wait_for_clients(self, n: int, timeout: float) -> list[str]:
        """Waits up to ``timeout`` s for at least ``n`` live clients; returns the live ones."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                live = self.live_clients()
                if len(live) >= n or self.clock() >= deadline:
                    return live
                self._cond.wait(min(deadline - self.clock(), 0.5))

    def publish(
        self,
        round: int,
        attempt: int,
        selected: list[str],
        payload: bytes,
        sha256: str,
        target: int | None = None,
        intake: RoundIntake | None = None,
    ) -> Task:
        """Opens an attempt at ``round`` for ``selected``; ``target`` answers close it at once
        (default: every selected client). With ``intake`` (``Coordinator.open_round``), each
        update goes into it as it arrives and ``collect`` returns receipts only."""
        with self._cond:
            task = Task(
                f"{self.instance}-{round}-{attempt}", round, frozenset(selected), payload, sha256
            )
            target = len(selected) if target is None else min(target, len(selected))
            self._task = task
            self._collected = Collected([], target=target, intake=intake)
            self._cond.notify_all()
            return task

    def collect(
        self, min_updates: int, deadline: float, stop: Callable[[], bool] = lambda: False
    ) -> tuple[list[ClientUpdate], bool]:
        """Waits until the attempt's target of selected clients answered, every selected client
        answered or went quiet, or ``deadline`` passes; closes the task and counts the silent.

        Returns ``(updates, complete)``: ``complete`` is False when the attempt ended with
        fewer than ``min_updates`` answers (or ``stop()`` turned true): abandon the attempt.
        With an intake, ``updates`` are receipts (the values are in the intake's matrix).
        """
        with self._cond:
            task, collected = self._task, self._collected
            assert task is not None and collected is not None, "collect() before publish()"
            while True:
                answered = collected.answered
                if len(answered) >= collected.target:
                    complete, silent = True, set()  # the others were spares, not silent
                    break
                if stop():
                    complete, silent = False, set()
                    break
                now = self.clock()
                awaited = {c for c in task.selected - answered if self._alive(c, now)}
                if now >= deadline or not awaited:
                    complete, silent = len(answered) >= min_updates, task.selected - answered
                    break
                self._cond.wait(min(deadline - now, 0.5))
            for c in answered:
                self._silent_in_a_row.pop(c, None)
            for c in silent:
                self.silences[c] = self.silences.get(c, 0) + 1
                self._silent_in_a_row[c] = self._silent_in_a_row.get(c, 0) + 1
                if self._silent_in_a_row[c] >= self.max_silences:
                    self._benched_until[c] = self.last_round + self.bench_rounds
            self._silent_this_round = (self._silent_this_round | silent) - answered
            self._task = self._collected = None
            self._cond.notify_all()
            return collected.updates, complete

    def take_silence(self) -> dict[str, int]:
        """The clients silent in the current round (in an attempt, and not answering a later
        one), each with its count of silent attempts so far; clears the round's record."""
        with self._cond:
            silent = {c: self.silences[c] for c in sorted(self._silent_this_round)}
            self._silent_this_round = set()
            return silent

    def finish(self) -> None:
        """Training is over: every poll answers DONE from now on."""
        with self._cond:
            self.done = True
            self._task = self._collected = None
            self._cond.notify_all()

    def wait_told_done(self, timeout: float) -> bool:
        """Waits until every live session has been told DONE (True) or ``timeout`` passes."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                now = self.clock()
                pending = [
                    c
                    for c, s in self._sessions.items()
                    if not s.told_done and (s.polling > 0 or now - s.last_seen <= self.liveness_s)
                ]
                if not pending:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(deadline - now, 0.5))

    def set_last_round(self, round: int) -> None:
        with self._cond:
            self.last_round = round


def record_silence(trust: TrustBook, round: int, silent: dict[str, int]) -> None:
    """Writes a ``silent`` row for each silent client of ``round`` to the trust ledger, with the
    client's whole trust state unchanged (silence is not evidence of malice; a coordinator
    restarted after the round resumes the client's evidence from this row)."""
    if trust.ledger is None or not silent:
        return
    states = {cid: trust.get(cid) for cid in silent}
    rows = [
        ClientRound(cid, round=round, rejected_reason=SILENT)
        if state is None
        else round_record(state, round, rejected_reason=SILENT)
        for cid, state in states.items()
    ]
    trust.ledger.record_round(round, rows)


def client_rows(trust: TrustBook, silences: dict[str, int]) -> list[dict]:
    """Every known client's standing (its ``ClientSummary`` fields) and silence count, for the
    metrics exporter: a client whose updates are rejected, or who never answers, is exported
    like any other."""
    rows = {cid: s.to_dict() for cid, s in trust.snapshot().items()}
    for cid, n in silences.items():
        rows.setdefault(cid, {"client_id": cid})["silent"] = n
    return list(rows.values())
