"""The jitted round against an independent, plain sequential per-client loop written here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sampling import full_participation, uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    """Wraps an algorithm so the round also returns the cohort it trained on."""

    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        c = cohort.clients
        return state, {**metrics, "ids": c.client_id, "indices": c.indices, "mask": c.mask,
                       "valid": c.valid, "num_examples": c.num_examples}

    return FederatedAlgorithm(algorithm.init, apply)


def reference_round(model, params, data: FederatedData, cohort, client_opt, server_opt,
                    server_state):
    """FedAvg/FedOpt written as the paper says: a Python loop over clients and their batches."""
    x, y = data.arrays["x"], data.arrays["y"]
    deltas, weights = [], []
    for c in range(len(cohort["ids"])):
        if not cohort["valid"][c]:
            continue
        p, opt_state = params, client_opt.init(params)
        for s in range(cohort["indices"].shape[1]):
            rows = cohort["indices"][c, s][cohort["mask"][c, s]]  # drop padding outright
            if rows.size == 0:
                continue

            def loss(q, rows=rows):
                logits = model.apply(q, x[rows])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

            updates, opt_state = client_opt.update(jax.grad(loss)(p), opt_state, p)
            p = optax.apply_updates(p, updates)
        deltas.append(jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), params, p))
        weights.append(float(data.client_sizes[cohort["ids"][c]]))
    w = np.array(weights) / np.sum(weights)
    mean_delta = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d, strict=True)),
                              *deltas)
    mean_delta = jax.tree.map(lambda d: d.astype(np.float32), mean_delta)
    updates, server_state = server_opt.update(mean_delta, server_state, params)
    return optax.apply_updates(params, updates), server_state


def make_round(data, algorithm, cohort_size=3, schedule=None, **kwargs):
    schedule = schedule or ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    return build_round_step(algorithm, data, schedule, sampler, cohort_size, **kwargs)


MESH4 = "mesh4"


# Each client execution once, each server optimizer under several (the two are independent).
@pytest.mark.parametrize("server, execution", [
    ("fedavg", ("vmap", None)), ("fedadam", ("vmap", None)), ("fedadam", ("map", None)),
    ("fedavg", ("map", 2)), ("fedadam", ("map", 3)), ("fedavg", MESH4), ("fedadam", MESH4),
])
def test_round_matches_sequential_reference(server, execution):
    model, data = tiny_model(), tiny_data(SIZES)
    client_opt = optax.sgd(0.1, momentum=0.9)
    server_opt = optax.sgd(1.0) if server == "fedavg" else optax.adam(0.05)
    algorithm = spy(fed_avg(model, client_opt, server_opt))
    if execution == MESH4:
        mesh = client_mesh(4)
        round_step = make_round(data, algorithm, mesh=mesh)  # cohort 3 padded to 4
    else:
        round_step = make_round(data, algorithm, client_execution=execution[0],
                                client_batch_size=execution[1])
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 7)
    ref_params, ref_server = params, server_opt.init(params)
    for _ in range(3):
        state, metrics = round_step(state)
        cohort = jax.device_get({k: metrics[k] for k in
                                 ("ids", "indices", "mask", "valid", "num_examples")})
        assert cohort["mask"].sum() > 0
        ref_params, ref_server = reference_round(
            model, ref_params, data, cohort, client_opt, server_opt, ref_server)
        chex.assert_trees_all_close(state.algorithm.params, ref_params, atol=1e-5, rtol=1e-5)


def test_one_client_one_step_is_one_sgd_step():
    model = tiny_model()
    data = tiny_data((6,))
    algorithm = fed_avg(model, optax.sgd(0.3), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule, full_participation(1), 1)
    params = model.init(jax.random.key(1))
    state, _ = round_step(init_simulation_state(algorithm.init(params), 0))

    x, y = data.arrays["x"], data.arrays["y"]
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean())(params)
    expected = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
    chex.assert_trees_all_close(state.algorithm.params, expected, atol=1e-6)


def test_padded_client_equals_unpadded_client():
    model = tiny_model()
    data = tiny_data((6,))
    algorithm = fed_avg(model, optax.sgd(0.3), optax.sgd(1.0))
    params = model.init(jax.random.key(1))
    results = []
    for batch_size in (6, 16):  # 16: ten of the batch's slots are padding
        schedule = ClientSchedule.from_sizes(data.client_sizes, batch_size, local_epochs=1)
        round_step = build_round_step(algorithm, data, schedule, full_participation(1), 1)
        state, metrics = round_step(init_simulation_state(algorithm.init(params), 0))
        assert float(metrics["train/examples"]) == 6
        results.append(state.algorithm.params)
    chex.assert_trees_all_close(results[0], results[1], atol=1e-7, rtol=1e-6)


def test_padding_slots_never_leak_even_when_they_are_nan():
    """Masked rows point at real examples (clipped); a NaN example elsewhere must not matter."""
    model = tiny_model()
    data = tiny_data((6, 4))
    x = data.arrays["x"].copy()
    x[6:] = np.nan  # the second client is all NaN and never sampled
    data = FederatedData({"x": x, "y": data.arrays["y"]}, data.offsets, data.client_ids)
    algorithm = fed_avg(model, optax.sgd(0.3), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(np.array([6]), 16, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule, lambda key: jnp.array([0]), 1)
    state, _ = round_step(init_simulation_state(algorithm.init(model.init(jax.random.key(1))), 0))
    chex.assert_tree_all_finite(state.algorithm.params)


def _three_rounds(seed, execution="map"):
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1), optax.adam(0.01))
    round_step = make_round(data, algorithm, client_execution=execution)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), seed)
    for _ in range(3):
        state, _ = round_step(state)
    return jax.device_get(state.algorithm.params)


def test_same_seed_is_bitwise_identical_and_another_seed_differs():
    a, b, c = _three_rounds(3), _three_rounds(3), _three_rounds(4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False):
        np.testing.assert_array_equal(x, y)
    leaves_a, leaves_c = jax.tree.leaves(a), jax.tree.leaves(c)
    assert any(not np.array_equal(x, z) for x, z in zip(leaves_a, leaves_c, strict=True))


def test_no_retrace_across_rounds():
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    traced_apply = chex.assert_max_traces(algorithm.apply, n=1)
    round_step = make_round(data, FederatedAlgorithm(algorithm.init, traced_apply))
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 0)
    for _ in range(4):
        state, metrics = round_step(state)
    assert int(state.round) == 4


@pytest.mark.parametrize("execution", [{}, {"mesh": "mesh4"}])
def test_a_placed_state_compiles_the_step_once(execution):
    """A fresh state placed where the step runs: rounds 1..3 use one compiled program."""
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    kwargs = {"mesh": client_mesh(4)} if execution else {}
    round_step = make_round(data, algorithm, **kwargs)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 0)
    state = round_step.place(state)
    for _ in range(3):
        state, _ = round_step(state)
    assert round_step.jitted._cache_size() == 1


def test_state_is_donated():
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    round_step = make_round(data, algorithm)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 0)
    new_state, _ = round_step(state)
    leaf = jax.tree.leaves(state.algorithm.params)[0]
    assert leaf.is_deleted()
    assert not jax.tree.leaves(new_state.algorithm.params)[0].is_deleted()


def test_sharded_over_four_devices_matches_one_device():
    model, data = tiny_model(), tiny_data(SIZES + (8, 9, 23))
    algorithm = fed_avg(model, optax.sgd(0.1, momentum=0.5), optax.adam(0.02))
    params = model.init(jax.random.key(0))
    mesh = client_mesh(4)
    results = []
    for kwargs in ({}, {"mesh": mesh}):
        round_step = make_round(data, algorithm, cohort_size=8, **kwargs)
        state = init_simulation_state(algorithm.init(params), 5)
        for _ in range(3):
            state, metrics = round_step(state)
        results.append((jax.device_get(state.algorithm.params), jax.device_get(metrics)))
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-6)


def test_vmap_over_two_client_learning_rates_matches_two_runs():
    model, data = tiny_model(), tiny_data(SIZES)
    params = model.init(jax.random.key(0))

    def algorithm_with(lr):
        client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
        return fed_avg(model, client, optax.sgd(1.0))

    separate = []
    for lr in (0.05, 0.3):
        algorithm = algorithm_with(lr)
        round_step = make_round(data, algorithm)
        state = init_simulation_state(algorithm.init(params), 1)
        for _ in range(2):
            state, _ = round_step(state)
        separate.append(state.algorithm.params)

    algorithm = algorithm_with(0.05)
    round_step = make_round(data, algorithm, client_execution="vmap")
    base = init_simulation_state(algorithm.init(params), 1)
    states = jax.tree.map(lambda x: jnp.stack([x, x]), base)
    lrs = jnp.array([0.05, 0.3], jnp.float32)
    states = states.replace(algorithm=states.algorithm.replace(
        client_hyperparams={"learning_rate": lrs}))
    swept = jax.jit(jax.vmap(round_step.fn, in_axes=(0, None, None)))
    for _ in range(2):
        states, _ = swept(states, round_step.data, round_step.offsets)
    for i in range(2):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], states.algorithm.params), separate[i],
            atol=1e-6, rtol=1e-6)


def test_a_fresh_state_copies_without_compiling_and_stays_valid_after_donation():
    """`init_simulation_state` + FedAvg's init compile no program (eagerly, a ``jnp.copy`` of
    each new shape compiled one: 0.13 s of the CNN's first round), copy every leaf (the round
    step donates the copy; the caller's params stay valid) and keep the values."""
    import jax.monitoring

    from fedjax_sim.models import create_model

    model = create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))
    params = model.init(jax.random.PRNGKey(0))
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    compiles, recording = [], [True]

    def listener(event, _seconds, **_):
        if recording[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state = init_simulation_state(algorithm.init(params), 0)
        jax.block_until_ready(state)
    finally:
        recording[0] = False  # jax.monitoring has no public unregister
    assert compiles == []
    for fresh, original in zip(jax.tree.leaves(state.algorithm.params), jax.tree.leaves(params),
                               strict=True):
        assert fresh.unsafe_buffer_pointer() != original.unsafe_buffer_pointer()
        np.testing.assert_array_equal(fresh, original)
    assert int(state.round) == 0 and state.round.dtype == jnp.int32


def test_round_keys_are_jax_randoms_split_and_fold_in_drawn_by_one_threefry_call():
    """Reference: jax.random called directly. The four round keys are
    ``split(fold_in(key, round), 4)`` and the server key ``fold_in(fold_in(key, round), 4)``, bit
    for bit; the compiled program draws them with one threefry loop after the fold_in (two
    while loops, where a split and a second fold_in made three)."""
    from fedjax_sim.simulation.round_step import _round_keys, _server_key

    for seed, round_index in ((0, 0), (3, 5), (11, 1234)):
        key = jax.random.PRNGKey(seed)
        round_key = jax.random.fold_in(key, round_index)
        got = _round_keys(key, jnp.int32(round_index))
        np.testing.assert_array_equal(np.stack(got), jax.random.split(round_key, 4))
        np.testing.assert_array_equal(_server_key(key, jnp.int32(round_index)),
                                      jax.random.fold_in(round_key, 4))
    both = jax.jit(lambda k, r: (jnp.stack(_round_keys(k, r)), _server_key(k, r)))
    text = both.lower(jax.random.PRNGKey(0), jnp.int32(1)).compile().as_text()
    assert text.count(" while(") == 2


def test_numpy_integer_seed_is_a_seed():
    """``seed=np.int64(3)`` (from np.arange, a NumPy generator) is jax.random.PRNGKey(3), as the
    Python int 3 is, not a scalar taken for raw key data (which the first round rejected)."""
    model, data = tiny_model(), tiny_data()
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), np.int64(3))
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(jax.random.PRNGKey(3)))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=2)
    step = build_round_step(algorithm, data, schedule, uniform_sampler(5, 2), 2)
    state, _ = step(state)
    assert int(state.round) == 1
