"""LEAF's Sent140 LSTM and CelebA CNN: closed-form parameter counts, forward passes against
plain numpy references, padding and masking, SGD on a tiny batch, and the configs end to end on
small LEAF files written here."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from PIL import Image

from fedjax_sim.cli import main
from fedjax_sim.models import MODELS, batch_statistics, create_model, mean_loss
from fedjax_sim.models.leaf_models import CelebaCNN, Sent140LSTM, max_pool_2x2_same

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registered(monkeypatch):
    """The two models in the registry (until `fedjax_sim.models.MODELS` lists them)."""
    monkeypatch.setitem(MODELS, "sent140_lstm", (Sent140LSTM, "num_classes"))
    monkeypatch.setitem(MODELS, "celeba_cnn", (CelebaCNN, "num_classes"))


def _num_params(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _lstm_layer(inputs: int, hidden: int) -> int:
    # TF's BasicLSTMCell and flax's LSTM: kernel [(inputs + hidden), 4 * hidden] + 4 biases
    return 4 * (inputs * hidden + hidden * hidden + hidden)


# --- parameter counts -----------------------------------------------------------------------------


def test_sent140_lstm_parameter_count_is_leafs(registered):
    model = create_model("sent140_lstm", num_classes=2, input_shape=(25,), input_dtype="int32")
    params = jax.eval_shape(model.init, jax.random.key(0))
    vocab, embed, hidden = 10_002, 100, 100  # loader's default vocabulary + PAD + OOV
    expected = (
        vocab * embed
        + _lstm_layer(embed, hidden)
        + _lstm_layer(hidden, hidden)
        + (hidden * 128 + 128)
        + (128 * 2 + 2)
    )
    assert _num_params(params) == expected == 1_174_186
    small = create_model("sent140_lstm", num_classes=3, input_shape=(7,), input_dtype="int32",
                         vocab_size=13, embed_dim=4, hidden=5, num_layers=3, dense=6)
    params = jax.eval_shape(small.init, jax.random.key(0))
    assert _num_params(params) == (
        13 * 4 + _lstm_layer(4, 5) + 2 * _lstm_layer(5, 5) + (5 * 6 + 6) + (6 * 3 + 3)
    )


@pytest.mark.parametrize("norm", ["group", "none"])
def test_celeba_cnn_parameter_count_is_leafs(norm, registered):
    model = create_model("celeba_cnn", num_classes=2, input_shape=(84, 84, 3), norm=norm)
    params = jax.eval_shape(model.init, jax.random.key(0))
    side = 84
    for _ in range(4):
        side = -(-side // 2)  # 'same' pooling: 84 -> 42 -> 21 -> 11 -> 6
    assert side == 6
    convs = (3 * 3 * 3 * 32 + 32) + 3 * (3 * 3 * 32 * 32 + 32)
    norms = 4 * 2 * 32 if norm == "group" else 0  # scale + offset: LEAF's batch-norm gamma, beta
    dense = side * side * 32 * 2 + 2
    assert _num_params(params) == convs + norms + dense
    if norm == "group":
        assert _num_params(params) == 31_202  # LEAF's trainable parameters


def test_bad_celeba_options_are_named():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"norm='batch': expected one of \['group', 'none'\]"):
        CelebaCNN(norm="batch").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_groups=3 must divide filters=32"):
        CelebaCNN(num_groups=3).init(jax.random.key(0), x)


# --- forward passes against numpy ----------------------------------------------------------------


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_sent140(params, x, pad_id=0, oov_id=1):
    """A plain per-example, per-step loop: embed, LSTM layers, read at the last real word."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    vocab = p["Embed_0"]["embedding"].shape[0]
    layers = sorted(k for k in p if k.startswith("OptimizedLSTMCell"))
    logits = []
    for row in np.asarray(x):
        seq = [p["Embed_0"]["embedding"][t if 0 <= t < vocab else oov_id] for t in row]
        for name in layers:
            cell = p[name]
            hidden = cell["hi"]["kernel"].shape[1]
            h, c, out = np.zeros(hidden), np.zeros(hidden), []
            for inp in seq:
                gate = {
                    g: inp @ cell[f"i{g}"]["kernel"] + h @ cell[f"h{g}"]["kernel"]
                    + cell[f"h{g}"]["bias"]
                    for g in "ifgo"
                }
                c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
                h = _sigmoid(gate["o"]) * np.tanh(c)
                out.append(h)
            seq = out
        real = [t for t, token in enumerate(row) if token != pad_id]
        h = seq[real[-1] if real else 0]
        h = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        logits.append(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    return np.stack(logits)


def test_sent140_lstm_matches_a_numpy_loop_and_reads_the_last_real_word():
    module = Sent140LSTM(num_classes=2, vocab_size=13, embed_dim=4, hidden=5, dense=6)
    x = np.array([
        [5, 7, 2, 0, 0, 0, 0],     # 3 words then PAD
        [3, 0, 0, 0, 0, 0, 0],     # 1 word
        [4, 4, 6, 8, 9, 10, 12],   # full
        [0, 0, 0, 0, 0, 0, 0],     # empty tweet: position 0
        [2, 40, -3, 1, 0, 0, 0],   # ids out of range read as OOV (1)
    ], np.int32)  # fmt: skip
    params = jax.jit(module.init)(jax.random.key(1), jnp.asarray(x))["params"]
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(logits, _numpy_sent140(params, x), rtol=1e-4, atol=1e-5)
    # Padding after the last word never matters: the 3-word tweet alone, without padding.
    alone = jax.jit(module.apply)({"params": params}, jnp.asarray(x[:1, :3]))
    np.testing.assert_allclose(logits[:1], alone, rtol=1e-5, atol=1e-6)


def _numpy_celeba(params, x, num_groups, epsilon):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    block = 0
    while f"Conv_{block}" in p:
        kernel, bias = p[f"Conv_{block}"]["kernel"], p[f"Conv_{block}"]["bias"]
        b, h, w, _ = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((b, h, w, kernel.shape[-1])) + bias
        for dy in range(3):
            for dx in range(3):
                out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx]
        groups = out.reshape(b, h, w, num_groups, -1)
        mean = groups.mean(axis=(1, 2, 4), keepdims=True)
        var = groups.var(axis=(1, 2, 4), keepdims=True)
        out = ((groups - mean) / np.sqrt(var + epsilon)).reshape(out.shape)
        out = out * p[f"GroupNorm_{block}"]["scale"] + p[f"GroupNorm_{block}"]["bias"]
        # TF's 2x2/2 'same' max-pool: windows over the rows/columns that exist
        pooled = np.empty((b, -(-h // 2), -(-w // 2), out.shape[-1]))
        for i in range(pooled.shape[1]):
            for j in range(pooled.shape[2]):
                pooled[:, i, j] = out[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
        x = np.maximum(pooled, 0.0)
        block += 1
    return x.reshape(len(x), -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def test_celeba_cnn_matches_numpy_convolutions():
    module = CelebaCNN(num_classes=2, filters=4, num_blocks=2, num_groups=2)
    x = np.random.default_rng(0).uniform(size=(3, 10, 9, 3)).astype(np.float32)
    params = jax.jit(module.init)(jax.random.key(2), jnp.asarray(x))["params"]
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    assert logits.shape == (3, 2)
    expected = _numpy_celeba(params, x, 2, module.epsilon)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 5, 7, 1), (1, 1, 1, 2)])
def test_same_max_pool_against_windows(shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = np.asarray(max_pool_2x2_same(jnp.asarray(x)))
    b, h, w, c = shape
    assert out.shape == (b, -(-h // 2), -(-w // 2), c)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            np.testing.assert_array_equal(out[:, i, j], x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                                          .max(axis=(1, 2)))


# --- training: SGD, masking -----------------------------------------------------------------


def _sgd_losses(model, batch, mask, steps=8, learning_rate=0.1):
    params = jax.jit(model.init)(jax.random.key(0))
    optimizer = optax.sgd(learning_rate)

    def loss(p):
        return mean_loss(batch_statistics(model, p, batch, mask, train=True))

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    losses.append(float(jax.jit(loss)(params)))
    return losses


def _tiny_sent140():
    model = create_model("sent140_lstm", num_classes=2, input_shape=(6,), input_dtype="int32",
                         vocab_size=20, embed_dim=8, hidden=8, dense=8)
    rng = np.random.default_rng(3)
    x = rng.integers(2, 20, (8, 6)).astype(np.int32)
    lengths = np.array([3, 4, 5, 6, 3, 4, 5, 6])
    x[np.arange(6)[None] >= lengths[:, None]] = 0  # PAD after each tweet's words
    y = (x[np.arange(8), lengths - 1] >= 11).astype(np.int32)  # decided by the last word
    y[:2] = 1 - y[:2] if y.sum() in (0, 8) else y[:2]  # both classes present
    return model, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _tiny_celeba():
    model = create_model("celeba_cnn", num_classes=2, input_shape=(7, 7, 3), filters=4,
                         num_blocks=2)
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(8, 7, 7, 3)).astype(np.float32)
    return model, {"x": jnp.asarray(x), "y": jnp.asarray(np.arange(8) % 2, jnp.int32)}


@pytest.mark.parametrize(("make", "learning_rate"), [(_tiny_sent140, 1.0), (_tiny_celeba, 0.1)])
def test_a_few_sgd_steps_lower_the_loss(make, learning_rate, registered):
    model, batch = make()
    losses = _sgd_losses(model, batch, jnp.ones(8, bool), steps=30, learning_rate=learning_rate)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("make", [_tiny_sent140, _tiny_celeba])
def test_masked_examples_change_neither_loss_nor_gradient(make, registered):
    """A batch of 5 real examples padded with 3 garbage ones = the 5 examples alone.

    Would fail with batch norm in training mode (the garbage would enter the batch statistics).
    """
    model, batch = make()
    params = jax.jit(model.init)(jax.random.key(5))
    mask = jnp.array([True, False, True, True, False, True, True, False])
    rng = np.random.default_rng(6)
    garbage = np.asarray(batch["x"]).copy()
    if garbage.dtype.kind == "f":
        garbage[~np.asarray(mask)] = 1e3 * rng.normal(size=garbage[~np.asarray(mask)].shape)
    else:
        garbage[~np.asarray(mask)] = rng.integers(-5, 50, garbage[~np.asarray(mask)].shape)
    padded = {"x": jnp.asarray(garbage), "y": batch["y"]}
    real = {k: v[np.asarray(mask)] for k, v in batch.items()}

    def loss(p, b, m):
        return mean_loss(batch_statistics(model, p, b, m, train=True))

    grad = jax.jit(jax.value_and_grad(loss))
    value, grads = grad(params, padded, mask)
    value_real, grads_real = grad(params, real, jnp.ones(5, bool))
    np.testing.assert_allclose(value, value_real, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, grads_real)
    # A step with no real example has zero loss and zero gradient.
    value, grads = grad(params, padded, jnp.zeros(8, bool))
    assert float(value) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


# --- configs --------------------------------------------------------------------------------------


def _write_leaf(path: Path, users: dict) -> None:
    """One LEAF JSON file: ``{"users", "num_samples", "user_data": {user: {"x", "y"}}}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }))


TINY_RUN = ["rounds=2", "eval.every=1", "log.every=1", "log.progress=false", "log.plot=false",
            "cohort.size=2", "client.batch_size=2"]


def _run(config: str, tmp_path: Path, *overrides: str) -> dict:
    workdir = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / config), *TINY_RUN, *overrides,
                 f"dataset.data_dir={tmp_path}", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final"] and all(np.isfinite(v) for v in summary["final"].values())
    return summary


def test_configs_keep_leafs_hyperparameters():
    sent140 = yaml.safe_load((ROOT / "configs" / "sent140_fedavg.yaml").read_text())
    assert sent140["model"]["name"] == "sent140_lstm"
    assert sent140["dataset"]["features"] == "tokens"
    assert sent140["dataset"]["sequence_length"] == 25  # LEAF's max_words
    assert sent140["model"]["vocab_size"] == sent140["dataset"]["vocab_size"] + 2  # + PAD, OOV
    assert sent140["client"]["optimizer"] == {"name": "sgd", "learning_rate": 0.3}
    assert (sent140["client"]["batch_size"], sent140["cohort"]["size"]) == (10, 10)
    celeba = yaml.safe_load((ROOT / "configs" / "celeba_cnn_fedavg.yaml").read_text())
    assert celeba["model"]["name"] == "celeba_cnn"
    assert celeba["dataset"]["image_size"] == 84
    assert celeba["client"]["optimizer"] == {"name": "sgd", "learning_rate": 0.1}
    assert (celeba["client"]["batch_size"], celeba["cohort"]["size"]) == (10, 10)


@pytest.mark.slow  # ~30 s on a loaded 2-core CPU (compiles the round step)
def test_sent140_config_runs_the_lstm(tmp_path, registered):
    tweets = {
        "alice": ["good morning, all!", "what a lovely day", "sad news today"],
        "bob": ["i hate mondays", "this is the worst", "love it"],
        "carol": ["meh", "great game tonight!", "so tired"],
    }
    rows = {u: ([[str(i), "Sat May 16 23:58:44 UTC 2009", "NO_QUERY", u, t]
                 for i, t in enumerate(texts)], [1, 0, 1]) for u, texts in tweets.items()}
    _write_leaf(tmp_path / "leaf" / "sent140" / "data" / "train" / "a.json", rows)
    _write_leaf(tmp_path / "leaf" / "sent140" / "data" / "test" / "a.json",
                {u: (x[:1], y[:1]) for u, (x, y) in rows.items()})
    _run("sent140_fedavg.yaml", tmp_path, "model.embed_dim=8", "model.hidden=8")


@pytest.mark.slow  # ~35 s on a loaded 2-core CPU (compiles the round step)
def test_celeba_config_runs_the_cnn(tmp_path, registered):
    folder = tmp_path / "leaf" / "celeba" / "data" / "raw" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 10)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / name)
    users = {"7": (names[:3], [1.0, 0.0, 1.0]), "12": (names[3:6], [0.0, 0.0, 1.0]),
             "2880": (names[6:9], [1.0, 1.0, 0.0])}
    base = tmp_path / "leaf" / "celeba" / "data"
    _write_leaf(base / "train" / "a.json", {u: (x[:-1], y[:-1]) for u, (x, y) in users.items()})
    _write_leaf(base / "test" / "a.json", {u: (x[-1:], y[-1:]) for u, (x, y) in users.items()})
    # 21x21 instead of LEAF's 84x84 keeps the CNN quick on a CPU; the odd sizes exercise the
    # 'same' pooling (21 -> 11 -> 6 -> 3 -> 2).
    _run("celeba_cnn_fedavg.yaml", tmp_path, "dataset.image_size=21")
