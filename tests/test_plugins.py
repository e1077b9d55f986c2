"""One ``module:callable`` loader and one ``key=value`` parser for models, attacks and chains."""

from __future__ import annotations

import pytest

from fedwarden.aggregation.base import AggregationError
from fedwarden.aggregation.chain import parse_chain
from fedwarden.attacks import AttackError, parse_attack_params
from fedwarden.errors import UsageError
from fedwarden.plugins import load_callable, parse_options, parse_value


def test_load_callable_follows_dotted_attributes():
    assert load_callable("os.path:join", "x")("a", "b") == "a/b"
    assert load_callable("pathlib:Path.cwd", "x")().is_dir()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like package.module:callable"),
        ("os.path:", "must look like package.module:callable"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("os.path:nothing_here", "has no attribute 'nothing_here'"),
        ("os:sep", "is not callable"),
    ],
)
def test_load_callable_names_the_problem(spec, message):
    with pytest.raises(UsageError, match=message):
        load_callable(spec, "--model")


@pytest.mark.parametrize(
    "text, value",
    [("10", 10), ("1.5", 1.5), ("True", True), ("null", None), (" sign ", "sign"),
     ("'sign'", "sign"), ('"a b"', "a b"), ("'", "'")],
)  # fmt: skip
def test_values_are_read_alike_everywhere(text, value):
    assert parse_value(text) == value
    assert parse_attack_params([f"x={text}"]) == {"x": value}


def test_options_refuse_missing_values_bad_keys_and_repeats():
    assert parse_options(["a=1", "b = two"], "opts") == {"a": 1, "b": "two"}
    for items in (["a"], ["1a=2"], ["a="], ["a=1", "a=2"]):
        with pytest.raises(UsageError, match="bad opts"):
            parse_options(items, "opts")


def test_the_three_users_raise_their_own_errors_with_the_same_wording():
    with pytest.raises(AggregationError, match="cannot import module 'no_such_module_xyz'"):
        parse_chain("no_such_module_xyz:f")
    with pytest.raises(AggregationError, match="must be key=value"):
        parse_chain("trimmed_mean:0.2")
    with pytest.raises(AttackError, match="cannot import module 'no_such_module_xyz'"):
        from fedwarden.attacks import build_attack

        build_attack("no_such_module_xyz:f")
    with pytest.raises(AttackError, match="given twice"):
        parse_attack_params(["boost=1", "boost=2"])
    # quotes make a string in a chain as in --attack-param
    with pytest.raises(AggregationError, match="Received: trim_fraction='0.2'"):
        parse_chain("trimmed_mean:trim_fraction='0.2'")
    assert "0.2" in repr(parse_chain("trimmed_mean:trim_fraction=0.2"))
