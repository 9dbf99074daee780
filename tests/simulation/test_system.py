"""System heterogeneity (speeds, dropout, stragglers) against numpy references written here."""

from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.config import ConfigError, config_from_dict
from fedjax_sim.core import ClientInput, FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.errors import DataError
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state
from fedjax_sim.simulation.system import client_speeds, make_system, read_trace, system_model

SPEEDS = np.array([0.3, 1.7, 2.5, 0.9, 4.0, 1.0])  # seconds per step of clients 0..5
C, S, B = 6, 5, 2


def cohort(num_steps=(5, 5, 3, 5, 5, 0), ids=(0, 1, 2, 3, 4, 5)):
    num_steps = np.array(num_steps, np.int32)
    mask = np.arange(S)[None, :, None] < num_steps[:, None, None]
    mask = np.broadcast_to(mask, (C, S, B)).copy()
    return ClientInput(
        client_id=jnp.array(ids, jnp.int32),
        indices=jnp.arange(C * S * B, dtype=jnp.int32).reshape(C, S, B),
        mask=jnp.asarray(mask),
        num_steps=jnp.asarray(num_steps),
        num_examples=jnp.array([10, 10, 6, 10, 10, 0], jnp.int32),
        valid=jnp.ones(C, bool),
        key=jax.random.split(jax.random.key(0), C),
        duration=jnp.asarray(num_steps, jnp.float32),
    )


def test_default_section_is_no_system_model():
    assert make_system(10, 0) is None
    assert make_system(10, 0, dropout=0.1) is not None


def test_speed_models_are_drawn_once_from_the_seed():
    lognormal = client_speeds(50, seed=3, speed="lognormal", speed_sigma=0.7,
                              seconds_per_step=2.0)
    rng = np.random.default_rng(3)
    np.testing.assert_allclose(lognormal, 2.0 * np.exp(rng.normal(0.0, 0.7, 50)))
    uniform = client_speeds(1000, seed=1, speed="uniform", speed_sigma=0.5)
    assert 1.0 <= uniform.min() and uniform.max() <= 1.5 and abs(uniform.mean() - 1.25) < 0.02
    np.testing.assert_array_equal(client_speeds(4, 0, seconds_per_step=0.5), np.full(4, 0.5))


def test_durations_are_steps_times_seconds_per_step():
    clients = system_model(SPEEDS)(jax.random.key(1), cohort())
    np.testing.assert_allclose(clients.duration, np.array([5, 5, 3, 5, 5, 0]) * SPEEDS,
                               rtol=1e-6)
    np.testing.assert_array_equal(clients.mask, cohort().mask)


def test_stragglers_keep_the_steps_that_fit_before_the_deadline():
    deadline = 5.0
    before = cohort()
    after = system_model(SPEEDS, deadline=deadline)(jax.random.key(1), before)
    steps = np.array([5, 5, 3, 5, 5, 0])
    allowed = np.floor(deadline / SPEEDS).astype(int)  # 16, 2, 2, 5, 1, 5
    expected_steps = np.minimum(steps, allowed)
    np.testing.assert_array_equal(after.num_steps, expected_steps)  # 5, 2, 2, 5, 1, 0
    expected_mask = np.asarray(before.mask).copy()
    for c in range(C):
        expected_mask[c, expected_steps[c]:] = False
    np.testing.assert_array_equal(after.mask, expected_mask)
    np.testing.assert_allclose(after.duration, np.minimum(steps * SPEEDS, deadline), rtol=1e-6)


@pytest.mark.parametrize("deadline, seconds", [("0.45", "0.15"), ("0.9", "0.3"), ("1.8", "0.6"),
                                              ("1.0", "0.25"), ("0.7", "0.35")])
def test_a_deadline_that_is_a_whole_number_of_steps_keeps_them_all(deadline, seconds):
    """k steps of s seconds fit a deadline d when k * s <= d, decided exactly (fractions), not
    by a float32 division (0.9 / 0.3 came out below 3: a step that fits was cut)."""
    steps = np.array([5, 5, 3, 2, 4, 0])
    after = system_model(np.full(C, float(seconds)), deadline=float(deadline))(
        jax.random.key(1), cohort(steps))
    fit = int(Fraction(deadline) // Fraction(seconds))
    np.testing.assert_array_equal(after.num_steps, np.minimum(steps, fit))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropout_drops_the_clients_its_key_says(seed):
    key = jax.random.key(seed)
    after = system_model(SPEEDS, dropout=0.5)(key, cohort())
    dropped = np.asarray(jax.random.uniform(key, (C,))) < 0.5
    np.testing.assert_array_equal(np.asarray(after.mask).any(axis=(1, 2)),
                                  ~dropped & (np.array([5, 5, 3, 5, 5, 0]) > 0))
    np.testing.assert_array_equal(after.num_steps == 0, dropped | (np.arange(C) == 5))
    np.testing.assert_array_equal(np.asarray(after.num_examples) == 0,
                                  dropped | (np.arange(C) == 5))
    assert np.all(np.asarray(after.duration)[dropped] == 0)
    assert np.all(np.asarray(after.valid))  # still fills its device shard


def test_dropout_rate_over_many_rounds():
    hook = jax.jit(jax.vmap(system_model(SPEEDS, dropout=0.3), in_axes=(0, None)))
    after = hook(jax.random.split(jax.random.key(0), 2000), cohort(num_steps=(5,) * 6))
    rate = float(np.mean(np.asarray(after.num_steps) == 0))
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / (2000 * C))


def test_traces_npy_and_csv(tmp_path):
    np.save(tmp_path / "speeds.npy", SPEEDS)
    (tmp_path / "speeds.csv").write_text("\n".join(str(v) for v in SPEEDS) + "\n")
    np.testing.assert_allclose(read_trace(tmp_path / "speeds.npy", C), SPEEDS)
    np.testing.assert_allclose(read_trace(tmp_path / "speeds.csv", C), SPEEDS)
    np.testing.assert_allclose(
        client_speeds(C, 0, speed="trace", trace=str(tmp_path / "speeds.csv")), SPEEDS)
    with pytest.raises(DataError, match=r"speeds\.npy.*expected 7 values.*got 6"):
        read_trace(tmp_path / "speeds.npy", 7)
    with pytest.raises(DataError, match="no such file"):
        read_trace(tmp_path / "missing.npy", C)
    (tmp_path / "bad.csv").write_text("1.0\n-2\n")
    with pytest.raises(DataError, match=r"bad\.csv.*client 1"):
        read_trace(tmp_path / "bad.csv", 2)
    with pytest.raises(ValueError, match="trace: speed is 'trace' but no trace file"):
        client_speeds(C, 0, speed="trace")


@pytest.mark.parametrize("system, key", [
    ({"speed": "trace"}, "'system.trace': speed is 'trace' but no trace file"),
    ({"speed": "lognormal", "trace": "speeds.npy"}, "'system.speed': 'lognormal' conflicts"),
])
def test_config_errors_name_the_system_key(tmp_path, system, key):
    from fedjax_sim.simulation.loop import build_experiment

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(12, 3)).astype(np.float32),
             y=rng.integers(0, 2, 12), client_id=np.repeat(np.arange(4), 3))
    config = config_from_dict({"dataset": {"name": "arrays", "path": str(tmp_path / "d.npz")},
                               "model": {"name": "logistic"}, "cohort": {"size": 2},
                               "system": system})
    with pytest.raises(ConfigError, match=key):
        build_experiment(config)


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        c = cohort.clients
        return state, {**metrics, "ids": c.client_id, "indices": c.indices, "mask": c.mask,
                       "num_steps": c.num_steps}

    return FederatedAlgorithm(algorithm.init, apply)


_GRADS = {}


def batch_grad(model):
    """The mean cross-entropy gradient of one batch (jitted once per model and batch shape)."""
    if id(model) not in _GRADS:
        _GRADS[id(model)] = jax.jit(jax.grad(
            lambda q, x, y: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(q, x), y).mean()))
    return _GRADS[id(model)]


def sequential_fedavg(model, params, data, ids, indices, mask, lr):
    """FedAvg over the clients that ran a step: a Python loop; weights = client sizes."""
    x, y = data.arrays["x"], data.arrays["y"]
    grad_fn = batch_grad(model)
    deltas, weights = [], []
    for c in range(len(ids)):
        if not mask[c].any():
            continue  # dropped: excluded from the mean outright
        p = params
        for s in range(indices.shape[1]):
            rows = indices[c, s][mask[c, s]]
            if rows.size == 0:
                continue
            grads = grad_fn(p, x[rows], y[rows])
            p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
        deltas.append(jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), params, p))
        weights.append(float(data.client_sizes[ids[c]]))
    w = np.array(weights) / np.sum(weights)
    mean = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d, strict=True)), *deltas)
    return jax.tree.map(lambda a, d: (np.float64(a) - d).astype(np.float32), params, mean)


def test_fedavg_with_dropout_and_deadline_equals_fedavg_on_the_rest():
    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11, 9))
    speeds = np.array([0.3, 1.7, 2.5, 0.9, 4.0, 1.0])
    deadline, steps = 4.0, 4
    algorithm = spy(fed_avg(model, optax.sgd(0.2), optax.sgd(1.0)))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=steps)
    hook = system_model(speeds, dropout=0.4, deadline=deadline)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(6, 5), 5,
                                  client_execution="map", system=hook)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 3)
    reference = params
    seen_dropped = seen_cut = 0
    for _ in range(4):
        state, metrics = round_step(state)
        m = jax.device_get(metrics)
        allowed = np.minimum(np.floor(deadline / speeds[m["ids"]]).astype(int), steps)
        dropped = m["num_steps"] == 0
        np.testing.assert_array_equal(m["num_steps"][~dropped], allowed[~dropped])
        assert m["system/dropped"] == dropped.sum()
        durations = np.where(dropped, 0.0, np.minimum(steps * speeds[m["ids"]], deadline))
        np.testing.assert_allclose(m["system/round_seconds"], durations.max(), rtol=1e-6)
        seen_dropped += dropped.sum()
        seen_cut += np.sum(~dropped & (allowed < steps))
        reference = sequential_fedavg(model, reference, data, m["ids"], m["indices"],
                                      m["mask"], 0.2)
        chex.assert_trees_all_close(state.algorithm.params, reference, atol=1e-5, rtol=1e-5)
    assert seen_dropped > 0 and seen_cut > 0  # both effects were exercised


def test_config_wires_system_and_sampler(tmp_path):
    from fedjax_sim.simulation.loop import build_experiment

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)).astype(np.float32),
             y=rng.integers(0, 2, 60), client_id=np.repeat(np.arange(6), 10))
    np.save(tmp_path / "speeds.npy", SPEEDS)
    base = {
        "dataset": {"name": "arrays", "path": str(tmp_path / "d.npz")},
        "model": {"name": "logistic"},
        "client": {"optimizer": {"name": "sgd", "learning_rate": 0.1}, "batch_size": 5,
                   "local_steps": 4},
        "cohort": {"size": 8, "sampler": "weighted", "replace": True},
        "system": {"speed": "trace", "trace": str(tmp_path / "speeds.npy"), "deadline": 2.0,
                   "dropout": 0.3},
    }
    experiment = build_experiment(config_from_dict(base))
    state, metrics = experiment.round_step(experiment.init_state())
    metrics = jax.device_get(metrics)
    assert experiment.round_step.cohort_size == 8  # more than the 6 clients: with replacement
    # 2 s deadline: every client that ran is cut to floor(2 / seconds per step) <= 4 steps.
    assert metrics["system/round_seconds"] <= 2.0
    assert 0 <= metrics["system/dropped"] <= 8
    bad = {**base, "system": {"speed": "trace", "trace": str(tmp_path / "speeds.npy")},
           "cohort": {"size": 5, "sampler": "weighted"}}
    np.save(tmp_path / "speeds.npy", SPEEDS[:5])
    with pytest.raises(DataError, match=r"speeds\.npy.*expected 6 values"):
        build_experiment(config_from_dict(bad))
