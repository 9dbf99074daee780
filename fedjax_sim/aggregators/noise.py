"""Gaussian noise on the aggregate, calibrated to the clip norm: the Gaussian mechanism of
DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963; Abadi et al. 2016, arXiv:1607.00133).

The noise on the clients' *sum* has std ``z * S`` (S: the clip norm times the bound on one
client's weight, from the context that `clip` and the reducer fill in), so on the aggregate
(the sum times the reducer's ``scale``) it has std ``z * S * scale``.

``noise_cohort_size`` simulates a production cohort on a small one (pfl-research's
``noise_cohort_size``): the noise is scaled by ``D / noise_cohort_size`` (D: the reducer's
denominator), so the aggregate carries the noise a mean over ``noise_cohort_size`` clients
would carry. The accounting must then use that cohort's sampling rate; the run labels it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.base import SERVER, Stage


def gaussian_noise(
    noise_multiplier: float | None = None,
    *,
    stddev: float | None = None,
    noise_cohort_size: float | None = None,
) -> Stage:
    """Adds ``N(0, sigma^2)`` to every coordinate of the aggregate.

    Args:
      noise_multiplier: z; sigma = z * sensitivity * weight_bound * scale from the context (a
        `clip` stage must come before the reducer).
      stddev: or a fixed sigma on the aggregate (no clip needed; not accounted as DP).
      noise_cohort_size: simulate the noise of a cohort of this many clients (see above).

    Returns:
      A server `Stage`; metrics ``noise_stddev`` (sigma on the aggregate).
    """
    if (noise_multiplier is None) == (stddev is None):
        raise ValueError("gaussian_noise: set exactly one of noise_multiplier and stddev")
    value = noise_multiplier if noise_multiplier is not None else stddev
    if not float(value) >= 0:
        raise ValueError(f"gaussian_noise: the noise must be >= 0, got {value!r}")
    if noise_cohort_size is not None and not float(noise_cohort_size) > 0:
        raise ValueError(f"gaussian_noise: noise_cohort_size must be > 0, got "
                         f"{noise_cohort_size!r}")

    def init(example):
        del example
        state = {"noise_multiplier" if noise_multiplier is not None else "stddev":
                 jnp.asarray(value, jnp.float32)}
        if noise_cohort_size is not None:
            state["noise_cohort_size"] = jnp.asarray(noise_cohort_size, jnp.float32)
        return state

    def apply(state, aggregate, key, context):
        if noise_multiplier is not None:
            if "sensitivity" not in context:
                raise ValueError(
                    "gaussian_noise(noise_multiplier=...) needs a clip stage before the reducer "
                    "(the noise std is the multiplier times the clip norm); or set stddev=")
            sigma = (state["noise_multiplier"] * context["sensitivity"]
                     * context.get("weight_bound", 1.0) * context.get("scale", 1.0))
        else:
            sigma = state["stddev"]
        if "noise_cohort_size" in state:
            sigma = sigma * context.get("denominator", 1.0) / state["noise_cohort_size"]
        leaves, treedef = jax.tree.flatten(aggregate)
        keys = jax.random.split(key, len(leaves))
        noised = [x + (sigma * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                  for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, noised), state, {"noise_stddev": sigma}, context

    def noise_multipliers(state):
        return {"update": state["noise_multiplier"]}

    return Stage(SERVER, init, apply, "gaussian_noise",
                 noise_multipliers if noise_multiplier is not None else None)
