"""FedNova: normalized averaging for clients that run different numbers of local steps.

Wang, Liu, Liang, Joshi and Poor 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020, arXiv:2007.07481.

Plain FedAvg weights a client that ran more local steps more heavily, so with heterogeneous
steps it converges to a different (inconsistent) objective. FedNova divides each client's
update ``delta_i = x - y_i`` by ``a_i = ||a_i||_1``, the total weight its local optimizer put
on its gradients, and rescales the average by the effective number of steps:

  d = sum_i p_i * delta_i / a_i,    tau_eff = sum_i p_i * a_i,    pseudo-gradient = tau_eff * d

with p_i the normalized client weights (num_examples by default). For local SGD, a_i = tau_i,
the client's number of real local steps (``client.num_steps``); for SGD with heavy-ball
momentum rho (optax's ``sgd(lr, momentum=rho)``), ``a_i = (tau_i - rho (1 - rho^tau_i) /
(1 - rho)) / (1 - rho)`` (the paper's Section 5 / Appendix). The server optax optimizer steps
on the pseudo-gradient (SGD with learning rate 1: the paper). When every client runs the same
number of steps, this is FedAvg.

Example::

  algorithm = fed_nova(model, optax.sgd(0.05), optax.sgd(1.0))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fed_avg import averaging_algorithm, fed_avg, options_of
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.models.base import Model


def normalizing_weight(num_steps: jax.Array, momentum: jax.Array | float) -> jax.Array:
    """``||a_i||_1`` for ``num_steps`` steps of SGD with heavy-ball ``momentum`` (0: tau_i)."""
    tau = num_steps.astype(jnp.float32)
    rho = jnp.asarray(momentum, jnp.float32)
    safe = jnp.where(rho > 0, rho, 0.5)  # keeps the unused branch finite
    with_momentum = (tau - safe * (1.0 - safe**tau) / (1.0 - safe)) / (1.0 - safe)
    return jnp.where(rho > 0, with_momentum, tau)


@options_of(fed_avg)
def fed_nova(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    momentum: float | None = None,
    **options,
) -> FederatedAlgorithm:
    """FedNova with an optax client optimizer (SGD, optionally with momentum).

    Args:
      model: the model to train.
      client_optimizer: the local optimizer; a_i assumes SGD with (optional) heavy-ball
        momentum, which is what the paper analyses.
      server_optimizer: applied to the normalized pseudo-gradient (SGD 1.0: the paper).
      momentum: rho in a_i. None (default): the client optimizer's injected ``momentum``
        hyperparameter when it has one (``sgd`` with momentum from a config), else 0.
      **options: `fed_avg`'s (``client_weighting``: p_i, ``"num_examples"`` being the paper's
        n_i / n; ``loss_fn``, ``client_schedules``, ``aggregator``).

    Returns:
      A `FederatedAlgorithm` whose state is FedAvg's `ServerState`.
    """
    if momentum is not None and not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"fed_nova: momentum must be in [0, 1), got {momentum!r}")

    def normalize(weights, clients, hyperparams):
        rho = momentum
        if rho is None:
            rho = hyperparams.get("momentum", 0.0)
            rho = 0.0 if rho is None else rho
        a = normalizing_weight(clients.num_steps, rho)
        p = weights / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
        tau_eff = jnp.sum(p * a)
        # tau_eff * sum_i p_i delta_i / a_i as one weighted mean (a_i >= 1 for a client that
        # trained; p_i = 0 for the others) rescaled by the sum of its weights.
        q = p / jnp.maximum(a, 1.0)
        scale = tau_eff * jnp.sum(q)
        return (q, lambda mean: jax.tree.map(lambda d: d * scale.astype(d.dtype), mean),
                {"train/tau_eff": tau_eff})

    return averaging_algorithm(model, client_optimizer, server_optimizer, **options,
                               reweight=normalize)
