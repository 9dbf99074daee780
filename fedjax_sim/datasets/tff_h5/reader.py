"""Reading TFF's h5 layout, ``examples/<client_id>/<feature>``, client by client.

Each client's datasets are read with h5py's low-level API (one read per client and feature,
which bounds the speed), and clients are read in chunks of about `CHUNK_EXAMPLES` examples so
that a converter can preprocess a chunk with whole-array numpy and write it out before the next.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from fedjax_sim.data.errors import DataError

EXAMPLES_GROUP = "examples"
CHUNK_EXAMPLES = 100_000
"""Examples preprocessed together: bounds conversion temporaries (~100 MB for StackOverflow)."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """What one per-client feature must look like: ``[n, *shape]`` of a dtype kind."""

    name: str
    shape: tuple[int, ...]
    kinds: str  # numpy dtype kinds accepted: "f" float, "iu" integers, "OS" byte strings

    def describe(self) -> str:
        what = {"f": "floats", "iu": "integers", "OS": "byte strings", "u": "uint8"}.get(
            self.kinds, self.kinds)
        return f"[n, {', '.join(map(str, self.shape))}] {what}" if self.shape else \
            f"[n] {what}"


def open_h5(path: Path):
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(
            f"{path}: not a readable HDF5 file ({error}); expected TFF's h5 layout "
            "examples/<client_id>/<feature>"
        ) from error
    if EXAMPLES_GROUP not in file or not isinstance(file[EXAMPLES_GROUP], h5py.Group):
        top = sorted(file.keys())[:5]
        file.close()
        raise DataError(
            f"{path}: no group '{EXAMPLES_GROUP}' (top level holds {top}); expected TFF's h5 "
            "layout examples/<client_id>/<feature>"
        )
    return file


def _describe_missing(path: Path, group, client: str, feature: Feature) -> DataError:
    entry = group.get(client)
    has = sorted(entry.keys()) if isinstance(entry, h5py.Group) else "no such group"
    return DataError(
        f"{path}: client {client!r} has no feature {feature.name!r} ({has}); expected "
        f"examples/{client}/{feature.name}: {feature.describe()}"
    )


def _dataset(path: Path, group, client: str, feature: Feature):
    """The low-level h5 dataset ``examples/<client>/<feature>``, its shape and dtype checked.

    h5py's low-level ``h5d.open`` costs a third of ``group[...]`` (no high-level objects),
    which matters at 342,477 clients.
    """
    try:
        node = h5py.h5d.open(group.id, f"{client}/{feature.name}".encode())
    except Exception:  # noqa: BLE001 - h5py raises KeyError/ValueError/TypeError by case
        raise _describe_missing(path, group, client, feature) from None
    shape, dtype = node.shape, node.dtype
    if len(shape) != 1 + len(feature.shape) or tuple(shape[1:]) != feature.shape \
            or dtype.kind not in feature.kinds:
        raise DataError(
            f"{path}: client {client!r}, feature {feature.name!r} has shape {shape} and "
            f"dtype {dtype}; expected {feature.describe()}"
        )
    return node


def _client_sizes(path: Path, group, clients: Sequence[str], feature: Feature) -> np.ndarray:
    return np.fromiter((_dataset(path, group, c, feature).shape[0] for c in clients),
                       dtype=np.int64, count=len(clients))


def _as_bytes(values: np.ndarray) -> list[bytes]:
    values = values.tolist()
    if values and isinstance(values[0], str):
        values = [v.encode("utf-8") for v in values]
    return values


def read_feature(path: Path, group, client: str, feature: Feature, size: int):
    node = _dataset(path, group, client, feature)
    if node.shape[0] != size:
        raise DataError(
            f"{path}: client {client!r}, feature {feature.name!r} has {node.shape[0]} examples, "
            f"its other features {size}; expected one length per client"
        )
    values = np.empty(node.shape, dtype=node.dtype)
    if values.size:
        node.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
    return _as_bytes(values) if feature.kinds == "OS" else values


def _chunks(sizes: np.ndarray, max_rows: int) -> Iterator[tuple[int, int]]:
    """``(first, last + 1)`` client ranges of about ``max_rows`` examples each."""
    start, rows = 0, 0
    for index, size in enumerate(sizes.tolist()):
        rows += size
        if rows >= max_rows:
            yield start, index + 1
            start, rows = index + 1, 0
    if start < len(sizes):
        yield start, len(sizes)


@dataclasses.dataclass
class H5Clients:
    """One h5 file's clients in output order: ids, sizes, and where each is in the file."""

    path: Path
    clients: list[str]  # h5 group names, in output order (absent ones included, size 0)
    present: np.ndarray  # bool: the client has a group in this file
    sizes: np.ndarray

    def read_chunks(self, features: Sequence[Feature]) -> Iterator[tuple[int, int, dict]]:
        """``(row_start, row_stop, {feature: concatenated values})`` chunk by chunk."""
        file = open_h5(self.path)
        try:
            group = file[EXAMPLES_GROUP]
            row = 0
            for first, last in _chunks(self.sizes, CHUNK_EXAMPLES):
                parts: dict[str, list] = {f.name: [] for f in features}
                for index in range(first, last):
                    if not self.present[index]:
                        continue
                    for feature in features:
                        parts[feature.name].append(
                            read_feature(self.path, group, self.clients[index], feature,
                                  int(self.sizes[index])))
                rows = int(self.sizes[first:last].sum())
                values = {}
                for feature in features:
                    if feature.kinds == "OS":
                        values[feature.name] = list(itertools.chain.from_iterable(
                            parts[feature.name]))
                    elif parts[feature.name]:
                        values[feature.name] = np.concatenate(parts[feature.name])
                    else:
                        values[feature.name] = np.zeros((0, *feature.shape))
                yield row, row + rows, values
                row += rows
        finally:
            file.close()


def train_clients(path: Path, size_feature: Feature) -> H5Clients:
    file = open_h5(path)
    try:
        group = file[EXAMPLES_GROUP]
        clients = sorted(group.keys())  # TFF's HDF5ClientData sorts its client ids too
        if not clients:
            raise DataError(f"{path}: group '{EXAMPLES_GROUP}' has no clients; expected at "
                            "least one examples/<client_id> group")
        sizes = _client_sizes(path, group, clients, size_feature)
    finally:
        file.close()
    return H5Clients(path, clients, np.ones(len(clients), bool), sizes)


def test_clients(path: Path, train_clients: Sequence[str], size_feature: Feature
                ) -> tuple[H5Clients, int]:
    """The test file's clients aligned to the training clients; and how many it has beyond."""
    file = open_h5(path)
    try:
        group = file[EXAMPLES_GROUP]
        names = set(group.keys())
        present = np.fromiter((c in names for c in train_clients), bool, len(train_clients))
        sizes = np.zeros(len(train_clients), np.int64)
        listed = [c for c, p in zip(train_clients, present, strict=True) if p]
        sizes[present] = _client_sizes(path, group, listed, size_feature)
        extra = len(names) - len(listed)
    finally:
        file.close()
    return H5Clients(path, list(train_clients), present, sizes), extra


def offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
