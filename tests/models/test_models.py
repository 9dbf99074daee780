"""The standard models: shapes, closed-form parameter counts, masked statistics, dropout and
`create_model`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import USERS_BACKEND_OPT

from fedjax_sim.models import (
    MLP,
    STATISTICS,
    CharLSTM,
    EmnistCNN,
    LogisticRegression,
    Model,
    accuracy,
    batch_statistics,
    create_model,
    mean_loss,
)


def _num_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _init(model: Model):
    return jax.jit(model.init)(jax.random.key(0))


def _apply(model: Model, params, x, **kwargs):
    # jitted: eager flax dispatches op by op and makes the tests slow
    return jax.jit(model.apply, static_argnames="train")(params, x, **kwargs)


def _stats(model: Model, params, batch, mask):
    return jax.jit(lambda p, b, m: batch_statistics(model, p, b, m))(params, batch, mask)


def _lstm_layer(inputs: int, hidden: int) -> int:
    # four gates: input kernel (no bias) + recurrent kernel with bias
    return 4 * (inputs * hidden + hidden * hidden + hidden)


# (name, create_model kwargs, closed-form parameter count, output shape for a batch of 3)
MODEL_CASES = [
    (
        "logistic",
        {"num_classes": 10, "input_shape": (28, 28)},
        28 * 28 * 10 + 10,
        (3, 10),
    ),
    (
        "mlp",
        {"num_classes": 10, "input_shape": (28, 28, 1)},
        (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10),  # McMahan et al.'s 2NN
        (3, 10),
    ),
    (
        "mlp",
        {"num_classes": 5, "input_shape": (6,), "hidden": (7,)},
        (6 * 7 + 7) + (7 * 5 + 5),
        (3, 5),
    ),
    (
        "emnist_cnn",
        {"num_classes": 62, "input_shape": (28, 28, 1)},
        3 * 3 * 1 * 32 + 32 + 3 * 3 * 32 * 64 + 64 + 12 * 12 * 64 * 128 + 128 + 128 * 62 + 62,
        (3, 62),
    ),
    (
        "char_lstm",
        {"num_classes": 90, "input_shape": (5,), "input_dtype": "int32"},
        90 * 8 + _lstm_layer(8, 256) + _lstm_layer(256, 256) + 256 * 90 + 90,
        (3, 5, 90),
    ),
    (
        "char_lstm",
        {
            "num_classes": 90,
            "input_shape": (5,),
            "input_dtype": "int32",
            "hidden": 128,
            "num_layers": 1,
        },
        90 * 8 + _lstm_layer(8, 128) + 128 * 90 + 90,
        (3, 5, 90),
    ),
]


@pytest.mark.parametrize("name,kwargs,count,out_shape", MODEL_CASES)
def test_output_shapes_and_parameter_counts(name, kwargs, count, out_shape):
    model = create_model(name, **kwargs)
    params = jax.eval_shape(model.init, jax.random.key(0))  # shapes only: fast
    assert _num_params(params) == count
    x = jnp.zeros((3, *kwargs["input_shape"]), kwargs.get("input_dtype", "float32"))
    assert jax.eval_shape(model.apply, params, x).shape == out_shape
    assert model.sample_input.shape == (1, *kwargs["input_shape"])
    assert model.name == name and model.num_classes == kwargs["num_classes"]


def test_emnist_cnn_parameter_count_is_the_published_one():
    model = create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))
    assert _num_params(jax.eval_shape(model.init, jax.random.key(0))) == 1_206_590


def test_emnist_cnn_accepts_images_without_channel_axis():
    module = EmnistCNN(num_classes=4, dropout=False)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    np.testing.assert_allclose(
        *(jax.jit(module.apply)(params, v) for v in (x, x[..., None])), rtol=1e-6
    )


def test_masked_examples_do_not_count():
    model = create_model("mlp", num_classes=4, input_shape=(5,), hidden=(8,))
    params = _init(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=6), jnp.int32)
    mask = jnp.array([True, False, True, True, False, True])
    # padded examples hold garbage: it must not matter
    x_padded = jnp.where(mask[:, None], x, 1e3)
    stats = _stats(model, params, {"x": x_padded, "y": y}, mask)
    keep = np.asarray(mask)
    expected = _stats(model, params, {"x": x[keep], "y": y[keep]}, jnp.ones(int(keep.sum()), bool))
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(stats[key], expected[key], rtol=1e-6)
    assert float(stats["count"]) == 4


def test_lstm_ignores_masked_examples_and_pad_labels():
    model = create_model(
        "char_lstm",
        num_classes=11,
        input_shape=(4,),
        input_dtype="int32",
        pad_label=0,
        hidden=8,
        num_layers=1,
    )
    params = _init(model)
    x = jnp.array([[3, 4, 5, 6], [7, 8, 0, 0], [1, 2, 3, 4]], jnp.int32)
    y = jnp.array([[4, 5, 6, 1], [8, 9, 0, 0], [2, 3, 4, 5]], jnp.int32)
    mask = jnp.array([True, True, False])
    stats = _stats(model, params, {"x": x, "y": y}, mask)

    # independent reference: numpy cross-entropy over the 6 valid (unmasked, non-pad) labels
    logits = np.asarray(_apply(model, params, x), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    loss = -sum(log_probs[b, t, int(y[b, t])] for b, t in valid)
    correct = sum(int(np.argmax(logits[b, t]) == int(y[b, t])) for b, t in valid)
    assert float(stats["count"]) == len(valid)
    np.testing.assert_allclose(stats["loss_sum"], loss, rtol=1e-5)
    assert float(stats["correct"]) == correct


def test_logistic_regression_loss_is_softmax_cross_entropy():
    model = create_model("logistic", num_classes=3, input_shape=(4,))
    params = _init(model)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=5)
    stats = _stats(model, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.ones(5, bool))

    kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(params["Dense_0"]["bias"], np.float64)
    logits = x.astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(probs[np.arange(5), y]))
    np.testing.assert_allclose(mean_loss(stats), expected, rtol=1e-5)


def test_mean_loss_is_zero_when_nothing_is_valid():
    stats = {"loss_sum": jnp.float32(0.0), "correct": jnp.float32(0.0), "count": jnp.float32(0.0)}
    assert float(mean_loss(stats)) == 0.0
    assert float(accuracy(stats)) == 0.0


def test_classification_accuracy_is_out_of_every_valid_label():
    """Without ignore_labels the accuracy's denominator is the loss's: ``accuracy_count``
    equals ``count``, and `accuracy` reads ``count`` when a dict lacks ``accuracy_count``."""
    model = create_model("mlp", num_classes=4, input_shape=(5,), hidden=(8,))
    params = _init(model)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=6), jnp.int32)
    mask = jnp.array([True, True, False, True, True, True])
    stats = _stats(model, params, {"x": x, "y": y}, mask)
    assert tuple(sorted(stats)) == tuple(sorted(STATISTICS))
    assert float(stats["accuracy_count"]) == float(stats["count"]) == 5
    predictions = np.argmax(np.asarray(_apply(model, params, x)), axis=-1)
    expected = np.mean((predictions == np.asarray(y))[np.asarray(mask)])
    np.testing.assert_allclose(accuracy(stats), expected, rtol=1e-6)
    legacy = {k: stats[k] for k in ("loss_sum", "correct", "count")}
    assert float(accuracy(legacy)) == float(accuracy(stats))


def test_model_checks_its_task_and_ignore_labels():
    module, sample = MLP(3, hidden=(4,)), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"Model.task is 'regression'"):
        Model(module=module, sample_input=sample, num_classes=3, task="regression")
    with pytest.raises(ValueError, match="only supported for task='classification'"):
        Model(
            module=module, sample_input=sample, num_classes=3, task="multilabel", ignore_labels=(1,)
        )
    model = Model(module=module, sample_input=sample, num_classes=3, ignore_labels=[np.int64(2)])
    assert model.ignore_labels == (2,) and isinstance(model.ignore_labels[0], int)


def test_dropout_only_in_training_with_an_rng():
    model = create_model("emnist_cnn", num_classes=5, input_shape=(10, 10, 1))
    params = _init(model)
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 1))

    @jax.jit
    def outputs(params, x):
        keys = jax.random.split(jax.random.key(2), 3)
        return (
            model.apply(params, x),
            model.apply(params, x, train=False, rng=keys[0]),
            model.apply(params, x, train=True, rng=keys[1]),
            model.apply(params, x, train=True, rng=keys[2]),
            model.apply(params, x, train=True, rng=keys[1]),
        )

    eval_a, eval_b, train_a, train_b, train_a_again = outputs(params, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    np.testing.assert_array_equal(train_a, train_a_again)


def test_no_dropout_model_is_deterministic_in_training():
    model = create_model("emnist_cnn", num_classes=5, input_shape=(10, 10, 1), dropout=False)
    params = _init(model)
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 1))
    np.testing.assert_array_equal(
        _apply(model, params, x, train=True, rng=jax.random.key(3)), _apply(model, params, x)
    )


def test_modules_can_be_wrapped_by_hand():
    for module, sample in (
        (LogisticRegression(3), np.zeros((1, 4), np.float32)),
        (MLP(3, hidden=(4,)), np.zeros((1, 4), np.float32)),
        (CharLSTM(vocab_size=3, hidden=4, num_layers=1), np.zeros((1, 2), np.int32)),
    ):
        model = Model(module=module, sample_input=sample, num_classes=3)
        params = _init(model)
        assert _apply(model, params, jnp.asarray(sample)).shape[-1] == 3


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"'emnist_cn'.*'char_lstm'.*Did you mean 'emnist_cnn'"):
        create_model("emnist_cn", num_classes=62, input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"unknown model name 'resnet'"):
        create_model("resnet", num_classes=10, input_shape=(32, 32, 3))


def test_unknown_keyword_names_the_key_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'hiden'.*MLP accepts \['hidden'\]"):
        create_model("mlp", num_classes=10, input_shape=(4,), hiden=(8,))
    with pytest.raises(ValueError, match=r"'vocab_size'.*num_classes"):
        create_model(
            "char_lstm", num_classes=90, input_shape=(4,), input_dtype="int32", vocab_size=90
        )


def test_char_lstm_needs_integer_inputs():
    with pytest.raises(ValueError, match="input_dtype='int32'"):
        create_model("char_lstm", num_classes=90, input_shape=(4,))


@pytest.mark.parametrize("shape", [(2, 24, 24, 3), (1, 7, 9, 2)])
def test_reshape_max_pool_matches_flax_max_pool(shape):
    from fedjax_sim.models.classifiers import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), shape)
    reference = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), reference)
    grad = jax.grad(lambda v: jnp.sum(max_pool_2x2(v) ** 2))(x)
    grad_ref = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) ** 2))(x)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 24, 24, 3), (1, 7, 9, 2), (3, 6, 5, 4)])
def test_max_pool_gradient_is_autodiffs_of_reshape_max_bit_for_bit(shape):
    """Reference: JAX's own reduce-max gradient of the same reshape + max (ties share it)."""
    from fedjax_sim.models.classifiers import max_pool_2x2

    def autodiff_pool(v):
        b, h, w, c = v.shape
        v = v[:, : h - h % 2, : w - w % 2]
        return v.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    x = jax.random.normal(jax.random.key(1), shape)
    x = jnp.where(x > 0.8, 0.8, x)  # ties: clipped values share a window's maximum
    x = jnp.where(x < -1.0, 0.0, x)
    g = jax.random.normal(jax.random.key(2), autodiff_pool(x).shape)
    ours = jax.vjp(max_pool_2x2, x)[1](g)[0]
    reference = jax.vjp(autodiff_pool, x)[1](g)[0]
    np.testing.assert_array_equal(max_pool_2x2(x), autodiff_pool(x))
    np.testing.assert_array_equal(ours, reference)
    windows = np.asarray(x)[:, : shape[1] // 2 * 2, : shape[2] // 2 * 2]
    windows = windows.reshape(shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3])
    ties = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4))
    assert ties.max() >= 2  # the case where sharing matters is exercised


@pytest.mark.parametrize("name, kwargs", [
    ("emnist_cnn", dict(num_classes=62, input_shape=(28, 28, 1))),
    ("char_lstm", dict(num_classes=90, input_shape=(80,), input_dtype="int32")),
    ("celeba_cnn", dict(num_classes=2, input_shape=(84, 84, 3))),
    ("tag_logistic", dict(num_classes=50, input_shape=(20,), input_dtype="int32",
                          vocab_size=100)),
])
def test_init_is_flax_init_bit_for_bit(name, kwargs):
    """`Model.init` compiles with `INIT_COMPILER_OPTIONS` on CPU; reference: flax's own
    ``module.init`` jitted with XLA's default options (dense, convolutional, GroupNorm and LSTM
    initializers; the suite's time budget keeps it to these four)."""
    model = create_model(name, **kwargs)
    key = jax.random.PRNGKey(3)
    ours = model.init(key)
    # XLA's default level, explicitly: the suite compiles at level 1 (tests/conftest.py)
    reference = jax.jit(lambda k: model.module.init(
        {"params": k}, jnp.asarray(model.sample_input), train=False)["params"],
        compiler_options=USERS_BACKEND_OPT)(key)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)
