"""Models: a flax module wrapped as pure ``init``/``apply`` plus masked loss statistics.

``create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))`` builds a `Model` by name;
the modules can also be wrapped by hand: ``Model(module=MLP(10), sample_input=..., ...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import numpy as np

from fedjax_sim.models.base import Model, batch_statistics, mean_loss
from fedjax_sim.models.char_lstm import CharLSTM
from fedjax_sim.models.classifiers import MLP, EmnistCNN, LogisticRegression
from fedjax_sim.models.conv import canonical_conv

__all__ = [
    "MLP",
    "CharLSTM",
    "EmnistCNN",
    "LogisticRegression",
    "Model",
    "batch_statistics",
    "canonical_conv",
    "create_model",
    "mean_loss",
    "MODELS",
]

# name -> (module class, the constructor field that receives `num_classes`)
MODELS: dict[str, tuple[type[nn.Module], str]] = {
    "logistic": (LogisticRegression, "num_classes"),
    "mlp": (MLP, "num_classes"),
    "emnist_cnn": (EmnistCNN, "num_classes"),
    "char_lstm": (CharLSTM, "vocab_size"),
}


def _module_fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    input_dtype: str = "float32",
    pad_label: int | None = None,
    **kwargs: Any,
) -> Model:
    """A `Model` by registry name.

    Args:
      name: one of ``"logistic"``, ``"mlp"``, ``"emnist_cnn"``, ``"char_lstm"``.
      num_classes: size of the logits' last axis (the vocabulary size for ``"char_lstm"``).
      input_shape: shape of one example, without the batch axis, e.g. ``(28, 28, 1)`` or
        ``(80,)`` for a sequence of 80 token ids.
      input_dtype: dtype of the inputs; ``"char_lstm"`` needs an integer dtype (``"int32"``).
      pad_label: a label value that never counts in losses or metrics (sequence padding).
      **kwargs: passed to the flax module, e.g. ``hidden=(200, 200)`` for ``"mlp"``,
        ``dropout=False`` for ``"emnist_cnn"``, ``hidden=128, num_layers=1`` for ``"char_lstm"``.

    Returns:
      A `Model` whose ``sample_input`` is ``zeros((1, *input_shape), input_dtype)``.

    Raises:
      ValueError: an unknown name, an unknown keyword argument, or a float dtype for
        ``"char_lstm"``.

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
    if name == "char_lstm" and not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"create_model('char_lstm'): input_dtype={input_dtype!r}, but the model embeds "
            "integer token ids; pass input_dtype='int32'."
        )
    module = cls(**{classes_field: num_classes}, **kwargs)
    return Model(
        module=module,
        sample_input=np.zeros((1, *tuple(input_shape)), dtype),
        num_classes=num_classes,
        pad_label=pad_label,
        name=name,
    )
