"""The Sent140 and CelebA models of the LEAF benchmark.

Caldas, Duddu, Wu, Li, Konečný, McMahan, Smith & Talwalkar 2018, "LEAF: A Benchmark for
Federated Settings" (https://arxiv.org/abs/1812.01097), ``models/sent140/stacked_lstm.py`` and
``models/celeba/cnn.py`` in github.com/TalwalkarLab/leaf.

* `Sent140LSTM` (``sent140_lstm``): tweet sentiment from word ids (the ``tokens`` features of
  `fedjax_sim.datasets.leaf.load_leaf_sent140`: int32 ``[B, 25]``, 0 = PAD, 1 = OOV). An
  embedding, two stacked LSTM layers of 100 units, the output at the last real (non-PAD) word,
  a dense layer of 128 units and a dense layer to the 2 classes. Deviations from LEAF: LEAF
  embeds LEAF's GloVe vocabulary (its variable is ``[vocab + 1, n_hidden]``, i.e. 100 wide, and
  it offers 300-d GloVe vectors that are not at hand offline); here the embedding is trainable,
  ``embed_dim`` wide (100), over the loader's own vocabulary (``info["vocab_size"]`` ids). LEAF
  reads the LSTM output at the last position, padding included (it pads with its OOV id); here
  it is read at the last real word, so padding never changes the prediction. As in LEAF the
  128-unit layer has no activation. Flax's LSTM has no forget-gate bias of 1 (TF's
  ``BasicLSTMCell`` adds one).
* `CelebaCNN` (``celeba_cnn``): smiling or not from 84x84x3 faces. Four blocks of
  ``conv 3x3, 32 filters, 'same' -> norm -> max-pool 2x2 (stride 2, 'same') -> ReLU``
  (84 -> 42 -> 21 -> 11 -> 6), flatten, a dense layer to the 2 classes. Deviation from LEAF:
  LEAF normalizes with batch norm in training mode. Under federated training a batch holds
  masked (padding) examples, whose values would enter batch statistics, and running statistics
  average badly across non-IID clients (Hsieh, Phanishayee, Mutlu & Gibbons 2020, "The Non-IID
  Data Quagmire of Decentralized Machine Learning", https://arxiv.org/abs/1910.00189). Here
  ``norm="group"`` (default) is a GroupNorm with a per-channel scale and offset (the same 64
  trainable parameters per block as LEAF's batch norm), computed per example so a masked
  example never touches a real one; ``norm="none"`` drops the normalization. The trainable
  parameter count is LEAF's: 31,202 for 2 classes.

Every convolution goes through `canonical_conv`, so gradients stay fast inside the `lax.scan`
of local steps on XLA:CPU (see `fedjax_sim.models.conv`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.classifiers import max_pool_2x2
from fedjax_sim.models.conv import canonical_conv, convolution
from fedjax_sim.models.lstm import check_num_layers, lstm_layer

NORMS = ("group", "none")
"""`CelebaCNN`'s normalization choices."""

# tf.layers.conv2d / tf.layers.dense default to Glorot-uniform kernels and zero biases.
_glorot_uniform = nn.initializers.glorot_uniform()


def max_pool_2x2_same(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 and 'SAME' padding (TF's ``max_pooling2d(x, 2, 2, 'same')``).

    An odd height or width is padded by one row/column at the bottom/right (TF puts the odd
    padding there) with a copy of the edge, which never changes a maximum, then `max_pool_2x2`
    runs: ``[B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]``.
    """
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return max_pool_2x2(x)


class Sent140LSTM(nn.Module):
    """LEAF's Sent140 stacked LSTM: word ids ``[B, T]`` int -> logits ``[B, num_classes]``.

    Ids outside ``[0, vocab_size)`` are read as ``oov_id`` (an embedding lookup out of range
    would give NaN inside a jitted step, where no error can be raised).

    Attributes:
      num_classes: 2 (negative, positive).
      vocab_size: ids in the embedding table: the loader's ``info["vocab_size"]`` (its
        ``vocab_size`` words + PAD + OOV; 10,002 with the loader's defaults).
      embed_dim: embedding width (LEAF's variable: 100).
      hidden: LSTM units per layer (LEAF: 100).
      num_layers: stacked LSTM layers (LEAF: 2).
      dense: units of the dense layer before the logits (LEAF: 128, no activation).
      pad_id: the padding id; the output is read at the last position holding another id
        (position 0 for an all-padding sequence).
      oov_id: the out-of-vocabulary id.
    """

    num_classes: int = 2
    vocab_size: int = 10_002
    embed_dim: int = 100
    hidden: int = 100
    num_layers: int = 2
    dense: int = 128
    pad_id: int = 0
    oov_id: int = 1
    cell: str = "fused"  # or "flax": the same LSTM (`fedjax_sim.models.lstm`)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        check_num_layers(self.num_layers)
        if x.ndim != 2:
            raise ValueError(f"Sent140LSTM expects word ids [B, T], got shape {x.shape}")
        ids = jnp.where((x >= 0) & (x < self.vocab_size), x, self.oov_id)
        h = nn.Embed(self.vocab_size, self.embed_dim)(ids)
        for layer in range(self.num_layers):
            h = lstm_layer(h, self.hidden, layer, self.cell)  # [B, T, hidden]
        # The output at the last real word: later (padding) steps never reach the logits.
        positions = jnp.arange(x.shape[1])
        last = jnp.max(jnp.where(x != self.pad_id, positions, 0), axis=1)  # [B]
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, hidden]
        h = nn.Dense(self.dense, kernel_init=_glorot_uniform)(h)  # LEAF: no activation here
        return nn.Dense(self.num_classes, kernel_init=_glorot_uniform)(h)


class CelebaCNN(nn.Module):
    """LEAF's CelebA CNN: images ``[B, H, W, C]`` -> logits ``[B, num_classes]``.

    ``num_blocks`` x [conv 3x3 ``filters`` 'same' -> norm -> max-pool 2x2 'same' -> ReLU],
    flatten, dense. LEAF: 84x84x3 inputs, 4 blocks of 32 filters, batch norm (see the module
    docstring for why GroupNorm replaces it here).

    Attributes:
      num_classes: 2 (not smiling, smiling).
      filters: filters of every convolution (LEAF: 32).
      num_blocks: conv blocks (LEAF: 4).
      norm: ``"group"`` (GroupNorm with a per-channel scale and offset) or ``"none"``.
      num_groups: GroupNorm groups (must divide ``filters``).
      epsilon: the normalization's variance epsilon (TF's batch norm: 1e-3).
      conv_general_dilated: the convolution primitive (`canonical_conv`: fast gradients in a
        `lax.scan` on XLA:CPU).
      conv: ``"xla"`` (``conv_general_dilated``) or ``"onednn"``: Intel oneDNN's kernels as
        XLA:CPU custom calls (`fedjax_sim.models.onednn`).
    """

    num_classes: int = 2
    filters: int = 32
    num_blocks: int = 4
    norm: str = "group"
    num_groups: int = 2
    epsilon: float = 1e-3
    conv_general_dilated: Callable[..., Any] = canonical_conv
    conv: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, and GroupNorm has no batch statistics
        if self.norm not in NORMS:
            raise ValueError(f"CelebaCNN norm={self.norm!r}: expected one of {list(NORMS)}")
        if self.norm == "group" and self.filters % self.num_groups:
            raise ValueError(
                f"CelebaCNN num_groups={self.num_groups} must divide filters={self.filters}"
            )
        if x.ndim != 4:
            raise ValueError(f"CelebaCNN expects images [B, H, W, C], got shape {x.shape}")
        for _ in range(self.num_blocks):
            x = nn.Conv(
                self.filters,
                (3, 3),
                padding="SAME",
                kernel_init=_glorot_uniform,
                conv_general_dilated=convolution(self.conv, self.conv_general_dilated),
            )(x)
            if self.norm == "group":
                x = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon)(x)
            x = nn.relu(max_pool_2x2_same(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_classes, kernel_init=_glorot_uniform)(x)
