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

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage
from fedjax_sim.algorithms.fed_avg import (
    ServerState,
    client_weights,
    init_server_state,
    round_metrics,
    scheduled_hyperparams,
    server_step,
)
from fedjax_sim.algorithms.local import (
    LossFn,
    local_train,
    model_loss,
    weight_exponent,
)
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
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
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """FedProx with any optax client and server optimizers.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer (fresh state each round).
      server_optimizer: applied to ``server - weighted mean of clients`` (SGD 1.0: the paper).
      mu: the proximal coefficient (>= 0; 0 is FedAvg).
      client_weighting: ``"num_examples"``, ``"uniform"`` or an exponent of num_examples.
      num_clients: unused (FedProx keeps no per-client state); accepted for the registry.
      aggregator: combines the clients' deltas (`fedjax_sim.aggregators`; default: the
        weighted mean).
      loss_fn: the local objective F_i (default: the model's masked cross-entropy).

    Returns:
      A `FederatedAlgorithm` whose state is FedAvg's `ServerState`.
    """
    del num_clients
    if not mu >= 0:
        raise ValueError(f"fed_prox: mu must be >= 0, got {mu!r}")
    exponent = weight_exponent(client_weighting)
    loss_fn = loss_fn or model_loss(model)

    aggregator = as_aggregator(aggregator)

    def init(params: Params) -> ServerState:
        return init_server_state(params, client_optimizer, server_optimizer, exponent,
                                 aggregator)

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
        new_state, aggregator_metrics = server_step(state, server_optimizer, aggregator, deltas,
                                                    weights, cohort.server_key())
        return new_state, {**round_metrics(stats, weights), **aggregator_metrics}

    return FederatedAlgorithm(init, apply)
