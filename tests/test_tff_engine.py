"""The TFF engine: public process API, TFF-aggregator vs fedwarden-chain agreement, engine parity.

TFF takes seconds to import and to trace a computation: models and cohorts here are tiny.
"""

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

tff = pytest.importorskip("tensorflow_federated")
# jax (imported with TensorFlow and TFF) runs os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1");
# every later subprocess of the session inherits it, and the CLI's own default ("3") no longer
# applies, so CLI tests see TF's log lines on stderr. Undo jax's default.
if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "1":
    del os.environ["TF_CPP_MIN_LOG_LEVEL"]

from fedwarden.aggregation.chain import Chain, parse_chain  # noqa: E402
from fedwarden.aggregation.dp import central_dp, is_formal_dp  # noqa: E402
from fedwarden.aggregation.tff import TFFAggregatorStep, tff_factory, tff_step  # noqa: E402
from fedwarden.clients.training import LocalTrainer  # noqa: E402
from fedwarden.config import make_config  # noqa: E402
from fedwarden.errors import UsageError  # noqa: E402
from fedwarden.models import build_model  # noqa: E402
from fedwarden.server.trust import TrustPolicy  # noqa: E402
from fedwarden.simulations.runner import simulate  # noqa: E402
from fedwarden.simulations.tff_engine import (  # noqa: E402
    build_robust_fedavg_process,
    build_tff_fedavg,
    keras_model_fn,
)
from fedwarden.simulations.tff_trainer import TFFTrainer  # noqa: E402

SPEC = (tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int64))


def small_model() -> tf.keras.Model:
    init = tf.keras.initializers.GlorotUniform(seed=1)
    return tf.keras.Sequential(
        [
            tf.keras.Input([4]),
            tf.keras.layers.Dense(8, activation="relu", kernel_initializer=init),
            tf.keras.layers.Dense(3, kernel_initializer=init),
        ]
    )


MODEL_FN = keras_model_fn(small_model, SPEC)


def client_datasets(n: int, seed: int = 0, size: int = 24) -> list[tf.data.Dataset]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(size, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
        out.append(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    return out


def test_process_runs_two_rounds_and_keys_scores_by_client_id():
    process = build_robust_fedavg_process(
        MODEL_FN,
        tff.learning.optimizers.build_sgdm(0.1),
        chain="median",
        trust_policy=TrustPolicy(quarantine="exclude"),
    )
    state = process.initialize()
    initial = [np.array(w) for w in process.get_model_weights(state).trainable]
    ids = ["alice", "bob", "mallory", "carol", "dave"]
    for round_number in (1, 2):
        datasets = client_datasets(5, seed=round_number)
        # mallory's data is NaN: TFF zeroes its diverged update with weight 0, admission rejects it
        x = np.full((24, 4), np.nan, np.float32)
        datasets[2] = tf.data.Dataset.from_tensor_slices((x, np.zeros(24, np.int64))).batch(8)
        state, metrics = process.next(state, datasets, ids)
        assert metrics["round"] == state.round == round_number
        assert metrics["rejected"] == {"mallory": "bad_example_count"}
        assert set(metrics["clients"]) == {"alice", "bob", "carol", "dave"}
        for row in metrics["clients"].values():
            assert 0.0 <= row["anomaly"] <= 1.0 and 0.0 <= row["trust"] <= 1.0
            assert row["norm"] > 0
        assert metrics["train"]["num_examples"] == 4 * 24
        assert np.isfinite(metrics["train"]["loss"])
    assert state.trust["mallory"].trust < min(state.trust[c].trust for c in metrics["clients"])
    assert state.trust["mallory"].rejected == 2
    assert "mallory" in metrics["flagged"]  # trust 1 -> 0.7 -> 0.49, below 0.55
    assert process.select(ids, 5, np.random.default_rng(0)) == ["alice", "bob", "carol", "dave"]
    trained = process.get_model_weights(state).trainable
    assert any(not np.allclose(a, b) for a, b in zip(initial, trained))
    with pytest.raises(UsageError, match="state is from round 1"):
        process.next(replace(state, round=1), client_datasets(5), ids)


def test_norms_are_judged_against_the_local_steps_when_the_batch_size_is_given():
    # four clients take one step per epoch, one takes eight: its update is longer, honestly
    datasets = client_datasets(4, seed=3, size=8) + client_datasets(1, seed=4, size=64)
    ids = ["a", "b", "c", "d", "big"]
    norm_z = {}
    for batch_size in (None, 8):
        process = build_robust_fedavg_process(
            MODEL_FN, tff.learning.optimizers.build_sgdm(0.1), chain="median",
            batch_size=batch_size,
        )  # fmt: skip
        _, metrics = process.next(process.initialize(), datasets, ids)
        norm_z[batch_size] = metrics["clients"]["big"]["norm_z"]
    assert norm_z[None] > 2.0
    assert abs(norm_z[8]) < 0.5


@pytest.mark.parametrize(
    "chain",
    [
        parse_chain("mean"),
        parse_chain("clip:max_norm=1.5+mean"),
        Chain(central_dp(1.0, 0.0, expected_clients=8.0)),
        Chain(central_dp(1.0, 0.0, expected_clients=8.0, adaptive=True, clipped_count_stddev=0.0)),
    ],
    ids=["mean", "clip+mean", "central_dp", "central_dp_adaptive"],
)
def test_tff_aggregators_agree_with_fedwarden_chains(chain):
    rng = np.random.default_rng(3)
    step = tff_step(chain)
    assert isinstance(step, TFFAggregatorStep)
    assert is_formal_dp(step) == is_formal_dp(chain)
    ours, theirs = chain.init(), step.init()
    for _ in range(3):  # several rounds, so adaptive clip states must evolve alike
        updates = (rng.normal(size=(7, 300)) * rng.uniform(0.05, 3.0, size=(7, 1))).astype(
            np.float32
        )
        weights = rng.integers(5, 60, size=7).astype(np.float64)
        a, b = chain(updates, weights, ours), step(updates, weights, theirs)
        ours, theirs = a.state, pickle.loads(pickle.dumps(b.state))  # checkpoints pickle states
        np.testing.assert_allclose(b.updates, a.updates, rtol=1e-5, atol=1e-6)


def test_robust_rules_stay_in_fedwarden():
    for spec in ("median", "clip:max_norm=1+trimmed_mean", "krum:num_byzantine=1"):
        assert tff_factory(parse_chain(spec)) is None
        assert tff_step(parse_chain(spec)).name == "chain"


def test_tff_fedavg_and_fedwarden_chain_give_the_same_round():
    """TFF's own build_weighted_fed_avg with clipping_factory == our process with the numpy chain."""
    optimizer = tff.learning.optimizers.build_sgdm(0.2)
    spec = "clip:max_norm=0.3+mean"
    ours = build_robust_fedavg_process(MODEL_FN, optimizer, spec, use_tff_aggregators=False)
    theirs = build_tff_fedavg(MODEL_FN, optimizer, spec)
    state = ours.initialize()
    tff_state = theirs.set_model_weights(theirs.initialize(), ours.get_model_weights(state))
    datasets = client_datasets(4, seed=5, size=20)
    datasets[1] = datasets[1].take(2)  # uneven example counts exercise the weighting
    state, metrics = ours.next(state, datasets, ["a", "b", "c", "d"])
    tff_state = theirs.next(tff_state, datasets).state
    assert metrics["aggregation"]["clip_by_norm/clipped_count"] > 0
    for mine, tffs in zip(
        ours.get_model_weights(state).trainable, theirs.get_model_weights(tff_state).trainable
    ):
        np.testing.assert_allclose(mine, tffs, rtol=1e-5, atol=1e-6)


def test_tff_trainer_matches_native_local_training():
    model = build_model(None, "digits", (8, 8, 1), 10, seed=0)
    native = LocalTrainer(model, 0.1, 16, 2)
    trainer = TFFTrainer(model, lambda: build_model(None, "digits", (8, 8, 1), 10), native, 0.1)
    rng = np.random.default_rng(0)
    data = [
        (rng.random((n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))
        for n in (37, 50)
    ]
    weights = model.get_weights()
    results = trainer.train_cohort(
        weights, data, [np.random.default_rng(i) for i in range(len(data))]
    )
    for (x, y), result, seed in zip(data, results, range(len(data))):
        expected = native.train(weights, x, y, np.random.default_rng(seed))
        assert result.num_examples == expected.num_examples and result.steps == expected.steps
        np.testing.assert_allclose(result.delta, expected.delta, rtol=1e-4, atol=1e-5)
    # evaluation after TFF tracing still works on the eager Keras model
    assert 0.0 <= trainer.evaluate(weights, data[0][0], data[0][1])[1] <= 1.0


def test_simulate_engine_tff_matches_native(tmp_path: Path):
    common = dict(
        clients=6,
        clients_per_round=4,
        rounds=2,
        local_epochs=1,
        attack="gaussian",
        malicious_fraction=0.34,
        aggregator="trimmed_mean:trim_fraction=0.25",
        progress=False,
    )
    runs = {}
    for engine in ("native", "tff"):
        config = make_config({}, {**common, "engine": engine, "out": str(tmp_path / engine)})
        runs[engine] = simulate(config)
        on_disk = json.loads((tmp_path / engine / "results.json").read_text())
        assert on_disk["config"]["engine"] == engine
        assert set(on_disk["final"]["detection"]) >= {"precision", "recall"}
        assert all(c["trust"] is not None for c in on_disk["clients"].values() if c["malicious"])
    native, tff_run = (np.array([r["accuracy"] for r in runs[e]["rounds"]]) for e in runs)
    np.testing.assert_allclose(tff_run, native, atol=0.02)


def test_simulate_engine_tff_central_dp_uses_tffs_dp_aggregator(tmp_path: Path):
    config = make_config(
        {},
        dict(
            clients=8,
            clients_per_round=6,
            rounds=2,
            local_epochs=1,
            aggregator="mean",
            dp="central",
            dp_noise_multiplier=0.3,
            dp_adaptive_clip=True,
            engine="tff",
            progress=False,
            out=str(tmp_path),
        ),
    )
    results = simulate(config)
    assert "DifferentiallyPrivateFactory" in json.dumps(results["aggregator"])
    assert results["rounds"][-1]["measurements"]["dp_query_metrics/clip"] > 0
    assert 0.0 <= results["final"]["accuracy"] <= 1.0


def test_tff_worker_is_stopped_at_exit():
    script = (
        "import numpy as np\n"
        "from fedwarden.aggregation.chain import parse_chain\n"
        "from fedwarden.aggregation.tff import tff_step\n"
        "from fedwarden import tff_runtime\n"
        "step = tff_step(parse_chain('mean'))\n"
        "step(np.ones((3, 5), np.float32), np.ones(3), step.init())\n"
        "print(tff_runtime.worker_pids())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert pids, "expected TFF to have started a worker"
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "worker_binary" not in Path(f"/proc/{pid}/comm").read_text()
        )


@pytest.mark.slow
def test_acceptance_digits_median_gaussian_both_engines(tmp_path: Path):
    common = dict(
        dataset="digits",
        clients=10,
        clients_per_round=10,
        rounds=12,
        attack="gaussian",
        malicious_fraction=0.2,
        aggregator="median",
        seed=0,
        progress=False,
    )
    results = {}
    for engine in ("native", "tff"):
        config = make_config({}, {**common, "engine": engine, "out": str(tmp_path / engine)})
        results[engine] = simulate(config)
    acc = {e: r["final"]["accuracy"] for e, r in results.items()}
    assert acc["tff"] >= 0.85, acc
    assert abs(acc["tff"] - acc["native"]) <= 0.05, acc
    for r in results.values():
        detection = r["final"]["detection"]
        assert detection["precision"] is not None and detection["recall"] is not None
        malicious = [c for c in r["clients"].values() if c["malicious"]]
        assert len(malicious) == 2 and all(c["trust"] is not None for c in malicious)
