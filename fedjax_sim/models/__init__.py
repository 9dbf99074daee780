"""Models: a flax module wrapped as pure ``init``/``apply`` plus masked loss statistics.

``create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))`` builds a `Model` by name;
the modules can also be wrapped by hand: ``Model(module=MLP(10), sample_input=..., ...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from fedjax_sim.models.base import (
    LEGACY_FUSION_EMITTERS,
    RECALL_AT,
    STATISTICS,
    TASKS,
    Model,
    accuracy,
    batch_statistics,
    mean_loss,
)
from fedjax_sim.models.char_lstm import CharLSTM
from fedjax_sim.models.classifiers import MLP, EmnistCNN, LogisticRegression
from fedjax_sim.models.conv import canonical_conv
from fedjax_sim.models.leaf_models import CelebaCNN, Sent140LSTM
from fedjax_sim.models.resnet import GroupNormResNet
from fedjax_sim.models.stackoverflow import (
    StackOverflowLSTM,
    TagLogisticRegression,
    bag_of_words,
    next_word_ignore_labels,
)

__all__ = [
    "MLP",
    "CelebaCNN",
    "Sent140LSTM",
    "CharLSTM",
    "EmnistCNN",
    "GroupNormResNet",
    "LEGACY_FUSION_EMITTERS",
    "LogisticRegression",
    "Model",
    "RECALL_AT",
    "STATISTICS",
    "StackOverflowLSTM",
    "TASKS",
    "TagLogisticRegression",
    "accuracy",
    "bag_of_words",
    "batch_statistics",
    "canonical_conv",
    "create_model",
    "mean_loss",
    "next_word_ignore_labels",
    "MODELS",
]

# name -> (module class, the constructor field that receives `num_classes`)
MODELS: dict[str, tuple[type[nn.Module], str]] = {
    "logistic": (LogisticRegression, "num_classes"),
    "mlp": (MLP, "num_classes"),
    "emnist_cnn": (EmnistCNN, "num_classes"),
    "char_lstm": (CharLSTM, "vocab_size"),
    "resnet18_gn": (GroupNormResNet, "num_classes"),
    "stackoverflow_lstm": (StackOverflowLSTM, "vocab_size"),
    "tag_logistic": (TagLogisticRegression, "num_classes"),
    "sent140_lstm": (Sent140LSTM, "num_classes"),
    "celeba_cnn": (CelebaCNN, "num_classes"),
}

# Models whose inputs are token ids.
_TOKEN_MODELS = ("char_lstm", "stackoverflow_lstm", "tag_logistic", "sent140_lstm")
# Models whose rounds compile with XLA:CPU's legacy fusion emitters (`LEGACY_FUSION_EMITTERS`):
# measured to compile faster and to run as fast, with the same bits, by
# benchmarks/first_round.py on Fashion-MNIST. The recurrent models keep XLA's default: the
# legacy emitters run the char-LSTM's round slower.
_LEGACY_EMITTER_MODELS = ("logistic", "mlp", "emnist_cnn")
# The task a model is built for when `create_model` is not told.
_DEFAULT_TASKS = {"tag_logistic": "multilabel"}


def _module_fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def _default_ignore_labels(name: str, num_classes: int) -> tuple[int, ...]:
    if name == "stackoverflow_lstm":
        return next_word_ignore_labels(num_classes)
    return ()


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    input_dtype: str = "float32",
    pad_label: int | None = None,
    task: str | None = None,
    ignore_labels: Sequence[int] | None = None,
    **kwargs: Any,
) -> Model:
    """A `Model` by registry name.

    Args:
      name: one of ``"logistic"``, ``"mlp"``, ``"emnist_cnn"``, ``"char_lstm"``,
        ``"resnet18_gn"`` (TFF's CIFAR-100 ResNet-18), ``"stackoverflow_lstm"`` (TFF's
        next-word model), ``"tag_logistic"`` (TFF's tag-prediction logistic regression),
        ``"sent140_lstm"``, ``"celeba_cnn"`` (LEAF's Sent140 and CelebA models).
      num_classes: size of the logits' last axis (the vocabulary size for ``"char_lstm"`` and
        ``"stackoverflow_lstm"``, the number of tags for ``"tag_logistic"``).
      input_shape: shape of one example, without the batch axis, e.g. ``(28, 28, 1)`` or
        ``(80,)`` for a sequence of 80 token ids.
      input_dtype: dtype of the inputs; the token models need an integer dtype (``"int32"``).
      pad_label: a label value that never counts in losses or metrics (sequence padding).
      task: ``"classification"`` or ``"multilabel"``; None: the model's own
        (``"multilabel"`` for ``"tag_logistic"``, ``"classification"`` otherwise).
      ignore_labels: labels left out of the accuracy; None: the model's own (pad, oov, bos and
        eos for ``"stackoverflow_lstm"``, as TFF reports it; none otherwise).
      **kwargs: passed to the flax module, e.g. ``hidden=(200, 200)`` for ``"mlp"``,
        ``dropout=False`` for ``"emnist_cnn"``, ``hidden=128, num_layers=1`` for ``"char_lstm"``,
        ``vocab_size=10004`` for ``"tag_logistic"``.

    Returns:
      A `Model` whose ``sample_input`` is ``zeros((1, *input_shape), input_dtype)``.

    Raises:
      ValueError: an unknown name, task or keyword argument, or a float dtype for a model of
        token ids.

    Example:
      >>> model = create_model("mlp", num_classes=10, input_shape=(28, 28), hidden=(200, 200))
      >>> params = model.init(jax.random.key(0))
    """
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"create_model: unknown model name {name!r}; valid names are {sorted(MODELS)}.{hint}"
        )
    cls, classes_field = MODELS[name]
    accepted = [f for f in _module_fields(cls) if f != classes_field]
    for key in kwargs:
        if key not in accepted:
            extra = (
                " (the number of classes is set by create_model's num_classes)"
                if key in (classes_field, "num_classes")
                else ""
            )
            raise ValueError(
                f"create_model({name!r}): unknown keyword argument {key!r}{extra}; "
                f"{cls.__name__} accepts {accepted}."
            )
    dtype = np.dtype(input_dtype)
    if name in _TOKEN_MODELS and not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"create_model({name!r}): input_dtype={input_dtype!r}, but the model reads "
            "integer token ids; pass input_dtype='int32'."
        )
    if task is None:
        task = _DEFAULT_TASKS.get(name, "classification")
    if task not in TASKS:
        raise ValueError(
            f"create_model({name!r}): unknown task {task!r}; valid tasks are {list(TASKS)}."
        )
    if ignore_labels is None:
        ignore_labels = (
            _default_ignore_labels(name, num_classes) if task == "classification" else ()
        )
    module = cls(**{classes_field: num_classes}, **kwargs)
    return Model(
        module=module,
        sample_input=np.zeros((1, *tuple(input_shape)), dtype),
        num_classes=num_classes,
        pad_label=pad_label,
        name=name,
        task=task,
        ignore_labels=tuple(ignore_labels),
        compiler_options=(dict(LEGACY_FUSION_EMITTERS) if name in _LEGACY_EMITTER_MODELS
                          else None),
    )
