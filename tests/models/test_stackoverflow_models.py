"""TFF's StackOverflow models and the statistics they train with: closed-form parameter counts,
numpy references for the LSTM, the bag of words, the multi-label loss and recall at 5, and
accuracy without the ignored labels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.models import (
    Model,
    accuracy,
    bag_of_words,
    batch_statistics,
    create_model,
    mean_loss,
    next_word_ignore_labels,
)


def _num_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _random_params(model: Model, seed: int = 0, scale: float = 0.3):
    """Random parameters of ``model``'s shapes, drawn with numpy (``jit(init)`` compiles one
    threefry per parameter: slow on a small CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32), shapes)


def _stats(model: Model, params, batch, mask):
    return jax.jit(lambda p, b, m: batch_statistics(model, p, b, m))(params, batch, mask)


def _lstm_layer(inputs: int, hidden: int) -> int:
    # four gates: input kernel (no bias) + recurrent kernel with bias, as Keras's LSTM
    return 4 * (inputs * hidden + hidden * hidden + hidden)


# ------------------------------------------------------------------------ next-word LSTM


def test_lstm_parameter_count_is_tffs():
    model = create_model(
        "stackoverflow_lstm", num_classes=10_004, input_shape=(20,), input_dtype="int32"
    )
    params = jax.eval_shape(model.init, jax.random.key(0))
    embedding = 10_004 * 96
    projection = 670 * 96 + 96
    output = 96 * 10_004 + 10_004
    expected = embedding + _lstm_layer(96, 670) + projection + output
    assert _num_params(params) == expected == 4_050_748
    x = jnp.zeros((16, 20), jnp.int32)
    assert jax.eval_shape(model.apply, params, x).shape == (16, 20, 10_004)

    shared = create_model(
        "stackoverflow_lstm",
        num_classes=10_004,
        input_shape=(20,),
        input_dtype="int32",
        shared_embedding=True,
    )
    shared_params = jax.eval_shape(shared.init, jax.random.key(0))
    assert _num_params(shared_params) == expected - output
    assert jax.eval_shape(shared.apply, shared_params, x).shape == (16, 20, 10_004)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_lstm_model(params, tokens):
    """Embedding -> LSTM (gates i, f, g, o) -> dense to the embedding width -> dense logits."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    cell = p["OptimizedLSTMCell_0"]
    embedded = p["Embed_0"]["embedding"][tokens]  # [B, T, E]
    batch, steps, _ = embedded.shape
    hidden = cell["hi"]["kernel"].shape[0]
    h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
    outputs = []
    for t in range(steps):
        x = embedded[:, t]

        def gate(name, h=h, x=x):
            return (
                x @ cell[f"i{name}"]["kernel"]
                + h @ cell[f"h{name}"]["kernel"]
                + cell[f"h{name}"]["bias"]
            )

        i, f, g, o = (
            _sigmoid(gate("i")),
            _sigmoid(gate("f")),
            np.tanh(gate("g")),
            _sigmoid(gate("o")),
        )
        c = f * c + i * g
        h = o * np.tanh(c)
        outputs.append(h)
    hs = np.stack(outputs, axis=1)
    projected = hs @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    return projected @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def test_lstm_forward_matches_numpy():
    model = create_model(
        "stackoverflow_lstm",
        num_classes=12,
        input_shape=(6,),
        input_dtype="int32",
        embed_dim=4,
        hidden=5,
    )
    params = _random_params(model)
    tokens = np.array([[10, 3, 4, 5, 11, 0], [10, 7, 8, 8, 1, 2]], np.int32)
    got = jax.jit(model.apply)(params, jnp.asarray(tokens))
    np.testing.assert_allclose(got, _numpy_lstm_model(params, tokens), rtol=1e-4, atol=1e-5)


def test_next_word_ignore_labels_are_pad_oov_bos_eos():
    assert next_word_ignore_labels() == (0, 10_001, 10_002, 10_003)
    assert next_word_ignore_labels(10) == (0, 7, 8, 9)
    model = create_model(
        "stackoverflow_lstm",
        num_classes=10_004,
        input_shape=(20,),
        input_dtype="int32",
        pad_label=0,
    )
    assert model.ignore_labels == (0, 10_001, 10_002, 10_003)
    assert model.task == "classification" and model.pad_label == 0
    plain = create_model(
        "stackoverflow_lstm",
        num_classes=10_004,
        input_shape=(20,),
        input_dtype="int32",
        ignore_labels=(),
    )
    assert plain.ignore_labels == ()
    with pytest.raises(ValueError, match="leaves no word ids"):
        next_word_ignore_labels(4)


class Echo(nn.Module):
    """Logits that predict the input token: ``scale * one_hot(x)`` (argmax = x)."""

    vocab_size: int

    @nn.compact
    def __call__(self, x, train=False):
        scale = self.param("scale", nn.initializers.ones, ())
        return 3.0 * scale * jax.nn.one_hot(x, self.vocab_size)


def test_ignored_labels_count_in_the_loss_but_not_in_accuracy():
    vocab = 10  # pad 0, words 1..6, oov 7, bos 8, eos 9
    model = Model(
        module=Echo(vocab),
        sample_input=np.zeros((1, 5), np.int32),
        num_classes=vocab,
        pad_label=0,
        ignore_labels=next_word_ignore_labels(vocab),
    )
    params = jax.jit(model.init)(jax.random.key(0))
    # the model predicts x; y == x where it is right
    x = np.array([[8, 3, 7, 5, 9], [8, 2, 2, 0, 0], [8, 4, 4, 4, 4]], np.int32)
    y = np.array([[3, 3, 7, 6, 9], [2, 2, 9, 0, 0], [4, 4, 4, 4, 4]], np.int32)
    mask = np.array([True, True, False])
    stats = _stats(model, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.asarray(mask))

    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x)), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss, count, correct, scored = 0.0, 0, 0, 0
    for b in range(3):
        for t in range(5):
            label = y[b, t]
            if not mask[b] or label == 0:
                continue
            loss -= log_probs[b, t, label]
            count += 1
            if label in (7, 8, 9):
                continue
            scored += 1
            correct += int(np.argmax(logits[b, t]) == label)
    # the right predictions of oov (7) and eos (9) in row 0 do not count
    assert (count, scored, correct) == (8, 5, 2)
    assert float(stats["count"]) == count
    assert float(stats["accuracy_count"]) == scored
    assert float(stats["correct"]) == correct
    np.testing.assert_allclose(stats["loss_sum"], loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy(stats), correct / scored, rtol=1e-6)
    np.testing.assert_allclose(mean_loss(stats), loss / count, rtol=1e-5)


# ------------------------------------------------------------------------ tag prediction


def test_tag_logistic_parameter_count_is_tffs():
    model = create_model("tag_logistic", num_classes=500, input_shape=(20,), input_dtype="int32")
    params = jax.eval_shape(model.init, jax.random.key(0))
    # 10,000 word features (pad, oov, bos, eos have none) x 500 tags + 500 biases
    assert _num_params(params) == 10_000 * 500 + 500 == 5_000_500
    assert jax.eval_shape(model.apply, params, jnp.zeros((100, 20), jnp.int32)).shape == (100, 500)
    assert model.task == "multilabel" and model.ignore_labels == ()

    every_id = create_model(
        "tag_logistic",
        num_classes=7,
        input_shape=(20,),
        input_dtype="int32",
        vocab_size=30,
        num_special=0,
    )
    assert _num_params(jax.eval_shape(every_id.init, jax.random.key(0))) == 29 * 7 + 7


def _numpy_bag_of_words(tokens, vocab_size, num_special):
    num_words = vocab_size - 1 - num_special
    bag = np.zeros((len(tokens), num_words))
    for b, row in enumerate(tokens):
        length = np.sum(row != 0)
        for token in row:
            if 1 <= token <= num_words:
                bag[b, token - 1] += 1.0 / length
    return bag


TOKENS = np.array(
    [
        [3, 3, 1, 8, 9, 0, 0],  # 8 = oov (vocab 11: words 1..7, oov 8, bos 9, eos 10)
        [7, 2, 10, 5, 5, 5, 4],
        [0, 0, 0, 0, 0, 0, 0],  # no tokens at all
        [6, 0, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def test_bag_of_words_is_tffs_normalized_counts():
    bag = jax.jit(bag_of_words, static_argnums=(1, 2))(jnp.asarray(TOKENS), 11, 3)
    expected = _numpy_bag_of_words(TOKENS, 11, 3)
    np.testing.assert_allclose(bag, expected, rtol=1e-6)
    # the oov token counts in the length: the words of row 0 sum to 3/5, not 1
    np.testing.assert_allclose(np.sum(bag, axis=1), [3 / 5, 6 / 7, 0.0, 1.0], rtol=1e-6)


def test_tag_logistic_is_a_dense_layer_on_the_bag_of_words():
    model = create_model(
        "tag_logistic", num_classes=6, input_shape=(7,), input_dtype="int32", vocab_size=11
    )
    params = _random_params(model)
    logits = jax.jit(model.apply)(params, jnp.asarray(TOKENS))
    kernel, bias = (np.asarray(params[k], np.float64) for k in ("kernel", "bias"))
    expected = _numpy_bag_of_words(TOKENS, 11, 3) @ kernel + bias
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def _numpy_multilabel(logits, labels, mask, num_classes, pad_label=None, k=5):
    """Mean-over-classes sigmoid BCE per example; recall at k pooled over examples."""
    logits = np.asarray(logits, np.float64)
    loss, hits, true_tags, examples = 0.0, 0, 0, 0
    for b in range(len(logits)):
        if not mask[b]:
            continue
        examples += 1
        tags = {int(t) for t in labels[b] if 0 <= t < num_classes and t != pad_label}
        target = np.zeros(num_classes)
        target[list(tags)] = 1.0
        p = _sigmoid(logits[b])
        loss += np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p)))
        top = np.argsort(-logits[b])[:k]
        hits += len(tags & {int(i) for i in top})
        true_tags += len(tags)
    return loss, hits, true_tags, examples


@pytest.mark.parametrize("num_classes,pad_label", [(9, None), (9, 4), (3, None)])
def test_multilabel_statistics_match_numpy(num_classes, pad_label):
    model = create_model(
        "tag_logistic",
        num_classes=num_classes,
        input_shape=(7,),
        input_dtype="int32",
        vocab_size=11,
        pad_label=pad_label,
    )
    params = _random_params(model, seed=1, scale=2.0)
    labels = np.array(
        [
            [1, 4, 2, -1, -1],
            [0, 0, 5, 8, 7],  # a repeated tag counts once
            [-1, -1, -1, -1, -1],  # no tags: counts in the loss, not in recall
            # (with 3 classes, ids >= 3 are out of range: padding like -1)
            [99, -7, 3, 3, 1],  # a masked example with garbage labels
        ],
        np.int32,
    )
    mask = np.array([True, True, True, False])
    stats = _stats(
        model, params, {"x": jnp.asarray(TOKENS), "y": jnp.asarray(labels)}, jnp.asarray(mask)
    )
    logits = jax.jit(model.apply)(params, jnp.asarray(TOKENS))
    loss, hits, true_tags, examples = _numpy_multilabel(
        logits, labels, mask, num_classes, pad_label
    )
    assert float(stats["count"]) == examples == 3
    assert float(stats["accuracy_count"]) == true_tags
    assert float(stats["correct"]) == hits
    np.testing.assert_allclose(stats["loss_sum"], loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy(stats), hits / true_tags, rtol=1e-6)


def test_recall_at_5_counts_the_top_five_scores():
    """A hand-made case: 7 classes, logits rank 6 > 5 > ... > 0."""

    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            offset = self.param("offset", nn.initializers.zeros, ())
            return jnp.broadcast_to(jnp.arange(7.0), (x.shape[0], 7)) + offset

    model = Model(
        module=Fixed(),
        sample_input=np.zeros((1, 2), np.float32),
        num_classes=7,
        task="multilabel",
    )
    params = jax.jit(model.init)(jax.random.key(0))
    labels = jnp.array([[6, 0, -1], [1, 2, 3], [0, 1, -1]], jnp.int32)  # top 5 = {2, ..., 6}
    stats = _stats(model, params, {"x": jnp.zeros((3, 2)), "y": labels}, jnp.ones(3, bool))
    assert float(stats["correct"]) == 1 + 2 + 0
    assert float(stats["accuracy_count"]) == 2 + 3 + 2


# ------------------------------------------------------------------------ training


def _sgd_losses(model: Model, params, batch, steps: int, lr: float):
    mask = jnp.ones(batch["y"].shape[0], bool)

    def step(p, _):
        value, grads = jax.value_and_grad(
            lambda q: mean_loss(batch_statistics(model, q, batch, mask))
        )(p)
        return jax.tree.map(lambda a, g: a - lr * g, p, grads), value

    return np.asarray(jax.jit(lambda p: jax.lax.scan(step, p, None, length=steps)[1])(params))


def test_a_few_sgd_steps_reduce_the_lstm_loss():
    model = create_model(
        "stackoverflow_lstm",
        num_classes=12,
        input_shape=(6,),
        input_dtype="int32",
        pad_label=0,
        embed_dim=8,
        hidden=16,
    )
    params = _random_params(model, scale=0.2)
    x = jnp.array([[10, 3, 4, 5, 11, 0], [10, 7, 8, 8, 1, 2]], jnp.int32)
    y = jnp.array([[3, 4, 5, 11, 0, 0], [7, 8, 8, 1, 2, 11]], jnp.int32)
    losses = _sgd_losses(model, params, {"x": x, "y": y}, steps=8, lr=2.0)
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.85 * losses[0], losses


def test_a_few_sgd_steps_reduce_the_tag_loss():
    model = create_model(
        "tag_logistic", num_classes=9, input_shape=(7,), input_dtype="int32", vocab_size=11
    )
    params = _random_params(model, scale=0.5)
    y = jnp.array([[1, 4, -1], [0, 5, 8], [2, -1, -1], [3, 3, 6]], jnp.int32)
    losses = _sgd_losses(model, params, {"x": jnp.asarray(TOKENS), "y": y}, steps=6, lr=5.0)
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------ create_model


def test_token_models_need_integer_inputs():
    for name, classes in (("stackoverflow_lstm", 10_004), ("tag_logistic", 500)):
        with pytest.raises(ValueError, match=rf"create_model\('{name}'\).*input_dtype='int32'"):
            create_model(name, num_classes=classes, input_shape=(20,))


def test_task_can_be_set_and_is_checked():
    model = create_model("mlp", num_classes=4, input_shape=(3,), task="multilabel")
    assert model.task == "multilabel"
    with pytest.raises(ValueError, match=r"unknown task 'tags'.*'classification', 'multilabel'"):
        create_model("mlp", num_classes=4, input_shape=(3,), task="tags")
    with pytest.raises(ValueError, match="only supported for task='classification'"):
        create_model(
            "tag_logistic",
            num_classes=5,
            input_shape=(4,),
            input_dtype="int32",
            ignore_labels=(0,),
        )
