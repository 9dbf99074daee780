"""Real federated datasets, loaded by name: ``load_dataset("shakespeare", **options)``."""

from __future__ import annotations

from fedjax_sim.datasets.partition_options import PartitionOptions
from fedjax_sim.datasets.registry import (
    LOADERS,
    DatasetLoader,
    convert_dataset,
    dataset_loader,
    load_dataset,
)

__all__ = [
    "LOADERS",
    "DatasetLoader",
    "PartitionOptions",
    "convert_dataset",
    "dataset_loader",
    "load_dataset",
]
