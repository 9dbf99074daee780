"""Reducers: the stage of an aggregation chain that removes the client axis.

* `mean`: the weighted mean (the default of every algorithm), or the DP-FedAvg
  fixed-denominator estimator ``sum_i w_i x_i / D`` with D the expected cohort size (McMahan
  et al. 2018, "Learning Differentially Private Recurrent Language Models", arXiv:1710.06963),
  optionally with uniform weights;
* `sum`: the weighted sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.base import (
    REDUCE,
    Aggregator,
    Stage,
    chain,
    no_state,
    participating,
    weighted_mean,
    weighted_sum,
)

WEIGHTINGS = ("given", "uniform")


def _weights(weights: jax.Array, weighting: str) -> jax.Array:
    if weighting == "uniform":  # every participating client counts once
        return participating(weights).astype(jnp.float32)
    return weights


def mean(weighting: str = "given", denominator: float | None = None) -> Stage:
    """The (weighted) mean over the clients.

    Args:
      weighting: ``"given"`` (the algorithm's weights, by examples by default) or ``"uniform"``
        (1 for every participating client: what DP needs, as one client's influence must be
        bounded).
      denominator: None: divide by the realised sum of weights (the plain weighted mean).
        A number D (e.g. the expected cohort size q * N): divide by D, the fixed-denominator
        estimator of DP-FedAvg, unbiased for Poisson sampling and with a sensitivity that does
        not depend on who took part.

    Returns:
      A reducer `Stage`; state: the denominator as an array (sweepable), or ().
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"mean: weighting={weighting!r}: expected one of {WEIGHTINGS}")
    if denominator is not None and not float(denominator) > 0:
        raise ValueError(f"mean: denominator must be > 0, got {denominator!r}")

    def init(example):
        del example
        return () if denominator is None else {"denominator": jnp.asarray(denominator,
                                                                          jnp.float32)}

    def apply(state, values, weights, key, context):
        del key
        weights = _weights(weights, weighting)
        bound = jnp.ones((), jnp.float32) if weighting == "uniform" else jnp.max(weights)
        if denominator is None:
            aggregate = weighted_mean(values, weights)
            total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
            # no client took part: the aggregate is 0, a sum of nothing scaled by nothing (a
            # scale of 1 / tiny handed a noise stage after it a std of ~1e38)
            scale = jnp.where(jnp.sum(weights) > 0, 1.0 / total, 0.0)
        else:
            total = state["denominator"]
            aggregate = jax.tree.map(lambda s: s / total.astype(s.dtype),
                                     weighted_sum(values, weights))
            scale = 1.0 / total
        context = {**context, "weight_bound": bound, "scale": scale, "denominator": total}
        return aggregate, state, {}, context

    return Stage(REDUCE, init, apply, "mean")


def sum(weighting: str = "given") -> Stage:  # noqa: A001 - the natural name, like jnp.sum
    """The weighted sum over the clients (``weighting="uniform"``: the plain sum)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"sum: weighting={weighting!r}: expected one of {WEIGHTINGS}")

    def apply(state, values, weights, key, context):
        del key
        weights = _weights(weights, weighting)
        bound = jnp.ones((), jnp.float32) if weighting == "uniform" else jnp.max(weights)
        context = {**context, "weight_bound": bound, "scale": jnp.ones((), jnp.float32)}
        return weighted_sum(values, weights), state, {}, context

    return Stage(REDUCE, no_state, apply, "sum")


def as_aggregator(aggregator: Aggregator | Stage | None) -> Aggregator:
    """An `Aggregator` from an aggregator, a lone reducer stage, or None (the weighted mean).

    The default, ``chain(mean())``, computes exactly what the algorithms computed before the
    aggregator seam existed: `weighted_mean` of the messages with the algorithm's weights.
    """
    if aggregator is None:
        return chain(mean())
    if isinstance(aggregator, Stage):
        return chain(aggregator)  # a lone transform raises: it does not reduce
    if isinstance(aggregator, Aggregator):
        return aggregator
    raise TypeError(f"aggregator: expected an Aggregator, a reducer stage or None, got "
                    f"{type(aggregator).__name__}")
