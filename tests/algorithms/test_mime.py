"""Mime and MimeLite against a sequential reference written here: heavy-ball SGD as the base
optimizer, its momentum applied but frozen on the clients and updated on the server with the
average full-batch gradient at the server params."""

import chex
import jax
import linear_problem
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.mime import mime, mime_lite
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
    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        return state, {**metrics, **{k: getattr(cohort.clients, k) for k in COHORT}}

    return FederatedAlgorithm(algorithm.init, apply)


def tree(f, *trees):
    return jax.tree.map(f, *trees)


def average(p, trees):
    return tree(lambda *t: sum(pi * ti for pi, ti in zip(p, t, strict=True)), *trees)


def reference(model, data, params, cohorts, lr, beta, corrected):
    """Algorithm 1 of the paper with U(g, m) = -lr (g + beta m) and V(c, m) = c + beta m."""
    x, y = data.arrays["x"], data.arrays["y"]

    def grad(w, rows):
        return tree(np.float64, loss_gradient(model, tree(np.float32, w), x[rows], y[rows]))

    server = tree(np.float64, params)
    momentum = tree(np.zeros_like, server)
    for cohort in cohorts:
        weights = np.array([float(data.client_sizes[i]) for i in cohort["client_id"]])
        p = weights / weights.sum()
        # 1. every client's full-batch gradient at the server params, over its round's examples
        full = [grad(server, cohort["indices"][c][cohort["mask"][c]])
                for c in range(len(p))]
        c_mean = average(p, full)
        # 2. local steps with the momentum frozen
        finals = []
        for c in range(len(p)):
            w = server
            for s in range(cohort["indices"].shape[1]):
                rows = cohort["indices"][c, s][cohort["mask"][c, s]]
                if rows.size == 0:
                    continue
                g = grad(w, rows)
                if corrected:
                    g = tree(lambda g, gx, cm: g - gx + cm, g, grad(server, rows), c_mean)
                w = tree(lambda v, g, m: v - lr * (g + beta * m), w, g, momentum)
            finals.append(w)
        # 3. server: average the models, update the statistics with the mean full gradient
        server = average(p, finals)
        momentum = tree(lambda cm, m: cm + beta * m, c_mean, momentum)
    return server, momentum


@pytest.mark.parametrize("name,execution", [("mime", "map"), ("mime", "vmap"),
                                            ("mime_lite", "map")])
def test_mime_matches_sequential_reference(name, execution):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, beta = 0.1, 0.7
    factory = mime if name == "mime" else mime_lite
    algorithm = factory(model, optax.sgd(lr, momentum=beta), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    step = build_round_step(spy(algorithm), data, schedule, uniform_sampler(len(SIZES), 3), 3,
                            client_execution=execution)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 4)
    cohorts = []
    for _ in range(3):
        state, metrics = step(state)
        cohorts.append(jax.device_get({k: metrics[k] for k in COHORT}))
    server, momentum = reference(model, data, params, cohorts, lr, beta, name == "mime")
    chex.assert_trees_all_close(state.algorithm.params, tree(np.float32, server),
                                atol=2e-5, rtol=1e-5)
    # optax.sgd's state is its momentum trace (one leaf per parameter)
    chex.assert_trees_all_close(jax.tree.leaves(state.algorithm.base_state),
                                jax.tree.leaves(tree(np.float32, momentum)), atol=2e-5, rtol=1e-5)
    # The other variant ends elsewhere: the control variate matters.
    other, _ = reference(model, data, params, cohorts, lr, beta, name != "mime")
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(other), jax.tree.leaves(server), strict=True))
    assert diff > 1e-4


@pytest.mark.parametrize("name,config", [("mime", "fashion_mnist_mime.yaml"),
                                         ("mime_lite", "fashion_mnist_mimelite.yaml")])
def test_configs(name, config):
    config = load_config(f"configs/{config}")
    assert config.algorithm.name == name and config.client.optimizer.options["momentum"] > 0
    model = tiny_model()
    state = create_algorithm(name, model, optax.adam(0.01), optax.sgd(1.0), num_clients=5,
                             **config.algorithm.options).init(model.init(jax.random.key(0)))
    assert state.base_state is not None


@pytest.mark.parametrize("name", ["mime", "mime_lite"])
def test_adam_statistics_stay_frozen_on_the_clients_on_least_squares(name):
    """Algorithm 1 in float64 on least squares with Adam as the base optimizer, uniform weights
    (the paper), the first client of every cohort dropping out: the clients step with Adam's
    update at the server's statistics (m, v and the step count t frozen: the bias correction of
    every local step is t + 1's), the server updates (m, v, t) once a round with the mean
    full-batch gradient c at x; Mime's local gradient is ``g(y) - g(x) + c`` on the batch."""
    data = linear_problem.linear_data((5, 17, 40, 3, 11))
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8

    def drop_first_slot(key, clients):
        del key
        keep = np.arange(clients.mask.shape[0]) != 0
        return clients.replace(mask=clients.mask & keep[:, None, None],
                               num_steps=np.where(keep, 1, 0) * clients.num_steps)

    factory = mime if name == "mime" else mime_lite
    algorithm = factory(None, optax.adam(lr, b1=b1, b2=b2, eps=eps), optax.sgd(1.0),
                        client_weighting="uniform", loss_fn=linear_problem.squared_loss)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    state, history = linear_problem.run(algorithm, data, schedule, 4, 3,
                                        client_execution="map", system=drop_first_slot)
    x = np.float64(linear_problem.initial_params()["w"])
    m, v, t = np.zeros_like(x), np.zeros_like(x), 0

    def adam_step(g, m, v, t):  # U(g, s): Adam's step with the statistics s = (m, v, t)
        m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        return -lr * (m_new / (1 - b1 ** (t + 1))) / (np.sqrt(v_new / (1 - b2 ** (t + 1))) + eps)

    for cohort in history:
        clients = [(slot, linear_problem.batches(cohort, slot))
                   for slot in range(len(cohort["client_id"]))]
        clients = [(slot, batches) for slot, batches in clients if batches]  # S: not dropped
        c = np.mean([linear_problem.gradient(x, data, np.concatenate(batches))
                     for _, batches in clients], axis=0)
        finals = []
        for _, batches in clients:
            y = x.copy()
            for rows in batches:
                g = linear_problem.gradient(y, data, rows)
                if name == "mime":
                    g = g - linear_problem.gradient(x, data, rows) + c
                y = y + adam_step(g, m, v, t)
            finals.append(y)
        x = np.mean(finals, axis=0)
        m, v, t = b1 * m + (1 - b1) * c, b2 * v + (1 - b2) * c**2, t + 1
    np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-5)
    adam_state = state.base_state[0]
    assert int(adam_state.count) == t
    np.testing.assert_allclose(adam_state.mu["w"], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adam_state.nu["w"], v, rtol=1e-5, atol=1e-7)
    assert all(cohort["num_steps"][0] == 0 for cohort in history)  # the dropout happened
