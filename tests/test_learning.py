"""FedAvg in the federated vocabulary and the TFF-style process, against the engine's fed_avg."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model
from test_federated import _doc_blocks

import fedjax_sim as fs
from fedjax_sim.algorithms.base import ClientInput, Cohort, FederatedAlgorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.federated import at_clients
from fedjax_sim.learning import (
    batch_client_data,
    build_fed_avg_round,
    build_federated_averaging_process,
)
from fedjax_sim.models import create_model
from fedjax_sim.simulation.client_map import local_client_map
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11)


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    """The engine's algorithm, also returning the cohort it trained on."""

    def apply(state, cohort, map_clients):
        new_state, metrics = algorithm.apply(state, cohort, map_clients)
        c = cohort.clients
        return new_state, {**metrics, "cohort": {
            "indices": c.indices, "mask": c.mask, "num_examples": c.num_examples,
            "valid": c.valid}}

    return FederatedAlgorithm(algorithm.init, apply)


def features_of(data):
    return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in data.arrays.items()}


def gathered(data, cohort):
    """The engine's cohort as per-client batches ``[C, S, B, ...]`` (numpy gather)."""
    batches = {k: v[cohort["indices"]] for k, v in data.arrays.items()}
    member = {"batches": batches, "mask": cohort["mask"],
              "num_examples": cohort["num_examples"].astype(np.int32),
              "index": np.arange(len(cohort["valid"]), dtype=np.int32)}
    return at_clients(member, mask=cohort["valid"])


@pytest.mark.parametrize(("server", "execution", "weighting"), [
    ("fedavg", "vmap", "num_examples"),
    ("fedadam", "map", "uniform"),
])
def test_fed_avg_in_the_vocabulary_equals_the_engine(server, execution, weighting):
    model, data = tiny_model(), tiny_data(SIZES)
    client_opt = optax.sgd(0.1, momentum=0.9)
    server_opt = optax.sgd(1.0) if server == "fedavg" else optax.adam(0.05)
    algorithm = spy(fed_avg(model, client_opt, server_opt, client_weighting=weighting))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(5, 3), 3,
                                  client_execution=execution)
    initialize, next_round = build_fed_avg_round(model, client_opt, server_opt,
                                                 features_of(data), client_weighting=weighting)
    state = initialize()
    engine = init_simulation_state(state.algorithm, 7)
    for _ in range(3):
        engine, metrics = round_step(engine)
        cohort = jax.device_get(metrics.pop("cohort"))
        state, ours = next_round(state, gathered(data, cohort))
        chex.assert_trees_all_close(state.algorithm, engine.algorithm, atol=1e-6, rtol=0)
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(ours["train"][key], metrics[f"train/{key}"], atol=1e-6)
        assert float(ours["train"]["num_examples"]) == float(metrics["train/examples"])
        assert float(ours["train"]["num_clients"]) == float(metrics["train/clients"])
    assert int(state.round) == 3


def test_fed_avg_in_the_vocabulary_ignores_padding_clients():
    """A cohort padded with an invalid client (as on a device mesh) and an empty client."""
    model, data = tiny_model(), tiny_data((6, 9, 4))
    client_opt, server_opt = optax.sgd(0.3), optax.sgd(1.0)
    engine_algorithm = fed_avg(model, client_opt, server_opt)
    initialize, next_round = build_fed_avg_round(model, client_opt, server_opt,
                                                 features_of(data))
    state = initialize()
    ids = np.array([0, 2, 1, 1])
    valid = np.array([True, True, True, False])
    sizes = np.where(valid, data.client_sizes[ids], 0).astype(np.int32)
    sizes[1] = 0  # a valid client without examples trains nothing and weighs 0
    steps, batch = 2, 8
    indices = np.zeros((4, steps, batch), np.int32)
    mask = np.zeros((4, steps, batch), bool)
    for c, (i, n) in enumerate(zip(ids, sizes, strict=True)):
        flat = np.arange(steps * batch)
        indices[c] = (data.offsets[i] + flat % max(n, 1)).reshape(steps, batch)
        mask[c] = (flat < n).reshape(steps, batch)
    clients = ClientInput(
        client_id=jnp.asarray(ids, jnp.int32), indices=jnp.asarray(indices),
        mask=jnp.asarray(mask), num_steps=jnp.asarray(-(-sizes // batch), jnp.int32),
        num_examples=jnp.asarray(sizes), valid=jnp.asarray(valid),
        key=jax.random.split(jax.random.key(0), 4), duration=jnp.ones(4), own_trip_count=False)
    expected, metrics = engine_algorithm.apply(
        state.algorithm, Cohort(clients, {k: jnp.asarray(v) for k, v in data.arrays.items()}),
        local_client_map("vmap"))
    cohort = {"indices": indices, "mask": mask, "num_examples": sizes, "valid": valid}
    new_state, ours = next_round(state, gathered(data, cohort))
    chex.assert_trees_all_close(new_state.algorithm, expected, atol=1e-6, rtol=0)
    assert float(ours["train"]["num_clients"]) == float(metrics["train/clients"]) == 2


def in_order_cohort(data, ids, batch_size, local_epochs):
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
        num_examples=jnp.asarray(sizes, jnp.int32), valid=jnp.ones(len(ids), bool),
        key=jax.random.split(jax.random.key(1), len(ids)), duration=jnp.ones(len(ids)),
        own_trip_count=False)


@pytest.mark.parametrize("as_federated_data", [False, True])
def test_process_first_round_equals_the_engine(as_federated_data):
    model, data = tiny_model(), tiny_data(SIZES)
    ids = np.array([1, 4, 0, 3])
    process = build_federated_averaging_process(
        lambda: model, client_optimizer_fn=lambda: optax.sgd(0.2, momentum=0.5),
        server_optimizer_fn=lambda: optax.adam(0.03), batch_size=4, local_epochs=2)
    state = process.initialize()
    client_data = data.subset(ids) if as_federated_data else [data.client(i) for i in ids]
    new_state, metrics = process.next(state, client_data)

    engine = fed_avg(model, optax.sgd(0.2, momentum=0.5), optax.adam(0.03))
    cohort = Cohort(in_order_cohort(data, ids, 4, 2),
                    {k: jnp.asarray(v) for k, v in data.arrays.items()})
    expected, engine_metrics = engine.apply(state.algorithm, cohort, local_client_map("map"))
    chex.assert_trees_all_close(new_state.algorithm, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(metrics["train"]["loss"], engine_metrics["train/loss"], atol=1e-6)
    assert float(metrics["train"]["num_examples"]) == 2 * data.client_sizes[ids].sum()
    assert int(new_state.round) == 1 and int(state.round) == 0  # the input state is kept


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
    assert "client_data={<batches=<x=float32[?,?,4],y=int32[?,?]>" in \
        process.next.type_signature


def test_batch_client_data_pads_to_static_shapes():
    clients = [{"x": np.arange(5.0)[:, None], "y": np.arange(5)},
               {"x": np.zeros((0, 1)), "y": np.zeros(0, np.int64)},
               {"x": np.arange(2.0)[:, None] + 10, "y": np.arange(2)}]
    member, features = batch_client_data(clients, 2, local_epochs=2)
    assert features["x"].shape == (1,) and features["y"].dtype == jnp.int32
    # 5 examples x 2 epochs / B 2 -> 5 steps -> S = 8
    assert member["batches"]["x"].shape == (3, 8, 2, 1)
    np.testing.assert_array_equal(member["num_examples"], [5, 0, 2])
    np.testing.assert_array_equal(member["mask"].sum((1, 2)), [10, 0, 4])
    np.testing.assert_array_equal(member["batches"]["x"][0, :5].ravel(),
                                  [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(member["batches"]["x"][2, :2].ravel(), [10, 11, 10, 11])
    capped, _ = batch_client_data(clients, 2, local_epochs=2, max_local_steps=2)
    assert capped["batches"]["x"].shape == (3, 2, 2, 1)
    np.testing.assert_array_equal(capped["mask"].sum((1, 2)), [4, 0, 4])


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


def test_docs_process_example_runs(capsys):
    code = _doc_blocks()[2]
    assert "for round in range(5):" in code and 'print(metrics["train"]["loss"])' in code
    exec(compile(code.replace("range(5)", "range(2)"), "docs/federated.md", "exec"), {})
    losses = [float(x) for x in capsys.readouterr().out.split()]
    np.testing.assert_allclose(losses, [3.8727, 3.2110], atol=2e-3)  # as the docs print
    assert re.search(r"prints `3\.8727`, `3\.2110`", _doc_text())


def _doc_text():
    from test_federated import DOCS

    return DOCS.read_text()
