"""`Model`: a flax module plus the pure functions federated training needs.

A model is ``init(rng) -> params`` and ``apply(params, x, train, rng) -> logits``; the loss and
metrics are masked sums (`batch_statistics`) so padded examples and padding tokens never count.

Two tasks:

* ``"classification"``: one integer label per example (``y: [B]``) or per token (``y: [B, T]``);
  softmax cross-entropy and top-1 accuracy.
* ``"multilabel"``: a set of up to L class ids per example (``y: [B, L]``, ``-1`` pads the set),
  e.g. the tags of a StackOverflow question; sigmoid binary cross-entropy against the multi-hot
  target, and recall at 5 (TensorFlow Federated's metric for StackOverflow tag prediction).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any

TASKS = ("classification", "multilabel")

# The sums `batch_statistics` returns. ``count`` is the loss's denominator (labels or examples
# that carry a loss term), ``accuracy_count`` the accuracy's (the labels `correct` is out of).
STATISTICS = ("loss_sum", "correct", "count", "accuracy_count")

# Recall at k of a multi-label model: TFF's `tf.keras.metrics.Recall(top_k=5)`.
RECALL_AT = 5


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
"""XLA options of `Model.init`'s program on CPU: LLVM at -O1 (a one-shot program: compile time
is what counts)."""

LEGACY_FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
"""XLA:CPU's legacy fusion emitters as a per-program option: the rounds of the models that
`create_model` gives it (`Model.compiler_options`) compile faster with the same bits
(``benchmarks/first_round.py``; ``tests/test_fusion_emitters.py``). Not for every model: they
run the char-LSTM's round slower."""


def cpu_compiler_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``options`` as a dict when JAX's default backend is the CPU, else None (XLA:CPU options
    such as the fusion emitters or LLVM's level mean nothing to other backends)."""
    if not options or jax.default_backend() != "cpu":
        return None
    return dict(options)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Model:
    """A classifier, sequence tagger or multi-label classifier built from a flax module.

    Attributes:
      module: a flax linen module called as ``module(x, train=bool)`` returning logits
        ``[B, ..., num_classes]``; dropout draws from the ``"dropout"`` rng stream.
      sample_input: an array shaped like one batch of inputs (``[1, ...]``), used by `init`.
      num_classes: size of the last logits axis.
      pad_label: a label value that marks padding (e.g. the padding character of a sequence
        task); such labels never count in losses or metrics. None when every label counts.
      name: a short name for logs.
      task: ``"classification"`` (default) or ``"multilabel"`` (see `batch_statistics`).
      ignore_labels: label values never counted in accuracy (they still count in the loss
        unless they equal ``pad_label``): TFF's StackOverflow next-word accuracy leaves out
        padding, out-of-vocabulary and end-of-sentence tokens. Classification only.
      compiler_options: XLA compiler options for the top-level CPU programs that train this
        model (the round step, its multi-round loop, a sweep's step); None: XLA's defaults.
        `create_model` gives the models measured to compile faster and run as fast with them
        `LEGACY_FUSION_EMITTERS`. Other backends ignore it.
    """

    module: nn.Module
    sample_input: np.ndarray
    num_classes: int
    pad_label: int | None = None
    name: str = "model"
    task: str = "classification"
    ignore_labels: tuple[int, ...] = ()
    compiler_options: dict[str, Any] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Model.task is {self.task!r}; expected one of {list(TASKS)}")
        ignore = tuple(int(label) for label in self.ignore_labels)
        if ignore and self.task != "classification":
            raise ValueError(
                f"Model.ignore_labels={ignore} is only supported for task='classification', "
                f"not {self.task!r}"
            )
        object.__setattr__(self, "ignore_labels", ignore)

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters from a PRNG key (one compiled program: run op by op, flax's init
        compiles every random draw on its own, seconds for a CNN or an LSTM).

        On CPU the program is compiled with LLVM at -O1 (`INIT_COMPILER_OPTIONS`): it runs once,
        and -O1 compiled the EMNIST CNN's and the char-LSTM's inits faster in trial runs (a
        fresh process each); the parameters are flax's bit for bit (tested). Under a trace
        (inside the caller's jit or vmap) it is traced into the caller's program: compiler
        options belong to top-level programs only."""
        if isinstance(rng, jax.core.Tracer):
            return self._init_fn(rng)
        return self._jitted_init(rng)

    def _init_fn(self, rng: jax.Array) -> Params:
        sample = jnp.asarray(np.asarray(self.sample_input))
        return self.module.init({"params": rng}, sample, train=False)["params"]

    @functools.cached_property
    def _jitted_init(self):
        return jax.jit(self._init_fn, compiler_options=cpu_compiler_options(INIT_COMPILER_OPTIONS))

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
    """Masked sums of the loss and of correct predictions.

    Classification (``model.task == "classification"``): softmax cross-entropy and top-1
    accuracy over the valid labels; a label is valid when its example is unmasked and it is not
    ``model.pad_label``. Labels in ``model.ignore_labels`` count in the loss but not in
    ``correct``/``accuracy_count``.

    Multi-label (``"multilabel"``): ``y`` holds up to L class ids per example, padded with
    ``-1`` (any id outside ``[0, num_classes)`` or equal to ``pad_label`` is padding). The
    target is the multi-hot vector of the ids. Per example the loss is the *mean* over the
    ``num_classes`` outputs of the sigmoid binary cross-entropy (Keras's `BinaryCrossentropy`,
    which TFF uses, averages over the last axis; TFF then *sums* over the batch, we average
    over examples like every other task here: the same gradient up to a factor of the batch
    size). ``correct`` counts the true ids among the 5 highest logits and ``accuracy_count``
    the true ids, so ``correct / accuracy_count`` is recall at 5 pooled over examples, as
    ``tf.keras.metrics.Recall(top_k=5)`` computes it; ``count`` is the number of examples.

    Args:
      batch: ``{"x": [B, ...], "y": [B] or [B, T]}`` integer labels (``[B, L]`` class ids for
        a multi-label model).
      mask: ``[B]`` bool, False for padded examples.

    Returns:
      ``{"loss_sum", "correct", "count", "accuracy_count"}``: float32 scalar sums. The mean
      loss is ``loss_sum / count`` (`mean_loss`), the accuracy (recall at 5 for multi-label)
      ``correct / accuracy_count`` (`accuracy`).
    """
    logits = model.apply(params, batch["x"], train=train, rng=rng)
    labels = batch["y"]
    if model.task == "multilabel":
        return _multilabel_statistics(model, logits, labels, mask)
    valid = jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - 1))
    valid = jnp.broadcast_to(valid, labels.shape)
    if model.pad_label is not None:
        valid = valid & (labels != model.pad_label)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    # `where`, not a product: a padded example may hold garbage (even NaN) and must not leak.
    stats = {
        "loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)),
        "correct": jnp.sum(jnp.where(valid, correct, False).astype(jnp.float32)),
        "count": jnp.sum(valid.astype(jnp.float32)),
    }
    if model.ignore_labels:
        scored = valid & ~jnp.isin(labels, jnp.asarray(model.ignore_labels, labels.dtype))
        stats["correct"] = jnp.sum(jnp.where(scored, correct, False).astype(jnp.float32))
        stats["accuracy_count"] = jnp.sum(scored.astype(jnp.float32))
    else:
        stats["accuracy_count"] = stats["count"]
    return stats


def _multilabel_statistics(
    model: Model, logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """`batch_statistics` for ``logits [B, K]`` and class-id sets ``labels [B, L]``."""
    num_classes = logits.shape[-1]
    if labels.ndim != 2 or logits.ndim != 2:
        raise ValueError(
            f"a multilabel model needs logits [B, K] and labels [B, L] (class ids, -1 padding); "
            f"got logits {logits.shape} and labels {labels.shape}"
        )
    logits = logits.astype(jnp.float32)
    tag = mask[:, None] & (labels >= 0) & (labels < num_classes)
    if model.pad_label is not None:
        tag = tag & (labels != model.pad_label)
    # multi-hot [B, K]; one_hot of an out-of-range id is all zeros, a repeated id counts once
    targets = jnp.max(jax.nn.one_hot(labels, num_classes) * tag[..., None], axis=1)
    losses = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
    _, top = jax.lax.top_k(logits, min(RECALL_AT, num_classes))
    hits = jnp.sum(jnp.take_along_axis(targets, top, axis=-1), axis=-1)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(jnp.where(mask, hits, 0.0)),
        "count": jnp.sum(mask.astype(jnp.float32)),
        "accuracy_count": jnp.sum(targets),
    }


def mean_loss(stats: dict[str, jax.Array]) -> jax.Array:
    """``loss_sum / count`` with a safe divide (0 when nothing is valid)."""
    return stats["loss_sum"] / jnp.maximum(stats["count"], 1.0)


def accuracy(stats: dict[str, jax.Array]) -> jax.Array:
    """``correct / accuracy_count`` (``count`` when absent) with a safe divide.

    Top-1 accuracy for classification (without ``ignore_labels``), recall at 5 for multi-label.
    """
    denominator = stats.get("accuracy_count", stats["count"])
    return stats["correct"] / jnp.maximum(denominator, 1.0)
