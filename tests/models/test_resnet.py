"""TFF's GroupNorm ResNet-18: closed-form parameter counts, a forward pass against a reference
written from TFF's definition with plain `lax` ops, the max-pool, and fast gradients in a scan."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_sim.models import GroupNormResNet, Model, create_model, mean_loss
from fedjax_sim.models.base import batch_statistics

NHWC = ("NHWC", "HWIO", "NHWC")


def _num_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def resnet_param_count(
    num_classes: int,
    in_channels: int = 3,
    stages=(2, 2, 2, 2),
    filters: int = 64,
    affine: bool = False,
) -> int:
    """TFF's ``create_resnet`` with basic blocks, summed layer by layer.

    Conv kernels have no bias; a GroupNorm has 2 parameters per channel when affine, else none.
    """
    norm = (lambda c: 2 * c) if affine else (lambda c: 0)
    total = 7 * 7 * in_channels * filters + norm(filters)  # stem conv + norm
    channels = filters
    for stage, blocks in enumerate(stages):
        width = filters * 2**stage
        for block in range(blocks):
            if not (stage == 0 and block == 0):
                total += norm(channels)  # the block's leading norm
            total += 3 * 3 * channels * width + norm(width) + 3 * 3 * width * width
            if channels != width:
                total += channels * width + norm(width)  # 1x1 shortcut conv + norm
            channels = width
    total += norm(channels)  # final norm
    return total + channels * num_classes + num_classes  # dense head


@pytest.mark.parametrize("affine", [False, True])
def test_resnet18_parameter_count_is_tffs(affine):
    model = create_model("resnet18_gn", num_classes=100, input_shape=(24, 24, 3), affine=affine)
    params = jax.eval_shape(model.init, jax.random.key(0))
    expected = resnet_param_count(100, affine=affine)
    assert _num_params(params) == expected
    # the counts the module docstring states
    assert expected == (11_227_812 if affine else 11_218_212)
    x = jnp.zeros((5, 24, 24, 3))
    assert jax.eval_shape(model.apply, params, x).shape == (5, 100)
    # any input size works (TFF's 24x24 crops, or full 32x32 images)
    assert jax.eval_shape(model.apply, params, jnp.zeros((2, 32, 32, 3))).shape == (2, 100)


def test_resnet34_and_narrow_variants_count():
    for kwargs, stages, filters in (
        ({"stage_sizes": (3, 4, 6, 3)}, (3, 4, 6, 3), 64),
        ({"initial_filters": 8}, (2, 2, 2, 2), 8),
    ):
        model = create_model("resnet18_gn", num_classes=10, input_shape=(24, 24, 3), **kwargs)
        params = jax.eval_shape(model.init, jax.random.key(0))
        assert _num_params(params) == resnet_param_count(10, stages=stages, filters=filters)


# ----------------------------------------------------------------------- reference forward pass


def _group_norm(x, groups=2, eps=1e-3):
    """TFF's lightweight GroupNormalization: per example and group, (x - mean) / sqrt(var + eps)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(b, h, w, c)


def _conv(x, kernel, stride=1, padding="SAME"):
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=NHWC,
        precision=lax.Precision.HIGHEST,
    )


def _reference_resnet(params, x, stages=(2, 2, 2, 2)):
    """TFF's ``create_resnet18`` (basic blocks, group norm, no stage strides) from its text."""
    relu = jax.nn.relu
    x = relu(_group_norm(_conv(x, params["stem_conv"]["kernel"], stride=2)))
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    for stage, blocks in enumerate(stages):
        for block in range(blocks):
            p = params[f"stage{stage + 1}_block{block + 1}"]
            first = stage == 0 and block == 0
            y = x if first else relu(_group_norm(x))
            y = _conv(y, p["conv1"]["kernel"])
            y = _conv(relu(_group_norm(y)), p["conv2"]["kernel"])
            shortcut = x
            if "shortcut_conv" in p:
                shortcut = _group_norm(_conv(x, p["shortcut_conv"]["kernel"], padding="VALID"))
            x = shortcut + y
    x = relu(_group_norm(x)).mean(axis=(1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


# Two stages of (2, 1) blocks hold every kind of block: the first (no leading norm), one with
# an identity shortcut, one with a projection shortcut; fewer layers compile faster.
SMALL = {"initial_filters": 4, "stage_sizes": (2, 1)}


def _small_model(conv=None) -> Model:
    kwargs = dict(SMALL) if conv is None else {**SMALL, "conv_general_dilated": conv}
    return create_model("resnet18_gn", num_classes=10, input_shape=(12, 12, 3), **kwargs)


@pytest.fixture(scope="module")
def small_params():
    """He-normal kernels, a N(0, 0.01) head, as `init` draws them, but drawn with numpy: XLA
    compiles one threefry per parameter in ``jit(init)``, slow on a small CPU."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(_small_model().init, jax.random.key(0))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "bias" in name:
            return jnp.zeros(leaf.shape)
        std = 0.01 if "head" in name else np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_forward_matches_a_reference_written_from_tffs_definition(small_params):
    model = _small_model()
    x = jax.random.normal(jax.random.key(1), (3, 12, 12, 3))
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(small_params, x)
        expected = jax.jit(_reference_resnet, static_argnums=2)(
            small_params, x, SMALL["stage_sizes"]
        )
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def _numpy_group_norm(x, groups, eps, scale=None, offset=None):
    """float64: per example and group of ``C / groups`` adjacent channels, (x - mean) /
    sqrt(var + eps) with the two-pass variance, then a per-channel scale and offset."""
    b, h, w, c = x.shape
    g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return y if scale is None else y * np.asarray(scale) + np.asarray(offset)


@pytest.mark.parametrize("affine", [False, True])
def test_every_group_norm_of_the_model_matches_numpy(small_params, affine):
    """Each GroupNorm the ResNet runs (stem, block, shortcut, final: 2 groups, epsilon 1e-3,
    a scale and offset only when ``affine``), its input and output captured in the model's own
    forward pass, against the float64 formula."""
    model = create_model("resnet18_gn", num_classes=10, input_shape=(12, 12, 3), affine=affine,
                         **SMALL)
    rng = np.random.default_rng(1)

    def draw(path, leaf):  # the small model's kernels; random scales and offsets
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(rng.normal(1.0 if "scale" in name else 0.0, 0.5, leaf.shape),
                               jnp.float32)
        return small_params_flat[name]

    small_params_flat = {jax.tree_util.keystr(path): leaf for path, leaf
                         in jax.tree_util.tree_leaves_with_path(small_params)}
    params = jax.tree_util.tree_map_with_path(
        draw, jax.eval_shape(model.init, jax.random.key(0)))
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
            variables = context.module.variables.get("params", {})
            calls.append((np.asarray(args[0]), np.asarray(out), variables.get("scale"),
                          variables.get("bias")))
        return out

    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
    with nn.intercept_methods(record):
        model.apply(params, x)
    # stem; stage 1: block 1's second norm, block 2's two; stage 2: two and the shortcut's;
    # final
    assert len(calls) == 8
    assert all((scale is not None) == affine for _, _, scale, _ in calls)
    for inputs, outputs, scale, offset in calls:
        np.testing.assert_allclose(outputs, _numpy_group_norm(inputs, 2, 1e-3, scale, offset),
                                   rtol=1e-5, atol=1e-5)


def test_rejects_inputs_without_channels():
    module = GroupNormResNet(num_classes=3, initial_filters=4)
    with pytest.raises(ValueError, match=r"images \[B, H, W, C\]"):
        module.init(jax.random.key(0), jnp.zeros((1, 24, 24)))


# ---------------------------------------------------------------------- training in a scan


def _batches(steps: int, same: bool = False):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(1 if same else steps, 4, 12, 12, 3)).astype(np.float32)
    ys = rng.integers(0, 10, size=(1 if same else steps, 4)).astype(np.int32)
    if same:
        xs, ys = np.repeat(xs, steps, axis=0), np.repeat(ys, steps, axis=0)
    return jnp.asarray(xs), jnp.asarray(ys)


def _sgd_scan(model: Model, xs, ys, lr: float = 0.1):
    """``params -> (params after len(xs) SGD steps, the loss at each step)`` as one scan."""
    mask = jnp.ones(xs.shape[1], bool)

    def loss(params, x, y):
        return mean_loss(batch_statistics(model, params, {"x": x, "y": y}, mask))

    def step(params, batch):
        value, grads = jax.value_and_grad(loss)(params, *batch)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), value

    return lambda params: lax.scan(step, params, (xs, ys))


def test_gradient_in_a_scan_uses_only_canonical_convolutions():
    """The gradient of every ResNet convolution inside a `lax.scan` is an NHWC/HWIO convolution
    without lhs dilation: what XLA:CPU runs fast in a loop body (see test_conv.py)."""
    # all 20 convolutions of ResNet-18, 16x narrower
    model = create_model("resnet18_gn", num_classes=10, input_shape=(12, 12, 3), initial_filters=4)
    params = jax.eval_shape(model.init, jax.random.key(0))
    lowered = jax.jit(_sgd_scan(model, *_batches(2))).lower(params)
    text = lowered.as_text()
    convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    # 20 convolutions, each with a forward and two gradient convolutions (the stem's input
    # gradient may be pruned)
    assert len(convolutions) >= 20 * 3 - 1
    canonical = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
    for line in convolutions:
        assert canonical in line and "lhs_dilate = [1, 1]" in line, line
    lowered.compile()


def test_scanned_sgd_matches_lax_conv(small_params):
    xs, ys = _batches(3)
    fast, reference = _small_model(), _small_model(lax.conv_general_dilated)
    got, losses = jax.jit(_sgd_scan(fast, xs, ys))(small_params)
    expected, expected_losses = jax.jit(_sgd_scan(reference, xs, ys))(small_params)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-5, err_msg=str(path))


def test_a_few_sgd_steps_reduce_the_loss(small_params):
    _, losses = jax.jit(_sgd_scan(_small_model(), *_batches(6, same=True)))(small_params)
    losses = np.asarray(losses)  # the loss before each step, on the same batch
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.9 * losses[0], losses
