"""q-FFL, trained with q-FedAvg: fair resource allocation across clients.

Li, Sanjabi, Beirami & Smith 2020, "Fair Resource Allocation in Federated Learning" (ICLR 2020,
arXiv:1905.10497). q-FFL minimizes ``f_q(w) = sum_k p_k / (q + 1) * F_k(w) ** (q + 1)``: the larger
``q``, the more weight the clients with a high loss get, which evens out accuracy across
clients (lower variance, better worst clients) at some cost in mean accuracy.

q-FedAvg (the paper's Algorithm 2) per round, for each client k of the cohort:

  F_k       = F_k(w^t), the client's loss at the broadcast model (before local training)
  dw_k      = L * (w^t - w_k^{t+1})        (w_k^{t+1}: after the client's local SGD)
  Delta_k   = F_k ** q * dw_k
  h_k       = q * F_k ** (q - 1) * ||dw_k||^2 + L * F_k ** q
  w^{t+1}   = w^t - sum_k p_k Delta_k / sum_k p_k h_k

with L the Lipschitz constant of the gradients, estimated as 1 / (client learning rate) as in the
authors' code (``litian96/fair_flearn``; ``F_k + 1e-10`` there, here too). ``p_k`` are the client
weights (``client_weighting``); the paper samples clients proportionally to size and averages
uniformly, i.e. ``cohort.sampler: weighted`` with ``client_weighting="uniform"``; uniform sampling
with the default ``num_examples`` weights estimates the same objective with ``p_k = n_k / n``.
``sum_k p_k Delta_k / sum_k p_k h_k`` is handed to the server optimizer as the pseudo-gradient
(server SGD with learning rate 1 is the paper's update).

q = 0 is FedAvg: ``Delta_k = L * dw``, ``h_k = L``, and the step is the ``p``-weighted mean of the
client deltas (tested against `fed_avg`).

``F_k(w^t)`` costs one extra forward pass over the client's examples (every example of its round
once, in training mode, i.e. with dropout if the model has any): about a third of a local epoch.

Example::

  algorithm = q_ffl(model, optax.sgd(0.1), optax.sgd(1.0), q=1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators.base import Stage
from fedjax_sim.algorithms.fed_avg import (
    ClientSchedules,
    ServerState,
    client_delta,
    client_weights,
    fed_avg_setup,
    round_metrics,
    scheduled_hyperparams,
    server_fields,
    server_step,
)
from fedjax_sim.algorithms.local import LossFn, gather_batch
from fedjax_sim.core import Aggregator, ClientInput, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any

# Added to F_k before taking powers (the authors' code does the same): F ** (q - 1) stays finite.
LOSS_EPSILON = 1e-10


@struct.dataclass(kw_only=True)
class QFFLState(ServerState):
    """q-FedAvg server state: FedAvg's `ServerState` (its weights are the ``p_k``) and

    Attributes:
      q: the fairness exponent (an array, so a round can be vmapped over several q).
    """

    q: jax.Array


def client_loss(
    loss_fn: LossFn, params: Params, client: ClientInput, data: Mapping[str, jax.Array]
) -> jax.Array:
    """``F_k(params)``: the client's mean loss over its examples, each counted once.

    The first ``n_k`` slots of a client's batch stream are one permutation of its examples (see
    `fedjax_sim.data.batching.client_stream`), so the loss is summed over those slots: the whole
    client (or, when its stream is capped at ``S * B < n_k`` slots, the examples it trains on).
    Returns 0 for a client without examples.
    """
    num_steps, batch_size = client.indices.shape
    slots = jnp.arange(num_steps * batch_size).reshape(num_steps, batch_size)
    first_pass = client.mask & (slots < client.num_examples)
    steps = jnp.minimum(client.num_steps, -(-client.num_examples // batch_size))
    key = jax.random.split(client.key)[1]  # local training draws from client.key itself

    def step(s, totals):
        batch = gather_batch(data, client.indices[s])
        _, stats = loss_fn(params, batch, first_pass[s], jax.random.fold_in(key, s))
        return totals[0] + stats["loss_sum"], totals[1] + stats["count"]

    trip_count = client.trip_count(steps) if client.own_trip_count else num_steps
    zero = jnp.zeros((), jnp.float32)
    loss_sum, count = jax.lax.fori_loop(0, trip_count, step, (zero, zero))
    return loss_sum / jnp.maximum(count, 1.0)


def squared_norm(tree: Params) -> jax.Array:
    """``||tree||^2`` over all leaves (float32 scalar)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def q_ffl(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    q: float = 1.0,
    lipschitz: float | None = None,
    client_weighting: str | float = "num_examples",
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """q-FedAvg (Li et al. 2020, Algorithm 2) with any optax client and server optimizer.

    Args:
      model: the model to train.
      client_optimizer: the clients' local optimizer (fresh state every round); plain SGD in the
        paper.
      server_optimizer: applied to ``sum p_k Delta_k / sum p_k h_k``; ``optax.sgd(1.0)`` is the
        paper's update.
      q: the fairness exponent, >= 0 (0: FedAvg; the paper uses 0.001 to 15 depending on the
        dataset).
      lipschitz: L; None (default): 1 / the client optimizer's injected ``learning_rate``, read
        every round (so a swept or scheduled learning rate changes L with it).
      client_weighting: ``p_k``: ``"num_examples"`` (default), ``"uniform"`` or an exponent.
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the clients' deltas (`fedjax_sim.aggregators`; default: the
        weighted mean).
      client_schedules: ``{hyperparameter: round -> value}`` for the client optimizer (see
        `fed_avg`).

    Returns:
      A `FederatedAlgorithm` whose state is a `QFFLState`.
    """
    if not q >= 0:
        raise ValueError(f"q must be >= 0, got {q}")
    if lipschitz is not None and not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)

    def init(params: Params) -> QFFLState:
        fields = server_fields(params, client_optimizer, server_optimizer, exponent, aggregator)
        if lipschitz is None and "learning_rate" not in fields["client_hyperparams"]:
            raise ValueError(
                "q_ffl: the client optimizer has no injected learning_rate to derive the "
                "Lipschitz constant L = 1 / lr from; wrap it in optax.inject_hyperparams or pass "
                "lipschitz="
            )
        # A given L is an array of the state (a sweep can vary it); None derives it from the lr.
        hyperparams = {} if lipschitz is None else {
            "lipschitz": jnp.asarray(lipschitz, jnp.float32)}
        return QFFLState(**fields, q=jnp.asarray(q, jnp.float32),
                         algorithm_hyperparams=hyperparams)

    def client_update(client, shared):
        server_params, data, hyperparams = shared
        loss = client_loss(loss_fn, server_params, client, data)
        delta, stats = client_delta(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams)
        return delta, squared_norm(delta), loss, stats

    def apply(state: QFFLState, cohort: Cohort, map_clients: ClientMap):
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        deltas, delta_norms, losses, stats = map_clients(
            client_update, cohort.clients, (state.params, cohort.data, hyperparams)
        )
        if lipschitz is None:
            lipschitz_constant = 1.0 / hyperparams["learning_rate"]
        else:
            lipschitz_constant = state.algorithm_hyperparams["lipschitz"]
        weights = client_weights(cohort.clients, state.weight_exponent)  # p_k, 0 if inactive
        loss = losses + LOSS_EPSILON
        loss_q = jnp.power(loss, state.q)
        # ||dw_k||^2 = L^2 ||w - w_k||^2; q * F^(q-1) is 0 when q == 0 (F >= 1e-10 keeps it finite).
        h = (state.q * jnp.power(loss, state.q - 1.0) * lipschitz_constant**2 * delta_norms
             + lipschitz_constant * loss_q)
        numerator_weights = weights * loss_q * lipschitz_constant  # sum_k p_k Delta_k = sum c_k d_k
        denominator = jnp.maximum(jnp.sum(weights * h), jnp.finfo(jnp.float32).tiny)
        scale = jnp.sum(numerator_weights) / denominator
        new_state, aggregator_metrics = server_step(
            state, server_optimizer, aggregator, deltas, numerator_weights, cohort.server_key(),
            transform=lambda mean: jax.tree.map(lambda x: x * scale.astype(x.dtype), mean),
            client_ids=cohort.clients.client_id, cohort_size=cohort.size)
        active = weights > 0
        metrics = {**round_metrics(stats, weights), **aggregator_metrics}
        metrics["q_ffl/initial_loss"] = (
            jnp.sum(jnp.where(active, losses, 0.0)) / jnp.maximum(jnp.sum(active), 1)
        )
        # The step relative to the (loss^q-weighted) mean client delta: 1 for q = 0, smaller as
        # q ||dw||^2 / F grows (many local steps, large q): why large q trains slower.
        metrics["q_ffl/step_scale"] = scale
        return new_state, metrics

    return FederatedAlgorithm(init, apply)
