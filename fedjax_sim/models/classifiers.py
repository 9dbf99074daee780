"""Image classifiers of the federated-learning literature: logistic regression, the 2NN MLP and
the EMNIST CNN.

* `MLP` with ``hidden=(200, 200)`` is the "2NN" of McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (https://arxiv.org/abs/1602.05629).
* `EmnistCNN` is the EMNIST model of TensorFlow Federated and FedJAX (Reddi et al. 2021,
  "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295): 1,206,590 parameters on
  28x28x1 inputs with 62 classes.

Each module is called as ``module(x, train=bool)`` and returns logits ``[B, num_classes]``.
Dropout draws from the ``"dropout"`` rng stream and is active only when ``train=True`` and that
stream is given (`Model.apply` passes it when called with ``train=True`` and an ``rng``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.conv import canonical_conv, convolution
from fedjax_sim.models.dropout import Dropout


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 ('VALID') as a reshape + max, with a one-pass gradient.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``. Its gradient is JAX's for the
    reshape + max (tied maxima share it: each gets ``g / ties``), written as one elementwise
    pass over the four window positions: XLA's select-and-scatter (flax's max-pool gradient) is
    3x slower on CPU (0.65 vs 0.20 ms per EMNIST CNN step), and autodiff's reduce-max rule
    adds a reduction over the window (`benchmarks/cnn_step.py` times this gradient and the
    packed dropout together against autodiff's and flax's mask). Bit for bit what autodiff
    gives (tested).
    """
    return _pool_windows(x).max(axis=(2, 4))


def _pool_windows(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H // 2, 2, W // 2, 2, C]`` (an odd last row/column dropped)."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _pool_windows(x).max(axis=(2, 4))
    return y, (x, y)


def _max_pool_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = residuals
    windows = _pool_windows(x)
    hits = windows == y[:, :, None, :, None, :]
    ties = sum(hits[:, :, i, :, j].astype(g.dtype) for i in (0, 1) for j in (0, 1))
    share = (g / ties)[:, :, None, :, None, :]
    grad = jnp.where(hits, share, jnp.zeros((), g.dtype)).reshape(
        windows.shape[0], windows.shape[1] * 2, windows.shape[3] * 2, windows.shape[5])
    pad = [(0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)]
    return (jnp.pad(grad, pad),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _flatten(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: flatten, then one dense layer.

    Input ``[B, ...]`` float; output ``[B, num_classes]`` logits.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        return nn.Dense(self.num_classes)(_flatten(x))


class MLP(nn.Module):
    """A fully connected ReLU network; ``hidden=(200, 200)`` is McMahan et al.'s 2NN.

    Input ``[B, ...]`` float; output ``[B, num_classes]`` logits.
    """

    num_classes: int
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        x = _flatten(x)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class EmnistCNN(nn.Module):
    """The TFF/FedJAX EMNIST CNN.

    Conv 32 3x3 VALID, ReLU; Conv 64 3x3 VALID, ReLU; max-pool 2x2 stride 2; dropout 0.25;
    flatten; Dense 128, ReLU; dropout 0.5; Dense ``num_classes``.

    Input ``[B, H, W, C]`` (or ``[B, H, W]``, given one channel) float; output
    ``[B, num_classes]`` logits.

    Attributes:
      num_classes: 62 for EMNIST by class (digits, upper- and lower-case letters).
      dropout: False removes both dropout layers.
      conv_general_dilated: the convolution primitive; `canonical_conv` keeps gradients fast
        inside a `lax.scan` on XLA:CPU (see `fedjax_sim.models.conv`).
      conv: ``"xla"`` (default: ``conv_general_dilated``) or ``"onednn"``: Intel oneDNN's
        convolution kernels called from the jitted round on the CPU
        (`fedjax_sim.models.onednn`; the ``onednn`` extra): 7.6 against 10.1 ms a training
        step on a 2-core Intel Xeon (`benchmarks/cnn_step.py`; README, Measured).
    """

    num_classes: int = 62
    dropout: bool = True
    conv_general_dilated: Callable[..., Any] = canonical_conv
    conv: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        deterministic = not (train and self.dropout and self.has_rng("dropout"))
        conv = convolution(self.conv, self.conv_general_dilated)
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = max_pool_2x2(x)
        if self.dropout:
            x = Dropout(0.25)(x, deterministic=deterministic)
        x = nn.relu(nn.Dense(128)(_flatten(x)))
        if self.dropout:
            x = Dropout(0.5)(x, deterministic=deterministic)
        return nn.Dense(self.num_classes)(x)
