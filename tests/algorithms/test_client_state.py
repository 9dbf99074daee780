"""The per-client state store against a plain numpy reference."""

import jax.numpy as jnp
import numpy as np

from fedjax_sim.algorithms.client_state import (
    gather_client_state,
    init_client_state,
    scatter_client_state,
)


def test_init_gather_scatter_match_numpy():
    row = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(())}
    store = init_client_state(row, 5)
    assert store["w"].shape == (5, 2, 3) and store["b"].shape == (5,)
    ids = jnp.array([3, 0, 1, 0])  # the last is a padding client (id 0) that must not write
    rows = {"w": jnp.arange(24.0).reshape(4, 2, 3), "b": jnp.array([1.0, 2.0, 3.0, 4.0])}
    write = jnp.array([True, True, False, False])
    new = scatter_client_state(store, ids, rows, write)
    expected_b = np.zeros(5)
    expected_w = np.zeros((5, 2, 3))
    for i, client in enumerate([3, 0, 1, 0]):
        if [True, True, False, False][i]:
            expected_b[client] = float(rows["b"][i])
            expected_w[client] = np.asarray(rows["w"][i])
    np.testing.assert_array_equal(new["b"], expected_b)
    np.testing.assert_array_equal(new["w"], expected_w)
    gathered = gather_client_state(new, jnp.array([0, 3]))
    np.testing.assert_array_equal(gathered["b"], [2.0, 1.0])
