"""Mime and MimeLite: clients mimic a centralized optimizer whose statistics the server keeps.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich and Suresh 2021, "Breaking the centralized
barrier for cross-device federated learning" (NeurIPS 2021; first titled "Mime: Mimicking
Centralized Stochastic Algorithms in Federated Learning"), arXiv:2008.03606, Algorithm 1.

A base optimizer (any optax transform, e.g. ``optax.sgd(lr, momentum=0.9)`` or Adam) is split
into its update rule U and its statistics s (momentum, second moments), which live on the
server. Every round:

1. each client i of the cohort computes its full-batch gradient at the server params x over
   the examples of its round (padding masked), and the server averages them:
   ``c = mean_i grad f_i(x)`` (weighted by the client weights);
2. each client runs local steps from y = x with the statistics *applied but frozen*:
   ``y <- y + U(g, s)``, where U is the base optimizer's update with state s and its new
   state is thrown away. Mime uses the SVRG-style corrected gradient
   ``g = grad f_i(y; batch) - grad f_i(x; batch) + c``; MimeLite the plain ``grad f_i(y; batch)``;
3. the server steps its optax optimizer on ``x - weighted mean of y_i`` (SGD with learning
   rate 1: the paper) and updates the statistics with the average full-batch gradient,
   ``s <- V(c, s)`` (the base optimizer's ``update(c, s, x)``, keeping only the new state).

Example::

  algorithm = mime_lite(model, optax.sgd(0.05, momentum=0.9), optax.sgd(1.0))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage, apply_aggregator
from fedjax_sim.algorithms.fed_avg import (
    client_delta,
    client_weights,
    fed_avg_setup,
    options_of,
    round_metrics,
    second_message_metrics,
    server_step,
)
from fedjax_sim.algorithms.local import LossFn, full_batch_gradient
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@struct.dataclass
class MimeState:
    """Mime / MimeLite server state.

    Attributes:
      params: the global model x.
      opt_state: the server optimizer's state.
      base_state: the base (client) optimizer's statistics s, used frozen by the clients.
      weight_exponent: client weight = ``num_examples ** weight_exponent``.
      aggregator: the state of the aggregator of the model deltas.
      gradient_aggregator: the state of the aggregator of the full-batch gradients.
    """

    params: Params
    opt_state: optax.OptState
    base_state: optax.OptState
    weight_exponent: jax.Array
    aggregator: Any = ()
    gradient_aggregator: Any = ()


def frozen(optimizer: optax.GradientTransformation,
           state: optax.OptState) -> optax.GradientTransformation:
    """``optimizer``'s update rule with its state fixed to ``state`` (the new state is dropped)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, empty_state, params=None):
        updates, _ = optimizer.update(updates, state, params)
        return updates, empty_state

    return optax.GradientTransformation(init, update)


def svrg_corrected(loss_fn: LossFn, server_params: Params, control: Params) -> LossFn:
    """A loss whose gradient at y is ``grad f(y; batch) - grad f(x; batch) + c``.

    ``f(y) - <stop_gradient(grad f(x; batch) - c), y>``: the same batch, mask and rng at the
    server params x; the stats stay those of ``f(y)``.
    """

    def loss(params, batch, mask, rng):
        value, stats = loss_fn(params, batch, mask, rng)
        at_server = jax.grad(lambda p: loss_fn(p, batch, mask, rng)[0])(server_params)
        shift = jax.lax.stop_gradient(jax.tree.map(jnp.subtract, at_server, control))
        inner = sum(jnp.vdot(s, p) for s, p in zip(jax.tree.leaves(shift),
                                                   jax.tree.leaves(params), strict=True))
        return value - inner, stats

    return loss


def _mime(model, client_optimizer, server_optimizer, corrected: bool,
          client_weighting: str | float = "num_examples", loss_fn=None, aggregator=None,
          gradient_aggregator=None) -> FederatedAlgorithm:
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)
    gradient_aggregator = as_aggregator(gradient_aggregator)

    def init(params: Params) -> MimeState:
        return MimeState(
            params=params,
            opt_state=server_optimizer.init(params),
            base_state=client_optimizer.init(params),
            weight_exponent=jnp.asarray(exponent, jnp.float32),
            aggregator=aggregator.init(params),
            gradient_aggregator=gradient_aggregator.init(params),
        )

    def full_gradient(client, shared):
        server_params, data = shared
        return full_batch_gradient(loss_fn, server_params, client, data)

    def mime_client(client, shared):
        server_params, base_state, control, data = shared
        local_loss = svrg_corrected(loss_fn, server_params, control)
        return client_delta(local_loss, frozen(client_optimizer, base_state), server_params,
                            client, data)

    def mime_lite_client(client, shared):
        server_params, base_state, data = shared
        gradient = full_batch_gradient(loss_fn, server_params, client, data)
        delta, stats = client_delta(loss_fn, frozen(client_optimizer, base_state),
                                    server_params, client, data)
        return delta, gradient, stats

    def apply(state: MimeState, cohort: Cohort, map_clients: ClientMap):
        clients = cohort.clients
        weights = client_weights(clients, state.weight_exponent)
        key_gradients, key_deltas = jax.random.split(cohort.server_key())
        if corrected:
            gradients = map_clients(full_gradient, clients, (state.params, cohort.data))
            control, gradient_state, gradient_metrics = apply_aggregator(
                gradient_aggregator, state.gradient_aggregator, gradients, weights,
                key_gradients, client_ids=clients.client_id, cohort_size=cohort.size)
            deltas, stats = map_clients(
                mime_client, clients, (state.params, state.base_state, control, cohort.data))
        else:
            deltas, gradients, stats = map_clients(
                mime_lite_client, clients, (state.params, state.base_state, cohort.data))
            control, gradient_state, gradient_metrics = apply_aggregator(
                gradient_aggregator, state.gradient_aggregator, gradients, weights,
                key_gradients, client_ids=clients.client_id, cohort_size=cohort.size)
        new_state, metrics = server_step(state, server_optimizer, aggregator, deltas, weights,
                                         key_deltas, client_ids=clients.client_id,
                                         cohort_size=cohort.size)
        # s <- V(c, s) at x; a round in which no client trained leaves the statistics alone.
        _, base_state = client_optimizer.update(control, state.base_state, state.params)
        trained = jnp.sum(weights) > 0
        base_state = jax.tree.map(lambda new, old: jnp.where(trained, new, old),
                                  base_state, state.base_state)
        new_state = new_state.replace(base_state=base_state, gradient_aggregator=gradient_state)
        return new_state, {**round_metrics(stats, weights), **metrics,
                           **second_message_metrics(gradient_metrics, "gradient_aggregator")}

    return FederatedAlgorithm(init, apply)


def mime(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    client_weighting: str | float = "num_examples",
    loss_fn: LossFn | None = None,
    aggregator: Aggregator | Stage | None = None,
    gradient_aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """Mime: frozen server statistics and SVRG-corrected local gradients.

    Args:
      model: the model to train.
      client_optimizer: the base optimizer (its update rule runs on the clients, its state is
        the server's statistics), e.g. ``optax.sgd(lr, momentum=0.9)``.
      server_optimizer: applied to ``x - weighted mean of y_i`` (SGD 1.0: the paper).
      client_weighting: ``"num_examples"``, ``"uniform"`` (the paper) or an exponent of
        num_examples; weights both the gradient average c and the params average.
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the clients' model deltas (`fedjax_sim.aggregators`; default: the
        weighted mean).
      gradient_aggregator: combines the second message, the clients' full-batch gradients at
        x (the control c and the base optimizer's statistics; default: the weighted mean). A DP
        run must privatize both.

    Returns:
      A `FederatedAlgorithm` whose state is a `MimeState`.
    """
    return _mime(model, client_optimizer, server_optimizer, True, client_weighting, loss_fn,
                 aggregator, gradient_aggregator)


@options_of(mime)
def mime_lite(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    **options,
) -> FederatedAlgorithm:
    """MimeLite: frozen server statistics, plain local gradients (no control variate).

    Args: as `mime` (``**options``: its keyword options).

    Returns:
      A `FederatedAlgorithm` whose state is a `MimeState`.
    """
    return _mime(model, client_optimizer, server_optimizer, False, **options)
