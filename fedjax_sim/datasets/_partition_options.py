"""The partition options of the centralized loaders, checked and applied in one place.

Every loader of a centralized dataset (``fashion_mnist``, ``mnist``, ``emnist``, ``cifar10``,
``cifar100``, ``arrays``, ``tfds``) takes the same keyword options, which go straight to
`fedjax_sim.data.partition.split_into_clients`:

=========================  ==========================================================  ==========
option                     used by                                                     default
=========================  ==========================================================  ==========
``partition``              one of `PARTITIONS` (``"natural"`` only where the data has  per loader
                           a client id per example: ``arrays``, ``tfds``)
``num_clients``            every partition but ``"natural"``                           per loader
``alpha``                  ``"dirichlet"``: Dirichlet concentration, > 0               0.5
``shards_per_client``      ``"shards"``: label-sorted shards per client, >= 1          2
``classes_per_client``     ``"classes"``: labels per client, >= 1                      2
``quantity_distribution``  ``"quantity"``: ``"lognormal"`` or ``"powerlaw"`` sizes     lognormal
``sigma``                  ``"quantity"`` + lognormal: log-size std, > 0               1.0
``exponent``               ``"quantity"`` + powerlaw: tail exponent, > 1               2.5
``seed``                   the partition and (independently) the per-client split      0
``test_fraction``          share of each client held out as its test split, [0, 1)     0.0
=========================  ==========================================================  ==========

Options a partition does not use are still checked, so a typo'd value never waits silently for
the day the partition changes. A bad value raises ``ValueError("<option> must be ..., got
<value>")``; under ``fedjax-sim run`` that becomes a one-line config error naming
``dataset``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.partition import PARTITIONS, QUANTITY_DISTRIBUTIONS, split_into_clients

CENTRALIZED_PARTITIONS = tuple(name for name in PARTITIONS if name != "natural")
"""The partitions of a dataset without a client id per example (all but ``"natural"``)."""

LABEL_PARTITIONS = ("dirichlet", "shards", "classes")
"""Partitions that split by label: they need one label per example, ``y: [N]``."""


PARTITION_OPTIONS = (
    "partition", "num_clients", "alpha", "shards_per_client", "classes_per_client",
    "quantity_distribution", "sigma", "exponent", "seed", "test_fraction",
)  # fmt: skip
"""The keyword options every centralized loader takes (and passes to `split_centralized`)."""


def partition_options(
    arguments: Mapping[str, Any],
    *,
    dataset: str,
    partitions: Sequence[str] = CENTRALIZED_PARTITIONS,
) -> dict[str, Any]:
    """The `PARTITION_OPTIONS` picked from a loader's arguments, checked before any file is read.

    Args:
      arguments: the loader's arguments: ``locals()`` as the loader's first statement.
      dataset: the loader's name, for messages.
      partitions: the partition names the loader offers.

    Returns:
      The keyword arguments of `split_centralized` (the options, ``partitions``, ``dataset``).

    Raises:
      ValueError: a bad option value (see `check_partition_options`).

    Example:
      >>> def load_mine(*, partition="iid", num_clients=10, ..., test_fraction=0.0):
      ...     options = partition_options(locals(), dataset="mine")  # doctest: +SKIP
      ...     return split_centralized(read_my_arrays(), **options)  # doctest: +SKIP
    """
    options = {name: arguments[name] for name in PARTITION_OPTIONS}
    options.update(partitions=tuple(partitions), dataset=dataset)
    check_partition_options(**options)
    return options


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def check_partition_options(
    *,
    partition: str,
    num_clients: int,
    alpha: float,
    shards_per_client: int,
    classes_per_client: int,
    quantity_distribution: str,
    sigma: float,
    exponent: float,
    seed: int,
    test_fraction: float,
    partitions: Sequence[str] = PARTITIONS,
    dataset: str = "this dataset",
) -> None:
    """Raises a ValueError naming the first option with a bad value.

    Args:
      partition, num_clients, alpha, shards_per_client, classes_per_client,
      quantity_distribution, sigma, exponent, seed, test_fraction: the options (see the module
        docstring).
      partitions: the partition names this loader offers.
      dataset: the loader's name, for messages.

    Raises:
      ValueError: ``"<option> must be <what>, got <value>"``.
    """
    if not isinstance(partition, str) or partition not in partitions:
        hint = ""
        if partition == "natural" and partition in PARTITIONS:
            hint = (
                f" ({dataset} has no client id per example to group by; the natural clients of "
                "a dataset come with its federated loaders, or with the 'arrays' and 'tfds' "
                "loaders given client ids)"
            )
        raise ValueError(f"partition must be one of {list(partitions)}, got {partition!r}{hint}")
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if not _is_number(alpha) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    for name, value in (
        ("shards_per_client", shards_per_client),
        ("classes_per_client", classes_per_client),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(quantity_distribution, str) or (
        quantity_distribution not in QUANTITY_DISTRIBUTIONS
    ):
        raise ValueError(
            f"quantity_distribution must be one of {list(QUANTITY_DISTRIBUTIONS)}, got "
            f"{quantity_distribution!r}"
        )
    if not _is_number(sigma) or not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not _is_number(exponent) or not (math.isfinite(exponent) and exponent > 1):
        raise ValueError(f"exponent must be a finite number > 1, got {exponent!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not _is_number(test_fraction) or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")


def split_centralized(
    train: Mapping[str, np.ndarray],
    *,
    partition: str,
    num_clients: int,
    alpha: float,
    shards_per_client: int,
    classes_per_client: int,
    quantity_distribution: str,
    sigma: float,
    exponent: float,
    seed: int,
    test_fraction: float,
    group_ids: np.ndarray | None = None,
    partitions: Sequence[str] = CENTRALIZED_PARTITIONS,
    dataset: str = "this dataset",
) -> tuple[FederatedData, FederatedData | None]:
    """Checks the partition options, then splits ``train`` into clients.

    Args:
      train: ``{feature: [N, ...]}`` training examples, labels under ``"y"``.
      partition, num_clients, alpha, shards_per_client, classes_per_client,
      quantity_distribution, sigma, exponent, seed, test_fraction: the loader's options (see
        the module docstring and `split_into_clients`).
      group_ids: ``[N]`` client ids for ``partition="natural"``.
      partitions: the partition names the loader offers (default: all but ``"natural"``).
      dataset: the loader's name, for messages.

    Returns:
      ``(train clients, per-client test split or None)`` as `split_into_clients` returns them.

    Raises:
      ValueError: a bad option value (`check_partition_options`), or a partition that cannot
        split these examples (e.g. more shards than examples; the partitioner says which).

    Example:
      >>> clients, _ = split_centralized(  # doctest: +SKIP
      ...     {"x": x, "y": y}, partition="shards", num_clients=100, alpha=0.5,
      ...     shards_per_client=2, classes_per_client=2, quantity_distribution="lognormal",
      ...     sigma=1.0, exponent=2.5, seed=0, test_fraction=0.0)
    """
    check_partition_options(
        partition=partition, num_clients=num_clients, alpha=alpha,
        shards_per_client=shards_per_client, classes_per_client=classes_per_client,
        quantity_distribution=quantity_distribution, sigma=sigma, exponent=exponent, seed=seed,
        test_fraction=test_fraction, partitions=partitions, dataset=dataset,
    )  # fmt: skip
    return split_into_clients(
        train, partition, num_clients=num_clients, alpha=alpha, seed=seed,
        test_fraction=test_fraction, group_ids=group_ids, shards_per_client=shards_per_client,
        classes_per_client=classes_per_client, quantity_distribution=quantity_distribution,
        sigma=sigma, exponent=exponent,
    )  # fmt: skip
