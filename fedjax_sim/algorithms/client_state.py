"""Per-client state that persists across rounds (SCAFFOLD's control variates, Ditto's personal
models, FedDyn's gradients, error feedback's residuals, ...): a pytree whose leaves have a
leading ``[num_clients]`` axis.

Inside the jitted round step the cohort's rows are gathered by client id, the clients compute
their new rows, and the rows are scattered back; padding clients (``valid == False``) and clients
that did not train write nothing. The store is part of the algorithm state, so it is donated,
checkpointed and sharded like everything else.

Memory is ``num_clients x size of one row``: on the device that suits up to a few thousand
clients of a small model (3,400 EMNIST writers x 1.2M float32 = 16 GB). Two ways past that:

* ``execution.client_state: sharded`` splits every store over the devices (and processes) of
  the mesh (`fedjax_sim.simulation.backend.Backend`);
* ``execution.client_state: host`` keeps every store in host memory, memory-mapped to a file
  (`HostClientStore`): the step reads the cohort's rows from it and writes them back through
  `jax.experimental.io_callback`, so the device holds only the cohort's rows. Rows never
  written read as the initial row, and the file is sparse, so a store of 342,477
  StackOverflow clients costs disk and memory only for the clients that have trained.

If a cohort holds the same client twice (sampling with replacement), which of its rows is kept
is unspecified (XLA's scatter order); sample without replacement for stateful algorithms.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

PyTree = Any

_HOST_STORES: contextvars.ContextVar[_HostStoreFactory | None] = contextvars.ContextVar(
    "fedjax_sim_host_client_state", default=None)


def init_client_state(row: PyTree, num_clients: int) -> PyTree:
    """A store of ``num_clients`` copies of ``row`` (each leaf gets a leading client axis).

    Inside `host_client_state` every leaf is a `HostClientStore` instead (on the host, memory
    mapped); `gather_client_state` and `scatter_client_state` take either.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    factory = _HOST_STORES.get()
    if factory is not None:
        return jax.tree.map(lambda x: factory.create(x, num_clients), row)
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_clients, *jnp.shape(x))).copy(), row
    )


def gather_client_state(store: PyTree, client_ids: jax.Array) -> PyTree:
    """The rows of ``client_ids`` (``[C]`` int32; out-of-range ids are clipped): leaves
    ``[C, ...]``."""
    leaves, treedef = jax.tree.flatten(store, is_leaf=is_host_store)
    hosted = [leaf for leaf in leaves if is_host_store(leaf)]
    rows = iter(_host_read(hosted, client_ids) if hosted else ())
    return treedef.unflatten([
        next(rows) if is_host_store(leaf) else jnp.take(leaf, client_ids, axis=0, mode="clip")
        for leaf in leaves])


def scatter_client_state(
    store: PyTree, client_ids: jax.Array, rows: PyTree, write: jax.Array
) -> PyTree:
    """``store`` with ``rows`` written at ``client_ids`` where ``write`` (``[C]`` bool) is True.

    Rows whose ``write`` is False are dropped (their index is sent out of bounds), so padding
    clients never overwrite client 0.
    """
    leaves, treedef = jax.tree.flatten(store, is_leaf=is_host_store)
    row_leaves = treedef.flatten_up_to(rows)
    pairs = list(zip(leaves, row_leaves, strict=True))
    hosted = [(leaf, row) for leaf, row in pairs if is_host_store(leaf)]
    versions = iter(_host_write(hosted, client_ids, write) if hosted else ())
    out = []
    for leaf, row in pairs:
        if is_host_store(leaf):
            # the non-finite values written this round, for the step's divergence check
            bad = ~jnp.isfinite(row) & write.reshape((-1,) + (1,) * (row.ndim - 1))
            out.append(HostClientStore(leaf.rows, next(versions),
                                       jnp.sum(bad).astype(jnp.float32)))
        else:
            target = jnp.where(write, client_ids, leaf.shape[0])  # out of bounds: dropped
            out.append(leaf.at[target].set(row.astype(leaf.dtype), mode="drop"))
    return treedef.unflatten(out)


# --- Stores on the host ------------------------------------------------------------------------

class HostRows:
    """The rows of one store leaf on the host: a memory-mapped ``[num_clients, ...]`` file, the
    initial row, and which clients have been written (the others read as the initial row)."""

    def __init__(self, path: Path, initial: np.ndarray, num_clients: int, keep: Any = None,
                 piece_bytes: int | None = None):
        self.path = path
        self.keep = keep  # e.g. the temporary file that deletes ``path`` when collected
        self.piece_bytes = piece_bytes  # the step's callbacks take larger operands in pieces
        self.initial = np.asarray(initial)
        self.shape = (num_clients, *self.initial.shape)
        self.dtype = self.initial.dtype
        # A sparse file: pages of clients never written take neither disk nor memory.
        self.array = np.memmap(path, self.dtype, mode="w+", shape=self.shape)
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read by id: no read-ahead around them
            self.array._mmap.madvise(mmap.MADV_RANDOM)
        self.written = np.zeros(num_clients, bool)

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.clip(np.asarray(ids, np.int64), 0, self.shape[0] - 1)
        out = np.empty((len(ids), *self.shape[1:]), self.dtype)
        out[:] = self.initial
        written = self.written[ids]
        out[written] = self.array[ids[written]]  # the file is read only where it was written
        return out

    def write(self, ids: np.ndarray, rows: np.ndarray, write: np.ndarray) -> None:
        write = np.asarray(write, bool)
        ids = np.asarray(ids, np.int64)[write]
        self.array[ids] = np.asarray(rows)[write].astype(self.dtype)
        self.written[ids] = True

    def save(self, prefix: Path, chunk: int = 4096) -> None:
        """The written rows to ``prefix.ids.npy`` and ``prefix.rows.npy`` (streamed in chunks,
        so a large store is never copied whole into memory)."""
        ids = np.flatnonzero(self.written)
        np.save(f"{prefix}.ids.npy", ids)
        out = np.lib.format.open_memmap(f"{prefix}.rows.npy", "w+", self.dtype,
                                        (len(ids), *self.shape[1:]))
        for start in range(0, len(ids), chunk):
            out[start:start + chunk] = self.array[ids[start:start + chunk]]
        out.flush()
        del out

    def load(self, prefix: Path, chunk: int = 4096) -> None:
        """The rows `save` wrote; every other client reads as the initial row again."""
        ids = np.load(f"{prefix}.ids.npy")
        rows = np.load(f"{prefix}.rows.npy", mmap_mode="r")
        if rows.shape[1:] != self.shape[1:] or (len(ids) and ids.max() >= self.shape[0]):
            raise ValueError(f"{prefix}.rows.npy: rows {rows.shape} do not fit a store of "
                             f"{self.shape}")
        self.written[:] = False
        for start in range(0, len(ids), chunk):
            self.array[ids[start:start + chunk]] = rows[start:start + chunk]
        self.written[ids] = True

    def to_numpy(self) -> np.ndarray:
        """The whole store (``[num_clients, ...]``, in memory)."""
        out = np.broadcast_to(self.initial, self.shape).copy()
        out[self.written] = self.array[self.written]
        return out


@jax.tree_util.register_pytree_with_keys_class
class HostClientStore:
    """One leaf of a per-client store kept on the host (see the module docstring).

    A pytree of two scalars: ``version``, a counter the step's host write returns and the next
    host read takes, so reads and writes happen in program order (also across compiled calls
    and inside ``rounds_per_call`` loops), and ``nonfinite``, the NaN/inf values the last
    write stored (the round's divergence check counts them, as it counts a device store's
    written rows); the rows are static (`HostRows`).
    """

    def __init__(self, rows: HostRows, version: Any, nonfinite: Any):
        self.rows = rows
        self.version = version
        self.nonfinite = nonfinite

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("version"), self.version),
                (jax.tree_util.GetAttrKey("nonfinite"), self.nonfinite)), self.rows

    @classmethod
    def tree_unflatten(cls, rows, children):
        return cls(rows, *children)

    def __repr__(self) -> str:
        return f"HostClientStore(shape={self.shape}, dtype={self.dtype}, file={self.rows.path})"


def is_host_store(x: Any) -> bool:
    return isinstance(x, HostClientStore)


def _host_read(stores: list[HostClientStore], client_ids: jax.Array) -> list[jax.Array]:
    def read(versions, ids):
        del versions  # only orders this read after the last write
        return tuple(store.rows.read(ids) for store in stores)

    shapes = tuple(jax.ShapeDtypeStruct((client_ids.shape[0], *s.shape[1:]), s.dtype)
                   for s in stores)
    return list(_host_call(read, shapes, [s.version for s in stores], client_ids,
                           piece_bytes=_piece_bytes(stores)))


def _host_write(items: list[tuple[HostClientStore, jax.Array]], client_ids: jax.Array,
                write: jax.Array) -> list[jax.Array]:
    def store_rows(versions, ids, rows, write):
        for (store, _), row in zip(items, rows, strict=True):
            store.rows.write(ids, row, write)
        return tuple(np.asarray(v + 1, np.int32) for v in versions)

    versions = [store.version for store, _ in items]
    return list(_host_call(store_rows, tuple(jax.ShapeDtypeStruct((), jnp.int32)
                                             for _ in items),
                           versions, client_ids,
                           [row.astype(store.dtype) for store, row in items], write,
                           piece_bytes=_piece_bytes([store for store, _ in items])))


CALLBACK_PIECE_BYTES = 96 << 10
"""The pieces `host_client_state` (``piece_bytes``) cuts the callbacks' operands into on a mesh
of several XLA:CPU devices: under XLA:CPU's 100 KiB (102,400 bytes) synchronous-copy limit (see
`_host_call`)."""


def _piece_bytes(stores: list[HostClientStore]) -> int | None:
    sizes = [store.rows.piece_bytes for store in stores if store.rows.piece_bytes is not None]
    return min(sizes) if sizes else None


def _host_call(fn, result_shapes: Any, *args: Any, piece_bytes: int | None = None) -> Any:
    """``io_callback(fn, result_shapes, *args)`` with ``fn`` called on numpy arrays; with
    ``piece_bytes``, every operand larger than that goes to the host first, in pieces of at most
    ``piece_bytes`` (a loop on the device, a small callback a piece, filling a host buffer).

    Why pieces on a mesh of several XLA:CPU devices: `jax.experimental.io_callback` places its
    operands on a CPU device before it calls its function, and XLA:CPU copies a buffer of
    100 KiB or more there (and the numpy read of it waits for that copy) as a task on its
    client's thread pool. That pool has max(cores, devices) threads, and every device of a
    program over the mesh holds one while it runs: the callback holds device 0's while it waits
    for the copy, the other devices hold theirs in the next collective, which waits for device
    0, and no thread is left for the copy (2 devices on 2 cores: a Fashion-MNIST SCAFFOLD
    round's write of the cohort's 314 KB of control variates hung until XLA's 40 s rendezvous
    timeout aborted the process; an operand of 101,600 bytes went through, 103,200 hung; with a
    third, idle, device, so a third thread, 160,000 went through). A copy under 100 KiB is made
    in the calling thread. A loop, not an operand a piece: a slice a piece compiled to a kernel
    a piece (a 2-layer MLP's store tripled the compile time of a round). One device has a
    thread to spare and takes the operands whole (a piece costs a callback).
    """
    leaves, treedef = jax.tree.flatten(args)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    shapes = [leaf.shape for leaf in leaves]
    staged: dict[int, np.ndarray] = {}  # leaf -> the host buffer its pieces fill, per call
    token = jnp.zeros((), jnp.int32)  # pieces sent so far: orders them before ``fn``
    sent = 0
    whole = []
    for index, leaf in enumerate(leaves):
        per_piece = leaf.size if piece_bytes is None else max(
            1, piece_bytes // leaf.dtype.itemsize)
        if leaf.size <= per_piece:
            whole.append(leaf)
            continue
        count = -(-leaf.size // per_piece)
        pieces = jnp.pad(leaf.reshape(-1), (0, count * per_piece - leaf.size))

        def stage(token, piece, index=index, first=sent, count=count, dtype=leaf.dtype):
            buffer = staged.setdefault(index, np.empty((count, piece.shape[0]), dtype))
            buffer[int(token) - first] = np.asarray(piece)
            return np.asarray(token + 1, np.int32)

        def body(token, piece, stage=stage):
            return io_callback(stage, jax.ShapeDtypeStruct((), jnp.int32), token, piece), None

        token, _ = jax.lax.scan(body, token, pieces.reshape(count, per_piece))
        sent += count

    def call(token, *whole_arrays):
        del token
        whole_arrays = iter(whole_arrays)
        arrays = []
        for index, shape in enumerate(shapes):
            if index in staged:
                size = int(np.prod(shape))
                arrays.append(staged.pop(index).reshape(-1)[:size].reshape(shape))
            else:
                arrays.append(np.asarray(next(whole_arrays)))
        return fn(*treedef.unflatten(arrays))

    return io_callback(call, result_shapes, token, *whole)


class _HostStoreFactory:
    def __init__(self, directory: Path | None, piece_bytes: int | None):
        self.directory = directory
        self.piece_bytes = piece_bytes
        self.count = 0

    def create(self, row: Any, num_clients: int) -> HostClientStore:
        if isinstance(row, jax.core.Tracer):
            raise ValueError("a host client store is created from concrete values: call the "
                             "algorithm's init outside jit inside host_client_state()")
        if self.directory is None:  # deleted with the store (or at exit)
            handle = tempfile.NamedTemporaryFile(prefix="fedjax_sim-client-state-",
                                                 suffix=".bin")
            path = Path(handle.name)
        else:
            handle, path = None, self.directory / f"store-{self.count}.bin"
        self.count += 1
        rows = HostRows(path, np.asarray(row), num_clients, keep=handle,
                        piece_bytes=self.piece_bytes)
        return HostClientStore(rows, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))


@contextlib.contextmanager
def host_client_state(directory: str | os.PathLike | None = None,
                      piece_bytes: int | None = None):
    """Within this context `init_client_state` makes `HostClientStore` leaves, memory-mapped to
    files ``store-<n>.bin`` in ``directory`` (created; None: temporary files, deleted with the
    stores). ``piece_bytes``: the step's callbacks take an operand larger than this in pieces
    (`CALLBACK_PIECE_BYTES` on a mesh of several XLA:CPU devices, where whole ones deadlock;
    None: whole, for one device)."""
    if piece_bytes is not None and piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1 (or None), got {piece_bytes}")
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
    token = _HOST_STORES.set(_HostStoreFactory(directory, piece_bytes))
    try:
        yield
    finally:
        _HOST_STORES.reset(token)


def _wait_for_writes(leaves) -> None:
    """Blocks until the host writes that made these `HostClientStore` leaves have run."""
    jax.block_until_ready([leaf.version for leaf in leaves if is_host_store(leaf)])


def host_stores(tree: PyTree) -> dict[str, HostRows]:
    """``{path: rows}`` of every `HostClientStore` in ``tree`` (a file-name-safe path), once
    the writes that made ``tree`` have happened (a step runs asynchronously)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_host_store)
    _wait_for_writes(leaf for _, leaf in flat)
    return {re.sub(r"[^A-Za-z0-9_.-]+", "_", jax.tree_util.keystr(path)).strip("._"): leaf.rows
            for path, leaf in flat if is_host_store(leaf)}


def client_state_arrays(store: PyTree) -> PyTree:
    """``store`` with every `HostClientStore` read whole into a numpy array (e.g. to evaluate
    every client's personal model), once the writes that made ``store`` have happened; other
    leaves unchanged."""
    _wait_for_writes(jax.tree.leaves(store, is_leaf=is_host_store))
    return jax.tree.map(lambda x: x.rows.to_numpy() if is_host_store(x) else x, store,
                        is_leaf=is_host_store)
