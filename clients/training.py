"""Local Keras training: one model and one compiled training function shared by every client.

A process (a simulation, or an agent) builds one ``LocalTrainer``. Each client's training loads the
global weights into the same model and runs all its local steps in one call of one ``tf.function``
whose input signature has a free batch dimension, so nothing is retraced per client or per round.

``train_cohort`` (simulations) trains a cohort on a few copies of the model at once, one Python
thread per copy: TensorFlow releases the GIL while a compiled function runs, and the small ops
of one client's step (batch 16 convolutions) leave cores idle that another client's steps fill.
Each client still trains alone from the global weights with its own shuffle, on deterministic
kernels, so its result does not depend on which copy trained it (random ops aside, see there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from fedwarden.weights import WeightLayout


@dataclass(frozen=True)
class DPSGDSettings:
    l2_norm_clip: float
    noise_multiplier: float
    num_microbatches: int | None = None


@dataclass
class LocalResult:
    delta: np.ndarray  # flat float32: local minus global weights
    loss: float  # mean training loss over the local steps
    steps: int
    num_examples: int


@dataclass
class _Replica:
    """A copy of the model with its own optimizer and compiled training function."""

    model: tf.keras.Model
    fit: Callable[..., tf.Tensor]


class LocalTrainer:
    def __init__(
        self,
        model: tf.keras.Model,
        learning_rate: float,
        batch_size: int,
        epochs: int,
        dp_sgd: DPSGDSettings | None = None,
        copies: int | None = None,
    ):
        """``copies``: most model copies ``train_cohort`` uses at once (default: the CPU count, at
        most 4); 1 trains one client after the other on ``model``."""
        self.model = model
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.dp_sgd = dp_sgd
        self.copies = max(1, copies or min(4, os.cpu_count() or 1))
        self.layout = WeightLayout.of(model.get_weights())
        self._loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
        self._x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self._replicas = [self._replica(model)]
        self._pool: ThreadPoolExecutor | None = None
        self._predict = tf.function(
            lambda x: model(x, training=False), input_signature=[self._x_spec]
        )

    def _replica(self, model: tf.keras.Model) -> _Replica:
        if self.dp_sgd is None:
            optimizer = tf.keras.optimizers.legacy.SGD(self.learning_rate)
        else:
            from clients.dp_sgd import dp_optimizer

            optimizer = dp_optimizer(
                self.dp_sgd.l2_norm_clip,
                self.dp_sgd.noise_multiplier,
                self.dp_sgd.num_microbatches or self.batch_size,
                self.learning_rate,
            )

        def fit_steps(x, y, order, starts, lengths):
            variables = model.trainable_variables
            total = tf.constant(0.0)
            for i in tf.range(tf.shape(starts)[0]):
                batch = order[starts[i] : starts[i] + lengths[i]]
                xb, yb = tf.gather(x, batch), tf.gather(y, batch)
                with tf.GradientTape() as tape:
                    losses = self._loss(yb, model(xb, training=True))
                    # tensorflow-privacy's optimizer clips per microbatch: it needs the loss vector.
                    objective = losses if self.dp_sgd else tf.reduce_mean(losses)
                optimizer.minimize(objective, variables, tape=tape)
                total += tf.reduce_mean(losses)
            return total / tf.cast(tf.maximum(tf.shape(starts)[0], 1), tf.float32)

        index_spec = tf.TensorSpec((None,), tf.int32)
        signature = [self._x_spec, tf.TensorSpec((None,), tf.int64), *[index_spec] * 3]
        return _Replica(model, tf.function(fit_steps, input_signature=signature))

    def batch_plan(self, num_examples: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Shuffled example order for all epochs, cut into batches that do not cross epochs.

        DP-SGD keeps only full batches, since its accounting and microbatching assume a fixed size.
        """
        bs = min(self.batch_size, num_examples)
        per_epoch = num_examples // bs if self.dp_sgd else -(-num_examples // bs)
        starts = (np.arange(per_epoch) * bs)[None, :] + (np.arange(self.epochs) * num_examples)[
            :, None
        ]
        lengths = np.minimum(bs, num_examples - (starts % num_examples))
        order = np.concatenate([rng.permutation(num_examples) for _ in range(self.epochs)])
        return (
            order.astype(np.int32),
            starts.ravel().astype(np.int32),
            lengths.ravel().astype(np.int32),
        )

    def train(
        self,
        global_weights: list[np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
    ) -> LocalResult:
        return self._train_on(self._replicas[0], global_weights, x, y, rng)

    def train_cohort(
        self,
        global_weights: list[np.ndarray],
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        rngs: Sequence[np.random.Generator],
    ) -> list[LocalResult]:
        """Trains every client from ``global_weights``; result ``i`` belongs to ``data[i]``.

        The same results as ``train`` client by client, computed on up to ``copies`` model
        copies at once (see the module docstring). Random ops (dropout, DP-SGD noise) draw from
        each copy's own stream: repeatable run to run, but not the client-by-client draws.
        """
        replicas = self._ready_replicas(min(len(data), self.copies))
        if len(replicas) == 1:
            return [self.train(global_weights, x, y, r) for (x, y), r in zip(data, rngs)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.copies, thread_name_prefix="fedwarden-train")
        n = len(replicas)

        def share(k: int) -> list[LocalResult]:  # copy k trains clients k, k + n, k + 2n, ...
            return [
                self._train_on(replicas[k], global_weights, *data[i], rngs[i])
                for i in range(k, len(data), n)
            ]

        shares = list(self._pool.map(share, range(n)))
        return [shares[i % n][i // n] for i in range(len(data))]

    def _ready_replicas(self, n: int) -> list[_Replica]:
        """The first ``n`` copies, made and traced here, in the calling thread, on first use.

        A model ``clone_model`` cannot copy (a subclassed model) keeps training on one copy.
        """
        while len(self._replicas) < n:
            try:
                model = tf.keras.models.clone_model(self.model)
            except (ValueError, TypeError, NotImplementedError):
                self.copies = len(self._replicas)
                break
            self._replicas.append(self._replica(model))
        for replica in self._replicas[:n]:  # tracing stays out of the worker threads
            replica.fit.get_concrete_function()
        return self._replicas[:n]

    def _train_on(
        self,
        replica: _Replica,
        global_weights: list[np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
    ) -> LocalResult:
        replica.model.set_weights(global_weights)
        order, starts, lengths = self.batch_plan(len(x), rng)
        loss = float(replica.fit(x, y, order, starts, lengths))
        delta = self.layout.flatten(replica.model.get_weights()) - self.layout.flatten(
            global_weights
        )
        return LocalResult(delta, loss, len(starts), len(x))

    def predict(self, weights: list[np.ndarray], x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Logits for ``x`` under ``weights``."""
        self.model.set_weights(weights)
        return np.concatenate(
            [self._predict(x[i : i + batch]).numpy() for i in range(0, len(x), batch)]
        )

    def evaluate(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        """(loss, accuracy) on held-out data."""
        logits = self.predict(weights, x)
        loss = float(np.mean(self._loss(y, logits).numpy()))
        return loss, float(np.mean(np.argmax(logits, 1) == y))
