"""The host data path (arrays in host memory, cohorts gathered and prefetched by a thread)
against the device path: the same clients, rows and parameters, bit for bit."""

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import (
    build_round_step,
    init_simulation_state,
    should_keep_on_host,
)

SIZES = (5, 17, 40, 3, 11, 8, 9, 23)


def _run(data: FederatedData, rounds: int, **kwargs):
    model = tiny_model()
    algorithm = fed_avg(model, optax.sgd(0.1, momentum=0.5), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=2)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(len(SIZES), 4), 4,
                                  **kwargs)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 7)
    history = []
    for _ in range(rounds):
        state, metrics = round_step(state)
        history.append(jax.device_get(metrics))
    round_step.reset()
    return jax.device_get(state.algorithm.params), history, round_step


@pytest.mark.parametrize("prefetch", [0, 2])
def test_host_path_equals_device_path_bitwise(prefetch):
    data = tiny_data(SIZES)
    device_params, device_history, device_step = _run(data, 5, data_placement="device")
    host_params, host_history, host_step = _run(data, 5, data_placement="host",
                                                prefetch=prefetch)
    assert device_step.feeder is None and host_step.feeder is not None
    assert host_step.data is None  # nothing but offsets went to the device
    for a, b in zip(jax.tree.leaves(device_params), jax.tree.leaves(host_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(device_history, host_history, strict=True):
        assert a == b


def test_host_path_on_memmapped_arrays_and_a_mesh(tmp_path):
    data = tiny_data(SIZES)
    mapped = {}
    for name, array in data.arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
        mapped[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    host_data = FederatedData(mapped, data.offsets, data.client_ids)
    assert should_keep_on_host(host_data.arrays) and not should_keep_on_host(data.arrays)
    device_params, _, _ = _run(data, 3, data_placement="device")
    host_params, _, step = _run(host_data, 3, data_placement="auto", mesh=client_mesh(4))
    assert step.feeder is not None
    for a, b in zip(jax.tree.leaves(device_params), jax.tree.leaves(host_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_error_in_the_feeder_thread_reaches_the_caller(monkeypatch):
    import fedjax_sim.simulation.host_data as host_data

    def failing_take(*args, **kwargs):
        raise OSError("the cache's disk went away")

    monkeypatch.setattr(host_data.np, "take", failing_take)
    with pytest.raises(OSError, match="disk went away"):
        _run(tiny_data(SIZES), 2, data_placement="host", prefetch=1)
