"""DP sums, means, histograms and quantiles against numpy, unbiasedness, and epsilon against
dp-accounting called directly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from helpers import SHARED_DATA, needs_shared_data

from fedjax_sim.analytics import (
    adaptive_quantiles,
    client_histograms,
    dp_histogram,
    dp_mean,
    dp_quantiles,
    dp_sum,
    exact_quantiles,
    gaussian_epsilon,
    noise_for_epsilon,
    private_mean,
)
from fedjax_sim.analytics.sources import shakespeare_roles
from fedjax_sim.federated import (
    CLIENTS,
    FederatedType,
    at_clients,
    federated_computation,
    federated_mean,
)

KEY = jax.random.PRNGKey(0)
PLAYS = "shakespeare/SOURCES.tsv"
LEVELS = [0.05, 0.25, 0.5, 0.75, 0.99, 1.0]


def rdp_epsilon(z, count, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), count)
    return accountant.get_epsilon(delta)


def clipped_rows(x, c):  # independent of the clip stage: row by row
    return np.stack([row * min(1.0, c / np.linalg.norm(row)) for row in x])


def test_sum_and_mean_without_noise_equal_numpy():
    x = np.random.default_rng(0).normal(size=(23, 4)).astype(np.float32)
    big = dp_sum(x, clip_norm=1e9, noise_multiplier=0.0, key=KEY)
    np.testing.assert_allclose(big.value, x.sum(0), rtol=1e-5, atol=1e-5)
    assert big.epsilon == math.inf
    clipped = dp_sum(x, clip_norm=0.7, noise_multiplier=0.0, key=KEY)
    np.testing.assert_allclose(clipped.value, clipped_rows(x, 0.7).sum(0), rtol=1e-5, atol=1e-5)
    mean = dp_mean(x, clip_norm=0.7, noise_multiplier=0.0, key=KEY)
    np.testing.assert_allclose(mean.value, clipped_rows(x, 0.7).mean(0), rtol=1e-5, atol=1e-6)


def test_seed_average_is_federated_mean_and_private_mean_without_noise():
    readings = [68.5, 70.3, 69.8]

    @federated_computation(FederatedType(jnp.float32, CLIENTS))
    def get_average_temperature(sensor_readings):
        return federated_mean(sensor_readings)

    @federated_computation(FederatedType(jnp.float32, CLIENTS))
    def get_private_average(sensor_readings):
        return private_mean(sensor_readings, clip_norm=100.0, noise_multiplier=0.0, key=KEY)

    assert float(get_average_temperature(readings)) == pytest.approx(np.mean(readings), 1e-6)
    assert float(get_private_average(readings)) == pytest.approx(np.mean(readings), 1e-6)


def test_private_mean_is_unbiased_with_the_calibrated_noise():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 3, size=(50,)).astype(np.float32)
    z, clip = 2.0, 2.0
    keys = jax.random.split(KEY, 4000)
    draws = jax.jit(jax.vmap(lambda k: private_mean(
        at_clients(jnp.asarray(x)), clip_norm=clip, noise_multiplier=z, key=k).value))(keys)
    draws = np.asarray(draws)
    truth = np.minimum(x, clip).mean()
    sigma = z * clip / x.size
    assert abs(draws.mean() - truth) < 4 * sigma / np.sqrt(draws.size)
    assert draws.std() == pytest.approx(sigma, rel=0.05)


def test_epsilon_equals_dp_accounting():
    x = np.ones((23, 4), np.float32)  # the shape of the first test: no new compilation
    release = dp_sum(x, clip_norm=1.0, noise_multiplier=1.3, key=KEY, delta=1e-5)
    assert release.epsilon == pytest.approx(rdp_epsilon(1.3, 1, 1e-5), rel=1e-9)
    q = dp_quantiles(np.arange(150.0), LEVELS, low=0, high=100, noise_multiplier=3.0,
                     key=KEY, delta=1e-6)
    assert q.queries == 6 * 7  # 101 grid points: 7 steps per level
    assert q.epsilon == pytest.approx(rdp_epsilon(3.0, 42, 1e-6), rel=1e-9)
    z = noise_for_epsilon(2.0, 8, 1e-6)
    assert rdp_epsilon(z, 8, 1e-6) == pytest.approx(2.0, abs=1e-3)
    assert gaussian_epsilon(z, 8, 1e-6) == pytest.approx(2.0, abs=1e-3)


def test_histograms_without_noise_equal_numpy():
    rng = np.random.default_rng(2)
    sizes = [0, 5, 17, 1, 40]
    values = rng.uniform(-1, 11, size=sum(sizes)).astype(np.float32)
    values[3] = 10.0  # the right edge belongs to the last bin
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    edges = np.linspace(0, 10, 6)
    counts = client_histograms(values, offsets, edges)
    reference = np.stack([np.histogram(values[a:b], edges)[0]
                          for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    np.testing.assert_array_equal(counts, reference)
    total = dp_histogram(counts, clip_norm=1e9, noise_multiplier=0.0, key=KEY)
    np.testing.assert_allclose(total.value, reference.sum(0))
    shares = client_histograms(values, offsets, edges, normalize=True)
    mean = dp_histogram(shares, clip_norm=1.0, noise_multiplier=0.0, key=KEY, mean=True)
    expected = np.mean([r / max(s, 1) for r, s in zip(reference, sizes, strict=True)], axis=0)
    np.testing.assert_allclose(mean.value, expected, rtol=1e-5, atol=1e-7)


def test_noised_histogram_is_unbiased():
    counts = np.random.default_rng(3).integers(0, 3, size=(30, 6)).astype(np.float32)
    draws = np.stack([dp_histogram(counts, clip_norm=10.0, noise_multiplier=1.0,
                                   key=jax.random.PRNGKey(i)).value for i in range(60)])
    # the noise is fresh per key and of the calibrated scale: z * clip_norm on each bin
    assert draws.std(0).mean() == pytest.approx(10.0, rel=0.15)
    sigma = 10.0 / np.sqrt(60)
    assert np.all(np.abs(draws.mean(0) - counts.sum(0)) < 4.5 * sigma)


@pytest.mark.parametrize("seed", [0, 1])
def test_quantiles_without_noise_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, size=150).astype(np.float32)  # one shape: one compilation
    x[:rng.integers(1, 40)] = rng.integers(0, 3)  # a heavy repeated value
    levels = LEVELS
    release = dp_quantiles(x, levels, low=0, high=100, noise_multiplier=0.0, key=KEY)
    np.testing.assert_array_equal(release.value, np.quantile(x, levels, method="inverted_cdf"))
    halves = dp_quantiles(x / 2, levels, low=0, high=50, resolution=0.5, noise_multiplier=0.0,
                          key=KEY)
    np.testing.assert_array_equal(halves.value,
                                  np.quantile(x / 2, levels, method="inverted_cdf"))


def adaptive_reference(x, q, rounds, initial, learning_rate):
    """Andrew et al.'s update, noise-free, in plain numpy."""
    norm = initial
    for _ in range(rounds):
        unclipped = np.mean(x <= norm)
        norm = norm * np.exp(-learning_rate * (unclipped - q))
    return norm


def test_adaptive_quantiles_follow_the_paper_and_converge():
    x = np.random.default_rng(5).gamma(3.0, 10.0, size=400).astype(np.float32)
    levels = [0.1, 0.5, 0.9]
    release = adaptive_quantiles(x, levels, rounds=300, initial=1.0, count_stddev=0.0, key=KEY)
    reference = [adaptive_reference(x.astype(np.float64), q, 300, 1.0, 0.2) for q in levels]
    np.testing.assert_allclose(release.value, reference, rtol=1e-4)
    np.testing.assert_allclose(release.value, np.quantile(x, levels), rtol=0.02)
    noisy = adaptive_quantiles(x, levels, rounds=300, initial=20.0, count_stddev=20.0,
                               key=KEY, delta=1e-6)
    assert noisy.epsilon == pytest.approx(rdp_epsilon(40.0, 900, 1e-6), rel=1e-9)
    np.testing.assert_allclose(noisy.value, np.quantile(x, levels), rtol=0.25)


@needs_shared_data(PLAYS)
def test_private_mean_leaves_padding_clients_out_of_its_denominator():
    """Real roles' mean line lengths in a cohort padded with 20 padding clients (mask False):
    the private mean divided by all 60 clients (40 of 60 times the mean; federated_mean, the
    same value's non-private mean, left them out). Now it divides by the 40 real clients, and
    its noise std is z * C / 40."""
    lines = shakespeare_roles(str(SHARED_DATA)).lines[:40]
    real = np.array([np.mean([len(x) for x in role]) for role in lines], np.float64)
    x = np.concatenate([real, np.full(20, 55.0)]).astype(np.float32)  # padding: any value
    mask = np.arange(60) < 40
    clip, z = 45.0, 3.0
    expected = np.minimum(real, clip).mean()  # numpy float64, the 40 roles only

    @jax.jit
    def release(key, z):
        return private_mean(at_clients(jnp.asarray(x), mask=jnp.asarray(mask)), clip_norm=clip,
                            noise_multiplier=z, key=key).value

    assert float(release(KEY, 0.0)) == pytest.approx(expected, rel=1e-6)
    draws = np.asarray(jax.vmap(release, (0, None))(jax.random.split(KEY, 4000), z))
    assert draws.std() == pytest.approx(z * clip / 40, rel=0.05)
    assert abs(draws.mean() - expected) < 4 * z * clip / 40 / np.sqrt(draws.size)
    given = private_mean(at_clients(jnp.asarray(x), mask=jnp.asarray(mask)), clip_norm=clip,
                         noise_multiplier=0.0, key=KEY, denominator=50.0).value
    assert float(given) == pytest.approx(np.minimum(real, clip).sum() / 50, rel=1e-6)


@needs_shared_data(PLAYS)
def test_quantiles_of_real_roles_take_the_exact_rank():
    """The number of lines of 25 real roles at levels whose q * 25 is a whole number: the
    quantile is the value of rank q * 25 (exact fractions here). float32's 0.6 * 25 =
    15.000001 made the noise-free search ask for a 16th role (72 lines -> 91 for the first
    25 roles), and numpy's inverted_cdf (the runner's exact answer) takes rank 8 for 0.28 * 25
    (7.000000000000001 in float64)."""
    from fractions import Fraction

    lines = [len(role) for role in shakespeare_roles(str(SHARED_DATA)).lines]
    levels = [0.28, 0.56, 0.6, 0.3, 0.75]
    assert 0.28 * 25 > 7 and np.float32(0.6) * np.float32(25) > 15
    for start in (0, 25, 100):
        x = np.asarray(lines[start:start + 25], np.float32)
        ordered = sorted(lines[start:start + 25])
        ranks = [math.ceil(Fraction(str(q)) * 25) for q in levels]
        expected = [ordered[r - 1] for r in ranks]  # integers on the grid 0, 1, ..., 1000
        release = dp_quantiles(x, levels, low=0, high=1000, noise_multiplier=0.0, key=KEY)
        np.testing.assert_array_equal(release.value, expected)
        np.testing.assert_array_equal(exact_quantiles(x, levels), expected)
