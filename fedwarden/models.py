"""Keras models for the built-in datasets, or a user model given as ``package.module:function``.

Simulations, the coordinator and agents all build the model here, so the weight layout agrees.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedwarden.errors import UsageError
from fedwarden.plugins import load_callable


def build_model(
    spec: str | None, dataset: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> tf.keras.Model:
    """Builds an uncompiled model that outputs logits.

    ``spec`` None picks the default for the dataset: an MLP for digits and synthetic data, a small CNN
    for 28x28 images. A ``module:function`` spec is called as ``function(input_shape, num_classes)``.

    Example: ``build_model(None, "digits", (8, 8, 1), 10)``
    """
    tf.keras.utils.set_random_seed(seed)
    if spec:
        return _user_model(spec, input_shape, num_classes)
    layers = tf.keras.layers
    if len(input_shape) == 3 and input_shape[0] >= 28:
        body = [
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
        ]
    else:
        body = [layers.Flatten(), layers.Dense(64, activation="relu")]
    return tf.keras.Sequential(
        [tf.keras.Input(input_shape), *body, layers.Dense(num_classes)], name=f"{dataset}_default"
    )


def _user_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> tf.keras.Model:
    factory = load_callable(spec, "--model")
    model = factory(input_shape, num_classes)
    if not isinstance(model, tf.keras.Model):
        raise UsageError(
            f"model factory {spec!r} must return a keras Model. Received: {type(model)}"
        )
    return model


def loss_and_accuracy(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``logits`` (N, classes) against integer labels ``y``."""
    losses = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return float(np.mean(losses.numpy())), float(np.mean(np.argmax(logits, 1) == y))


class Evaluator:
    """Held-out evaluation of a model's weights: what a coordinator needs, without training.

    Args:
      model: the run's Keras model (logits); its weights are overwritten by each call.
      batch: rows per forward pass.

    Example::

        evaluator = Evaluator(build_model(None, "digits", (8, 8, 1), 10))
        loss, accuracy = evaluator.evaluate(model.get_weights(), x_test, y_test)
    """

    def __init__(self, model: tf.keras.Model, batch: int = 512):
        self.model = model
        self.batch = batch
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self._forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def predict(self, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` under ``weights``."""
        self.model.set_weights(weights)
        chunks = [
            self._forward(x[i : i + self.batch]).numpy() for i in range(0, len(x), self.batch)
        ]
        return np.concatenate(chunks) if chunks else self._forward(x).numpy()

    def evaluate(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        """(loss, accuracy) of ``weights`` on ``x``, ``y``."""
        return loss_and_accuracy(self.predict(weights, x), y)
