"""Agnostic FL against a plain Python loop written from the paper, and the simplex projection
against a sorted-threshold numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import loss_gradient, mean_loss, spy, tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.afl import afl, project_to_simplex
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)
COHORT_KEYS = ("ids", "indices", "mask", "valid")


def numpy_simplex_projection(v):
    """Sorted-threshold projection (Held et al. 1974), a plain loop in float64."""
    v = np.asarray(v, np.float64)
    u = np.sort(v)[::-1]
    total, theta = 0.0, None
    for j in range(len(u)):
        total += u[j]
        candidate = (total - 1.0) / (j + 1)
        if u[j] - candidate > 0:
            theta = candidate  # the last j that qualifies wins
    return np.maximum(v - theta, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    size = [1, 2, 5, 10, 100, 1000][seed]
    v = rng.normal(scale=[0.1, 1.0, 3.0, 10.0, 0.01, 1.0][seed], size=size).astype(np.float32)
    x = np.asarray(jax.jit(project_to_simplex)(jnp.asarray(v)))
    expected = numpy_simplex_projection(v)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert np.all(x >= 0) and abs(x.sum() - 1.0) < 1e-5
    # Optimality (KKT): x = max(v - theta, 0), so v - x is the same theta on the support.
    support = x > 0
    np.testing.assert_allclose(v[support] - x[support], (v - x)[support][0], atol=1e-5)
    assert np.all(v[~support] <= (v - x)[support][0] + 1e-6)


def bisection_simplex_projection(v, iterations=200):
    """argmin_{x in simplex} ||x - v||, found another way: x = max(v - theta, 0) with theta the
    root of the decreasing ``sum(max(v - theta, 0)) - 1``, by bisection in float64 (no sort)."""
    v = np.asarray(v, np.float64)
    low, high = v.min() - 1.0, v.max()  # the sum is >= 1 at low, 0 at high
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if np.maximum(v - middle, 0).sum() > 1 else (low, middle)
    return np.maximum(v - (low + high) / 2, 0.0)


@pytest.mark.parametrize("case", ["normal", "near_uniform", "a_few_large", "ascent_step"])
def test_projection_matches_bisection(case):
    """Against an independent algorithm (bisection on the threshold), K up to 3,400 (EMNIST's
    writers), including the shape AFL projects: the simplex plus a step on a few clients."""
    rng = np.random.default_rng(len(case))
    for size in (2, 7, 100, 3400):
        v = {"normal": rng.normal(size=size),
             "near_uniform": np.full(size, 1.0 / size) + rng.normal(scale=1e-6, size=size),
             "a_few_large": np.where(rng.random(size) < 0.05, rng.exponential(size=size), 0.0)
             - rng.random(size),
             "ascent_step": rng.dirichlet(np.ones(size)) + 0.05 * size / 3 * np.where(
                 rng.random(size) < 3 / size, rng.exponential(size=size), 0.0)}[case]
        v = v.astype(np.float32)
        x = np.asarray(jax.jit(project_to_simplex)(jnp.asarray(v)))
        np.testing.assert_allclose(x, bisection_simplex_projection(v), atol=2e-6, rtol=0)


def test_projection_keeps_simplex_points_and_handles_ties():
    point = np.array([0.2, 0.3, 0.5, 0.0], np.float32)
    np.testing.assert_allclose(project_to_simplex(jnp.asarray(point)), point, atol=1e-7)
    ties = np.array([3.0, 3.0, 3.0, -1.0], np.float32)
    np.testing.assert_allclose(project_to_simplex(jnp.asarray(ties)), [1 / 3, 1 / 3, 1 / 3, 0],
                               atol=1e-6)
    np.testing.assert_allclose(project_to_simplex(jnp.asarray([5.0, -5.0])), [1.0, 0.0])




def make_round(data, algorithm, cohort_size=3, **kwargs):
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    return build_round_step(algorithm, data, schedule, sampler, cohort_size, **kwargs)






def reference_round(model, params, mixture, data, cohort, lr, lambda_lr):
    """Stochastic-AFL (Mohri et al. 2019) with FedAvg local steps: a loop over clients/steps."""
    x, y = data.arrays["x"], data.arrays["y"]
    num_clients = data.num_clients
    w = [np.float64(leaf) for leaf in jax.tree.leaves(params)]
    step = [np.zeros_like(a) for a in w]
    mass, gradient, active = 0.0, np.zeros(num_clients), 0
    for c in range(len(cohort["ids"])):
        if not cohort["valid"][c]:
            continue
        k = int(cohort["ids"][c])
        lo, hi = data.offsets[k], data.offsets[k + 1]
        p = params
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]
            if rows.size:
                grads = loss_gradient(model, p, x[rows], y[rows])
                p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
        delta = [a - np.float64(b) for a, b in zip(w, jax.tree.leaves(p), strict=True)]
        step = [s + mixture[k] * d for s, d in zip(step, delta, strict=True)]
        mass += mixture[k]
        gradient[k] += float(mean_loss(model, params, x[lo:hi], y[lo:hi]))  # L_k(w^t)
        active += 1
    new = [a - s / mass for a, s in zip(w, step, strict=True)]
    mixture = numpy_simplex_projection(mixture + lambda_lr * gradient * num_clients / active)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, [np.float32(a) for a in new]), mixture


@pytest.mark.parametrize("execution", ["map", "vmap", "mesh4"])
def test_round_matches_sequential_reference(execution):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, lambda_lr = 0.2, 0.05
    algorithm = spy(afl(model, optax.sgd(lr), optax.sgd(1.0), lambda_learning_rate=lambda_lr,
                        num_clients=data.num_clients))
    kwargs = {"mesh": client_mesh(4)} if execution == "mesh4" else \
        {"client_execution": execution}
    round_step = make_round(data, algorithm, **kwargs)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 2)
    reference, mixture = params, np.full(data.num_clients, 1.0 / data.num_clients)
    for _ in range(4):
        state, metrics = round_step(state)
        cohort = jax.device_get({k: metrics[k] for k in COHORT_KEYS})
        reference, mixture = reference_round(model, reference, mixture, data, cohort, lr,
                                             lambda_lr)
        np.testing.assert_allclose(state.algorithm.mixture, mixture, atol=1e-6)
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=1e-5, rtol=1e-5)
    assert not np.allclose(mixture, 1.0 / data.num_clients)  # lambda did move
    assert float(metrics["afl/lambda_max"]) == pytest.approx(mixture.max(), abs=1e-6)


def test_lambda_learning_rate_zero_is_fed_avg_with_uniform_weights():
    model, data = tiny_model(), tiny_data(SIZES)
    params = model.init(jax.random.key(0))
    results = []
    for algorithm in (fed_avg(model, optax.sgd(0.1), optax.adam(0.05), client_weighting="uniform"),
                      afl(model, optax.sgd(0.1), optax.adam(0.05), lambda_learning_rate=0.0,
                          num_clients=data.num_clients)):
        round_step = make_round(data, algorithm)
        state = init_simulation_state(algorithm.init(params), 1)
        for _ in range(3):
            state, _ = round_step(state)
        results.append(jax.device_get(state.algorithm.params))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-6, rtol=1e-6)


def test_registry_options_and_errors():
    model = tiny_model()
    algorithm = create_algorithm("afl", model, optax.sgd(0.1), optax.sgd(1.0),
                                 lambda_learning_rate=0.5, num_clients=7,
                                 client_weighting="num_examples")
    state = algorithm.init(model.init(jax.random.key(0)))
    np.testing.assert_allclose(state.mixture, np.full(7, 1 / 7), rtol=1e-6)
    with pytest.raises(ValueError, match="num_clients"):
        afl(model, optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ValueError, match="lambda_learning_rate"):
        afl(model, optax.sgd(0.1), optax.sgd(1.0), lambda_learning_rate=-1.0, num_clients=3)
