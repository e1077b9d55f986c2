"""Client-side DP-SGD: tensorflow-privacy's Keras optimizer and a per-client privacy account.

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

import math
from dataclasses import dataclass, field
from typing import Any

from fedwarden.aggregation.accounting import DPConfigError, composed_epsilon, dpsgd_epsilon


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


@dataclass
class ClientPrivacyAccount:
    """Each client's DP-SGD privacy spent, composed over every step of every round it trained.

    ``record`` is called after a client's local training; ``epsilon`` composes, with the RDP
    accountant, one ``PoissonSampledDpEvent(batch_size / examples, GaussianDpEvent(z))`` per step
    (grouped by local data size, which sets the rate, when it changes between rounds).

    WARNING: as in Abadi et al. 2016 and tensorflow-privacy, shuffled fixed-size batches are
    accounted as Poisson sampling, the customary approximation. The account is per client and
    example-level; it says nothing about user-level (whole-client) privacy.

    Example:
      >>> account = ClientPrivacyAccount(noise_multiplier=1.1, batch_size=32)
      >>> account.record("c01", num_examples=600, epochs=1)
      19
      >>> account.epsilon("c01", delta=1e-5) > 0  # doctest: +SKIP
      True
    """

    noise_multiplier: float
    batch_size: int
    # client id -> {local examples: steps taken with that many examples}
    steps_by_size: dict[str, dict[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DPConfigError(f"batch_size must be >= 1. Received: batch_size={self.batch_size}.")
        if not self.noise_multiplier >= 0:
            raise DPConfigError(
                "noise_multiplier must be >= 0. "
                f"Received: noise_multiplier={self.noise_multiplier}."
            )

    def record(
        self, client_id: str, num_examples: int, epochs: int = 1, steps: int | None = None
    ) -> int:
        """Adds one round of local training; returns the steps counted.

        ``steps`` defaults to ``epochs * ceil(num_examples / batch_size)`` (Keras ``fit`` with the
        last short batch kept); pass it when the trainer counts differently.
        """
        if num_examples < 1:
            raise DPConfigError(
                f"num_examples must be >= 1. Received: num_examples={num_examples} for "
                f"client {client_id!r}."
            )
        if steps is None:
            steps = epochs * math.ceil(num_examples / self.batch_size)
        if steps < 0:
            raise DPConfigError(f"steps must be >= 0. Received: steps={steps}.")
        by_size = self.steps_by_size.setdefault(client_id, {})
        by_size[int(num_examples)] = by_size.get(int(num_examples), 0) + int(steps)
        return int(steps)

    def steps(self, client_id: str) -> int:
        """Total DP-SGD steps the client has taken."""
        return sum(self.steps_by_size.get(client_id, {}).values())

    def epsilon(self, client_id: str, delta: float) -> float:
        """The client's epsilon at ``delta`` over all its recorded steps (0.0 if none).

        With one data size this is ``dpsgd_epsilon(z, batch_size, examples, steps, delta)``.
        """
        by_size = self.steps_by_size.get(client_id, {})
        if len(by_size) == 1:
            ((num_examples, steps),) = by_size.items()
            return dpsgd_epsilon(self.noise_multiplier, self.batch_size, num_examples, steps, delta)
        events = [
            (self.noise_multiplier, min(1.0, self.batch_size / n), steps)
            for n, steps in by_size.items()
        ]
        return composed_epsilon(events, delta, "rdp")

    def epsilons(self, delta: float) -> dict[str, float]:
        """Epsilon at ``delta`` for every client with recorded steps."""
        return {cid: self.epsilon(cid, delta) for cid in self.steps_by_size}
