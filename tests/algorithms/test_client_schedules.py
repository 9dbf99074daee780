"""Client learning-rate schedules reach the zoo's local training: a schedule that gives lr(r)
in round r trains exactly like the same algorithm built with that constant learning rate."""

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)


def _params_after(name, client_optimizer, rounds, **kwargs):
    model, data = tiny_model(), tiny_data(SIZES)
    if name == "scaffold":  # weights by examples would warn (its corrections do not cancel)
        kwargs["client_weighting"] = "uniform"
    algorithm = create_algorithm(name, model, client_optimizer, optax.sgd(1.0),
                                 num_clients=len(SIZES), **kwargs)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    step = build_round_step(algorithm, data, schedule, uniform_sampler(len(SIZES), 3), 3)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 3)
    for _ in range(rounds):
        state, _ = step(state)
    return jax.device_get(state.algorithm.params)


@pytest.mark.parametrize("name", ["fed_avg", "fed_prox", "fed_nova", "fed_dyn", "scaffold"])
def test_a_constant_schedule_equals_that_learning_rate(name):
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    scheduled = _params_after(name, injected, 2,
                              client_schedules={"learning_rate": lambda r: 0.05 + 0.0 * r})
    constant = _params_after(name, optax.inject_hyperparams(optax.sgd)(learning_rate=0.05), 2)
    for a, b in zip(jax.tree.leaves(scheduled), jax.tree.leaves(constant), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
