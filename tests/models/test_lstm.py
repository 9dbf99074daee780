"""`FusedLSTM` / ``CharLSTM(cell="fused")`` against flax's ``nn.RNN(nn.OptimizedLSTMCell)``:
the same parameters at init, the same outputs, the same gradients (its VJP is hand-written)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.models.char_lstm import CharLSTM
from fedjax_sim.models.leaf_models import Sent140LSTM
from fedjax_sim.models.lstm import FusedLSTM, fused_lstm, lstm_recurrence
from fedjax_sim.models.stackoverflow import StackOverflowLSTM


def _close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("hidden, layers", [(16, 1), (8, 2)])
def test_char_lstm_fused_equals_flax_cell(hidden, layers):
    x = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, 90)
    y = jax.random.randint(jax.random.PRNGKey(2), (3, 11), 0, 90)
    fused = CharLSTM(hidden=hidden, num_layers=layers)
    flax_cell = CharLSTM(hidden=hidden, num_layers=layers, cell="flax")
    params = fused.init(jax.random.PRNGKey(0), x)
    np.testing.assert_equal(jax.device_get(params),
                            jax.device_get(flax_cell.init(jax.random.PRNGKey(0), x)))
    _close(jax.jit(fused.apply)(params, x), jax.jit(flax_cell.apply)(params, x))

    def loss(model):  # jitted: one program instead of an eager program per operation
        def f(p):
            logits = model.apply(p, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))
        return jax.jit(jax.grad(f))(params)

    _close(loss(fused), loss(flax_cell), rtol=1e-4, atol=1e-6)


def test_fused_lstm_module_matches_nn_rnn_under_vmap():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 7, 5))  # [clients, B, T, F]
    rnn = nn.RNN(nn.OptimizedLSTMCell(6))
    params = rnn.init(jax.random.PRNGKey(1), x[0])
    assert jax.tree.structure(params) == jax.tree.structure(
        FusedLSTM(6).init(jax.random.PRNGKey(1), x[0]))

    def grads(module):
        return jax.jit(jax.vmap(
            lambda xi: jax.grad(lambda p: jnp.sum(module.apply(p, xi) ** 2))(params)))(x)

    _close(grads(FusedLSTM(6)), grads(rnn), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch, steps, features, hidden, exact", [
    (8, 80, 8, 128, True),  # the demo's training batch and evaluation shapes, bit for bit
    (512, 20, 8, 128, True),
    (5, 7, 96, 16, False),  # a wide input: the in-loop matmul may round differently
])
def test_forward_without_a_gradient_equals_the_differentiated_forward(
        batch, steps, features, hidden, exact):
    """Evaluated alone, `fused_lstm` projects each step's input inside the loop; under a
    gradient it projects every step first. Both are the recurrence written out in numpy."""
    k = jax.random.split(jax.random.PRNGKey(batch + features), 4)
    x = jax.random.normal(k[0], (batch, steps, features))
    wi = 0.3 * jax.random.normal(k[1], (features, 4 * hidden))
    bias = 0.1 * jax.random.normal(k[2], (4 * hidden,))
    wh = 0.3 * jax.random.normal(k[3], (hidden, 4 * hidden))
    alone = jax.jit(fused_lstm)(x, wi, bias, wh)
    differentiated = jax.jit(lambda *a: jax.vjp(fused_lstm, *a)[0])(x, wi, bias, wh)
    if exact:
        np.testing.assert_array_equal(alone, differentiated)
    else:
        _close(alone, differentiated)

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    xs, wi64, b64, wh64 = (np.asarray(a, np.float64) for a in (x, wi, bias, wh))
    h = c = np.zeros((batch, hidden))
    for t in range(steps):  # gates in OptimizedLSTMCell's order: i, f, g, o
        i, f, g, o = np.split(xs[:, t] @ wi64 + b64 + h @ wh64, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        np.testing.assert_allclose(alone[:, t], h, rtol=1e-4, atol=1e-5)


def test_recurrence_gradient_equals_autodiff_in_float64():
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        xp = jax.random.normal(k[0], (7, 3, 20), jnp.float64)
        wh = 0.5 * jax.random.normal(k[1], (5, 20), jnp.float64)
        w = jax.random.normal(k[2], (7, 3, 5), jnp.float64)

        def plain(xp, wh):  # the same recurrence, differentiated by JAX
            def cell(carry, x):
                h, c = carry
                i, f, g, o = jnp.split(x + h @ wh, 4, axis=-1)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h
            zeros = jnp.zeros((3, 5), jnp.float64)
            return jax.lax.scan(cell, (zeros, zeros), xp)[1]

        ours = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(lstm_recurrence(a, b)) * w),
                                (0, 1)))(xp, wh)
        ref = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(plain(a, b)) * w), (0, 1)))(xp, wh)
        _close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda cell: StackOverflowLSTM(vocab_size=50, embed_dim=6, hidden=10, cell=cell),
    lambda cell: Sent140LSTM(vocab_size=40, embed_dim=6, hidden=7, num_layers=2, cell=cell),
])
def test_other_lstm_models_fused_equal_flax_cell(make):
    x = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 1, 40)
    fused, flax_cell = make("fused"), make("flax")
    params = fused.init(jax.random.PRNGKey(0), x)
    np.testing.assert_equal(jax.device_get(params),
                            jax.device_get(flax_cell.init(jax.random.PRNGKey(0), x)))
    _close(jax.jit(fused.apply)(params, x), jax.jit(flax_cell.apply)(params, x))
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x)))))(params)
             for m in (fused, flax_cell)]
    _close(*grads, rtol=1e-4, atol=1e-6)


def _numpy_lstm(x, wi, bias, wh):
    """The LSTM equations in float64 numpy, gates in the documented order i, f, g, o, zero
    initial state, no forget-gate offset (flax's OptimizedLSTMCell adds none)."""
    batch, steps, _ = x.shape
    hidden = wh.shape[0]
    h = c = np.zeros((batch, hidden))
    out = np.empty((batch, steps, hidden))
    for t in range(steps):
        z = x[:, t] @ wi + bias + h @ wh
        i, f, g, o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
        c = 1 / (1 + np.exp(-f)) * c + 1 / (1 + np.exp(-i)) * np.tanh(g)
        h = 1 / (1 + np.exp(-o)) * np.tanh(c)
        out[:, t] = h
    return out


@pytest.mark.parametrize("batch, steps, features, hidden", [(2, 4, 3, 3), (1, 1, 2, 2)])
def test_fused_lstm_values_and_all_gradients_match_numpy_finite_differences(
        batch, steps, features, hidden):
    """Both forwards (in-loop projection alone, one-matmul projection under a gradient) and the
    hand-written VJP's gradients for x, the input kernel, the bias and the recurrent kernel,
    in float64, against the equations in numpy and central finite differences of them."""
    rng = np.random.default_rng(batch * 10 + steps)
    args = [rng.normal(size=(batch, steps, features)),
            0.6 * rng.normal(size=(features, 4 * hidden)),
            0.4 * rng.normal(size=(4 * hidden,)),
            0.6 * rng.normal(size=(hidden, 4 * hidden))]
    weights = rng.normal(size=(batch, steps, hidden))
    with jax.enable_x64(True):
        jargs = [jnp.asarray(a, jnp.float64) for a in args]
        alone = jax.jit(fused_lstm)(*jargs)
        differentiated, vjp = jax.vjp(fused_lstm, *jargs)
        grads = vjp(jnp.asarray(np.cos(np.asarray(differentiated)) * weights))
    expected = _numpy_lstm(*args)
    np.testing.assert_allclose(alone, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(differentiated, expected, rtol=1e-12, atol=1e-13)

    def loss(values):
        return np.sum(np.sin(_numpy_lstm(*values)) * weights)

    eps = 1e-6
    for k, grad in enumerate(grads):
        numeric = np.zeros_like(args[k])
        for index in np.ndindex(args[k].shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[k][index] += eps
            down[k][index] -= eps
            numeric[index] = (loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"argument {k}")


def test_trailing_padding_changes_neither_the_loss_nor_the_gradient():
    """Variable-length sequences padded at the end (the loaders' layout) with pad labels: the
    fused model's masked loss and gradient on the padded batch equal flax's RNN run on each
    sequence cut to its real length, summed (no padding anywhere in the reference)."""
    from fedjax_sim.models import batch_statistics, create_model

    kwargs = dict(num_classes=13, input_dtype="int32", pad_label=0, hidden=6, num_layers=2)
    fused = create_model("char_lstm", input_shape=(7,), **kwargs)
    lengths = [2, 7, 2, 7]  # the reference runs each length once (a compilation per shape)
    rng = np.random.default_rng(0)
    x = np.zeros((4, 7), np.int32)
    y = np.zeros((4, 7), np.int32)
    for b, n in enumerate(lengths):
        x[b, :n] = rng.integers(1, 13, n)
        y[b, :n] = rng.integers(1, 13, n)
    params = fused.init(jax.random.PRNGKey(0))

    def summed(model, xs, ys):
        def f(p):
            s = batch_statistics(model, p, {"x": xs, "y": ys}, jnp.ones(len(xs), bool))
            return s["loss_sum"], s
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (loss, stats), grad = summed(fused, jnp.asarray(x), jnp.asarray(y))
    assert float(stats["count"]) == sum(lengths)
    ref_loss, ref_grad = 0.0, jax.tree.map(jnp.zeros_like, params)
    for n in sorted(set(lengths)):
        rows = [b for b, length in enumerate(lengths) if length == n]
        cut = create_model("char_lstm", input_shape=(n,), cell="flax", **kwargs)
        (l_b, _), g_b = summed(cut, jnp.asarray(x[rows, :n]), jnp.asarray(y[rows, :n]))
        ref_loss += float(l_b)
        ref_grad = jax.tree.map(jnp.add, ref_grad, g_b)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _close(grad, ref_grad, rtol=1e-4, atol=1e-6)
