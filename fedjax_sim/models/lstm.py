"""An LSTM layer whose gradient is cheap on CPU: `FusedLSTM` = ``nn.RNN(nn.OptimizedLSTMCell)``.

Same parameters (names, shapes, initializers: a checkpoint or an init of one is one of the
other), same outputs; two things differ in how it computes:

* under a gradient, the input projection of every time step is one matmul before the
  recurrence (the scan only adds ``h @ W_h``); evaluated without one, each step's projection
  runs inside the loop instead, so no ``[T, B, 4H]`` array is written (at evaluation batches
  that array's memory traffic cost more than the recurrence: `benchmarks/lstm_eval.py`);
* the recurrence has a hand-written VJP (`lstm_recurrence`): the reverse scan returns each
  step's gate gradients, and the recurrent kernel's gradient is **one** matmul over all steps
  afterwards. Under autodiff the reverse scan instead adds an outer product into a
  ``[H, 4H]`` accumulator at every step, which on XLA:CPU costs as much as the rest of the
  backward pass (`benchmarks/lstm_recurrence.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.recurrent import DenseParams

GATES = "ifgo"  # input, forget, cell candidate, output: OptimizedLSTMCell's order


def _cell(wh, carry, xp_t):
    h, c = carry
    i, f, g, o = jnp.split(xp_t + h @ wh, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    return (h_new, c_new), (h_new, (i, f, g, o, c, c_new, h))


def _forward(xp, wh):
    zeros = jnp.zeros_like(xp[0, ..., :wh.shape[0]])  # varying where xp is, under shard_map
    _, (hs, saved) = jax.lax.scan(lambda carry, x: _cell(wh, carry, x), (zeros, zeros), xp)
    return hs, (saved, wh)


@jax.custom_vjp
def lstm_recurrence(xp: jax.Array, wh: jax.Array) -> jax.Array:
    """The LSTM recurrence from zero state: ``xp [T, B, 4H]`` (input projections plus bias,
    gates in ``GATES`` order) and ``wh [H, 4H]`` -> hidden states ``[T, B, H]``."""
    return _forward(xp, wh)[0]


def _backward(residuals, dhs):
    (i, f, g, o, c_prev, c, h_prev), wh = residuals

    def step(carry, t):
        dh_next, dc_next = carry
        it, ft, gt, ot, cpt, ct, dht = t
        dh = dht + dh_next
        tc = jnp.tanh(ct)
        dc = dc_next + dh * ot * (1 - tc * tc)
        dgates = jnp.concatenate([dc * gt * it * (1 - it), dc * cpt * ft * (1 - ft),
                                  dc * it * (1 - gt * gt), dh * tc * ot * (1 - ot)], axis=-1)
        return (dgates @ wh.T, dc * ft), dgates

    zeros = jnp.zeros_like(dhs[0])
    _, dgates = jax.lax.scan(step, (zeros, zeros), (i, f, g, o, c_prev, c, dhs), reverse=True)
    return dgates, jnp.einsum("tbh,tbg->hg", h_prev, dgates)


lstm_recurrence.defvjp(_forward, _backward)


class LSTMParams(nn.Module):
    """``OptimizedLSTMCell``'s parameters (``ii``... ``ho``), concatenated per gate set."""

    hidden: int

    @nn.compact
    def __call__(self, in_features: int):
        reference = nn.OptimizedLSTMCell(self.hidden, parent=None)
        inputs, kernels, biases = [], [], []
        for gate in GATES:
            kernel, _ = DenseParams(self.hidden, use_bias=False, kernel_init=reference.kernel_init,
                                    bias_init=reference.bias_init, name=f"i{gate}")(
                jnp.zeros((1, in_features)))
            inputs.append(kernel)
            kernel, bias = DenseParams(self.hidden, use_bias=True,
                                       kernel_init=reference.recurrent_kernel_init,
                                       bias_init=reference.bias_init, name=f"h{gate}")(
                jnp.zeros((1, self.hidden)))
            kernels.append(kernel)
            biases.append(bias)
        return (jnp.concatenate(inputs, -1), jnp.concatenate(biases, -1),
                jnp.concatenate(kernels, -1))


class FusedLSTM(nn.Module):
    """``[B, T, F] -> [B, T, hidden]``: ``nn.RNN(nn.OptimizedLSTMCell(hidden))``, faster."""

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fused_lstm(x, *LSTMParams(self.hidden, name="cell")(x.shape[-1]))


def _projection(x, wi):
    """Every step's input projection at once: ``[B, T, F] @ [F, 4H] -> [T, B, 4H]``."""
    return jnp.einsum("btf,fg->tbg", x, wi)


def _inference(x, wi, bias, wh):
    """The forward alone, each step's input projection inside the loop: no ``[T, B, 4H]``
    array, which at evaluation batches (512 sequences of 80 steps: 84 MB) costs more in memory
    traffic than the recurrence. The values of the differentiated forward: bit for bit at the
    demo's shapes, within float32 rounding for a wide input (tests/models/test_lstm.py)."""
    xt = jnp.swapaxes(x, 0, 1)  # [T, B, F]
    zeros = jnp.zeros_like((xt[0] @ wi)[..., :wh.shape[0]])  # varying as x is, under shard_map

    def step(carry, x_t):
        carry, _ = _cell(wh, carry, x_t @ wi + bias)
        return carry, carry[0]

    return jax.lax.scan(step, (zeros, zeros), xt)[1]


@jax.custom_vjp
def _fused_time_major(x, wi, bias, wh):
    return _inference(x, wi, bias, wh)


def _fused_fwd(x, wi, bias, wh):
    hs, residuals = _forward(_projection(x, wi) + bias, wh)
    return hs, (residuals, x, wi)


def _fused_bwd(residuals, dhs):
    recurrence, x, wi = residuals
    dxp, dwh = _backward(recurrence, dhs)
    dx, dwi = jax.vjp(_projection, x, wi)[1](dxp)
    return dx, dwi, jnp.sum(dxp, axis=(0, 1)), dwh


_fused_time_major.defvjp(_fused_fwd, _fused_bwd)


def fused_lstm(x: jax.Array, wi: jax.Array, bias: jax.Array, wh: jax.Array) -> jax.Array:
    """``[B, T, F] -> [B, T, H]`` with `LSTMParams`' concatenated kernels.

    Differentiated, every step's input projection is one matmul before the recurrence and the
    gradients are those of autodiff through it and `lstm_recurrence`, bit for bit; evaluated
    without a gradient, the projection runs inside the loop (`_inference`)."""
    return jnp.swapaxes(_fused_time_major(x, wi, bias, wh), 0, 1)


CELLS = ("fused", "flax")


def check_num_layers(num_layers: int) -> None:
    """Rejects a stack of fewer than one LSTM layer (``range`` of 0 or less builds a model
    without its LSTM and no error)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: expected an integer >= 1")


def lstm_layer(h: jax.Array, hidden: int, layer: int, cell: str = "fused") -> jax.Array:
    """One LSTM layer ``[B, T, F] -> [B, T, hidden]`` inside a compact module's ``__call__``.

    ``cell="fused"``: `fused_lstm` on parameters named ``OptimizedLSTMCell_<layer>``, the names
    ``nn.RNN(nn.OptimizedLSTMCell(hidden))`` gets there, so both cells share parameters;
    ``"flax"``: flax's RNN itself.
    """
    if cell not in CELLS:
        raise ValueError(f"cell={cell!r}: expected one of {CELLS}")
    if cell == "flax":
        return nn.RNN(nn.OptimizedLSTMCell(hidden))(h)
    return fused_lstm(h, *LSTMParams(hidden, name=f"OptimizedLSTMCell_{layer}")(h.shape[-1]))
