"""The TensorFlow Federated engine: client training by TFF, robust aggregation and trust by fedwarden.

Two layers, each usable alone:

- :class:`TFFClientWork`: one round of local training on a cohort, done by TFF's simulation
  runtime: the server weights are broadcast to ``tff.CLIENTS``, every client runs TFF's FedAvg
  client update (``tff.learning`` model, TFF optimizer, local SGD over its ``tf.data.Dataset``)
  and the model deltas come back *unaggregated*, one per client.
- :func:`build_robust_fedavg_process`: the public API for TFF users. An iterative process whose
  ``next(state, client_datasets, client_ids)`` runs that client work, then the fedwarden round
  logic (admission, any aggregation chain, per-client anomaly scores, trust, server optimizer) and
  returns ``(state, metrics)`` with per-client scores and trust keyed by client id.
The hook for ``fedwarden simulate --engine tff`` (``TFFTrainer``, the native ``LocalTrainer``'s
interface over :class:`TFFClientWork`) is in ``fedwarden.simulations.tff_trainer``.

Mean-based chains (``mean``, ``clip + mean``, ``central_dp``) are aggregated by TFF's own
aggregators (``aggregation/tff.py``); every other chain by fedwarden's numpy steps.

Example (runs as is; a few seconds once TensorFlow and TFF are imported)::

    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff
    from fedwarden.simulations.tff_engine import build_robust_fedavg_process

    spec = (tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int64))

    def model_fn():
        keras_model = tf.keras.Sequential([tf.keras.Input([4]), tf.keras.layers.Dense(3)])
        return tff.learning.models.from_keras_model(
            keras_model, input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    rng = np.random.default_rng(0)
    def client_data(n):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        return tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype(np.int64))).batch(8)

    process = build_robust_fedavg_process(
        model_fn, tff.learning.optimizers.build_sgdm(0.1), chain="median")
    state = process.initialize()
    ids = ["alice", "bob", "carol", "dave", "erin"]
    for _ in range(2):
        state, metrics = process.next(state, [client_data(32) for _ in ids], ids)
    print(metrics["clients"]["alice"]["trust"], metrics["aggregation"])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# TFF's FedAvg client update (the one ``build_weighted_fed_avg`` uses), reused rather than copied;
# the module is internal to TFF, so the pinned tensorflow-federated 0.87.0 is what was tested.
from tensorflow_federated.python.learning.templates import model_delta_client_work

from fedwarden import tff_runtime
from fedwarden.aggregation.base import Step
from fedwarden.aggregation.chain import parse_chain
from fedwarden.aggregation.tff import tff_factory, tff_step
from fedwarden.errors import UsageError
from fedwarden.records import ClientSummary
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy
from fedwarden.weights import WeightLayout

log = logging.getLogger("fedwarden.tff")

ModelFn = Callable[[], tff.learning.models.VariableModel]
OptimizerArg = tff.learning.optimizers.Optimizer | Callable[[], tff.learning.optimizers.Optimizer]

__all__ = [
    "ClientOutput",
    "RobustFedAvgProcess",
    "RobustFedAvgState",
    "TFFClientWork",
    "build_robust_fedavg_process",
    "build_tff_fedavg",
    "keras_model_fn",
]


def keras_model_fn(build_keras: Callable[[], tf.keras.Model], input_spec: Any) -> ModelFn:
    """A TFF ``model_fn`` from a Keras builder: a fresh model per call, logits, sparse labels."""

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            build_keras(),
            input_spec=input_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    return model_fn


def _optimizer(client_optimizer: OptimizerArg) -> tff.learning.optimizers.Optimizer:
    optimizer = client_optimizer
    if not isinstance(optimizer, tff.learning.optimizers.Optimizer) and callable(optimizer):
        optimizer = optimizer()
    if not isinstance(optimizer, tff.learning.optimizers.Optimizer):
        raise UsageError(
            "client_optimizer must be a tff.learning.optimizers.Optimizer or a no-argument "
            f"function returning one. Received: {client_optimizer!r}; use e.g. "
            "tff.learning.optimizers.build_sgdm(learning_rate=0.1)."
        )
    return optimizer


@dataclass
class ClientOutput:
    """One client's local training, as TFF reported it."""

    delta: np.ndarray  # flat float32: trained minus initial trainable weights
    num_examples: int
    loss: float | None  # mean training loss per example over the local steps


class TFFClientWork:
    """Local training of a whole cohort in one call of one TFF computation, traced once.

    Args:
      model_fn: no-argument function returning a fresh ``tff.learning.models.VariableModel``
        (e.g. :func:`keras_model_fn` or ``tff.learning.models.from_keras_model``).
      client_optimizer: a ``tff.learning.optimizers.Optimizer`` (or a function returning one).

    Each client runs TFF's FedAvg client update (the same code as
    ``tff.learning.algorithms.build_weighted_fed_avg``): one pass over its dataset, one optimizer
    step per batch. Epochs and shuffling belong to the dataset (``dataset.shuffle(...).repeat(E)``).

    Per-client identity: the computation's argument ``datasets`` and its result are placed at
    ``tff.CLIENTS``. In TFF's Python execution context a CLIENTS-placed argument is given as a
    Python list, one dataset per client, and a CLIENTS-placed result comes back as a Python list
    in the same order: output ``i`` is the training of ``datasets[i]``. TFF itself never names
    clients, so the caller keeps the client ids in a list beside the datasets and zips the two;
    that pairing attaches every delta, loss, anomaly score and trust update to the right client.
    TFF's aggregators, anonymous by design, never need it: aggregation happens afterwards.

    The delta is returned the fedwarden way round (trained minus initial weights; TFF's
    ``ClientResult.update`` is initial minus trained), over the trainable weights only, flattened in
    ``ModelWeights.trainable`` order (:attr:`layout`). ``num_examples`` is TFF's client weight
    (the number of examples processed, over all local epochs). A client whose training went non-finite comes back from TFF zeroed, with
    weight 0 and its metrics reset, like an empty dataset: it reports 0 examples, which admission
    rejects (``bad_example_count``) and charges to the client's trust, instead of averaging in
    a silent zero.
    """

    def __init__(self, model_fn: ModelFn, client_optimizer: OptimizerArg):
        tff_runtime.stop_workers_at_exit()
        optimizer = _optimizer(client_optimizer)
        with tf.Graph().as_default():
            model = model_fn()
            self.input_spec = model.input_spec
            weights_type = tff.learning.models.weights_type_from_model(model)
            trainable = tff.learning.models.ModelWeights.from_model(model).trainable
            self.layout = WeightLayout(tuple(tuple(v.shape.as_list()) for v in trainable))
        data_type = tff.SequenceType(tff.types.tensorflow_to_type(self.input_spec))

        @tff.tensorflow.computation(weights_type, data_type)
        def client_update(weights, dataset):
            update = model_delta_client_work.build_model_delta_update_with_tff_optimizer(
                model_fn,
                weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
                loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE,
            )
            return update(optimizer, weights, dataset)

        @tff.federated_computation(
            tff.FederatedType(weights_type, tff.SERVER), tff.FederatedType(data_type, tff.CLIENTS)
        )
        def train_clients(weights, datasets):
            return tff.federated_map(client_update, (tff.federated_broadcast(weights), datasets))

        self.computation = train_clients
        # Tracing built Keras layers inside a TF1 graph, which switches their classes to Keras's
        # v1 base classes (keras.src.utils.version_utils.swap_class) and breaks every eager model
        # of those classes ("Your Layer or Model is in an invalid state"). Building the model once
        # more, eagerly, switches them back; it also gives the initial weights.
        model = model_fn()
        self.initial_weights = tff.learning.models.ModelWeights.from_model(
            model
        ).convert_variables_to_arrays()

    def __call__(
        self, weights: tff.learning.models.ModelWeights, datasets: Sequence[tf.data.Dataset]
    ) -> list[ClientOutput]:
        """Trains every dataset from ``weights``; output ``i`` belongs to ``datasets[i]``."""
        if not datasets:
            return []
        results = self.computation(weights, list(datasets))
        if len(results) != len(datasets):  # the ordering contract above; never expected to fail
            raise RuntimeError(f"TFF returned {len(results)} results for {len(datasets)} clients")
        return [self._output(result, model_output) for result, model_output in results]

    def _output(self, result: Any, model_output: Any) -> ClientOutput:
        delta = -self.layout.flatten([np.asarray(u) for u in result.update])
        metrics = dict(model_output)
        # TFF weighs by example count; a diverged client comes back zeroed with weight 0.
        num_examples = int(round(float(result.update_weight)))
        loss = None
        if "loss" in metrics and np.size(metrics["loss"]) == 2 and metrics["loss"][1] > 0:
            loss = float(metrics["loss"][0] / metrics["loss"][1])
        return ClientOutput(delta, num_examples, loss)


# --- the public process -----------------------------------------------------------------------


@dataclass
class RobustFedAvgState:
    """The state between rounds: model weights, server-side states and a trust snapshot.

    ``trust`` is a read-only copy; the process keeps the live trust book (see
    :class:`RobustFedAvgProcess`).
    """

    round: int
    model_weights: tff.learning.models.ModelWeights
    optimizer_state: dict[str, np.ndarray]
    chain_state: Any
    trust: dict[str, ClientSummary]


class RobustFedAvgProcess:
    """FedAvg with TFF client work and a fedwarden aggregation chain, trust and scoring.

    Built by :func:`build_robust_fedavg_process`; shaped like a ``tff.learning`` training
    process: ``initialize()``, ``next(state, client_datasets, client_ids)`` returning a
    ``tff.learning.templates.LearningProcessOutput(state, metrics)``, ``get_model_weights(state)``,
    and ``select(available, k, rng)`` to sample a cohort that skips quarantined clients.
    It is a Python object rather than a ``tff.Computation``: the chain (a median, Krum, ...) runs
    in numpy on the stacked client deltas, which is what lets it see every client's update.

    Trust lives in the process (one :class:`~fedwarden.server.trust.TrustBook`, optionally persisted by its
    ledger), so ``next`` takes the state the previous call returned; ``initialize()`` starts over
    with fresh trust.

    ``metrics`` holds:

    - ``round``; ``train``: ``loss`` (example-weighted mean local loss) and ``num_examples``;
    - ``aggregation``: the chain's (or TFF aggregator's) measurements, e.g.
      ``"clip_by_norm/clipped_count"``; ``skipped`` when the rule could not run on the cohort;
    - ``clients``: per client id, ``anomaly``, ``trust``, ``flagged``, ``quarantined``, ``weight``
      and the scoring metrics (``norm``, ``norm_z``, ``cosine``, ``krum_score``, ...);
    - ``rejected``: client id -> reason, for updates admission refused (e.g. ``non_finite``);
    - ``flagged``: every client currently flagged.
    """

    def __init__(
        self,
        client_work: TFFClientWork,
        initial_weights: tff.learning.models.ModelWeights,
        chain: Step,
        server_optimizer: ServerOptimizer,
        trust_policy: TrustPolicy,
        *,
        trust_book: Callable[[], TrustBook] | None = None,
        max_update_norm: float | None = None,
        anomaly_weights: dict[str, float] | None = None,
        batch_size: int | None = None,
    ):
        self.client_work = client_work
        self.chain = chain
        self.server_optimizer = server_optimizer
        self.trust_policy = trust_policy
        self._initial = initial_weights
        self._trust_book = trust_book or (lambda: TrustBook(trust_policy))
        self._max_update_norm = max_update_norm
        self._anomaly_weights = anomaly_weights
        self._batch_size = batch_size
        self._coordinator: Coordinator | None = None

    def __repr__(self) -> str:
        return (
            f"RobustFedAvgProcess(chain={self.chain!r}, server_optimizer={self.server_optimizer!r}, "
            f"trust_policy={self.trust_policy!r})"
        )

    def initialize(self) -> RobustFedAvgState:
        """Initial weights (from ``model_fn``), server-side states and fresh trust."""
        book = self._trust_book()
        self._coordinator = Coordinator(
            self.client_work.layout.flatten(list(self._initial.trainable)),
            self.chain,
            self.server_optimizer,
            book,
            max_update_norm=self._max_update_norm,
            anomaly_weights=self._anomaly_weights,
            batch_size=self._batch_size,
            output_layer=self.client_work.layout.output_layer_size(),
            output_kernel=self.client_work.layout.output_kernel(),
        )
        self._coordinator.round = book.last_round
        return self._state(self._initial)

    def _state(self, weights: tff.learning.models.ModelWeights) -> RobustFedAvgState:
        c = self._coordinator
        return RobustFedAvgState(
            c.round, weights, c.optimizer_state, c.chain_state, c.trust.snapshot()
        )

    def get_model_weights(self, state: RobustFedAvgState) -> tff.learning.models.ModelWeights:
        return state.model_weights

    def select(self, available: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
        """Samples up to ``k`` client ids, skipping quarantined ones (the native engine's rule).

        Optional: ``next`` trains whichever clients it is given, but under
        ``TrustPolicy(quarantine="exclude")`` this is how excluded clients stay out.
        """
        if self._coordinator is None:
            raise UsageError("call initialize() before select().")
        return self._coordinator.select([str(c) for c in available], k, rng)

    def next(
        self,
        state: RobustFedAvgState,
        client_datasets: Sequence[tf.data.Dataset],
        client_ids: Sequence[str],
    ) -> tff.learning.templates.LearningProcessOutput:
        """One round: TFF client work on every dataset, then fedwarden's round logic.

        Args:
          state: what ``initialize()`` or the previous ``next`` returned.
          client_datasets: one batched ``tf.data.Dataset`` per client, matching the model's
            input spec.
          client_ids: one id per dataset, in the same order: ``client_ids[i]`` names the client
            that trains ``client_datasets[i]`` (see :class:`TFFClientWork` for why the order is
            what keeps identity).
        """
        c = self._coordinator
        ids = [str(cid) for cid in client_ids]
        if c is None:
            raise UsageError("call initialize() before next().")
        if len(ids) != len(client_datasets):
            raise UsageError(
                f"client_ids must name every dataset, in order. Received: {len(ids)} ids for "
                f"{len(client_datasets)} datasets."
            )
        if len(set(ids)) != len(ids):
            raise UsageError(f"client_ids must be unique. Received: {ids}.")
        if state.round != c.round:
            raise UsageError(
                f"state is from round {state.round} but this process has run {c.round} rounds; "
                "pass the state the previous next() returned (trust lives in the process), or "
                "call initialize() to start over."
            )
        c.load_state_dict(
            {
                "round": state.round,
                "weights": self.client_work.layout.flatten(list(state.model_weights.trainable)),
                "optimizer_state": state.optimizer_state,
                "chain_state": state.chain_state,
            }
        )
        round_number = state.round + 1
        outputs = self.client_work(state.model_weights, client_datasets)
        updates = [
            ClientUpdate(cid, round_number, out.delta, out.num_examples, out.loss)
            for cid, out in zip(ids, outputs, strict=True)
        ]
        outcome = c.finish_round(round_number, ids, updates)
        trainable = self.client_work.layout.unflatten(c.weights)
        weights = tff.learning.models.ModelWeights(
            [np.array(w) for w in trainable], list(state.model_weights.non_trainable)
        )
        losses = [(u.loss, u.num_examples) for u in updates if u.loss is not None]
        examples = sum(n for _, n in losses)
        metrics = {
            "round": round_number,
            "train": {
                "loss": sum(loss * n for loss, n in losses) / examples if examples else None,
                "num_examples": sum(u.num_examples for u in updates),
            },
            "aggregation": outcome.measurements,
            "clients": {
                row.client_id: {k: v for k, v in row.to_dict().items() if k != "client_id"}
                for row in outcome.clients
            },
            "rejected": {r.client_id: r.reason for r in outcome.rejected},
            "flagged": outcome.flagged,
        }
        return tff.learning.templates.LearningProcessOutput(self._state(weights), metrics)


def build_robust_fedavg_process(
    model_fn: ModelFn,
    client_optimizer: OptimizerArg,
    chain: Step | str = "median",
    *,
    server_optimizer: ServerOptimizer | None = None,
    trust_policy: TrustPolicy | None = None,
    trust_book: Callable[[], TrustBook] | None = None,
    num_byzantine: int | None = None,
    use_tff_aggregators: bool = True,
    max_update_norm: float | None = None,
    anomaly_weights: dict[str, float] | None = None,
    batch_size: int | None = None,
) -> RobustFedAvgProcess:
    """Builds a FedAvg process whose aggregation is any fedwarden chain, with per-client trust.

    Args:
      model_fn: no-argument function returning a fresh ``tff.learning.models.VariableModel``, as
        for ``tff.learning.algorithms.build_weighted_fed_avg``.
      client_optimizer: a ``tff.learning.optimizers.Optimizer`` (or a no-argument function
        returning one) for local training.
      chain: an aggregation step (``fedwarden.aggregation.chain(clip_by_norm(5.0), median())``) or a chain
        string (``"clip:max_norm=5+trimmed_mean:trim_fraction=0.2"``, see ``parse_chain``).
      server_optimizer: fedwarden's server optimizer; default FedAvg with learning rate 1.
      trust_policy: trust decay, flag thresholds, quarantine; default ``TrustPolicy()``.
      trust_book: a function returning the trust book to use (e.g. one backed by a SQLite
        ``Ledger``, to persist trust); default an in-memory book under ``trust_policy``.
      num_byzantine: f for rules that take it (Krum, Bulyan, ...) when ``chain`` is a string.
      use_tff_aggregators: aggregate mean-based chains with TFF's own aggregators
        (``fedwarden.aggregation.tff.tff_factory``); False keeps fedwarden's numpy steps for every chain.
      max_update_norm: admission rejects updates with a larger L2 norm (None: no limit).
      anomaly_weights: weights of the anomaly score's components (``fedwarden.aggregation.scoring``).
      batch_size: the batch size of the client datasets: each update's norm is then judged
        against the client's local step count (``Coordinator``), so a client with more data is
        not an outlier for its longer update; None compares the norms as they are.

    Returns:
      A :class:`RobustFedAvgProcess`; the module docstring has a runnable example.

    The model function is traced into one TFF computation here, once; rounds reuse it.
    """
    if isinstance(chain, str):
        chain = parse_chain(chain, num_byzantine_default=num_byzantine)
    if use_tff_aggregators:
        chain = tff_step(chain)
    work = TFFClientWork(model_fn, client_optimizer)
    policy = trust_policy or TrustPolicy()
    return RobustFedAvgProcess(
        work,
        work.initial_weights,
        chain,
        server_optimizer or ServerOptimizer("fedavg", 1.0),
        policy,
        trust_book=trust_book,
        max_update_norm=max_update_norm,
        anomaly_weights=anomaly_weights,
        batch_size=batch_size,
    )


def build_tff_fedavg(
    model_fn: ModelFn, client_optimizer: OptimizerArg, chain: Step | str
) -> tff.learning.templates.LearningProcess:
    """Plain ``tff.learning.algorithms.build_weighted_fed_avg`` for a mean-based chain.

    For users who want TFF's own process end to end (no per-client scores or trust): the chain
    must be one ``fedwarden.aggregation.tff.tff_factory`` maps (mean, clip + mean, central_dp). The server
    optimizer is SGD with learning rate 1, i.e. FedAvg, as in :func:`build_robust_fedavg_process`.
    """
    step = parse_chain(chain) if isinstance(chain, str) else chain
    factory = tff_factory(step)
    if factory is None:
        raise UsageError(
            f"TFF has no aggregator for {step!r}; it provides mean, clip + mean and central_dp. "
            "Use build_robust_fedavg_process for robust rules."
        )
    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=_optimizer(client_optimizer),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        model_aggregator=factory,
    )
    model_fn()  # restores Keras's v2 layer classes after tracing (see TFFClientWork)
    return process
