"""q-FFL (q-FedAvg) against a plain Python loop over clients and steps written from the paper."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import loss_gradient, mean_loss, spy, tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.q_ffl import q_ffl
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)
COHORT_KEYS = ("ids", "indices", "mask", "valid", "num_examples")




def make_round(data, algorithm, cohort_size=3, **kwargs):
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    return build_round_step(algorithm, data, schedule, sampler, cohort_size, **kwargs)






def reference_round(model, params, data, cohort, lr, q, exponent):
    """q-FedAvg (Li et al. 2020, Algorithm 2) with server SGD 1: a loop over clients and steps."""
    x, y = data.arrays["x"], data.arrays["y"]
    leaves, treedef = jax.tree.flatten(params)
    w = [np.float64(leaf) for leaf in leaves]
    lipschitz = 1.0 / lr
    numerator = [np.zeros_like(leaf) for leaf in w]
    denominator = 0.0
    for c in range(len(cohort["ids"])):
        if not cohort["valid"][c]:
            continue
        k = int(cohort["ids"][c])
        lo, hi = data.offsets[k], data.offsets[k + 1]
        loss = float(mean_loss(model, params, x[lo:hi], y[lo:hi])) + 1e-10  # F_k(w^t), all data
        p = params
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]
            if rows.size == 0:
                continue
            grads = loss_gradient(model, p, x[rows], y[rows])
            p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
        dw = [lipschitz * (a - np.float64(b)) for a, b in zip(w, jax.tree.leaves(p), strict=True)]
        weight = float(data.client_sizes[k]) ** exponent
        h = (q * loss ** (q - 1) * sum(np.sum(d**2) for d in dw) + lipschitz * loss**q)
        numerator = [n + weight * loss**q * d for n, d in zip(numerator, dw, strict=True)]
        denominator += weight * h
    new = [a - n / denominator for a, n in zip(w, numerator, strict=True)]
    return jax.tree.unflatten(treedef, [np.float32(a) for a in new])


@pytest.mark.parametrize(("q", "execution", "weighting"), [
    (0.5, "map", "num_examples"), (5.0, "vmap", "num_examples"), (2.0, "map", "uniform"),
    (2.0, "mesh4", "num_examples"),
])
def test_round_matches_sequential_reference(q, execution, weighting):
    model, data = tiny_model(), tiny_data(SIZES)
    lr = 0.1
    algorithm = spy(q_ffl(model, optax.inject_hyperparams(optax.sgd)(learning_rate=lr),
                          optax.sgd(1.0), q=q, client_weighting=weighting))
    kwargs = {"mesh": client_mesh(4)} if execution == "mesh4" else \
        {"client_execution": execution}
    round_step = make_round(data, algorithm, **kwargs)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 3)
    reference = params
    for _ in range(3):
        state, metrics = round_step(state)
        cohort = jax.device_get({k: metrics[k] for k in COHORT_KEYS})
        reference = reference_round(model, reference, data, cohort, lr, q,
                                    1.0 if weighting == "num_examples" else 0.0)
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=2e-5, rtol=2e-5)


def test_lipschitz_constant_explicit_or_from_the_scheduled_learning_rate():
    """L = 1 / lr by default, from the round's (scheduled) lr; an explicit L overrides it."""
    model, data = tiny_model(), tiny_data(SIZES)
    params = model.init(jax.random.key(0))

    def one_round(lr, **kwargs):
        client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
        algorithm = q_ffl(model, client, optax.sgd(1.0), q=1.0, **kwargs)
        state = init_simulation_state(algorithm.init(params), 0)
        state, _ = make_round(data, algorithm)(state)
        return jax.device_get(state.algorithm.params)

    default = one_round(0.2)
    chex.assert_trees_all_close(one_round(0.2, lipschitz=5.0), default, atol=1e-6)
    scheduled = one_round(0.9, client_schedules={"learning_rate": lambda r: 0.2})
    chex.assert_trees_all_close(scheduled, default, atol=1e-6)
    other = one_round(0.2, lipschitz=50.0)
    assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(default)[0])


@pytest.mark.parametrize(("weighting", "server"), [("num_examples", "sgd"), ("uniform", "adam")])
def test_q_zero_is_fed_avg(weighting, server):
    """The paper's special case: q = 0 reduces q-FedAvg to FedAvg (same client weights)."""
    model, data = tiny_model(), tiny_data(SIZES)
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    server_opt = optax.sgd(1.0) if server == "sgd" else optax.adam(0.05)
    params = model.init(jax.random.key(0))
    results = []
    for algorithm in (fed_avg(model, client, server_opt, client_weighting=weighting),
                      q_ffl(model, client, server_opt, q=0.0, client_weighting=weighting)):
        round_step = make_round(data, algorithm)
        state = init_simulation_state(algorithm.init(params), 1)
        for _ in range(3):
            state, _ = round_step(state)
        results.append(jax.device_get(state.algorithm.params))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-6, rtol=1e-6)


def test_registry_options_and_errors():
    model = tiny_model()
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    algorithm = create_algorithm("q_ffl", model, client, optax.sgd(1.0), q=5.0, num_clients=5)
    assert float(algorithm.init(model.init(jax.random.key(0))).q) == 5.0
    with pytest.raises(ValueError, match="q must be >= 0"):
        q_ffl(model, client, optax.sgd(1.0), q=-1.0)
    with pytest.raises(ValueError, match="client_weighting"):
        q_ffl(model, client, optax.sgd(1.0), client_weighting="by_size")
    plain = q_ffl(model, optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ValueError, match="lipschitz"):
        plain.init(model.init(jax.random.key(0)))
