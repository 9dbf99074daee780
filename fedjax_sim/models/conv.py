"""A 2-D convolution whose gradients stay fast inside loops on XLA:CPU.

Why: local training is a `lax.scan` of optimizer steps. On XLA:CPU the gradient convolutions that
JAX's transpose rules emit (the input gradient as an lhs-dilated convolution, the weight gradient
with batch and feature axes swapped) are only rewritten into the fast NHWC/HWIO form by XLA's
convolution canonicalization pass, and that pass visits the entry computation only. Inside a
while-loop body (a scan) they compile to a naive loop nest: five weight-gradient convolutions took
1,167 ms inside a loop against 32 ms unrolled (jax issue #12868). Forward convolutions are fine.

`canonical_conv` is a drop-in replacement for `jax.lax.conv_general_dilated` with a `custom_vjp`
whose two gradients are themselves canonical forward convolutions (NHWC input, HWIO kernel) plus
transposes, so XLA never needs the pass:

* input gradient: the output gradient, dilated by the stride, convolved with the spatially
  flipped kernel whose input and output channels are swapped, padded by
  ``(k - 1 - pad_lo, k - 1 - pad_hi + r)`` per spatial dim, where ``r`` counts the trailing input
  rows the strided forward window never reached;
* weight gradient: the batch axis plays the feature axis: the input transposed to
  ``[C_in, H, W, N]`` is convolved (original padding, ``rhs_dilation = stride``) with the output
  gradient transposed to an HWIO kernel ``[H', W', N, C_out]``, giving ``[C_in, kh, kw, C_out]``,
  transposed to HWIO.

Pass it to flax as ``nn.Conv(..., conv_general_dilated=canonical_conv)``. Supported: 2-D
convolutions in NHWC/HWIO layout (what `flax.linen.Conv` uses), any strides, 'SAME', 'VALID' or
explicit non-negative padding no wider than ``kernel - 1``, no lhs/rhs dilation,
``feature_group_count == batch_group_count == 1``, no ``preferred_element_type`` or
``out_sharding``. Anything else falls back to plain `lax.conv_general_dilated` (correct, but with
the slow gradients inside loops on CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def canonical_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with gradients written as canonical NHWC/HWIO convolutions.

    Same signature and result as `jax.lax.conv_general_dilated`; only the gradient computation
    differs (see the module docstring). Unsupported configurations fall back to
    `lax.conv_general_dilated`.

    Args:
      lhs: input ``[N, H, W, C_in]`` (with NHWC dimension numbers).
      rhs: kernel ``[kh, kw, C_in, C_out]`` (HWIO).
      window_strides, padding, ...: as in `jax.lax.conv_general_dilated`.

    Returns:
      ``[N, H', W', C_out]``.

    Example:
      >>> conv = flax.linen.Conv(32, (3, 3), conv_general_dilated=canonical_conv)
    """
    fallback = partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if out_sharding is not None:
        return fallback(out_sharding=out_sharding)
    geometry = nhwc_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                             dimension_numbers, feature_group_count, batch_group_count,
                             preferred_element_type)
    if geometry is None:
        return fallback()
    return _conv_nhwc(lhs, rhs, *geometry, precision)


def nhwc_geometry(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                  preferred_element_type=None):
    """``(strides, pads)`` of a convolution `canonical_conv` writes as NHWC/HWIO convolutions
    (2-D, NHWC/HWIO, one dtype, no dilation, one group, padding in ``[0, kernel - 1]``), with
    ``pads`` as explicit ``((lo, hi), (lo, hi))``; None for anything else."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype:
        return None
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dims != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return None
    no_dilation = all(d == 1 for d in (lhs_dilation or ())) and all(
        d == 1 for d in (rhs_dilation or ())
    )
    if not (
        no_dilation
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    ):
        return None
    kernel_size = tuple(rhs.shape[:2])
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], kernel_size, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(
        lo < 0 or hi < 0 or lo > k - 1 or hi > k - 1
        for (lo, hi), k in zip(pads, kernel_size, strict=True)
    ):
        return None
    return strides, pads


def _forward(lhs, rhs, strides, pads, precision, rhs_dilation=None):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        pads,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
    )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(lhs, rhs, strides, pads, precision):
    return _forward(lhs, rhs, strides, pads, precision)


def _conv_nhwc_fwd(lhs, rhs, strides, pads, precision):
    return _forward(lhs, rhs, strides, pads, precision), (lhs, rhs)


def _conv_nhwc_bwd(strides, pads, precision, residuals, out_grad):
    lhs, rhs = residuals
    kernel_size = rhs.shape[:2]
    in_size = lhs.shape[1:3]
    out_size = out_grad.shape[1:3]
    # Rows of the padded input past the last strided window: they get zero input gradient, and
    # the weight-gradient convolution below produces that many extra kernel rows (sliced off).
    leftover = tuple(
        n + lo + hi - k - (o - 1) * s
        for n, (lo, hi), k, o, s in zip(in_size, pads, kernel_size, out_size, strides, strict=True)
    )

    # Input gradient: dilate the output gradient by the stride, then a full-style convolution
    # with the flipped, in/out-swapped kernel.
    dilated = out_grad
    if strides != (1, 1):
        interior = ((0, 0, 0), (0, 0, strides[0] - 1), (0, 0, strides[1] - 1), (0, 0, 0))
        dilated = lax.pad(out_grad, jnp.zeros((), out_grad.dtype), interior)
    flipped = rhs[::-1, ::-1].transpose(0, 1, 3, 2)
    in_pads = tuple(
        (k - 1 - lo, k - 1 - hi + r)
        for (lo, hi), k, r in zip(pads, kernel_size, leftover, strict=True)
    )
    lhs_grad = _forward(dilated, flipped, (1, 1), in_pads, precision)

    # Weight gradient: batch acts as the contracted feature axis.
    lhs_t = lhs.transpose(3, 1, 2, 0)  # [C_in, H, W, N]
    out_grad_t = out_grad.transpose(1, 2, 0, 3)  # [H', W', N, C_out]
    rhs_grad = _forward(lhs_t, out_grad_t, (1, 1), pads, precision, rhs_dilation=strides)
    rhs_grad = rhs_grad[:, : kernel_size[0], : kernel_size[1], :].transpose(1, 2, 0, 3)
    return lhs_grad.astype(lhs.dtype), rhs_grad.astype(rhs.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


CONVOLUTIONS = ("xla", "onednn")
"""The values of the CNN models' ``conv`` option."""


def convolution(name: str, xla: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """The convolution primitive a model's ``conv`` option names.

    ``"xla"``: ``xla`` (default `canonical_conv`), XLA's own convolutions. ``"onednn"``:
    `fedjax_sim.models.onednn.onednn_conv`, Intel oneDNN's kernels as XLA:CPU custom calls (the
    ``onednn`` extra); where oneDNN cannot run (not installed, no C++ compiler) it warns once and
    computes with XLA's.
    """
    if name == "xla":
        return canonical_conv if xla is None else xla
    if name == "onednn":
        from fedjax_sim.models import onednn

        if not onednn.available():
            warnings.warn(f"conv='onednn' computes with XLA's convolutions: "
                          f"{onednn.unavailable_reason()}", RuntimeWarning, stacklevel=2)
        return onednn.onednn_conv
    raise ValueError(f"conv={name!r}; expected one of {list(CONVOLUTIONS)}")
