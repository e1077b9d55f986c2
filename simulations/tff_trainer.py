"""``fedwarden simulate --engine tff``: client training by TFF inside the simulation runner.

:class:`TFFTrainer` is a ``fedwarden.clients.training.Trainer`` like the native
``LocalTrainer``, so the runner, attacks, chains, trust and DP run unchanged on TFF-trained
updates; the cohort trains in one call of
``fedwarden.simulations.tff_engine.TFFClientWork`` (the public TFF process's client work) on
datasets cut by :func:`epochs_dataset` into the native engine's batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedwarden.clients.training import LocalResult, LocalTrainer, Trainer
from fedwarden.errors import UsageError
from fedwarden.models import build_model
from fedwarden.simulations.tff_engine import TFFClientWork, keras_model_fn
from fedwarden.weights import WeightLayout

__all__ = ["TFFTrainer", "epochs_dataset"]


def epochs_dataset(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int
) -> tf.data.Dataset:
    """Local epochs as one dataset: ``order`` holds one permutation of the examples per epoch.

    Each epoch is cut into batches of ``min(batch_size, n)`` (the last one shorter) that never
    cross into the next epoch: the batches of ``LocalTrainer.batch_plan`` without DP-SGD, so the
    TFF engine sees exactly the native engine's shuffle, batch boundaries and epochs. Plain
    ``from_tensor_slices(...).batch`` per epoch, no ``map``: nothing to trace per client.
    """
    n = len(x)
    xs, ys = x[order].astype(np.float32), y[order].astype(np.int64)
    dataset = None
    for begin in range(0, len(order), n):
        epoch = tf.data.Dataset.from_tensor_slices((xs[begin : begin + n], ys[begin : begin + n]))
        epoch = epoch.batch(min(batch_size, n))
        dataset = epoch if dataset is None else dataset.concatenate(epoch)
    return dataset


class TFFTrainer(Trainer):
    """A ``Trainer`` whose client training is done by TFF (``--engine tff``).

    Args:
      model: the simulation's Keras model (its weight order is the run's flat layout).
      build_keras: builds a fresh model of the same architecture (for TFF's ``model_fn``).
      native: the native trainer with the same hyperparameters: its ``batch_plan`` gives the
        seed-driven shuffle and batches, and server-side evaluation stays native (it is not
        client work), so the two engines are scored by the same code.

    ``train_cohort`` trains the whole cohort in one TFF call, with the native engine's learning
    rate (SGD), batch size, epochs and per-client shuffle. Non-trainable weights (e.g. batch-norm
    statistics) are not federated, as in TFF's FedAvg: their delta is 0.
    """

    def __init__(
        self,
        model: tf.keras.Model,
        build_keras: Callable[[], tf.keras.Model],
        native: LocalTrainer,
        learning_rate: float,
    ):
        if native.dp_sgd is not None:
            raise UsageError(
                "--dp-sgd runs on the native engine only: TFF's client work has no DP-SGD. Use "
                "--engine native, or central DP (--dp central), which the tff engine supports."
            )
        self.native = native
        self.layout = WeightLayout.of(model.get_weights())
        position = {id(w): i for i, w in enumerate(model.weights)}
        self._trainable = [position[id(w)] for w in model.trainable_weights]
        self._non_trainable = [position[id(w)] for w in model.non_trainable_weights]
        x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        spec = (x_spec, tf.TensorSpec((None,), tf.int64))
        optimizer = tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
        self.work = TFFClientWork(keras_model_fn(build_keras, spec), optimizer)

    @classmethod
    def for_simulation(cls, sim: Any, config: Any) -> TFFTrainer:
        """The trainer for a ``fedwarden.simulations.runner.Simulation`` run under ``config``."""
        ds = sim.federation.dataset

        def build_keras() -> tf.keras.Model:
            return build_model(config.model, ds.name, ds.input_shape, ds.num_classes, config.seed)

        native = sim.trainer(dataclasses.replace(config, engine="native"))
        return cls(sim.model, build_keras, native, config.lr)

    def train_cohort(
        self,
        global_weights: list[np.ndarray],
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        rngs: Sequence[np.random.Generator],
    ) -> list[LocalResult]:
        """Local training of every client, in one TFF call; result ``i`` belongs to ``data[i]``."""
        plans = [
            self.native.batch_plan(len(x), rng) for (x, _), rng in zip(data, rngs, strict=True)
        ]
        bs = self.native.batch_size
        datasets = [epochs_dataset(x, y, plan[0], bs) for (x, y), plan in zip(data, plans)]
        weights = tff.learning.models.ModelWeights(
            [global_weights[i] for i in self._trainable],
            [global_weights[i] for i in self._non_trainable],
        )
        results = []
        outputs = self.work(weights, datasets)
        for out, plan, (x, _) in zip(outputs, plans, data, strict=True):
            full = [np.zeros(s, np.float32) for s in self.layout.shapes]
            for i, part in zip(self._trainable, self.work.layout.unflatten(out.delta)):
                full[i] = part
            loss = float("nan") if out.loss is None else out.loss
            # TFF counts examples processed (epochs x size); the native engine reports the size.
            count = len(x) if out.num_examples > 0 else 0
            results.append(LocalResult(self.layout.flatten(full), loss, len(plan[1]), count))
        return results

    def predict(self, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        return self.native.predict(weights, x)

    def evaluate(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        return self.native.evaluate(weights, x, y)
