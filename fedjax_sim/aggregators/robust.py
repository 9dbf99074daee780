"""Byzantine-robust reducers and norm bounding, masked for padding and dropped clients.

* `median`: the coordinate-wise median (Yin, Chen, Ramchandran and Bartlett 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  arXiv:1803.01498);
* `trimmed_mean`: the coordinate-wise beta-trimmed mean (same paper): per coordinate, drop the
  ``floor(beta * n)`` largest and smallest values of the n participating clients, average the
  rest;
* `krum`: Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent"): client i's score is the sum
  of squared distances to its ``n - f - 2`` nearest other clients; the m clients with the lowest
  scores are averaged (m = 1: Krum);
* `geometric_median`: the smoothed Weiszfeld iteration of RFA (Pillutla, Kakade and Harchaoui
  2022, "Robust Aggregation for Federated Learning", arXiv:1912.13445),
  ``v <- sum_i a_i x_i / max(nu, ||v - x_i||) / sum_i a_i / max(nu, ||v - x_i||)``;
* `norm_bound`: a client stage clipping each update to L2 norm M before the (mean) reducer
  (Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated Learning?",
  arXiv:1911.07963); the clipping code of `clip`.

Weighting: median, trimmed mean and Krum are unweighted over the participating clients (an
attacker could otherwise claim a large weight; the papers define them so); the geometric median
weighs by the given weights, as RFA does (``weighting="uniform"`` for 1 per client).

Static shapes: the cohort axis C keeps its size; a client with weight 0 (padding, dropped) is
masked, never sliced out. Order statistics sort with a +inf sentinel for those clients and index
by the realised count n of participating clients; Krum's distances to them are +inf.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.base import (
    REDUCE,
    Stage,
    array_state,
    client_norms,
    no_state,
    participating,
    weighted_mean,
)
from fedjax_sim.aggregators.clipping import clip

WEIGHTINGS = ("given", "uniform")


def _sorted_with_sentinel(x: jax.Array, sending: jax.Array) -> jax.Array:
    """``x`` ``[C, ...]`` sorted along the client axis, non-participating clients last (+inf)."""
    mask = sending.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sort(jnp.where(mask, x.astype(jnp.float32), jnp.inf), axis=0)


def _at_rank(sorted_x: jax.Array, rank: jax.Array) -> jax.Array:
    """``sorted_x[rank]`` for a traced scalar rank (a dynamic index, no host sync)."""
    return jax.lax.dynamic_index_in_dim(sorted_x, rank, axis=0, keepdims=False)


def median() -> Stage:
    """The coordinate-wise median of the participating clients' values (unweighted).

    With n participating clients the median of each coordinate is the mean of the values at
    ranks ``(n - 1) // 2`` and ``n // 2`` (as ``numpy.median``); 0 when no client participates.

    Returns:
      A reducer `Stage` (stateless).
    """

    def apply(state, values, weights, key, context):
        del key
        sending = participating(weights)
        count = jnp.sum(sending.astype(jnp.int32))
        low, high = jnp.maximum(count - 1, 0) // 2, count // 2

        def leaf(x):
            ordered = _sorted_with_sentinel(x, sending)
            a, b = _at_rank(ordered, low), _at_rank(ordered, jnp.maximum(high, low))
            mid = 0.5 * (a + b)
            # a + b past float32 (two values of 3e38) overflowed to inf; then a and b have
            # one sign and b - a is finite (not 0.5 a + 0.5 b: XLA folds that back)
            mid = jnp.where(jnp.isinf(mid) & jnp.isfinite(a) & jnp.isfinite(b),
                            a + 0.5 * (b - a), mid)
            return jnp.where(count > 0, mid, 0.0).astype(x.dtype)

        return jax.tree.map(leaf, values), state, {}, context

    return Stage(REDUCE, no_state, apply, "median")


def trimmed_mean(beta: float = 0.1) -> Stage:
    """The coordinate-wise beta-trimmed mean of the participating clients (unweighted).

    Args:
      beta: the fraction trimmed from each end, in [0, 0.5): with n participating clients the
        ``k = floor(beta * n)`` smallest and ``k`` largest values of every coordinate are
        dropped and the other ``n - 2k`` averaged. beta = 0 is the plain (unweighted) mean.

    Returns:
      A reducer `Stage`; state: beta as an array (sweepable).
    """
    if not 0.0 <= float(beta) < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta!r}")

    init = array_state(beta=beta)

    def apply(state, values, weights, key, context):
        del key
        sending = participating(weights)
        count = jnp.sum(sending.astype(jnp.int32))
        # floor(beta * n) in float32 could round 0.2 * 10 to 1.9999; the epsilon keeps it 2
        trim = jnp.floor(state["beta"] * count.astype(jnp.float32) + 1e-6).astype(jnp.int32)
        kept = jnp.maximum(count - 2 * trim, 1).astype(jnp.float32)

        def leaf(x):
            ordered = _sorted_with_sentinel(x, sending)
            rank = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
            keep = (rank >= trim) & (rank < count - trim)
            average = jnp.sum(jnp.where(keep, ordered, 0.0), axis=0) / kept
            # the sum overflowed float32 though the mean cannot: sum x / (2 kept), doubled
            half = jnp.sum(jnp.where(keep, ordered * (0.5 / kept), 0.0), axis=0)
            big = jnp.finfo(jnp.float32).max
            rescaled = jnp.where(jnp.isfinite(half), jnp.clip(half, -big / 2, big / 2) * 2,
                                 half)
            return jnp.where(jnp.isfinite(average), average, rescaled).astype(x.dtype)

        metrics = {"trimmed_per_side": trim.astype(jnp.float32)}
        return jax.tree.map(leaf, values), state, metrics, context

    return Stage(REDUCE, init, apply, "trimmed_mean")


def pairwise_squared_distances(values) -> jax.Array:
    """``[C, C]`` squared L2 distances between the clients' whole values (all leaves).

    Through the Gram matrix (``|a|^2 + |b|^2 - 2 a.b``, at HIGHEST precision, clamped at 0):
    a ``[C, C, D]`` difference tensor would not fit for real models.
    """
    total = 0.0
    for x in jax.tree.leaves(values):
        flat = x.astype(jnp.float32).reshape(x.shape[0], -1)
        gram = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
        squares = jnp.diagonal(gram)
        total = total + squares[:, None] + squares[None, :] - 2.0 * gram
    return jnp.maximum(total, 0.0)


def krum_scores(values, sending: jax.Array, num_byzantine: int) -> jax.Array:
    """``[C]`` Krum scores: the sum of squared distances to the ``n - f - 2`` nearest others.

    n is the number of participating clients; the neighbour count is clamped to
    ``[1, n - 1]`` (Krum needs ``n > 2f + 2``; with fewer clients it degrades gracefully to the
    nearest neighbour). Non-participating clients score +inf and are no one's neighbour; a
    squared distance that overflows float32 (a huge update) counts as +inf, not as 0.
    """
    distances = pairwise_squared_distances(values)
    # a distance that overflowed float32 (a huge update: inf, or inf - inf = nan between two)
    # is +inf: as far as it gets, never a free neighbour
    distances = jnp.where(jnp.isnan(distances), jnp.inf, distances)
    size = distances.shape[0]
    count = jnp.sum(sending.astype(jnp.int32))
    # the n - f - 2 nearest, at most the n - 1 others there are (none for a lone client)
    neighbours = jnp.clip(count - num_byzantine - 2, 1, jnp.maximum(count - 1, 1))
    neighbours = jnp.minimum(neighbours, count - 1)
    usable = sending[None, :] & ~jnp.eye(size, dtype=bool)
    ordered = jnp.sort(jnp.where(usable, distances, jnp.inf), axis=1)
    nearest = jnp.arange(size)[None, :] < neighbours
    scores = jnp.sum(jnp.where(nearest, ordered, 0.0), axis=1)
    return jnp.where(sending, scores, jnp.inf)


def krum(num_byzantine: int, multi: int = 1) -> Stage:
    """Krum (``multi=1``) or Multi-Krum: the mean of the ``multi`` lowest-scoring clients.

    Args:
      num_byzantine: f, the number of Byzantine clients tolerated (sets the neighbour count
        ``n - f - 2`` of the scores).
      multi: m, how many of the best-scoring participating clients are averaged (unweighted);
        fewer when fewer participate.

    Returns:
      A reducer `Stage` (stateless: f and m are structure). Metric ``selected``: how many
      clients were averaged.
    """
    if int(num_byzantine) != num_byzantine or num_byzantine < 0:
        raise ValueError(f"krum: num_byzantine must be an integer >= 0, got {num_byzantine!r}")
    if int(multi) != multi or multi < 1:
        raise ValueError(f"krum: multi must be an integer >= 1, got {multi!r}")
    num_byzantine, multi = int(num_byzantine), int(multi)

    def apply(state, values, weights, key, context):
        del key
        sending = participating(weights)
        scores = krum_scores(values, sending, num_byzantine)
        # participating clients rank before the others even at an infinite score
        scores = jnp.where(sending, jnp.minimum(scores, jnp.finfo(jnp.float32).max), jnp.inf)
        rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
        selected = (rank < multi) & sending
        aggregate = weighted_mean(values, selected.astype(jnp.float32))
        return aggregate, state, {"selected": jnp.sum(selected.astype(jnp.float32))}, context

    return Stage(REDUCE, no_state, apply, "krum")


def geometric_median(iterations: int = 10, smoothing: float = 1e-6,
                     weighting: str = "given") -> Stage:
    """The (weighted) geometric median by the smoothed Weiszfeld algorithm of RFA.

    Starting from the weighted mean, each of ``iterations`` steps sets
    ``beta_i = a_i / max(nu, ||v - x_i||)`` and ``v = sum_i beta_i x_i / sum_i beta_i``, with
    ``||.||`` the L2 norm of a client's whole value (all leaves) and nu = ``smoothing``.

    Args:
      iterations: Weiszfeld steps (static; RFA reports that 3 already suffice).
      smoothing: nu > 0, the floor on the distances (keeps the step finite at a data point).
        Values so large (past ``max / (4 sqrt(d))``, ~1e35 for d = 1e6) that distances could
        overflow float32 are iterated divided by a power of two s and scaled back: the floor
        is then nu * s, still far below such distances.
      weighting: ``"given"`` (the algorithm's weights a_i, as RFA) or ``"uniform"``.

    Returns:
      A reducer `Stage`; state: the smoothing as an array. Metric ``objective``: the weighted
      sum of distances ``sum_i a_i ||v - x_i|| / sum_i a_i`` at the result.
    """
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"geometric_median: iterations must be an integer >= 0, got "
                         f"{iterations!r}")
    if not float(smoothing) > 0:
        raise ValueError(f"geometric_median: smoothing must be > 0, got {smoothing!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"geometric_median: weighting={weighting!r}: expected one of "
                         f"{WEIGHTINGS}")
    iterations = int(iterations)

    init = array_state(smoothing=smoothing)

    def apply(state, values, weights, key, context):
        del key
        sending = participating(weights)
        alphas = (sending.astype(jnp.float32) if weighting == "uniform"
                  else jnp.where(sending, weights, 0.0).astype(jnp.float32))

        # Values so large that distances could pass float32's max (where every beta was 0 and
        # the result 0) run divided by a power of two s and are scaled back; s = 1 otherwise
        scale = _distance_scale(values, sending)
        scaled = jax.tree.map(lambda x: x / scale.astype(x.dtype), values)

        def distances(median):
            return client_norms(jax.tree.map(lambda x, m: x - m[None], scaled, median))

        def step(_, median):
            betas = alphas / jnp.maximum(state["smoothing"], distances(median))
            return weighted_mean(scaled, betas)

        median = jax.lax.fori_loop(0, iterations, step, weighted_mean(scaled, alphas))
        total = jnp.maximum(jnp.sum(alphas), jnp.finfo(jnp.float32).tiny)
        spread = distances(median)
        objective = jnp.sum(alphas * spread) / total
        # a weighted sum past float32 whose mean is not: normalise the weights first
        objective = jnp.where(jnp.isinf(objective), jnp.sum(alphas / total * spread),
                              objective) * scale
        median = jax.tree.map(lambda m: m * scale.astype(m.dtype), median)
        return median, state, {"objective": objective}, context

    return Stage(REDUCE, init, apply, "geometric_median")


def _distance_scale(values, sending: jax.Array) -> jax.Array:
    """A power of two s: 1 when every participating value is at most ``max / (4 sqrt(d))``
    (d: the coordinates of a message), so no distance between them overflows float32; else
    the least s that brings the largest one there."""
    leaves = jax.tree.leaves(values)
    d = sum(math.prod(x.shape[1:]) for x in leaves)
    limit = float(np.finfo(np.float32).max) / (4.0 * math.sqrt(max(d, 1)))
    peak = functools.reduce(jnp.maximum, [
        jnp.max(jnp.where(sending.reshape((-1,) + (1,) * (x.ndim - 1)),
                          jnp.abs(x.astype(jnp.float32)), 0.0), initial=0.0) for x in leaves])
    _, exponent = jnp.frexp(peak / limit)  # peak / limit = m 2^e, m in [0.5, 1)
    large = jnp.isfinite(peak) & (peak > limit)
    return jnp.where(large, jnp.ldexp(jnp.float32(1.0), exponent), jnp.float32(1.0))


def norm_bound(max_norm: float) -> Stage:
    """Norm bounding: each client's update is clipped to L2 norm ``max_norm`` (a client stage).

    Sun et al. 2019 bound every update's norm before averaging, which caps what one boosted
    (model-replacement) update can move the model. The stage is `clip` with a fixed norm (its
    metrics ``clip_norm`` and ``clipped_fraction``); chain it before any reducer (the mean by
    default). Add ``gaussian_noise(stddev=...)`` after the reducer for the paper's "weak DP".
    """
    if not float(max_norm) > 0:
        raise ValueError(f"norm_bound: max_norm must be > 0, got {max_norm!r}")
    return clip(max_norm)._replace(name="norm_bound")
