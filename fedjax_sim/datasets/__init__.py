"""Real federated datasets, loaded by name: ``load_dataset("shakespeare", **options)``."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from fedjax_sim.data.federated_data import FederatedDataset

# name -> (module, loader function); modules are imported on first use.
LOADERS = {
    "shakespeare": ("fedjax_sim.datasets.shakespeare", "load_shakespeare"),
    "fashion_mnist": ("fedjax_sim.datasets.fashion_mnist", "load_fashion_mnist"),
    "arrays": ("fedjax_sim.datasets.arrays", "load_arrays"),
    # TFF's h5 files (examples/<client_id>/<feature>)
    "tff_emnist": ("fedjax_sim.datasets.tff_h5", "load_tff_emnist"),
    "tff_shakespeare": ("fedjax_sim.datasets.tff_h5", "load_tff_shakespeare"),
    "tff_stackoverflow": ("fedjax_sim.datasets.tff_h5", "load_tff_stackoverflow"),
    "tff_cifar100": ("fedjax_sim.datasets.tff_h5", "load_tff_cifar100"),
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


def dataset_loader(name: str):
    """The loader function registered under ``name`` (ValueError with a did-you-mean)."""
    if name not in LOADERS:
        close = difflib.get_close_matches(name, LOADERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(LOADERS)}{hint}")
    module, function = LOADERS[name]
    return getattr(importlib.import_module(module), function)


def load_dataset(name: str, **options: Any) -> FederatedDataset:
    """Loads dataset ``name`` with the loader's keyword ``options`` (unknown keys rejected)."""
    loader = dataset_loader(name)
    parameters = inspect.signature(loader).parameters
    for key in options:
        if key not in parameters:
            valid = sorted(parameters)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"dataset {name!r} has no option {key!r}{hint}; valid options: {valid}"
            )
    return loader(**options)
