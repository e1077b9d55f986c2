"""Keras models for the built-in datasets, or a user model given as ``package.module:function``.

Simulations, the coordinator and agents all build the model here, so the weight layout agrees.
"""

from __future__ import annotations

import importlib

import tensorflow as tf

from fedwarden.errors import UsageError


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
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model must look like package.module:function. Received: {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load model {spec!r}: {exc}") from None
    model = factory(input_shape, num_classes)
    if not isinstance(model, tf.keras.Model):
        raise UsageError(
            f"model factory {spec!r} must return a keras Model. Received: {type(model)}"
        )
    return model
