"""Cohort samplers: ``key -> [C]`` int32 client positions, pure and jittable.

The engine calls a sampler with ``fold_in(root_key, round)``-derived keys, so the cohort of a
round depends only on the seed and the round number (resuming reproduces it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Sampler = Callable[[jax.Array], jax.Array]


def uniform_sampler(num_clients: int, cohort_size: int) -> Sampler:
    """Draws ``cohort_size`` distinct clients uniformly at random each round."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cohort size {cohort_size} must be in [1, num_clients={num_clients}]"
        )

    def sample(key: jax.Array) -> jax.Array:
        return jax.random.choice(key, num_clients, (cohort_size,), replace=False).astype(
            jnp.int32
        )

    return sample


def full_participation(num_clients: int) -> Sampler:
    """Every client, every round, in a fixed order."""

    def sample(key: jax.Array) -> jax.Array:
        del key
        return jnp.arange(num_clients, dtype=jnp.int32)

    return sample
