"""A data-side detection signal: what each update does to the loss on server-held examples.

Zeno's *stochastic descendant score* (Xie, Koyejo and Gupta 2019) asks whether an update, applied
alone to the current global model, lowers the loss on a small validation batch the server holds.
fedwarden's updates are deltas (trained minus global weights), so the measurement is
``loss(w + step * g) - loss(w)``: negative for an update that helps, positive for one that hurts
(a sign flip, a random direction, a boost that overshoots). The step is Zeno's learning rate: a
short step along the update, not the client's whole model ``w + g``, which on non-iid data has
forgotten the classes its client lacks and is worse than ``w`` on a balanced validation set
however honest. Label flipping moves one source class much more than the mean, so the largest
per-class change is kept too.

A third measurement looks for updates that do almost nothing: the client's whole step ``w + g``
moves the per-class losses by some amount, and per unit of update norm an honest update moves
them far more than a random direction of the same norm does (most directions in weight space
barely change what the model computes). ``validation_effect`` is the log of the mean absolute
per-class change per unit norm. The coordinator hands both to ``aggregation.scoring`` as numbers; the model stays here.

The validation examples must never be client data: ``fedwarden simulate`` draws them from the
held-out split (the same draw as FLTrust's root set), ``fedwarden serve`` from its evaluation
data. A backdoor or DBA update keeps clean accuracy by design, so clean validation examples do
not see it.

References:
    Xie, Koyejo, Gupta. Zeno: Distributed Stochastic Gradient Descent with Suspicion-based
    Fault-tolerance. ICML 2019.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

VALIDATION_METRICS = ("validation_loss_change", "validation_class_change", "validation_effect")
"""Keys of :meth:`ValidationProbe.measure`, each an array of length K."""


DEFAULT_STEP = 0.3
"""Fraction of each update applied before the loss is measured."""


def held_out_indices(num_examples: int, size: int, seed: int) -> np.ndarray:
    """Which ``size`` of ``num_examples`` held-out examples the server keeps for itself: FLTrust's
    root set and the validation probe's examples are the same seeded draw (``[seed, 5]``)."""
    return np.random.default_rng([seed, 5]).permutation(num_examples)[:size]


def per_class_loss(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean cross-entropy of each class's examples (NaN for a class without examples).

    Args:
        logits: ``(n, num_classes)`` model outputs before the softmax.
        labels: ``(n,)`` integer labels.
        num_classes: the number of classes.

    Returns:
        Float64 array of length ``num_classes``.
    """
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = -log_softmax[np.arange(len(labels)), labels]
    counts = np.bincount(labels, minlength=num_classes)
    sums = np.bincount(labels, weights=losses, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class ValidationProbe:
    """Measures each update's loss change on the server's validation examples.

    Args:
        predict: flat global weights ``(d,)`` -> logits ``(n, num_classes)`` on the validation
            inputs (the run's model; ``fedwarden simulate`` and ``serve`` bind one).
        labels: ``(n,)`` integer labels of those inputs.
        num_classes: the number of classes.
        step: the fraction of each update applied (Zeno's learning rate) for the loss changes;
            the effect is measured on the whole update.

    Example::

        probe = ValidationProbe(lambda w: model_logits(w, x_val), y_val, 10)
        probe.measure(global_weights, updates)  # {"validation_loss_change": (K,), ...}
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        labels: np.ndarray,
        num_classes: int,
        step: float = DEFAULT_STEP,
    ):
        labels = np.asarray(labels).reshape(-1)
        if labels.size == 0:
            raise ValueError(
                "a validation probe needs at least one example. Received: 0 labels; set "
                "--validation-examples to a positive count or leave it at 0 for no probe."
            )
        self.predict = predict
        self.labels = labels.astype(np.int64)
        self.num_classes = int(num_classes)
        self.step = np.float32(step)
        self.class_share = np.bincount(self.labels, minlength=self.num_classes) / self.labels.size

    def measure(self, weights: np.ndarray, updates: np.ndarray) -> dict[str, np.ndarray]:
        """``loss(w + step * g) - loss(w)`` for each row ``g`` of ``updates``, over all validation
        examples and for the class where it grows most, and the effect of the whole update.

        Args:
            weights: ``(d,)`` the global weights the updates were trained from.
            updates: ``(K, d)`` the admitted deltas (not modified; read one row at a time, so a
                spilled matrix stays on disk).

        Returns:
            ``{"validation_loss_change": (K,), "validation_class_change": (K,),
            "validation_effect": (K,)}``, float64; NaN for a row whose model gives non-finite
            logits (and an effect of NaN for a zero update).
        """
        weights = np.asarray(weights, np.float32)
        base = self._class_losses(weights)
        k = updates.shape[0]
        overall, worst_class, effect = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan)
        for i in range(k):
            change = self._class_losses(weights + self.step * updates[i]) - base
            if np.all(np.isfinite(change[self.class_share > 0])):
                overall[i] = float(np.nansum(self.class_share * change))
                worst_class[i] = float(np.nanmax(change))
            whole = self._class_losses(weights + updates[i]) - base
            moved = float(np.nansum(self.class_share * np.abs(whole)))
            norm = float(np.linalg.norm(np.asarray(updates[i], np.float64)))
            if np.all(np.isfinite(whole[self.class_share > 0])) and moved > 0 and norm > 0:
                effect[i] = float(np.log(moved / norm))
        return {
            "validation_loss_change": overall,
            "validation_class_change": worst_class,
            "validation_effect": effect,
        }

    def _class_losses(self, weights: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return per_class_loss(self.predict(weights), self.labels, self.num_classes)
