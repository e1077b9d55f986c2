"""Client-side DP-SGD: tensorflow-privacy's Keras optimizer (the per-client privacy account,
``ClientPrivacyAccount``, is in ``fedwarden.aggregation.accounting``).

DP-SGD clips each example's (or microbatch's) gradient to ``l2_norm_clip``, sums, adds
N(0, (noise_multiplier * l2_norm_clip)^2) and averages, at every optimizer step. The guarantee is
example-level and local to one client's data: it protects each of that client's examples, and the
client's epsilon grows with every step it takes, over all the rounds it takes part in.

WARNING: the DP optimizer needs the *per-example* loss vector: compile the model with a loss built
with ``reduction=tf.keras.losses.Reduction.NONE`` (``per_example_loss`` does this). A scalar loss
fails inside the optimizer (with ``num_microbatches=1`` it would clip the whole batch as one
record).

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy".
  McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models".
  Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping".
"""

from __future__ import annotations

from typing import Any

# The account lives below server and clients (a coordinator accounts its agents' DP-SGD too).
from fedwarden.aggregation.accounting import ClientPrivacyAccount as ClientPrivacyAccount
from fedwarden.aggregation.accounting import DPConfigError


def dp_optimizer(
    l2_norm_clip: float,
    noise_multiplier: float,
    num_microbatches: int | None = None,
    learning_rate: float = 0.01,
) -> Any:
    """tensorflow-privacy's DP-SGD optimizer for ``model.compile`` (Keras 2, legacy SGD base).

    Args:
      l2_norm_clip: clip norm of each microbatch gradient.
      noise_multiplier: noise std divided by ``l2_norm_clip``.
      num_microbatches: must divide the batch size, and every batch (a short last batch fails
        in ``fit``; batch with ``drop_remainder=True``). None means one example per microbatch:
        per-example clipping, no divisibility constraint (recommended).
      learning_rate: SGD learning rate.

    Returns:
      A ``tensorflow_privacy.DPKerasSGDOptimizer``.

    Example:
      >>> model.compile(optimizer=dp_optimizer(1.0, 1.1), loss=per_example_loss())  # doctest: +SKIP
    """
    if not l2_norm_clip > 0:
        raise DPConfigError(
            f"l2_norm_clip must be > 0. Received: l2_norm_clip={l2_norm_clip}; about 1.0 is "
            "a common start."
        )
    if not noise_multiplier >= 0:
        raise DPConfigError(
            f"noise_multiplier must be >= 0. Received: noise_multiplier={noise_multiplier}."
        )
    if num_microbatches is not None and num_microbatches < 1:
        raise DPConfigError(
            f"num_microbatches must be >= 1 or None. Received: num_microbatches={num_microbatches}."
        )
    import tensorflow_privacy as tfp

    return tfp.DPKerasSGDOptimizer(
        l2_norm_clip=float(l2_norm_clip),
        noise_multiplier=float(noise_multiplier),
        num_microbatches=num_microbatches,
        learning_rate=float(learning_rate),
    )


def per_example_loss(
    name: str = "sparse_categorical_crossentropy", from_logits: bool = False
) -> Any:
    """A Keras loss with ``reduction=NONE``, as the DP optimizer requires.

    Args:
      name: ``"sparse_categorical_crossentropy"``, ``"categorical_crossentropy"``,
        ``"binary_crossentropy"`` or ``"mse"``.
      from_logits: whether the model outputs logits (ignored for ``"mse"``).
    """
    import tensorflow as tf

    none = tf.keras.losses.Reduction.NONE
    losses = {
        "sparse_categorical_crossentropy": tf.keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": tf.keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": tf.keras.losses.BinaryCrossentropy,
    }
    if name == "mse":
        return tf.keras.losses.MeanSquaredError(reduction=none)
    if name not in losses:
        raise DPConfigError(
            f"per_example_loss supports {sorted([*losses, 'mse'])}. Received: name={name!r}."
        )
    return losses[name](from_logits=from_logits, reduction=none)
