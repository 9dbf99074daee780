"""FedDyn: federated learning with a dynamic regularizer per client.

Acar, Zhao, Matas, Mattina, Whatmough and Saligrama 2021, "Federated Learning Based on Dynamic
Regularization", ICLR 2021, arXiv:2111.04263 (Algorithm 1).

Client i keeps h_i = grad L_i at its last local model (a ``[num_clients, ...]`` store in the
state, zero at the start). In round t it starts from the server model theta and approximately
minimizes, with its local optimizer,

  L_i(w) - <h_i, w> + alpha / 2 * ||w - theta||^2        (gradient: g - h_i + alpha (w - theta))

then updates ``h_i <- h_i - alpha (w_i - theta)``. The server keeps h (zero at the start):

  h     <- h - alpha / N * sum_{i in cohort} (w_i - theta)
  theta <- weighted mean of w_i - h / alpha

with N the number of clients. The second line is handed to the server optax optimizer as the
pseudo-gradient ``theta - (mean w_i - h / alpha)``: SGD with learning rate 1 (the default) is
the paper's update. Padding clients and clients without a real step neither write their h_i
nor count in the sums.

Example::

  algorithm = fed_dyn(model, optax.sgd(0.05), optax.sgd(1.0), alpha=0.01, num_clients=100)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage, apply_aggregator
from fedjax_sim.algorithms.client_state import (
    gather_client_state,
    init_client_state,
    scatter_client_state,
)
from fedjax_sim.algorithms.fed_avg import (
    ClientSchedules,
    ServerState,
    client_weights,
    fed_avg_setup,
    round_metrics,
    scheduled_hyperparams,
    second_message_metrics,
    server_fields,
    server_step,
)
from fedjax_sim.algorithms.local import LossFn, local_train
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@struct.dataclass(kw_only=True)
class FedDynState(ServerState):
    """FedDyn server state: FedAvg's `ServerState` (``params`` is the server model theta, its
    ``aggregator`` combines the clients' drifts) plus

    Attributes:
      h: the server's running sum of client drifts, scaled by -alpha / N (shaped like params).
      client_gradients: every client's h_i, leaves ``[num_clients, ...]``.
      drift_aggregator: the state of the aggregator of the drifts' mean for h.
    """

    h: Params
    client_gradients: Params
    drift_aggregator: Any = ()


def fed_dyn(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    alpha: float = 0.01,
    client_weighting: str | float = "num_examples",
    num_clients: int | None = None,
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
    drift_aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """FedDyn with optax client and server optimizers.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer (fresh state each round).
      server_optimizer: applied to ``theta - (mean w_i - h / alpha)`` (SGD 1.0: the paper).
      alpha: the regularization coefficient (> 0; the paper uses 0.1, 0.01, 0.001).
      client_weighting: weights of the mean of w_i: ``"num_examples"``, ``"uniform"`` (the
        paper) or an exponent of num_examples.
      num_clients: N, the number of training clients (required: the store has a row for each).
      loss_fn: the local objective L_i (default: the model's masked cross-entropy).
      aggregator: combines the clients' drifts ``w_i - theta`` for the model update
        (`fedjax_sim.aggregators`; default the weighted mean).
      drift_aggregator: combines the same drifts, uniformly over the clients that trained, for
        the server's h (default: the uniform mean). The server reads the drifts twice: a DP run
        must privatize both.

    Returns:
      A `FederatedAlgorithm` whose state is a `FedDynState`.
    """
    if num_clients is None or int(num_clients) < 1:
        raise ValueError(f"fed_dyn needs num_clients (>= 1) for its per-client state, "
                         f"got {num_clients!r}")
    if not float(alpha) > 0:
        raise ValueError(f"fed_dyn: alpha must be > 0, got {alpha!r}")
    alpha = float(alpha)
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)
    drift_aggregator = as_aggregator(drift_aggregator)

    def init(params: Params) -> FedDynState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return FedDynState(
            **server_fields(params, client_optimizer, server_optimizer, exponent, aggregator),
            h=zeros,
            client_gradients=init_client_state(zeros, int(num_clients)),
            drift_aggregator=drift_aggregator.init(params),
            # alpha as an array of the state: a sweep over it is one program
            algorithm_hyperparams={"alpha": jnp.asarray(alpha, jnp.float32)},
        )

    def client_update(inputs, shared):
        client, client_gradient = inputs
        server_params, data, hyperparams, alpha = shared

        # g - h_i + alpha (w - theta) = g + alpha w - offset, with the offset fixed per round
        offset = jax.tree.map(lambda hi, w0: hi + alpha * w0, client_gradient, server_params)

        def regularized(grads, params):
            return jax.tree.map(lambda g, w, o: g + alpha * w - o, grads, params, offset)

        params, stats = local_train(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams, grad_correction=regularized)
        drift = jax.tree.map(jnp.subtract, params, server_params)  # w_i - theta
        new_gradient = jax.tree.map(lambda hi, d: hi - alpha * d, client_gradient, drift)
        return drift, new_gradient, stats

    def apply(state: FedDynState, cohort: Cohort, map_clients: ClientMap):
        # client learning-rate schedules follow the round (client state is fresh each round)
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        clients = cohort.clients
        alpha = state.algorithm_hyperparams["alpha"]
        client_gradients = gather_client_state(state.client_gradients, clients.client_id)
        drifts, new_gradients, stats = map_clients(
            client_update,
            (clients, client_gradients),
            (state.params, cohort.data, hyperparams, alpha),
        )
        weights = client_weights(clients, state.weight_exponent)
        trained = weights > 0
        count = jnp.sum(trained.astype(jnp.float32))
        # h <- h - alpha / N * sum_i (w_i - theta), over the clients that trained.
        key_model, key_h = jax.random.split(cohort.server_key())
        mean_drift, drift_aggregator_state, drift_metrics = apply_aggregator(
            drift_aggregator, state.drift_aggregator, drifts, trained.astype(jnp.float32), key_h,
            client_ids=clients.client_id, cohort_size=cohort.size)
        h = jax.tree.map(lambda h, d: h - (alpha * count / num_clients) * d, state.h, mean_drift)

        def pseudo_gradient(weighted_drift):
            # theta - (mean w_i - h / alpha) = -(weighted mean drift) + h / alpha
            # (a round in which no client trained leaves theta where it is)
            # h * (1 / alpha): what XLA made of h / alpha when alpha was a constant (bit for bit)
            inverse = 1.0 / alpha
            return jax.tree.map(lambda d, h: jnp.where(count > 0, h * inverse - d, 0.0),
                                weighted_drift, h)

        new_state, metrics = server_step(state, server_optimizer, aggregator, drifts, weights,
                                         key_model, transform=pseudo_gradient,
                                         client_ids=clients.client_id, cohort_size=cohort.size)
        new_state = new_state.replace(
            h=h,
            client_gradients=scatter_client_state(
                state.client_gradients, clients.client_id, new_gradients, trained),
            drift_aggregator=drift_aggregator_state,
        )
        return new_state, {**round_metrics(stats, weights), **metrics,
                           **second_message_metrics(drift_metrics, "drift_aggregator")}

    return FederatedAlgorithm(init, apply)
