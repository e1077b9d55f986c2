"""The meeting point of gRPC threads and the round loop: sessions, the current task, its updates.

The servicer (``server/service.py``) calls ``register``, ``heartbeat``, ``wait_task`` and
``submit`` from gRPC worker threads; the round loop (``server/serve.py``) calls ``live_clients``,
``publish``, ``collect`` and ``finish``. Everything is guarded by one condition variable, and
every wait has a deadline. No round logic lives here: the loop hands what ``collect`` returns to
``Coordinator.finish_round``.

A task is one attempt at a round, named ``{instance}-{round}-{attempt}``: a coordinator that
restarts, or re-runs a round whose attempt timed out, publishes a new task id, and updates for
any other task id are late (dropped and counted, not charged to trust).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedwarden.server.admission import ClientUpdate


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


@dataclass
class Collected:
    updates: list[ClientUpdate]
    answered: set[str] = field(default_factory=set)  # selected clients that submitted


class UnknownSession(LookupError):
    """The session id is not (or no longer) known: the agent must register again."""


class Hub:
    """Thread-safe state shared by the servicer and the round loop.

    Args:
        total_rounds: rounds of the run (reported to agents).
        liveness_s: a session not heard from for this long is not offered for selection.
        heartbeat_interval_s: what agents are told to use.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        total_rounds: int,
        *,
        liveness_s: float = 10.0,
        heartbeat_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.instance = secrets.token_hex(4)
        self.total_rounds = total_rounds
        self.liveness_s = liveness_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.last_round = 0
        self.done = False
        self.late = 0
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._task: Task | None = None
        self._collected: Collected | None = None
        self.on_late: Callable[[str, str], None] = lambda client_id, task_id: None

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
        round closes, so every problem gets its reason and its trust charge in one place.
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
                collected.updates.append(update)
                if client_id in task.selected:
                    collected.answered.add(client_id)
                self._cond.notify_all()
        if late:
            self.on_late(client_id, task_id)
            return "late"
        return "accepted"

    # -- round-loop side -------------------------------------------------------------------------

    def live_clients(self) -> list[str]:
        """Clients with a session heard from within ``liveness_s`` (or polling right now)."""
        with self._cond:
            now = self.clock()
            return sorted(
                c
                for c, s in self._sessions.items()
                if s.polling > 0 or now - s.last_seen <= self.liveness_s
            )

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
        self, round: int, attempt: int, selected: list[str], payload: bytes, sha256: str
    ) -> Task:
        with self._cond:
            task = Task(
                f"{self.instance}-{round}-{attempt}", round, frozenset(selected), payload, sha256
            )
            self._task, self._collected = task, Collected([])
            self._cond.notify_all()
            return task

    def collect(
        self, min_updates: int, deadline: float, stop: Callable[[], bool] = lambda: False
    ) -> tuple[list[ClientUpdate], bool]:
        """Waits until every selected client answered, or ``deadline`` passes; closes the task.

        Returns ``(updates, complete)``: ``complete`` is False when the deadline passed with
        fewer than ``min_updates`` answers (or ``stop()`` turned true): abandon the attempt.
        """
        with self._cond:
            task, collected = self._task, self._collected
            assert task is not None and collected is not None, "collect() before publish()"
            while True:
                answered = len(collected.answered)
                if answered == len(task.selected):
                    complete = True
                    break
                if stop():
                    complete = False
                    break
                remaining = deadline - self.clock()
                if remaining <= 0:
                    complete = answered >= min_updates
                    break
                self._cond.wait(min(remaining, 0.5))
            self._task = self._collected = None
            self._cond.notify_all()
            return collected.updates, complete

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
