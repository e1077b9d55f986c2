"""A tiny model plugin for deployment tests: softmax regression (``--model tests.tiny_model:linear``).

For the synthetic dataset (20 features, 4 classes) it has 84 weights, so a coordinator with
hundreds of agents spends its time on the protocol, not on arithmetic.
"""

from __future__ import annotations

import tensorflow as tf


def linear(input_shape: tuple[int, ...], num_classes: int) -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.Input(input_shape),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(num_classes, kernel_initializer="zeros"),
        ],
        name="tiny_linear",
    )
