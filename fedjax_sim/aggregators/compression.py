"""Compression of the clients' messages: stochastic quantization and sparsification.

Each stage is a client `Stage`: it encodes every client's whole message (all leaves as one
vector of d float32 coordinates), and the values leaving it are what the server decodes, so
any reducer after it sees exactly what would cross the network. Each reports
``bits_per_client`` (one participating client's encoded message, honestly counted: values,
ranges, indices) and ``compression_ratio`` (32 d / bits).

* `quantize`: stochastic uniform quantization to b bits per coordinate (2^b levels between the
  client's own min and max, randomized rounding: unbiased), optionally after a randomized
  Hadamard rotation, Suresh, Yu, Kumar and McMahan 2017, "Distributed Mean Estimation with
  Limited Communication", arXiv:1611.00429 (pi_sk and pi_srk). Per client,

    E ||x_hat - x||^2 <= d / (2 (k-1)^2) ||x||^2                 (no rotation, Theorem 2)
    E ||x_hat - x||^2 <= (2 ln d + 2) / (k-1)^2 ||x||^2          (rotation, Theorem 3)

  with k = 2^b levels; the rotation x -> H D x / sqrt(d) (D: random signs from a seed shared by
  all clients of a round, H: Walsh-Hadamard, d padded to a power of two) spreads a spiky vector
  so that its range shrinks from O(||x||) to O(||x|| sqrt(log d / d)).
* `top_k` / `random_k`: keep k coordinates of each message (the largest in magnitude, or k at
  random), with error feedback: what a client did not send is kept in a per-client residual
  and added to its next message (Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with
  Memory", arXiv:1809.07599; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other
  Gradient Compression Schemes", arXiv:1901.09847). The residuals are a ``[num_clients, d]``
  store in the stage state, gathered and scattered by ``context["client_ids"]`` (clients with
  weight 0 write nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.base import CLIENT, Stage, client_norms, participating
from fedjax_sim.algorithms.client_state import (
    gather_client_state,
    init_client_state,
    scatter_client_state,
)

PyTree = object

FLOAT_BITS = 32  # an uncompressed coordinate, a min/max, a value kept by top-k
SEED_BITS = 32   # a shared seed (random-k's indices)


# --- flattening ---------------------------------------------------------------------------------

def flatten_clients(values: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """``values`` (leaves ``[C, ...]``) as ``[C, d]`` float32, and the inverse map."""
    leaves, treedef = jax.tree.flatten(values)
    num_clients = leaves[0].shape[0]
    shapes = [x.shape[1:] for x in leaves]
    dtypes = [x.dtype for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    flat = jnp.concatenate([x.reshape(num_clients, -1).astype(jnp.float32) for x in leaves],
                           axis=1)

    def unflatten(vectors: jax.Array) -> PyTree:
        parts, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
            parts.append(vectors[:, start:start + size].reshape((-1, *shape)).astype(dtype))
            start += size
        return jax.tree.unflatten(treedef, parts)

    return flat, unflatten


def message_size(example: PyTree) -> int:
    """d: the number of coordinates of one client's message (``example``: no client axis)."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(example))


# --- the randomized Hadamard rotation -----------------------------------------------------------

def next_power_of_two(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


def walsh_hadamard(x: jax.Array) -> jax.Array:
    """``x @ H`` over the last axis (length 2^m), H the Sylvester-Hadamard matrix (entries +-1).

    The fast transform: m butterfly passes of O(2^m) each. ``H @ H = 2^m I``, so
    ``walsh_hadamard(x) / sqrt(2^m)`` is orthogonal and its own inverse.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"walsh_hadamard: the last axis must be a power of two, got {n}")
    batch = x.shape[:-1]
    h = 1
    while h < n:  # H_2n = H_2 (x) H_n: one H_2 butterfly per bit of the index
        y = x.reshape((*batch, n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape((*batch, n))
        h *= 2
    return x


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """``[n]`` float32 +-1 (the diagonal D of the rotation)."""
    return jax.random.rademacher(key, (n,), jnp.float32)


def rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
    """``[C, d] -> [C, n]``: zero-pad to n = len(signs) (a power of two), ``H D x / sqrt(n)``."""
    n = signs.shape[0]
    padded = jnp.pad(x, ((0, 0), (0, n - x.shape[1])))
    return walsh_hadamard(padded * signs) / jnp.sqrt(jnp.float32(n))


def unrotate(z: jax.Array, signs: jax.Array, d: int) -> jax.Array:
    """The inverse of `rotate`: ``D H z / sqrt(n)``, cut back to d coordinates."""
    n = signs.shape[0]
    return (walsh_hadamard(z) / jnp.sqrt(jnp.float32(n)) * signs)[:, :d]


# --- quantization -------------------------------------------------------------------------------

def stochastic_quantize(x: jax.Array, levels: int, key: jax.Array) -> jax.Array:
    """Each row of ``x [C, n]`` on ``levels`` equally spaced points between its min and max,
    rounded up with probability equal to the remainder (unbiased); returns the decoded values.

    A coordinate at distance ``f * step`` above a level (0 <= f < 1) becomes the level above
    with probability f: mean x, variance ``step^2 f (1 - f) <= step^2 / 4``.
    """
    low = jnp.min(x, axis=1, keepdims=True)
    high = jnp.max(x, axis=1, keepdims=True)
    step = (high - low) / (levels - 1)
    safe = jnp.where(step > 0, step, 1.0)
    position = (x - low) / safe
    floor = jnp.floor(position)
    up = jax.random.uniform(key, x.shape) < position - floor
    index = jnp.clip(floor + up.astype(x.dtype), 0, levels - 1)
    return jnp.where(step > 0, low + index * step, x)


def quantize(bits: int, rotation: str = "none") -> Stage:
    """Stochastic uniform quantization of each client's message to ``bits`` bits a coordinate.

    Args:
      bits: b in [1, 16]: 2^b levels between the client's min and max (b = 1: the two ends).
      rotation: ``"none"`` or ``"hadamard"``: quantize ``H D x / sqrt(n)`` (n = d padded to a
        power of two; D random signs from the stage key, one draw shared by the round's
        clients) and rotate the decoded vector back.

    Returns:
      A client `Stage` (stateless); the values leaving it are the decoded estimates (unbiased).
      A client whose values would overflow float32 on the way (a range past ~3.4e38, or huge
      rotated sums) is quantized divided by a power of two and scaled back: still unbiased,
      except that a rotated estimate beyond float32's max is cut to it.
      Metrics: ``bits_per_client`` (n b + 64: the levels and the two float32 ends),
      ``compression_ratio`` (32 d / bits) and ``relative_error`` (the participating clients'
      mean ``||x_hat - x||^2 / ||x||^2``).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"quantize: bits must be an int in [1, 16], got {bits!r}")
    if rotation not in ("none", "hadamard"):
        raise ValueError(f"quantize: rotation={rotation!r}: expected 'none' or 'hadamard'")
    levels = 2 ** bits

    def apply(state, values, weights, key, context):
        flat, unflatten = flatten_clients(values)
        d = flat.shape[1]
        rotation_key, rounding_key = jax.random.split(key)
        sent = next_power_of_two(d) if rotation == "hadamard" else d
        # A client whose values are so large that the range (max - min), the rotation's sums
        # or the decoded estimate would overflow float32 is quantized divided by a power of
        # two s (exact) and multiplied back: unbiased as before; s = 1 for every other client.
        scale = _overflow_scale(flat, sent if rotation == "hadamard" else 1)
        scaled = flat / scale
        if rotation == "hadamard":
            signs = random_signs(rotation_key, sent)
            decoded = unrotate(stochastic_quantize(rotate(scaled, signs), levels, rounding_key),
                               signs, d)
        else:
            decoded = stochastic_quantize(scaled, levels, rounding_key)
        message_bits = sent * bits + 2 * FLOAT_BITS
        metrics = {
            "bits_per_client": jnp.float32(message_bits),
            "compression_ratio": jnp.float32(FLOAT_BITS * d / message_bits),
            "relative_error": _mean_relative_error(decoded, scaled, weights),
        }
        # a rotated estimate past float32's max (|x_hat| can reach n max|x|) is cut to it;
        # inf or nan from a non-finite input stays
        big = jnp.finfo(jnp.float32).max
        decoded = jnp.where(jnp.isfinite(decoded), jnp.clip(decoded * scale, -big, big),
                            decoded)
        return unflatten(decoded), weights, state, metrics, context

    name = "quantize" if rotation == "none" else "quantize_hadamard"
    return Stage(CLIENT, _no_state, apply, name)


def _no_state(example):
    del example
    return ()


def _overflow_scale(flat: jax.Array, n: int) -> jax.Array:
    """``[C, 1]`` powers of two: 1 for a row whose quantization (of n rotated coordinates;
    n = 1 without rotation) cannot overflow float32, else the least s with ``max|x| / s`` at
    most ``max / (4 n^1.5)``: then the range (<= 2 sqrt(n) max|x|), the rotation's butterfly
    sums (<= n max|x|) and the inverse rotation's (<= n^1.5 max|x|) all stay finite."""
    limit = float(np.finfo(np.float32).max) / (4.0 * n ** 1.5)
    peak = jnp.max(jnp.abs(flat), axis=1, keepdims=True, initial=0.0)
    _, exponent = jnp.frexp(peak / limit)  # peak / limit = m 2^e, m in [0.5, 1)
    large = jnp.isfinite(peak) & (peak > limit)
    return jnp.where(large, jnp.ldexp(jnp.ones_like(peak), exponent), 1.0)


def _mean_relative_error(decoded: jax.Array, flat: jax.Array, weights: jax.Array) -> jax.Array:
    sending = participating(weights).astype(jnp.float32)
    error = jnp.sum(jnp.square(decoded - flat), axis=1)
    norm = jnp.maximum(jnp.sum(jnp.square(flat), axis=1), jnp.finfo(jnp.float32).tiny)
    ratio = error / norm
    # squares past float32 (a client of huge values): the same ratio from overflow-safe norms
    safe = jnp.square(client_norms(decoded - flat) / jnp.maximum(client_norms(flat),
                                                                 jnp.finfo(jnp.float32).tiny))
    ratio = jnp.where(jnp.isinf(error) | jnp.isinf(norm), safe, ratio)
    return jnp.sum(sending * ratio) / jnp.maximum(jnp.sum(sending), 1.0)


# --- sparsification with error feedback ---------------------------------------------------------

def index_bits(k: int, d: int) -> int:
    """Bits for the positions of k of d coordinates: k indices of ceil(log2 d) bits, or a
    d-bit bitmap when that is smaller."""
    return min(k * max(1, math.ceil(math.log2(d))), d)


def _resolve_k(k: int | None, fraction: float | None, d: int, name: str) -> int:
    if k is not None:
        return min(int(k), d)
    return max(1, min(d, math.ceil(float(fraction) * d)))


def _sparsifier(name: str, select: str, k: int | None, fraction: float | None,
                error_feedback: bool, num_clients: int | None, unbiased: bool = False) -> Stage:
    if (k is None) == (fraction is None):
        raise ValueError(f"{name}: set exactly one of k and fraction")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{name}: k must be an int >= 1, got {k!r}")
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name}: fraction must be in (0, 1], got {fraction!r}")
    if error_feedback:
        if num_clients is None:
            raise ValueError(
                f"{name}(error_feedback=True) needs num_clients (the population size, for the "
                f"per-client residual store): pass {name}(..., num_clients=N), or build it with "
                f"create_aggregator(specs, num_clients=N) (configs do this from the dataset)")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"{name}: num_clients must be an int >= 1, got {num_clients!r}")

    def init(example):
        if not error_feedback:
            return ()
        return {"residual": init_client_state(jnp.zeros(message_size(example), jnp.float32),
                                              num_clients)}

    def apply(state, values, weights, key, context):
        flat, unflatten = flatten_clients(values)
        num, d = flat.shape
        kept = _resolve_k(k, fraction, d, name)
        if error_feedback:
            if "client_ids" not in context:
                raise ValueError(
                    f"{name}(error_feedback=True) needs the cohort's client ids: call "
                    f"aggregator.apply(state, values, weights, key, client_ids=ids)")
            ids = context["client_ids"]
            flat = flat + gather_client_state(state["residual"], ids)
        if select == "top":
            _, index = jax.lax.top_k(jnp.abs(flat), kept)
        else:  # k uniformly random coordinates per client: the top k of uniform scores
            _, index = jax.lax.top_k(jax.random.uniform(key, flat.shape), kept)
        rows = jnp.arange(num)[:, None]
        mask = jnp.zeros(flat.shape, bool).at[rows, index].set(True)
        sent = jnp.where(mask, flat, 0.0)
        if unbiased:
            sent = sent * (d / kept)
        metrics = {}
        if error_feedback:
            residual = flat - jnp.where(mask, flat, 0.0)
            # a row whose client has weight 0 (padding, dropped) is not written
            state = {"residual": scatter_client_state(state["residual"], ids, residual,
                                                      participating(weights))}
            sending = participating(weights)
            # overflow-safe norms (a plain sum of squares is inf past ~1.8e19 an entry); a
            # row that does not send counts 0 even when its norm is inf
            norms = jnp.where(sending, client_norms(residual), 0.0)
            metrics["residual_norm"] = (jnp.sum(norms)
                                        / jnp.maximum(jnp.sum(sending.astype(jnp.float32)), 1.0))
        positions = SEED_BITS if select == "random" else index_bits(kept, d)
        message_bits = kept * FLOAT_BITS + positions
        metrics["bits_per_client"] = jnp.float32(message_bits)
        metrics["compression_ratio"] = jnp.float32(FLOAT_BITS * d / message_bits)
        return unflatten(sent), weights, state, metrics, context

    return Stage(CLIENT, init, apply, name)


def top_k(k: int | None = None, *, fraction: float | None = None, error_feedback: bool = True,
          num_clients: int | None = None) -> Stage:
    """Keeps each client's k largest-magnitude coordinates (the rest are sent as zeros).

    Args:
      k: coordinates kept per client (of the whole message); or
      fraction: k = ceil(fraction * d).
      error_feedback: add each client's residual (what it did not send before) to its message
        and keep the new residual ``(x + e) - top_k(x + e)`` (Stich et al. 2018).
      num_clients: the population size (the residual store's rows); needed with error
        feedback. `create_aggregator` fills it in from the dataset.

    Returns:
      A client `Stage`; state ``{"residual": [num_clients, d]}`` with error feedback. Metrics:
      ``bits_per_client`` (32 k for the values + `index_bits` for the positions),
      ``compression_ratio``, ``residual_norm`` (with error feedback).
    """
    return _sparsifier("top_k", "top", k, fraction, error_feedback, num_clients)


def random_k(k: int | None = None, *, fraction: float | None = None,
             error_feedback: bool = True, unbiased: bool = False,
             num_clients: int | None = None) -> Stage:
    """Keeps k uniformly random coordinates of each client's message.

    The positions come from the stage key, a seed the server shares, so they cost 32 bits.
    ``unbiased=True`` scales the kept values by d / k (an unbiased estimate; meant without
    error feedback). Other arguments as `top_k`.
    """
    return _sparsifier("random_k", "random", k, fraction, error_feedback, num_clients,
                       unbiased)
