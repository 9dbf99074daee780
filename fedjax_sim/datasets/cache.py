"""A converted dataset on disk: flat ``.npy`` arrays opened memory-mapped, no per-client objects.

Large federated datasets (StackOverflow: 342,477 clients, ~136M examples) are converted once
from their source format into a folder of flat arrays in `FederatedData`'s CSR layout::

    <cache>/meta.json                       format version, name, info, features, source
    <cache>/train/<feature>.npy             all examples of all clients, client by client
    <cache>/train/offsets.npy               [num_clients + 1] int64
    <cache>/train/client_ids.npy            [num_clients] (unicode or integer, never object)
    <cache>/test/...                        the same for the per-client test split (if any)
    <cache>/central_test/<feature>.npy      a central test set (if any; no offsets)

`open_cache` maps every array with ``np.load(mmap_mode="r")``: opening costs a few file opens
whatever the number of clients, and a cohort's rows are read from disk (or the page cache) only
when gathered. A cache is written into a temporary folder beside its destination and renamed
into place, so an interrupted conversion never leaves a folder that looks complete.

Converters that know their sizes in advance (the TFF h5 readers) allocate their output arrays
with `CacheWriter.allocate`, i.e. directly as ``.npy`` files in the temporary folder, and fill
them chunk by chunk: peak memory stays near one chunk instead of the whole dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset

FORMAT_VERSION = 1
"""Bumped whenever the layout changes; a cache of another version is rebuilt, never misread."""

META_FILE = "meta.json"
SPLITS = ("train", "test")
CENTRAL = "central_test"

Allocator = Callable[[str, str, tuple, Any], np.ndarray]
"""``allocate(split, feature, shape, dtype) -> array`` to fill (in memory or a ``.npy`` file)."""


def allocate_in_memory(split: str, feature: str, shape: tuple, dtype: Any) -> np.ndarray:
    """The `Allocator` of an uncached load: a plain ``np.empty``."""
    del split, feature
    return np.empty(shape, dtype)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # PartitionOptions
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"info value {value!r} of type {type(value).__name__} is not JSON-able")


def _plain_ids(client_ids: np.ndarray) -> np.ndarray:
    """Client ids as a numpy dtype ``np.load`` can map: object strings become unicode."""
    ids = np.asarray(client_ids)
    if ids.dtype == object:
        ids = np.asarray([str(i) for i in ids]) if ids.size else np.zeros(0, "<U1")
    if ids.dtype.kind not in "iuUSb":
        raise DataError(
            f"client ids of dtype {ids.dtype} cannot be cached; expected integers or strings"
        )
    return ids


class CacheWriter:
    """Writes one cache folder atomically (temporary folder + rename).

    Example:
      >>> writer = CacheWriter(path)  # doctest: +SKIP
      >>> x = writer.allocate("train", "x", (n, 20), np.int32)  # a .npy memmap  # doctest: +SKIP
      >>> ...fill x...; writer.finish(dataset_whose_arrays_include_x)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, source: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.source = dict(source or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".part",
                                           dir=self.path.parent))
        self._allocated: dict[tuple[str, str], np.ndarray] = {}

    def allocate(self, split: str, feature: str, shape: tuple, dtype: Any) -> np.ndarray:
        """A writable ``.npy`` memmap ``<temp>/<split>/<feature>.npy`` of ``shape``, ``dtype``."""
        folder = self._temp / split
        folder.mkdir(exist_ok=True)
        array = np.lib.format.open_memmap(folder / f"{feature}.npy", mode="w+",
                                          dtype=np.dtype(dtype), shape=tuple(shape))
        self._allocated[split, feature] = array
        return array

    def _write_array(self, split: str, feature: str, array: Any) -> dict[str, Any]:
        allocated = self._allocated.get((split, feature))
        if allocated is not None and array is allocated:
            allocated.flush()
        else:
            folder = self._temp / split
            folder.mkdir(exist_ok=True)
            np.save(folder / f"{feature}.npy", np.asarray(array), allow_pickle=False)
        array = np.asarray(array)
        return {"dtype": array.dtype.str, "shape": list(array.shape[1:])}

    def finish(self, dataset: FederatedDataset) -> Path:
        """Writes the rest of ``dataset`` and ``meta.json``, then renames the folder into place.

        Returns:
          The cache folder.
        """
        try:
            splits: dict[str, Any] = {}
            for split in SPLITS:
                data: FederatedData | None = getattr(dataset, split)
                if data is None:
                    continue
                features = {name: self._write_array(split, name, array)
                            for name, array in data.arrays.items()}
                np.save(self._temp / split / "offsets.npy", np.asarray(data.offsets, np.int64))
                np.save(self._temp / split / "client_ids.npy", _plain_ids(data.client_ids))
                splits[split] = {"features": features, "num_clients": data.num_clients,
                                 "num_examples": data.num_examples}
            if dataset.central_test is not None:
                features = {name: self._write_array(CENTRAL, name, array)
                            for name, array in dataset.central_test.items()}
                splits[CENTRAL] = {"features": features}
            meta = {"format_version": FORMAT_VERSION, "name": dataset.name,
                    "info": dict(dataset.info), "splits": splits, "source": self.source}
            text = json.dumps(meta, indent=1, default=_json_default)
            (self._temp / META_FILE).write_text(text + "\n")
            self._allocated.clear()  # drop the memmaps before the folder moves
            _replace_folder(self._temp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Deletes the temporary folder (an interrupted conversion leaves nothing behind)."""
        self._allocated.clear()
        shutil.rmtree(self._temp, ignore_errors=True)


def _replace_folder(source: Path, destination: Path) -> None:
    """Moves ``source`` to ``destination``; an existing destination is replaced."""
    if destination.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old",
                                      dir=destination.parent))
        os.replace(destination, trash / "old")
        os.replace(source, destination)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, destination)


def write_cache(dataset: FederatedDataset, path: str | os.PathLike,
                source: Mapping[str, Any] | None = None) -> Path:
    """Writes ``dataset`` as a cache folder at ``path`` (atomically; an old one is replaced).

    Args:
      dataset: any `FederatedDataset`; its arrays may themselves be memmaps.
      path: the cache folder to create.
      source: what the cache was built from (loader, options, source files' size and mtime);
        stored in ``meta.json`` and compared by `cached_load` to decide whether to rebuild.

    Returns:
      ``path`` as a `Path`.
    """
    return CacheWriter(path, source).finish(dataset)


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The cache's ``meta.json``, or None if there is no (readable, current-version) cache."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


def _load(path: Path, split: str, name: str) -> np.ndarray:
    file = path / split / f"{name}.npy"
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(
            f"{file}: cannot open the cached array ({error}); the cache is damaged: delete "
            f"{path} and convert again (fedjax-sim data convert)"
        ) from error


def open_cache(path: str | os.PathLike) -> FederatedDataset:
    """Opens a cache folder written by `write_cache` with every array memory-mapped.

    Args:
      path: the cache folder.

    Returns:
      A `FederatedDataset` whose feature arrays, offsets and client ids are read-only
      ``np.memmap`` views of the ``.npy`` files; ``info`` as stored (``input_shape`` a tuple)
      plus ``info["cache"]``, the folder.

    Raises:
      DataError: the folder holds no cache of this format version, or a file is damaged.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise DataError(
            f"{path}: not a fedjax_sim dataset cache (no readable {META_FILE} with "
            f"format_version {FORMAT_VERSION}); expected a folder written by write_cache / "
            "fedjax-sim data convert"
        )
    splits = meta["splits"]
    parts: dict[str, Any] = {}
    for split in SPLITS:
        if split not in splits:
            parts[split] = None
            continue
        arrays = {name: _load(path, split, name) for name in splits[split]["features"]}
        parts[split] = FederatedData(arrays, _load(path, split, "offsets"),
                                     _load(path, split, "client_ids"))
    central = None
    if CENTRAL in splits:
        central = {name: _load(path, CENTRAL, name) for name in splits[CENTRAL]["features"]}
    info = dict(meta["info"])
    if "input_shape" in info:
        info["input_shape"] = tuple(info["input_shape"])
    info["cache"] = str(path)
    return FederatedDataset(name=meta["name"], train=parts["train"], test=parts["test"],
                            central_test=central, info=info)


def file_signature(*paths: str | os.PathLike) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}`` of source files: a cache built from them is stale when the
    signature differs (hashing multi-GB sources on every load would cost minutes)."""
    signature = {}
    for path in paths:
        stat = Path(path).stat()
        signature[str(Path(path).resolve())] = [stat.st_size, stat.st_mtime_ns]
    return signature


def options_key(name: str, options: Mapping[str, Any]) -> str:
    """``<name>-<12 hex digits>``: a cache folder name unique to a loader and its options."""
    text = json.dumps({"name": name, "options": dict(options)}, sort_keys=True,
                      default=_json_default)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cached_load(path: str | os.PathLike, source: Mapping[str, Any],
                build: Callable[[Allocator], FederatedDataset]) -> FederatedDataset:
    """Opens the cache at ``path`` if it was built from ``source``, else builds and writes it.

    Args:
      path: the cache folder.
      source: JSON-able description of the inputs (loader, options, `file_signature`); a cache
        whose stored source differs is rebuilt.
      build: ``build(allocate)`` returns the dataset, allocating its large arrays with
        ``allocate`` (which writes them straight into the new cache).

    Returns:
      The dataset, opened from the cache (memmaps).
    """
    path = Path(path)
    source = json.loads(json.dumps(dict(source), default=_json_default))
    meta = read_meta(path)
    if meta is not None and meta.get("source") == source:
        return open_cache(path)
    try:
        writer = CacheWriter(path, source)
    except OSError as error:
        raise DataError(
            f"cannot write the dataset cache {path} ({error}); point cache_dir (config key "
            "`dataset.cache_dir`) at a writable folder, or load without a cache (cache=False)"
        ) from error
    try:
        dataset = build(writer.allocate)
    except BaseException:
        writer.abort()
        raise
    writer.finish(dataset)
    del dataset
    return open_cache(path)
