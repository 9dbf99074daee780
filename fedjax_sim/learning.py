"""``tff.learning`` for fedjax_sim: FedAvg written in the federated vocabulary, and a TFF-style
iterative process around it.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629) with a server optimizer (FedOpt, Reddi et al. 2021,
arXiv:2003.00295), as a `federated_computation`::

  params      = federated_map(select params, state)                      @SERVER
  outputs     = federated_map(client_update,                             {...}@CLIENTS
                              [client_data, broadcast(params), ...])     (a vmap)
  delta       = federated_mean(outputs[0], weight=num_examples)          @SERVER
  state       = federated_map(server_update, [state, delta])             @SERVER

It computes what the engine's `fedjax_sim.algorithms.fed_avg.fed_avg` computes (tested equal
to 1e-6 on the same clients and batches); the engine is the fast path for simulations (in-graph
sampling and batching, sharding, sweeps), this module the readable one and the bridge for TFF
users::

  process = build_federated_averaging_process(
      model_fn, client_optimizer_fn=lambda: optax.sgd(0.02))
  state = process.initialize()
  for round in range(5):
      state, metrics = process.next(state, federated_train_data)
      print(metrics["train"]["loss"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.local import STAT_KEYS, LossFn, model_loss, with_hyperparams
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.federated import (
    CLIENTS,
    SERVER,
    FederatedComputation,
    FederatedType,
    TensorType,
    federated_broadcast,
    federated_computation,
    federated_map,
    federated_mean,
    federated_sum,
    federated_value,
)
from fedjax_sim.models.base import Model
from fedjax_sim.simulation.round_step import SimulationState

PyTree = Any

__all__ = [
    "IterativeProcess",
    "batch_client_data",
    "build_fed_avg_round",
    "build_federated_averaging_process",
    "client_data_type",
]


def client_data_type(features: Mapping[str, Any]) -> FederatedType:
    """The CLIENTS type of the per-client batches `build_fed_avg_round` takes.

    Args:
      features: one example's type per feature, e.g. ``{"x": jax.ShapeDtypeStruct((28, 28, 1),
        jnp.float32), "y": jax.ShapeDtypeStruct((), jnp.int32)}``.

    Returns:
      ``{<batches=<x=float32[?,?,28,28,1],y=int32[?,?]>,index=int32,mask=bool[?,?],
      num_examples=int32>}@CLIENTS``: each client's ``[S, B, ...]`` batches (S local steps of B
      examples), their ``[S, B]`` mask (False for padding), its number of examples (the
      aggregation weight) and its position in the cohort (for its PRNG key).
    """
    batches = {
        name: TensorType(spec.dtype, (None, None, *spec.shape)) for name, spec in features.items()
    }
    return FederatedType(
        {
            "batches": batches,
            "mask": TensorType(jnp.bool_, (None, None)),
            "num_examples": jnp.int32,
            "index": jnp.int32,
        },
        CLIENTS,
    )


def _client_update(loss_fn: LossFn, client_optimizer: optax.GradientTransformation):
    """One client's FedAvg update: a scan of optimizer steps over its batches -> its delta."""

    def client_update(data, server_params, hyperparams, round_key):
        key = jax.random.fold_in(round_key, data["index"])
        opt_state = with_hyperparams(client_optimizer.init(server_params), hyperparams)
        zero_stats = {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}
        num_steps = data["mask"].shape[0]

        def step(carry, inputs):
            params, opt_state, totals = carry
            batch, mask, s = inputs
            grads, stats = jax.grad(loss_fn, has_aux=True)(
                params, batch, mask, jax.random.fold_in(key, s))
            updates, new_opt_state = client_optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # A step without a real example (padding) changes nothing.
            keep = stats["count"] > 0
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(keep, new, old),
                (new_params, new_opt_state), (params, opt_state))
            return (params, opt_state, {k: totals[k] + stats[k] for k in STAT_KEYS}), None

        (params, _, totals), _ = jax.lax.scan(
            step, (server_params, opt_state, zero_stats),
            (data["batches"], data["mask"], jnp.arange(num_steps)))
        delta = jax.tree.map(jnp.subtract, server_params, params)
        return delta, totals

    return client_update


def build_fed_avg_round(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    features: Mapping[str, Any],
    *,
    client_weighting: str | float = "num_examples",
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> tuple[FederatedComputation, FederatedComputation]:
    """FedAvg / FedOpt as two federated computations, ``(initialize, next)``.

    ``initialize()`` -> the server state ``SimulationState(algorithm=ServerState, round, key)``
    (the engine's state: `fedjax_sim.build_round_step` can take over from it).
    ``next(state, client_data)`` -> ``(state, metrics)``, where ``client_data`` is a
    CLIENTS value of type `client_data_type(features)` (see `batch_client_data`) and
    ``metrics = {"train": {"loss", "accuracy", "num_examples", "num_clients"}}``.

    Args:
      model: the model to train (its ``init`` gives the initial parameters, key ``seed``).
      client_optimizer: the clients' optax optimizer (fresh state every round).
      server_optimizer: applied to the pseudo-gradient ``server - weighted mean of clients``
        (``optax.sgd(1.0)``: FedAvg).
      features: one example's type per feature (``jax.ShapeDtypeStruct`` without batch axis).
      client_weighting: ``"num_examples"``, ``"uniform"`` or an exponent p (weight n ** p).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      seed: the seed of the initial parameters and of the clients' PRNG keys.
    """
    initialize, make_next = _fed_avg_computations(
        model, client_optimizer, server_optimizer, client_weighting, loss_fn, seed)
    return initialize, make_next(features)


def _fed_avg_computations(model, client_optimizer, server_optimizer, client_weighting, loss_fn,
                          seed):
    """``(initialize, features -> next)``: see `build_fed_avg_round`."""
    loss_fn = loss_fn or model_loss(model)
    # The engine's FedAvg supplies the state layout (and checks `client_weighting`).
    algorithm = fed_avg(model, client_optimizer, server_optimizer,
                        client_weighting=client_weighting, loss_fn=loss_fn)

    def initial_state():
        params = model.init(jax.random.key(seed))
        return SimulationState(algorithm.init(params), jnp.zeros((), jnp.int32),
                               jax.random.PRNGKey(seed))

    @federated_computation
    def initialize():
        return federated_value(initial_state(), SERVER)

    state_type = FederatedType(jax.eval_shape(initial_state), SERVER)
    client_update = _client_update(loss_fn, client_optimizer)

    def client_weight(data, exponent):
        n = data["num_examples"].astype(jnp.float32)
        return jnp.where(n > 0, jnp.power(jnp.maximum(n, 1.0), exponent), 0.0)

    def server_update(state, pseudo_gradient):
        server = state.algorithm
        updates, opt_state = server_optimizer.update(pseudo_gradient, server.opt_state,
                                                     server.params)
        server = server.replace(params=optax.apply_updates(server.params, updates),
                                opt_state=opt_state)
        return state.replace(algorithm=server, round=state.round + 1)

    def train_metrics(totals, num_clients):
        # Pooled over every trained label, as the engine's `round_metrics`.
        count = jnp.maximum(totals["count"], 1.0)
        scored = jnp.maximum(totals.get("accuracy_count", totals["count"]), 1.0)
        return {"train": {"loss": totals["loss_sum"] / count,
                          "accuracy": totals["correct"] / scored,
                          "num_examples": totals["count"],
                          "num_clients": num_clients}}

    def make_next(features: Mapping[str, Any]) -> FederatedComputation:
        @federated_computation(state_type, client_data_type(features))
        def next_round(state, client_data):
            params = federated_map(lambda s: s.algorithm.params, state)
            hyperparams = federated_map(lambda s: s.algorithm.client_hyperparams, state)
            exponent = federated_map(lambda s: s.algorithm.weight_exponent, state)
            round_key = federated_map(lambda s: jax.random.fold_in(s.key, s.round), state)

            outputs = federated_map(client_update, [
                client_data,
                federated_broadcast(params),
                federated_broadcast(hyperparams),
                federated_broadcast(round_key),
            ])
            deltas, stats = outputs[0], outputs[1]
            weights = federated_map(client_weight, [client_data, federated_broadcast(exponent)])
            pseudo_gradient = federated_mean(deltas, weight=weights)

            new_state = federated_map(server_update, [state, pseudo_gradient])
            trained = federated_sum(federated_map(lambda w: (w > 0).astype(jnp.float32),
                                                  weights))
            metrics = federated_map(train_metrics, [federated_sum(stats), trained])
            return new_state, metrics

        return next_round

    return initialize, make_next


# ---------------------------------------------------------------------------------------------
# Client datasets -> padded batches
# ---------------------------------------------------------------------------------------------


def _client_datasets(client_data: Any) -> list[dict[str, np.ndarray]]:
    if isinstance(client_data, FederatedData):
        return [client_data.client(i) for i in range(client_data.num_clients)]
    if isinstance(client_data, Mapping) or not isinstance(client_data, Sequence) or \
            isinstance(client_data, (str, bytes)):
        raise TypeError(
            "client data must be a list of per-client datasets ({feature: [n, ...] array}) or a "
            f"FederatedData (e.g. train.subset(ids)), got {type(client_data).__name__}"
        )
    if not client_data:
        raise ValueError("client data is empty: a round needs at least one client")
    datasets = []
    for i, dataset in enumerate(client_data):
        if not isinstance(dataset, Mapping) or not dataset:
            raise TypeError(
                f"client {i}: expected a dict {{feature: [n, ...] array}}, got "
                f"{type(dataset).__name__}"
            )
        dataset = {k: np.asarray(v) for k, v in dataset.items()}
        lengths = {k: (len(v) if v.ndim else None) for k, v in dataset.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"client {i}: features need one common leading length, got {lengths}")
        datasets.append(dataset)
    return datasets


def _features(datasets: list[dict[str, np.ndarray]]) -> dict[str, jax.ShapeDtypeStruct]:
    first = datasets[0]
    features = {k: jax.ShapeDtypeStruct(v.shape[1:], jnp.asarray(v[:0]).dtype)
                for k, v in first.items()}
    for i, dataset in enumerate(datasets):
        if set(dataset) != set(features):
            raise ValueError(
                f"client {i} has features {sorted(dataset)}, client 0 has {sorted(features)}")
        for k, v in dataset.items():
            if v.shape[1:] != features[k].shape:
                raise ValueError(
                    f"client {i}: feature {k!r} has example shape {v.shape[1:]}, client 0 has "
                    f"{features[k].shape}")
    return features


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def batch_client_data(
    client_data: Sequence[Mapping[str, np.ndarray]] | FederatedData,
    batch_size: int,
    *,
    local_epochs: int = 1,
    max_local_steps: int | None = None,
) -> tuple[dict[str, Any], dict[str, jax.ShapeDtypeStruct]]:
    """Per-client datasets -> the engine's static ``[C, S, B, ...]`` batches (host side).

    Client ``c`` with ``n`` examples takes ``ceil(n * local_epochs / B)`` steps (at most
    ``max_local_steps``) over its examples in order, repeated ``local_epochs`` times (a TFF
    dataset ``.repeat(E).batch(B)``, no shuffle); its last batch is partly masked. S is the
    largest client's number of steps rounded up to a power of two (padded steps change
    nothing), so cohorts whose largest clients fall in the same power-of-two bucket share one
    compiled round.

    Args:
      client_data: a list of ``{feature: [n, ...] array}`` (one per client) or a
        `FederatedData` (all its clients, in order; pick clients with ``train.subset(ids)``).
      batch_size: B, examples per local step.
      local_epochs: passes over each client's data.
      max_local_steps: caps every client's steps (larger clients are truncated).

    Returns:
      ``(member, features)``: ``member`` = ``{"batches": {feature: [C, S, B, ...]}, "mask":
      [C, S, B] bool, "num_examples": [C] int32, "index": [C] int32}`` as numpy arrays, and one
      example's type per feature.
    """
    for name, value in (("batch_size", batch_size), ("local_epochs", local_epochs)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_local_steps is not None and max_local_steps < 1:
        raise ValueError(f"max_local_steps must be >= 1 or None, got {max_local_steps!r}")
    datasets = _client_datasets(client_data)
    features = _features(datasets)
    sizes = np.array([len(next(iter(d.values()))) for d in datasets], np.int64)
    steps = -(-sizes * local_epochs // batch_size)
    if max_local_steps is not None:
        steps = np.minimum(steps, max_local_steps)
    num_steps = _next_power_of_two(int(max(steps.max(), 1)))
    length = num_steps * batch_size
    positions = np.zeros((len(datasets), length), np.int64)
    mask = np.zeros((len(datasets), length), bool)
    for c, n in enumerate(sizes):
        used = int(steps[c] * batch_size) if n else 0
        used = min(used, int(n) * local_epochs)
        positions[c, :used] = np.arange(used) % max(n, 1)
        mask[c, :used] = True
    batches = {}
    for name, spec in features.items():
        out = np.zeros((len(datasets), length, *spec.shape), spec.dtype)
        for c, dataset in enumerate(datasets):
            if sizes[c]:
                out[c] = dataset[name][positions[c]]
        batches[name] = out.reshape(len(datasets), num_steps, batch_size, *spec.shape)
    member = {
        "batches": batches,
        "mask": mask.reshape(len(datasets), num_steps, batch_size),
        "num_examples": sizes.astype(np.int32),
        "index": np.arange(len(datasets), dtype=np.int32),
    }
    return member, features


# ---------------------------------------------------------------------------------------------
# The iterative process
# ---------------------------------------------------------------------------------------------


class _Next:
    """``next(state, client_data) -> (state, metrics)``: batches the data, runs one round."""

    def __init__(self, make_round: Callable[[dict], FederatedComputation], batching: dict):
        self._make_round = make_round
        self._batching = batching
        self._rounds: dict[tuple, FederatedComputation] = {}
        self.computation: FederatedComputation | None = None

    def _computation(self, features: dict) -> FederatedComputation:
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in features.items()))
        if key not in self._rounds:
            self._rounds[key] = self._make_round(features)
        self.computation = self._rounds[key]
        return self.computation

    def __call__(self, state: SimulationState, client_data) -> tuple[SimulationState, dict]:
        member, features = batch_client_data(client_data, **self._batching)
        return self._computation(features)(state, member)

    @property
    def type_signature(self) -> str:
        """The round's federated type (known after the first call, which fixes the features)."""
        if self.computation is None:
            return "(unknown until the first call: the client data fixes the feature types)"
        return self.computation.type_signature


@dataclasses.dataclass(frozen=True)
class IterativeProcess:
    """TFF's ``tff.templates.IterativeProcess``: ``state = initialize()``, then
    ``state, metrics = next(state, client_data)`` once per round.

    Attributes:
      initialize: ``() -> state`` (a federated computation).
      next: ``(state, client_data) -> (state, metrics)``; ``client_data`` is a list of
        per-client datasets ``{feature: [n, ...]}`` or a `FederatedData`; one jitted round.
    """

    initialize: Callable[[], SimulationState]
    next: Callable[[SimulationState, Any], tuple[SimulationState, dict]]


def _build(maker: Any, what: str, expected: type) -> Any:
    built = maker if isinstance(maker, expected) else maker()
    if not isinstance(built, expected):
        raise TypeError(
            f"{what} must return a {expected.__module__}.{expected.__qualname__}, got "
            f"{type(built).__name__}"
        )
    return built


def build_federated_averaging_process(
    model_fn: Callable[[], Model],
    client_optimizer_fn: Callable[[], optax.GradientTransformation],
    server_optimizer_fn: Callable[[], optax.GradientTransformation] = lambda: optax.sgd(1.0),
    *,
    batch_size: int = 20,
    local_epochs: int = 1,
    max_local_steps: int | None = None,
    client_weighting: str | float = "num_examples",
    seed: int = 0,
) -> IterativeProcess:
    """FedAvg as an iterative process (TFF's ``tff.learning.build_federated_averaging_process``).

    Args:
      model_fn: ``() -> fedjax_sim.models.Model`` (called once).
      client_optimizer_fn: ``() -> optax`` transform, e.g. ``lambda: optax.sgd(0.02)``.
      server_optimizer_fn: ``() -> optax`` transform; default ``optax.sgd(1.0)`` (FedAvg).
      batch_size: B, examples per local step (TFF's datasets come batched; here the process
        batches: see `batch_client_data`).
      local_epochs: passes over each client's data per round.
      max_local_steps: caps the local steps per round.
      client_weighting: ``"num_examples"`` (default), ``"uniform"`` or an exponent.
      seed: the initial parameters' and the clients' PRNG seed.

    Returns:
      An `IterativeProcess`. ``state`` is a ``SimulationState`` (``state.algorithm.params`` are
      the global model's parameters); ``metrics["train"]`` holds the round's ``loss``,
      ``accuracy``, ``num_examples`` and ``num_clients`` (JAX scalars, pooled over every trained
      example of the round).

    Each ``next`` call batches and pads the clients' data on the host into ``[C, S, B, ...]``
    (S rounded up to a power of two) and runs one jitted round; it recompiles only when C, S,
    B or a feature's shape changes.

    Example::

      process = build_federated_averaging_process(
          model_fn, client_optimizer_fn=lambda: optax.sgd(0.02))
      state = process.initialize()
      for round in range(5):
          state, metrics = process.next(state, federated_train_data)
          print(metrics["train"]["loss"])
    """
    model = _build(model_fn, "model_fn", Model)
    client_optimizer = _build(client_optimizer_fn, "client_optimizer_fn",
                              optax.GradientTransformation)
    server_optimizer = _build(server_optimizer_fn, "server_optimizer_fn",
                              optax.GradientTransformation)
    batching = {"batch_size": batch_size, "local_epochs": local_epochs,
                "max_local_steps": max_local_steps}
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    initialize, make_next = _fed_avg_computations(
        model, client_optimizer, server_optimizer, client_weighting, None, seed)
    return IterativeProcess(initialize=initialize, next=_Next(make_next, batching))
