"""Placement: which devices run a round, where the training data lives, how the cohort maps to
the devices, and which process writes.

A `Backend` is the one object the round step receives for these decisions (`build_round_step`'s
``backend=``). The default, ``Backend()``, is one process and one device: nothing is sharded and
it costs nothing. With a mesh that has a ``clients`` axis each device trains its share of the
cohort (`sharded_client_map`); the mesh may span the devices of several processes started with
`fedjax_sim.simulation.distributed.initialize` (``jax.distributed``), and then every array the
step reads is a global array over that mesh.

Where the flat training arrays live (``data_placement``):

* ``device``: replicated on every device of the mesh; the step gathers the cohort's rows.
* ``host``: in host memory (e.g. a memory-mapped cache); a feeder gathers each round's rows and
  transfers them (`fedjax_sim.simulation.host_data`).
* ``sharded``: split by clients over the mesh's devices: device d holds only the rows of its own
  block of clients, and draws its share of the cohort from that block (see
  `fedjax_sim.data.sampling.blocked_uniform_sampler`). Memory per device is the data over the
  number of devices; the cohort is stratified by block instead of uniform over all clients.
* ``auto``: ``host`` for memory-mapped arrays or more than `DEVICE_BYTES_LIMIT` bytes, else
  ``device``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim.algorithms.client_state import CALLBACK_PIECE_BYTES, host_client_state
from fedjax_sim.core import ClientMap
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.client_map import (
    CLIENT_AXIS,
    local_client_map,
    resolve_strategy,
    sharded_client_map,
)

PyTree = Any
DATA_PLACEMENTS = ("auto", "device", "host", "sharded")
CLIENT_STATE_PLACEMENTS = ("replicated", "sharded", "host")
DEVICE_BYTES_LIMIT = 4 << 30
"""``data_placement="auto"`` keeps arrays larger than this (in total) on the host."""


def should_keep_on_host(arrays: Mapping[str, np.ndarray]) -> bool:
    """True for memory-mapped arrays, or more than `DEVICE_BYTES_LIMIT` bytes in total."""
    total = sum(np.asarray(a).nbytes if not isinstance(a, np.memmap) else a.nbytes
                for a in arrays.values())
    return any(isinstance(a, np.memmap) for a in arrays.values()) or total > DEVICE_BYTES_LIMIT


def default_mesh(num_devices: int | None = None) -> Mesh | None:
    """A ``clients`` mesh over ``num_devices`` devices, None for one; ``num_devices`` None: 1,
    or every device of every process when there are several processes."""
    if num_devices is None and jax.process_count() > 1:
        num_devices = jax.device_count()
    return client_mesh(num_devices) if (num_devices or 1) > 1 else None


@dataclasses.dataclass(frozen=True)
class Backend:
    """Devices, mesh, data placement and client mapping of a simulation.

    Attributes:
      mesh: a mesh with a ``clients`` axis to shard the cohort over (None: one device, this
        process's first).
      client_execution: ``"auto"``, ``"vmap"`` or ``"map"`` (see `client_map`).
      client_batch_size: clients per chunk under ``"map"`` (bounds memory for large cohorts).
      data_placement: ``"device"``, ``"host"``, ``"sharded"`` or ``"auto"`` (module docstring).
      prefetch: rounds the host feeder prepares ahead (None: 2).
      client_state: ``"replicated"`` (every device holds the whole state) or ``"sharded"``:
        every leaf of the state whose leading axis is the number of clients (the per-client
        stores of SCAFFOLD, FedDyn, Ditto, error feedback) is split over the mesh's devices
        along that axis, so each device (and each process) holds 1 / devices of it; the round's
        gathers and scatters of the cohort's rows then become collectives. A layout choice
        only: the results are the same (a leaf that merely happens to have that leading size
        is split too, which costs communication, never correctness; a store whose client count
        is not a multiple of the devices stays replicated). ``"host"``: every per-client
        store made by `fedjax_sim.algorithms.client_state.init_client_state` stays in host
        memory, memory-mapped to a file in ``client_state_dir``; each round reads and writes
        only the cohort's rows (`HostClientStore`), so the device never holds a whole store.
        One process only; on a mesh of several XLA:CPU devices the stores' callbacks take
        their operands in pieces (`fedjax_sim.algorithms.client_state.CALLBACK_PIECE_BYTES`).
      client_state_dir: the folder of the ``"host"`` stores' files (None: temporary files).
    """

    mesh: Mesh | None = None
    client_execution: str = "auto"
    client_batch_size: int | None = None
    data_placement: str = "device"
    prefetch: int | None = None
    client_state: str = "replicated"
    client_state_dir: str | None = None

    def __post_init__(self):
        resolve_strategy(self.client_execution)
        if self.client_batch_size is not None and self.client_batch_size < 1:
            raise ValueError(f"client batch_size must be >= 1, got {self.client_batch_size}")
        if self.data_placement not in DATA_PLACEMENTS:
            raise ValueError(f"data_placement={self.data_placement!r}: expected one of "
                             f"{DATA_PLACEMENTS}")
        if self.client_state not in CLIENT_STATE_PLACEMENTS:
            raise ValueError(f"client_state={self.client_state!r}: expected one of "
                             f"{CLIENT_STATE_PLACEMENTS}")
        if self.client_state == "host" and jax.process_count() > 1:
            raise ValueError("client_state='host' keeps the stores in this process's memory: "
                             "with several processes use client_state='sharded'")
        if self.mesh is not None and CLIENT_AXIS not in self.mesh.axis_names:
            raise ValueError(f"mesh axes {self.mesh.axis_names} have no {CLIENT_AXIS!r} axis")
        if self.mesh is None and jax.process_count() > 1:
            raise ValueError(f"{jax.process_count()} processes need a mesh over their devices "
                             "(Backend.create() makes one over all of them)")
        if self.data_placement == "sharded" and self.mesh is None:
            raise ValueError("data_placement='sharded' splits the clients over the devices of "
                             "a mesh: give a mesh (execution.num_devices > 1, or several "
                             "processes)")

    @classmethod
    def create(cls, num_devices: int | None = None, **options) -> Backend:
        """A backend over `default_mesh` ``(num_devices)``; ``options``: the other fields."""
        return cls(mesh=default_mesh(num_devices), **options)

    # --- Where things run ------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        """Devices the cohort is split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.shape[CLIENT_AXIS]

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1

    @property
    def target(self) -> Any:
        """Where the step's replicated inputs live: this process's first device, or replicated
        over the mesh."""
        if self.mesh is None:
            return jax.local_devices()[0]
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def sequential(self) -> bool:
        """Clients run one at a time (a sequential map), so each can run its own step count."""
        return (resolve_strategy(self.client_execution) == "map"
                and (self.client_batch_size or 1) == 1)

    def client_map(self) -> ClientMap:
        if self.mesh is None:
            return local_client_map(self.client_execution, self.client_batch_size)
        return sharded_client_map(self.mesh, self.client_execution, self.client_batch_size)

    def keeps_on_host(self, arrays: Mapping[str, np.ndarray]) -> bool:
        return self.data_placement == "host" or (
            self.data_placement == "auto" and should_keep_on_host(arrays))

    # --- Moving values ---------------------------------------------------------------------

    def put(self, tree: PyTree) -> PyTree:
        """``tree`` (the same value in every process) replicated where the step runs."""
        if self.multi_process:  # a global array is built from host values, not local arrays
            return jax.tree.map(self._replicated_global, jax.device_get(tree))
        return jax.device_put(tree, self.target)

    def _replicated_global(self, leaf: Any) -> Any:
        """A host value replicated over every process's devices, each process placing its own
        copies. `jax.device_put` of a host value onto devices of several processes first
        checks that every process holds the same value (an all-gather program per leaf, a
        large part of a short multi-process run's start-up); the values here are, by
        construction (the same config and seed), and the multi-process tests compare the
        result with one process. Python scalars keep `jax.device_put` (their weak type)."""
        if not isinstance(leaf, (np.ndarray, np.generic)):
            return jax.device_put(leaf, self.target)
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, self.target, lambda index: leaf[index])

    def put_state(self, tree: PyTree, num_clients: int) -> PyTree:
        """`put`, with the per-client leaves split over the devices when ``client_state`` is
        ``"sharded"`` (leading axis ``num_clients``, a multiple of the devices)."""
        if self.client_state != "sharded" or self.mesh is None:
            return self.put(tree)

        def place(leaf):
            leaf = np.asarray(leaf)
            # Each process builds only its own devices' pieces.
            return jax.make_array_from_callback(
                leaf.shape, self._state_sharding(leaf.shape, num_clients),
                lambda index: leaf[index])

        return jax.tree.map(place, jax.device_get(tree))

    def init_state(self, init: Callable[..., PyTree], args: tuple, num_clients: int) -> PyTree:
        """``init(*args)`` placed as `put_state` places it; with ``client_state="sharded"`` the
        per-client leaves are created split (a jitted ``init`` with those output shardings), so
        no process ever holds a whole per-client store; with ``"host"`` they are created on
        the host (``init`` runs eagerly)."""
        if self.client_state != "sharded" or self.mesh is None:
            hosted = self.client_state == "host"
            # several XLA:CPU devices: the stores' callbacks take their operands in pieces
            # (whole ones of 100 KiB or more deadlock them, see `client_state._host_call`)
            pieces = (CALLBACK_PIECE_BYTES if self.mesh is not None and self.mesh.size > 1
                      and self.mesh.devices.flat[0].platform == "cpu" else None)
            context = (host_client_state(self.client_state_dir, pieces) if hosted
                       else contextlib.nullcontext())
            with context:
                return self.put(init(*args))
        args = self.put(args)
        shardings = jax.tree.map(lambda leaf: self._state_sharding(leaf.shape, num_clients),
                                 jax.eval_shape(init, *args))
        return jax.jit(init, out_shardings=shardings)(*args)

    def _state_sharding(self, shape: tuple[int, ...], num_clients: int) -> NamedSharding:
        per_client = (len(shape) >= 1 and shape[0] == num_clients
                      and num_clients % self.num_shards == 0)
        return NamedSharding(self.mesh,
                             PartitionSpec(CLIENT_AXIS) if per_client else PartitionSpec())

    def put_sharded(self, block: Callable[[int], Mapping[str, np.ndarray]], rows: int,
                    like: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Arrays split over the mesh's ``clients`` axis: device d holds ``block(d)`` (``rows``
        rows of each feature, shaped like ``like``'s). Each process calls ``block`` only for
        its own devices, so it reads (e.g. from a memory-mapped cache) only their rows."""
        sharding = NamedSharding(self.mesh, PartitionSpec(CLIENT_AXIS))
        cached = functools.lru_cache(maxsize=None)(block)
        out = {}
        for name, array in like.items():
            shape = (self.num_shards * rows, *array.shape[1:])
            out[name] = jax.make_array_from_callback(
                shape, sharding,
                lambda index, name=name: cached((index[0].start or 0) // rows)[name])
        return out

    def local(self, tree: PyTree) -> PyTree:
        """``tree``'s replicated arrays as arrays on this process's first device, to evaluate
        with local data there (a computation on arrays replicated over the mesh would run once
        on every device); unchanged with one device. In one process, an array split over the
        devices (``client_state="sharded"``) stays whole; several processes take their first
        device's part of every array."""
        if self.num_shards == 1 and not self.multi_process:
            return tree

        def local(a):
            if not isinstance(a, jax.Array):
                return a
            if self.multi_process or a.is_fully_replicated:
                return a.addressable_data(0)
            return a

        return jax.tree.map(local, tree)

    def describe(self) -> dict[str, Any]:
        """The placement for a run's summary."""
        return {
            "processes": jax.process_count(),
            "devices": self.num_shards,
            "platform": jax.default_backend(),
            "client_execution": resolve_strategy(self.client_execution),
            "data_placement": self.data_placement,
            "client_state": self.client_state,
        }
