"""The ``results.json`` format: its JSON Schema, and the aggregator and attack as data.

``fedwarden/schema/results.schema.json`` is the contract (``docs/results-format.md`` explains
each field); the tests validate every results file they write against it. The aggregation chain
and the attack are written as data (a name and parameters), not as Python reprs::

    {"name": "chain", "params": {}, "steps": [
        {"name": "clip_by_norm", "params": {"max_norm": 5.0}},
        {"name": "median", "params": {}}]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).parent / "schema" / "results.schema.json"


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _value(value: Any) -> Any:
    """A parameter as JSON data: numbers, strings, lists, tables; anything else by its name."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) or type(value).__module__ == "numpy" and hasattr(value, "item"):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}:{value.__qualname__}"
    return type(value).__name__


def describe_step(step: Any) -> dict[str, Any]:
    """An aggregation step (or chain) as ``{"name", "params"[, "steps"]}``.

    ``params`` are the step's public attributes, the same that its builder takes
    (``trimmed_mean(trim_fraction=0.2)`` -> ``{"trim_fraction": 0.2}``).
    """
    children = getattr(step, "steps", None)
    if children is not None:
        return {"name": step.name, "params": {}, "steps": [describe_step(s) for s in children]}
    params = {
        key: _value(value)
        for key, value in vars(step).items()
        if not key.startswith("_") and key not in ("name", "keeps_rows")
    }
    return {"name": str(getattr(step, "name", type(step).__name__)), "params": params}


def describe_attack(attack: Any) -> dict[str, Any] | None:
    """A ``fedwarden.attacks.Attack`` as ``{"name", "kind", "params", "collude"}``."""
    if attack is None:
        return None
    return {
        "name": attack.name,
        "kind": attack.kind,
        "params": _value(dict(attack.params)),
        "collude": bool(attack.collude),
    }
