"""Datasets by name: the loaders, their flat options, and conversion into a cache.

A loader is a function of keyword options. Loaders of centralized datasets take one
``partition: PartitionOptions``; configs and `load_dataset` write its fields flat beside the
loader's own options (``dataset: {name: mnist, partition: shards, num_clients: 100}``), and
`DatasetLoader` is the one place that gathers them into the object. Loader modules are imported
by name on first use, so that loading Shakespeare never imports h5py or tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.datasets.cache import options_key, write_cache
from fedjax_sim.datasets.download import data_dir
from fedjax_sim.datasets.partition_options import PartitionOptions

# name -> (module, loader function); modules are imported on first use.
LOADERS = {
    "shakespeare": ("fedjax_sim.datasets.shakespeare", "load_shakespeare"),
    "fashion_mnist": ("fedjax_sim.datasets.fashion_mnist", "load_fashion_mnist"),
    "arrays": ("fedjax_sim.datasets.arrays", "load_arrays"),
    # TFF's h5 files (examples/<client_id>/<feature>)
    "tff_emnist": ("fedjax_sim.datasets.tff_h5.images", "load_tff_emnist"),
    "tff_shakespeare": ("fedjax_sim.datasets.tff_h5.shakespeare", "load_tff_shakespeare"),
    "tff_stackoverflow": ("fedjax_sim.datasets.tff_h5.stackoverflow", "load_tff_stackoverflow"),
    "tff_cifar100": ("fedjax_sim.datasets.tff_h5.images", "load_tff_cifar100"),
    # LEAF's JSON files
    "leaf_femnist": ("fedjax_sim.datasets.leaf", "load_leaf_femnist"),
    "leaf_shakespeare": ("fedjax_sim.datasets.leaf", "load_leaf_shakespeare"),
    "leaf_sent140": ("fedjax_sim.datasets.leaf", "load_leaf_sent140"),
    "leaf_celeba": ("fedjax_sim.datasets.leaf", "load_leaf_celeba"),
    # centralized datasets split into clients by a partitioner
    "cifar10": ("fedjax_sim.datasets.cifar", "load_cifar10"),
    "cifar100": ("fedjax_sim.datasets.cifar", "load_cifar100"),
    "mnist": ("fedjax_sim.datasets.mnist", "load_mnist"),
    "emnist": ("fedjax_sim.datasets.mnist", "load_emnist"),
    "tfds": ("fedjax_sim.datasets.tfds", "load_tfds"),
}

_PARTITION_FIELDS = tuple(field.name for field in dataclasses.fields(PartitionOptions))


@dataclasses.dataclass(frozen=True)
class DatasetLoader:
    """A registered loader called with flat options, as configs write them.

    ``inspect.signature(loader)`` lists the flat options: the loader function's own, with its
    ``partition: PartitionOptions`` replaced by the fields of `PartitionOptions` (defaults: the
    loader's default partition), so a config is checked against exactly what a user may write.

    Example:
      >>> loader = dataset_loader("mnist")  # doctest: +SKIP
      >>> dataset = loader(partition="shards", num_clients=100)  # doctest: +SKIP
    """

    name: str
    function: Any

    @property
    def default_partition(self) -> PartitionOptions | None:
        """The loader's default `PartitionOptions`, or None if it takes none."""
        parameter = inspect.signature(self.function).parameters.get("partition")
        return None if parameter is None else parameter.default

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self.function)
        default = self.default_partition
        if default is None:
            return own
        flat = [
            inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY,
                              default=getattr(default, field))
            for field in _PARTITION_FIELDS
        ]
        others = [p for p in own.parameters.values() if p.name != "partition"]
        return own.replace(parameters=[*others, *flat])

    def arguments(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The loader function's keyword arguments for flat ``options`` (partition gathered).

        Raises:
          ValueError: an unknown key (with a did-you-mean), or a bad partition value.
        """
        valid = sorted(inspect.signature(self).parameters)
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"dataset {self.name!r} has no option {key!r}{hint}; valid options: {valid}"
                )
        default = self.default_partition
        if default is None:
            return dict(options)
        arguments = {k: v for k, v in options.items() if k not in _PARTITION_FIELDS}
        fields = {k: v for k, v in options.items() if k in _PARTITION_FIELDS}
        given = fields.get("partition")
        if isinstance(given, PartitionOptions):  # a whole object, maybe with fields on top
            default = fields.pop("partition")
        arguments["partition"] = PartitionOptions.from_mapping(fields, default)
        return arguments

    def __call__(self, **options: Any) -> FederatedDataset:
        return self.function(**self.arguments(options))


def dataset_loader(name: str) -> DatasetLoader:
    """The loader registered under ``name`` (ValueError with a did-you-mean)."""
    if name not in LOADERS:
        close = difflib.get_close_matches(name, LOADERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(LOADERS)}{hint}")
    module, function = LOADERS[name]
    return DatasetLoader(name, getattr(importlib.import_module(module), function))


def load_dataset(name: str, **options: Any) -> FederatedDataset:
    """Loads dataset ``name`` with flat ``options`` (unknown keys rejected).

    Example:
      >>> load_dataset("fashion_mnist", partition="dirichlet", alpha=0.1)  # doctest: +SKIP
    """
    return dataset_loader(name)(**options)


def convert_dataset(name: str, options: Mapping[str, Any] | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Loads dataset ``name`` with ``options`` and writes it as a cache; returns the folder.

    Loaders with their own cache (the TFF h5 readers take ``cache_dir``) convert into
    ``cache_dir`` themselves (default: beside their source files); any other dataset is loaded
    and written to ``<cache_dir>/<name>-<options hash>`` (default ``cache_dir``:
    ``<data folder>/cache``). This is what ``fedjax-sim data convert`` runs.

    Args:
      name: a registered dataset name (see `LOADERS`).
      options: the loader's flat options.
      cache_dir: the folder that holds cache folders.

    Returns:
      The cache folder; `fedjax_sim.datasets.cache.open_cache` opens it.
    """
    options = dict(options or {})
    loader = dataset_loader(name)
    if "cache_dir" in inspect.signature(loader).parameters:
        if cache_dir is not None:
            options["cache_dir"] = os.fspath(cache_dir)
        options["cache"] = True
        return Path(loader(**options).info["cache"])
    dataset = loader(**options)
    root = Path(cache_dir) if cache_dir is not None else \
        data_dir(options.get("data_dir")) / "cache"
    return write_cache(dataset, root / options_key(name, options),
                       source={"loader": name, "options": options})
