"""Flat L2 clipping of each client's whole message, with a fixed or adaptive norm.

Fixed: ``x_i <- x_i * min(1, C / ||x_i||)`` (McMahan et al. 2018, arXiv:1710.06963: "flat"
clipping of the whole update, all layers as one vector).

Adaptive (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping", arXiv:1905.03871): C tracks the ``target_quantile`` of the clients' update
norms by a geometric step on a noised count of unclipped clients,

  b_bar = (sum_i (1[||x_i|| <= C] - 1/2) + N(0, count_stddev^2)) / D + 1/2
  C    <- C * exp(-learning_rate * (b_bar - target_quantile)),

with D the expected number of participating clients. Centring the indicator at 1/2 makes the
count's L2 sensitivity 1/2, so its Gaussian mechanism has noise multiplier
``2 * count_stddev`` and enters the privacy accounting beside the update noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.base import CLIENT, Stage, participating, scaled_client_norms


def clip(
    norm: float,
    *,
    target_quantile: float | None = None,
    learning_rate: float = 0.2,
    count_stddev: float = 0.0,
    expected_clients: float | None = None,
    noise_cohort_size: float | None = None,
) -> Stage:
    """Clips each client's message to L2 norm ``norm`` (adaptively when ``target_quantile``).

    Args:
      norm: the clip norm C (the initial one when adaptive), > 0.
      target_quantile: None: a fixed norm. In (0, 1): the fraction of clients whose update
        should be unclipped; C adapts geometrically towards that quantile of the norms.
      learning_rate: the geometric step size eta_C of the adaptive update (0.2 in the paper).
      count_stddev: std sigma_b of the Gaussian noise on the unclipped count (0: no noise, not
        private; the paper uses about D / 20).
      expected_clients: D, the expected number of participating clients (the normaliser of the
        count; None: the realised number, which is not private).
      noise_cohort_size: simulate a production cohort of this many clients: the count noise is
        scaled by ``D / noise_cohort_size`` (``count_stddev`` is the production cohort's), as
        `gaussian_noise` does for the update.

    Returns:
      A client `Stage`. It puts ``sensitivity = C`` (this round's norm) into the context, for a
      noise stage after the reducer. Metrics: ``clip_norm``, ``clipped_fraction`` and, when
      adaptive, ``unclipped_estimate`` (the noised b_bar).
    """
    if not float(norm) > 0:
        raise ValueError(f"clip: norm must be > 0, got {norm!r}")
    adaptive = target_quantile is not None
    if adaptive and not 0.0 < float(target_quantile) < 1.0:
        raise ValueError(f"clip: target_quantile must be in (0, 1), got {target_quantile!r}")
    if not float(learning_rate) >= 0 or not float(count_stddev) >= 0:
        raise ValueError(f"clip: learning_rate and count_stddev must be >= 0, got "
                         f"{learning_rate!r}, {count_stddev!r}")
    if expected_clients is not None and not float(expected_clients) > 0:
        raise ValueError(f"clip: expected_clients must be > 0, got {expected_clients!r}")
    if noise_cohort_size is not None and (expected_clients is None
                                          or not float(noise_cohort_size) > 0):
        raise ValueError("clip: noise_cohort_size needs expected_clients and must be > 0, got "
                         f"{noise_cohort_size!r}")

    def init(example):
        del example
        state = {"norm": jnp.asarray(norm, jnp.float32)}
        if adaptive:
            state.update(
                target_quantile=jnp.asarray(target_quantile, jnp.float32),
                learning_rate=jnp.asarray(learning_rate, jnp.float32),
                count_stddev=jnp.asarray(count_stddev, jnp.float32),
            )
            if expected_clients is not None:
                state["expected_clients"] = jnp.asarray(expected_clients, jnp.float32)
            if noise_cohort_size is not None:
                state["noise_cohort_size"] = jnp.asarray(noise_cohort_size, jnp.float32)
        return state

    def apply(state, values, weights, key, context):
        bound = state["norm"]
        # ||x|| = scale * reduced; scale is 1 unless the sum of squares overflows float32,
        # where x / scale * min(scale, C / reduced) is x * min(1, C / ||x||) without the inf
        # norm (C / inf = 0 made such an update 0 instead of clipping it to norm C)
        scale, reduced = scaled_client_norms(values)
        norms = scale * reduced
        factor = jnp.minimum(scale, bound / jnp.maximum(reduced, jnp.finfo(jnp.float32).tiny))

        def clip_leaf(x):
            shape = (-1,) + (1,) * (x.ndim - 1)
            return x / scale.astype(x.dtype).reshape(shape) * factor.astype(x.dtype).reshape(shape)

        values = jax.tree.map(clip_leaf, values)
        sending = participating(weights).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(sending), 1.0)
        unclipped = (norms <= bound).astype(jnp.float32) * sending
        # of the participating clients (0 when none participates: no one was clipped)
        clipped = jnp.sum(sending - unclipped)
        metrics = {"clip_norm": bound, "clipped_fraction": clipped / count}
        if adaptive:
            stddev = state["count_stddev"]
            if "noise_cohort_size" in state:
                stddev = stddev * state["expected_clients"] / state["noise_cohort_size"]
            noise = stddev * jax.random.normal(key, (), jnp.float32)
            centred = jnp.sum(unclipped - 0.5 * sending) + noise
            denominator = state.get("expected_clients", count)
            estimate = centred / denominator + 0.5
            new_norm = bound * jnp.exp(-state["learning_rate"]
                                       * (estimate - state["target_quantile"]))
            state = {**state, "norm": new_norm}
            metrics["unclipped_estimate"] = estimate
        return values, weights, state, metrics, {**context, "sensitivity": bound}

    def noise_multipliers(state):
        # The count query: sensitivity 1/2, noise std sigma_b.
        return {"count": 2.0 * state["count_stddev"]} if adaptive else {}

    return Stage(CLIENT, init, apply, "clip", noise_multipliers if adaptive else None)
