"""Per-client state that persists across rounds (SCAFFOLD's control variates, Ditto's personal
models, FedDyn's gradients, ...): a pytree whose leaves have a leading ``[num_clients]`` axis.

Inside the jitted round step the cohort's rows are gathered by client id, the clients compute
their new rows, and the rows are scattered back; padding clients (``valid == False``) and clients
that did not train write nothing. The store is part of the algorithm state, so it is donated,
checkpointed and sharded like everything else.

Memory is ``num_clients x size of one row``: a model-sized row per client suits up to a few
thousand clients of a small model (e.g. 3,400 EMNIST writers x 1.2M float32 = 16 GB is too much
for most devices; keep such rows in ``bfloat16`` or a smaller model).

If a cohort holds the same client twice (sampling with replacement), which of its rows is kept
is unspecified (XLA's scatter order); sample without replacement for stateful algorithms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def init_client_state(row: PyTree, num_clients: int) -> PyTree:
    """A store of ``num_clients`` copies of ``row`` (each leaf gets a leading client axis)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_clients, *jnp.shape(x))).copy(), row
    )


def gather_client_state(store: PyTree, client_ids: jax.Array) -> PyTree:
    """The rows of ``client_ids`` (``[C]`` int32): leaves ``[C, ...]``."""
    return jax.tree.map(lambda x: jnp.take(x, client_ids, axis=0, mode="clip"), store)


def scatter_client_state(
    store: PyTree, client_ids: jax.Array, rows: PyTree, write: jax.Array
) -> PyTree:
    """``store`` with ``rows`` written at ``client_ids`` where ``write`` (``[C]`` bool) is True.

    Rows whose ``write`` is False are dropped (their index is sent out of bounds), so padding
    clients never overwrite client 0.
    """
    num_clients = jax.tree.leaves(store)[0].shape[0]
    target = jnp.where(write, client_ids, num_clients)  # out of bounds: dropped
    return jax.tree.map(
        lambda x, r: x.at[target].set(r.astype(x.dtype), mode="drop"), store, rows
    )
