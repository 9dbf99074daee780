"""``tff.learning`` on the engine: one round type shared by federated computations and algorithms.

A *round computation* is a federated computation of the round type (`round_types`)::

  next_round(state:   S@SERVER,                 the algorithm's state
             clients: {ClientInput}@CLIENTS,    each client's example rows, mask, sizes, key
             data:    ?@CLIENTS (all-equal),    the flat example arrays the rows point into
             round:   int32@SERVER)             the round's index (for schedules)
      -> <S@SERVER, metrics@SERVER>

which is what an engine algorithm's ``apply(state, cohort, map_clients)`` computes, so the two
programming models convert both ways without a second implementation:

* `federated_algorithm(init, next_round)`: a round computation written in the vocabulary is a
  `FederatedAlgorithm`: `fedjax_sim.build_round_step` and ``run`` sample, batch, apply system
  heterogeneity, shard and checkpoint it like any other, and its `federated_map` runs on the
  round step's client map;
* `round_computation(algorithm, state)`: an engine algorithm as a round computation (its
  ``apply``, with `federated_map`'s client map);
* `build_federated_averaging_process`: TFF's ``initialize`` / ``next`` around the engine's
  `fedjax_sim.algorithms.fed_avg.fed_avg` (FedAvg, McMahan et al. 2017, arXiv:1602.05629; with a
  server optimizer FedOpt, Reddi et al. 2021, arXiv:2003.00295) on host-batched client data::

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
from fedjax_sim.core import ClientInput, Cohort, FederatedAlgorithm
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.federated import (
    CLIENTS,
    SERVER,
    FederatedComputation,
    FederatedType,
    FederatedValue,
    TensorType,
    current_execution,
    execution_context,
    federated_computation,
    federated_value,
)
from fedjax_sim.models.base import Model
from fedjax_sim.simulation.round_step import SimulationState

PyTree = Any

__all__ = [
    "CLIENT_INPUT",
    "IterativeProcess",
    "batch_client_data",
    "build_federated_averaging_process",
    "federated_algorithm",
    "iterative_process",
    "round_computation",
    "round_types",
]

CLIENT_INPUT = ClientInput(
    client_id=jnp.int32, indices=TensorType(jnp.int32, (None, None)),
    mask=TensorType(jnp.bool_, (None, None)), num_steps=jnp.int32, num_examples=jnp.int32,
    valid=jnp.bool_, key=TensorType(jnp.uint32, (None,)), duration=jnp.float32)
"""The member type of one client's `ClientInput` (``[S, B]`` rows; a raw ``uint32`` key)."""


def round_types(state: PyTree) -> tuple[FederatedType, ...]:
    """The parameter types of a round computation whose state member type is ``state``.

    Args:
      state: the state's member type, e.g. ``jax.eval_shape(algorithm.init, params)``.

    Returns:
      ``(state@SERVER, {CLIENT_INPUT}@CLIENTS, ?@CLIENTS (all-equal), int32@SERVER)``.
    """
    return (FederatedType(state, SERVER), FederatedType(CLIENT_INPUT, CLIENTS),
            FederatedType(..., CLIENTS, all_equal=True), FederatedType(jnp.int32, SERVER))


def _member(value: Any) -> Any:
    return value.value if isinstance(value, FederatedValue) else value


def federated_algorithm(init: Callable[[PyTree], PyTree],
                        next_round: FederatedComputation) -> FederatedAlgorithm:
    """A round computation as the engine's ``FederatedAlgorithm(init, apply)``.

    ``apply(state, cohort, map_clients)`` calls ``next_round(state, cohort.clients (mask:
    ``valid``), cohort.data, cohort.round)`` with `federated_map` running on ``map_clients``, so
    under the round step the computation's clients run sequentially, vmapped or sharded as the
    engine's do. Register a factory returning it in `fedjax_sim.algorithms.ALGORITHMS` to train
    it with ``run``.

    Args:
      init: ``params -> state`` (the state needs a ``params`` attribute: the global model).
      next_round: a federated computation of the types `round_types` gives; its results are a
        SERVER state and a SERVER dict of scalar metrics (``train/loss``, ...).

    Raises:
      TypeError: ``next_round`` does not take the round type's four placements.
    """
    kinds = [(t.placement, t.all_equal) for t in getattr(next_round, "parameter_types", ())]
    if kinds != [(SERVER, True), (CLIENTS, False), (CLIENTS, True), (SERVER, True)]:
        raise TypeError(
            f"federated_algorithm: {getattr(next_round, '__name__', next_round)!r} must be a "
            "federated_computation of the round type (state@SERVER, {ClientInput}@CLIENTS, "
            "data@CLIENTS all-equal, int32@SERVER), declared with round_types(state); got "
            f"{getattr(next_round, 'parameter_types', 'no declared types')}")

    def apply(state, cohort: Cohort, map_clients):
        with execution_context(map_clients):
            new_state, metrics = next_round(
                FederatedValue(state, SERVER, True),
                FederatedValue(cohort.clients, CLIENTS, False, mask=cohort.clients.valid),
                FederatedValue(cohort.data, CLIENTS, True),
                FederatedValue(jnp.asarray(cohort.round, jnp.int32), SERVER, True))
        return _member(new_state), _member(metrics)

    return FederatedAlgorithm(init, apply)


def round_computation(algorithm: FederatedAlgorithm, state: PyTree) -> FederatedComputation:
    """An engine algorithm as a round computation: its own ``apply``, no second implementation.

    The algorithm maps its clients with the client map of the current `execution_context`
    (the one `federated_map` uses).

    Args:
      algorithm: an engine algorithm, e.g. ``fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))``.
      state: its state's member type, ``jax.eval_shape(algorithm.init, params)``.
    """

    @federated_computation(*round_types(state))
    def next_round(state, clients, data, round):
        cohort_clients = clients.value
        sequential = current_execution().sequential
        if sequential is not None:  # a sequential client may stop after its own steps
            cohort_clients = cohort_clients.replace(own_trip_count=sequential)
        new_state, metrics = algorithm.apply(
            state.value, Cohort(cohort_clients, data.value, round.value),
            current_execution().map_clients)
        return federated_value(new_state, SERVER), federated_value(metrics, SERVER)

    return next_round


# ---------------------------------------------------------------------------------------------
# TFF's iterative process over host-batched client datasets
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
        if set(dataset) != set(datasets[0] if datasets else dataset):
            raise ValueError(
                f"client {i} has features {sorted(dataset)}, client 0 has {sorted(datasets[0])}")
        for k, v in dataset.items():
            if datasets and v.shape[1:] != datasets[0][k].shape[1:]:
                raise ValueError(f"client {i}: feature {k!r} has example shape {v.shape[1:]}, "
                                 f"client 0 has {datasets[0][k].shape[1:]}")
        datasets.append(dataset)
    return datasets


def batch_client_data(
    client_data: Sequence[Mapping[str, np.ndarray]] | FederatedData,
    batch_size: int,
    *,
    local_epochs: int = 1,
    max_local_steps: int | None = None,
) -> tuple[ClientInput, dict[str, np.ndarray]]:
    """Per-client datasets -> the engine's cohort: ``[C, S, B]`` example rows of flat arrays.

    Client ``c`` with ``n`` examples takes ``ceil(n * local_epochs / B)`` steps (at most
    ``max_local_steps``) over its examples in order, repeated ``local_epochs`` times (a TFF
    dataset ``.repeat(E).batch(B)``, no shuffle); its last batch is partly masked. S is the
    largest client's number of steps rounded up to a power of two (padded steps change
    nothing), so cohorts whose largest clients fall in the same bucket share one compiled round.

    Args:
      client_data: a list of ``{feature: [n, ...] array}`` (one per client) or a
        `FederatedData` (all its clients, in order; pick clients with ``train.subset(ids)``).
      batch_size: B, examples per local step.
      local_epochs: passes over each client's data.
      max_local_steps: caps every client's steps (larger clients are truncated).

    Returns:
      ``(clients, data)``: a `ClientInput` with a leading ``[C]`` axis (numpy; ``key`` zeros:
      the process sets the round's keys) whose ``indices`` are ``arange(C * S * B)``, and the
      examples they read, ``{feature: [C * S * B, ...]}`` (masked slots: zeros).
    """
    for name, value in (("batch_size", batch_size), ("local_epochs", local_epochs)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_local_steps is not None and max_local_steps < 1:
        raise ValueError(f"max_local_steps must be >= 1 or None, got {max_local_steps!r}")
    datasets = _client_datasets(client_data)
    sizes = np.array([len(next(iter(d.values()))) for d in datasets], np.int64)
    steps = -(-sizes * local_epochs // batch_size)
    if max_local_steps is not None:
        steps = np.minimum(steps, max_local_steps)
    num_steps = 1 << max(int(steps.max()) - 1, 0).bit_length()  # the next power of two
    slots = np.arange(num_steps * batch_size)
    used = np.minimum(steps * batch_size, sizes * local_epochs)
    mask = slots < used[:, None]
    # Rows of the concatenated examples (plus one zero row for masked slots), gathered here in
    # [C, S, B] order: the data's shape depends on C, S and B only, so nothing recompiles.
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.where(mask, offsets[:-1, None] + slots % np.maximum(sizes, 1)[:, None],
                    offsets[-1])
    num_clients = len(datasets)
    shape = (num_clients, num_steps, batch_size)
    clients = ClientInput(
        client_id=np.arange(num_clients, dtype=np.int32),
        indices=np.arange(rows.size, dtype=np.int32).reshape(shape), mask=mask.reshape(shape),
        num_steps=steps.astype(np.int32), num_examples=sizes.astype(np.int32),
        valid=np.ones(num_clients, bool), key=np.zeros((num_clients, 2), np.uint32),
        duration=steps.astype(np.float32))
    data = {}
    for k, first in datasets[0].items():
        padding = np.zeros((1, *first.shape[1:]), first.dtype)
        examples = np.concatenate([*(d[k] for d in datasets), padding])
        data[k] = examples[rows.reshape(-1)]
    return clients, data


def _nested(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train/loss": x}`` -> ``{"train": {"loss": x}}`` (TFF's metrics layout)."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        *groups, leaf = name.split("/")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return out


class _Next:
    """``next(state, client_data) -> (state, metrics)``: batches on the host, runs one round."""

    def __init__(self, computation: FederatedComputation, batching: dict):
        self.computation = computation
        self._batching = batching

    def __call__(self, state: SimulationState, client_data) -> tuple[SimulationState, dict]:
        clients, data = batch_client_data(client_data, **self._batching)
        keys = jax.random.split(jax.random.fold_in(state.key, state.round), len(clients.valid))
        clients = clients.replace(key=keys)
        algorithm_state, metrics = self.computation(
            state.algorithm, FederatedValue(clients, CLIENTS, False, mask=clients.valid),
            data, state.round)
        return state.replace(algorithm=algorithm_state, round=state.round + 1), _nested(metrics)

    @property
    def type_signature(self) -> str:
        return self.computation.type_signature


@dataclasses.dataclass(frozen=True)
class IterativeProcess:
    """TFF's ``tff.templates.IterativeProcess``: ``state = initialize()``, then
    ``state, metrics = next(state, client_data)`` once per round.

    Attributes:
      initialize: ``() -> state`` (a federated computation); the state is the engine's
        ``SimulationState`` (``state.algorithm.params``: the global model).
      next: ``(state, client_data) -> (state, metrics)``; ``client_data`` is a list of
        per-client datasets ``{feature: [n, ...]}`` or a `FederatedData`; ``next.computation``
        is the round computation it runs (one jitted round).
    """

    initialize: Callable[[], SimulationState]
    next: Callable[[SimulationState, Any], tuple[SimulationState, dict]]


def iterative_process(
    algorithm: FederatedAlgorithm,
    params: PyTree,
    *,
    batch_size: int,
    local_epochs: int = 1,
    max_local_steps: int | None = None,
    seed: int = 0,
) -> IterativeProcess:
    """Any engine algorithm as a TFF iterative process over host-batched client datasets.

    Args:
      algorithm: the engine algorithm (its ``apply`` is the round).
      params: the initial global parameters.
      batch_size, local_epochs, max_local_steps: how `batch_client_data` batches each round.
      seed: the root key of the clients' PRNG keys (``fold_in(key, round)``, split per client).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    state = jax.eval_shape(algorithm.init, params)

    @federated_computation
    def initialize():
        return federated_value(SimulationState(algorithm.init(params), jnp.zeros((), jnp.int32),
                                               jax.random.PRNGKey(seed)), SERVER)

    batching = {"batch_size": batch_size, "local_epochs": local_epochs,
                "max_local_steps": max_local_steps}
    return IterativeProcess(initialize, _Next(round_computation(algorithm, state), batching))


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
    **fed_avg_options: Any,
) -> IterativeProcess:
    """The engine's FedAvg as TFF's ``tff.learning.build_federated_averaging_process``.

    `iterative_process` of ``fed_avg(model_fn(), client_optimizer_fn(), server_optimizer_fn(),
    client_weighting=..., **fed_avg_options)`` from ``model.init(PRNGKey(seed))``.

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
      **fed_avg_options: passed to `fed_avg` (``loss_fn``, ``client_schedules``, ...).

    Returns:
      An `IterativeProcess`. ``metrics`` are the engine's, nested TFF-style:
      ``metrics["train"]`` holds the round's ``loss``, ``accuracy``, ``examples`` and
      ``clients`` (JAX scalars, pooled over every trained example of the round).
    """
    model = _build(model_fn, "model_fn", Model)
    client_optimizer = _build(client_optimizer_fn, "client_optimizer_fn",
                              optax.GradientTransformation)
    server_optimizer = _build(server_optimizer_fn, "server_optimizer_fn",
                              optax.GradientTransformation)
    algorithm = fed_avg(model, client_optimizer, server_optimizer,
                        client_weighting=client_weighting, **fed_avg_options)
    return iterative_process(algorithm, model.init(jax.random.PRNGKey(seed)),
                             batch_size=batch_size, local_epochs=local_epochs,
                             max_local_steps=max_local_steps, seed=seed)
