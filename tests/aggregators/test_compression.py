"""Compression stages against numpy, scipy and the papers' closed forms.

Quantization (Suresh et al. 2017): unbiased (the mean over many draws is the input, within 5
standard errors of the exact per-coordinate variance ``step^2 f (1 - f)``), the variance equals
that closed form and stays under Theorems 2 and 3's bounds; the Hadamard transform equals
``x @ scipy.linalg.hadamard(n)`` and the rotation is orthogonal and inverted exactly. Top-k keeps
numpy's k largest magnitudes; error feedback (Stich et al. 2018) is replayed by a numpy loop and
keeps ``sum(sent) + residual == sum(inputs)`` per client; padding clients write nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_sim import aggregators as agg
from fedjax_sim.aggregators.compression import (
    index_bits,
    next_power_of_two,
    rotate,
    stochastic_quantize,
    unrotate,
    walsh_hadamard,
)


def _apply(stage, values, weights, key=0, client_ids=None, state=None):
    aggregator = agg.chain(stage, agg.sum(weighting="uniform"))
    if state is None:
        state = aggregator.init(jax.tree.map(lambda x: x[0], values))
    return jax.jit(aggregator.apply)(state, values, jnp.asarray(weights, jnp.float32),
                                     jax.random.key(key), client_ids=client_ids)


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_walsh_hadamard_is_scipy_hadamard(n):
    x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(walsh_hadamard)(jnp.asarray(x))),
                               x @ scipy.linalg.hadamard(n), rtol=1e-5, atol=1e-5)


def test_rotation_is_orthogonal_and_inverted():
    d = 13  # padded to 16
    n = next_power_of_two(d)
    assert n == 16
    signs = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], n).astype(np.float32))
    # the rotation's matrix, from the images of the basis vectors
    rotate_jit, unrotate_jit = jax.jit(rotate), jax.jit(unrotate, static_argnums=2)
    full = np.asarray(rotate_jit(jnp.eye(n, dtype=jnp.float32), signs))
    reference = scipy.linalg.hadamard(n) * np.asarray(signs)[None, :] / math.sqrt(n)
    np.testing.assert_allclose(full, reference.T, atol=1e-6)  # rows: H D e_i / sqrt(n)
    np.testing.assert_allclose(full @ full.T, np.eye(n), atol=1e-6)
    x = np.random.default_rng(1).normal(size=(4, d)).astype(np.float32)
    z = rotate_jit(jnp.asarray(x), signs)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=1), np.linalg.norm(x, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(unrotate_jit(z, signs, d)), x, atol=1e-5)


def _exact_variance(x, levels):
    """Per-coordinate variance of stochastic quantization of the vector x (numpy, float64)."""
    low, high = x.min(), x.max()
    step = (high - low) / (levels - 1)
    f = (x - low) / step - np.floor((x - low) / step)
    return step ** 2 * f * (1 - f)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_quantization_is_unbiased_with_the_closed_form_variance(bits):
    draws, d = 4000, 40
    x = np.random.default_rng(bits).normal(size=d).astype(np.float32)
    quantize = jax.jit(stochastic_quantize, static_argnums=1)
    decoded = np.asarray(quantize(jnp.tile(jnp.asarray(x), (draws, 1)), 2 ** bits,
                                  jax.random.key(bits)), np.float64)
    variance = _exact_variance(x.astype(np.float64), 2 ** bits)
    # unbiased: within 5 standard errors (plus float32 rounding) in every coordinate
    assert np.all(np.abs(decoded.mean(0) - x) <= 5 * np.sqrt(variance / draws) + 1e-5)
    # the total variance matches the closed form (relative standard error ~ sqrt(2 / draws))
    assert decoded.var(0).sum() == pytest.approx(variance.sum(), rel=0.1)
    # the decoded values are the 2^b levels between min and max
    levels = x.min() + np.arange(2 ** bits) * (x.max() - x.min()) / (2 ** bits - 1)
    assert np.all(np.min(np.abs(decoded[..., None] - levels), axis=-1) < 1e-5)


@pytest.mark.parametrize("bits", [2])
def test_quantize_stage_error_is_under_the_papers_bounds(bits):
    """Theorem 2 (no rotation) and Theorem 3 (rotation) bound E||x_hat - x||^2; on a spiky vector
    the rotation's error is far below the unrotated one's."""
    d, draws, k = 50, 400, 2 ** bits
    rng = np.random.default_rng(7)
    x = rng.normal(size=d).astype(np.float32) * 0.01
    x[3] = 5.0  # one large coordinate: the range is ~||x||
    values = {"w": jnp.tile(jnp.asarray(x), (draws, 1))}
    errors = {}
    for rotation in ("none", "hadamard"):
        stage = agg.quantize(bits, rotation)
        aggregator = agg.chain(stage, agg.sum())
        apply = jax.jit(aggregator.apply)
        sums = []
        for key in range(4):  # several rotations
            out, _, metrics = apply(((), ()), values, jnp.ones(draws), jax.random.key(key))
            sums.append(float(metrics[f"aggregator/{stage.name}/relative_error"]))
        errors[rotation] = np.mean(sums)  # E||x_hat - x||^2 / ||x||^2
        n = d if rotation == "none" else next_power_of_two(d)
        bits_sent = float(metrics[f"aggregator/{stage.name}/bits_per_client"])
        assert bits_sent == n * bits + 64
    n = next_power_of_two(d)
    assert errors["none"] <= d / (2 * (k - 1) ** 2)
    assert errors["hadamard"] <= (2 * math.log(n) + 2) / (k - 1) ** 2
    assert errors["hadamard"] < errors["none"] / 3
    # and the unrotated error equals the closed form (the relative MSE of the exact variance)
    expected = _exact_variance(x.astype(np.float64), k).sum() / np.sum(x.astype(np.float64) ** 2)
    assert errors["none"] == pytest.approx(expected, rel=0.1)


def test_quantize_with_rotation_is_unbiased_over_a_pytree():
    draws = 3000
    rng = np.random.default_rng(3)
    one = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=5)
           .astype(np.float32)}
    values = jax.tree.map(lambda x: jnp.tile(jnp.asarray(x)[None], (draws,) + (1,) * x.ndim),
                          one)
    out, _, _ = _apply(agg.quantize(2, "hadamard"), values, np.ones(draws))
    flat = np.concatenate([one["a"].ravel(), one["b"]])
    mean = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])]) / draws
    # per-client error variance <= (2 ln 16 + 2) / 9 ||x||^2 spread over 16 coordinates
    bound = (2 * math.log(16) + 2) / 9 * np.sum(flat ** 2) / 11
    assert np.all(np.abs(mean - flat) <= 5 * np.sqrt(bound / draws))


def _decode(stage, values, key=0):
    """The stage's decoded client values (no reducer: a sum of huge values would overflow)."""
    weights = jnp.ones(jax.tree.leaves(values)[0].shape[0])
    out, _, _, metrics, _ = jax.jit(stage.apply)((), values, weights, jax.random.key(key), {})
    return out, metrics


def test_quantize_of_a_range_past_float32_max_is_finite_and_unbiased():
    """max - min = 6e38 overflowed float32: the step was inf and every value NaN. Reference:
    numpy float64 (levels, the closed-form variance, its relative error)."""
    draws, bits = 4000, 2
    x = np.array([3e38, -3e38, 1e38, -2.5e38, 0.0, 5e37, 1.0], np.float32)
    decoded, metrics = _decode(agg.quantize(bits), {"w": jnp.tile(jnp.asarray(x), (draws, 1))})
    decoded = np.asarray(decoded["w"], np.float64)
    assert np.all(np.isfinite(decoded))
    x64 = x.astype(np.float64)
    levels = x64.min() + np.arange(2 ** bits) * (x64.max() - x64.min()) / (2 ** bits - 1)
    assert np.all(np.min(np.abs(decoded[..., None] - levels), axis=-1) <= 1e-6 * 3e38)
    variance = _exact_variance(x64, 2 ** bits)
    assert np.all(np.abs(decoded.mean(0) - x64) <= 5 * np.sqrt(variance / draws) + 1e-6 * 3e38)
    assert decoded.var(0).sum() == pytest.approx(variance.sum(), rel=0.1)
    assert float(metrics["relative_error"]) == pytest.approx(
        variance.sum() / np.sum(x64 ** 2), rel=0.1)


def test_quantize_with_rotation_of_huge_values_is_finite_and_unbiased():
    """Two entries of +-3e38 overflowed the rotation's first butterfly (a + b or a - b is
    6e38 whatever the signs): NaN. With 16 bits no estimate comes near float32's max, so the
    mean over draws must be the input (numpy float64) within 5 standard errors."""
    draws, bits = 2000, 16
    one = {"a": np.array([3e38, -3e38, 1e38], np.float32), "b": np.array([0.0, -7e37],
                                                                        np.float32)}
    values = jax.tree.map(lambda x: jnp.tile(jnp.asarray(x)[None], (draws, 1)), one)
    decoded, metrics = _decode(agg.quantize(bits, "hadamard"), values)
    got = np.concatenate([np.asarray(decoded["a"], np.float64),
                          np.asarray(decoded["b"], np.float64)], axis=1)
    flat = np.concatenate([one["a"], one["b"]]).astype(np.float64)
    assert np.all(np.isfinite(got))
    # each estimate's coordinate has variance <= step^2 / 4, step <= 2 ||x|| / (2^b - 1)
    step = 2 * np.linalg.norm(flat) / (2 ** bits - 1)
    assert np.all(np.abs(got.mean(0) - flat) <= 5 * step / 2 / np.sqrt(draws) + 1e-6 * 3e38)
    assert np.isfinite(float(metrics["relative_error"]))


def _numpy_top_k(v, k):
    out = np.zeros_like(v)
    for i, row in enumerate(v):
        keep = np.argsort(-np.abs(row), kind="stable")[:k]
        out[i, keep] = row[keep]
    return out


def test_top_k_keeps_numpys_largest_magnitudes_and_counts_bits():
    rng = np.random.default_rng(0)
    values = {"a": rng.normal(size=(4, 3, 2)).astype(np.float32),
              "b": rng.normal(size=(4, 5)).astype(np.float32)}
    flat = np.concatenate([values["a"].reshape(4, -1), values["b"]], axis=1)
    weights = np.array([1.0, 1.0, 1.0, 0.0])
    out, state, metrics = _apply(agg.top_k(3, error_feedback=False), values, weights)
    expected = (_numpy_top_k(flat, 3) * (weights > 0)[:, None]).sum(0)
    got = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert state == ((), ())
    # d = 11: an 11-bit bitmap is cheaper than 3 indices of 4 bits
    assert float(metrics["aggregator/top_k/bits_per_client"]) == 3 * 32 + 11
    assert index_bits(500, 1000) == 1000  # a bitmap when cheaper than indices


def test_error_feedback_replays_numpy_and_accumulates_what_was_dropped():
    rng = np.random.default_rng(1)
    num_clients, d, k = 6, 9, 2
    stage = agg.top_k(k, num_clients=num_clients)
    aggregator = agg.chain(stage, agg.sum(weighting="uniform"))
    state = aggregator.init({"w": jnp.zeros(d)})
    apply = jax.jit(aggregator.apply)
    residual = np.zeros((num_clients, d))
    inputs_sum, sent_sum = np.zeros((num_clients, d)), np.zeros((num_clients, d))
    for round_ in range(5):
        ids = rng.choice(num_clients, 3, replace=False)
        weights = np.array([1.0, 1.0, 0.0])  # the third is padding: it must write nothing
        x = rng.normal(size=(3, d)).astype(np.float32)
        out, state, _ = apply(state, {"w": jnp.asarray(x)}, jnp.asarray(weights),
                              jax.random.key(round_), client_ids=jnp.asarray(ids, jnp.int32))
        # numpy replay
        v = x + residual[ids]
        sent = _numpy_top_k(v, k)
        for row, client in enumerate(ids):
            if weights[row] > 0:
                residual[client] = v[row] - sent[row]
                inputs_sum[client] += x[row]
                sent_sum[client] += sent[row]
        np.testing.assert_allclose(np.asarray(out["w"]), (sent * weights[:, None]).sum(0),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(state[0]["residual"]), residual, atol=1e-5)
    # what was dropped is exactly what is kept: sum(sent) + residual == sum(inputs)
    np.testing.assert_allclose(sent_sum + np.asarray(state[0]["residual"]), inputs_sum,
                               atol=1e-5)


def test_residual_norm_is_numpys_mean_over_senders_and_survives_huge_residuals():
    # float64 reference: the mean L2 norm of the senders' residuals (top 1 of 3 kept); the
    # second client's residual holds 3e19, whose square overflows float32 (a plain norm: inf)
    x = np.array([[3.0, 1.0, 2.0], [5e19, 3e19, 1.0], [4.0, 9.0, 1.0], [7.0, 7.0, 7.0]],
                 np.float32)
    weights = np.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding: not counted
    ids = jnp.arange(4, dtype=jnp.int32)
    _, _, metrics = _apply(agg.top_k(1, num_clients=4), {"w": jnp.asarray(x)}, weights,
                           client_ids=ids)
    flat = x.astype(np.float64)
    residual = flat - _numpy_top_k(flat, 1)
    expected = np.linalg.norm(residual[:3], axis=1).mean()
    got = float(metrics["aggregator/top_k/residual_norm"])
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_random_k_keeps_k_coordinates_and_feeds_back_the_rest():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 20)).astype(np.float32)
    ids = jnp.arange(5, dtype=jnp.int32)
    out, state, metrics = _apply(agg.random_k(4, num_clients=5), {"w": jnp.asarray(x)},
                                 np.ones(5), client_ids=ids)
    residual = np.asarray(state[0]["residual"])
    sent = x - residual
    assert np.all((np.abs(sent) > 0).sum(1) == 4)
    np.testing.assert_allclose(sent[np.abs(sent) > 0], x[np.abs(sent) > 0])  # kept as is
    np.testing.assert_allclose(np.asarray(out["w"]), sent.sum(0), atol=1e-5)
    assert float(metrics["aggregator/random_k/bits_per_client"]) == 4 * 32 + 32
    # unbiased random-k: the mean over many draws is the input (scaled by d / k)
    draws = 4000
    tiled = {"w": jnp.tile(jnp.asarray(x[0]), (draws, 1))}
    out, _, _ = _apply(agg.random_k(4, error_feedback=False, unbiased=True), tiled,
                       np.ones(draws))
    std = np.sqrt(x[0].astype(np.float64) ** 2 * (20 / 4 - 1) / draws)  # per coordinate
    assert np.all(np.abs(np.asarray(out["w"]) / draws - x[0]) <= 5 * std + 1e-5)


def test_error_feedback_needs_num_clients_and_client_ids():
    with pytest.raises(ValueError, match="needs num_clients"):
        agg.top_k(3)
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        agg.top_k(3, fraction=0.1, num_clients=4)
    with pytest.raises(ValueError, match="client ids"):
        _apply(agg.top_k(2, num_clients=4), {"w": jnp.ones((2, 5))}, np.ones(2))
    # create_aggregator supplies num_clients (the loop passes the dataset's)
    with pytest.raises(ValueError, match=r"aggregator\[0\] \(top_k\).*num_clients"):
        agg.create_aggregator([{"name": "top_k", "fraction": 0.5}])
    aggregator = agg.create_aggregator([{"name": "top_k", "fraction": 0.5},
                                        {"name": "quantize", "bits": 2}], num_clients=7)
    state = aggregator.init({"w": jnp.zeros(4)})
    assert state[0]["residual"].shape == (7, 4)
    with pytest.raises(ValueError, match="rotation"):
        agg.quantize(2, "fourier")
