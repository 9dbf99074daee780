"""Simulated secure aggregation (Bonawitz et al. 2017) against numpy's modular integer sums.

The masked sum equals numpy's sum mod 2^k of the survivors' residues exactly (integer equality)
for every cohort size, masking graph and dropout pattern; the reducer's result equals the plain
sum of the quantized values exactly (values on the quantization lattice, so rounding is
deterministic), wraps and reports overflow, rounds without bias, and composes with distributed
and central Gaussian noise of the std DP prescribes.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim import aggregators as agg
from fedjax_sim.aggregators import masked_modular_sum, secure_mean, secure_sum


def test_masked_sum_is_numpys_modular_sum_exactly():
    rng = np.random.default_rng(0)
    apply = jax.jit(masked_modular_sum, static_argnums=(2, 4))
    # C = 1; C even (offset C/2 pairs each client once) and odd; a circulant graph of degree 2
    for num, neighbors, bits in [(1, None, 32), (6, None, 32), (5, None, 12), (7, 2, 20)]:
        residues = rng.integers(0, 2 ** bits, size=(num, 7), dtype=np.uint64).astype(np.uint32)
        for trial in range(3):
            survivors = rng.random(num) < (0.6 if trial else 1.1)
            total, stats = apply(jnp.asarray(residues), jnp.asarray(survivors), bits,
                                 jax.random.key(trial), neighbors)
            expected = residues[survivors].astype(np.uint64).sum(0) % 2 ** bits
            np.testing.assert_array_equal(np.asarray(total).astype(np.uint64), expected)
            assert int(stats["reconstructed_self_masks"]) == survivors.sum()
            if neighbors is None:  # one regenerated mask per (survivor, dropout) pair
                assert int(stats["reconstructed_pair_masks"]) == (survivors.sum()
                                                                  * (~survivors).sum())


def _lattice_values(rng, num, size, scale, span):
    """Values k / scale with integer k in [-span, span]: stochastic rounding is exact on them."""
    return (rng.integers(-span, span + 1, size=(num, size)) / scale).astype(np.float32)


@pytest.mark.parametrize(("bits", "neighbors"), [(32, None), (12, 2)])
def test_secure_sum_equals_the_plain_quantized_sum_exactly(bits, neighbors):
    rng = np.random.default_rng(0)
    scale = 64.0
    x = _lattice_values(rng, 6, 11, scale, 30)
    weights = np.array([1.0, 3.0, 0.0, 1.0, 2.0, 1.0], np.float32)  # client 2: a dropout
    stage = secure_sum(bits, scale=scale, neighbors=neighbors)
    aggregator = agg.chain(stage)
    out, _, metrics = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(11)}),
                                                {"w": jnp.asarray(x)}, jnp.asarray(weights),
                                                jax.random.key(1))
    integers = np.round(x * scale).astype(np.int64)
    expected = integers[weights > 0].sum(0)
    np.testing.assert_array_equal(np.asarray(out["w"]) * scale, expected)  # exact
    assert float(metrics["aggregator/secure_sum/overflow"]) == 0.0
    assert float(metrics["aggregator/secure_sum/survivors"]) == 5
    assert float(metrics["aggregator/secure_sum/bits_per_client"]) == 11 * bits
    degree = 5 if neighbors is None else 2
    assert float(metrics["aggregator/secure_sum/overhead_upload_bits_per_client"]) == (
        512 + 768 * degree)


def test_random_dropouts_are_recovered_exactly():
    rng = np.random.default_rng(1)
    scale = 16.0
    x = _lattice_values(rng, 7, 5, scale, 100)
    integers = np.round(x * scale).astype(np.int64)
    aggregator = agg.chain(secure_sum(16, scale=scale, dropout=0.4))
    apply = jax.jit(aggregator.apply)
    state = aggregator.init({"w": jnp.zeros(5)})
    seen_dropouts = 0
    for key in range(4):
        out, _, metrics = apply(state, {"w": jnp.asarray(x)}, jnp.ones(7), jax.random.key(key))
        survivors = int(metrics["aggregator/secure_sum/survivors"])
        seen_dropouts += 7 - survivors
        got = np.asarray(out["w"]) * scale
        # the result is exactly the sum over some subset of that many clients
        matches = [s for s in itertools.combinations(range(7), survivors)
                   if np.array_equal(integers[list(s)].sum(0), got)]
        assert matches, f"key {key}: no subset of {survivors} clients sums to {got}"
    assert seen_dropouts > 0


def test_overflow_wraps_and_is_reported():
    x = np.full((3, 4), 100.0, np.float32)
    x[:, 0] = [10.0, -20.0, 5.0]
    aggregator = agg.chain(secure_sum(8, scale=1.0))
    out, _, metrics = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(4)}),
                                       {"w": jnp.asarray(x)}, jnp.ones(3), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out["w"]), [-5.0, 300 - 256, 44.0, 44.0])
    assert float(metrics["aggregator/secure_sum/overflow"]) == 1.0
    assert float(metrics["aggregator/secure_sum/overflow_fraction"]) == 0.75
    # the automatic scale leaves room for C clients at the clip bound: no overflow
    aggregator = agg.chain(secure_sum(8, clip=100.0))
    out, _, metrics = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(4)}),
                                                {"w": jnp.asarray(x)}, jnp.ones(3),
                                                jax.random.key(0))
    assert float(metrics["aggregator/secure_sum/overflow"]) == 0.0
    scale = float(metrics["aggregator/secure_sum/scale"])
    assert scale == pytest.approx((128 - 1 - 3) / (3 * 100.0))
    # each client's rounding moves the sum by less than one step
    np.testing.assert_allclose(np.asarray(out["w"]), x.sum(0), atol=3 / scale)
    with pytest.raises(ValueError, match="set scale="):
        jax.eval_shape(agg.chain(secure_sum(16)).apply, ({"dropout": jnp.zeros(())},),
                       {"w": jnp.ones((2, 3))}, jnp.ones(2), jax.random.key(0))


def test_stochastic_rounding_is_unbiased():
    draws, scale = 2000, 4.0
    x = np.random.default_rng(2).normal(size=30).astype(np.float32)
    aggregator = agg.chain(secure_mean(24, scale=scale, neighbors=2))
    out, _, _ = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(30)}),
                                          {"w": jnp.tile(jnp.asarray(x), (draws, 1))},
                                          jnp.ones(draws), jax.random.key(3))
    f = x * scale - np.floor(x * scale)
    std = np.sqrt(f * (1 - f) / draws) / scale  # of the mean of draws roundings
    assert np.all(np.abs(np.asarray(out["w"]) - x) <= 5 * std + 1e-6)


@pytest.mark.parametrize("noise", ["gaussian", "skellam"])
def test_distributed_noise_has_the_dp_std(noise):
    """Each of m clients adds 1/m of (z C)^2: the sum of m survivors carries std z C."""
    clients, size, z, clip_norm = 5, 20000, 0.7, 2.0
    aggregator = agg.chain(agg.clip(clip_norm),
                           secure_sum(24, scale=64.0, noise_multiplier=z,
                                      expected_clients=clients, noise=noise))
    out, _, metrics = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(size)}),
                                                {"w": jnp.zeros((clients, size))},
                                                jnp.ones(clients), jax.random.key(4))
    sigma = z * clip_norm
    assert float(np.std(np.asarray(out["w"]))) == pytest.approx(sigma, rel=0.03)
    assert float(metrics["aggregator/secure_sum/noise_stddev"]) == pytest.approx(sigma)
    assert {k: float(v) for k, v in aggregator.noise_multipliers(
        aggregator.init({"w": jnp.zeros(size)})).items()} == {"secure_sum/update":
                                                              pytest.approx(z)}


def test_clip_secure_sum_then_central_noise():
    """clip -> quantize + secure sum -> Gaussian noise: noise std z C on the sum."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 5000)).astype(np.float32)
    aggregator = agg.chain(agg.clip(1.0), secure_mean(32, denominator=4.0),
                           agg.gaussian_noise(2.0))
    state = aggregator.init({"w": jnp.zeros(5000)})
    out, _, metrics = jax.jit(aggregator.apply)(state, {"w": jnp.asarray(x)}, jnp.ones(4),
                                                jax.random.key(6))
    clipped = x / np.linalg.norm(x, axis=1, keepdims=True)
    noise = np.asarray(out["w"]) - clipped.sum(0) / 4.0
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(2.0 / 4.0)
    assert float(np.std(noise)) == pytest.approx(0.5, rel=0.05)
    assert float(metrics["aggregator/secure_mean/overflow"]) == 0.0


def test_weighted_secure_mean_is_the_weighted_mean_of_the_quantized_values():
    rng = np.random.default_rng(7)
    scale = 32.0
    x = _lattice_values(rng, 5, 6, scale, 40)
    weights = np.array([2.0, 0.0, 1.0, 3.0, 1.0], np.float32)  # integer weights: on the lattice
    aggregator = agg.chain(secure_mean(32, scale=scale, weighting="given"))
    out, _, _ = jax.jit(aggregator.apply)(aggregator.init({"w": jnp.zeros(6)}),
                                          {"w": jnp.asarray(x)}, jnp.asarray(weights),
                                          jax.random.key(8))
    integers = np.round(x * scale).astype(np.int64)
    expected = (weights[:, None].astype(np.int64) * integers).sum(0) / scale / weights.sum()
    np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-6)


def test_device_padding_takes_no_part_in_the_protocol():
    """A cohort of 3 over 2 devices is padded with a zero-weight row; secure aggregation
    leaves it out, so the round equals the one-device round (8 devices = 1 device): the same
    protocol metrics (overheads, reconstructed masks, scale) and the same model."""
    from helpers import tiny_data, tiny_model

    from fedjax_sim.algorithms.fed_avg import fed_avg
    from fedjax_sim.data.batching import ClientSchedule
    from fedjax_sim.data.sampling import uniform_sampler
    from fedjax_sim.sharding import client_mesh
    from fedjax_sim.simulation.backend import Backend
    from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

    data = tiny_data(sizes=(5, 17, 40, 3, 11, 9))
    model = tiny_model()
    aggregator = agg.chain(agg.clip(1.0), agg.secure_mean(16, dropout=0.3))

    def rounds(backend):
        algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0), aggregator=aggregator)
        schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
        step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 3),
                                3, backend=backend)
        state = step.place(init_simulation_state(
            algorithm.init(model.init(jax.random.PRNGKey(0))), 1))
        history = []
        for _ in range(3):
            state, metrics = step(state)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()
                            if k.startswith("aggregator/secure_mean/")})
        return jax.device_get(state.algorithm.params), history

    params, history = rounds(Backend())
    padded_params, padded_history = rounds(Backend(client_mesh(2), "vmap"))
    assert history[0]["aggregator/secure_mean/overhead_upload_bits_per_client"] == (
        2 * 256 + 2 * 2 * 256 + 2 * 256)  # 2 neighbours: 3 clients, not 4 slots
    for one, two in zip(history, padded_history, strict=True):
        assert one == pytest.approx(two, rel=1e-6, abs=0)
    for a, b in zip(jax.tree.leaves(padded_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_noise_after_a_secure_mean_of_no_survivors_is_finite():
    """clip -> secure_mean (realised denominator) -> gaussian_noise(z): with every client
    dropped the mean is 0 and no noise is scaled by 1 / tiny; with survivors the std is z C / n
    (n survivors, uniform weighting)."""
    d, z, c = 20, 1.5, 2.0
    aggregator = agg.chain(agg.clip(c), secure_mean(32), agg.gaussian_noise(z))
    values = {"a": jnp.ones((4, d))}
    state = aggregator.init({"a": jnp.zeros(d)})
    apply = jax.jit(aggregator.apply)
    out, _, metrics = apply(state, values, jnp.zeros(4), jax.random.PRNGKey(0))
    assert np.all(np.isfinite(np.asarray(out["a"])))
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == 0.0
    _, _, metrics = apply(state, values, jnp.asarray([0.0, 1.0, 1.0, 0.0]),
                          jax.random.PRNGKey(0))
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(z * c / 2)
