"""`PartitionOptions`: how a centralized dataset is split into clients, checked once.

Every loader of a centralized dataset (``fashion_mnist``, ``mnist``, ``emnist``, ``cifar10``,
``cifar100``, ``arrays``, ``tfds``) takes one ``partition: PartitionOptions`` argument, which goes
to `fedjax_sim.data.partition.split_into_clients`:

=========================  ==========================================================  ==========
field                      used by                                                     default
=========================  ==========================================================  ==========
``partition``              one of `PARTITIONS` (``"natural"`` only where the data has  dirichlet
                           a client id per example: ``arrays``, ``tfds``)
``num_clients``            every partition but ``"natural"``                           100
``alpha``                  ``"dirichlet"``: Dirichlet concentration, > 0               0.5
``shards_per_client``      ``"shards"``: label-sorted shards per client, >= 1          2
``classes_per_client``     ``"classes"``: labels per client, >= 1                      2
``quantity_distribution``  ``"quantity"``: ``"lognormal"`` or ``"powerlaw"`` sizes     lognormal
``sigma``                  ``"quantity"`` + lognormal: log-size std, > 0               1.0
``exponent``               ``"quantity"`` + powerlaw: tail exponent, > 1               2.5
``seed``                   the partition and (independently) the per-client split      0
``test_fraction``          share of each client held out as its test split, [0, 1)     0.0
=========================  ==========================================================  ==========

Fields a partition does not use are still checked, so a typo'd value never waits silently for
the day the partition changes. A bad value raises ``ValueError("<field> must be ..., got
<value>")``. In a config (and in `fedjax_sim.datasets.load_dataset`) the fields are written flat
beside the loader's own options (``dataset: {name: mnist, partition: shards, num_clients:
100}``); `fedjax_sim.datasets.registry` gathers them into this object, and under ``fedjax-sim
run`` a bad value becomes a one-line config error naming ``dataset``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.data.partition import PARTITIONS, QUANTITY_DISTRIBUTIONS, split_into_clients

CENTRALIZED_PARTITIONS = tuple(name for name in PARTITIONS if name != "natural")
"""The partitions of a dataset without a client id per example (all but ``"natural"``)."""

LABEL_PARTITIONS = ("dirichlet", "shards", "classes")
"""Partitions that split by label: they need one label per example, ``y: [N]``."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def _did_you_mean(value: object, valid) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class PartitionOptions:
    """How a centralized dataset's training examples are split into clients.

    Attributes: see the module docstring (the fields are `split_into_clients`'s options).

    Raises:
      ValueError: on construction, ``"<field> must be <what>, got <value>"`` for the first
        field with a bad value.

    Example:
      >>> options = PartitionOptions("shards", num_clients=100, shards_per_client=2)
      >>> options.partition, options.num_clients
      ('shards', 100)
    """

    partition: str = "dirichlet"
    num_clients: int = 100
    alpha: float = 0.5
    shards_per_client: int = 2
    classes_per_client: int = 2
    quantity_distribution: str = "lognormal"
    sigma: float = 1.0
    exponent: float = 2.5
    seed: int = 0
    test_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.partition, str) or self.partition not in PARTITIONS:
            raise ValueError(
                f"partition must be one of {list(PARTITIONS)}, got {self.partition!r}"
                f"{_did_you_mean(self.partition, PARTITIONS)}"
            )
        if not _is_int(self.num_clients) or self.num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1, got {self.num_clients!r}")
        for name in ("shards_per_client", "classes_per_client"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.quantity_distribution not in QUANTITY_DISTRIBUTIONS:
            raise ValueError(
                f"quantity_distribution must be one of {list(QUANTITY_DISTRIBUTIONS)}, got "
                f"{self.quantity_distribution!r}"
            )
        for name, bound in (("alpha", 0), ("sigma", 0), ("exponent", 1)):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > bound):
                raise ValueError(f"{name} must be a finite number > {bound}, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not _is_number(self.test_fraction) or not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")

    @classmethod
    def from_mapping(
        cls, options: Mapping[str, Any], default: PartitionOptions | None = None
    ) -> PartitionOptions:
        """``default`` (or the class defaults) with the fields in ``options`` replaced.

        Raises:
          ValueError: a key that is no field (with a did-you-mean), or a bad value.
        """
        fields = [field.name for field in dataclasses.fields(cls)]
        for key in options:
            if key not in fields:
                raise ValueError(
                    f"unknown partition option {key!r}{_did_you_mean(key, fields)}; "
                    f"expected one of {fields}"
                )
        return dataclasses.replace(default if default is not None else cls(), **options)

    def check_offered(self, partitions, dataset: str) -> PartitionOptions:
        """Itself, unless its partition is not one of ``partitions`` (the loader's)."""
        if self.partition not in partitions:
            hint = ""
            if self.partition == "natural":
                hint = (
                    f" ({dataset} has no client id per example to group by; the natural "
                    "clients of a dataset come with its federated loaders, or with the "
                    "'arrays' and 'tfds' loaders given client ids)"
                )
            raise ValueError(
                f"partition must be one of {list(partitions)}, got {self.partition!r}{hint}"
            )
        return self

    def split(
        self, train: Mapping[str, np.ndarray], group_ids: np.ndarray | None = None
    ) -> tuple[FederatedData, FederatedData | None]:
        """``train`` (``{feature: [N, ...]}``, labels under ``"y"``) split into clients.

        Returns:
          ``(train clients, per-client test split or None)`` as `split_into_clients` returns
          them (a test split when ``test_fraction > 0``).

        Raises:
          ValueError: a partition that cannot split these examples (e.g. more shards than
            examples; the partitioner says which).
        """
        options = dataclasses.asdict(self)
        return split_into_clients(train, options.pop("partition"), group_ids=group_ids,
                                  **options)


DEFAULT_PARTITION = PartitionOptions()
"""The centralized loaders' default: Dirichlet(0.5) label skew over 100 clients."""


def check_partition(
    partition: object, dataset: str, partitions=CENTRALIZED_PARTITIONS
) -> PartitionOptions:
    """A loader's ``partition`` argument, checked before any file is read.

    Args:
      partition: what the loader was given: a `PartitionOptions`.
      dataset: the loader's name, for messages.
      partitions: the partition names the loader offers (default: all but ``"natural"``).

    Raises:
      TypeError: ``partition`` is not a `PartitionOptions`.
      ValueError: its partition is not one the loader offers.
    """
    if not isinstance(partition, PartitionOptions):
        raise TypeError(
            f"partition must be a PartitionOptions, e.g. PartitionOptions('iid', "
            f"num_clients=10), got {partition!r:.80}; load_dataset({dataset.split(':')[0]!r}, "
            "partition='iid', num_clients=10) takes the fields flat"
        )
    return partition.check_offered(partitions, dataset)


def centralized_dataset(
    name: str,
    train: Mapping[str, np.ndarray],
    central_test: Mapping[str, np.ndarray] | None,
    partition: PartitionOptions,
    info: Mapping[str, Any],
    group_ids: np.ndarray | None = None,
) -> FederatedDataset:
    """A `FederatedDataset` of ``train`` split by ``partition`` and a central test set.

    ``info`` gets ``pad_label=None`` unless it says otherwise (whole examples, no padding).
    """
    clients, test = partition.split(train, group_ids)
    return FederatedDataset(
        name=name,
        train=clients,
        test=test,
        central_test=central_test,
        info={"pad_label": None, **info},
    )


def image_info(class_names, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``info`` of a float32 image classification dataset with named classes."""
    return {
        "num_classes": len(class_names),
        "input_shape": tuple(input_shape),
        "input_dtype": "float32",
        "class_names": list(class_names),
    }
