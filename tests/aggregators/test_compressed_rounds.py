"""Compression and secure aggregation inside the jitted round: a sequential map on one device and
vmapped clients sharded over 4 fake CPU devices (cohort 5 padded to 8 on the mesh: 2 vmapped
clients per device) give the same states and metrics (two compilations keep the test short).

One chain exercises every new stage: clip -> top-k with error feedback (per-client residuals) ->
4-bit quantization after a Hadamard rotation -> secure mean with dropouts -> central noise.
"""

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim import aggregators as agg
from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state


def _rounds(client_execution, mesh):
    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11))
    aggregator = agg.chain(
        agg.clip(0.5),
        agg.top_k(fraction=0.5, num_clients=data.num_clients),
        agg.quantize(4, "hadamard"),
        agg.secure_mean(32, scale=2.0 ** 20, dropout=0.3),
        agg.gaussian_noise(0.1))
    algorithm = create_algorithm("fed_avg", model, optax.sgd(0.1), optax.sgd(1.0),
                                 aggregator=aggregator)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 5), 5,
                            client_execution=client_execution, mesh=mesh)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 11)
    compiled = jax.jit(step.fn).lower(state, step.data, step.offsets).compile()
    history = []
    for _ in range(2):
        state, metrics = compiled(state, step.data, step.offsets)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.algorithm), history


def test_compressed_secure_round_is_the_same_under_map_and_vmap_on_four_devices():
    reference, reference_metrics = _rounds("map", None)
    residual = np.asarray(reference.aggregator[1]["residual"])
    assert residual.shape[0] == 5 and np.any(residual != 0)  # error feedback ran
    for execution, mesh in (("vmap", client_mesh(4)),):
        state, metrics = _rounds(execution, mesh)
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
        for m1, m2 in zip(reference_metrics, metrics, strict=True):
            for name in ("aggregator/secure_mean/survivors", "aggregator/top_k/bits_per_client",
                         "aggregator/quantize_hadamard/bits_per_client",
                         "aggregator/secure_mean/overflow"):
                assert float(m1[name]) == pytest.approx(float(m2[name]))
