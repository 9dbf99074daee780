"""`onednn_conv`: oneDNN's convolutions as XLA:CPU custom calls, against `lax.conv_general_dilated`
and its autodiff gradients (an independent implementation: XLA's own convolution)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_sim.models import classifiers, create_model, onednn
from fedjax_sim.models.conv import CONVOLUTIONS, convolution
from fedjax_sim.models.onednn import onednn_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def test_onednn_is_available_here():
    # the test extra installs oneDNN and the machines have g++: a failure here names why
    assert onednn.available(), onednn.unavailable_reason()


def _loss(conv, stride, padding):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, stride, padding, dimension_numbers=NHWC)))


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((20, 26, 26, 32), (3, 3, 32, 64), (1, 1), "VALID"),  # the EMNIST CNN's second convolution
    ((4, 28, 28, 1), (3, 3, 1, 32), (1, 1), "VALID"),  # its first: one input channel
    ((3, 9, 8, 5), (3, 3, 5, 7), (2, 2), "SAME"),
    ((2, 7, 7, 3), (3, 2, 3, 4), (2, 1), ((1, 2), (0, 1))),  # a row the strided window skips
    ((1, 5, 6, 2), (1, 1, 2, 3), (1, 1), "VALID"),
])
def test_values_and_gradients_match_lax_conv(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    expected = lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC)
    got = jax.jit(lambda x, w: onednn_conv(x, w, stride, padding, dimension_numbers=NHWC))(x, w)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    grads = jax.jit(jax.grad(_loss(onednn_conv, stride, padding), argnums=(0, 1)))(x, w)
    reference = jax.grad(_loss(lax.conv_general_dilated, stride, padding), argnums=(0, 1))(x, w)
    for g, r in zip(grads, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))


def test_the_round_calls_onednn_and_unsupported_shapes_fall_back():
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    text = jax.jit(jax.grad(_loss(onednn_conv, (1, 1), "VALID"), argnums=(0, 1))).lower(
        x, w).as_text()
    for target in ("forward", "backward_data", "backward_weights"):
        assert f"fedjax_sim_onednn_conv_{target}" in text
    # dilation and float64-free fallbacks: XLA's convolution, no custom call
    dilated = jax.jit(lambda x, w: onednn_conv(x, w, (1, 1), "VALID", rhs_dilation=(2, 1),
                                               dimension_numbers=NHWC)).lower(x, w).as_text()
    assert "fedjax_sim_onednn" not in dilated
    half = jax.jit(lambda x, w: onednn_conv(x, w, (1, 1), "VALID", dimension_numbers=NHWC)
                   ).lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
    assert "fedjax_sim_onednn" not in half


def test_sgd_in_a_scan_and_under_vmap_match_xla():
    # local training is a lax.scan of SGD steps; the vmap client map maps the custom calls
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 8, 10, 10, 2)), jnp.float32)  # [clients, B, H, W, C]
    w0 = jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32)

    def train(conv):
        def step(w, xb):
            g = jax.grad(lambda w: jnp.mean(conv(xb, w, (1, 1), "VALID",
                                                 dimension_numbers=NHWC) ** 2))(w)
            return w - 0.05 * g, None
        return lambda xs: lax.scan(step, w0, xs)[0]

    expected = jax.vmap(train(lax.conv_general_dilated))(x[:, :, None])
    got = jax.jit(jax.vmap(train(onednn_conv)))(x[:, :, None])
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def _assert_same_loss_and_gradients(models, x, y, *, loss_rtol, rtol, atol):
    """The (xla, onednn) models' cross-entropy and its gradients at the same parameters agree
    (``atol`` relative to each gradient leaf's largest entry); returns the oneDNN gradient's
    lowered text."""
    params = models[0].init(jax.random.key(0))

    def loss(model):
        return lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, x, train=True), y).mean()

    (l_xla, g_xla), (l_dnn, g_dnn) = (jax.jit(jax.value_and_grad(loss(m)))(params)
                                      for m in models)
    np.testing.assert_allclose(l_dnn, l_xla, rtol=loss_rtol)
    for a, b in zip(jax.tree.leaves(g_dnn), jax.tree.leaves(g_xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * float(jnp.abs(b).max()))
    return jax.jit(jax.grad(loss(models[1]))).lower(params).as_text()


def test_emnist_cnn_option_trains_like_xla():
    # the model option: the same parameters give the same loss and gradients
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(size=(6, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 62, 6))
    models = [create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1), conv=c,
                           dropout=False) for c in CONVOLUTIONS]
    _assert_same_loss_and_gradients(models, x, y, loss_rtol=1e-6, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet18_gn", {"num_classes": 5, "stage_sizes": (1, 1), "initial_filters": 4},
     (2, 16, 16, 3)),  # the 7x7 stride-2 SAME stem, stride-2 blocks
    ("celeba_cnn", {"num_classes": 2, "filters": 4, "num_blocks": 2}, (2, 12, 12, 3)),
])
def test_resnet_and_celeba_options_match_xla(name, kwargs, shape):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, kwargs["num_classes"], shape[0]))
    models = [create_model(name, input_shape=shape[1:], conv=c, **kwargs) for c in CONVOLUTIONS]
    text = _assert_same_loss_and_gradients(models, x, y, loss_rtol=1e-5, rtol=1e-3, atol=1e-5)
    assert "fedjax_sim_onednn_conv_backward_weights" in text


def test_unknown_conv_name_is_refused():
    with pytest.raises(ValueError, match=r"conv='mkl'; expected one of \['xla', 'onednn'\]"):
        convolution("mkl")
    with pytest.raises(ValueError, match="conv='mkl'"):
        classifiers.EmnistCNN(conv="mkl").init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))


def test_without_onednn_it_warns_and_computes_with_xla(tmp_path):
    # a process where oneDNN cannot be found: the option warns (naming why) and falls back
    code = (
        "import warnings, jax, jax.numpy as jnp\n"
        "from fedjax_sim.models import onednn\n"
        "onednn._onednn_prefix = lambda: None\n"
        "from fedjax_sim.models.conv import convolution\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    conv = convolution('onednn')\n"
        "x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))\n"
        "text = jax.jit(lambda x, w: conv(x, w, (1, 1), 'VALID', dimension_numbers="
        "('NHWC', 'HWIO', 'NHWC'))).lower(x, w).as_text()\n"
        "print(len(caught), str(caught[0].message), 'fedjax_sim_onednn' in text)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"FEDJAX_SIM_ONEDNN_CACHE": str(tmp_path),
                                           "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    count, rest = done.stdout.strip().split(" ", 1)
    assert count == "1"
    assert "computes with XLA's convolutions: oneDNN is not installed" in rest
    assert rest.endswith("False")
