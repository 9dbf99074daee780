"""SCAFFOLD against a sequential reference written here (with its per-client store), and its
first round with zero control variates against FedAvg."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.config import load_config
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11, 8)
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


def drop_second_client(key, clients):
    """A system model: the cohort's second client drops out (no real step)."""
    del key
    keep = np.arange(clients.mask.shape[0]) != 1
    return clients.replace(mask=clients.mask & keep[:, None, None],
                           num_steps=np.where(keep, 1, 0) * clients.num_steps)


def rounds(algorithm, data, n, cohort_size=3, **kwargs):
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    step = build_round_step(spy(algorithm), data, schedule, sampler, cohort_size, **kwargs)
    state = init_simulation_state(algorithm.init(tiny_model().init(jax.random.key(0))), 11)
    cohorts = []
    for _ in range(n):
        state, metrics = step(state)
        cohorts.append(jax.device_get({k: metrics[k] for k in COHORT}))
    return state, cohorts


def tree(f, *trees):
    return jax.tree.map(f, *trees)


class Reference:
    """SCAFFOLD, Algorithm 1 of the paper with option II, one client at a time."""

    def __init__(self, model, data, params, lr, global_lr):
        self.model, self.data, self.lr, self.global_lr = model, data, lr, global_lr
        self.x = tree(np.float64, params)
        self.c = tree(np.zeros_like, self.x)
        self.c_i = {i: tree(np.zeros_like, self.x) for i in range(data.num_clients)}

    def grad(self, w, rows):
        x, y = self.data.arrays["x"], self.data.arrays["y"]
        return tree(np.float64, loss_gradient(self.model, tree(np.float32, w), x[rows], y[rows]))

    def round(self, cohort):
        dy, dc, weights = [], [], []
        for c, i in enumerate(cohort["client_id"]):
            if not cohort["valid"][c]:
                continue
            y, steps = self.x, 0
            for s in range(cohort["indices"].shape[1]):
                rows = cohort["indices"][c, s][cohort["mask"][c, s]]
                if rows.size == 0:
                    continue
                g = self.grad(y, rows)
                y = tree(lambda v, g, ci, cs: v - self.lr * (g - ci + cs), y, g, self.c_i[i],
                         self.c)
                steps += 1
            if steps == 0:  # dropped out: no update, no new control variate
                continue
            scale = 1.0 / (steps * self.lr)
            new_ci = tree(lambda ci, cs, x, y, scale=scale: ci - cs + scale * (x - y),
                          self.c_i[i], self.c, self.x, y)
            dy.append(tree(np.subtract, y, self.x))
            dc.append(tree(np.subtract, new_ci, self.c_i[i]))
            self.c_i[i] = new_ci
            weights.append(float(self.data.client_sizes[i]))
        p = np.array(weights) / np.sum(weights)
        n = self.data.num_clients
        self.x = tree(lambda x, *d: x + self.global_lr * sum(
            pi * di for pi, di in zip(p, d, strict=True)), self.x, *dy)
        self.c = tree(lambda c, *d: c + sum(d) / n, self.c, *dc)


@pytest.mark.parametrize("execution", ["map", "vmap", "mesh4"])
def test_scaffold_matches_sequential_reference_over_rounds(execution):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, global_lr = 0.1, 0.8
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    algorithm = scaffold(model, client, optax.sgd(global_lr), num_clients=data.num_clients)
    kwargs = ({"mesh": client_mesh(4)} if execution == "mesh4"  # cohort 3 padded to 4
              else {"client_execution": execution})
    state, cohorts = rounds(algorithm, data, 5, system=drop_second_client, **kwargs)
    ref = Reference(model, data, model.init(jax.random.key(0)), lr, global_lr)
    for cohort in cohorts:
        ref.round(cohort)
    s = state.algorithm
    chex.assert_trees_all_close(s.params, tree(np.float32, ref.x), atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(s.control, tree(np.float32, ref.c), atol=2e-5, rtol=1e-5)
    for i in range(data.num_clients):  # every row of the store, trained or not
        row = tree(lambda x, i=i: x[i], s.client_controls)
        chex.assert_trees_all_close(row, tree(np.float32, ref.c_i[i]), atol=2e-5, rtol=1e-5)
    # The store mattered: some client trained twice with a nonzero c_i, one never trained.
    trained = [int(i) for cohort in cohorts for c, i in enumerate(cohort["client_id"])
               if c != 1 and cohort["valid"][c]]
    assert max(trained.count(i) for i in set(trained)) >= 2
    assert sum(float(np.abs(leaf).sum()) for leaf in jax.tree.leaves(s.client_controls)) > 0


def test_first_round_with_zero_control_variates_is_fed_avg():
    model, data = tiny_model(), tiny_data(SIZES)
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    server = optax.sgd(1.0)
    ours, _ = rounds(scaffold(model, client, server, num_clients=data.num_clients), data, 1)
    avg, _ = rounds(fed_avg(model, client, server), data, 1)
    chex.assert_trees_all_close(ours.algorithm.params, avg.algorithm.params, atol=1e-7, rtol=0)


def test_config_and_bad_arguments():
    config = load_config("configs/fashion_mnist_scaffold.yaml")
    assert config.algorithm.name == "scaffold"
    model = tiny_model()
    params = model.init(jax.random.key(0))
    algorithm = create_algorithm("scaffold", model, optax.inject_hyperparams(optax.sgd)(0.1),
                                 optax.sgd(1.0), num_clients=7, **config.algorithm.options)
    state = algorithm.init(params)
    assert jax.tree.leaves(state.client_controls)[0].shape[0] == 7
    with pytest.raises(ValueError, match="needs num_clients"):
        scaffold(model, optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ValueError, match="client_learning_rate"):  # lr not readable
        scaffold(model, optax.sgd(0.1), optax.sgd(1.0), num_clients=3).init(params)
    # ... unless given
    scaffold(model, optax.sgd(0.1), optax.sgd(1.0), num_clients=3,
             client_learning_rate=0.1).init(params)
