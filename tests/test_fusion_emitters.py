"""The suite compiles with XLA:CPU's legacy fusion emitters (`tests/conftest.py`); users' runs
use the default emitters. Reference: the same round compiled with the default emitters (a
per-program compiler option) must give the same bits, so the tests check what users run."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim
from fedjax_sim.models import create_model


def _round_results(model, data, use_fusion_emitters: bool):
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(0.3), optax.sgd(1.0))
    schedule = fedjax_sim.ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    sampler = fedjax_sim.uniform_sampler(data.num_clients, 3)
    step = fedjax_sim.build_round_step(algorithm, data, schedule, sampler, 3)
    state = step.place(fedjax_sim.init_simulation_state(
        algorithm.init(model.init(jax.random.PRNGKey(0))), 1))
    compiled = step.jitted.lower(state, step.data, step.offsets).compile(
        compiler_options={"xla_cpu_use_fusion_emitters": use_fusion_emitters})
    for _ in range(2):
        state, metrics = compiled(state, step.data, step.offsets)
    return [np.asarray(x) for x in jax.tree.leaves((state.algorithm, metrics))]


@pytest.mark.parametrize("name, x_shape, x_kind, classes", [
    ("emnist_cnn", (28, 28, 1), "image", 62),
    ("logistic", (28, 28), "image", 10),
    ("char_lstm", (20,), "tokens", 86),
])
def test_legacy_and_default_fusion_emitters_train_the_same_bits(name, x_shape, x_kind, classes):
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
    legacy = _round_results(model, data, False)
    default = _round_results(model, data, True)
    for a, b in zip(legacy, default, strict=True):
        np.testing.assert_array_equal(a, b)
