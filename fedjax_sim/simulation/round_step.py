"""The round step: one jitted function per federated round.

  round_key = fold_in(root_key, round)
  cohort    = sampler(round_key)                       [C] client ids
  indices   = cohort_indices(...)                      [C, S, B] rows + mask (in-graph shuffle)
  state     = algorithm.apply(state, cohort, map)      local training, aggregation, server step

The simulation state (algorithm state, round counter, root key) is donated; the example arrays
live on the device and are gathered inside the step; metrics stay on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim.algorithms.base import ClientInput, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule, cohort_indices
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sampling import Sampler
from fedjax_sim.simulation.client_map import (
    CLIENT_AXIS,
    local_client_map,
    resolve_strategy,
    sharded_client_map,
)

PyTree = Any


@struct.dataclass
class SimulationState:
    """Everything a round changes: the algorithm's state, the round counter and the root key.

    Attributes:
      algorithm: the algorithm's state pytree.
      round: int32 scalar, rounds completed.
      key: the root PRNG key (raw ``uint32[2]`` key data, so it checkpoints as an array).
    """

    algorithm: PyTree
    round: jax.Array
    key: jax.Array


def init_simulation_state(algorithm_state: PyTree, seed: int | jax.Array) -> SimulationState:
    """Round 0 of a simulation from an algorithm state and a seed (or a raw root key).

    The state is copied: the round step donates its input, and the caller's arrays (e.g. the
    initial params it may still use) must stay valid.
    """
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    algorithm_state = jax.tree.map(jnp.copy, algorithm_state)
    return SimulationState(algorithm_state, jnp.zeros((), jnp.int32), key)


def count_nonfinite(tree: PyTree) -> jax.Array:
    """Number of NaN/inf values over the floating-point leaves of ``tree`` (float32 scalar)."""
    counts = [
        jnp.sum(~jnp.isfinite(leaf)).astype(jnp.float32)
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return sum(counts, jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class RoundStep:
    """A compiled round. Call it as ``state, metrics = round_step(state)``.

    Attributes:
      fn: the pure, unjitted round ``(state, data, offsets) -> (state, metrics)`` (vmap it over
        a sweep axis of the state, or wrap it in your own jit).
      data: the device-resident flat example arrays.
      offsets: ``[num_clients + 1]`` int32 on the device.
      cohort_size: C (before padding for devices).
    """

    fn: Callable[..., tuple[SimulationState, dict[str, jax.Array]]]
    jitted: Callable[..., tuple[SimulationState, dict[str, jax.Array]]]
    data: Mapping[str, jax.Array]
    offsets: jax.Array
    cohort_size: int

    def __call__(self, state: SimulationState) -> tuple[SimulationState, dict[str, jax.Array]]:
        return self.jitted(state, self.data, self.offsets)


def build_round_step(
    algorithm: FederatedAlgorithm,
    train: FederatedData,
    schedule: ClientSchedule,
    sampler: Sampler,
    cohort_size: int,
    *,
    client_execution: str = "auto",
    client_batch_size: int | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    system: Callable[[jax.Array, ClientInput], ClientInput] | None = None,
) -> RoundStep:
    """Builds the jitted round step.

    Args:
      algorithm: an ``(init, apply)`` pair.
      train: the clients' training data; its arrays are put on the device(s) once.
      schedule: static local-training shape (S, B, epochs).
      sampler: ``key -> [cohort_size]`` client positions.
      cohort_size: C, clients per round.
      client_execution: ``"auto"``, ``"vmap"`` or ``"map"`` (see `client_map`).
      client_batch_size: clients per chunk under ``"map"``.
      mesh: a mesh with a ``clients`` axis to shard the cohort over devices (None: one device).
      donate: donate the state's buffers to the step.
      system: ``(key, clients) -> clients``, a system-heterogeneity model applied to the cohort
        before the algorithm sees it (dropout, stragglers, per-client durations; see
        `fedjax_sim.simulation.system`). None: every client finishes every step, 1 s per step.
    """
    num_shards = mesh.shape[CLIENT_AXIS] if mesh is not None else 1
    sequential = resolve_strategy(client_execution) == "map" and (client_batch_size or 1) == 1
    padded_size = -(-cohort_size // num_shards) * num_shards
    if mesh is not None:
        map_clients: ClientMap = sharded_client_map(mesh, client_execution, client_batch_size)
        replicated = NamedSharding(mesh, PartitionSpec())
        data = jax.device_put(dict(train.arrays), replicated)
        offsets = jax.device_put(train.offsets.astype(np.int32), replicated)
    else:
        map_clients = local_client_map(client_execution, client_batch_size)
        data = jax.device_put(dict(train.arrays))
        offsets = jax.device_put(train.offsets.astype(np.int32))

    def round_fn(state: SimulationState, data, offsets):
        round_key = jax.random.fold_in(state.key, state.round)
        key_sample, key_batch, key_clients, key_system = jax.random.split(round_key, 4)
        cohort_ids = sampler(key_sample)
        valid = jnp.arange(padded_size) < cohort_size
        cohort_ids = jnp.pad(cohort_ids, (0, padded_size - cohort_size))
        indices, mask, sizes = cohort_indices(key_batch, cohort_ids, offsets, schedule)
        mask = mask & valid[:, None, None]
        sizes = jnp.where(valid, sizes, 0)
        num_steps = schedule.steps_for(sizes)
        clients = ClientInput(
            client_id=cohort_ids,
            indices=indices,
            mask=mask,
            num_steps=num_steps,
            num_examples=sizes,
            valid=valid,
            key=jax.random.split(key_clients, padded_size),
            duration=num_steps.astype(jnp.float32),
            own_trip_count=sequential,
        )
        if system is not None:
            clients = system(key_system, clients)
        algorithm_state, metrics = algorithm.apply(
            state.algorithm, Cohort(clients, data, state.round), map_clients
        )
        # Checked on the host at log time (never inside the round): NaN/inf anywhere in the state.
        metrics = {**metrics, "state/nonfinite": count_nonfinite(algorithm_state)}
        return state.replace(algorithm=algorithm_state, round=state.round + 1), metrics

    jitted = jax.jit(round_fn, donate_argnums=(0,) if donate else ())
    return RoundStep(round_fn, jitted, data, offsets, cohort_size)
