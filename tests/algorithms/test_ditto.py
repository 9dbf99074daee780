"""Ditto against a plain Python loop over clients and steps written from the paper."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import loss_gradient, spy, tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)
COHORT_KEYS = ("ids", "indices", "mask", "valid")




def make_round(data, algorithm, cohort_size=3, **kwargs):
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    return build_round_step(algorithm, data, schedule, sampler, cohort_size, **kwargs)






def reference_round(model, params, personal, data, cohort, lr, lam, personal_steps):
    """Ditto (Li et al. 2021, Algorithm 1) with FedAvg and plain SGD: loops over clients/steps.

    ``personal``: {client: params}, updated in place for the cohort's clients.
    """
    x, y = data.arrays["x"], data.arrays["y"]
    w = [np.float64(leaf) for leaf in jax.tree.leaves(params)]
    treedef = jax.tree.structure(params)
    deltas, weights = [], []
    for c in range(len(cohort["ids"])):
        if not cohort["valid"][c]:
            continue
        k = int(cohort["ids"][c])
        p, v = params, personal[k]
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]
            if rows.size == 0:
                continue
            grads = loss_gradient(model, p, x[rows], y[rows])
            p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
            if s < personal_steps:  # grad F_k(v) + lam * (v - w^t)
                grads = loss_gradient(model, v, x[rows], y[rows])
                v = jax.tree.map(lambda a, g, b: a - lr * (g + lam * (a - b)), v, grads, params)
        personal[k] = v
        deltas.append([a - np.float64(b) for a, b in zip(w, jax.tree.leaves(p), strict=True)])
        weights.append(float(data.client_sizes[k]))
    weights = np.array(weights) / np.sum(weights)
    new = [a - sum(wi * d[i] for wi, d in zip(weights, deltas, strict=True))
           for i, a in enumerate(w)]
    return jax.tree.unflatten(treedef, [np.float32(a) for a in new])


@pytest.mark.parametrize(("execution", "personal_steps"),
                         [("map", None), ("vmap", 2), ("mesh4", None)])
def test_round_matches_sequential_reference(execution, personal_steps):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, lam = 0.2, 0.5
    algorithm = spy(ditto(model, optax.sgd(lr), optax.sgd(1.0), lam=lam,
                          personal_steps=personal_steps, num_clients=data.num_clients))
    kwargs = {"mesh": client_mesh(4)} if execution == "mesh4" else \
        {"client_execution": execution}
    round_step = make_round(data, algorithm, **kwargs)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 4)
    reference, personal = params, {k: params for k in range(data.num_clients)}
    for _ in range(4):
        state, metrics = round_step(state)
        cohort = jax.device_get({k: metrics[k] for k in COHORT_KEYS})
        reference = reference_round(model, reference, personal, data, cohort, lr, lam,
                                    personal_steps or 10**9)
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=1e-5, rtol=1e-5)
        # Every client's row, sampled this round or not (the reference leaves those alone).
        for k in range(data.num_clients):
            row = jax.tree.map(lambda leaf, k=k: leaf[k], state.algorithm.personal_params)
            chex.assert_trees_all_close(row, personal[k], atol=1e-5, rtol=1e-5)


def test_global_model_is_fed_avg():
    """Ditto's global model is trained by FedAvg alone: the personal updates never touch it."""
    model, data = tiny_model(), tiny_data(SIZES)
    params = model.init(jax.random.key(0))
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    results = []
    for algorithm in (fed_avg(model, client, optax.adam(0.05)),
                      ditto(model, client, optax.adam(0.05), lam=1.0,
                            num_clients=data.num_clients)):
        round_step = make_round(data, algorithm)
        state = init_simulation_state(algorithm.init(params), 1)
        for _ in range(3):
            state, _ = round_step(state)
        results.append(jax.device_get(state.algorithm.params))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-6, rtol=1e-6)


def test_registry_options_and_errors():
    model = tiny_model()
    algorithm = create_algorithm("ditto", model, optax.sgd(0.1), optax.sgd(1.0), lam=0.3,
                                 num_clients=6, client_weighting="uniform")
    state = algorithm.init(model.init(jax.random.key(0)))
    assert all(leaf.shape[0] == 6 for leaf in jax.tree.leaves(state.personal_params))
    assert float(state.lam) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="num_clients"):
        ditto(model, optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ValueError, match="lam"):
        ditto(model, optax.sgd(0.1), optax.sgd(1.0), lam=-1.0, num_clients=3)
