"""FedAvg's weighting against a float64 loop on least squares (client weights n_k ** p, a client
without examples), and every algorithm on a round in which no client trains."""

import jax
import linear_problem
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import ALGORITHMS, create_algorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.data.batching import ClientSchedule


@pytest.mark.parametrize("weighting, exponent", [(0.5, 0.5), ("uniform", 0.0),
                                                 ("num_examples", 1.0)])
def test_weights_are_num_examples_to_the_power_p_on_least_squares(weighting, exponent):
    """x+ = x - eta_g sum_k p_k (x - y_k), p_k proportional to n_k ** p over the clients that
    trained; 2 local epochs (different step counts); the client with no example (sampled in
    every round: the whole population is the cohort) takes no step and has no weight."""
    data = linear_problem.linear_data((5, 0, 17, 40, 3))
    lr, server_lr = 0.05, 0.7
    algorithm = fed_avg(None, optax.sgd(lr), optax.sgd(server_lr), client_weighting=weighting,
                        loss_fn=linear_problem.squared_loss)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=2)
    state, history = linear_problem.run(algorithm, data, schedule, 3, data.num_clients,
                                        client_execution="map")
    x = np.float64(linear_problem.initial_params()["w"])
    for cohort in history:
        deltas, weights = [], []
        for slot, k in enumerate(cohort["client_id"]):
            batches = linear_problem.batches(cohort, slot)
            if not batches:
                continue
            y = x.copy()
            for rows in batches:
                y = y - lr * linear_problem.gradient(y, data, rows)
            deltas.append(x - y)
            weights.append(float(data.client_sizes[k]) ** exponent)
        p = np.array(weights) / np.sum(weights)
        x = x - server_lr * sum(pi * d for pi, d in zip(p, deltas, strict=True))
        assert len(weights) == 4 and 1 in cohort["client_id"].tolist()  # the empty client
    np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-6)


def drop_everyone(key, clients):
    """A system model: every client of the cohort drops out."""
    del key
    return clients.replace(mask=clients.mask & False, num_steps=clients.num_steps * 0,
                           num_examples=clients.num_examples * 0)


@pytest.mark.filterwarnings("ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_round_in_which_no_client_trains_changes_no_params(name):
    """Nothing to average: the model stays where it is and the state stays finite (no 0 / 0
    in a weighted mean, FedNova's tau_eff, q-FFL's denominator, FedDyn's h / alpha)."""
    data = linear_problem.linear_data((5, 0, 17, 40, 3))
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    options = {"concurrency": 2} if name == "fed_buff" else {}
    algorithm = create_algorithm(name, None, client, optax.sgd(1.0),
                                 num_clients=data.num_clients,
                                 loss_fn=linear_problem.squared_loss, **options)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    state, _ = linear_problem.run(algorithm, data, schedule, 3, 2, system=drop_everyone)
    np.testing.assert_array_equal(state.params["w"], linear_problem.initial_params()["w"])
    for leaf in jax.tree.leaves(state):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert np.isfinite(leaf).all()
