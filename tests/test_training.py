"""Local training: a cohort trained on several model copies at once equals client-by-client training."""

import numpy as np
import pytest
import tensorflow as tf

from fedwarden.clients.training import LocalTrainer
from fedwarden.models import build_model


def _cohort(n: int, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.random((s, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, s).astype(np.int64))
        for s in sizes[:n]
    ]


@pytest.mark.parametrize("copies", [2, 3])
def test_train_cohort_matches_training_one_client_after_the_other(copies: int):
    tf.config.experimental.enable_op_determinism()
    model = build_model(None, "digits", (8, 8, 1), 10, seed=0)
    weights = model.get_weights()
    trainer = LocalTrainer(model, 0.1, 16, 2, copies=copies)
    data = _cohort(5, [40, 33, 57, 16, 40])

    def rngs() -> list[np.random.Generator]:
        return [np.random.default_rng([1, i]) for i in range(len(data))]

    one_by_one = [trainer.train(weights, x, y, r) for (x, y), r in zip(data, rngs())]
    together = trainer.train_cohort(weights, data, rngs())
    assert len(trainer._replicas) == copies
    for a, b in zip(one_by_one, together, strict=True):
        np.testing.assert_array_equal(a.delta, b.delta)
        assert (a.loss, a.steps, a.num_examples) == (b.loss, b.steps, b.num_examples)
    assert np.abs(together[0].delta).max() > 0
    # the global weights go in unchanged, and the trainer's own model is left usable
    for w, original in zip(weights, build_model(None, "digits", (8, 8, 1), 10, 0).get_weights()):
        np.testing.assert_array_equal(w, original)


class _Scale(tf.keras.layers.Layer):
    """A custom layer without ``get_config`` and an argument Keras cannot serialize: Keras cannot
    clone a model that holds it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def call(self, x):
        return self.fn(x)


def test_a_model_that_cannot_be_cloned_trains_on_one_copy():
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            _Scale(lambda x: 2.0 * x),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10),
        ]
    )
    trainer = LocalTrainer(model, 0.1, 16, 1, copies=2)
    data = _cohort(3, [20, 20, 20])
    rngs = [np.random.default_rng(i) for i in range(3)]
    results = trainer.train_cohort(model.get_weights(), data, rngs)
    assert len(results) == 3 and trainer.copies == 1


def test_predict_shares_rows_between_copies_and_agrees_with_one_copy():
    model = build_model(None, "digits", (8, 8, 1), 10, seed=0)
    weights = model.get_weights()
    x = np.random.default_rng(2).random((101, 8, 8, 1), dtype=np.float32)
    one = LocalTrainer(model, 0.1, 16, 1, copies=1).predict(weights, x, batch=16)
    shared = LocalTrainer(model, 0.1, 16, 1, copies=3)
    logits = shared.predict(weights, x, batch=16)
    assert len(shared._replicas) == 3 and logits.shape == (101, 10)
    np.testing.assert_allclose(logits, one, rtol=1e-5, atol=1e-6)
    assert shared.predict(weights, x[:0]).shape == (0, 10)
