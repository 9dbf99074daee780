"""FedDyn against a sequential reference written here, over several rounds (the per-client
gradient store and the server's h carry over), with uniform weights (the paper) and with the
default weights by number of examples."""

import chex
import jax
import linear_problem
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.fed_dyn import fed_dyn
from fedjax_sim.config import load_config
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
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


def tree(f, *trees):
    return jax.tree.map(f, *trees)


def reference(model, data, params, cohorts, lr, alpha, weighting="uniform"):
    """Algorithm 1 of the paper, one client and one step at a time.

    The server's mean of the client models is uniform (the paper) or, for ``weighting=
    "num_examples"``, weighted by each client's training-set size; h's update is the paper's
    uniform 1/N sum either way.
    """
    x, y = data.arrays["x"], data.arrays["y"]
    n = data.num_clients
    theta = tree(np.float64, params)
    h = tree(np.zeros_like, theta)
    grads = {i: tree(np.zeros_like, theta) for i in range(n)}  # grad L_i(theta_i^{t-1})
    for cohort in cohorts:
        models, weights = [], []
        for c, i in enumerate(cohort["client_id"]):
            w = theta
            for s in range(cohort["indices"].shape[1]):
                rows = cohort["indices"][c, s][cohort["mask"][c, s]]
                if rows.size == 0:
                    continue
                # the gradient of L_i(w) - <h_i, w> + alpha/2 ||w - theta||^2
                g = tree(lambda g, hi, v, t: np.float64(g) - hi + alpha * (v - t),
                         loss_gradient(model, tree(np.float32, w), x[rows], y[rows]),
                         grads[i], w, theta)
                w = tree(lambda v, g: v - lr * g, w, g)
            grads[i] = tree(lambda g, w, t: g - alpha * (w - t), grads[i], w, theta)
            models.append(w)
            weights.append(1.0 if weighting == "uniform" else float(data.client_sizes[i]))
        p = np.array(weights) / np.sum(weights)
        h = tree(lambda h, t, *ws: h - alpha / n * sum(w - t for w in ws), h, theta, *models)
        theta = tree(lambda h, *ws, p=p: sum(pi * w for pi, w in zip(p, ws, strict=True))
                     - h / alpha, h, *models)
    return theta, h, grads


def run(algorithm, model, data, execution="map", rounds=5):
    """``rounds`` rounds of 3 of the 6 clients, 2 local epochs; the state and the cohorts."""
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    step = build_round_step(spy(algorithm), data, schedule, uniform_sampler(len(SIZES), 3), 3,
                            client_execution=execution)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 2)
    cohorts = []
    for _ in range(rounds):
        state, metrics = step(state)
        cohorts.append(jax.device_get({k: metrics[k] for k in COHORT}))
    return state, cohorts


def assert_state_matches(state, theta, h, grads):
    chex.assert_trees_all_close(state.params, tree(np.float32, theta), atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(state.h, tree(np.float32, h), atol=2e-5, rtol=1e-5)
    for i, gradient in grads.items():
        chex.assert_trees_all_close(tree(lambda x, i=i: x[i], state.client_gradients),
                                    tree(np.float32, gradient), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("execution", ["map", "vmap"])
def test_fed_dyn_matches_sequential_reference_over_rounds(execution):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, alpha = 0.1, 0.3
    algorithm = fed_dyn(model, optax.sgd(lr), optax.sgd(1.0), alpha=alpha,
                        client_weighting="uniform", num_clients=data.num_clients)
    state, cohorts = run(algorithm, model, data, execution)
    params = model.init(jax.random.key(0))
    assert_state_matches(state.algorithm, *reference(model, data, params, cohorts, lr, alpha))
    ids = [int(i) for cohort in cohorts for i in cohort["client_id"]]
    assert max(ids.count(i) for i in set(ids)) >= 2  # some client's h_i was used again


def test_fed_dyn_default_weighting_by_examples_matches_the_reference():
    model, data = tiny_model(), tiny_data(SIZES)
    lr, alpha = 0.1, 0.3
    # The default client_weighting: the mean of the client models is weighted by examples.
    algorithm = fed_dyn(model, optax.sgd(lr), optax.sgd(1.0), alpha=alpha,
                        num_clients=data.num_clients)
    state, cohorts = run(algorithm, model, data)
    params = model.init(jax.random.key(0))
    by_examples = reference(model, data, params, cohorts, lr, alpha, weighting="num_examples")
    assert_state_matches(state.algorithm, *by_examples)
    # The weighting matters here: the uniform reference is far outside the tolerance above.
    uniform, _, _ = reference(model, data, params, cohorts, lr, alpha, weighting="uniform")
    gap = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(by_examples[0]), jax.tree.leaves(uniform), strict=True))
    assert gap > 1e-2, gap


def test_config_and_bad_arguments():
    config = load_config("configs/fashion_mnist_feddyn.yaml")
    assert config.algorithm.name == "fed_dyn" and "alpha" in config.algorithm.options
    model = tiny_model()
    create_algorithm("fed_dyn", model, optax.sgd(0.1), optax.sgd(1.0), num_clients=5,
                     **config.algorithm.options).init(model.init(jax.random.key(0)))
    with pytest.raises(ValueError, match="needs num_clients"):
        fed_dyn(model, optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fed_dyn(model, optax.sgd(0.1), optax.sgd(1.0), alpha=0.0, num_clients=5)


def test_device_padding_takes_no_part_in_secure_aggregation_of_the_model_update():
    """A cohort of 3 over 2 devices is padded with a zero-weight row. With secure aggregation
    (dropouts, stochastic rounding) of the drifts, the padding must take no part in the
    protocol, so 2 devices train what 1 device trains (as every other algorithm does): the
    model update's aggregator is told the cohort's real size, like h's."""
    from fedjax_sim import aggregators
    from fedjax_sim.sharding import client_mesh
    from fedjax_sim.simulation.backend import Backend

    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11, 9))

    def params_after(backend):
        algorithm = fed_dyn(model, optax.sgd(0.1), optax.sgd(1.0), alpha=0.3,
                            num_clients=data.num_clients,
                            aggregator=aggregators.chain(aggregators.clip(1.0),
                                                         aggregators.secure_mean(16, dropout=0.3)))
        schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
        step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 3),
                                3, backend=backend)
        state = step.place(init_simulation_state(algorithm.init(model.init(jax.random.key(0))),
                                                 1))
        for _ in range(3):
            state, _ = step(state)
        return jax.device_get(state.algorithm.params)

    one, two = params_after(Backend()), params_after(Backend(client_mesh(2), "vmap"))
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_paper_algorithm_on_least_squares_with_a_dropped_client():
    """Algorithm 1 in float64 on least squares, uniform weights (the paper): 3 of 6 clients a
    round, the first of them dropping out (not in P_t: its h_k stays, it counts neither in the
    mean of the models nor in h's sum), 4 local steps of SGD on
    ``L_k(w) - <grad L_k(w_k^{t-1}), w> + alpha/2 ||w - theta||^2``;
    ``h <- h - alpha / m sum_{k in P} (w_k - theta)``, ``theta <- mean_P w_k - h / alpha``."""
    data = linear_problem.linear_data((5, 17, 40, 3, 11, 8))
    m, lr, alpha = data.num_clients, 0.05, 0.3

    def drop_first_slot(key, clients):
        del key
        keep = np.arange(clients.mask.shape[0]) != 0
        return clients.replace(mask=clients.mask & keep[:, None, None],
                               num_steps=np.where(keep, 1, 0) * clients.num_steps)

    algorithm = fed_dyn(None, optax.sgd(lr), optax.sgd(1.0), alpha=alpha,
                        client_weighting="uniform", num_clients=m,
                        loss_fn=linear_problem.squared_loss)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=4)
    state, history = linear_problem.run(algorithm, data, schedule, 5, 3,
                                        client_execution="map", system=drop_first_slot)
    theta = np.float64(linear_problem.initial_params()["w"])
    h, grads = np.zeros_like(theta), {k: np.zeros_like(theta) for k in range(m)}
    for cohort in history:
        models = []
        for slot, k in enumerate(cohort["client_id"]):
            batches = linear_problem.batches(cohort, slot)
            if not batches:
                continue
            w = theta.copy()
            for rows in batches:
                w = w - lr * (linear_problem.gradient(w, data, rows) - grads[k]
                              + alpha * (w - theta))
            grads[k] = grads[k] - alpha * (w - theta)
            models.append(w)
        h = h - alpha / m * sum(w - theta for w in models)
        theta = np.mean(models, axis=0) - h / alpha
    np.testing.assert_allclose(state.params["w"], theta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.h["w"], h, rtol=1e-5, atol=1e-6)
    for k in range(m):
        np.testing.assert_allclose(state.client_gradients["w"][k], grads[k], rtol=1e-5,
                                   atol=1e-6)
    assert all(cohort["num_steps"][0] == 0 for cohort in history)  # the dropout happened
