"""FedNova against a sequential reference written here (clients of different sizes, so their
numbers of local steps differ), and against FedAvg when every client runs the same steps."""

import chex
import jax
import linear_problem
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.fed_nova import fed_nova
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


def rounds(algorithm, data, n, schedule, **kwargs):
    step = build_round_step(spy(algorithm), data, schedule, uniform_sampler(len(SIZES), 3), 3,
                            **kwargs)
    state = init_simulation_state(algorithm.init(tiny_model().init(jax.random.key(0))), 5)
    cohorts, metrics = [], []
    for _ in range(n):
        state, m = step(state)
        cohorts.append(jax.device_get({k: m[k] for k in COHORT}))
        metrics.append(jax.device_get(m))
    return state, cohorts, metrics


def reference_round(model, params, data, cohort, lr, rho):
    """FedNova with local heavy-ball SGD, a_i counted step by step (no closed form)."""
    x, y = data.arrays["x"], data.arrays["y"]
    normalized, a, weights = [], [], []
    for c, client in enumerate(cohort["client_id"]):
        w, m, current, total = params, None, [], []
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]
            if rows.size == 0:
                continue
            g = loss_gradient(model, w, x[rows], y[rows])
            m = g if m is None else jax.tree.map(lambda g, m: g + rho * m, g, m)
            w = jax.tree.map(lambda v, m: v - lr * m, w, m)
            # gradient j's weight in this step's momentum is rho^(k - j); a_i sums them all
            current = [rho * cj for cj in current] + [1.0]
            total = [t + cj for t, cj in zip(total + [0.0], current, strict=True)]
        a_i = sum(total)
        a.append(a_i)
        normalized.append(jax.tree.map(lambda p, q, a_i=a_i: (np.float64(p) - np.float64(q)) / a_i,
                                       params, w))
        weights.append(float(data.client_sizes[client]))
    p = np.array(weights) / np.sum(weights)
    tau_eff = float(np.sum(p * np.array(a)))
    new = jax.tree.map(
        lambda w0, *d: (w0 - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
                        ).astype(np.float32), params, *normalized)
    return new, tau_eff


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_fed_nova_matches_sequential_reference(rho):
    model, data = tiny_model(), tiny_data(SIZES)
    lr = 0.1
    # momentum 0 is left out of the injected state on purpose: rho comes from the option then
    client = (optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=rho) if rho
              else optax.sgd(lr))
    algorithm = fed_nova(model, client, optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    state, cohorts, metrics = rounds(algorithm, data, 3, schedule,
                                     client_execution="vmap" if rho else "map")
    assert any(len(set(c["num_steps"].tolist())) > 1 for c in cohorts)  # tau_i differ
    params = model.init(jax.random.key(0))
    for cohort, m in zip(cohorts, metrics, strict=True):
        params, tau_eff = reference_round(model, params, data, cohort, lr, rho)
        np.testing.assert_allclose(m["train/tau_eff"], tau_eff, rtol=1e-6)
    chex.assert_trees_all_close(state.algorithm.params, params, atol=1e-5, rtol=1e-5)


def test_same_number_of_steps_is_fed_avg():
    model, data = tiny_model(), tiny_data(SIZES)
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=3)
    nova, _, _ = rounds(fed_nova(model, client, optax.adam(0.05)), data, 3, schedule)
    avg, _, _ = rounds(fed_avg(model, client, optax.adam(0.05)), data, 3, schedule)
    chex.assert_trees_all_close(nova.algorithm.params, avg.algorithm.params, atol=1e-6, rtol=1e-6)


def test_config_and_bad_momentum():
    config = load_config("configs/fashion_mnist_fednova.yaml")
    assert config.algorithm.name == "fed_nova"
    model = tiny_model()
    create_algorithm("fed_nova", model, optax.sgd(0.1), optax.sgd(1.0), num_clients=5,
                     **config.algorithm.options).init(model.init(jax.random.key(0)))
    with pytest.raises(ValueError, match="momentum must be in"):
        fed_nova(model, optax.sgd(0.1), optax.sgd(1.0), momentum=1.0)


# --- The paper's update on least squares, with a numpy float64 reference -----------------------


def drop_first_client(key, clients):
    """A system model: the cohort's first client drops out (no step, weight 0)."""
    del key
    keep = np.arange(clients.mask.shape[0]) != 0
    return clients.replace(mask=clients.mask & keep[:, None, None],
                           num_steps=np.where(keep, 1, 0) * clients.num_steps)


def paper_round(x, data, cohort, lr, rho, server_lr, exponent, normalize=True):
    """FedNova (Wang et al. 2020, eq. (5) / Appendix) with local heavy-ball SGD, in float64.

    Client i steps ``y <- y - lr * buffer``, ``buffer = g + rho * buffer``, so its delta is
    ``lr * sum_j c_j g_j``, c_j the total weight gradient j gets over the remaining steps, and
    a_i = sum_j c_j, accumulated here step by step (no closed form):
    ``x+ = x - server_lr * tau_eff * sum_i p_i delta_i / a_i``, ``tau_eff = sum_i p_i a_i``.
    ``normalize=False``: a_i = 1 (FedAvg's weighted mean of the deltas, times tau_eff).
    """
    deltas, a, p = [], [], []
    for c, k in enumerate(cohort["client_id"]):
        steps = linear_problem.batches(cohort, c)
        if not steps:
            continue  # dropped: not in the average at all
        y, buffer, in_buffer, a_i = x.copy(), np.zeros_like(x), [], 0.0
        for rows in steps:
            buffer = linear_problem.gradient(y, data, rows) + rho * buffer
            y = y - lr * buffer
            in_buffer = [rho * weight for weight in in_buffer] + [1.0]  # gradients' weights
            a_i += sum(in_buffer)
        deltas.append(x - y)
        a.append(a_i if normalize else 1.0)
        p.append(float(data.client_sizes[k]) ** exponent)
    p = np.array(p) / np.sum(p)
    tau_eff = float(np.sum(p * np.array(a)))
    direction = sum(pi * d / ai for pi, d, ai in zip(p, deltas, a, strict=True))
    return x - server_lr * tau_eff * direction, tau_eff


@pytest.mark.parametrize("optimizer, weighting", [
    ("plain_momentum", "num_examples"),  # optax.sgd(lr, momentum=rho): rho from its steps
    ("injected_momentum", "uniform"),  # the config's sgd: rho read from the state
    ("plain_sgd", 0.5),
])
def test_normalized_averaging_matches_the_paper_on_least_squares(optimizer, weighting):
    """Clients of different sizes run 1 local epoch (tau_i differ), the first client of every
    cohort drops out, the server steps with lr 0.7: the params and tau_eff against a float64
    loop written from the paper."""
    lr, rho, server_lr = 0.05, 0.6, 0.7
    client = {"plain_momentum": optax.sgd(lr, momentum=rho),
              "injected_momentum": optax.inject_hyperparams(optax.sgd)(learning_rate=lr,
                                                                       momentum=rho),
              "plain_sgd": optax.sgd(lr)}[optimizer]
    rho = 0.0 if optimizer == "plain_sgd" else rho
    exponent = {"num_examples": 1.0, "uniform": 0.0}.get(weighting, weighting)
    data = linear_problem.linear_data((5, 17, 40, 3, 11, 26))
    algorithm = fed_nova(None, client, optax.sgd(server_lr), client_weighting=weighting,
                         loss_fn=linear_problem.squared_loss)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    state, history = linear_problem.run(algorithm, data, schedule, 3, 4, client_execution="map",
                                        system=drop_first_client)
    start = np.float64(linear_problem.initial_params()["w"])
    x, plain = start, start
    for cohort in history:
        x, tau_eff = paper_round(x, data, cohort, lr, rho, server_lr, exponent)
        np.testing.assert_allclose(cohort["train/tau_eff"], tau_eff, rtol=1e-5)
        # without the normalization the same local training ends elsewhere
        plain = paper_round(plain, data, cohort, lr, rho, server_lr, exponent,
                            normalize=False)[0]
    np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-6)
    assert np.abs(plain - x).max() > 1e-2
    assert any(len(set(c["num_steps"][1:].tolist())) > 1 for c in history)  # tau_i differ
    assert all(c["num_steps"][0] == 0 for c in history)  # the dropout happened


@pytest.mark.parametrize("client", [
    optax.sgd(0.05, momentum=0.6, nesterov=True),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.6, nesterov=True),
    optax.adagrad(0.05),
])
def test_steps_that_are_not_heavy_ball_sgd_are_refused_unless_momentum_is_given(client):
    """a_i is heavy-ball SGD's: for Nesterov momentum (each gradient weighs 1 + rho (1 -
    rho^m) / (1 - rho), not (1 - rho^m) / (1 - rho)) or Adagrad it would be wrong, silently."""
    with pytest.raises(ValueError, match=r"fed_nova: the client optimizer's steps.*momentum="):
        fed_nova(None, client, optax.sgd(1.0), loss_fn=linear_problem.squared_loss)
    fed_nova(None, client, optax.sgd(1.0), momentum=0.0, loss_fn=linear_problem.squared_loss)
