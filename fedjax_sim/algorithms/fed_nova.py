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

rho is the client optimizer's injected ``momentum`` (a config's ``sgd``), else the momentum its
steps show on a constant gradient (a plain ``optax.sgd(lr, momentum=rho)``), else 0; an
optimizer whose steps follow no heavy-ball pattern (Nesterov momentum, Adagrad, a learning
rate that decays within the round) is refused unless ``momentum`` is given, since a_i would be
wrong for it.

Example::

  algorithm = fed_nova(model, optax.sgd(0.05), optax.sgd(1.0))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.fed_avg import averaging_algorithm, fed_avg, options_of
from fedjax_sim.algorithms.local import optimizer_hyperparams
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.models.base import Model


def normalizing_weight(num_steps: jax.Array, momentum: jax.Array | float) -> jax.Array:
    """``||a_i||_1`` for ``num_steps`` steps of SGD with heavy-ball ``momentum`` (0: tau_i)."""
    tau = num_steps.astype(jnp.float32)
    rho = jnp.asarray(momentum, jnp.float32)
    safe = jnp.where(rho > 0, rho, 0.5)  # keeps the unused branch finite
    with_momentum = (tau - safe * (1.0 - safe**tau) / (1.0 - safe)) / (1.0 - safe)
    return jnp.where(rho > 0, with_momentum, tau)


# Steps of the momentum probe, and how closely its step sizes must follow heavy-ball SGD's.
PROBE_STEPS = 4
PROBE_RTOL = 1e-4


def probe_momentum(optimizer: optax.GradientTransformation) -> tuple[float | None, list[float]]:
    """rho of ``optimizer`` if its steps on a constant gradient are heavy-ball SGD's.

    Feeds a gradient of 1 to one zero parameter (weight decay adds nothing there) for
    `PROBE_STEPS` steps. Heavy-ball SGD with learning rate lr and momentum rho moves by
    ``lr (1 + rho + ... + rho^(k-1))`` in step k, so the step sizes relative to the first are
    ``1, 1 + rho, 1 + rho + rho^2, ...``: rho = the second minus 1, checked on the others.
    Returns ``(rho, relative step sizes)``, rho None when they follow no such pattern (Nesterov
    momentum, Adagrad); ``(0.0, [])`` for an optimizer that cannot be probed this way (it needs
    extra arguments) or does not move.
    """
    params = jnp.zeros((1,), jnp.float32)
    try:
        state = optimizer.init(params)
        sizes = []
        for _ in range(PROBE_STEPS):
            updates, state = optimizer.update(jnp.ones_like(params), state, params)
            sizes.append(-float(np.asarray(updates)[0]))
    except (TypeError, ValueError):
        return 0.0, []
    if sizes[0] == 0:  # a zero learning rate: nothing to tell, nothing moves
        return 0.0, []
    relative = [size / sizes[0] for size in sizes]
    rho = relative[1] - 1.0
    rho = 0.0 if abs(rho) < PROBE_RTOL else rho  # plain SGD, up to float32 rounding
    expected = np.cumsum(np.float64(rho) ** np.arange(PROBE_STEPS))
    if not 0.0 <= rho < 1.0 or not np.allclose(relative, expected, rtol=PROBE_RTOL,
                                                atol=PROBE_RTOL):
        return None, relative
    return rho, relative


def resolve_momentum(client_optimizer: optax.GradientTransformation) -> float | None:
    """The rho of a_i for ``momentum=None``: None to read the injected ``momentum`` each round,
    else the probed constant. ValueError for steps that are not heavy-ball SGD's."""
    rho, relative = probe_momentum(client_optimizer)
    injected = optimizer_hyperparams(client_optimizer, jnp.zeros((1,), jnp.float32))
    injected_rho = injected.get("momentum")
    if rho is not None and (injected_rho is None or abs(rho - float(injected_rho)) <= 1e-3):
        return None if injected_rho is not None else rho
    shown = ", ".join(f"{r:.4g}" for r in relative)
    raise ValueError(
        f"fed_nova: the client optimizer's steps on a constant gradient grow as [{shown}] "
        "(relative to the first), not as SGD with heavy-ball momentum rho (1, 1 + rho, "
        "1 + rho + rho^2, ...)" + (f" with its injected momentum {float(injected_rho):g}"
                                   if injected_rho is not None else "")
        + ", so FedNova's normalizing weights a_i would be wrong (Nesterov momentum, adaptive "
        "optimizers, a learning-rate schedule that changes within a round). Use SGD with or "
        "without heavy-ball momentum (nesterov: false), or pass "
        "fed_nova(momentum=...) to choose the a_i of heavy-ball SGD with that momentum "
        "(momentum=0: a_i = the client's number of local steps)")


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
        hyperparameter when it has one (``sgd`` with momentum from a config, read each round),
        else the momentum its steps show on a constant gradient (0 for plain SGD).
      **options: `fed_avg`'s (``client_weighting``: p_i, ``"num_examples"`` being the paper's
        n_i / n; ``loss_fn``, ``client_schedules``, ``aggregator``).

    Returns:
      A `FederatedAlgorithm` whose state is FedAvg's `ServerState`.

    Raises:
      ValueError: ``momentum`` outside [0, 1), or (``momentum=None``) a client optimizer whose
        steps are not heavy-ball SGD's (see `probe_momentum`).
    """
    if momentum is not None and not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"fed_nova: momentum must be in [0, 1), got {momentum!r}")
    constant = momentum if momentum is not None else resolve_momentum(client_optimizer)

    def normalize(weights, clients, hyperparams):
        rho = constant
        if rho is None:  # the injected momentum of this round (sweepable)
            rho = hyperparams["momentum"]
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
