"""TensorFlow plumbing of the tensorflow-privacy queries behind ``central_dp`` and
``adaptive_clip_by_norm``: repeatable noise from TF's global seed, the compiled accumulation of
records, and query states as numpy tuples (what the step states and checkpoints hold).

TensorFlow is imported inside the functions: the aggregation package stays numpy-only until a
DP step runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def round_seed(seed: int, round_index: int) -> int:
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0] & 0x7FFFFFFF)


@contextlib.contextmanager
def tf_global_seed(seed: int | None) -> Iterator[None]:
    """Runs the block under ``tf.random.set_seed(seed)`` and restores TF's previous seed state.

    The DP queries draw noise from TF's global random state (no per-op seed is exposed), so a fixed
    global seed is the only way to make their noise repeat. TF's eager seed state is saved and put
    back afterwards, so code outside (e.g. Keras training) sees its own random stream unchanged.
    Side effect and cost: ``set_seed`` clears TF's eager kernel cache (that is what makes a
    repeated seed repeat its draws); re-instantiating kernels costs about 20 ms per round.
    """
    if seed is None:
        yield
        return
    import tensorflow as tf
    from tensorflow.python.eager import context

    ctx = context.context()
    graph = tf.compat.v1.get_default_graph()
    saved = (ctx._seed, getattr(ctx, "_rng", None), graph.seed)
    tf.random.set_seed(seed)
    try:
        yield
    finally:
        ctx._seed, ctx._rng = saved[0], saved[1]
        graph.seed = saved[2]


def compiled_accumulate(query: Any) -> Any:
    """``query.accumulate_record`` over the rows of a (K, ...) tensor, as one ``tf.function``.

    Only preprocessing (clipping) and summing run compiled; the noise (``get_noised_result``)
    runs eagerly, where the seed is applied, because a random op inside a traced function would
    repeat its draws.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def accumulate(params: Any, records: tf.Tensor) -> Any:
        sample_state = query.initial_sample_state(tf.TensorSpec(records.shape[1:], tf.float32))

        def body(i: tf.Tensor, state: Any) -> tuple[tf.Tensor, Any]:
            return i + 1, query.accumulate_record(params, state, records[i])

        _, sample_state = tf.while_loop(
            lambda i, _: i < tf.shape(records)[0], body, [tf.constant(0), sample_state]
        )
        return sample_state

    return accumulate


def flatten_state(global_state: Any) -> tuple[np.ndarray, ...]:
    """A query's global state (a nest of tensors) as a tuple of numpy arrays."""
    import tensorflow as tf

    return tuple(np.asarray(x) for x in tf.nest.flatten(global_state))
