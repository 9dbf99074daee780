"""`Model`: a flax module plus the pure functions federated training needs.

A model is ``init(rng) -> params`` and ``apply(params, x, train, rng) -> logits``; the loss and
metrics are masked sums (`batch_statistics`) so padded examples and padding tokens never count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Model:
    """A classifier (or sequence tagger) built from a flax module.

    Attributes:
      module: a flax linen module called as ``module(x, train=bool)`` returning logits
        ``[B, ..., num_classes]``; dropout draws from the ``"dropout"`` rng stream.
      sample_input: an array shaped like one batch of inputs (``[1, ...]``), used by `init`.
      num_classes: size of the last logits axis.
      pad_label: a label value that marks padding (e.g. the padding character of a sequence
        task); such labels never count in losses or metrics. None when every label counts.
      name: a short name for logs.
    """

    module: nn.Module
    sample_input: np.ndarray
    num_classes: int
    pad_label: int | None = None
    name: str = "model"

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters from a PRNG key."""
        variables = self.module.init({"params": rng}, jnp.asarray(self.sample_input), train=False)
        return variables["params"]

    def apply(
        self, params: Params, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        """Logits for inputs ``x``; ``train=True`` with an ``rng`` enables dropout."""
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        return self.module.apply({"params": params}, x, train=train, rngs=rngs)


def batch_statistics(
    model: Model,
    params: Params,
    batch: dict[str, jax.Array],
    mask: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Masked sums of the cross-entropy loss and of correct predictions.

    Args:
      batch: ``{"x": [B, ...], "y": [B] or [B, T]}`` integer labels.
      mask: ``[B]`` bool, False for padded examples.

    Returns:
      ``{"loss_sum": [], "correct": [], "count": []}`` float32 sums over the valid labels
      (a label is valid when its example is unmasked and it is not ``model.pad_label``).
    """
    logits = model.apply(params, batch["x"], train=train, rng=rng)
    labels = batch["y"]
    valid = jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - 1))
    valid = jnp.broadcast_to(valid, labels.shape)
    if model.pad_label is not None:
        valid = valid & (labels != model.pad_label)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    # `where`, not a product: a padded example may hold garbage (even NaN) and must not leak.
    return {
        "loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)),
        "correct": jnp.sum(jnp.where(valid, correct, False).astype(jnp.float32)),
        "count": jnp.sum(valid.astype(jnp.float32)),
    }


def mean_loss(stats: dict[str, jax.Array]) -> jax.Array:
    """``loss_sum / count`` with a safe divide (0 when nothing is valid)."""
    return stats["loss_sum"] / jnp.maximum(stats["count"], 1.0)
