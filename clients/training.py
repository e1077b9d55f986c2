"""Local Keras training: one model and one compiled training function shared by every client.

A process (a simulation, or an agent) builds one ``LocalTrainer``. Each client's training loads the
global weights into the same model and runs all its local steps in one call of one ``tf.function``
whose input signature has a free batch dimension, so nothing is retraced per client or per round.

``train_cohort`` (simulations) trains a cohort on several copies of the model at once, one Python
thread per copy: TensorFlow releases the GIL while a compiled function runs. The ops of one
client's step are small (batch 16 convolutions) and gain little from a second thread, so a
simulation process asks TensorFlow for one thread per op (``one_thread_per_op``) and keeps a copy
per core: ten Fashion-MNIST clients trained in 1.05 s one after the other, 0.8-0.9 s on two
copies with two threads per op, 0.5-0.6 s on two copies with one (2 cores; docs/performance.md).
``predict`` shares its rows between the copies. Each client still trains alone from the global
weights with its own shuffle, on deterministic kernels, so its result does not depend on which
copy trained it (random ops aside, see ``train_cohort``). TensorFlow's results do depend on its
thread count (kernels split their sums by thread), as they already depend on the core count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import tensorflow as tf

from fedwarden.models import loss_and_accuracy
from fedwarden.weights import WeightLayout

T = TypeVar("T")


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
    """A copy of the model with its own optimizer and compiled functions."""

    model: tf.keras.Model
    fit: Callable[..., tf.Tensor]
    predict: Callable[[tf.Tensor], tf.Tensor]


MAX_COPIES = 8
"""Most model copies a trainer makes by default (one per core up to this)."""


def default_copies() -> int:
    return min(MAX_COPIES, os.cpu_count() or 1)


def one_thread_per_op() -> bool:
    """Asks TensorFlow to give each op one core (or ``cores // default_copies()``); True if set.

    It has to happen before TensorFlow's runtime starts (the first op of the process); later it
    changes nothing and returns whether the setting was already that. For processes that train
    through ``train_cohort`` (simulations): see the module docstring.
    """
    threads = max(1, (os.cpu_count() or 1) // default_copies())
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime has started: the thread pools are fixed
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() == threads


class Trainer:
    """What a process trains clients with: ``LocalTrainer``, or ``--engine tff``'s
    ``fedwarden.simulations.tff_trainer.TFFTrainer``. A subclass trains a cohort; one client is
    a cohort of one."""

    def train_cohort(
        self,
        global_weights: list[np.ndarray],
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        rngs: Sequence[np.random.Generator],
    ) -> list[LocalResult]:
        """Trains every client from ``global_weights``; result ``i`` belongs to ``data[i]``,
        shuffled by ``rngs[i]``."""
        raise NotImplementedError

    def train(
        self,
        global_weights: list[np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
    ) -> LocalResult:
        """One client's training from ``global_weights``."""
        return self.train_cohort(global_weights, [(x, y)], [rng])[0]


class LocalTrainer(Trainer):
    def __init__(
        self,
        model: tf.keras.Model,
        learning_rate: float,
        batch_size: int,
        epochs: int,
        dp_sgd: DPSGDSettings | None = None,
        copies: int | None = None,
    ):
        """``copies``: most model copies ``train_cohort`` and ``predict`` use at once (default:
        one per core, at most ``MAX_COPIES``); 1 trains one client after the other on ``model``."""
        self.model = model
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.dp_sgd = dp_sgd
        self.copies = max(1, copies or default_copies())
        self.layout = WeightLayout.of(model.get_weights())
        self._loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
        self._x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self._replicas = [self._replica(model)]
        self._pool: ThreadPoolExecutor | None = None

    def _replica(self, model: tf.keras.Model) -> _Replica:
        if self.dp_sgd is None:
            optimizer = tf.keras.optimizers.legacy.SGD(self.learning_rate)
        else:
            from fedwarden.clients.dp_sgd import dp_optimizer

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
        return _Replica(
            model,
            tf.function(fit_steps, input_signature=signature),
            tf.function(lambda x: model(x, training=False), input_signature=[self._x_spec]),
        )

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

    def train_cohort(
        self,
        global_weights: list[np.ndarray],
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        rngs: Sequence[np.random.Generator],
    ) -> list[LocalResult]:
        """Trains every client from ``global_weights``; result ``i`` belongs to ``data[i]``.

        The same results as training client by client on one copy, computed on up to
        ``copies`` model copies at once (see the module docstring). Random ops (dropout, DP-SGD
        noise) draw from each copy's own stream: repeatable run to run, but not the
        client-by-client draws.
        """
        replicas = self._ready_replicas(min(len(data), self.copies))
        return self._on_copies(
            replicas,
            len(data),
            lambda replica, i: self._train_on(replica, global_weights, *data[i], rngs[i]),
        )

    def _on_copies(
        self, replicas: list[_Replica], n: int, job: Callable[[_Replica, int], T]
    ) -> list[T]:
        """``[job(copy, i) for i in range(n)]``, copy k doing jobs k, k + c, k + 2c, ... in turn."""
        c = len(replicas)
        if c == 1:
            return [job(replicas[0], i) for i in range(n)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.copies, thread_name_prefix="fedwarden-train")
        shares = list(
            self._pool.map(lambda k: [job(replicas[k], i) for i in range(k, n, c)], range(c))
        )
        return [shares[i % c][i // c] for i in range(n)]

    def _ready_replicas(self, n: int) -> list[_Replica]:
        """The first ``n`` copies, made and traced here, in the calling thread, on first use.

        A model ``clone_model`` cannot copy (a custom layer it cannot rebuild from its config)
        keeps training on the copies made so far.
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
            replica.predict.get_concrete_function()
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

    def predict(self, weights: list[np.ndarray], x: np.ndarray, batch: int = 512) -> np.ndarray:
        """Logits for ``x`` under ``weights``, in chunks of at most ``batch`` rows shared by the
        model copies (larger chunks were no faster and held more activation memory)."""
        replicas = self._ready_replicas(self.copies)
        for replica in replicas:
            replica.model.set_weights(weights)
        n = len(replicas) * -(-len(x) // (len(replicas) * batch))  # a multiple of the copies
        size = -(-len(x) // max(n, 1))
        chunks = self._on_copies(
            replicas, n, lambda replica, i: replica.predict(x[i * size : (i + 1) * size]).numpy()
        )
        return np.concatenate(chunks) if chunks else replicas[0].predict(x).numpy()

    def evaluate(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        """(loss, accuracy) on held-out data."""
        return loss_and_accuracy(self.predict(weights, x), y)
