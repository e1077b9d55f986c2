"""The data-side signal (server/validation.py): each update's loss change on server-held examples,
scored against the cohort (``validation`` in aggregation/scoring.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fedwarden.aggregation.chain import parse_chain
from fedwarden.aggregation.scoring import anomaly_components, anomaly_score
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy
from fedwarden.server.validation import ValidationProbe, per_class_loss

CLASSES, FEATURES = 4, 8


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian classes around fixed centres: a task a softmax regression learns."""
    centres = np.random.default_rng(99).normal(scale=2.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, n)
    return centres[y] + rng.normal(size=(n, FEATURES)), y


def logits(flat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A tiny model: softmax regression, weights flat (features * CLASSES + CLASSES)."""
    w = flat[: x.shape[1] * CLASSES].reshape(x.shape[1], CLASSES)
    with np.errstate(over="ignore", invalid="ignore"):  # float32, as a Keras model computes
        return x.astype(np.float32) @ w + flat[x.shape[1] * CLASSES :]


def local_update(flat: np.ndarray, x: np.ndarray, y: np.ndarray, steps: int = 20) -> np.ndarray:
    """Trained minus global weights after a few full-batch gradient steps (a client's delta)."""
    w = flat.astype(np.float64).copy()
    onehot = np.eye(CLASSES)[y]
    for _ in range(steps):
        z = logits(w, x)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        w -= 0.5 * np.concatenate([(x.T @ g).ravel(), g.sum(0)])
    return (w - flat).astype(np.float32)


def cohort(
    attack: str, seed: int = 0, blank: int = 0
) -> tuple[np.ndarray, np.ndarray, ValidationProbe]:
    """Eight honest updates on skewed shards (two classes each, weighted differently) and two
    attackers, from a partly trained global model; the server's probe holds 200 clean
    examples. ``blank`` input features are always 0 (an image's empty border): the model's
    weights on them change nothing it computes."""
    rng = np.random.default_rng(seed)
    x, y = blobs(2000, rng)
    x = np.hstack([x, np.zeros((len(x), blank))])
    start = local_update(np.zeros(x.shape[1] * CLASSES + CLASSES, np.float32), x[:40], y[:40], 3)
    rows = []
    for i in range(10):
        keep = (y == i % CLASSES) | (rng.random(len(y)) < 0.3)  # skewed towards one class
        xi, yi = x[keep][:150], y[keep][:150]
        if i >= 8 and attack == "label_flip":
            yi = np.where(yi == 0, 1, yi)  # class 0 taught as class 1
        delta = local_update(start, xi, yi)
        if i >= 8 and attack == "random_direction":  # the honest median norm, any direction
            delta = rng.normal(size=delta.size).astype(np.float32)
            delta *= np.median(np.linalg.norm(rows, axis=1)) / np.linalg.norm(delta)
        rows.append(-delta if i >= 8 and attack == "sign_flip" else delta)
    xv, yv = blobs(200, np.random.default_rng(seed + 1))
    xv = np.hstack([xv, np.zeros((len(xv), blank))])
    return start, np.stack(rows), ValidationProbe(lambda w: logits(w, xv), yv, CLASSES)


def test_per_class_loss_is_each_class_mean_cross_entropy():
    z = np.log(np.array([[0.5, 0.5, 1e-12], [0.9, 0.1, 1e-12], [0.2, 0.8, 1e-12]]))
    loss = per_class_loss(z, np.array([0, 0, 1]), 3)
    assert loss[0] == pytest.approx((np.log(2) - np.log(0.9)) / 2)
    assert loss[1] == pytest.approx(-np.log(0.8))
    assert np.isnan(loss[2])  # no example of class 2


@pytest.mark.parametrize("attack", ["sign_flip", "label_flip"])
def test_the_validation_component_separates_attackers_from_skewed_honest_clients(attack):
    start, updates, probe = cohort(attack)
    measured = probe.measure(start, updates)
    honest, attackers = slice(0, 8), slice(8, 10)
    if attack == "sign_flip":  # the flipped update undoes training: the loss grows
        assert measured["validation_loss_change"][attackers].min() > 0
        assert measured["validation_loss_change"][honest].max() < 0
    else:  # the flipped class gets worse than any class gets under an honest update
        assert (
            measured["validation_class_change"][attackers].min()
            > measured["validation_class_change"][honest].max()
        )
    component = anomaly_components(measured)["validation"]
    assert component[attackers].min() > 0.9
    assert component[honest].max() < 0.1


def test_an_update_that_barely_moves_the_model_for_its_norm_is_inert():
    start, updates, probe = cohort("random_direction", blank=2000)
    measured = probe.measure(start, updates)
    effect = measured["validation_effect"]
    assert effect[8:].max() < effect[:8].min() - 1.0  # e times less effect per unit norm
    inert = anomaly_components(measured)["inert"]
    assert inert[8:].min() > 0.4 and inert[:8].max() < 0.01  # near or beyond a robust z of 5
    # a sharp component: alone it floors the score of the random directions
    scores = anomaly_score(measured, {"validation": 0.03, "inert": 0.01})
    np.testing.assert_array_less(inert[8:] - 1e-12, scores[8:])
    assert scores[8:].min() > 2 * scores[:8].max()


def test_a_non_finite_model_leaves_the_measurement_unknown():
    start, updates, probe = cohort("none")
    updates[3] = np.float32(3e38)  # the logits overflow
    measured = probe.measure(start, updates)
    assert np.isnan(measured["validation_loss_change"][3])
    assert np.isfinite(np.delete(measured["validation_loss_change"], 3)).all()


def test_a_probe_needs_examples():
    with pytest.raises(ValueError, match="validation-examples"):
        ValidationProbe(lambda w: np.zeros((0, 2)), np.zeros(0, int), 2)


def coordinator(start: np.ndarray, probe: ValidationProbe | None) -> Coordinator:
    return Coordinator(
        start,
        parse_chain("median"),
        ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
        anomaly_weights={"norm_z": 1.0, "validation": 1.0},
        validation=probe,
    )


def test_the_coordinator_scores_validation_only_when_it_has_validation_data():
    start, updates, probe = cohort("sign_flip")
    ids = [f"c{i}" for i in range(10)]
    sent = [ClientUpdate(c, 1, u, 100) for c, u in zip(ids, updates)]

    without = coordinator(start, None).finish_round(1, ids, sent)
    assert all(row.validation_loss_change is None for row in without.clients)

    probed = coordinator(start, probe)
    with_probe = probed.finish_round(1, ids, sent)
    change = [row.validation_loss_change for row in with_probe.clients]
    np.testing.assert_allclose(change, probe.measure(start, updates)["validation_loss_change"])
    anomaly = [row.anomaly for row in with_probe.clients]
    assert min(anomaly[8:]) > max(anomaly[:8])  # measured from the weights before the step
    assert not np.allclose(probed.weights, start)


def test_without_validation_measurements_the_weight_changes_nothing():
    rng = np.random.default_rng(3)
    metrics = {"norm": rng.uniform(1, 2, 10), "norm_z": rng.normal(size=10)}
    assert "validation" not in anomaly_components(metrics)
    np.testing.assert_array_equal(
        anomaly_score(metrics, {"norm_z": 1.0, "validation": 5.0}),
        anomaly_score(metrics, {"norm_z": 1.0}),
    )


@pytest.mark.parametrize("examples", [0, 30])
def test_serve_draws_its_validation_examples_from_its_evaluation_data(tmp_path, examples):
    from fedwarden.config import Config, DeploymentConfig, TrustConfig
    from fedwarden.server.serve import EvalData, Server
    from fedwarden.server.validation import held_out_indices
    from fedwarden.weights import WeightLayout

    x, y = blobs(200, np.random.default_rng(5))
    data = EvalData("blobs", x.astype(np.float32), y, CLASSES)
    deployment = DeploymentConfig(state_dir=str(tmp_path), insecure=True)
    server = Server(Config(deployment=deployment, trust=TrustConfig(validation_examples=examples)))
    layout = WeightLayout.of([np.zeros(FEATURES * CLASSES + CLASSES, np.float32)])
    seen = []

    class Evaluator:  # what serve's evaluator offers: logits of the model's weights
        def predict(self, weights, inputs):
            seen.append(inputs)
            return logits(weights[0], inputs)

    probe = server._probe(data, Evaluator(), layout)
    if examples == 0:
        assert probe is None
        return
    idx = held_out_indices(len(y), examples, server.config.seed)
    np.testing.assert_array_equal(probe.labels, y[idx])
    start, updates, _ = cohort("sign_flip")
    assert probe.measure(start, updates)["validation_loss_change"].shape == (10,)
    np.testing.assert_array_equal(seen[0], data.x[idx])
