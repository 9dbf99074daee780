"""FedProx: FedAvg whose clients minimize their loss plus a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127. Client i approximately minimizes

  h_i(w) = F_i(w) + mu / 2 * ||w - w_server||^2

with its local optimizer, so each step uses the gradient ``g + mu * (w - w_server)``. The server
aggregates exactly like FedAvg (weighted mean of ``server - client`` as a pseudo-gradient for a
server optax optimizer; SGD with learning rate 1 is the paper's update). ``mu = 0`` is FedAvg.

Example::

  algorithm = fed_prox(model, optax.sgd(0.05), optax.sgd(1.0), mu=0.01)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import ClientMap, Cohort, FederatedAlgorithm, weighted_mean
from fedjax_sim.algorithms.fed_avg import (
    ServerState,
    client_weights,
    round_metrics,
    scheduled_hyperparams,
)
from fedjax_sim.algorithms.local import (
    LossFn,
    local_train,
    model_loss,
    optimizer_hyperparams,
    weight_exponent,
)
from fedjax_sim.models.base import Model

Params = Any


def fed_prox(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    mu: float = 0.01,
    client_weighting: str | float = "num_examples",
    num_clients: int | None = None,
    loss_fn: LossFn | None = None,
    client_schedules: dict | None = None,
) -> FederatedAlgorithm:
    """FedProx with any optax client and server optimizers.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer (fresh state each round).
      server_optimizer: applied to ``server - weighted mean of clients`` (SGD 1.0: the paper).
      mu: the proximal coefficient (>= 0; 0 is FedAvg).
      client_weighting: ``"num_examples"``, ``"uniform"`` or an exponent of num_examples.
      num_clients: unused (FedProx keeps no per-client state); accepted for the registry.
      loss_fn: the local objective F_i (default: the model's masked cross-entropy).

    Returns:
      A `FederatedAlgorithm` whose state is FedAvg's `ServerState`.
    """
    del num_clients
    if not mu >= 0:
        raise ValueError(f"fed_prox: mu must be >= 0, got {mu!r}")
    exponent = weight_exponent(client_weighting)
    loss_fn = loss_fn or model_loss(model)

    def init(params: Params) -> ServerState:
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            client_hyperparams=optimizer_hyperparams(client_optimizer, params),
            weight_exponent=jnp.asarray(exponent, jnp.float32),
        )

    def client_update(client, shared):
        server_params, data, hyperparams = shared

        def proximal(grads, params):  # d/dw of mu/2 ||w - w_server||^2
            return jax.tree.map(
                lambda g, w, w0: g + mu * (w - w0), grads, params, server_params
            )

        params, stats = local_train(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams, grad_correction=proximal)
        return jax.tree.map(jnp.subtract, server_params, params), stats

    def apply(state: ServerState, cohort: Cohort, map_clients: ClientMap):
        # client learning-rate schedules follow the round (client state is fresh each round)
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        deltas, stats = map_clients(
            client_update, cohort.clients, (state.params, cohort.data, hyperparams)
        )
        weights = client_weights(cohort.clients, state.weight_exponent)
        updates, opt_state = server_optimizer.update(
            weighted_mean(deltas, weights), state.opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state), round_metrics(stats, weights)

    return FederatedAlgorithm(init, apply)
