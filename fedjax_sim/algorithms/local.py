"""Local training of one client: a loop of optax steps over the client's batches.

Under a sequential client map the loop runs ``client.num_steps`` iterations (a per-client trip
count: each client runs only its own steps); under ``vmap`` it is a fixed scan over all S steps.
Steps without a real example change nothing, so both give the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core import ClientInput, ShardedData
from fedjax_sim.data.batching import first_pass_mask
from fedjax_sim.models.base import Model, batch_statistics, mean_loss

Params = Any
# (params, batch, mask, rng) -> (scalar loss, stats dict)
LossFn = Callable[[Params, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]

# (minibatch grads, current local params) -> the gradient the optimizer steps with
GradCorrection = Callable[[Params, Params], Params]

STAT_KEYS = ("loss_sum", "correct", "count", "accuracy_count")  # = models.base.STATISTICS


def model_loss(model: Model) -> LossFn:
    """The model's masked mean cross-entropy, in training mode (dropout on)."""

    def loss(params, batch, mask, rng):
        stats = batch_statistics(model, params, batch, mask, train=True, rng=rng)
        return mean_loss(stats), stats

    return loss


def loss_gradient(loss_fn: LossFn) -> Callable[..., tuple[Params, dict]]:
    """``(params, batch, mask, rng) -> (grads, stats)``: what local training steps with.

    ``loss_fn.gradient`` when the loss defines one (DP-SGD's clipped and noised per-example
    gradient, `fedjax_sim.privacy.dp_sgd_loss`), else ``jax.grad(loss_fn, has_aux=True)``.
    """
    return getattr(loss_fn, "gradient", None) or jax.grad(loss_fn, has_aux=True)


def gather_batch(data: Mapping[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
    """``{feature: data[feature][rows]}``; rows are clipped, so padding never reads garbage.

    Rows are global; for `ShardedData` inside the sharded client map they become rows of the
    device's own block."""
    if isinstance(data, ShardedData):
        rows = data.local_rows(rows)
    return {name: jnp.take(array, rows, axis=0, mode="clip") for name, array in data.items()}


def with_hyperparams(opt_state: Any, hyperparams: Mapping[str, jax.Array]) -> Any:
    """Replaces the hyperparameters of an ``optax.inject_hyperparams`` state (traced sweeps)."""
    if not hyperparams:
        return opt_state
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **hyperparams})


def optimizer_hyperparams(optimizer: optax.GradientTransformation, params: Params) -> dict:
    """The injected hyperparameters of ``optimizer`` ({} for a plain transform)."""
    hyperparams = getattr(optimizer.init(params), "hyperparams", None)
    return dict(hyperparams) if isinstance(hyperparams, dict) else {}


def local_train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    client: ClientInput,
    data: Mapping[str, jax.Array],
    hyperparams: Mapping[str, jax.Array] | None = None,
    *,
    grad_correction: GradCorrection | None = None,
) -> tuple[Params, dict[str, jax.Array]]:
    """Runs ``client.num_steps`` optimizer steps from ``params`` on the client's batches.

    Args:
      loss_fn: ``(params, batch, mask, rng) -> (loss, stats)``; stats holds masked sums. A
        loss with a ``gradient`` method (DP-SGD) steps with that instead of ``jax.grad``.
      optimizer: the client optimizer (state initialized fresh each round).
      params: the broadcast server parameters.
      client: one client's `ClientInput` (``indices``/``mask`` of shape ``[S, B]``).
      data: the flat example arrays (device resident).
      hyperparams: overrides for an ``inject_hyperparams`` optimizer (traced, sweepable).
      grad_correction: ``(grads, params) -> grads``, applied to every step's minibatch gradient
        before the optimizer sees it: a proximal term (FedProx), control variates (SCAFFOLD,
        Mime), a dynamic regularizer (FedDyn). None: plain local training.

    Returns:
      ``(client params after training, summed batch stats over its steps)``.
    """
    opt_state = with_hyperparams(optimizer.init(params), hyperparams or {})
    gradient = loss_gradient(loss_fn)
    zero_stats = {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}

    def step(s, carry):
        params, opt_state, totals = carry
        batch = gather_batch(data, client.indices[s])
        mask = client.mask[s]
        grads, stats = gradient(params, batch, mask, jax.random.fold_in(client.key, s))
        if grad_correction is not None:
            grads = grad_correction(grads, params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A step without a single real example leaves params and optimizer state untouched.
        keep = stats["count"] > 0
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(keep, new, old),
            (new_params, new_opt_state),
            (params, opt_state),
        )
        totals = {k: totals[k] + stats[k] for k in STAT_KEYS}
        return params, opt_state, totals

    # A static bound makes the loop a scan (vmap-friendly); a traced one a while loop.
    params, _, totals = jax.lax.fori_loop(0, client.trip_count(), step,
                                          (params, opt_state, zero_stats))
    return params, totals


def full_batch_gradient(
    loss_fn: LossFn,
    params: Params,
    client: ClientInput,
    data: Mapping[str, jax.Array],
) -> Params:
    """The gradient at ``params`` of the client's mean loss over every real example of its round.

    Sums ``count * grad(mean batch loss)`` over the client's ``[S, B]`` batches (padding masked,
    one batch in memory at a time) and divides by the number of real examples: the full-batch
    gradient over the examples the client trains on this round (with E local epochs each
    appears E times, which leaves the mean unchanged). Zero for a client without examples.
    Used by Mime / MimeLite (Karimireddy et al. 2021, arXiv:2008.03606).
    """

    def step(s, carry):
        total, count = carry
        batch = gather_batch(data, client.indices[s])
        grads, stats = loss_gradient(loss_fn)(
            params, batch, client.mask[s], jax.random.fold_in(client.key, s)
        )
        total = jax.tree.map(lambda t, g: t + stats["count"] * g, total, grads)
        return total, count + stats["count"]

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, count = jax.lax.fori_loop(
        0, client.trip_count(), step, (zeros, jnp.zeros((), jnp.float32))
    )
    return jax.tree.map(lambda t: t / jnp.maximum(count, 1.0).astype(t.dtype), total)


def first_pass_gradient(
    loss_fn: LossFn,
    params: Params,
    client: ClientInput,
    data: Mapping[str, jax.Array],
) -> Params:
    """The gradient at ``params`` of the client's mean loss over its examples, each once.

    `full_batch_gradient` over the first pass of the client's example stream
    (`fedjax_sim.data.batching.first_pass_mask`): the slots ``j = s B + b < n`` of its round's
    ``[S, B]`` batches, n = ``client.num_examples``. Those name every one of the client's n
    examples exactly once whenever its round reaches n examples (local epochs without a
    ``max_local_steps`` cut; fixed local steps with ``S B >= n``), whatever the repeats after
    them; when the round is shorter (fixed steps with ``S B < n``, or ``max_local_steps``) they
    are the ``S B`` distinct examples it trains on, a uniform subset (the host data path ships
    no other rows). Only the first ``ceil(n / B)`` steps are visited under a sequential map.
    Padding, dropped clients and steps a deadline cut stay masked; zero for a client without
    examples. SCAFFOLD's option I control variate (Karimireddy et al. 2020, arXiv:1910.06378).
    """
    batch_size = client.mask.shape[-1]
    steps = (client.num_examples.astype(jnp.int32) + batch_size - 1) // batch_size
    once = client.replace(mask=first_pass_mask(client.mask, client.num_examples),
                          num_steps=jnp.minimum(client.num_steps, steps).astype(jnp.int32))
    return full_batch_gradient(loss_fn, params, once, data)


def weight_exponent(client_weighting: str | float) -> float:
    """The exponent p of ``num_examples ** p`` for a ``client_weighting`` option.

    ``"num_examples"``: 1, ``"uniform"``: 0, a number: itself (ValueError otherwise).
    """
    weightings = {"num_examples": 1.0, "uniform": 0.0}
    if isinstance(client_weighting, str):
        if client_weighting not in weightings:
            raise ValueError(
                f"client_weighting={client_weighting!r}: expected one of {sorted(weightings)} "
                "or a number (the exponent of num_examples)"
            )
        return weightings[client_weighting]
    return float(client_weighting)
