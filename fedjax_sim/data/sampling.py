"""Cohort samplers: ``key -> [C]`` int32 client positions, pure and jittable.

The engine calls a sampler with ``fold_in(root_key, round)``-derived keys, so the cohort of a
round depends only on the seed and the round number (resuming reproduces it).

* `uniform_sampler`: every client equally likely, with or without replacement;
* `weighted_sampler`: probability proportional to the client's number of training examples
  (McMahan et al. 2017's ``n_k / n``; Li et al. 2020, "Federated Optimization in Heterogeneous
  Networks", arXiv:1812.06127, sample by ``p_k`` with replacement and then average uniformly).
  Without replacement the draws are successive (each next client proportional to size among
  those not yet drawn), so inclusion probabilities are not exactly proportional to size;
* `full_participation`: every client, every round.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Sampler = Callable[[jax.Array], jax.Array]


def uniform_sampler(num_clients: int, cohort_size: int, replace: bool = False) -> Sampler:
    """Draws ``cohort_size`` clients uniformly at random each round.

    Args:
      num_clients: clients to draw from (positions ``0 .. num_clients - 1``).
      cohort_size: C, clients per round.
      replace: with replacement (a client may appear more than once; then it trains twice on
        independent batches and counts twice in the aggregate).
    """
    if cohort_size < 1 or (not replace and cohort_size > num_clients):
        bound = "" if replace else f", num_clients={num_clients}"
        raise ValueError(f"cohort size {cohort_size} must be in [1{bound}]")

    def sample(key: jax.Array) -> jax.Array:
        return jax.random.choice(key, num_clients, (cohort_size,), replace=replace).astype(
            jnp.int32
        )

    return sample


def client_blocks(num_clients: int, num_blocks: int) -> np.ndarray:
    """``[num_blocks + 1]`` boundaries splitting clients ``0 .. num_clients - 1`` into
    contiguous blocks of (almost) equal client counts: block d is ``[b[d], b[d + 1])``."""
    if not 1 <= num_blocks <= num_clients:
        raise ValueError(f"{num_clients} clients cannot be split into {num_blocks} blocks")
    return np.array([d * num_clients // num_blocks for d in range(num_blocks + 1)], np.int64)


def blocked_uniform_sampler(
    boundaries: np.ndarray, cohort_size: int, replace: bool = False
) -> Sampler:
    """Draws ``cohort_size / num_blocks`` clients uniformly from each block of clients.

    The sampler of data split by clients over devices (``data_placement: sharded``): block d
    lives on device d, which trains the ``k = cohort_size / num_blocks`` clients drawn from it
    (slots ``d k .. (d + 1) k - 1`` of the cohort). This is stratified sampling: a client of
    block d is in a round's cohort with probability ``k / n_d``, the same ``C / N`` as under
    `uniform_sampler` when the blocks are equal (`client_blocks` makes them differ by at most one
    client), but two clients of one block are drawn together less often than under uniform
    sampling, and a cohort always holds exactly k clients of every block. The key of block d is
    ``fold_in(key, d)``.

    Args:
      boundaries: ``[num_blocks + 1]`` block boundaries (`client_blocks`).
      cohort_size: C, a multiple of the number of blocks.
      replace: draw with replacement within a block.
    """
    boundaries = np.asarray(boundaries)
    num_blocks = len(boundaries) - 1
    sizes = np.diff(boundaries)
    if cohort_size % num_blocks:
        raise ValueError(f"cohort size {cohort_size} must be a multiple of the {num_blocks} "
                         "devices the clients are split over (each trains as many)")
    per_block = cohort_size // num_blocks
    if not replace and per_block > sizes.min():
        raise ValueError(f"cohort size {cohort_size} draws {per_block} clients from each of "
                         f"{num_blocks} blocks, but the smallest block has {sizes.min()} "
                         "clients")

    def sample(key: jax.Array) -> jax.Array:
        draws = [int(start) + jax.random.choice(jax.random.fold_in(key, d), int(size),
                                                (per_block,), replace=replace)
                 for d, (start, size) in enumerate(zip(boundaries[:-1], sizes, strict=True))]
        return jnp.concatenate(draws).astype(jnp.int32)

    sample.boundaries = boundaries  # the round step checks it matches the data's split
    return sample


def weighted_sampler(
    client_sizes: np.ndarray, cohort_size: int, replace: bool = False
) -> Sampler:
    """Draws clients with probability proportional to their number of examples.

    With replacement every draw is independent with ``P(client k) = n_k / sum(n)``. Without
    replacement each next client is drawn proportionally to size among the clients not yet in
    the cohort (``jax.random.choice``'s Gumbel-top-k), so the cohort has no duplicates.

    Args:
      client_sizes: ``[num_clients]`` training examples per client (a client with 0 is never
        drawn).
      cohort_size: C, clients per round.
      replace: with replacement.
    """
    sizes = np.asarray(client_sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 0) or not np.all(np.isfinite(sizes)):
        raise ValueError(
            f"weighted_sampler: client_sizes must be a non-empty 1-D array of sizes >= 0, got "
            f"shape {sizes.shape}"
        )
    nonempty = int(np.count_nonzero(sizes))
    if replace and (cohort_size < 1 or nonempty == 0):
        raise ValueError(f"cohort size {cohort_size} must be >= 1 and some client must have data")
    if not replace and not 1 <= cohort_size <= nonempty:
        raise ValueError(
            f"cohort size {cohort_size} must be in [1, {nonempty}] (the clients with data) for "
            "weighted sampling without replacement"
        )
    probabilities = jnp.asarray(sizes / sizes.sum(), jnp.float32)
    num_clients = sizes.size

    def sample(key: jax.Array) -> jax.Array:
        return jax.random.choice(
            key, num_clients, (cohort_size,), replace=replace, p=probabilities
        ).astype(jnp.int32)

    return sample


def full_participation(num_clients: int) -> Sampler:
    """Every client, every round, in a fixed order."""

    def sample(key: jax.Array) -> jax.Array:
        del key
        return jnp.arange(num_clients, dtype=jnp.int32)

    return sample


def poisson_sampler(num_clients: int, sampling_probability: float, max_cohort_size: int):
    """Poisson sampling: each client joins the round independently with probability q.

    What the DP accountants assume for amplification by sampling (``PoissonSampledDpEvent``).
    The cohort's size varies; shapes stay static with a cap ``max_cohort_size``: the sampler
    returns ``(ids [max], valid [max], drawn)`` where ``valid`` marks the real clients (the rest
    are padding the engine masks) and ``drawn`` the number the draw selected. If more than the
    cap were selected, a uniformly random subset of ``max_cohort_size`` of them trains (the
    overflow is reported as ``cohort/overflow``; pick a cap a few standard deviations above
    q * N so that it practically never happens: `poisson_cap`).
    """
    if not 0.0 < sampling_probability <= 1.0:
        raise ValueError(f"poisson_sampler: sampling probability must be in (0, 1], got "
                         f"{sampling_probability!r}")
    if not 1 <= max_cohort_size <= num_clients:
        raise ValueError(f"poisson_sampler: max_cohort_size {max_cohort_size} must be in "
                         f"[1, num_clients={num_clients}]")
    q = jnp.float32(sampling_probability)
    # jax.random.uniform's float32 values lie on a grid of 2^-23, so ``u < q`` alone would
    # select with probability ceil(q 2^23) / 2^23, not q (2^-23 for every q below it). Exact:
    # below the last grid point b <= q, join; at b, join with probability (q - b) 2^23 from
    # 32 more bits; above, never. Equal to ``u < q`` except in the cell u == b (probability
    # 2^-23 a client and round), so a seed's cohorts stay what they were.
    grid = float(sampling_probability) * 2.0 ** 23
    below = math.floor(grid)  # b = below * 2^-23: the largest grid point <= q
    boundary = jnp.float32(below * 2.0 ** -23)  # q on the grid (q = 1 too): b = q, u < q exact
    threshold = jnp.uint32(math.floor((grid - below) * 2.0 ** 32))  # < 2^32: grid - below < 1

    def sample(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        u = jax.random.uniform(key, (num_clients,))
        extra = jax.random.bits(jax.random.fold_in(key, 1), (num_clients,), jnp.uint32)
        selected = (u < boundary) | ((u == boundary) & (extra < threshold))
        # Selected clients get a score in (0, 1] uniform and independent of the selection
        # (u / q given u < q), the others -1: top-k takes a uniform subset on overflow.
        score = jnp.where(selected, 1.0 - u / q, -1.0)
        top, ids = jax.lax.top_k(score, max_cohort_size)
        return ids.astype(jnp.int32), top >= 0, jnp.sum(selected.astype(jnp.int32))

    return sample


def poisson_cap(num_clients: int, sampling_probability: float, sigmas: float = 6.0) -> int:
    """A cohort cap for `poisson_sampler`: q * N plus ``sigmas`` binomial standard deviations."""
    mean = num_clients * sampling_probability
    std = float(np.sqrt(mean * (1.0 - sampling_probability)))
    return int(min(num_clients, max(1, np.ceil(mean + sigmas * std))))
