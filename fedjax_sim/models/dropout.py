"""Dropout whose mask compiles fast on XLA:CPU: `flax.linen.Dropout` with the same mask.

With JAX's default partitionable threefry, random bits of an N-D shape compile into code that
XLA:CPU takes several times longer to compile than the same number of bits drawn flat (a
``[20, 12, 12, 64]`` mask against ``[184320]`` in a trial run), and the EMNIST CNN's first
dropout sits inside every client's local loop. The bits of a shape are those
of its flattened size in row-major order, so drawing the mask flat and reshaping it gives
flax's mask bit for bit (tested against `flax.linen.Dropout`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class Dropout(nn.Dropout):
    """`flax.linen.Dropout` (same attributes, same rng stream, same mask), mask drawn flat.

    The class keeps flax's name, so its auto-named instances (``Dropout_0``, ...) fold the same
    names into the rng as flax's do.
    """

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None,
                 rng: jax.Array | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # as flax: no NaN gradients
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        mask = jax.random.bernoulli(rng, p=keep_prob, shape=(math.prod(shape),))
        mask = jnp.broadcast_to(mask.reshape(shape), inputs.shape)
        return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
