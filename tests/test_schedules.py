"""Learning-rate schedules for clients and server: the lr of round r against closed forms."""

import math

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.config import ConfigError, config_from_dict
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import full_participation
from fedjax_sim.optimizers import make_optimizer, make_schedule
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

LR = 0.4


def cosine(r, decay_steps=6, alpha=0.0):
    r = min(r, decay_steps)
    return LR * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * r / decay_steps)) + alpha)


CLOSED_FORMS = {
    "cosine_decay_schedule": ({"decay_steps": 6}, cosine),
    "exponential_decay": ({"transition_steps": 2, "decay_rate": 0.5},
                          lambda r: LR * 0.5 ** (r / 2)),
    "piecewise_constant_schedule": ({"boundaries_and_scales": {"2": 0.5, 4: 0.1}},
                                    lambda r: LR * (1 if r < 2 else 0.5 if r < 4 else 0.05)),
    "linear_schedule": ({"end_value": 0.1, "transition_steps": 3},
                        lambda r: LR + (0.1 - LR) * min(r, 3) / 3),
    "warmup_cosine_decay_schedule": (
        {"peak_value": 1.0, "warmup_steps": 2, "decay_steps": 6},
        lambda r: LR + (1.0 - LR) * r / 2 if r < 2
        else 0.5 * (1 + math.cos(math.pi * (min(r, 6) - 2) / 4))),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_schedule_by_name_matches_its_closed_form(name):
    options, closed_form = CLOSED_FORMS[name]
    schedule = make_schedule({"name": name, **options}, LR)
    for r in range(8):
        np.testing.assert_allclose(float(schedule(r)), closed_form(r), rtol=1e-6, atol=1e-7)


def one_client_round(model, data, client_optimizer, server_optimizer, **kwargs):
    algorithm = fed_avg(model, client_optimizer, server_optimizer, **kwargs)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_steps=1)
    return algorithm, build_round_step(algorithm, data, schedule, full_participation(1), 1)


def loss_grad(model, data, params):
    x, y = data.arrays["x"], data.arrays["y"]
    return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean())(params)


def test_client_learning_rate_of_round_r_is_the_schedule_at_r():
    """1 client x 1 full-batch step per round: round r moves params by lr(r) * gradient."""
    model, data = tiny_model(), tiny_data((8,))
    spec = {"name": "exponential_decay", "transition_steps": 1, "decay_rate": 0.5}
    client_optimizer, schedules = make_optimizer("sgd", LR, schedule=spec, inject_schedule=False)
    assert list(schedules) == ["learning_rate"]
    algorithm, round_step = one_client_round(model, data, client_optimizer, optax.sgd(1.0),
                                             client_schedules=schedules)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 0)
    reference = params
    for r in range(4):
        state, _ = round_step(state)
        lr = LR * 0.5**r
        reference = jax.tree.map(lambda p, g, lr=lr: p - lr * g, reference,
                                 loss_grad(model, data, reference))
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=1e-6, rtol=1e-5)


def test_server_learning_rate_of_round_r_is_the_schedule_at_r():
    model, data = tiny_model(), tiny_data((8,))
    spec = {"name": "cosine_decay_schedule", "decay_steps": 6}
    server_optimizer, schedules = make_optimizer("sgd", LR, schedule=spec)
    assert schedules == {}  # injected: the server's update count is the round
    algorithm, round_step = one_client_round(model, data, optax.sgd(0.5), server_optimizer)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 0)
    reference = params
    for r in range(4):
        state, _ = round_step(state)
        delta = jax.tree.map(lambda g: 0.5 * g, loss_grad(model, data, reference))
        reference = jax.tree.map(lambda p, d, r=r: p - cosine(r) * d, reference, delta)
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("schedule, match", [
    ({"name": "cosine_decay"}, r"client\.optimizer\.schedule\.name.*cosine_decay_schedule"),
    ({"name": "cosine_decay_schedule", "decay_steps": 5, "warmup": 1},
     r"client\.optimizer\.schedule\.warmup.*valid options"),
    ({"name": "cosine_decay_schedule", "decay_steps": 5, "init_value": 1},
     r"schedule\.init_value.*learning_rate"),
    ({"name": "exponential_decay", "transition_steps": 5},
     r"client\.optimizer\.schedule.*needs option.*decay_rate"),
    ({"name": "piecewise_constant_schedule", "boundaries_and_scales": {"x": 1}},
     r"boundaries_and_scales"),
    ({"decay_steps": 5}, r"client\.optimizer\.schedule.*'name'"),
])
def test_bad_schedules_name_the_key(schedule, match):
    with pytest.raises(ConfigError, match=match):
        make_optimizer("sgd", 0.1, schedule=schedule, path="client.optimizer")


def test_config_schedules_reach_the_round(tmp_path):
    """build_experiment: client lr = schedule(round), server lr = schedule(round)."""
    from fedjax_sim.simulation.loop import build_experiment

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 3)).astype(np.float32),
             y=rng.integers(0, 2, 40), client_id=np.repeat(np.arange(4), 10))
    config = config_from_dict({
        "dataset": {"name": "arrays", "path": str(tmp_path / "d.npz")},
        "model": {"name": "logistic"},
        "client": {"optimizer": {"name": "sgd", "learning_rate": LR, "schedule": {
            "name": "exponential_decay", "transition_steps": 1, "decay_rate": 0.5}},
            "batch_size": 10, "local_steps": 1},
        "server": {"optimizer": {"name": "sgd", "learning_rate": 1.0, "schedule": {
            "name": "linear_schedule", "end_value": 0.5, "transition_steps": 2}}},
        "cohort": {"sampler": "full", "size": 4},
    })
    experiment = build_experiment(config)
    state = experiment.init_state()
    # The same round with constant, injected rates set to the closed-form values of round r.
    sgd = optax.inject_hyperparams(optax.sgd)
    plain = fed_avg(experiment.model, sgd(learning_rate=1.0), sgd(learning_rate=1.0))
    check = build_round_step(plain, experiment.dataset.train, experiment.schedule,
                             full_participation(4), 4, donate=False)
    for r in range(3):
        plain_state = plain.init(state.algorithm.params)
        opt_state = plain_state.opt_state
        opt_state.hyperparams["learning_rate"] = np.float32(1.0 + (0.5 - 1.0) * min(r, 2) / 2)
        plain_state = plain_state.replace(
            client_hyperparams={"learning_rate": np.float32(LR * 0.5**r)}, opt_state=opt_state)
        expected, _ = check.jitted(state.replace(algorithm=plain_state), check.data,
                                   check.offsets)
        state, _ = experiment.round_step(state)
        chex.assert_trees_all_close(state.algorithm.params, expected.algorithm.params,
                                    atol=1e-6, rtol=1e-5)
