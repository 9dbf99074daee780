"""The round step: one jitted function per federated round.

  round_key = fold_in(root_key, round)
  cohort    = sampler(round_key)                       [C] client ids
  indices   = cohort_indices(...)                      [C, S, B] rows + mask (in-graph shuffle)
  state     = algorithm.apply(state, cohort, map)      local training, aggregation, server step

The simulation state (algorithm state, round counter, root key) is donated; the example arrays
live on the device and are gathered inside the step; metrics stay on the device. With
``rounds_per_call`` k > 1 a second compiled function runs up to k rounds in one call (a loop over
rounds on the device, metrics stacked), for models so small that dispatching one call per round
is what a round costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from fedjax_sim.algorithms.client_state import is_host_store
from fedjax_sim.core import ClientInput, Cohort, FederatedAlgorithm, ShardedData
from fedjax_sim.data.batching import ClientSchedule, cohort_indices
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sampling import Sampler, client_blocks
from fedjax_sim.models.base import cpu_compiler_options
from fedjax_sim.simulation.backend import (  # noqa: F401  (re-exported: the placement names)
    DATA_PLACEMENTS,
    DEVICE_BYTES_LIMIT,
    Backend,
    should_keep_on_host,
)
from fedjax_sim.simulation.client_map import CLIENT_AXIS
from fedjax_sim.simulation.host_data import HostFeeder
from fedjax_sim.simulation.system import system_metrics

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
    initial params it may still use) must stay valid. The copies are ``device_put`` copies, not
    ``jnp.copy``: eagerly, each ``jnp.copy`` of a new shape compiles a program of its own
    (a test checks that no program is compiled here).
    """
    # a NumPy integer (a seed from np.arange or a NumPy generator) is a seed too, not key data
    key = jax.random.PRNGKey(int(seed)) if isinstance(seed, int | np.integer) else seed
    algorithm_state = jax.tree.map(lambda x: jax.device_put(x, may_alias=False),
                                   algorithm_state)
    return SimulationState(algorithm_state, jax.device_put(np.zeros((), np.int32)), key)


STORE_CHECK_ELEMENTS = 1 << 22
"""`count_nonfinite` checks a per-client store this large (4M elements) only at the cohort's
rows."""


def count_nonfinite(tree: PyTree, num_clients: int | None = None,
                    client_ids: jax.Array | None = None) -> jax.Array:
    """Number of NaN/inf values over the floating-point leaves of ``tree`` (float32 scalar).

    With ``num_clients`` and ``client_ids``, a large per-client store (a leaf
    ``[num_clients, ...]`` with at least 2 dimensions and `STORE_CHECK_ELEMENTS` elements or
    more) is checked only at the rows of ``client_ids``: the round writes no other row
    (`fedjax_sim.algorithms.client_state`), and the rest were checked in the rounds that wrote
    them, so a round does not read the whole store (SCAFFOLD's 60,000 control variates are
    1.9 GB). Smaller leaves are checked whole (a model kernel that happens to have
    ``num_clients`` rows is small). A store kept on the host counts the NaN/inf values its last
    write stored (`HostClientStore.nonfinite`).
    """
    counts = []
    for leaf in jax.tree.leaves(tree, is_leaf=is_host_store):
        if is_host_store(leaf):  # what its last write stored (the rows live on the host)
            counts.append(leaf.nonfinite)
            continue
        if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
            continue
        if (client_ids is not None and leaf.ndim >= 2 and leaf.shape[0] == num_clients
                and leaf.size >= STORE_CHECK_ELEMENTS):
            leaf = jnp.take(leaf, client_ids, axis=0, mode="clip")
        counts.append(jnp.sum(~jnp.isfinite(leaf)).astype(jnp.float32))
    return sum(counts, jnp.zeros((), jnp.float32))


@struct.dataclass
class CohortPlan:
    """Which clients train in a round and which example rows they read (``[C]`` leading axis).

    Attributes:
      cohort_ids: ``[C]`` int32 client positions (padding clients: 0).
      indices: ``[C, S, B]`` int32 rows of the flat example arrays.
      mask: ``[C, S, B]`` bool, False for padding.
      sizes: ``[C]`` int32 training examples per client (0 for padding clients).
      valid: ``[C]`` bool, False for padding clients (device shards; Poisson sampling).
      drawn: int32 clients the sampler selected (above C for a Poisson draw that overflowed).
    """

    cohort_ids: jax.Array
    indices: jax.Array
    mask: jax.Array
    sizes: jax.Array
    valid: jax.Array
    drawn: jax.Array


def _round_key_set(key: jax.Array, round_index: jax.Array) -> jax.Array:
    """``[5, 2]``: the round's keys (sampling, batching, clients, system, server).

    Under JAX's partitionable threefry (its default), key i of ``split(k, n)`` is threefry of
    the counter i, whatever n, and ``fold_in(k, 4)`` is threefry of the counter 4: so these are
    ``split(k, 4)`` and ``fold_in(k, 4)`` bit for bit, drawn by one threefry call instead of
    two (each call site is a loop XLA compiles on its own). With the partitionable mode off,
    they are computed as before.
    """
    round_key = jax.random.fold_in(key, round_index)
    if jax.config.jax_threefry_partitionable:
        return jax.random.split(round_key, 5)
    return jnp.concatenate([jax.random.split(round_key, 4),
                            jax.random.fold_in(round_key, 4)[None]])


def _round_keys(key: jax.Array, round_index: jax.Array) -> list[jax.Array]:
    """The round's keys: sampling, batching, clients, system."""
    return list(_round_key_set(key, round_index)[:4])


def _server_key(key: jax.Array, round_index: jax.Array) -> jax.Array:
    """The round's fifth key, for server-side randomness (aggregator noise).

    ``fold_in(fold_in(key, round), 4)``, which leaves the other four (and every result that does
    not use server randomness) what they were before this key existed.
    """
    return _round_key_set(key, round_index)[4]


PLACEMENTS = DATA_PLACEMENTS
SWEEP_AXIS = "sweep"
"""The vmap axis name `RoundStep.sweep_fn` expects (configurations of a sweep)."""


@dataclasses.dataclass(frozen=True)
class RoundStep:
    """A compiled round. Call it as ``state, metrics = round_step(state)``; built with
    ``rounds_per_call=k``, ``state, stacked = round_step.run_rounds(state, n)`` runs n <= k.

    Attributes:
      fn: the pure, unjitted round ``(state, data, offsets) -> (state, metrics)`` (vmap it over
        a sweep axis of the state, or wrap it in your own jit); with host data
        ``(state, batch, plan) -> (state, metrics)``.
      jitted: ``fn`` jitted (state donated).
      data: the device-resident flat example arrays (None when they stay on the host).
      offsets: ``[num_clients + 1]`` int32 on the device.
      cohort_size: C (before padding for devices).
      feeder: the host data path (None when the data is on the device).
      target: where the step's inputs live (a device, or a replicated sharding over the mesh).
      sweep_fn: ``fn`` to ``vmap`` over a sweep axis of states named `SWEEP_AXIS` (device data
        only): the same rounds, with the clients' loops bounded by one trip count for all
        configurations (a vmapped while loop with a batched bound would select every carried
        value at every step).
      shared_fn: ``(states, data, offsets) -> (states, metrics)`` over states stacked on a
        leading axis that share one root key and round (the configurations of one seed): the
        round's cohort, batches and client keys are drawn once and only the algorithm states
        are vmapped (axis name `SWEEP_AXIS`), so every configuration's clients read one batch
        and run their own step counts (device data only).
      rounds_per_call: k, the most rounds `run_rounds` runs in one call.
      multi_round: ``(state, data, offsets, num_rounds) -> (state, metrics [k, ...])`` jitted
        (state donated; ``num_rounds`` a traced int32, so every count up to k is one program);
        None when k is 1.
      backend: the placement the step was built for (devices, mesh, processes, data).
      num_clients: clients in the training data (the leading size of per-client state).
      compiler_options: the XLA options ``jitted`` and ``multi_round`` were compiled with
        (None: XLA's defaults); a sweep compiles its step with them too.
    """

    fn: Callable[..., tuple[SimulationState, dict[str, jax.Array]]]
    jitted: Callable[..., tuple[SimulationState, dict[str, jax.Array]]]
    data: Mapping[str, jax.Array] | None
    offsets: jax.Array
    cohort_size: int
    feeder: HostFeeder | None = None
    target: Any = None
    sweep_fn: Callable[..., tuple[SimulationState, dict[str, jax.Array]]] | None = None
    shared_fn: Callable[..., tuple[SimulationState, dict[str, jax.Array]]] | None = None
    rounds_per_call: int = 1
    multi_round: Callable[..., tuple[SimulationState, dict[str, jax.Array]]] | None = None
    backend: Backend = dataclasses.field(default_factory=Backend)
    num_clients: int = 0
    compiler_options: Mapping[str, Any] | None = None

    def place(self, state: SimulationState) -> SimulationState:
        """``state`` committed to where the step runs (replicated over every process's devices).

        A fresh state (`init_simulation_state`) is not committed to a device while the step's
        outputs are, so without this the second round compiles the step a second time.
        """
        return self.backend.put_state(state, self.num_clients)

    def init_state(self, algorithm_init: Callable[[PyTree], PyTree], params: PyTree,
                   key: jax.Array) -> SimulationState:
        """``init_simulation_state(algorithm_init(params), key)`` created where the step runs
        (per-client stores created split when the backend shards client state)."""
        return self.backend.init_state(
            lambda p, k: init_simulation_state(algorithm_init(p), k), (params, key),
            self.num_clients)

    def __call__(self, state: SimulationState) -> tuple[SimulationState, dict[str, jax.Array]]:
        if self.feeder is None:
            return self.jitted(state, self.data, self.offsets)
        batch, plan = self.feeder.next(state)
        return self.jitted(state, batch, plan)

    def run_rounds(
        self, state: SimulationState, num_rounds: int
    ) -> tuple[SimulationState, dict[str, jax.Array]]:
        """Runs ``num_rounds`` (1 to k = ``rounds_per_call``) rounds in one compiled call.

        Returns the state after them and each metric stacked ``[k, ...]``: row i is round i of
        the call, the same values one ``round_step(state)`` per round gives; rows from
        ``num_rounds`` on are zeros (one program serves every count, so the shape is k's).
        """
        if self.multi_round is None:
            raise ValueError("run_rounds needs build_round_step(..., rounds_per_call=k) with "
                             "k > 1; call round_step(state) for one round")
        if not 1 <= num_rounds <= self.rounds_per_call:
            raise ValueError(f"num_rounds={num_rounds}: expected 1 to rounds_per_call="
                             f"{self.rounds_per_call}")
        return self.multi_round(state, self.data, self.offsets, np.int32(num_rounds))

    def reset(self) -> None:
        """Forget prepared rounds (host data): call it before running a different state."""
        if self.feeder is not None:
            self.feeder.reset()


def build_round_step(
    algorithm: FederatedAlgorithm,
    train: FederatedData,
    schedule: ClientSchedule,
    sampler: Sampler,
    cohort_size: int,
    *,
    backend: Backend | None = None,
    donate: bool = True,
    system: Callable[[jax.Array, ClientInput], ClientInput] | None = None,
    rounds_per_call: int = 1,
    client_execution: str = "auto",
    client_batch_size: int | None = None,
    mesh: Mesh | None = None,
    data_placement: str = "device",
    prefetch: int | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> RoundStep:
    """Builds the jitted round step.

    Args:
      algorithm: an ``(init, apply)`` pair.
      train: the clients' training data (put on the device(s) once, unless kept on the host).
      schedule: static local-training shape (S, B, epochs).
      sampler: ``key -> [cohort_size]`` client positions.
      cohort_size: C, clients per round.
      backend: the placement (`Backend`: mesh, client execution, data placement, prefetch).
        None: ``Backend(mesh, client_execution, client_batch_size, data_placement, prefetch)``
        from the keyword arguments below, a shorthand for one process.
      donate: donate the state's buffers to the step.
      system: ``(key, clients) -> clients``, a system-heterogeneity model applied to the cohort
        before the algorithm sees it (dropout, stragglers, per-client durations; see
        `fedjax_sim.simulation.system`). None: every client finishes every step, 1 s per step.
      rounds_per_call: k > 1 also compiles `RoundStep.run_rounds`: up to k rounds in one call,
        a ``lax.fori_loop`` over the round carrying the (donated) state and writing each round's
        metrics into a ``[k, ...]`` buffer. The count is a traced argument, so a call of fewer
        rounds (to end on a log or evaluation round) reuses the one program instead of compiling
        a scan per length. Device data only: host data is gathered on the host round by round.
      client_execution, client_batch_size, mesh, data_placement, prefetch: the `Backend`'s
        fields when ``backend`` is None: ``data_placement`` ``"device"`` (the flat arrays live
        on the device; the step gathers the cohort's rows), ``"host"`` (they stay in host
        memory, e.g. a memory-mapped cache: a background thread plans each round, gathers its
        rows and transfers them while the previous round computes; the same result bit for
        bit), ``"sharded"`` (split by clients over the mesh's devices; the sampler must be
        `blocked_uniform_sampler` over `client_blocks`) or ``"auto"``; ``prefetch`` the rounds
        the host path prepares ahead (None: 2; on CPU it hid 75% of the gather's time in
        `benchmarks/host_prefetch.py`).
      compiler_options: XLA compiler options for the step's programs on CPU (e.g. the model's
        `Model.compiler_options`); ignored on other backends.
    """
    if backend is None:
        backend = Backend(mesh, client_execution, client_batch_size, data_placement, prefetch)
    elif (mesh, client_execution, client_batch_size, data_placement, prefetch) != (
            None, "auto", None, "device", None):
        raise ValueError("give the placement either as backend= or as the keyword arguments "
                         "mesh, client_execution, client_batch_size, data_placement, prefetch; "
                         "not both")
    data_placement = backend.data_placement
    num_shards = backend.num_shards
    poisson = isinstance(jax.eval_shape(sampler, jax.random.PRNGKey(0)), tuple)
    sequential = backend.sequential
    padded_size = -(-cohort_size // num_shards) * num_shards
    on_host = backend.keeps_on_host(train.arrays)
    if rounds_per_call < 1:
        raise ValueError(f"rounds_per_call={rounds_per_call}: expected an integer >= 1")
    if rounds_per_call > 1 and on_host:
        raise ValueError(
            f"rounds_per_call={rounds_per_call} needs the training data on the device, but "
            f"data_placement={data_placement!r} keeps it on the host (each round's rows are "
            "gathered there); use data_placement='device' if the arrays fit in device memory, "
            "or rounds_per_call=1")
    map_clients = backend.client_map()
    target = backend.target
    offsets = backend.put(train.offsets.astype(np.int32))
    shard_rows = None
    if data_placement == "sharded":
        data, shard_rows = _shard_by_clients(backend, train, sampler, cohort_size)
    else:
        data = None if on_host else backend.put(dict(train.arrays))

    def plan_fn(key: jax.Array, round_index: jax.Array, offsets: jax.Array) -> CohortPlan:
        """Which clients train this round and which example rows each step reads."""
        key_sample, key_batch, _, _ = _round_keys(key, round_index)
        sampled = sampler(key_sample)
        valid = jnp.arange(padded_size) < cohort_size
        if isinstance(sampled, tuple):  # (ids, valid, drawn): a variable-size (Poisson) cohort
            cohort_ids, sampled_valid, drawn = sampled
            valid = valid & jnp.pad(sampled_valid, (0, padded_size - cohort_size))
        else:
            cohort_ids, drawn = sampled, jnp.int32(cohort_size)
        cohort_ids = jnp.pad(cohort_ids, (0, padded_size - cohort_size))
        indices, mask, sizes = cohort_indices(key_batch, cohort_ids, offsets, schedule)
        if shard_rows is not None:  # rows of the data split by clients: block d starts at d R
            boundaries, row_starts, rows_per_shard = shard_rows
            block = jnp.searchsorted(jnp.asarray(boundaries[1:-1]), cohort_ids, side="right")
            shift = block * rows_per_shard - jnp.asarray(row_starts)[block]
            indices = indices + shift[:, None, None].astype(indices.dtype)
        mask = mask & valid[:, None, None]
        sizes = jnp.where(valid, sizes, 0)
        return CohortPlan(cohort_ids, indices, mask, sizes, valid, jnp.asarray(drawn, jnp.int32))

    def train_fn(state: SimulationState, data, plan: CohortPlan, indices: jax.Array,
                 trip_count_axis: str | None = None):
        _, _, key_clients, key_system = _round_keys(state.key, state.round)
        num_steps = schedule.steps_for(plan.sizes)
        clients = ClientInput(
            client_id=plan.cohort_ids,
            indices=indices,
            mask=plan.mask,
            num_steps=num_steps,
            num_examples=plan.sizes,
            valid=plan.valid,
            key=jax.random.split(key_clients, padded_size),
            duration=num_steps.astype(jnp.float32),
            own_trip_count=sequential,
            trip_count_axis=trip_count_axis,
        )
        if system is not None:  # dropout, stragglers, durations; metrics of the simulated clock

            clients, unchanged = system(key_system, clients), clients
            system_stats = system_metrics(unchanged, clients)
        cohort = Cohort(clients, data, state.round, _server_key(state.key, state.round),
                        size=cohort_size)
        algorithm_state, metrics = algorithm.apply(state.algorithm, cohort, map_clients)
        # Checked on the host at log time (never inside the round): NaN/inf anywhere in the state.
        metrics = {**(system_stats if system is not None else {}), **metrics,
                   "state/nonfinite": count_nonfinite(algorithm_state, train.num_clients,
                                                      clients.client_id)}
        if poisson:
            drawn = plan.drawn.astype(jnp.float32)
            metrics["cohort/drawn"] = drawn
            metrics["cohort/overflow"] = jnp.maximum(drawn - cohort_size, 0.0)
        return state.replace(algorithm=algorithm_state, round=state.round + 1), metrics

    def round_fn(state: SimulationState, data, offsets):
        plan = plan_fn(state.key, state.round, offsets)
        return train_fn(state, data, plan, plan.indices)

    def sweep_round_fn(state: SimulationState, data, offsets):
        # Under vmap(axis_name=SWEEP_AXIS): the clients' local loops run the largest step count
        # over the configurations, one unbatched trip count (see `ClientInput.trip_count`).
        plan = plan_fn(state.key, state.round, offsets)
        return train_fn(state, data, plan, plan.indices, trip_count_axis=SWEEP_AXIS)

    def shared_round_fn(states: SimulationState, data, offsets):
        # Configurations of one seed (stacked on a leading axis): one root key, so one cohort,
        # one set of batches and client keys a round. The plan is drawn once, unbatched, and
        # only the algorithm states are vmapped: the clients read one batch for all of them and
        # every configuration's client runs that client's own step count (no select).
        key, round_index = states.key[0], jnp.max(states.round)
        plan = plan_fn(key, round_index, offsets)

        def one(algorithm_state):
            shared = SimulationState(algorithm_state, round_index, key)
            new, metrics = train_fn(shared, data, plan, plan.indices)
            return new.algorithm, metrics

        algorithm, metrics = jax.vmap(one, axis_name=SWEEP_AXIS)(states.algorithm)
        return states.replace(algorithm=algorithm, round=states.round + 1), metrics

    def host_round_fn(state: SimulationState, batch, plan: CohortPlan):
        # The cohort's rows were gathered on the host in [C, S, B] order: row i of the batch is
        # slot i of the plan, so the clients read their batches by position.
        local = jnp.arange(plan.indices.size, dtype=jnp.int32).reshape(plan.indices.shape)
        return train_fn(state, batch, plan, local)

    donate_argnums = (0,) if donate else ()
    options = cpu_compiler_options(compiler_options)
    if not on_host:
        jitted = jax.jit(round_fn, donate_argnums=donate_argnums, compiler_options=options)
        multi_round = None
        if rounds_per_call > 1:
            multi_round = jax.jit(_multi_round(round_fn, rounds_per_call),
                                  donate_argnums=donate_argnums, compiler_options=options)
        return RoundStep(round_fn, jitted, data, offsets, cohort_size, target=target,
                         sweep_fn=sweep_round_fn, shared_fn=shared_round_fn,
                         rounds_per_call=rounds_per_call,
                         multi_round=multi_round, backend=backend,
                         num_clients=train.num_clients, compiler_options=options)
    prefetch = backend.prefetch
    if prefetch is None:
        prefetch = 2  # CPU too: benchmarks/host_prefetch.py (2026-12-08), 93 vs 118 ms a round
    feeder = HostFeeder(plan_fn, train.arrays, train.offsets, target, prefetch)
    jitted = jax.jit(host_round_fn, donate_argnums=donate_argnums, compiler_options=options)
    return RoundStep(host_round_fn, jitted, None, offsets, cohort_size, feeder, target,
                     backend=backend, num_clients=train.num_clients, compiler_options=options)


def _shard_by_clients(backend: Backend, train: FederatedData, sampler: Sampler,
                      cohort_size: int) -> tuple[ShardedData, tuple[np.ndarray, np.ndarray, int]]:
    """The training arrays split by `client_blocks` over the mesh's devices (each process
    materialises only its own devices' blocks), and ``(boundaries, row_starts, R)``: the client
    blocks, their first rows in the flat arrays, and the rows per device (the largest block)."""
    boundaries = client_blocks(train.num_clients, backend.num_shards)
    if not np.array_equal(getattr(sampler, "boundaries", None), boundaries):
        raise ValueError(
            "data_placement='sharded' needs a sampler that draws every device's clients from "
            f"the block it holds: blocked_uniform_sampler(client_blocks({train.num_clients}, "
            f"{backend.num_shards}), cohort_size)")
    if cohort_size % backend.num_shards:
        raise ValueError(f"data_placement='sharded': the cohort size {cohort_size} must be a "
                         f"multiple of the {backend.num_shards} devices")
    offsets = np.asarray(train.offsets, np.int64)
    row_starts = offsets[boundaries]
    rows_per_shard = max(int(np.diff(row_starts).max()), 1)

    def block(d: int) -> dict[str, np.ndarray]:
        start, end = int(row_starts[d]), int(row_starts[d + 1])
        out = {}
        for name, array in train.arrays.items():
            rows = np.asarray(array[start:end])  # a memory-mapped cache reads only these pages
            pad = [(0, rows_per_shard - (end - start))] + [(0, 0)] * (rows.ndim - 1)
            out[name] = np.pad(rows, pad)
        return out

    arrays = backend.put_sharded(block, rows_per_shard, train.arrays)
    return (ShardedData(arrays, rows_per_shard, CLIENT_AXIS),
            (boundaries, row_starts[:-1].astype(np.int32), rows_per_shard))


def _multi_round(round_fn: Callable, rounds_per_call: int) -> Callable:
    """``(state, data, offsets, num_rounds) -> (state, metrics [k, ...])``: num_rounds rounds.

    A ``fori_loop`` with a traced trip count (a while loop) rather than a ``lax.scan`` of fixed
    length: a call cut short to end on a log, evaluation or checkpoint round runs the same
    compiled program, where a scan would compile once per length.
    """

    def multi_round(state: SimulationState, data, offsets, num_rounds: jax.Array):
        shapes = jax.eval_shape(round_fn, state, data, offsets)[1]
        stacked = jax.tree.map(
            lambda m: jnp.zeros((rounds_per_call, *m.shape), m.dtype), shapes)

        def body(i, carry):
            state, stacked = carry
            state, metrics = round_fn(state, data, offsets)
            stacked = jax.tree.map(lambda buffer, m: buffer.at[i].set(m), stacked, metrics)
            return state, stacked

        return jax.lax.fori_loop(0, num_rounds, body, (state, stacked))

    return multi_round
