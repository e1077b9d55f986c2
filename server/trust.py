"""Per-client trust: an exponentially weighted average of good behaviour, with flags and quarantine.

After each round, for every client that took part::

    trust_t = decay * trust_{t-1} + (1 - decay) * (1 - anomaly_t)

where ``anomaly_t`` is the client's anomaly score (``aggregation/scoring.py``) and a rejected
update counts as anomaly 1.0. Clients not selected keep their trust.

Flags come from evidence (``flag_rule="evidence"``, the default). Each round's anomaly scores
join a pool of the last ``window_rounds`` rounds of every client's scores, and a client's score
becomes a z-score against that population: ``z = (anomaly - median) / scale``, the median and
scale (1.4826 MAD, at least ``min_scale``) of the pooled scores below :data:`POOL_CEILING`
(all of them when those are not most of the pool), which attackers move little. Each
client accumulates its own z-scores over the rounds it took part in, older ones weighted down
by ``evidence_memory`` per round seen::

    S = memory * S + z        Q = memory**2 * Q + 1        (W = 1 + memory + memory**2 + ...)
    evidence = min(S / sqrt(Q), gain(K) * S / W)

For a client whose scores are drawn from the population, ``S / sqrt(Q)`` is a standard score
whatever the number of rounds it was seen: a client sampled once is judged on that one round,
and one sampled ten times needs a smaller excess per round to reach the same evidence. But an
honest client's rounds are not independent draws: the data that puts it off-centre is there every
round (the intraclass correlation of honest clients' z-scores measured 0.34 to 0.55 where every
client takes part in every round, 0.16 to 0.27 with 10 of 50 sampled), and correlated rounds are
worth at most about 1 / correlation independent ones. So the evidence is capped at what
``evidence_rounds`` (K, default 3) rounds at the client's weighted mean z (``S / W``) would give:
``gain(K)``, 1.61 at memory 0.6, against 2 for an unlimited number of rounds. A client's first K
rounds are judged exactly as independent draws (where sampled attackers are caught); after them a
steady moderate excess, a trait of the client's data, stops adding up to a flag (a z of 2.3 every
round reached 4.6 and was flagged for 16 rounds in a row on digits at Dirichlet 0.1).

A client is flagged when its evidence exceeds the flag line set by the configured
``false_positive_rate`` (:attr:`TrustPolicy.flag_z`: the Laplace quantile, 4.98 at the default
0.003, since honest anomaly scores have exponential upper tails), and unflagged when it falls
``unflag_margin`` below that line. Each z is clipped to ``[-z_floor, z_cap]``: banked good rounds
cannot hide a later attack for long, and one round can flag but not convict for ever. The rate
is nominal; docs/results.md has the measured rates (Dirichlet 0.1, 0.5, iid).

Flags by association (``association_z``, 2.5 by default; 0 turns it off): after each round the
coordinator's history (``aggregation/detection.py``, ``HistoryForecast.association``) measures how
closely every client's past deviations follow those of the clients flagged on their own evidence,
as a robust z among the clients not flagged (0 below a mean cosine of 0.2 to them,
``detection.ASSOCIATION_MIN_KINSHIP``: a client that merely stands above others deviating the
other way does not deviate alike). A client at ``association_z`` or above is flagged too, whether
or not it took part in the round, and unflagged when it falls ``unflag_margin`` below; its own
evidence, once over the line, takes the flag over. Attackers poisoned alike (label noise, a
backdoor, DBA's trigger pieces) look ordinary round by round but keep deviating the same way, so
once two of them are flagged the others are found, also those sampled only before the flags
came. Clients near the line (``CORROBORATION_SHARE`` of it) that deviate alike corroborate one
another: three or more near or over it, and each near one is flagged by its association with the
others (DBA's attackers collect evidence slowly, together); the other clients' association with
them and the clients flagged on their own (one at least) counts at a line
``CORROBORATED_ASSOCIATION_MARGIN`` higher.
A flag that changes in a round the client sat out is written as a row of its own, marked
``absent`` (no measurements; it does not count as a round the client took part in).

Copies (the mimic attack): a client whose update other clients sent too scores as a colluder
with them, and in the round nothing tells the copied client from its copiers. Each client's
evidence keeps apart the part its copies made (the z-score against the score had the update
been its own, ``scoring.anomaly_as_original``). Copiers copy whenever they are sampled; the copied
client sends updates of its own in other rounds. Once it has sent one (one no other client sent,
that leaves its evidence apart from copies under the flag line), the detector's ``CopyGroups``
names it the original of the groups it was in, and the book takes the copies' part back and
judges its flag again against the line (no hysteresis: a recount, not a new round).

Trust itself is still the exponentially weighted average above (what dashboards plot); the
evidence is that same deviation from the population, standardised by how much of it there is.
``flag_rule="threshold"`` restores the fixed line: flagged below ``flag_below``, unflagged above
``unflag_above`` (hysteresis).

Every flagged client carries an ``explanation``: the signals the score weighs
(``scoring.anomaly_components``) with the largest part in its evidence, their accumulated excess
over the population's median times their share of the score (``scoring.component_parts``),
e.g. ``"evidence 5.1 over 2 rounds: collusion 1.00 (typical 0.01; same update as c12, c27),
centrality 0.93 (typical 0.02)"`` (a colluder names the clients it sent the same update as,
``copies``, and a member of a boosted group the others of the round's group).

A flagged client is quarantined according to the policy:

- ``"none"``: flagged only (reported, weight unchanged).
- ``"downweight"``: still selected, its aggregation weight multiplied by ``downweight``.
- ``"exclude"``: not selected for ``probation_rounds`` rounds; then it may be selected again
  (on probation) and its updates are scored, so it can earn its way back, but aggregated with
  weight 0 while it is flagged (under ``"threshold"``: until its trust rises above
  ``unflag_above``; under ``"evidence"``: until its evidence falls below the unflag line, one or
  two ordinary updates after a single flagged round). A probation round that lowers its trust
  starts a new exclusion period.

Example::

    book = TrustBook(TrustPolicy(quarantine="exclude"), ledger=Ledger("runs/x/ledger.sqlite"))
    cohort = [c for c in candidates if not book.is_excluded(c)]
    ...
    states = book.update(round, ids, anomaly_score(metrics), rejected={}, metrics=metrics)
    weights = weights * [book.weight_multiplier(c) for c in ids]
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from fedwarden.aggregation.scoring import DEFAULT_ANOMALY_WEIGHTS, component_parts
from fedwarden.config import FLAG_RULES, QUARANTINE_POLICIES, TrustConfig
from fedwarden.records import VERDICT_KEYS, ClientRound, ClientSummary, optional_float

if TYPE_CHECKING:
    from fedwarden.aggregation.detection import Association, CopyGroups
    from fedwarden.server.ledger import Ledger

_MAD_TO_SIGMA = 1.4826
# A Laplace(b) has MAD b ln 2, so its scale in our units (1.4826 MAD) is 1.4826 ln 2 b = 1.0277 b.
_LAPLACE_SCALE = _MAD_TO_SIGMA * math.log(2.0)
_SETTINGS = TrustConfig()  # the configured defaults

POOL_CEILING = 0.5
"""Anomaly scores at or above this do not shape the population (its median, scale and typical
signals), as rejected updates do not, unless they are most of the pool: they are answers (a
sharp component sets the score from 0.5, ``scoring.SHARP_FLOOR``), not samples of what clients
typically score. With them, 40% attackers sending one vector made 45% of the pool 1.0
(Fashion-MNIST, ALIE, seed 2): its median rose to 0.25 and its scale to 0.31, a 1.0 was a z of
2.4, and 8 of 18 attackers were never flagged. Honest scores reached 0.3 in 39 of 9,320 honest
client-rounds of the twelfth pass's live grid: 38 of mimic's copied victims at 1.0, one 0.31. When
most of the pool is at the ceiling the scores moved, not a few clients: under a plain mean
broken by Gaussian noise every update of the next round scored 1.0, and leaving them out
flagged and excluded every honest client (digits, ``tests/test_scenarios.py``)."""

CORROBORATION_SHARE = 0.5
"""Clients whose evidence has reached this share of the flag line (2.5 of 4.98) and whose
updates deviate alike corroborate one another: each is flagged by its association with the others
near or over the line. Attackers poisoned alike collect evidence slowly but together: under DBA on
Fashion-MNIST (Dirichlet 0.5) nothing was flagged before round 9 or 10 in seeds 12 and 19, while
three or four attackers stood at 3-4.9 from round 8. Live (docs/results.md, "Corroboration"):
DBA's recall by round 10 274 -> 300 of 363 attackers over 40 seeds, the backdoor's 262 -> 266 of
274 over 30, and no honest client-round flagged more, with or without attack; 0.5 is the lowest
share that flagged none more over the earlier passes' ledgers. Corroborated clients are not
counted among the flagged ones that every other client's association is measured against at
the association line: counted (at 0.6), they found 4 DBA attackers more and drew in 11 honest
clients over 70 runs, and the backdoor's precision fell to 0.949 on seeds 30-39; they count at a
line ``CORROBORATED_ASSOCIATION_MARGIN`` higher. It takes three clients: ``association``
measures one against at least two others."""

CORROBORATED_ASSOCIATION_MARGIN = 0.75
"""How much higher the association line is for a client whose association counts the
corroborated clients with those flagged on their own evidence (when at least one is). DBA's
attackers are often found only by corroboration (one flagged on its own by round 10, or none),
and those sampled before any stood near the line stayed unflagged at associations of 3.3-4.5
with the corroborated ones. Replayed over 935 ledgers (every attack and no attack, seeds 0-9 and
60-89): DBA 313 -> 322 of 354 attackers by round 10, the backdoor 342 -> 344, Min-Sum 86 -> 87
of 87 (seeds 80-89), and one honest client-round more, for one round (random directions, through
an honest client that corroboration itself had flagged); at 0.5 one backdoor attacker more, at
0.3 and 0 three and five honest client-rounds more, and the twenty-fourth pass's honest clients
drawn in through corroborated ones stood at 2.5-3.0. Without a client flagged on its own, three
honest clients holding one class that corroborated one another at Dirichlet 0.1 (seed 88) drew
two more look-alikes in (docs/history/detection.md, "Association through corroborated
clients")."""


@dataclass
class TrustPolicy:
    """How trust moves and what happens to clients that lose it.

    Args:
        decay: EWMA weight of the history, in [0, 1); higher is slower to react and to forgive.
        flag_below: a client whose trust drops below this is flagged.
        unflag_above: a flagged client is unflagged (and released) once its trust rises above
            this; must exceed ``flag_below`` (hysteresis).
        quarantine: ``"none"``, ``"exclude"`` or ``"downweight"`` (see the module docstring).
        downweight: weight multiplier of a quarantined client under ``"downweight"``, in [0, 1].
        probation_rounds: under ``"exclude"``, rounds a quarantined client is not selected
            before it may be sampled again on probation.
        initial_trust: trust of a client never seen before, in [0, 1].
        flag_rule: ``"evidence"`` (default) or ``"threshold"`` (see the module docstring).
        false_positive_rate: under ``"evidence"``, the nominal share of honest client-rounds
            flagged, in (0, 0.5); :attr:`flag_z` turns it into the flag line.
        unflag_margin: a flagged client is unflagged when its evidence falls this far below the
            flag line (hysteresis, in z units).
        evidence_memory: weight of a client's earlier rounds in its evidence, per round seen,
            in [0, 1).
        evidence_rounds: rounds of a steady excess that count as independent evidence, >= 1
            (see the module docstring; docs/history/detection.md "Honest clients seen every round").
        window_rounds: rounds of scores in the population pool.
        min_scale: smallest population scale of the anomaly score, so a very uniform honest
            cohort does not turn tiny differences into large z.
        z_floor, z_cap: one round's z is clipped to ``[-z_floor, z_cap]``.
        tail_quantile: when set, the population scale is at least
            ``(quantile(pool, q) - median) / z_q``: the spread of the pool's upper tail, which
            honest heterogeneity makes heavier than a normal's.
        association_z: under ``"evidence"``, a client not flagged on its own evidence is flagged
            when its history's association with the clients flagged on theirs reaches this z
            (``detection.HistoryForecast.association``), and unflagged when it falls
            ``unflag_margin`` below; 0 turns association off.
    """

    # the settings a run configures take their defaults from its trust section
    decay: float = _SETTINGS.decay
    flag_below: float = _SETTINGS.flag_below
    unflag_above: float = _SETTINGS.unflag_above
    quarantine: str = "none"  # a run's default depends on its chain: fedwarden/config.py
    downweight: float = _SETTINGS.quarantine_downweight
    probation_rounds: int = _SETTINGS.probation_rounds
    initial_trust: float = 1.0
    flag_rule: str = _SETTINGS.flag_rule
    false_positive_rate: float = _SETTINGS.false_positive_rate
    unflag_margin: float = 1.0
    evidence_memory: float = 0.6
    evidence_rounds: int = _SETTINGS.evidence_rounds
    window_rounds: int = 10
    min_scale: float = 0.03
    z_floor: float = 2.0
    z_cap: float = 8.0
    tail_quantile: float | None = None
    association_z: float = _SETTINGS.association_z

    @property
    def flag_z(self) -> float:
        """The evidence above which a client is flagged: the ``1 - false_positive_rate`` quantile
        of a Laplace distribution in the same robust units, ``ln(0.5 / rate) / 1.0277``.

        Honest clients' anomaly scores have exponential, not normal, upper tails (skewed data
        and one-off outlying rounds), so the normal quantile would flag several times the
        stated rate; the Laplace line is 4.5 at 0.005 where the normal one is 2.6.
        """
        return math.log(0.5 / self.false_positive_rate) / _LAPLACE_SCALE

    def __post_init__(self) -> None:
        if self.flag_rule not in FLAG_RULES:
            raise ValueError(
                f"flag_rule must be one of {', '.join(FLAG_RULES)}. "
                f"Received: flag_rule={self.flag_rule!r}."
            )
        if not 0.0 < self.false_positive_rate < 0.5:
            raise ValueError(
                "false_positive_rate must be in (0, 0.5), e.g. 0.01. "
                f"Received: false_positive_rate={self.false_positive_rate!r}."
            )
        if not 0.0 <= self.evidence_memory < 1.0:
            raise ValueError(
                f"evidence_memory must be in [0, 1). Received: {self.evidence_memory!r}."
            )
        if (
            isinstance(self.evidence_rounds, bool)
            or not isinstance(self.evidence_rounds, int)
            or self.evidence_rounds < 1
        ):
            raise ValueError(
                f"evidence_rounds must be an integer >= 1. Received: {self.evidence_rounds!r}."
            )
        for name in ("unflag_margin", "min_scale", "z_floor", "z_cap", "association_z"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0. Received: {name}={value!r}.")
        if (
            isinstance(self.window_rounds, bool)
            or not isinstance(self.window_rounds, int)
            or (self.window_rounds < 1)
        ):
            raise ValueError(
                f"window_rounds must be an integer >= 1. Received: {self.window_rounds!r}."
            )
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(
                f"trust decay must be in [0, 1) (the EWMA weight of history). "
                f"Received: decay={self.decay!r}."
            )
        if not 0.0 <= self.flag_below < 1.0:
            raise ValueError(
                f"flag_below must be in [0, 1). Received: flag_below={self.flag_below!r}."
            )
        if not self.flag_below < self.unflag_above < 1.0:
            raise ValueError(
                "unflag_above must be above flag_below (hysteresis) and below 1. Received: "
                f"flag_below={self.flag_below!r}, unflag_above={self.unflag_above!r}."
            )
        if self.quarantine not in QUARANTINE_POLICIES:
            raise ValueError(
                f"quarantine must be one of {', '.join(QUARANTINE_POLICIES)}. "
                f"Received: quarantine={self.quarantine!r}."
            )
        if not 0.0 <= self.downweight <= 1.0:
            raise ValueError(
                f"downweight must be in [0, 1]. Received: downweight={self.downweight!r}."
            )
        if isinstance(self.probation_rounds, bool) or not isinstance(self.probation_rounds, int):
            raise ValueError(
                f"probation_rounds must be an integer. Received: {self.probation_rounds!r}."
            )
        if self.probation_rounds < 0:
            raise ValueError(f"probation_rounds must be >= 0. Received: {self.probation_rounds}.")
        if not 0.0 <= self.initial_trust <= 1.0:
            raise ValueError(
                f"initial_trust must be in [0, 1]. Received: initial_trust={self.initial_trust!r}."
            )


@dataclass(frozen=True)
class EvidenceSums:
    """The running sums behind a client's ``evidence``: ``S``, ``Q`` and each signal's weighted
    excess over the population. Its ``ClientSummary`` holds them as JSON (``evidence_state``),
    so a restarted coordinator resumes them from the ledger."""

    sum: float = 0.0
    sq: float = 0.0
    excess: dict[str, float] = field(default_factory=dict)
    associated: bool = False  # flagged for its association, not on its own evidence
    copied: float = 0.0  # the part of ``sum`` its copies made (``TrustBook.update``)

    @classmethod
    def of(cls, state: ClientSummary) -> EvidenceSums:
        """The sums a client's summary holds (zeros before its first round)."""
        sums = json.loads(state.evidence_state or "{}")
        return cls(
            float(sums.get("sum", 0.0)),
            float(sums.get("sq", 0.0)),
            dict(sums.get("excess", {})),
            bool(sums.get("associated", False)),
            float(sums.get("copied", 0.0)),
        )

    def evidence(self, memory: float, rounds: int) -> float:
        """``S / sqrt(Q)``, at most what ``rounds`` rounds at the weighted mean z ``S / W`` give.

        ``Q`` is the sum of the squared weights ``m**(2i)`` of the rounds seen, so it fixes their
        number and ``W``, the sum of the weights: ``m**n = sqrt(1 - Q (1 - m**2))``.
        """
        evidence = self.sum / math.sqrt(self.sq)
        if self.sum > 0 and memory > 0:
            decayed = math.sqrt(max(1.0 - self.sq * (1.0 - memory**2), 0.0))  # m**n
            weight = (1.0 - decayed) / (1.0 - memory)
            evidence = min(evidence, _gain(memory, rounds) * self.sum / weight)
        return evidence

    def to_json(self) -> str:
        sums = {"sum": self.sum, "sq": self.sq, "excess": self.excess}
        if self.associated:
            sums["associated"] = True
        if self.copied:
            sums["copied"] = self.copied
        return json.dumps(sums, sort_keys=True)


def _gain(memory: float, rounds: int) -> float:
    """What ``rounds`` rounds of the same z give over one: the sum of the weights 1, m, ...,
    m**(rounds-1) over the root of the sum of their squares."""
    weights = (1 - memory**rounds) / (1 - memory)
    squares = (1 - memory ** (2 * rounds)) / (1 - memory**2)
    return weights / math.sqrt(squares)


def last_signals(signals: str | None) -> dict[str, float]:
    """A round's anomaly components by name, from the records' ``signals`` (JSON, or None)."""
    return json.loads(signals or "{}")


def verdict(state: ClientSummary) -> dict[str, Any]:
    """Trust's verdict on a client after its latest round, as ``ClientRound`` fields: the
    summary's ``VERDICT_KEYS`` and, for a flagged client, ``signal_excess`` (each signal's
    accumulated excess over the population, which the exporter shows)."""
    excess = EvidenceSums.of(state).excess if state.flagged else {}
    return {**{key: getattr(state, key) for key in VERDICT_KEYS}, "signal_excess": excess}


def round_record(
    state: ClientSummary, round: int | None = None, **measurements: Any
) -> ClientRound:
    """The client's ``ClientRound`` of ``round``: trust's :func:`verdict` after it, and that
    round's ``measurements`` (``ClientRound`` fields; they take precedence)."""
    return ClientRound(state.client_id, round=round, **{**verdict(state), **measurements})


class TrustBook:
    """In-memory trust state of every client seen, persisted through an optional ledger.

    Args:
        policy: the trust policy.
        ledger: when given, each :meth:`update` records the round in it (one transaction), and
            construction loads the clients already in it (a restart; truncate the ledger to the
            checkpoint's round first).
    """

    def __init__(self, policy: TrustPolicy, ledger: Ledger | None = None):
        self.policy = policy
        self.ledger = ledger
        self._clients: dict[str, ClientSummary] = {}  # each client's standing after its round
        self._round = 0
        # the population pool: per round, every scored client's anomaly and signals
        self._pool: deque[tuple[np.ndarray, dict[str, np.ndarray]]] = deque(
            maxlen=policy.window_rounds
        )
        if ledger is not None:
            self._round = ledger.last_round()
            self._restore_pool(ledger)
            for row in ledger.list_clients():
                state = ClientSummary.from_row(row)
                if state.trust is None:
                    state = replace(state, trust=policy.initial_trust)
                self._clients[state.client_id] = state

    def _restore_pool(self, ledger: Ledger) -> None:
        rows = ledger.rows_since(self._round - self.policy.window_rounds)
        for r in sorted({row["round"] for row in rows}):
            scored = [
                row for row in rows
                if row["round"] == r and row["anomaly"] is not None
                and row["rejected_reason"] is None and not row.get("absent")
            ]  # fmt: skip
            signals = [last_signals(row.get("signals")) for row in scored]
            names = sorted({n for sig in signals for n in sig})
            self._pool.append((
                np.array([row["anomaly"] for row in scored], np.float64),
                {n: np.array([np.nan if sig.get(n) is None else sig[n] for sig in signals])
                 for n in names},
            ))  # fmt: skip

    @property
    def last_round(self) -> int:
        """The latest round passed to :meth:`update` (or loaded from the ledger), 0 if none."""
        return self._round

    def update(
        self,
        round: int,
        client_ids: list[str],
        anomaly: np.ndarray,
        rejected: dict[str, int] | None = None,
        *,
        metrics: dict[str, np.ndarray] | None = None,
        losses: np.ndarray | None = None,
        reasons: dict[str, str] | None = None,
        components: dict[str, np.ndarray] | None = None,
        association: Callable[[set[str]], Mapping[str, Association]] | None = None,
        copies: CopyGroups | None = None,
        alone: np.ndarray | None = None,
        as_original: np.ndarray | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, ClientSummary]:
        """Applies one round's anomaly scores; returns the new standing of every client touched.

        Args:
            round: the round number; must be larger than the last round applied.
            client_ids: the clients whose updates were admitted, aligned with ``anomaly``.
            anomaly: ``(K,)`` anomaly scores in [0, 1].
            rejected: client_id to the number of its updates rejected at admission this round;
                such a client's round counts as anomaly 1.0 (whether or not it is also in
                ``client_ids``).
            metrics: the round's ``client_metrics`` (aligned with ``client_ids``), recorded in
                the ledger and kept as the clients' latest norm and cosine.
            losses: ``(K,)`` reported losses, recorded in the ledger.
            reasons: client_id to the rejection reason, recorded in the ledger (default
                ``"rejected"``).
            components: the round's ``anomaly_components`` (aligned with ``client_ids``): the
                signals behind each score, kept for explanations and recorded in the ledger.
            association: the detector's measure of how each client's history sits with a set
                of clients' (``HistoryForecast.association``): under the evidence rule, clients
                near the ones flagged on their own evidence are flagged too, whether or not
                they took part in this round (those that did not get a row of their own in the
                ledger, marked ``absent``).
            copies: who sent the same update as whom (the detector's ``CopyGroups``, with
                this round already added). A client flagged for collusion names the clients it
                sent the same update as: under the mimic attack one of them is the honest client
                copied. With ``alone`` and ``as_original``, the book tells it which updates were
                the clients' own, and gives back to the clients it then finds to be originals
                the part of their evidence their copies made.
            alone: ``(K,)`` True where no other client of the round sent the same update. Such
                an update counts as the client's own (``CopyGroups.record_own``) when the
                client's evidence, less what copies made, stays under the flag line: a crafted
                vector an attacker sends alone in its cohort is caught, and does not count.
            as_original: ``(K,)`` the anomaly scores had no other client sent the same update
                (``scoring.anomaly_as_original``): each client's evidence keeps apart the part
                its copies made. A client found to be the original of every group of copies it
                was in (``CopyGroups.originals``) gets that part back, and its flag is judged
                again against the flag line. A client flagged on more than its copies' part (by
                association, or over the line without it) vouches for no group's copiers.
            weights: the anomaly weights ``anomaly`` was scored with (None: the scoring's
                defaults). A flag's explanation and its signals' excess count only the
                components they weigh, ranked by their part in the score
                (``scoring.component_parts``).
        """
        round = int(round)
        if round <= self._round:
            raise ValueError(
                f"rounds must increase: last round applied is {self._round}, received "
                f"round={round}. To replay rounds, truncate the ledger and build a new TrustBook."
            )
        client_ids = [str(c) for c in client_ids]
        anomaly = np.asarray(anomaly, np.float64).reshape(-1)
        if anomaly.shape != (len(client_ids),):
            raise ValueError(
                f"anomaly must have one score per client id, shape ({len(client_ids)},). "
                f"Received shape {anomaly.shape}."
            )
        if len(set(client_ids)) != len(client_ids):
            raise ValueError(f"client_ids must be unique. Received: {client_ids}.")
        if not np.all(np.isfinite(anomaly)) or np.any((anomaly < 0) | (anomaly > 1)):
            raise ValueError(f"anomaly scores must be finite and in [0, 1]. Received: {anomaly}.")
        rejected = {str(c): int(n) for c, n in (rejected or {}).items() if int(n) > 0}
        reasons = reasons or {}

        weights = DEFAULT_ANOMALY_WEIGHTS if weights is None else weights
        scores = dict(zip(client_ids, anomaly.tolist(), strict=True))
        for cid in rejected:
            scores[cid] = 1.0
        index = {cid: i for i, cid in enumerate(client_ids)}
        own_scores = anomaly if as_original is None else np.asarray(as_original, np.float64).ravel()
        components = {
            name: np.asarray(values, np.float64).reshape(-1) for name, values in
            (components or {}).items()
        }  # fmt: skip
        boosted = {
            cid for cid, v in zip(client_ids, components.get("boosted", ()), strict=False)
            if v == 1 and cid not in rejected
        }  # fmt: skip
        scored = [i for i, cid in enumerate(client_ids) if cid not in rejected]
        if scored:
            self._pool.append((anomaly[scored], {n: v[scored] for n, v in components.items()}))
        center, scale, typical = self._population()

        # members of groups of copies flagged by association coming into the round (only
        # :meth:`_associate` sets it, after the copies): a copy group this round can turn that
        # into evidence of its own, which the copies' part then explains away
        members = copies.members() if copies is not None else set()
        associated = {
            c for c in members if c in self._clients
            and EvidenceSums.of(self._clients[c]).associated
        }  # fmt: skip
        touched: dict[str, ClientSummary] = {}
        for cid, score in scores.items():
            state = self._clients.get(cid) or ClientSummary(cid, trust=self.policy.initial_trust)
            i = index.get(cid)
            signals = {} if i is None or cid in rejected else {
                n: float(v[i]) for n, v in components.items() if np.isfinite(v[i])
            }  # fmt: skip
            previous = state.trust
            score_alone = score if i is None or cid in rejected else float(own_scores[i])
            state = replace(
                state,
                **self._step(state, round, score, rejected.get(cid, 0)),
                **self._weigh(
                    state,
                    (score - center) / scale,
                    signals,
                    typical,
                    (score_alone - center) / scale,
                    weights,
                ),
            )
            rejection = reasons.get(cid, "rejected") if cid in rejected else None
            decided = self._decide(
                state, round, previous, rejection, typical, copies, boosted, weights
            )
            if metrics is not None and i is not None:
                decided["norm"] = optional_float(metrics["norm"][i]) if "norm" in metrics else None
                decided["cosine"] = (
                    optional_float(metrics["cosine"][i]) if "cosine" in metrics else None
                )
            self._clients[cid] = touched[cid] = replace(state, **decided)
        if copies is not None and alone is not None:
            copies.record_own(
                cid for cid, apart in zip(client_ids, alone, strict=True)
                if apart and cid not in rejected and self._evidence_apart_from_copies(cid)
                < self.policy.flag_z
            )  # fmt: skip
            suspects = associated | {
                c for c in members if c in self._clients and self._clients[c].flagged
                and self._evidence_apart_from_copies(c) >= self.policy.flag_z
            }  # fmt: skip
            originals = copies.originals(suspects)
            touched.update(
                self._take_back_copies(round, originals, typical, copies, boosted, weights)
            )
        p = self.policy
        if association is not None and p.flag_rule == "evidence" and p.association_z > 0:
            touched.update(self._associate(round, association))
        self._round = round

        if self.ledger is not None:
            rows = round_rows(touched, client_ids, metrics, losses, rejected, reasons, round)
            self.ledger.record_round(round, rows)
        return touched

    def _population(self) -> tuple[float, float, dict[str, float]]:
        """Median and scale of the pooled anomaly scores, and each signal's pooled median."""
        pooled = np.concatenate([a for a, _ in self._pool]) if self._pool else np.zeros(0)
        if pooled.size == 0:
            return 0.0, max(self.policy.min_scale, 1e-9), {}
        # Scores at the ceiling are left out unless they are most of the pool: then the scores
        # moved (a model every update now differs from), they are not a few outliers. Half the
        # pool is a tie, which the latest round breaks: most of it at the ceiling, the scores
        # moved; half of it (a first round's pool, one cohort of which five sent one update),
        # they did not.
        below = pooled < POOL_CEILING
        latest = self._pool[-1][0]
        most_below = 2 * below.sum() > pooled.size or (
            2 * below.sum() == pooled.size and 2 * (latest >= POOL_CEILING).sum() <= latest.size
        )
        ceiling = POOL_CEILING if most_below else np.inf
        if most_below:
            pooled = pooled[below]
        center = float(np.median(pooled))
        mad = _MAD_TO_SIGMA * float(np.median(np.abs(pooled - center)))
        q = self.policy.tail_quantile
        if q is not None:
            mad = max(mad, (float(np.quantile(pooled, q)) - center) / NormalDist().inv_cdf(q))
        typical: dict[str, float] = {}
        for name in sorted({n for _, sig in self._pool for n in sig}):
            values = np.concatenate(
                [sig[name][a < ceiling] for a, sig in self._pool if name in sig]
            )
            values = values[np.isfinite(values)]
            if values.size:
                typical[name] = float(np.median(values))
        return center, max(mad, self.policy.min_scale, 1e-9), typical

    def _weigh(
        self,
        state: ClientSummary,
        z: float,
        signals: dict[str, float],
        typical: dict[str, float],
        z_alone: float,
        weights: Mapping[str, float],
    ) -> dict[str, Any]:
        """The client's evidence with one round's z-score (and the excess of each signal the
        ``weights`` score) folded in: its new ``evidence``, ``signals`` and ``evidence_state``.
        ``z_alone`` is the z had no other client sent the same update."""
        p = self.policy
        z, z_alone = (min(max(x, -p.z_floor), p.z_cap) for x in (z, z_alone))
        m = p.evidence_memory
        old = EvidenceSums.of(state)
        weighed = {n: v for n, v in signals.items() if weights.get(n, 0.0) > 0}
        names = {n for n in old.excess if weights.get(n, 0.0) > 0} | set(weighed)
        sums = EvidenceSums(
            m * old.sum + z,
            m * m * old.sq + 1.0,
            {n: m * old.excess.get(n, 0.0) + (weighed[n] - typical.get(n, 0.0) if n in weighed
                                              else 0.0)
             for n in sorted(names)},
            old.associated,
            m * old.copied + z - z_alone,
        )  # fmt: skip
        return {
            "evidence": sums.evidence(p.evidence_memory, p.evidence_rounds),
            "signals": json.dumps(signals, sort_keys=True) if signals else None,
            "evidence_state": sums.to_json(),
        }

    def _step(
        self, state: ClientSummary, round: int, anomaly: float, n_rejected: int
    ) -> dict[str, Any]:
        """The client's new trust (the moving average) and counts after ``round``."""
        p = self.policy
        return {
            "trust": p.decay * state.trust + (1.0 - p.decay) * (1.0 - anomaly),
            "anomaly": anomaly,
            "rounds": state.rounds + 1,
            "last_round": round,
            "rejected": state.rejected + n_rejected,
        }

    def _decide(
        self,
        state: ClientSummary,
        round: int,
        previous: float | None,
        rejection: str | None,
        typical: dict[str, float],
        copies: CopyGroups | None,
        boosted: set[str],
        weights: Mapping[str, float],
    ) -> dict[str, Any]:
        """Flag, explanation and quarantine after the client's round (trust was ``previous``);
        the explanation ranks the signals by their part in the score under ``weights`` and
        names the clients it sent the same update as (``copies``) and the others of this
        round's ``boosted`` group (:func:`explain`).

        A client flagged for its association keeps that flag here (:meth:`_associate` decides
        it) unless its own evidence now flags it, which then replaces the association.
        """
        p = self.policy
        sums = EvidenceSums.of(state)
        if p.flag_rule == "threshold":
            flag_now = state.trust < p.flag_below
            clear_now = state.trust > p.unflag_above
        else:
            flag_now = state.evidence > p.flag_z
            clear_now = state.evidence < p.flag_z - p.unflag_margin
        own = state.flagged and not sums.associated
        if not own and flag_now:
            own = True
        elif own and clear_now:
            own = False
        decided: dict[str, Any] = {"flagged": own}
        if own:
            partners = _partners(state.client_id, copies, boosted)
            decided["explanation"] = explain(
                state, typical, rejection, partners=partners, weights=weights
            )
            if sums.associated:
                decided["evidence_state"] = replace(sums, associated=False).to_json()
        elif sums.associated:
            decided["flagged"] = True
        else:
            decided["explanation"] = None
        return {**decided, **self._quarantine(state, decided["flagged"], round, previous)}

    def _evidence_apart_from_copies(self, client_id: str) -> float:
        """The client's evidence less the part copies of its updates made."""
        p = self.policy
        sums = EvidenceSums.of(self._clients[client_id])
        return replace(sums, sum=sums.sum - sums.copied).evidence(
            p.evidence_memory, p.evidence_rounds
        )

    def _take_back_copies(
        self,
        round: int,
        originals: set[str],
        typical: dict[str, float],
        copies: CopyGroups,
        boosted: set[str],
        weights: Mapping[str, float],
    ) -> dict[str, ClientSummary]:
        """Takes back from each of the ``originals`` the part of its evidence (and the signals'
        excess) that copies of its updates made, and judges its flag again against the line
        itself (a recount, not a new round: no hysteresis); returns the standing of the clients
        whose evidence changed."""
        p = self.policy
        changed: dict[str, ClientSummary] = {}
        for cid in sorted(originals & self._clients.keys()):
            state = self._clients[cid]
            sums = EvidenceSums.of(state)
            if not sums.copied:
                continue
            excess = {n: v for n, v in sums.excess.items() if n != "collusion"}
            sums = replace(sums, sum=sums.sum - sums.copied, copied=0.0, excess=excess)
            evidence = sums.evidence(p.evidence_memory, p.evidence_rounds)
            own = p.flag_rule != "evidence" or sums.associated or evidence > p.flag_z
            state = replace(
                state,
                evidence=evidence,
                evidence_state=sums.to_json(),
                flagged=state.flagged and own,
            )
            decided = self._decide(state, round, None, None, typical, copies, boosted, weights)
            changed[cid] = replace(state, **decided)
        self._clients.update(changed)
        return changed

    def _quarantine(
        self, state: ClientSummary, flagged: bool, round: int, previous: float | None
    ) -> dict[str, Any]:
        """Quarantine after ``round`` of a client flagged or not (its trust was ``previous``)."""
        p = self.policy
        quarantined, since = state.quarantined, state.quarantined_since
        if p.quarantine == "none" or not flagged:
            quarantined, since = False, None
        elif not quarantined:
            quarantined, since = True, round
        elif p.quarantine == "exclude" and previous is not None and state.trust < previous:
            since = round  # misbehaved on probation: exclusion starts again
        return {"quarantined": quarantined, "quarantined_since": since}

    def _associate(
        self, round: int, association: Callable[[set[str]], Mapping[str, Association]]
    ) -> dict[str, ClientSummary]:
        """Flags and unflags clients for their history's association with the clients flagged on
        their own evidence, or with the others that corroborate them near the line
        (:meth:`_corroborated`), or, at a line ``CORROBORATED_ASSOCIATION_MARGIN`` higher, with
        both together when some client is flagged on its own evidence, whether or not they took
        part in ``round``; returns the standing of the clients whose flag it changed."""
        p = self.policy
        flagged = {c for c, s in self._clients.items() if s.flagged}
        associated = {c for c in flagged if EvidenceSums.of(self._clients[c]).associated}
        own = flagged - associated
        with_own = association(own)
        corroborated, through = self._corroborated(own, association, with_own)
        kin = {**with_own, **{c: through[c] for c in corroborated}}
        lines = dict.fromkeys(kin, p.association_z)
        if corroborated and own:  # counted at the same line, they drew honest look-alikes in
            wider_line = p.association_z + CORROBORATED_ASSOCIATION_MARGIN
            for cid, a in through.items():
                if cid in own or cid in corroborated:
                    continue
                if cid not in kin or a.z - wider_line > kin[cid].z - lines[cid]:
                    kin[cid], lines[cid] = a, wider_line
        changed: dict[str, ClientSummary] = {}
        for cid in sorted((set(kin) & self._clients.keys() | associated) - own):
            state = self._clients[cid]
            sums = EvidenceSums.of(state)
            a = kin.get(cid)
            line = lines.get(cid, p.association_z) - (p.unflag_margin if sums.associated else 0.0)
            follows = a is not None and a.z >= line
            if follows == sums.associated:
                continue
            near = f"evidence {state.evidence:.1f} and " if follows and cid in corroborated else ""
            changed[cid] = replace(
                state,
                flagged=follows,
                explanation=(
                    f"{near}association {a.z:.1f}: its updates deviate like those of flagged "
                    f"{', '.join(a.nearest)} (cosine {a.kinship:.2f}"
                    + (f", output layer {a.output_layer:.2f})" if math.isfinite(a.output_layer)
                       else ")")
                ) if follows else None,
                evidence_state=replace(sums, associated=follows).to_json(),
                **self._quarantine(state, follows, round, None),
            )  # fmt: skip
        self._clients.update(changed)
        return changed

    def _corroborated(
        self,
        own: set[str],
        association: Callable[[set[str]], Mapping[str, Association]],
        with_own: Mapping[str, Association],
    ) -> tuple[set[str], Mapping[str, Association]]:
        """The clients not flagged on their own evidence that corroborate one another: evidence
        at :data:`CORROBORATION_SHARE` of the flag line or more, and an association with the
        others near or over the line (and the clients flagged on their own) at ``association_z``
        or more. Returns them, and every client's association with them and the clients
        flagged on their own (each of them measured against the others).

        A client that deviates against the clients flagged on their own evidence (a negative
        mean cosine to them, ``with_own``) does not corroborate: when attackers held the round's
        median the honest clients of that round stand near the line together, all deviating
        away from the attackers, alike.

        A client flagged by association keeps corroborating down to ``unflag_margin`` under both
        lines, as every flag here is kept down to that margin under the line that raised it:
        without it a corroborated client whose association dipped under the line as the next
        round's forecasts moved was unflagged, and once out of the group not measured with it
        again (DBA, Fashion-MNIST, seed 66: four attackers flagged by association in round 6, three
        of them corroborating at 2.5-3.0, none of the four in round 7)."""
        p = self.policy

        def margin(client_id: str) -> float:
            return p.unflag_margin if EvidenceSums.of(self._clients[client_id]).associated else 0.0

        line = CORROBORATION_SHARE * p.flag_z
        near = {
            c for c, s in self._clients.items()
            if c not in own and s.evidence is not None and s.evidence >= line - margin(c)
            and not (c in with_own and with_own[c].kinship < 0)
        }  # fmt: skip
        while near:
            kin = association(own | near)
            kept = {c for c in near if c in kin and kin[c].z >= p.association_z - margin(c)}
            if kept == near:
                return near, kin
            near = kept
        return set(), {}

    def is_excluded(self, client_id: str, round: int | None = None) -> bool:
        """True if selection must skip the client in ``round`` (default: the next round).

        Only under ``quarantine="exclude"``, for the ``probation_rounds`` rounds after the
        quarantine began (or last restarted).
        """
        state = self._clients.get(client_id)
        if self.policy.quarantine != "exclude" or state is None or not state.quarantined:
            return False
        round = self._round + 1 if round is None else int(round)
        return round - (state.quarantined_since or 0) <= self.policy.probation_rounds

    def weight_multiplier(self, client_id: str) -> float:
        """Factor for the client's aggregation weight: 1.0, 0.0 if excluded, ``downweight``."""
        state = self._clients.get(client_id)
        if state is None or not state.quarantined:
            return 1.0
        return 0.0 if self.policy.quarantine == "exclude" else float(self.policy.downweight)

    def get(self, client_id: str) -> ClientSummary | None:
        """One client's standing (a frozen record), None if never seen."""
        return self._clients.get(client_id)

    def flagged(self) -> set[str]:
        """The ids of the clients currently flagged."""
        return {cid for cid, s in self._clients.items() if s.flagged}

    def snapshot(self) -> dict[str, ClientSummary]:
        """Every client's standing, by client_id (a new dict of frozen records)."""
        return dict(self._clients)

    def __repr__(self) -> str:
        return (
            f"TrustBook(policy={self.policy!r}, clients={len(self._clients)}, round={self._round})"
        )


COPY_PARTNERS_SHOWN = 3
"""Clients named beside a signal in an explanation; more are counted ("and 4 more")."""

PARTNER_PHRASES = {"collusion": "same update as", "boosted": "boosted group with"}
"""The signals whose explanation names other clients, and how."""

EXPLAINED_SHARE = 0.1
"""An explanation names a signal only if its part in the flag is at least this share of the
largest part: an honest-looking 0.01 beside a shrinking of 1.00 explains nothing."""


def explain(
    state: ClientSummary,
    typical: dict[str, float],
    rejection: str | None = None,
    top: int = 3,
    partners: Mapping[str, Sequence[str]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> str:
    """Why a client is flagged: its evidence and the signals with the largest part in it.

    The signals are ranked by their part in it: their accumulated excess over the population's
    median (weighted like the evidence) times their share of the score under ``weights``
    (``scoring.component_parts``). A component the score does not weigh is left out, for it
    flagged nobody, and so is one with under :data:`EXPLAINED_SHARE` of the largest part. Each
    shows the client's last value and the population's typical one, or the excess built up
    earlier when the last round was not above typical.
    A signal of :data:`PARTNER_PHRASES` also names its ``partners`` (signal name to clients):
    for ``collusion`` the clients it sent the same update as (copies are certain evidence
    against all but one of a group, and an operator can see the group), for ``boosted`` the
    others of its boosted group.
    """
    partners = partners or {}
    parts = []
    if state.evidence is not None:
        parts.append(f"evidence {state.evidence:.1f} over {state.rounds} round(s)")
    if rejection is not None:
        parts.append(f"update rejected ({rejection})")
    last = last_signals(state.signals)
    excesses = EvidenceSums.of(state).excess
    part_of = component_parts(excesses, last, weights)
    ranked = sorted(((part, excesses[name], name) for name, part in part_of.items()), reverse=True)
    ranked = [r for r in ranked[:top] if r[0] >= EXPLAINED_SHARE * ranked[0][0]]
    signals = [
        f"{name} {last[name]:.2f} (typical {typical.get(name, 0.0):.2f}"
        f"{_named(name, partners.get(name, ()))})"
        if last.get(name, -np.inf) > typical.get(name, 0.0) else f"{name} +{excess:.2f} earlier"
        for _, excess, name in ranked
    ]  # fmt: skip
    head = "; ".join(parts)
    return f"{head}: {', '.join(signals)}" if signals else head


def _named(signal: str, partners: Sequence[str]) -> str:
    """``"; same update as c03, c17"`` for ``collusion`` (at most :data:`COPY_PARTNERS_SHOWN`
    named), ``"; boosted group with c03"`` for ``boosted``; ``""`` without partners."""
    if signal not in PARTNER_PHRASES or not partners:
        return ""
    named = ", ".join(sorted(partners)[:COPY_PARTNERS_SHOWN])
    more = len(partners) - COPY_PARTNERS_SHOWN
    return f"; {PARTNER_PHRASES[signal]} {named}" + (f" and {more} more" if more > 0 else "")


def _partners(
    client_id: str, copies: CopyGroups | None, boosted: set[str]
) -> dict[str, Sequence[str]]:
    """The clients an explanation of ``client_id`` names: those it sent the same update as, and
    the others of this round's boosted group when it is in it."""
    return {
        "collusion": copies.copies_of(client_id) if copies is not None else (),
        "boosted": sorted(boosted - {client_id}) if client_id in boosted else (),
    }


def round_rows(
    states: dict[str, ClientSummary],
    client_ids: list[str],
    metrics: dict[str, np.ndarray] | None = None,
    losses: np.ndarray | None = None,
    rejected: dict[str, int] | None = None,
    reasons: dict[str, str] | None = None,
    round: int | None = None,
) -> list[ClientRound]:
    """The ledger's records of ``round`` (``Ledger.record_round``) for the clients in ``states``,
    sorted by client_id.

    Each is the client's :func:`round_record`: trust's verdict with its
    measurements when ``metrics`` / ``losses`` are given (``client_ids`` gives their row order;
    a client absent from it, whose update was rejected, has none) and ``rejected_reason`` for a
    rejected client; a client neither in it nor rejected (flagged or unflagged for its
    association in a round it did not take part in) is marked ``absent``.
    """
    index = {cid: i for i, cid in enumerate(client_ids)}
    rejected = rejected or {}
    reasons = reasons or {}
    loss_values = None if losses is None else np.asarray(losses, np.float64).reshape(-1)
    rows = []
    for cid in sorted(states):
        measured: dict[str, Any] = {}
        i = index.get(cid)
        if i is not None:
            measured = {key: optional_float(values[i]) for key, values in (metrics or {}).items()}
            if loss_values is not None:
                measured["loss"] = optional_float(loss_values[i])
        if cid in rejected:
            measured["rejected_reason"] = reasons.get(cid, "rejected")
        elif i is None:
            measured["absent"] = True  # its standing changed in a round it did not take part in
        rows.append(round_record(states[cid], round, **measured))
    return rows
