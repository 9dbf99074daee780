"""Agnostic Federated Learning: a minimax over mixtures of the clients.

Mohri, Sivek & Suresh 2019, "Agnostic Federated Learning" (ICML 2019, arXiv:1902.00146). AFL
trains the model for the worst mixture of the client distributions,

  min_w max_{lambda in simplex} L(w, lambda) = sum_k lambda_k L_k(w),

with Stochastic-AFL (the paper's Algorithm 1): a descent step on w and a projected ascent step on
lambda per round. Here, per round and for the cohort S of C out of K clients:

  L_k      = L_k(w^t), client k's loss at the broadcast model (before local training)
  d_k      = w^t - w_k^{t+1}, the client's local-training delta (FedAvg-style local steps)
  w^{t+1}  = server_optimizer(sum_{k in S} lambda_k d_k / sum_{k in S} lambda_k)
  lambda   = Proj_simplex(lambda + gamma_lambda * g),  g_k = (K / C) L_k for k in S, else 0

``g`` is the unbiased estimate of ``grad_lambda L = (L_1, ..., L_K)`` from a uniform cohort; with
full participation (``cohort.sampler: full``) it is exactly the gradient, as in the authors'
(non-stochastic) baseline in ``litian96/fair_flearn``. The model step normalizes by the cohort's
lambda mass (a self-normalized estimate: it stays bounded when lambda concentrates on a few
clients). lambda starts uniform; its mass replaces the usual ``num_examples`` weights, so AFL
takes no ``client_weighting``. One local SGD step per client and server SGD is the paper's
gradient step on w; more local steps make it a FedAvg-style step.

`project_to_simplex` is the Euclidean projection onto the probability simplex (sort and
threshold: Held, Wolfe & Crowder 1974; Duchi et al. 2008, "Efficient Projections onto the
l1-Ball for Learning in High Dimensions", Figure 1).

Example::

  algorithm = afl(model, optax.sgd(0.1), optax.sgd(1.0), lambda_learning_rate=0.01,
                  num_clients=dataset.train.num_clients)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage
from fedjax_sim.algorithms.fed_avg import (
    ClientSchedules,
    client_delta,
    round_metrics,
    scheduled_hyperparams,
    server_step,
)
from fedjax_sim.algorithms.local import LossFn, model_loss, optimizer_hyperparams
from fedjax_sim.algorithms.q_ffl import client_loss
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@struct.dataclass
class AFLState:
    """Agnostic FL server state.

    Attributes:
      params: the global model parameters.
      opt_state: the server optimizer's state.
      client_hyperparams: injected client-optimizer hyperparameters (e.g. ``learning_rate``).
      mixture: ``[num_clients]`` float32, lambda: the mixture weights over all clients (on the
        simplex: non-negative, summing to 1).
      lambda_learning_rate: gamma_lambda, the ascent step size of lambda.
      aggregator: the aggregator's state.
    """

    params: Params
    opt_state: optax.OptState
    client_hyperparams: dict[str, jax.Array]
    mixture: jax.Array
    lambda_learning_rate: jax.Array
    aggregator: Any = ()


def project_to_simplex(v: jax.Array) -> jax.Array:
    """The Euclidean projection of ``v`` (``[K]``) onto ``{x : x >= 0, sum(x) = 1}``.

    ``argmin_x ||x - v||`` is ``max(v - theta, 0)`` with the threshold theta found from the
    sorted values: ``u`` = v sorted in decreasing order, ``rho`` = the number of ``j`` with
    ``u_j > (sum_{i <= j} u_i - 1) / j`` (these ``j`` form a prefix), and
    ``theta = (sum_{i <= rho} u_i - 1) / rho``.
    """
    u = jnp.sort(v)[::-1]
    excess = jnp.cumsum(u) - 1.0
    positions = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    rho = jnp.sum(u > excess / positions)  # >= 1: j = 1 always qualifies
    theta = excess[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def afl(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    lambda_learning_rate: float = 0.01,
    num_clients: int | None = None,
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """Agnostic FL (Mohri et al. 2019): descent on the model, projected ascent on lambda.

    Args:
      model: the model to train.
      client_optimizer: the clients' local optimizer (fresh state every round).
      server_optimizer: applied to the lambda-weighted mean of the client deltas.
      lambda_learning_rate: gamma_lambda >= 0, the step size of the ascent on the mixture
        weights (0: lambda stays uniform, i.e. FedAvg with uniform client weights).
      num_clients: K, the number of training clients (required: lambda has one entry per
        client; the engine passes it).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the clients' deltas (`fedjax_sim.aggregators`; default: the
        weighted mean).
      client_schedules: ``{hyperparameter: round -> value}`` for the client optimizer (see
        `fed_avg`).

    Returns:
      A `FederatedAlgorithm` whose state is an `AFLState`.
    """
    if num_clients is None or num_clients < 1:
        raise ValueError(
            f"afl needs num_clients >= 1 (one mixture weight per client), got {num_clients}"
        )
    if not lambda_learning_rate >= 0:
        raise ValueError(f"lambda_learning_rate must be >= 0, got {lambda_learning_rate}")
    loss_fn = loss_fn or model_loss(model)
    aggregator = as_aggregator(aggregator)

    def init(params: Params) -> AFLState:
        return AFLState(
            params=params,
            opt_state=server_optimizer.init(params),
            client_hyperparams=optimizer_hyperparams(client_optimizer, params),
            mixture=jnp.full((num_clients,), 1.0 / num_clients, jnp.float32),
            lambda_learning_rate=jnp.asarray(lambda_learning_rate, jnp.float32),
            aggregator=aggregator.init(params),
        )

    def client_update(client, shared):
        server_params, data, hyperparams = shared
        loss = client_loss(loss_fn, server_params, client, data)
        delta, stats = client_delta(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams)
        return delta, loss, stats

    def apply(state: AFLState, cohort: Cohort, map_clients: ClientMap):
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        deltas, losses, stats = map_clients(
            client_update, cohort.clients, (state.params, cohort.data, hyperparams)
        )
        clients = cohort.clients
        active = clients.valid & (clients.num_steps > 0)
        weights = jnp.where(active, state.mixture[clients.client_id], 0.0)
        new_state, aggregator_metrics = server_step(state, server_optimizer, aggregator, deltas,
                                                    weights, cohort.server_key(),
                                                    client_ids=cohort.clients.client_id,
                                                    cohort_size=cohort.size)

        num_active = jnp.maximum(jnp.sum(active), 1).astype(jnp.float32)
        target = jnp.where(active, clients.client_id, num_clients)  # inactive: dropped
        loss_gradient = jnp.zeros((num_clients,), jnp.float32).at[target].add(
            jnp.where(active, losses, 0.0), mode="drop"
        ) * (num_clients / num_active)
        mixture = project_to_simplex(state.mixture + state.lambda_learning_rate * loss_gradient)

        metrics = {**round_metrics(stats, active.astype(jnp.float32)), **aggregator_metrics}
        metrics["afl/initial_loss"] = jnp.sum(jnp.where(active, losses, 0.0)) / num_active
        metrics["afl/lambda_max"] = jnp.max(mixture)
        # 1 / sum(lambda^2): K for uniform lambda, 1 when all mass sits on one client.
        metrics["afl/effective_clients"] = 1.0 / jnp.sum(jnp.square(mixture))
        new_state = new_state.replace(mixture=mixture)
        return new_state, metrics

    return FederatedAlgorithm(init, apply)
