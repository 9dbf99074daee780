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
