"""Local Keras training: one model and one compiled training function shared by every client.

A process (a simulation, or an agent) builds one ``LocalTrainer``. Each client's training loads the
global weights into the same model and runs all its local steps in one call of one ``tf.function``
whose input signature has a free batch dimension, so nothing is retraced per client or per round.
"""

from __future__ import annotations

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


class LocalTrainer:
    def __init__(
        self,
        model: tf.keras.Model,
        learning_rate: float,
        batch_size: int,
        epochs: int,
        dp_sgd: DPSGDSettings | None = None,
    ):
        self.model = model
        self.batch_size = batch_size
        self.epochs = epochs
        self.dp_sgd = dp_sgd
        self.layout = WeightLayout.of(model.get_weights())
        self._loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
        if dp_sgd is None:
            self._optimizer = tf.keras.optimizers.legacy.SGD(learning_rate)
        else:
            from clients.dp_sgd import dp_optimizer

            self._optimizer = dp_optimizer(
                dp_sgd.l2_norm_clip,
                dp_sgd.noise_multiplier,
                dp_sgd.num_microbatches or batch_size,
                learning_rate,
            )
        x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        index_spec = tf.TensorSpec((None,), tf.int32)
        self._fit = tf.function(
            self._fit_steps,
            input_signature=[
                x_spec,
                tf.TensorSpec((None,), tf.int64),
                index_spec,
                index_spec,
                index_spec,
            ],
        )
        self._predict = tf.function(lambda x: model(x, training=False), input_signature=[x_spec])

    def _fit_steps(self, x, y, order, starts, lengths):
        variables = self.model.trainable_variables
        total = tf.constant(0.0)
        for i in tf.range(tf.shape(starts)[0]):
            batch = order[starts[i] : starts[i] + lengths[i]]
            xb, yb = tf.gather(x, batch), tf.gather(y, batch)
            with tf.GradientTape() as tape:
                losses = self._loss(yb, self.model(xb, training=True))
                # tensorflow-privacy's optimizer clips per microbatch, so it needs the loss vector.
                objective = losses if self.dp_sgd else tf.reduce_mean(losses)
            self._optimizer.minimize(objective, variables, tape=tape)
            total += tf.reduce_mean(losses)
        return total / tf.cast(tf.maximum(tf.shape(starts)[0], 1), tf.float32)

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
        self.model.set_weights(global_weights)
        order, starts, lengths = self.batch_plan(len(x), rng)
        loss = float(self._fit(x, y, order, starts, lengths))
        delta = self.layout.flatten(self.model.get_weights()) - self.layout.flatten(global_weights)
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
