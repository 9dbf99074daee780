"""Partitioners: split a centralized dataset's flat arrays into clients.

Each partitioner takes ``{feature: [N, ...]}`` arrays (and, where it draws randomness, a seeded
``numpy.random.Generator``; never the global ``np.random``) and returns a `FederatedData` in
which every example belongs to exactly one client. Everything is vectorised numpy over the N
examples: memory and time are O(N) (plus a sort), whatever the number of clients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from fedjax_sim.data.federated_data import FederatedData, train_test_split_per_client


def _as_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Checks that ``arrays`` is a non-empty dict of arrays with one common leading length."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(
            f"arrays must be a non-empty dict {{feature: [N, ...] array}}, got {arrays!r:.80}"
        )
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    lengths = {name: (len(value) if value.ndim else None) for name, value in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise ValueError(
            f"arrays must all have the same leading (example) axis, got lengths {lengths}"
        )
    return arrays, next(iter(lengths.values()))


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an int, got {num_clients!r}")
    if not 0 < num_clients <= num_examples:
        raise ValueError(
            f"num_clients must be in [1, number of examples = {num_examples}], got {num_clients}"
        )


def iid_partition(
    arrays: Mapping[str, np.ndarray], num_clients: int, rng: np.random.Generator
) -> FederatedData:
    """Shuffles the examples and deals them into ``num_clients`` near-equal clients.

    The homogeneous baseline of McMahan et al. 2017 ("Communication-Efficient Learning of Deep
    Networks from Decentralized Data", arXiv:1602.05629, the "IID" MNIST split): client sizes
    are ``N // num_clients`` or one more, and each client's examples are a uniform random
    sample without replacement.

    Args:
      arrays: ``{feature: [N, ...]}`` examples.
      num_clients: number of clients, in ``[1, N]``.
      rng: the randomness (``np.random.default_rng(seed)``).

    Returns:
      A `FederatedData` with client ids ``0 .. num_clients - 1``; the first ``N % num_clients``
      clients hold one extra example.

    Example:
      >>> data = iid_partition({"y": np.arange(10)}, 3, np.random.default_rng(0))
      >>> data.client_sizes.tolist()
      [4, 3, 3]
    """
    arrays, num_examples = _as_arrays(arrays)
    _check_num_clients(num_clients, num_examples)
    order = rng.permutation(num_examples)
    sizes = np.full(num_clients, num_examples // num_clients, np.int64)
    sizes[: num_examples % num_clients] += 1
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return FederatedData(
        {name: value[order] for name, value in arrays.items()}, offsets, np.arange(num_clients)
    )


def dirichlet_partition(
    arrays: Mapping[str, np.ndarray],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    label_key: str = "y",
    min_examples_per_client: int = 1,
    max_tries: int = 1000,
) -> FederatedData:
    """Label skew: each class's examples are spread over the clients by Dirichlet proportions.

    For every class ``k`` independently, ``p_k ~ Dir(alpha * 1_num_clients)`` and the class's
    (shuffled) ``n_k`` examples are cut into consecutive runs of sizes ``~ p_k * n_k``
    (``floor`` of the cumulative proportions, so the counts sum to ``n_k`` exactly). Large
    ``alpha`` gives every client the global label histogram; small ``alpha`` gives each client
    few classes (``alpha -> 0``: each class on one client). Client sizes vary too. If some
    client ends up with fewer than ``min_examples_per_client`` examples, all proportions are
    drawn again, at most ``max_tries`` times.

    This is the Dirichlet label skew of Hsu, Qi & Brown 2019 ("Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335) in
    the per-class form of Yurochkin et al. 2019 (arXiv:1905.12022) and Wang et al. 2020
    (FedMA, arXiv:2002.06440), with the resampling of Li et al. 2021 (NIID-Bench,
    arXiv:2102.02079). (Hsu et al. draw a class distribution per client instead, with equal
    client sizes.)

    Args:
      arrays: ``{feature: [N, ...]}`` examples; ``arrays[label_key]`` is ``[N]`` labels of any
        sortable dtype.
      num_clients: number of clients, in ``[1, N]``.
      alpha: Dirichlet concentration, > 0.
      rng: the randomness (``np.random.default_rng(seed)``).
      label_key: the feature holding the labels.
      min_examples_per_client: every client gets at least this many examples (>= 0).
      max_tries: how many times proportions are drawn before giving up.

    Returns:
      A `FederatedData` with client ids ``0 .. num_clients - 1``; within a client, examples keep
      their original order.

    Raises:
      ValueError: invalid arguments, or no draw in ``max_tries`` met
        ``min_examples_per_client``.

    Example:
      >>> y = np.repeat(np.arange(10), 100)
      >>> data = dirichlet_partition({"y": y}, 20, 0.5, np.random.default_rng(0))
      >>> int(data.num_examples), int(data.client_sizes.min()) >= 1
      (1000, True)
    """
    arrays, num_examples = _as_arrays(arrays)
    _check_num_clients(num_clients, num_examples)
    if not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if label_key not in arrays:
        raise ValueError(f"label_key {label_key!r} is not a feature; features: {list(arrays)}")
    labels = arrays[label_key]
    if labels.ndim != 1:
        raise ValueError(f"arrays[{label_key!r}] must be [N] labels, got shape {labels.shape}")
    if not isinstance(min_examples_per_client, (int, np.integer)) or min_examples_per_client < 0:
        raise ValueError(
            f"min_examples_per_client must be an int >= 0, got {min_examples_per_client!r}"
        )
    if num_clients * min_examples_per_client > num_examples:
        raise ValueError(
            f"min_examples_per_client={min_examples_per_client} x num_clients={num_clients} "
            f"exceeds the {num_examples} examples; lower one of them"
        )
    if not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}")

    _, class_of_example = np.unique(labels, return_inverse=True)
    class_of_example = class_of_example.reshape(-1)
    class_sizes = np.bincount(class_of_example)
    # Examples grouped by class, shuffled within each class.
    by_class = np.lexsort((rng.random(num_examples), class_of_example))
    for _ in range(max_tries):
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(class_sizes))
        # Cut points of each class's run: floor of the cumulative share, the last one exact.
        cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes
        counts = np.diff(cuts, axis=1, prepend=0)  # [classes, clients]
        smallest = int(counts.sum(axis=0).min())
        if smallest >= min_examples_per_client:
            break
    else:
        raise ValueError(
            f"dirichlet_partition: after max_tries={max_tries} draws some client still had "
            f"fewer than min_examples_per_client={min_examples_per_client} examples (smallest "
            f"client in the last draw: {smallest}) with num_clients={num_clients}, "
            f"alpha={alpha}, {num_examples} examples; raise alpha or max_tries, or lower "
            "num_clients or min_examples_per_client"
        )
    client_in_class_order = np.repeat(
        np.tile(np.arange(num_clients), len(class_sizes)), counts.reshape(-1)
    )
    client_of_example = np.empty(num_examples, np.int64)
    client_of_example[by_class] = client_in_class_order
    return FederatedData.from_assignment(arrays, client_of_example, num_clients)


def natural_partition(arrays: Mapping[str, np.ndarray], group_ids: np.ndarray) -> FederatedData:
    """Groups examples by a per-example id: the data's own (natural) clients.

    E.g. the writer of an EMNIST character (Caldas et al. 2018, LEAF, arXiv:1812.01097) or the
    speaker of a Shakespeare line (McMahan et al. 2017, arXiv:1602.05629).

    Args:
      arrays: ``{feature: [N, ...]}`` examples.
      group_ids: ``[N]`` client id of each example (ints or strings).

    Returns:
      A `FederatedData` whose ``client_ids`` are the sorted unique ids; within a client, examples
      keep their original order.

    Example:
      >>> data = natural_partition({"y": np.arange(4)}, np.array(["b", "a", "b", "a"]))
      >>> data.client_ids.tolist(), data.arrays["y"].tolist()
      (['a', 'b'], [1, 3, 0, 2])
    """
    arrays, num_examples = _as_arrays(arrays)
    group_ids = np.asarray(group_ids)
    if group_ids.shape != (num_examples,):
        raise ValueError(
            f"group_ids must be [N] = [{num_examples}] (one id per example), got shape "
            f"{group_ids.shape}"
        )
    client_ids, client_of_example = np.unique(group_ids, return_inverse=True)
    data = FederatedData.from_assignment(arrays, client_of_example.reshape(-1), len(client_ids))
    return dataclasses.replace(data, client_ids=client_ids)


def split_into_clients(
    arrays: Mapping[str, np.ndarray],
    partition: str,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.0,
    group_ids: np.ndarray | None = None,
) -> tuple[FederatedData, FederatedData | None]:
    """A centralized dataset split into clients by name: ``"iid"``, ``"dirichlet"``, ``"natural"``.

    ``seed`` seeds the partition and, independently, the per-client test split (when
    ``test_fraction > 0``), so changing ``test_fraction`` leaves the partition unchanged.
    ``group_ids`` are the per-example client ids of the natural partition.

    Returns:
      ``(train, test)``; ``test`` is None when ``test_fraction == 0``.
    """
    partition_seed, split_seed = np.random.SeedSequence(seed).spawn(2)
    partition_rng = np.random.default_rng(partition_seed)
    if partition == "natural":
        if group_ids is None:
            raise ValueError("partition='natural' needs group_ids (one client id per example)")
        clients = natural_partition(arrays, group_ids)
    elif partition == "iid":
        clients = iid_partition(arrays, num_clients, partition_rng)
    elif partition == "dirichlet":
        clients = dirichlet_partition(arrays, num_clients, alpha, partition_rng, label_key="y")
    else:
        raise ValueError(
            f"partition={partition!r}: expected one of 'iid', 'dirichlet', 'natural'"
        )
    if test_fraction <= 0:
        return clients, None
    return train_test_split_per_client(clients, test_fraction, np.random.default_rng(split_seed))
