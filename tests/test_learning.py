"""The federated vocabulary on the engine: round computations run as algorithms (round step and
``run``), and TFF's process is the engine's FedAvg; against ``fed_avg`` bit for bit and a
sequential numpy loop over clients."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import loss_gradient, tiny_data, tiny_model
from test_federated import DOCS, _doc_blocks

import fedjax_sim as fs
from fedjax_sim.algorithms import ALGORITHMS
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.core import ClientInput, Cohort
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.federated import execution_context, federated_computation, type_at_server
from fedjax_sim.learning import (
    batch_client_data,
    build_federated_averaging_process,
    federated_algorithm,
    round_computation,
)
from fedjax_sim.models import create_model
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.client_map import local_client_map
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state
from fedjax_sim.simulation.system import system_model

SIZES = (5, 17, 40, 3, 11)
EXECUTIONS = {"map": {"client_execution": "map"}, "vmap": {"client_execution": "vmap"},
              "mesh4": {"mesh": client_mesh(4)}}  # mesh4: a cohort of 3 padded to 4 devices

# FedAvg/FedOpt written in the vocabulary: the docs' example, run as written.
_DOCS_NAMESPACE: dict = {}
exec(compile(_doc_blocks()[2], str(DOCS), "exec"), _DOCS_NAMESPACE)
fed_avg_in_the_vocabulary = _DOCS_NAMESPACE["fed_avg_in_the_vocabulary"]


def assert_bitwise_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_rounds(algorithm, data, execution, rounds=3, params=None):
    """``rounds`` of the round step (sampling, shuffled batches, dropout and slow clients)."""
    params = tiny_model().init(jax.random.PRNGKey(0)) if params is None else params
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    system = system_model(np.linspace(0.5, 2.0, data.num_clients), dropout=0.3, deadline=5.0)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(5, 3), 3,
                                  system=system, **EXECUTIONS[execution])
    state = init_simulation_state(algorithm.init(params), 7)
    history = []
    for _ in range(rounds):
        state, metrics = round_step(state)
        history.append(metrics)
    return state, jax.device_get(history)


# --- a federated computation as the algorithm of a run -----------------------------------------


@pytest.mark.parametrize("execution", list(EXECUTIONS))
def test_fed_avg_written_in_the_vocabulary_trains_like_the_engine(execution):
    model, data = tiny_model(), tiny_data(SIZES)
    client_opt, server_opt = optax.sgd(0.1, momentum=0.9), optax.adam(0.05)
    ours, our_metrics = run_rounds(fed_avg_in_the_vocabulary(model, client_opt, server_opt),
                                   data, execution)
    engine, metrics = run_rounds(fed_avg(model, client_opt, server_opt), data, execution)
    assert sum(float(m["system/dropped"]) for m in metrics) > 0  # dropout happened
    chex.assert_trees_all_close(ours.algorithm.params, engine.algorithm.params, atol=1e-6,
                                rtol=0)
    for got, expected in zip(our_metrics, metrics, strict=True):
        for key in ("train/loss", "train/accuracy", "system/round_seconds"):
            np.testing.assert_allclose(got[key], expected[key], atol=1e-6)


@pytest.mark.parametrize("execution", list(EXECUTIONS))
def test_an_engine_algorithm_as_a_round_computation_is_the_algorithm_bit_for_bit(execution):
    """fed_avg -> round computation -> algorithm: the same round step, the same bits."""
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1, momentum=0.9), optax.adam(0.05),
                        client_weighting="uniform")
    state = jax.eval_shape(algorithm.init, model.init(jax.random.PRNGKey(0)))
    round_trip = federated_algorithm(algorithm.init, round_computation(algorithm, state))
    ours, our_metrics = run_rounds(round_trip, data, execution)
    engine, metrics = run_rounds(algorithm, data, execution)
    assert_bitwise_equal(ours, engine)
    assert_bitwise_equal(our_metrics, metrics)


def test_a_round_computation_trains_through_run_with_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "fed_avg_in_the_vocabulary",
                        ("test_learning", "fed_avg_in_the_vocabulary"))
    overrides = ["cohort.size=3", "client.local_steps=3", "model.hidden=16", "rounds=3",
                 "eval.every=3", "eval.max_examples=200", "log.every=1", "log.progress=false",
                 "log.plot=false", "checkpoint.every=1", "system.dropout=0.3"]
    ours = fs.run(None, overrides=[*overrides, "algorithm.name=fed_avg_in_the_vocabulary"],
                  workdir=tmp_path / "vocabulary")
    engine = fs.run(None, overrides=overrides, workdir=tmp_path / "engine")
    chex.assert_trees_all_close(ours.state.algorithm.params, engine.state.algorithm.params,
                                atol=1e-5, rtol=0)
    assert [round(h["train/loss"], 5) for h in ours.history] == \
        [round(h["train/loss"], 5) for h in engine.history]
    assert sorted(p.name for p in (tmp_path / "vocabulary" / "checkpoints").iterdir())[-1] == "3"


def test_federated_algorithm_rejects_a_computation_of_another_type():
    @federated_computation(type_at_server(jnp.float32))
    def next_round(state):
        return state

    with pytest.raises(TypeError, match=r"'next_round' must be a federated_computation of the "
                                        r"round type .* round_types\(state\)"):
        federated_algorithm(lambda params: params, next_round)


# --- TFF's process: the engine's FedAvg -------------------------------------------------------


def in_order_cohort(data, ids, batch_size, local_epochs, keys, sequential):
    """The engine's cohort for clients that read their examples in order (no shuffle)."""
    sizes = data.client_sizes[ids]
    steps = -(-sizes * local_epochs // batch_size)
    num_steps = int(steps.max())
    indices = np.zeros((len(ids), num_steps * batch_size), np.int32)
    mask = np.zeros_like(indices, bool)
    for c, (i, n) in enumerate(zip(ids, sizes, strict=True)):
        stream = np.tile(np.arange(n), local_epochs)  # epoch after epoch, in order
        indices[c, :len(stream)] = data.offsets[i] + stream
        mask[c, :len(stream)] = True
    shape = (len(ids), num_steps, batch_size)
    return ClientInput(
        client_id=jnp.asarray(ids, jnp.int32), indices=jnp.asarray(indices.reshape(shape)),
        mask=jnp.asarray(mask.reshape(shape)), num_steps=jnp.asarray(steps, jnp.int32),
        num_examples=jnp.asarray(sizes, jnp.int32), valid=jnp.ones(len(ids), bool), key=keys,
        duration=jnp.asarray(steps, jnp.float32), own_trip_count=sequential)


@pytest.mark.parametrize(("server", "execution", "weighting"), [
    ("fedavg", "vmap", "num_examples"),
    ("fedadam", "map", "uniform"),
])
def test_process_is_the_engines_fed_avg_bit_for_bit(server, execution, weighting):
    model, data = tiny_model(), tiny_data(SIZES)
    client_opt = optax.sgd(0.2, momentum=0.5)
    server_opt = optax.sgd(1.0) if server == "fedavg" else optax.adam(0.03)
    process = build_federated_averaging_process(
        lambda: model, lambda: client_opt, lambda: server_opt, batch_size=4, local_epochs=2,
        client_weighting=weighting, seed=3)
    engine = fed_avg(model, client_opt, server_opt, client_weighting=weighting)
    engine_round = jax.jit(lambda s, c: engine.apply(s, c, local_client_map(execution)))
    arrays = {k: jnp.asarray(v) for k, v in data.arrays.items()}
    state = process.initialize()
    expected = engine.init(model.init(jax.random.PRNGKey(3)))
    assert_bitwise_equal(state.algorithm, expected)
    for ids in ([1, 4, 0, 3], [2, 0, 1, 3]):
        with execution_context(execution):
            new_state, metrics = process.next(state, data.subset(ids))
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), state.round), 4)
        clients = in_order_cohort(data, np.array(ids), 4, 2, keys, execution == "map")
        expected, engine_metrics = engine_round(expected, Cohort(clients, arrays, state.round))
        assert_bitwise_equal(new_state.algorithm, expected)
        assert_bitwise_equal(metrics["train"], {k.split("/")[1]: v
                                                for k, v in engine_metrics.items()})
        assert int(new_state.round) == int(state.round) + 1  # the input state is kept
        state = new_state


def test_process_matches_a_sequential_numpy_loop_over_clients():
    """FedAvg by hand: each client's SGD over its batches in order, the example-weighted mean."""
    model, data = tiny_model(), tiny_data(SIZES)
    process = build_federated_averaging_process(lambda: model, lambda: optax.sgd(0.3),
                                                batch_size=4, local_epochs=2)
    state = process.initialize()
    server = jax.tree.map(np.asarray, state.algorithm.params)
    for ids in ([1, 4, 0], [3, 2, 0, 1]):
        state, _ = process.next(state, [data.client(i) for i in ids])
        deltas, weights = [], []
        for i in ids:
            client = data.client(i)
            stream = np.tile(np.arange(len(client["y"])), 2)
            params = server
            for start in range(0, len(stream), 4):
                batch = stream[start:start + 4]
                grads = loss_gradient(model, params, client["x"][batch], client["y"][batch])
                params = jax.tree.map(lambda p, g: p - 0.3 * np.asarray(g), params, grads)
            deltas.append(jax.tree.map(np.subtract, server, params))
            weights.append(len(client["y"]))
        mean_delta = jax.tree.map(lambda *d, w=weights: np.average(d, axis=0, weights=w),
                                  *deltas)
        server = jax.tree.map(np.subtract, server, mean_delta)
        chex.assert_trees_all_close(state.algorithm.params, server, atol=1e-6, rtol=0)


def test_process_recompiles_only_when_shapes_change():
    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11, 12, 30))
    process = build_federated_averaging_process(lambda: model, lambda: optax.sgd(0.1),
                                                batch_size=4)
    state = process.initialize()
    # S = ceil(max size / 4) rounded up to a power of two: 17 and 12 -> 5 and 3 steps -> 8, 4
    for ids in ([0, 1, 3], [1, 5, 3], [0, 1, 5], [3, 0, 5]):
        state, _ = process.next(state, data.subset(ids))
    assert process.next.computation.num_traces == 2  # S = 8, then S = 4
    state, _ = process.next(state, data.subset([1, 0, 5, 3]))  # another C: one more
    assert process.next.computation.num_traces == 3
    assert int(state.round) == 5
    signature = process.next.type_signature
    assert ",clients={<client_id=int32,indices=int32[?,?],mask=bool[?,?]," in signature
    assert re.search(r",data=\?@CLIENTS,round=int32@SERVER> -> <<params=.*>@SERVER,"
                     r"<.*train/loss=float32>@SERVER>\)$", signature), signature


def test_batch_client_data_pads_to_static_shapes():
    clients = [{"x": np.arange(5.0)[:, None], "y": np.arange(5)},
               {"x": np.zeros((0, 1)), "y": np.zeros(0, np.int64)},
               {"x": np.arange(2.0)[:, None] + 10, "y": np.arange(2)}]
    cohort, data = batch_client_data(clients, 2, local_epochs=2)
    # 5 examples x 2 epochs / B 2 -> 5 steps -> S = 8; the rows are gathered in [C, S, B] order
    assert cohort.indices.shape == (3, 8, 2) and data["x"].shape == (3 * 8 * 2, 1)
    np.testing.assert_array_equal(cohort.num_examples, [5, 0, 2])
    np.testing.assert_array_equal(cohort.num_steps, [5, 0, 2])
    np.testing.assert_array_equal(cohort.mask.sum((1, 2)), [10, 0, 4])
    x = data["x"][cohort.indices][..., 0]  # [C, S, B]
    np.testing.assert_array_equal(x[0, :5].ravel(), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(x[2, :2].ravel(), [10, 11, 10, 11])
    assert not x[~cohort.mask].any()  # masked slots read zeros
    capped, _ = batch_client_data(clients, 2, local_epochs=2, max_local_steps=2)
    assert capped.indices.shape == (3, 2, 2)
    np.testing.assert_array_equal(capped.mask.sum((1, 2)), [4, 0, 4])


@pytest.mark.parametrize(
    ("client_data", "kwargs", "message"),
    [
        ([], {}, "at least one client"),
        ({"x": np.zeros(3)}, {}, "list of per-client datasets"),
        ([{"x": np.zeros(3), "y": np.zeros(2)}], {}, "one common leading length"),
        ([{"x": np.zeros((3, 2))}, {"x": np.zeros((3, 3))}], {}, "example shape"),
        ([{"x": np.zeros(3)}, {"z": np.zeros(3)}], {}, "has features"),
        ([{"x": np.zeros(3)}], {"batch_size": 0}, "batch_size must be an int >= 1"),
        ([{"x": np.zeros(3)}], {"batch_size": 2, "local_epochs": 0}, "local_epochs"),
    ],
)
def test_batch_client_data_rejects_bad_input(client_data, kwargs, message):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises((TypeError, ValueError), match=message):
        batch_client_data(client_data, **kwargs)


def test_process_rejects_wrong_factories():
    with pytest.raises(TypeError, match="model_fn must return a fedjax_sim.models.base.Model"):
        build_federated_averaging_process(lambda: "model", lambda: optax.sgd(0.1))
    with pytest.raises(TypeError, match="client_optimizer_fn must return"):
        build_federated_averaging_process(tiny_model, lambda: 0.1)


# --- the docs' examples on Shakespeare ---------------------------------------------------------


def shakespeare_model(info):
    return create_model("char_lstm", num_classes=info["num_classes"],
                        input_shape=info["input_shape"], input_dtype="int32",
                        pad_label=info["pad_label"], hidden=32, num_layers=1)


def test_five_rounds_on_shakespeare_reduce_the_loss():
    dataset = fs.load_dataset("shakespeare")
    sizes = dataset.train.client_sizes
    ids = np.flatnonzero((sizes >= 8) & (sizes <= 24))[:6]  # small roles: a fast test
    process = build_federated_averaging_process(
        lambda: shakespeare_model(dataset.info), client_optimizer_fn=lambda: optax.sgd(1.0),
        batch_size=8)
    federated_train_data = [dataset.train.client(i) for i in ids]
    losses = []
    state = process.initialize()
    for _ in range(5):
        state, metrics = process.next(state, federated_train_data)
        losses.append(float(metrics["train"]["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.5, losses
    assert process.next.computation.num_traces == 1


def test_docs_round_computation_example_runs(capsys):
    exec(compile(_doc_blocks()[3], str(DOCS), "exec"), dict(_DOCS_NAMESPACE))
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3
    assert re.search("prints `" + "`, `".join(printed) + "`", DOCS.read_text())


def test_docs_process_example_runs(capsys):
    code = _doc_blocks()[4]
    assert "for round in range(5):" in code and 'print(metrics["train"]["loss"])' in code
    exec(compile(code.replace("range(5)", "range(2)"), str(DOCS), "exec"), {})
    losses = [float(x) for x in capsys.readouterr().out.split()]
    np.testing.assert_allclose(losses, [3.8727, 3.2110], atol=2e-3)  # as the docs print
    assert re.search(r"prints `3\.8727`, `3\.2110`", DOCS.read_text())
