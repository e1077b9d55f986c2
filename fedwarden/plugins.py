"""User code named on the command line: ``package.module:callable`` plugins and ``key=value``
options. One loader and one option parser for models, attacks and aggregation steps, so the
three accept the same spellings and fail with the same messages.

Example::

    factory = load_callable("my_models:small_cnn", "--model")
    options = parse_options(["boost=10", "mode='sign'"], "--attack-param")
    # {"boost": 10, "mode": "sign"}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from fedwarden.errors import UsageError

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def load_callable(spec: str, what: str, error: type[Exception] = UsageError) -> Callable[..., Any]:
    """Imports ``package.module`` and returns its ``callable`` (a dotted path inside the module
    is allowed: ``package.module:Class.method``).

    Args:
      spec: ``"package.module:callable"``.
      what: how the message names the setting, e.g. ``"--model"`` or ``"attack plugin"``.
      error: the exception type to raise (each layer keeps its own).

    Raises:
      error: the spec is malformed, the module does not import, the attribute is missing or
        not callable; the message names the spec and what to check.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise error(f"{what} must look like package.module:callable. Received: {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a plugin's own import errors are the user's to see
        raise error(
            f"{what} {spec!r}: cannot import module {module_name!r}: {exc}. Check the spelling "
            "and that the module is on PYTHONPATH."
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise error(f"{what} {spec!r} is not callable")
    return target


def parse_value(text: str) -> Any:
    """``true``/``false``, ``none``/``null``, an int, a float, or else the string (surrounding
    whitespace and one pair of matching quotes removed)."""
    text = text.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_options(
    items: Iterable[str],
    what: str,
    example: str = "key=10",
    error: type[Exception] = UsageError,
) -> dict[str, Any]:
    """``["key=value", ...]`` as a dict, values read by :func:`parse_value`.

    Raises:
      error: an item without ``=`` or a value, a key that is not an identifier, or a key
        given twice.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not value.strip():
            raise error(f"bad {what}: {item!r} must be key=value, e.g. {example}")
        if key in options:
            raise error(f"bad {what}: {key!r} given twice ({item!r})")
        options[key] = parse_value(value)
    return options
