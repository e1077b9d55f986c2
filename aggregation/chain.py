"""Chains of steps, and the compact chain strings users type on the command line.

``chain(clip_by_norm(5.0), trimmed_mean(0.2))`` is itself a step: it runs the children in order
on the output of the previous one. Its state is the tuple of the children's states, its
measurements are the children's, keyed ``"<child name>/<key>"`` (``"clip_by_norm/clipped_count"``),
and its per-client arrays are the children's under their own keys (``"norm"``, ``"krum_score"``,
``"trimmed_share"``), as long as the child still sees the original K rows (all steps before it keep
rows). When two children report the same per-client key, the later child's array keeps the bare key
and both are also kept as ``"<child name>/<key>"``.

``parse_chain("clip:max_norm=5+median")`` builds a chain from a string::

    SPEC  := STEP ("+" STEP)*
    STEP  := NAME [":" ARGS]  |  MODULE ":" CALLABLE [":" ARGS]
    ARGS  := KEY "=" VALUE (("," | ":") KEY "=" VALUE)*

Names are those of :data:`REGISTRY`. Values are read as int, float, true/false, none, or else a
string. A plugin ``MODULE:CALLABLE`` is either a callable returning a step (called with ARGS) or a
plain function ``(updates, weights) -> (d,) vector`` (two required positional parameters, no ARGS),
which is wrapped by ``from_function``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedwarden.aggregation import rules
from fedwarden.aggregation.base import AggregationError, Step, StepOutput, as_cohort
from fedwarden.aggregation.clipping import clip_by_norm
from fedwarden.plugins import load_callable, parse_options

__all__ = ["REGISTRY", "Chain", "chain", "parse_chain"]

# Every name a chain string accepts. Strings are "module:attribute" resolved on use (they need
# optional dependencies).
REGISTRY: dict[str, Callable[..., Any] | str] = {
    "mean": rules.mean,
    "median": rules.median,
    "trimmed_mean": rules.trimmed_mean,
    "krum": rules.krum,
    "multi_krum": rules.multi_krum,
    "geometric_median": rules.geometric_median,
    "bulyan": rules.bulyan,
    "centered_clipping": rules.centered_clipping,
    "nnm": rules.nearest_neighbor_mixing,
    "nearest_neighbor_mixing": rules.nearest_neighbor_mixing,
    "clip": clip_by_norm,
    "clip_by_norm": clip_by_norm,
    "adaptive_clip": "fedwarden.aggregation.clipping:adaptive_clip_by_norm",
    "adaptive_clip_by_norm": "fedwarden.aggregation.clipping:adaptive_clip_by_norm",
    "bucketing": "fedwarden.aggregation.preaggregation:bucketing",
    "arc": "fedwarden.aggregation.preaggregation:adaptive_robust_clipping",
    "client_momentum": "fedwarden.aggregation.preaggregation:client_momentum",
    "signguard": "fedwarden.aggregation.filtering:signguard",
    "dnc": "fedwarden.aggregation.filtering:dnc",
    "flame": "fedwarden.aggregation.filtering:flame",
    "clipped_clustering": "fedwarden.aggregation.filtering:clipped_clustering",
    "fltrust": "fedwarden.aggregation.filtering:fltrust",
    "auto": "fedwarden.aggregation.recommended:auto",
    "central_dp": "fedwarden.aggregation.dp:central_dp",
    "gaussian_noise": "fedwarden.aggregation.dp:gaussian_noise",
}


def _keeps_rows(step: Any) -> bool:
    return bool(getattr(step, "keeps_rows", False))


def _rows_after(step: Any, rows: int) -> int:
    """Rows the next step sees: a step may say (``output_rows``, e.g. bucketing), else K or 1."""
    if hasattr(step, "output_rows"):
        return int(step.output_rows(rows))
    return rows if _keeps_rows(step) else 1


def _flatten(prefix: str, values: Mapping[str, Any], into: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping):
            _flatten(f"{prefix}/{key}", value, into)
        else:
            into[f"{prefix}/{key}"] = value


class Chain:
    """Runs steps in order; itself a step.

    Args:
      *steps: the steps, in the order the data flows, e.g. a clip, a rule, then noise.

    State: the tuple of the children's states (``init()`` builds it). ``check(num_clients)``
    checks every child against the number of rows it will see: K until the first step that
    reduces the cohort, then 1. ``keeps_rows`` is true when every child keeps rows.
    """

    name = "chain"

    def __init__(self, *steps: Step) -> None:
        for i, step in enumerate(steps):
            if inspect.isclass(step) or not isinstance(step, Step):
                raise AggregationError(
                    f"chain expects steps (objects with name, init, check and __call__, such as "
                    f"median()). Received: {step!r} of type {type(step).__name__} at position {i}; "
                    f"call the builder, e.g. median() rather than median."
                )
        self.steps = tuple(steps)
        self.keeps_rows = all(_keeps_rows(s) for s in steps)
        # Steps with per-client state (client momentum) get the cohort's ids from the caller.
        self.uses_client_ids = any(getattr(s, "uses_client_ids", False) for s in steps)
        self._keys: list[str] = []
        for step in steps:
            key, n = step.name, 1
            while key in self._keys:
                n += 1
                key = f"{step.name}_{n}"
            self._keys.append(key)

    def init(self) -> tuple[Any, ...]:
        return tuple(step.init() for step in self.steps)

    def check(self, num_clients: int) -> None:
        if num_clients < 1:
            raise AggregationError(
                f"an aggregation chain needs at least one update. Received: "
                f"num_clients={num_clients}."
            )
        rows = num_clients
        for step in self.steps:
            step.check(rows)
            rows = _rows_after(step, rows)

    def _states(self, state: Any) -> tuple[Any, ...]:
        if isinstance(state, list):  # a checkpoint written as JSON or msgpack
            state = tuple(state)
        if not isinstance(state, tuple) or len(state) != len(self.steps):
            got = f"a tuple of length {len(state)}" if isinstance(state, tuple) else repr(state)
            raise AggregationError(
                f"{self!r} expects its state as a tuple of {len(self.steps)} child states, one "
                f"per step. Received: {got[:200]}; pass chain.init() in the first round and then "
                f"the state the previous call returned (a checkpoint of another chain does not "
                f"fit)."
            )
        return state

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, state: Any, client_ids: Any = None
    ) -> StepOutput:
        """Runs the steps; ``client_ids`` (one per row) reach the steps that use them while the
        rows still are the clients'."""
        updates, weights = as_cohort(updates, weights)
        states = self._states(state)
        k = updates.shape[0]
        aligned = True
        new_states: list[Any] = []
        measurements: dict[str, Any] = {}
        per_client: dict[str, np.ndarray] = {}
        owner: dict[str, str] = {}
        for step, key, child_state in zip(self.steps, self._keys, states, strict=True):
            if getattr(step, "uses_client_ids", False):
                out = step(
                    updates, weights, child_state, client_ids=client_ids if aligned else None
                )
            else:
                out = step(updates, weights, child_state)
            new_states.append(out.state)
            _flatten(key, out.measurements, measurements)
            if aligned:
                for name, values in out.per_client.items():
                    if name in owner:
                        per_client.setdefault(f"{owner[name]}/{name}", per_client[name])
                        per_client[f"{key}/{name}"] = values
                    per_client[name], owner[name] = values, key
            aligned = aligned and _keeps_rows(step) and out.updates.shape[0] == k
            updates, weights = out.updates, out.weights
        return StepOutput(updates, weights, tuple(new_states), measurements, per_client)

    def __repr__(self) -> str:
        return f"chain({', '.join(repr(s) for s in self.steps)})"


chain = Chain


def _options(token: str, text: str) -> dict[str, Any]:
    return parse_options(
        filter(None, re.split(r"[,:]", text)),
        f"option in aggregation step {token!r}",
        "trimmed_mean:trim_fraction=0.2",
        AggregationError,
    )


def _resolve(target: str, token: str) -> Any:
    return load_callable(target, f"aggregation step {token!r}", AggregationError)


def _build(
    builder: Callable[..., Any],
    options: dict[str, Any],
    label: str,
    token: str,
    num_byzantine_default: int | None,
) -> Step:
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        signature = None
    params = signature.parameters if signature else {}
    if "num_byzantine" in params and "num_byzantine" not in options:
        if num_byzantine_default is not None:
            options["num_byzantine"] = num_byzantine_default
        elif params["num_byzantine"].default is inspect.Parameter.empty:
            raise AggregationError(
                f"{label} needs num_byzantine, the number of malicious clients to tolerate. "
                f"Received: {token!r} with no num_byzantine and no default; write "
                f"{label}:num_byzantine=2 or set the run's Byzantine budget."
            )
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as err:
            accepted = ", ".join(p for p in params if p not in ("self", "args", "kwargs")) or "none"
            raise AggregationError(
                f"{label} does not accept options {sorted(options)} ({err}). Received: {token!r}; "
                f"accepted options: {accepted}."
            ) from None
    try:
        step = builder(**options)
    except AggregationError:
        raise
    except (TypeError, ValueError) as err:
        raise AggregationError(f"cannot build {label} from {token!r}: {err}") from err
    if not isinstance(step, Step):
        raise AggregationError(
            f"{label} must build an aggregation step (with name, init, check and __call__). "
            f"Received: {type(step).__name__} from {token!r}; return a step, or give a plain "
            f"function (updates, weights) -> (d,) vector."
        )
    return step


def _is_vector_function(fn: Any) -> bool:
    if inspect.isclass(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    return len(required) >= 2


def _parse_step(token: str, num_byzantine_default: int | None) -> Step:
    head, _, rest = token.partition(":")
    head = head.strip()
    if head in REGISTRY:
        builder = REGISTRY[head]
        if isinstance(builder, str):
            builder = _resolve(builder, token)
        return _build(builder, _options(token, rest), head, token, num_byzantine_default)
    attribute, _, args = rest.partition(":")
    if attribute and "=" not in attribute:  # module:callable[:args]
        target = f"{head}:{attribute.strip()}"
        obj = _resolve(target, token)
        options = _options(token, args)
        if isinstance(obj, Step) and not inspect.isclass(obj):
            if options:
                raise AggregationError(
                    f"{target} is already a step and takes no options. Received: {token!r}."
                )
            return obj
        if not callable(obj):
            raise AggregationError(
                f"{target} must be a callable. Received: {type(obj).__name__} from {token!r}."
            )
        if not options and _is_vector_function(obj):
            return rules.from_function(obj, name=target)
        return _build(obj, options, target, token, num_byzantine_default)
    raise AggregationError(
        f"unknown aggregation step {head!r} in {token!r}. Accepted names: "
        f"{', '.join(REGISTRY)}, or a plugin as package.module:callable."
    )


def parse_chain(spec: str, num_byzantine_default: int | None = None) -> Chain:
    """Builds a chain from a compact string, e.g. ``"clip:max_norm=5+trimmed_mean"``.

    Args:
      spec: steps joined by ``+``; each is ``name[:key=value,...]`` with a name from
        :data:`REGISTRY`, or ``package.module:callable[:key=value,...]`` for a plugin.
      num_byzantine_default: ``num_byzantine`` for steps that take it (krum, multi_krum, bulyan,
        nnm, plugins) when the spec does not set it.

    Returns:
      A :class:`Chain`, even for one step (so measurement keys always read ``"<step>/<key>"``).
      Call ``.check(num_clients)`` on it to validate the cohort size before running.

    Raises:
      AggregationError: unknown name, bad option, or a plugin that cannot be imported or built.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AggregationError(
            f"an aggregation chain spec must be a non-empty string such as 'trimmed_mean' or "
            f"'clip:max_norm=5+median'. Received: {spec!r}."
        )
    # '+' separates steps only before a name, so '1e+3' stays a number.
    tokens = [t.strip() for t in re.split(r"\+(?=\s*[A-Za-z_])", spec.strip())]
    if any(not t for t in tokens):
        raise AggregationError(f"empty step in aggregation chain spec {spec!r}.")
    return Chain(*(_parse_step(t, num_byzantine_default) for t in tokens))
