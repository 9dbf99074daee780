"""The suite compiles with XLA:CPU's legacy fusion emitters (`tests/conftest.py`); users' runs
compile the recurrent models' rounds with the default emitters, and the logistic, MLP and CNN
rounds with the legacy ones (`Model.compiler_options`, for a faster compile). Reference: the
same round compiled with the default emitters (a per-program compiler option) must give the
same bits, so the tests check what users run and the option changes no result. Both arms compile
at XLA's default LLVM level, as users' programs do; the suite's level 1 (`tests/conftest.py`)
changes a round's results only by rounding (checked here against level 3)."""

import jax
import numpy as np
import optax
import pytest
from helpers import (
    FASHION_MNIST_FILES,
    REPO,
    SHARED_DATA,
    USERS_BACKEND_OPT,
    needs_shared_data,
    tiny_data,
    tiny_model,
)

import fedjax_sim
from fedjax_sim.config import load_config
from fedjax_sim.models import LEGACY_FUSION_EMITTERS, MODELS, create_model
from fedjax_sim.simulation.loop import build_experiment
from fedjax_sim.sweeps import stacked_step


def _round_results(model, data, options: dict):
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(0.05), optax.sgd(1.0))
    schedule = fedjax_sim.ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    sampler = fedjax_sim.uniform_sampler(data.num_clients, 3)
    step = fedjax_sim.build_round_step(algorithm, data, schedule, sampler, 3)
    state = step.place(fedjax_sim.init_simulation_state(
        algorithm.init(model.init(jax.random.PRNGKey(0))), 1))
    compiled = step.jitted.lower(state, step.data, step.offsets).compile(compiler_options=options)
    for _ in range(2):
        state, metrics = compiled(state, step.data, step.offsets)
    return [np.asarray(x) for x in jax.tree.leaves((state.algorithm, metrics))]


@pytest.mark.parametrize("name, x_shape, x_kind, classes", [
    ("emnist_cnn", (28, 28, 1), "image", 62),
    ("logistic", (28, 28), "image", 10),
    ("mlp", (28, 28), "image", 10),
    ("char_lstm", (20,), "tokens", 86),
])
def test_emitters_keep_the_bits_and_the_suites_llvm_level_rounds(name, x_shape, x_kind, classes):
    rng = np.random.default_rng(0)
    clients = {}
    for i, n in enumerate((7, 12, 5, 9)):
        if x_kind == "image":
            x = rng.uniform(size=(n, *x_shape)).astype(np.float32)
            y = rng.integers(0, classes, n).astype(np.int32)
        else:
            x = rng.integers(1, classes, (n, *x_shape)).astype(np.int32)
            y = rng.integers(1, classes, (n, *x_shape)).astype(np.int32)
        clients[i] = {"x": x, "y": y}
    data = fedjax_sim.FederatedData.from_client_lists(clients)
    options = {"hidden": 16} if name == "char_lstm" else {}
    model = create_model(name, num_classes=classes, input_shape=x_shape,
                         input_dtype="int32" if x_kind == "tokens" else "float32", **options)
    legacy = _round_results(model, data, {**LEGACY_FUSION_EMITTERS, **USERS_BACKEND_OPT})
    default = _round_results(model, data, {"xla_cpu_use_fusion_emitters": True,
                                           **USERS_BACKEND_OPT})
    for a, b in zip(legacy, default, strict=True):
        np.testing.assert_array_equal(a, b)
    # The suite's LLVM level 1: the same round up to rounding
    suites = _round_results(model, data, {"xla_backend_optimization_level": 1})
    for a, b in zip(suites, legacy, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_create_model_gives_the_legacy_emitters_to_the_measured_models_only():
    # benchmarks/first_round.py measured these three; the recurrent models run slower with them
    legacy = {"logistic", "mlp", "emnist_cnn"}
    for name in MODELS:
        tokens = name in ("char_lstm", "stackoverflow_lstm", "tag_logistic", "sent140_lstm")
        model = create_model(name, num_classes=10, input_shape=(8,) if tokens else (28, 28, 1),
                             input_dtype="int32" if tokens else "float32")
        expected = LEGACY_FUSION_EMITTERS if name in legacy else None
        assert model.compiler_options == expected, name
    assert LEGACY_FUSION_EMITTERS == {"xla_cpu_use_fusion_emitters": False}


def test_compiler_options_reach_the_round_the_multi_round_loop_and_a_sweep_step():
    """An option XLA does not know fails each program's compile, naming it: the options are
    passed to every program the step compiles."""
    data, model = tiny_data(), tiny_model()
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    schedule = fedjax_sim.ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    bad = {"xla_no_such_option": True}
    step = fedjax_sim.build_round_step(algorithm, data, schedule,
                                       fedjax_sim.uniform_sampler(data.num_clients, 2), 2,
                                       rounds_per_call=2, compiler_options=bad)
    assert step.compiler_options == bad
    state = step.place(fedjax_sim.init_simulation_state(
        algorithm.init(model.init(jax.random.PRNGKey(0))), 0))
    with pytest.raises(Exception, match="xla_no_such_option"):
        step(state)
    with pytest.raises(Exception, match="xla_no_such_option"):
        step.run_rounds(state, 2)
    sweep_step = stacked_step(step.fn, "map", compiler_options=step.compiler_options)
    states = jax.tree.map(lambda x: x[None], state)
    with pytest.raises(Exception, match="xla_no_such_option"):
        sweep_step(states, np.array([True]), step.data, step.offsets)
    plain = fedjax_sim.build_round_step(algorithm, data, schedule,
                                        fedjax_sim.uniform_sampler(data.num_clients, 2), 2)
    assert plain.compiler_options is None
    plain(state)  # no options: compiles


@needs_shared_data(*FASHION_MNIST_FILES)
def test_a_run_compiles_its_round_with_the_models_options(monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))
    mlp = build_experiment(load_config(REPO / "configs" / "fashion_mnist_fedavg.yaml"))
    assert mlp.model.compiler_options == LEGACY_FUSION_EMITTERS
    assert mlp.round_step.compiler_options == LEGACY_FUSION_EMITTERS
    demo = build_experiment(load_config(None, []))  # the char-LSTM: XLA's defaults
    assert demo.round_step.compiler_options is None
