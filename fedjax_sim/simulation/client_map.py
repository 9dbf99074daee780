"""How the cohort's clients run: vmapped, sequential, in chunks, and sharded over devices.

``lax.map(client_fn, clients, batch_size=k)`` covers the range: k = C is a full ``vmap``
(accelerators: one wide program), k = 1 a sequential map inside the same jitted step (XLA:CPU:
vmapped convolutions become slow grouped convolutions, and a sequential client runs only its
own number of local steps instead of the cohort's largest), anything between bounds memory for
large cohorts. With a mesh that has a ``clients`` axis, each device maps its share of the cohort
this way and the aggregation that follows becomes an all-reduce.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from fedjax_sim.core import ClientMap, ShardedData

STRATEGIES = ("auto", "vmap", "map")
CLIENT_AXIS = "clients"


def default_strategy(backend: str | None = None) -> str:
    """``"map"`` (sequential) on CPU, ``"vmap"`` on GPU/TPU."""
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" else "vmap"


def resolve_strategy(strategy: str) -> str:
    """``"auto"`` -> the backend's default; checks the name."""
    if strategy not in STRATEGIES:
        raise ValueError(f"client execution {strategy!r}: expected one of {STRATEGIES}")
    return default_strategy() if strategy == "auto" else strategy


def local_client_map(strategy: str = "auto", batch_size: int | None = None) -> ClientMap:
    """A client map on one device.

    Args:
      strategy: ``"vmap"`` (all clients at once), ``"map"`` (``lax.map`` in chunks of
        ``batch_size`` clients, sequential when 1), or ``"auto"`` (by backend).
      batch_size: clients per chunk for ``"map"`` (default 1).
    """
    strategy = resolve_strategy(strategy)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"client batch_size must be >= 1, got {batch_size}")

    def map_clients(fn, clients, shared):
        if strategy == "vmap":
            return jax.vmap(fn, in_axes=(0, None))(clients, shared)
        k = batch_size or 1
        if k == 1:  # a plain scan: no vmap of size 1 around the client's loop
            return jax.lax.map(lambda c: fn(c, shared), clients)
        return jax.lax.map(lambda c: fn(c, shared), clients, batch_size=k)

    return map_clients


def sharded_client_map(
    mesh: Mesh, strategy: str = "auto", batch_size: int | None = None
) -> ClientMap:
    """Splits the cohort over the mesh's ``clients`` axis; each device maps its share locally.

    The cohort size must be a multiple of the axis size (the round step pads the cohort with
    zero-weight clients to make it so). Outputs stay sharded along the client axis, so the
    weighted mean the algorithm takes next compiles to an all-reduce.
    """
    if CLIENT_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {CLIENT_AXIS!r} axis")
    inner = local_client_map(strategy, batch_size)

    def map_clients(fn, clients, shared):
        # Data split by clients (`ShardedData`) stays split: each device reads its own block.
        is_sharded = lambda x: isinstance(x, ShardedData)  # noqa: E731
        shared = jax.tree.map(lambda x: x.as_local() if is_sharded(x) else x, shared,
                              is_leaf=is_sharded)
        shared_specs = jax.tree.map(
            lambda x: PartitionSpec(CLIENT_AXIS) if is_sharded(x) else PartitionSpec(), shared,
            is_leaf=is_sharded)
        mapped = jax.shard_map(
            lambda c, s: inner(fn, c, s),
            mesh=mesh,
            in_specs=(PartitionSpec(CLIENT_AXIS), shared_specs),
            out_specs=PartitionSpec(CLIENT_AXIS),
            check_vma=False,
        )
        return mapped(clients, shared)

    return map_clients
