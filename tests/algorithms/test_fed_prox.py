"""FedProx against a sequential reference written here, and mu = 0 against FedAvg."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import algorithm_options, create_algorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.fed_prox import fed_prox
from fedjax_sim.config import load_config
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)
COHORT = ("client_id", "indices", "mask", "valid", "num_steps")


def mean_loss(model, params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# jitted once per model and batch shape: the references below take hundreds of steps
loss_gradient = jax.jit(jax.grad(mean_loss, argnums=1), static_argnums=0)


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    """The algorithm, with the round's cohort added to its metrics."""

    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        return state, {**metrics, **{k: getattr(cohort.clients, k) for k in COHORT}}

    return FederatedAlgorithm(algorithm.init, apply)


def rounds(algorithm, data, n, **kwargs):
    """n rounds of 3 clients (2 local epochs of batch 8); returns states and cohorts."""
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    step = build_round_step(spy(algorithm), data, schedule, uniform_sampler(len(SIZES), 3), 3,
                            **kwargs)
    state = init_simulation_state(algorithm.init(tiny_model().init(jax.random.key(0))), 3)
    cohorts = []
    for _ in range(n):
        state, metrics = step(state)
        cohorts.append(jax.device_get({k: metrics[k] for k in COHORT}))
    return state, cohorts


def reference_round(model, params, data, cohort, lr, mu):
    """FedProx as the paper writes it: per client, SGD on F_i(w) + mu/2 ||w - w_server||^2."""
    x, y = data.arrays["x"], data.arrays["y"]
    deltas, weights = [], []
    for c, client in enumerate(cohort["client_id"]):
        w = params
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]
            if rows.size == 0:
                continue
            g = loss_gradient(model, w, x[rows], y[rows])
            # the gradient of F_i(w) + mu/2 ||w - w_server||^2
            w = jax.tree.map(lambda v, g, v0: v - lr * (g + mu * (v - v0)), w, g, params)
        deltas.append(jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), params, w))
        weights.append(float(data.client_sizes[client]))
    p = np.array(weights) / np.sum(weights)
    return jax.tree.map(
        lambda w0, *d: (w0 - sum(pi * di for pi, di in zip(p, d, strict=True))).astype(np.float32),
        params, *deltas)


def test_fed_prox_matches_sequential_reference():
    model, data = tiny_model(), tiny_data(SIZES)
    lr, mu = 0.1, 0.5
    algorithm = fed_prox(model, optax.sgd(lr), optax.sgd(1.0), mu=mu)
    state, cohorts = rounds(algorithm, data, 3, client_execution="vmap")
    params = model.init(jax.random.key(0))
    for cohort in cohorts:
        params = reference_round(model, params, data, cohort, lr, mu)
    chex.assert_trees_all_close(state.algorithm.params, params, atol=1e-5, rtol=1e-5)
    # The proximal pull is visible: mu = 0 ends elsewhere.
    free = params = model.init(jax.random.key(0))
    for cohort in cohorts:
        free = reference_round(model, free, data, cohort, lr, 0.0)
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(free), jax.tree.leaves(state.algorithm.params), strict=True))
    assert diff > 1e-3


def test_mu_zero_is_fed_avg():
    model, data = tiny_model(), tiny_data(SIZES)
    client, server = optax.sgd(0.1, momentum=0.5), optax.adam(0.05)
    prox, _ = rounds(fed_prox(model, client, server, mu=0.0), data, 3)
    avg, _ = rounds(fed_avg(model, client, server), data, 3)
    chex.assert_trees_all_close(prox.algorithm.params, avg.algorithm.params, atol=1e-7, rtol=0)


def test_config_sets_mu_and_bad_mu_is_refused():
    config = load_config("configs/fashion_mnist_fedprox.yaml")
    assert config.algorithm.name == "fed_prox" and "mu" in config.algorithm.options
    assert algorithm_options("fed_prox") == ["mu"]
    model = tiny_model()
    algorithm = create_algorithm("fed_prox", model, optax.sgd(0.1), optax.sgd(1.0),
                                 num_clients=5, **config.algorithm.options)
    assert algorithm.init(model.init(jax.random.key(0))).params is not None
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fed_prox(model, optax.sgd(0.1), optax.sgd(1.0), mu=-1.0)
