"""The engine's own types: what the engine hands an algorithm each round, and what an algorithm is.

Everything above imports these (algorithms, aggregators, the simulation layer); this module
imports nothing of the package.

An algorithm is a pair of pure functions over an immutable state pytree (optax's pattern):

  init(params) -> state
  apply(state, cohort, map_clients) -> (state, metrics)

``cohort`` describes the round's clients (indices into the flat, device-resident example arrays,
masks, sizes, keys); ``map_clients`` runs a per-client function over the cohort's client axis.
The engine chooses how: a ``vmap``, a sequential map in the same jitted step, chunks, or shards
over devices. An algorithm never knows which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
from flax import struct

PyTree = Any


@struct.dataclass
class ClientInput:
    """One client's share of a round (leading ``[C]`` axis when stacked for a cohort).

    Attributes:
      client_id: position of the client in the federated data (int32).
      indices: ``[S, B]`` int32 rows of the flat example arrays, one row of B per local step.
      mask: ``[S, B]`` bool, False for padding.
      num_steps: int32 number of steps with at least one real example (the loop's trip count).
      num_examples: int32 size of the client's training data (the default aggregation weight).
      valid: bool, False for a padding client added to fill a device shard.
      key: the client's PRNG key (dropout, client-side randomness).
      duration: float32 simulated seconds the client needs for its local steps (1 per step
        unless a system model sets per-client speeds; see `fedjax_sim.simulation.system`).
      own_trip_count: static; True when clients run one at a time (a sequential map), so the
        local loop can stop after ``num_steps``; False under ``vmap``, where a fixed loop over
        all S steps (padded steps masked) is cheaper than a loop with a batched trip count.
      trip_count_axis: static; the name of a ``vmap`` axis over configurations (a sweep), or
        None. With own trip counts, the local loop then runs the largest step count over that
        axis (a ``pmax``: one unbatched trip count, so vmap adds no select to every step), the
        steps past a client's own count masked.
    """

    client_id: jax.Array
    indices: jax.Array
    mask: jax.Array
    num_steps: jax.Array
    num_examples: jax.Array
    valid: jax.Array
    key: jax.Array
    duration: jax.Array
    own_trip_count: bool = struct.field(pytree_node=False, default=True)
    trip_count_axis: str | None = struct.field(pytree_node=False, default=None)

    def trip_count(self, steps: jax.Array | None = None) -> jax.Array | int:
        """The local loop's trip count: ``steps`` (default ``num_steps``) when the client runs
        its own count, its maximum over `trip_count_axis` in a sweep, else all S steps."""
        if not self.own_trip_count:
            return self.indices.shape[-2]
        steps = self.num_steps if steps is None else steps
        if self.trip_count_axis is not None:
            return jax.lax.pmax(steps, self.trip_count_axis)
        return steps


@struct.dataclass
class Cohort:
    """The round's clients (`ClientInput` with a leading ``[C]`` axis) and the shared data.

    Attributes:
      clients: the cohort's `ClientInput`, stacked ``[C, ...]``.
      data: the flat example arrays the clients' ``indices`` point into.
      round: int32 scalar, the index of this round (0 for the first; for schedules).
      key: the round's server-side PRNG key (aggregator noise, server randomness); independent
        of the sampling, batching, client and system keys. None outside the round step.
      size: static; the cohort's clients before it was padded with zero-weight clients to a
        multiple of the devices (the padding is the last ``C_padded - size`` rows). None: no
        padding (every row is a drawn client, some possibly not valid).
    """

    clients: ClientInput
    data: Mapping[str, jax.Array]
    round: jax.Array | int = 0
    key: jax.Array | None = None
    size: int | None = struct.field(pytree_node=False, default=None)

    def server_key(self) -> jax.Array:
        """``key``, or a fixed key when the cohort was built by hand (tests, notebooks)."""
        return self.key if self.key is not None else jax.random.PRNGKey(0)


class ClientMap(Protocol):
    """``map_clients(fn, clients, shared)``: ``fn(client, shared)`` for every client.

    ``clients`` has a leading client axis; ``shared`` is broadcast to every client. Returns the
    stacked per-client outputs.
    """

    def __call__(self, fn: Callable[[PyTree, PyTree], PyTree], clients: PyTree,
                 shared: PyTree) -> PyTree: ...


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as a pure ``(init, apply)`` pair.

    The state ``init`` returns must have a ``params`` attribute: the global model that the
    engine evaluates and checkpoints with everything else.
    """

    init: Callable[..., PyTree]
    apply: Callable[[PyTree, Cohort, ClientMap], tuple[PyTree, dict[str, jax.Array]]]


class Aggregator(NamedTuple):
    """How the server combines one client-to-server message of the cohort, as a pure pair.

      init(example) -> state            ``example``: one client's message (no client axis)
      apply(state, values, weights, key, client_ids=None, cohort_size=None)
          -> (aggregate, state, metrics)

    ``values`` has a leading client axis ``[C, ...]``; ``weights`` ``[C]`` are the algorithm's
    aggregation weights (0 for padding and dropped clients); ``client_ids`` ``[C]`` int32 say
    whose messages they are (every algorithm passes them, as a keyword; stages that keep
    per-client state, such as error feedback, or model an attack on chosen clients read them).
    ``cohort_size`` (static, optional) counts the real rows when the engine padded the cohort
    for the devices (the padding is the last rows); the built-in algorithms pass it through
    `aggregators.apply_aggregator`, only to an ``apply`` that takes it (as optax passes extra
    arguments), so an ``apply`` without it keeps working.
    The default, `aggregators.mean`, is the weighted mean. Stages (clipping, noise, compression,
    robust reducers) compose with `aggregators.chain` like ``optax.chain``.

    ``noise_multipliers(state) -> {name: z}`` (optional) names every Gaussian mechanism the
    aggregator applies per round with its noise multiplier (noise std / L2 sensitivity), for
    the privacy accountant.
    """

    init: Callable[[PyTree], PyTree]
    apply: Callable[..., tuple[PyTree, PyTree, dict[str, jax.Array]]]
    noise_multipliers: Callable[[PyTree], dict[str, jax.Array]] | None = None


@jax.tree_util.register_pytree_node_class
class ShardedData(dict):
    """Flat example arrays split by clients over the devices of a mesh's ``clients`` axis.

    Device d holds rows ``[d * rows_per_shard, (d + 1) * rows_per_shard)`` of the global arrays
    (its own block of clients, padded); a cohort's ``indices`` are global rows. Inside the
    engine's sharded client map (``local`` True) each device sees only its block, and
    `local_rows` turns the global rows into rows of that block; anywhere else the arrays are
    whole and global rows index them directly. A dict: algorithms read it like any data.
    """

    def __init__(self, arrays: Mapping[str, jax.Array], rows_per_shard: int,
                 axis_name: str, local: bool = False):
        super().__init__(arrays)
        self.rows_per_shard = rows_per_shard
        self.axis_name = axis_name
        self.local = local

    def as_local(self) -> ShardedData:
        return ShardedData(self, self.rows_per_shard, self.axis_name, local=True)

    def local_rows(self, rows: jax.Array) -> jax.Array:
        if not self.local:
            return rows
        return rows - self.rows_per_shard * jax.lax.axis_index(self.axis_name)

    def tree_flatten(self):
        names = sorted(self)
        return [self[name] for name in names], (names, self.rows_per_shard, self.axis_name,
                                                self.local)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        names, rows_per_shard, axis_name, local = aux
        return cls(dict(zip(names, leaves, strict=True)), rows_per_shard, axis_name, local)
