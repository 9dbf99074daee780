"""The GroupNorm ResNet-18 of the federated CIFAR-100 benchmark.

TensorFlow Federated's ``create_resnet18`` (``tff.simulation.baselines.cifar100`` /
``tff.simulation.models.resnet_models``), used by Reddi et al. 2021, "Adaptive Federated
Optimization" (https://arxiv.org/abs/2003.00295) after Hsieh et al. 2020, "The Non-IID Data
Quagmire of Decentralized Machine Learning" (https://arxiv.org/abs/1910.00189), who replace
batch norm by group norm because batch statistics are ill-defined across non-IID clients.

The architecture, as TFF defines it (a pre-activation ResNet v2, He et al. 2016,
https://arxiv.org/abs/1603.05027), on 24x24x3 crops:

* stem: conv 7x7/2, 64 filters ('SAME', no bias), GroupNorm, ReLU, max-pool 3x3/2 'SAME'
  (24x24 -> 12x12 -> 6x6);
* four stages of two basic blocks with 64, 128, 256, 512 filters. A block is
  ``norm-relu-conv3x3, norm-relu-conv3x3`` plus a shortcut (identity, or a 1x1 conv + GroupNorm
  when the channel count changes); the very first block skips its leading norm-relu (the stem
  just applied one). TFF passes no stride to the stages, so every stage runs at 6x6: we keep
  that, it is the published model;
* a final GroupNorm, ReLU, global average pooling and a dense layer to ``num_classes`` logits
  (TFF puts the softmax in the layer; here it is in the loss).

Every GroupNorm has 2 groups and epsilon 1e-3, with no scale or offset: TFF's own lightweight
``GroupNormalization`` layer (``tff.simulation.models.group_norm``). That gives 11,218,212
parameters for 100 classes. ``affine=True`` adds a per-channel scale and offset, as
google-research/federated's copy of the model has (it uses `tfa.layers.GroupNormalization`
with the 2 groups that were then its default): 11,227,812 parameters. Convolutions are
He-normal initialized, the last layer N(0, 0.01), as in TFF. TFF's L2 regularizer (1e-4 on the
kernels and the head's bias) is not part of the model: add weight decay to the client optimizer
(``optax.add_decayed_weights``) if wanted.

Every convolution goes through `canonical_conv`, so the gradient stays fast inside the
`lax.scan` of local steps on XLA:CPU (see `fedjax_sim.models.conv`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.conv import canonical_conv, convolution

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class BasicBlock(nn.Module):
    """A pre-activation basic block: ``[norm-relu]-conv3x3-norm-relu-conv3x3`` + shortcut.

    Input ``[B, H, W, C_in]``, output ``[B, H, W, filters]``.
    """

    filters: int
    normalize_first: bool
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm(name="norm1")(x)) if self.normalize_first else x
        y = self.conv(self.filters, (3, 3), name="conv1")(y)
        y = self.conv(self.filters, (3, 3), name="conv2")(nn.relu(self.norm(name="norm2")(y)))
        shortcut = x
        if x.shape[-1] != self.filters:
            shortcut = self.conv(self.filters, (1, 1), padding="VALID", name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_norm")(shortcut)
        return shortcut + y


class GroupNormResNet(nn.Module):
    """TFF's GroupNorm ResNet (ResNet-18 by default): images ``[B, H, W, C]`` -> logits.

    Attributes:
      num_classes: 100 for CIFAR-100.
      stage_sizes: basic blocks per stage; ``(3, 4, 6, 3)`` is TFF's ResNet-34.
      initial_filters: filters of the stem and first stage (doubled at each stage).
      num_groups: GroupNorm groups (TFF: 2).
      affine: a learned per-channel scale and offset after each GroupNorm (TFF: none).
      epsilon: GroupNorm's variance epsilon (TFF: 1e-3).
      conv_general_dilated: the convolution primitive (`canonical_conv`: fast gradients in a
        `lax.scan` on XLA:CPU).
      conv: ``"xla"`` (``conv_general_dilated``) or ``"onednn"``: Intel oneDNN's kernels as
        XLA:CPU custom calls (`fedjax_sim.models.onednn`).
    """

    num_classes: int = 100
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    initial_filters: int = 64
    num_groups: int = 2
    affine: bool = False
    epsilon: float = 1e-3
    conv_general_dilated: Callable[..., Any] = canonical_conv
    conv: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, and GroupNorm has no batch statistics
        if x.ndim != 4:
            raise ValueError(f"GroupNormResNet expects images [B, H, W, C], got shape {x.shape}")
        conv = partial(
            nn.Conv,
            padding="SAME",
            use_bias=False,
            kernel_init=he_normal,
            conv_general_dilated=convolution(self.conv, self.conv_general_dilated),
        )
        norm = partial(
            nn.GroupNorm,
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            use_bias=self.affine,
            use_scale=self.affine,
        )
        x = conv(self.initial_filters, (7, 7), strides=(2, 2), name="stem_conv")(x)
        x = nn.relu(norm(name="stem_norm")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage, num_blocks in enumerate(self.stage_sizes):
            filters = self.initial_filters * 2**stage
            for block in range(num_blocks):
                normalize_first = not (stage == 0 and block == 0)
                name = f"stage{stage + 1}_block{block + 1}"
                x = BasicBlock(filters, normalize_first, norm, conv, name=name)(x)
        x = jnp.mean(nn.relu(norm(name="final_norm")(x)), axis=(1, 2))
        dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")
        return dense(x)
