"""results.json against its JSON Schema (fedwarden/schema/results.schema.json, issue 14).

Every kind of results file the project writes is validated: simulations with model and data
poisoning, central DP and DP-SGD (through the Python API), and a deployment's (the round driver
with the coordinator's results writer), each read as strict JSON (no NaN). The schema also has to
bite: a Python repr where data belongs, a value out of range, an unknown key are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.config import FLAT, RunConfig
from fedwarden.results import describe_attack, describe_step, load_schema

SMALL = dict(clients=4, rounds=2, local_epochs=1, progress=False)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read(out: Path) -> dict:
    # Strict JSON, as a tool in another language reads it: no NaN or Infinity.
    return json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)


def test_the_schema_names_every_setting():
    config = load_schema()["properties"]["config"]["properties"]
    missing, stale = set(FLAT) - set(config), set(config) - set(FLAT)
    assert not missing and not stale, (
        f"fedwarden/schema/results.schema.json: add {sorted(missing)} to config.properties, "
        f"remove {sorted(stale)}"
    )


@pytest.mark.parametrize(
    "settings",
    [
        dict(attack="gaussian", aggregator="clip:max_norm=5+median"),
        dict(attack="backdoor", dp="central", dp_noise_multiplier=0.5, dp_clip=0.5),
        dict(dp_sgd=True, dp_sgd_noise_multiplier=1.0, aggregator="trimmed_mean"),
        dict(attack="backdoor", average_last_rounds=2),
    ],
    ids=["model-poisoning", "data-poisoning-central-dp", "dp-sgd", "averaged-model"],
)
def test_simulation_results_follow_the_schema(settings, validator, tmp_path):
    import fedwarden

    returned = fedwarden.simulate(**SMALL, **settings, out=str(tmp_path))
    written = read(tmp_path)
    validator.validate(written)
    assert written == json.loads(json.dumps(returned))
    assert written["aggregator"]["name"] == "chain" and written["aggregator"]["steps"]
    if "attack" in settings:
        assert written["attack"]["name"] == settings["attack"]
        assert written["attack"]["kind"] in ("data", "model")
    if "average_last_rounds" in settings:
        last = written["rounds"][-1]
        assert last["averaged_rounds"] == [SMALL["rounds"] - 1, SMALL["rounds"]]
        assert last["last_model"]["attack_success_rate"] is not None
        assert written["final"]["accuracy"] == last["accuracy"]


def test_deployment_results_follow_the_schema(validator, tmp_path):
    from fedwarden.server.admission import ClientUpdate
    from fedwarden.server.callbacks import Checkpoint
    from fedwarden.server.coordinator import Coordinator
    from fedwarden.server.driver import Cohort, RoundDriver, RunInfo
    from fedwarden.server.optimizers import ServerOptimizer
    from fedwarden.server.trust import TrustBook, TrustPolicy

    ids = ["a", "b", "c"]

    class Agents:
        def collect(self, round_number, coordinator):
            selected = coordinator.select(ids, 3, np.random.default_rng(round_number))
            updates = [
                ClientUpdate(c, round_number, np.full(4, 0.1, np.float32), 10, 0.5)
                for c in selected
            ]
            return Cohort(selected, updates)

    coordinator = Coordinator(
        np.zeros(4, np.float32), parse_chain("median"), ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    driver = RoundDriver(coordinator, Agents(), lambda w: (0.5, 0.8, None), 2)
    driver.run()
    config = RunConfig(clients=3, aggregator="median", out=str(tmp_path)).to_dict()
    deployment = {
        "state_dir": str(tmp_path), "min_clients": 2, "round_timeout_s": 120.0,
        "transport": "mutual TLS", "eval_data": "digits test split",
    }  # fmt: skip
    writer = Checkpoint(
        tmp_path, tmp_path / "results.json", RunInfo(config, extra={"deployment": deployment})
    )
    writer.set_driver(driver)
    results = json.loads(json.dumps(writer.results()))
    validator.validate(results)
    assert results["attack"] is None and results["clients"]["a"]["malicious"] is None


def good_results() -> dict:
    return {
        "config": RunConfig().to_dict(),
        "rounds": [
            {
                "round": 1, "accuracy": 0.5, "loss": 1.0, "attack_success_rate": None,
                "flagged": [], "selected": ["c00"], "admitted": 1, "rejected": 0,
                "duration_s": 0.1, "measurements": {},
            }
        ],
        "final": {
            "accuracy": 0.5, "loss": 1.0, "attack_success_rate": None,
            "detection": {"precision": None, "recall": None, "first_detection_round": None},
            "privacy": None,
        },
        "clients": {"c00": {"malicious": False, "trust": 1.0, "flagged": False, "num_examples": 5}},
        "aggregator": describe_step(parse_chain("clip:max_norm=5+median")),
        "attack": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    "path, bad",
    [
        (("aggregator",), "chain(median())"),
        (("attack",), "Attack(name='gaussian', kind='model', params={}, collude=False)"),
        (("rounds", 0, "accuracy"), 1.5),
        (("config", "rounds"), "two"),
        (("clients", "c00", "trust"), None),  # allowed: a client never scored
        (("surprise",), 1),
    ],
    ids=["repr-aggregator", "repr-attack", "accuracy>1", "config-type", "none", "unknown"],
)
def test_the_schema_refuses_reprs_and_out_of_range_values(path, bad, validator):
    results = good_results()
    validator.validate(results)
    target = results
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    errors = list(validator.iter_errors(json.loads(json.dumps(results))))
    assert (errors == []) == (bad is None), errors


def test_steps_and_attacks_are_written_as_data():
    from fedwarden.attacks import build_attack

    chain = parse_chain("clip:max_norm=5+trimmed_mean:trim_fraction=0.2", num_byzantine_default=1)
    assert describe_step(chain) == {
        "name": "chain",
        "params": {},
        "steps": [
            {"name": "clip_by_norm", "params": {"max_norm": 5.0}},
            {"name": "trimmed_mean", "params": {"trim_fraction": 0.2, "num_byzantine": 1}},
        ],
    }
    attack = describe_attack(build_attack("gaussian", {"num_classes": 10}))
    assert attack["name"] == "gaussian" and attack["kind"] == "model"
    assert json.loads(json.dumps(attack)) == attack and "sigma" in attack["params"]
