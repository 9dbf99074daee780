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
import optax

from fedjax_sim.algorithms.fed_avg import averaging_algorithm, fed_avg, options_of
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@options_of(fed_avg)
def fed_prox(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    mu: float = 0.01,
    **options,
) -> FederatedAlgorithm:
    """FedProx with any optax client and server optimizers.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer (fresh state each round).
      server_optimizer: applied to ``server - weighted mean of clients`` (SGD 1.0: the paper).
      mu: the proximal coefficient (>= 0; 0 is FedAvg).
      **options: `fed_avg`'s (``client_weighting``, ``loss_fn``: the local objective F_i,
        ``client_schedules``, ``aggregator``).

    Returns:
      A `FederatedAlgorithm` whose state is FedAvg's `ServerState`, ``mu`` in its
      ``algorithm_hyperparams``.
    """
    if not mu >= 0:
        raise ValueError(f"fed_prox: mu must be >= 0, got {mu!r}")

    def proximal_to(server_params: Params, hyperparams):
        mu_ = hyperparams["mu"]  # an array of the state: sweepable in one program

        def proximal(grads, params):  # d/dw of mu/2 ||w - w_server||^2
            return jax.tree.map(
                lambda g, w, w0: g + mu_.astype(g.dtype) * (w - w0), grads, params,
                server_params
            )

        return proximal

    return averaging_algorithm(model, client_optimizer, server_optimizer, **options,
                               correction=proximal_to, algorithm_hyperparams={"mu": mu})
