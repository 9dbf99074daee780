"""The federated vocabulary against numpy, its types and errors, and the docs' examples."""

import collections
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.federated import (
    CLIENTS,
    SERVER,
    FederatedType,
    FederatedValue,
    TensorType,
    at_clients,
    at_server,
    current_execution,
    execution_context,
    federated_aggregate,
    federated_broadcast,
    federated_computation,
    federated_map,
    federated_max,
    federated_mean,
    federated_min,
    federated_secure_sum,
    federated_sum,
    federated_value,
    federated_zip,
    type_at_clients,
    type_at_server,
)
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.client_map import local_client_map

DOCS = Path(__file__).resolve().parents[1] / "docs" / "federated.md"
RNG = np.random.default_rng(0)
X = RNG.normal(size=(5, 3)).astype(np.float32)  # 5 clients, member float32[3]


# --- types -----------------------------------------------------------------------------------


def test_type_strings_follow_tff():
    assert str(FederatedType(jnp.float32, CLIENTS)) == "{float32}@CLIENTS"
    assert str(FederatedType(jnp.float32, CLIENTS, all_equal=True)) == "float32@CLIENTS"
    assert str(FederatedType(jnp.float32, SERVER)) == "float32@SERVER"
    assert str(type_at_server(jax.ShapeDtypeStruct((2, 3), jnp.int32))) == "int32[2,3]@SERVER"
    member = {"y": jnp.int32, "x": TensorType(jnp.float32, (None, 2))}
    assert str(type_at_clients(member)) == "{<x=float32[?,2],y=int32>}@CLIENTS"
    assert str(type_at_server((jnp.float32, "bool"))) == "<float32,bool>@SERVER"
    params = jax.eval_shape(lambda: {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)})
    assert str(type_at_server(params)) == "<b=float32[3],w=float32[4,3]>@SERVER"
    with pytest.raises(ValueError, match="always all_equal"):
        FederatedType(jnp.float32, SERVER, all_equal=False)
    with pytest.raises(TypeError, match="member type leaf"):
        FederatedType(object(), SERVER)


def test_type_equality_and_assignability():
    declared = type_at_clients(TensorType(jnp.float32, (None, 2)))
    assert declared.is_assignable_from(type_at_clients(jax.ShapeDtypeStruct((7, 2), jnp.float32)))
    assert not declared.is_assignable_from(type_at_clients(jax.ShapeDtypeStruct((7, 3),
                                                                                jnp.float32)))
    assert not declared.is_assignable_from(type_at_server(jax.ShapeDtypeStruct((7, 2),
                                                                               jnp.float32)))
    assert type_at_server(jnp.float32) == FederatedType(np.float32, SERVER)
    assert type_at_server(jnp.float32) != type_at_server(jnp.int32)


def test_values_are_pytrees_that_pass_through_jit():
    value = at_clients({"a": X}, weights=np.arange(5), mask=[1, 1, 0, 1, 1])
    assert str(value.type) == "{<a=float32[3]>}@CLIENTS" and value.num_clients == 5
    out = jax.jit(lambda v: v.replace(value=jax.tree.map(lambda x: 2 * x, v.value)))(value)
    assert isinstance(out, FederatedValue) and out.placement is CLIENTS
    np.testing.assert_allclose(out.value["a"], 2 * X)
    np.testing.assert_array_equal(out.mask, [True, True, False, True, True])
    assert str(at_server(1.5).type) == "float32@SERVER"
    with pytest.raises(ValueError, match="leading client axis"):
        at_clients({"a": X, "b": X[:3]})
    with pytest.raises(ValueError, match="weights must have shape"):
        at_clients(X, weights=np.ones(4))


# --- intrinsics against numpy ----------------------------------------------------------------


def test_mean_sum_min_max_against_numpy():
    weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
    mask = np.array([True, True, False, True, True])
    plain, masked = at_clients(X), at_clients(X, mask=mask)
    np.testing.assert_allclose(federated_mean(plain).value, X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(federated_mean(plain, at_clients(weights)).value,
                               (weights[:, None] * X).sum(0) / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(  # the value's own weights are the default
        federated_mean(at_clients(X, weights=weights)).value,
        (weights[:, None] * X).sum(0) / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(federated_mean(masked).value, X[mask].mean(0), rtol=1e-6)
    w = weights * mask
    np.testing.assert_allclose(federated_mean(masked, at_clients(weights)).value,
                               (w[:, None] * X).sum(0) / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(federated_sum(plain).value, X.sum(0), rtol=1e-6)
    np.testing.assert_allclose(federated_sum(masked).value, X[mask].sum(0), rtol=1e-6)
    np.testing.assert_array_equal(federated_min(masked).value, X[mask].min(0))
    np.testing.assert_array_equal(federated_max(masked).value, X[mask].max(0))
    ints = np.array([4, -2, 9, 7, 1], np.int32)
    np.testing.assert_array_equal(federated_min(at_clients(ints, mask=mask)).value, -2)
    np.testing.assert_array_equal(federated_max(at_clients(ints, mask=mask)).value, 7)
    for intrinsic in (federated_mean, federated_sum, federated_min, federated_max):
        assert intrinsic(plain).placement is SERVER


def test_masked_clients_never_leak_even_when_nan():
    values = X.copy()
    values[2] = np.nan
    mask = np.array([True, True, False, True, True])
    value = at_clients(values, mask=mask)
    chex.assert_tree_all_finite([federated_mean(value).value, federated_sum(value).value,
                                 federated_min(value).value, federated_max(value).value])


def test_mean_of_ints_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        federated_mean(at_clients(np.arange(3)))


def test_map_traces_once_with_broadcast_arguments_shared():
    calls = []

    def fn(x, w, b):
        calls.append(1)
        return x @ w + b

    w = RNG.normal(size=(3, 2)).astype(np.float32)
    out = federated_map(fn, [at_clients(X, mask=[1, 0, 1, 1, 1]),
                             federated_broadcast(at_server(w)),
                             federated_value(np.float32(0.5), CLIENTS)])
    assert len(calls) == 1  # traced once, not a Python loop over the 5 clients
    assert out.placement is CLIENTS and not out.all_equal
    np.testing.assert_allclose(out.value, X @ w + 0.5, rtol=1e-5)
    np.testing.assert_array_equal(out.mask, [True, False, True, True, True])  # kept

    server = federated_map(lambda a: a * 2, at_server(w))
    assert server.placement is SERVER and server.value.shape == (3, 2)  # applied once
    equal = federated_map(lambda a: a + 1, federated_broadcast(at_server(w)))
    assert equal.all_equal and equal.value.shape == (3, 2)


def test_zip_and_selection():
    zipped = federated_zip({"x": at_clients(X), "s": federated_broadcast(at_server(1.0))})
    assert str(zipped.type) == "{<s=float32,x=float32[3]>}@CLIENTS"
    np.testing.assert_array_equal(zipped["s"].value, np.ones(5))
    np.testing.assert_array_equal(zipped["x"].value, X)
    pair = federated_zip([at_server(1.0), at_server(np.arange(2))])
    assert str(pair.type) == "<float32,int32[2]>@SERVER"
    np.testing.assert_array_equal(pair[1].value, [0, 1])


def test_selection_needs_a_structure_member_and_namedtuples_zip():
    # TFF selects from struct members only; indexing a tensor member's stacked [C, ...] array
    # would silently pick client 0 (a value of C' = 3 "clients") instead of an error.
    with pytest.raises(TypeError, match="structure member"):
        at_clients(X)[0]
    with pytest.raises(TypeError, match="structure member"):
        at_server(np.arange(3.0))[1]
    # A namedtuple of federated values zips into a namedtuple member, selectable by name.
    pair = collections.namedtuple("Pair", "x y")
    zipped = federated_zip(pair(at_clients(X), at_clients(2 * X)))
    assert str(zipped.type) == "{<x=float32[3],y=float32[3]>}@CLIENTS"
    assert isinstance(zipped.value, pair)
    np.testing.assert_array_equal(zipped["y"].value, 2 * X)
    np.testing.assert_array_equal(zipped[0].value, X)
    np.testing.assert_allclose(federated_sum(zipped["y"]).value, 2 * X.sum(0), rtol=1e-6)


def test_a_client_masked_in_any_argument_is_left_out():
    # Padding clients are left out of every aggregation: a client masked in the weight (or in
    # any argument of a map or zip) must not count, whichever argument carries the mask.
    values = np.array([1.0, 2.0, 4.0], np.float32)
    value = at_clients(values, mask=[True, True, False])
    weight = at_clients(np.array([1.0, 3.0, 5.0], np.float32), mask=[True, False, True])
    np.testing.assert_allclose(federated_mean(value, weight).value, 1.0)  # client 0 only
    summed = federated_map(lambda a, b: a + b, [value, at_clients(values, mask=[1, 0, 1])])
    np.testing.assert_allclose(federated_sum(summed).value, 2.0)
    zipped = federated_zip([at_clients(values, mask=[0, 1, 1]), value])
    np.testing.assert_allclose(federated_sum(zipped[0]).value, 2.0)


def test_any_member_inside_a_struct():
    # ``...`` accepts any member, also as one field of a declared struct.
    @federated_computation(type_at_clients({"meta": ..., "x": jnp.float32}))
    def total(data):
        return federated_sum(federated_map(lambda m: m["x"], data))

    data = {"meta": np.ones((4, 2), np.int32), "x": np.array([1.0, 2.0, 3.0, 4.5])}
    assert float(total(data)) == 10.5
    with pytest.raises(TypeError, match="expects"):
        total({"meta": np.ones((4, 2)), "x": np.ones((4, 2), np.float32)})


def _digits(values, base=2.0):
    """Sequential reference of the accumulate below: a number whose digits are the values."""
    accumulator = 0.0
    for v in values:
        accumulator = accumulator * base + v
    return accumulator


@pytest.mark.parametrize("num_clients", [6, 7])
def test_aggregate_merges_two_halves_like_numpy(num_clients):
    """accumulate is order dependent (a*2 + x), so only a correct split and merge agree."""
    values = RNG.integers(0, 2, size=num_clients).astype(np.float32)
    half = -(-num_clients // 2)
    first, second = values[:half], values[half:]
    merges = []

    def accumulate(acc, x):
        return {"digits": acc["digits"] * 2.0 + x, "count": acc["count"] + 1}

    def merge(a, b):
        merges.append(1)
        return {"digits": a["digits"] * 2.0 ** b["count"] + b["digits"],
                "count": a["count"] + b["count"]}

    def report(acc):
        return acc["digits"] / acc["count"]

    zero = {"digits": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}
    result = federated_aggregate(at_clients(values), zero, accumulate, merge, report,
                                 num_groups=2)
    # numpy: each half folded from zero, then merged, then reported
    a, b = _digits(first), _digits(second)
    expected = (a * 2.0 ** len(second) + b) / num_clients
    assert merges == [1]
    np.testing.assert_allclose(result.value, expected, rtol=1e-6)
    np.testing.assert_allclose(result.value, _digits(values) / num_clients, rtol=1e-6)
    single = federated_aggregate(at_clients(values), zero, accumulate, merge, report)
    np.testing.assert_allclose(single.value, expected, rtol=1e-6)
    # A masked client is skipped by accumulate.
    mask = np.ones(num_clients, bool)
    mask[1] = False
    masked = federated_aggregate(at_clients(values, mask=mask), zero, accumulate, merge, report,
                                 num_groups=2)
    np.testing.assert_allclose(masked.value, _digits(values[mask]) / (num_clients - 1),
                               rtol=1e-6)


def test_secure_sum_is_a_sum_modulo_two_to_the_bitwidth():
    ints = np.array([3, 7, -1, 250, 6], np.int32)
    mask = np.array([True, True, True, True, False])
    for bits in (1, 3, 8, 31):
        got = federated_secure_sum(at_clients(ints), bits).value
        assert got.dtype == jnp.int32
        assert int(got) == int(np.sum(ints.astype(np.int64)) % 2**bits)
    got = federated_secure_sum(at_clients(ints, mask=mask), 4).value
    assert int(got) == int(np.sum(ints[mask].astype(np.int64)) % 16)
    small = np.array([200, 100, 255], np.uint8)
    assert int(federated_secure_sum(at_clients(small), 8).value) == (200 + 100 + 255) % 256
    struct = {"a": ints, "b": np.arange(5, dtype=np.int32)}
    got = federated_secure_sum(at_clients(struct), {"a": 2, "b": 3}).value
    assert int(got["a"]) == int(ints.astype(np.int64).sum() % 4) and int(got["b"]) == 10 % 8
    with pytest.raises(TypeError, match="integer members"):
        federated_secure_sum(at_clients(X), 8)
    with pytest.raises(ValueError, match=r"1 <= bitwidth <= 31"):
        federated_secure_sum(at_clients(ints), 32)
    with pytest.raises(ValueError, match="out of range"):
        federated_secure_sum(at_clients(ints), 0)
    with pytest.raises(ValueError, match=r"1 <= bitwidth <= 8"):
        federated_secure_sum(at_clients(small), 9)
    with pytest.raises(TypeError, match="structure"):
        federated_secure_sum(at_clients(struct), [2, 3])
    with pytest.raises(TypeError, match="must be an int"):
        federated_secure_sum(at_clients(ints), 2.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: federated_mean(at_server(1.0)),
         "federated_mean: its argument must be placed at CLIENTS, got float32@SERVER; "
         "move it to the clients with federated_broadcast"),
        (lambda: federated_broadcast(at_clients(X)),
         r"federated_broadcast: its argument must be placed at SERVER, got "
         r"\{float32\[3\]\}@CLIENTS; aggregate it"),
        (lambda: federated_map(lambda a, b: a, [at_clients(X), at_server(1.0)]),
         "same placement; argument 0 is .*@CLIENTS but argument 1 is float32@SERVER; "
         "broadcast the SERVER value"),
        (lambda: federated_sum(np.ones(3)),
         r"got a plain float64\[3\] array \(not a federated value\); declare it"),
        (lambda: federated_mean(at_clients(X), weight=at_server(1.0)),
         "the weight must be placed at CLIENTS"),
        (lambda: federated_sum(federated_broadcast(at_server(1.0))),
         "needs the number of clients"),
        (lambda: federated_value(at_server(1.0), SERVER), "already placed"),
    ],
)
def test_placement_errors_are_clear(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


# --- federated_computation -------------------------------------------------------------------


@federated_computation(FederatedType(jnp.float32, CLIENTS))
def get_average_temperature(sensor_readings):
    return federated_mean(sensor_readings)


def test_get_average_temperature_against_numpy():
    readings = [68.5, 70.3, 69.8]
    np.testing.assert_allclose(get_average_temperature(readings),
                               np.mean(np.float32(readings)), rtol=1e-6)
    many = RNG.normal(60, 10, size=17)
    np.testing.assert_allclose(get_average_temperature(many), many.mean(), rtol=1e-5)
    # a mask passes through a FederatedValue argument
    masked = at_clients(np.float32([60, 70, 1000]), mask=[True, True, False])
    np.testing.assert_allclose(get_average_temperature(masked), 65.0)
    assert get_average_temperature.type_signature == "({float32}@CLIENTS -> float32@SERVER)"


def test_a_server_value_where_clients_is_expected_names_argument_and_types():
    with pytest.raises(TypeError) as error:
        get_average_temperature(at_server(np.float32(3.0)))
    assert str(error.value) == (
        "get_average_temperature: argument 'sensor_readings' expects {float32}@CLIENTS, "
        "got float32@SERVER")


def test_conversion_rules():
    @federated_computation(type_at_clients({"x": jax.ShapeDtypeStruct((2,), jnp.float32)}),
                           type_at_server(jnp.int32))
    def f(data, scale):
        scaled = federated_map(lambda d, s: d["x"] * s, [data, federated_broadcast(scale)])
        return federated_sum(scaled), scaled

    stacked = {"x": np.arange(6.0).reshape(3, 2)}                      # [C, ...] leaves
    listed = [{"x": [0.0, 1.0]}, {"x": [2.0, 3.0]}, {"x": [4.0, 5.0]}]  # a list of clients
    for data in (stacked, listed):
        total, per_client = f(data, 2)
        np.testing.assert_allclose(total, [12.0, 18.0])
        np.testing.assert_allclose(per_client, 2 * stacked["x"])  # CLIENTS result: [C, ...]
    with pytest.raises(TypeError, match=r"argument 'scale'.*cannot convert float64 to int32"):
        f(stacked, 2.5)
    with pytest.raises(TypeError, match=r"argument 'data' expects \{<x=float32\[2\]>\}@CLIENTS,"
                                        r" got \{<x=float32\[3\]>\}@CLIENTS"):
        f({"x": np.zeros((4, 3))}, 1)
    with pytest.raises(TypeError, match="argument 'data' expects .* structure"):
        f({"z": np.zeros((4, 2))}, 1)
    with pytest.raises(TypeError, match="argument 'scale' expects int32@SERVER, got "
                                        r"\{int32\}@CLIENTS"):
        f(stacked, at_clients(np.arange(3)))
    with pytest.raises(TypeError, match="takes 2 arguments"):
        f(stacked)
    with pytest.raises(TypeError, match="cannot convert bool to float32"):
        f({"x": np.ones((3, 2), bool)}, 1)


def test_clients_arguments_must_agree_on_the_number_of_clients():
    @federated_computation(type_at_clients(jnp.float32), type_at_clients(jnp.float32))
    def f(a, b):
        return federated_mean(a), federated_mean(b)

    with pytest.raises(ValueError, match="different numbers of clients: a: 3, b: 4"):
        f(np.zeros(3), np.zeros(4))


def test_declarations_are_checked():
    with pytest.raises(TypeError, match="takes 1 positional arguments but 2 types"):
        federated_computation(type_at_server(jnp.float32), type_at_server(jnp.float32))(
            lambda x: x)
    with pytest.raises(TypeError, match="argument 'x' must be a FederatedType"):
        federated_computation(jnp.float32)(lambda x: x)

    @federated_computation(type_at_server(jnp.float32))
    def unplaced(x):
        return jnp.zeros(3)

    with pytest.raises(TypeError, match="must return federated values"):
        unplaced(1.0)


def test_one_trace_per_shape_and_nesting():
    traces = []

    @federated_computation(type_at_clients(jnp.float32), type_at_server(jnp.float32))
    def shifted_mean(values, shift):
        traces.append(1)
        return federated_mean(federated_map(lambda v, s: v + s,
                                            [values, federated_broadcast(shift)]))

    for shift in (1.0, 2.0, 3.0):
        np.testing.assert_allclose(shifted_mean(X[:, 0], shift), X[:, 0].mean() + shift,
                                   rtol=1e-6)
    assert len(traces) == 1  # same shapes: no retrace (the shift is a traced argument)
    shifted_mean(X[:3, 0], 1.0)
    assert len(traces) == 2  # a new number of clients: one retrace

    @federated_computation(type_at_clients(jnp.float32))
    def outer(values):
        inner = shifted_mean(values, federated_value(np.float32(1.0), SERVER))
        assert isinstance(inner, FederatedValue)  # inside a computation: stays federated
        return federated_map(lambda m: m * 10, inner)

    np.testing.assert_allclose(outer(X[:, 0]), (X[:, 0].mean() + 1.0) * 10, rtol=1e-6)


def test_zero_argument_computation_and_all_equal_expansion():
    @federated_computation
    def constant():
        return federated_value(np.float32(2.0), SERVER)

    assert float(constant()) == 2.0
    assert constant.type_signature == "( -> float32@SERVER)"

    @federated_computation(type_at_clients(jnp.float32))
    def count(values):
        ones = federated_value(np.float32(1.0), CLIENTS)  # all-equal: expanded to C clients
        return federated_sum(ones), federated_sum(values)

    assert float(count(at_clients(np.ones(4, np.float32), mask=[1, 1, 0, 1]))[0]) == 3.0


@federated_computation(type_at_clients(TensorType(jnp.float32, (None,))),
                       type_at_server(jnp.float32))
def running_sums(values, decay):
    """Each client folds its values in order (a scan), then the mean and the per-client sums."""

    def fold(v, d):
        return jax.lax.scan(lambda total, x: (total * d + x, None), jnp.float32(0), v)[0]

    sums = federated_map(fold, [values, federated_broadcast(decay)])
    return federated_mean(sums), sums


@pytest.mark.parametrize("execution", [
    {"client_execution": "map"}, {"client_execution": "vmap"},
    {"client_execution": "map", "client_batch_size": 3}, {"mesh": "4 devices"},
])
def test_computations_run_on_the_engines_client_maps(execution):
    values = RNG.normal(size=(8, 6)).astype(np.float32)  # 8 clients, 6 values each
    expected = []
    for row in values.astype(np.float64):  # sequential reference: a loop over clients
        total = 0.0
        for x in row:
            total = total * 0.5 + x
        expected.append(total)
    if "mesh" in execution:
        execution = {"mesh": client_mesh(4)}
    traces = running_sums.num_traces
    with execution_context(**execution):
        mean, sums = running_sums(values, 0.5)
        np.testing.assert_allclose(get_average_temperature(values[:, 0]), values[:, 0].mean(),
                                   rtol=1e-6)
        if "mesh" in execution:  # each device computed its share of the clients
            assert len(sums.sharding.device_set) == 4
        sequential = execution.get("client_execution", "auto") in ("map", "auto") and \
            "client_batch_size" not in execution  # "auto" is "map" on CPU
        assert current_execution().sequential == sequential
    np.testing.assert_allclose(sums, expected, rtol=1e-5)
    np.testing.assert_allclose(mean, np.mean(expected), rtol=1e-5)
    assert running_sums.num_traces <= traces + 1  # one compilation per client map


def test_a_custom_client_map_is_used_and_compiled_once():
    calls = []
    vmap = local_client_map("vmap")

    def spy(fn, clients, shared):
        calls.append(jax.tree.map(jnp.shape, (clients, shared)))
        return vmap(fn, clients, shared)

    values = RNG.normal(size=(5, 4)).astype(np.float32)
    with execution_context(spy):
        first = running_sums(values, 0.5)
        traces = running_sums.num_traces
        second = running_sums(values + 1, 0.5)
    assert calls == [(((5, 4),), ((),))]  # per-client values mapped, the broadcast shared
    assert running_sums.num_traces == traces  # the same map: no recompilation
    with execution_context("map"):
        chex.assert_trees_all_close(running_sums(values, 0.5), first, rtol=1e-6)
    assert not np.allclose(first[0], second[0])
    with pytest.raises(ValueError, match="client execution 'gpu'"):
        with execution_context("gpu"):
            pass


def test_any_member_type():
    declared = type_at_clients(..., all_equal=True)
    assert str(declared) == "?@CLIENTS"
    assert declared.is_assignable_from(type_at_clients({"x": jnp.float32}, all_equal=True))
    assert not declared.is_assignable_from(type_at_server(jnp.float32))

    @federated_computation(type_at_server(...))
    def identity(x):
        return x

    np.testing.assert_array_equal(identity({"a": np.arange(3)})["a"], np.arange(3))
    assert identity.type_signature == "(?@SERVER -> <a=int32[3]>@SERVER)"


def _numpy_federated_train(client_data, model, learning_rate, classes):
    """The seed's federated_train: SGD per batch on every client, then the mean (float64)."""
    finals = []
    for c in range(client_data["x"].shape[0]):
        w, b = model["w"].astype(np.float64), model["b"].astype(np.float64)
        for x, y in zip(client_data["x"][c], client_data["y"][c], strict=True):
            logits = x @ w + b
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            err = (p - np.eye(classes)[y]) / len(y)
            w, b = w - learning_rate * x.T @ err, b - learning_rate * err.sum(0)
        finals.append((w, b))
    return {"w": np.mean([f[0] for f in finals], 0), "b": np.mean([f[1] for f in finals], 0)}


def _doc_blocks() -> list[str]:
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- federated-doc-example -->\n```python\n(.*?)```", text, re.S)
    assert len(blocks) == 5
    return blocks


def test_docs_vocabulary_examples_run_and_match_numpy(capsys):
    namespace: dict = {}
    blocks = _doc_blocks()
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)
    assert capsys.readouterr().out.split("\n")[:2] == [
        "({float32}@CLIENTS -> float32@SERVER)", "69.53334"]

    exec(compile(blocks[1], str(DOCS), "exec"), namespace)
    out = capsys.readouterr().out
    assert "learning_rate=float32@SERVER> -> <b=float32[3],w=float32[4,3]>@SERVER)" in out
    # the docs' three rounds of federated_train against the numpy loop
    data = namespace["client_data"]
    model = {"w": np.zeros((4, 3)), "b": np.zeros(3)}
    for _ in range(3):
        model = _numpy_federated_train(data, model, 0.1, classes=3)
    chex.assert_trees_all_close(namespace["model"], model, atol=1e-6)
    # several steps on unequal learning rates and models: one more check away from zero
    start = {"w": RNG.normal(size=(4, 3)), "b": RNG.normal(size=3)}
    got = namespace["federated_train"](data, start, 0.5)
    chex.assert_trees_all_close(got, _numpy_federated_train(data, start, 0.5, 3), atol=1e-5)
