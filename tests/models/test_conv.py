"""`canonical_conv` against `lax.conv_general_dilated`: values and both gradients."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_sim.models import EmnistCNN, canonical_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-12))


def _conv_and_grads(conv, x, w, out_grad, strides, padding):
    def f(lhs, rhs):
        return conv(lhs, rhs, strides, padding, dimension_numbers=NHWC)

    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(out_grad))


CASES = list(
    itertools.product(
        (3, 5),  # kernel
        (1, 2),  # stride
        ("SAME", "VALID", ((1, 2), (0, 1))),  # padding
        (1, 4),  # batch
    )
)


@pytest.mark.parametrize("kernel,stride,padding,batch", CASES)
def test_matches_lax_conv_values_and_gradients(kernel, stride, padding, batch):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + batch)
    x = jnp.asarray(rng.normal(size=(batch, 9, 11, 3)), jnp.float32)  # odd spatial sizes
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
    strides = (stride, stride)
    out_shape = jax.eval_shape(
        lambda: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    ).shape
    out_grad = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    expected = _conv_and_grads(lax.conv_general_dilated, x, w, out_grad, strides, padding)
    got = jax.jit(_conv_and_grads, static_argnums=(0, 4, 5))(
        canonical_conv, x, w, out_grad, strides, padding
    )
    for name, g, e in zip(("output", "input grad", "kernel grad"), got, expected, strict=True):
        assert g.shape == e.shape, name
        assert _relative_error(g, e) < 1e-5, name


def test_unsupported_configurations_fall_back_to_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 8)), jnp.float32)  # NCHW
    w = jnp.asarray(rng.normal(size=(4, 3, 3, 3)), jnp.float32)  # OIHW
    pads = ((1, 1), (2, 0))
    for kwargs in ({}, {"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 1)}):
        expected = lax.conv_general_dilated(x, w, (1, 1), pads, **kwargs)
        got = canonical_conv(x, w, (1, 1), pads, **kwargs)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sgd_scan_with_canonical_conv_matches_lax_conv():
    """Inside a `lax.scan` of SGD steps, the canonical conv trains to the same params."""
    steps, batch = 3, 4
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(steps, batch, 12, 12, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, size=(steps, batch)), jnp.int32)

    def train(conv):
        module = EmnistCNN(num_classes=10, dropout=False, conv_general_dilated=conv)
        params = module.init(jax.random.key(0), xs[0])["params"]

        def loss(p, x, y):
            logits = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def step(p, batch):
            grads = jax.grad(loss)(p, *batch)
            return jax.tree.map(lambda a, g: a - 0.1 * g, p, grads), None

        return jax.jit(lambda p: lax.scan(step, p, (xs, ys))[0])(params)

    expected = train(lax.conv_general_dilated)
    got = train(canonical_conv)
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_flax_conv_accepts_canonical_conv():
    x = jnp.ones((2, 7, 7, 3))
    module = nn.Conv(4, (3, 3), strides=2, conv_general_dilated=canonical_conv)
    params = module.init(jax.random.key(0), x)
    reference = nn.Conv(4, (3, 3), strides=2)
    np.testing.assert_allclose(
        module.apply(params, x), reference.apply(params, x), rtol=1e-6, atol=1e-6
    )


def test_gradient_convolutions_are_canonical():
    """Every convolution of the gradient is NHWC/HWIO without lhs dilation (what XLA:CPU runs
    fast without its canonicalization pass); plain lax.conv's gradient is not."""

    def lowered_convolutions(conv):
        def loss(x, w):
            return jnp.sum(conv(x, w, (2, 2), "SAME", dimension_numbers=NHWC) ** 2)

        text = (
            jax.jit(jax.grad(loss, argnums=(0, 1)))
            .lower(jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4)))
            .as_text()
        )
        return [line for line in text.splitlines() if "stablehlo.convolution" in line]

    canonical = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
    convolutions = lowered_convolutions(canonical_conv)
    assert len(convolutions) == 3
    for line in convolutions:
        assert canonical in line and "lhs_dilate = [1, 1]" in line, line
    assert not all(canonical in line for line in lowered_convolutions(lax.conv_general_dilated))


def test_vmapped_gradients_match_lax_conv():
    """Clients are vmapped: per-client kernels and inputs batch through the custom VJP."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 2, 7, 7, 2)), jnp.float32)  # [clients, B, H, W, C]
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)  # [clients, kh, kw, I, O]

    def grads(conv):
        def loss(lhs, rhs):
            return jnp.sum(jnp.tanh(conv(lhs, rhs, (2, 2), "SAME", dimension_numbers=NHWC)))

        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(x, w)

    for g, e in zip(grads(canonical_conv), grads(lax.conv_general_dilated), strict=True):
        assert _relative_error(g, e) < 1e-5


@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((1, 7, 5, 1), (2, 3), (1, 2), "SAME"),  # batch 1, one channel, non-square everything
    ((2, 6, 6, 3), (1, 1), (2, 2), "VALID"),  # the ResNet shortcut's 1x1, strided (stride > k)
    ((2, 9, 4, 2), (2, 1), (3, 3), "SAME"),  # stride > kernel: windows skip rows
    ((1, 24, 24, 3), (7, 7), (2, 2), "SAME"),  # the ResNet stem: pads (2, 3)
    ((2, 5, 8, 2), (3, 2), (2, 3), ((2, 0), (1, 1))),  # explicit asymmetric padding
    ((1, 4, 9, 2), (3, 3), (3, 1), "VALID"),  # trailing rows no window reaches
])
def test_odd_shapes_match_lax_conv_autodiff_in_float64(shape, kernel, strides, padding):
    """The custom VJP's input and kernel gradients against autodiff of
    `lax.conv_general_dilated`, in float64 (agreement to rounding, not to float32's)."""
    rng = np.random.default_rng(sum(shape) + sum(kernel))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=shape), jnp.float64)
        w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], 3)), jnp.float64)
        out_shape = jax.eval_shape(
            lambda: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
        ).shape
        out_grad = jnp.asarray(rng.normal(size=out_shape), jnp.float64)
        jaxpr = jax.make_jaxpr(
            lambda a, b: canonical_conv(a, b, strides, padding, dimension_numbers=NHWC))(x, w)
        assert [e.primitive.name for e in jaxpr.eqns] == ["custom_vjp_call"]  # no fallback
        expected = _conv_and_grads(lax.conv_general_dilated, x, w, out_grad, strides, padding)
        got = jax.jit(_conv_and_grads, static_argnums=(0, 4, 5))(
            canonical_conv, x, w, out_grad, strides, padding
        )
    for name, g, e in zip(("output", "input grad", "kernel grad"), got, expected, strict=True):
        assert g.dtype == jnp.float64 and g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-11, err_msg=name)


def test_feature_groups_fall_back_with_autodiffs_gradients():
    """Grouped convolutions are not rewritten: values and gradients are lax's."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)  # 2 groups of 2 -> 3

    def grads(conv):
        def loss(lhs, rhs):
            return jnp.sum(jnp.sin(conv(lhs, rhs, (1, 2), "SAME", dimension_numbers=NHWC,
                                        feature_group_count=2)))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    for g, e in zip(grads(canonical_conv), grads(lax.conv_general_dilated), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
