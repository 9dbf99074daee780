"""Poisson client sampling against binomial statistics, and through the round step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.core import Aggregator
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import poisson_cap, poisson_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

DRAWS = 4000


def _draw(num_clients, q, cap, seed=0):
    sampler = poisson_sampler(num_clients, q, cap)
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    ids, valid, drawn = jax.jit(jax.vmap(sampler))(keys)
    return np.asarray(ids), np.asarray(valid), np.asarray(drawn)


def _inclusion(ids, valid, num_clients):
    counts = np.zeros(num_clients)
    for row, ok in zip(ids, valid, strict=True):
        counts[row[ok]] += 1
    return counts


def _check_shape_invariants(ids, valid, drawn, num_clients, cap):
    assert ids.shape == valid.shape == (DRAWS, cap) and drawn.shape == (DRAWS,)
    np.testing.assert_array_equal(valid.sum(axis=1), np.minimum(drawn, cap))
    # the valid slots come first, ids are in range and never repeated among the valid ones
    assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
    assert ids.min() >= 0 and ids.max() < num_clients
    for row, ok in zip(ids, valid, strict=True):
        assert len(set(row[ok].tolist())) == ok.sum()


def test_each_client_joins_with_probability_q():
    num_clients, q = 60, 0.15
    cap = poisson_cap(num_clients, q)
    ids, valid, drawn = _draw(num_clients, q, cap)
    _check_shape_invariants(ids, valid, drawn, num_clients, cap)
    assert np.all(drawn <= cap)  # six sigmas: no overflow in 4000 draws
    counts = _inclusion(ids, valid, num_clients)
    std = math.sqrt(DRAWS * q * (1 - q))
    assert np.all(np.abs(counts - DRAWS * q) < 4.5 * std), counts
    # the cohort size is Binomial(N, q)
    assert drawn.mean() == pytest.approx(num_clients * q,
                                         abs=4 * math.sqrt(num_clients * q * (1 - q) / DRAWS))
    assert drawn.var() == pytest.approx(num_clients * q * (1 - q), rel=0.1)


def test_overflow_keeps_a_uniform_subset_of_the_drawn():
    num_clients, q, cap = 20, 0.5, 6  # almost every draw overflows
    ids, valid, drawn = _draw(num_clients, q, cap, seed=1)
    _check_shape_invariants(ids, valid, drawn, num_clients, cap)
    assert np.mean(drawn > cap) > 0.9
    counts = _inclusion(ids, valid, num_clients)
    # by symmetry every client is kept equally often: E[min(drawn, cap)] / N of the draws
    p = np.minimum(drawn, cap).mean() / num_clients
    std = math.sqrt(DRAWS * p * (1 - p))
    assert np.all(np.abs(counts - DRAWS * p) < 4.5 * std), counts
    # and the kept clients are not the lowest or highest ids
    kept = np.concatenate([row[ok] for row, ok in zip(ids, valid, strict=True)])
    assert kept.mean() == pytest.approx((num_clients - 1) / 2, abs=0.2)


@pytest.mark.parametrize("num_clients,q,sigmas", [(1000, 0.1, 6.0), (100, 0.05, 3.0),
                                                  (10, 0.9, 6.0), (50, 1.0, 6.0),
                                                  (1_000_000, 1e-6, 6.0)])
def test_poisson_cap_is_mean_plus_sigmas_binomial_stds(num_clients, q, sigmas):
    mean = num_clients * q
    expected = min(num_clients, max(1, math.ceil(mean + sigmas * math.sqrt(mean * (1 - q)))))
    assert poisson_cap(num_clients, q, sigmas) == expected
    assert 1 <= expected <= num_clients


def test_poisson_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sampling probability"):
        poisson_sampler(10, 0.0, 5)
    with pytest.raises(ValueError, match="max_cohort_size"):
        poisson_sampler(10, 0.5, 11)


def _weights_spy() -> Aggregator:
    """The weighted mean that also reports the weights it was given."""

    def apply(state, values, weights, key, client_ids=None):
        total = jnp.maximum(jnp.sum(weights), 1e-30)
        mean = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1) / total, values)
        return mean, state, {"spy/weights": weights}

    return Aggregator(lambda example: (), apply)


def test_round_step_masks_the_padding_of_a_poisson_cohort():
    sizes = (5, 17, 40, 3, 11, 8, 9, 2)
    model, data = tiny_model(), tiny_data(sizes)
    q, cap = 0.5, 3  # often more than the cap are drawn, sometimes fewer
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0), aggregator=_weights_spy())
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule,
                                  poisson_sampler(data.num_clients, q, cap), cap)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 3)
    seen_padding = seen_overflow = False
    for _ in range(8):
        state, metrics = round_step(state)
        metrics = jax.device_get(metrics)
        drawn = metrics["cohort/drawn"]
        valid_count = min(drawn, cap)
        weights = metrics["spy/weights"]
        assert weights.shape == (cap,)
        assert metrics["train/clients"] == valid_count
        assert np.count_nonzero(weights) == valid_count
        np.testing.assert_array_equal(weights[int(valid_count):], 0.0)  # padding: weight 0
        assert metrics["cohort/overflow"] == max(drawn - cap, 0)
        seen_padding |= drawn < cap
        seen_overflow |= drawn > cap
    assert seen_padding and seen_overflow


def test_a_tiny_q_is_not_rounded_up_to_the_float32_uniform_grid():
    """jax.random.uniform is on a grid of 2^-23, so ``u < q`` selected with probability
    ceil(q 2^23) / 2^23, not q: 2^-23 = 1.2e-7 for any q below it (and up to 1 / (q 2^23) too
    much above it: 1.2% at q = 1e-5), while the accountant is told q. With q = 1e-10 and 2^26
    client-rounds the reference, Binomial(2^26, 1e-10), has mean 0.0067 and P(>= 2) = 2e-5;
    the grid's probability gives about 8 joins."""
    num_clients, q, rounds = 1 << 20, 1e-10, 64
    sampler = jax.jit(jax.vmap(poisson_sampler(num_clients, q, 4)))
    _, valid, drawn = sampler(jax.random.split(jax.random.key(0), rounds))
    assert int(np.sum(drawn)) <= 1 and int(np.sum(valid)) == int(np.sum(drawn))


def test_q_one_selects_every_client():
    ids, valid, drawn = _draw(7, 1.0, 7)
    assert np.all(valid) and np.all(drawn == 7)
    assert all(sorted(row.tolist()) == list(range(7)) for row in ids)


def test_ordinary_q_keeps_the_cohorts_of_u_below_q():
    """The exact rule differs from ``u < q`` only where u is the grid point just under q
    (probability 2^-23 a client and round), so at q = 0.1 a seed's cohorts over 200 rounds are
    those of the plain rule written here with the same uniforms (recorded runs reproduce)."""
    num_clients, q = 1000, 0.1
    keys = jax.random.split(jax.random.key(5), 200)
    _, _, drawn = jax.jit(jax.vmap(poisson_sampler(num_clients, q, num_clients)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (num_clients,)))(keys)
    np.testing.assert_array_equal(drawn, np.sum(np.asarray(u) < np.float32(q), axis=1))
