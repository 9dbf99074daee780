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
    (``floor`` of the cumulative proportions, so the counts sum to ``n_k`` exactly, as
    NIID-Bench's ``np.split`` at ``(cumsum(p) * n_k).astype(int)`` does; so the last client
    gets the floors' remainder, ``ceil(p * n_k)``, hence at least one example of almost every
    class: kept so that recorded runs reproduce, see docs/partitioners.md). Large
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



def _labels_of(arrays: Mapping[str, np.ndarray], label_key: str) -> np.ndarray:
    """``arrays[label_key]`` as ``[N]`` labels, or a ValueError naming the key."""
    if label_key not in arrays:
        raise ValueError(f"label_key {label_key!r} is not a feature; features: {list(arrays)}")
    labels = arrays[label_key]
    if labels.ndim != 1:
        raise ValueError(f"arrays[{label_key!r}] must be [N] labels, got shape {labels.shape}")
    return labels


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def shards_partition(
    arrays: Mapping[str, np.ndarray],
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
    *,
    label_key: str = "y",
) -> FederatedData:
    """Pathological non-IID shards: sort by label, cut into shards, deal k shards to each client.

    The examples are sorted by label (in random order within a label), cut into
    ``num_clients * shards_per_client`` consecutive shards of ``N // S`` or ``N // S + 1``
    examples (``S`` the number of shards), and each client gets ``shards_per_client`` shards
    chosen by a random permutation of the shards. This is the "pathological non-IID" MNIST split
    of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from
    Decentralized Data", arXiv:1602.05629: 200 shards of 300 examples, 2 per client).

    A shard is a run of the label-sorted examples, so it holds one label unless it straddles a
    label boundary: a client holds at most ``shards_per_client`` labels when every class size is
    a multiple of the shard size (McMahan et al.'s setting, up to MNIST's unequal classes), and
    a few more otherwise.

    Args:
      arrays: ``{feature: [N, ...]}`` examples; ``arrays[label_key]`` is ``[N]`` sortable labels.
      num_clients: number of clients, >= 1.
      shards_per_client: shards per client (McMahan et al.: 2), >= 1; ``num_clients *
        shards_per_client`` must not exceed N.
      rng: the randomness (``np.random.default_rng(seed)``).
      label_key: the feature holding the labels.

    Returns:
      A `FederatedData` with client ids ``0 .. num_clients - 1``; within a client, examples keep
      their original order.

    Example:
      >>> y = np.repeat(np.arange(10), 30)
      >>> data = shards_partition({"y": y}, 10, 2, np.random.default_rng(0))
      >>> data.client_sizes.tolist() == [30] * 10
      True
    """
    arrays, num_examples = _as_arrays(arrays)
    _check_positive_int("num_clients", num_clients)
    _check_positive_int("shards_per_client", shards_per_client)
    labels = _labels_of(arrays, label_key)
    num_shards = num_clients * shards_per_client
    if num_shards > num_examples:
        raise ValueError(
            f"num_clients={num_clients} x shards_per_client={shards_per_client} = {num_shards} "
            f"shards exceeds the {num_examples} examples; lower one of them"
        )
    # Label-sorted order with random ties: every shard is a random sample of its label(s).
    by_label = np.lexsort((rng.random(num_examples), labels))
    shard_sizes = np.full(num_shards, num_examples // num_shards, np.int64)
    shard_sizes[: num_examples % num_shards] += 1
    shard_of_position = np.repeat(np.arange(num_shards), shard_sizes)
    # Shard s goes to client owner[s]: a random permutation dealt k at a time.
    owner = np.empty(num_shards, np.int64)
    owner[rng.permutation(num_shards)] = np.repeat(np.arange(num_clients), shards_per_client)
    client_of_example = np.empty(num_examples, np.int64)
    client_of_example[by_label] = owner[shard_of_position]
    return FederatedData.from_assignment(arrays, client_of_example, num_clients)


QUANTITY_DISTRIBUTIONS = ("lognormal", "powerlaw")
"""Client-size distributions of `quantity_skew_partition`."""


def quantity_skew_partition(
    arrays: Mapping[str, np.ndarray],
    num_clients: int,
    rng: np.random.Generator,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 2.5,
    min_examples_per_client: int = 1,
) -> FederatedData:
    """Quantity skew: client sizes drawn from a heavy-tailed distribution, examples IID.

    Each client draws a weight ``w_i``: ``LogNormal(0, sigma)`` (``log w_i ~ N(0, sigma^2)``) or
    a continuous power law with density ``p(w) ∝ w^-exponent`` for ``w >= 1`` (Clauset, Shalizi &
    Newman 2009, "Power-law distributions in empirical data", arXiv:0706.1062; a Pareto law of
    shape ``exponent - 1``). Client ``i`` then gets ``m + (N - num_clients * m) * w_i / sum(w)``
    examples (``m = min_examples_per_client``; rounded by largest remainder so the sizes sum to
    N), dealt from one random permutation of the examples, so the label distribution is the
    global one everywhere and only the amount of data differs. With ``m`` small next to the
    typical share, ``log(size)`` has standard deviation ``~sigma`` (log-normal) and the sizes
    have the power law's tail exponent.

    Quantity skew is one of the non-IID settings of Li, Diao, Chen & He 2021 ("Federated
    Learning on Non-IID Data Silos: An Experimental Study", NIID-Bench, arXiv:2102.02079, which
    draws the shares from a Dirichlet); log-normal client sizes follow the unbalanced splits of
    LEAF (Caldas et al. 2018, arXiv:1812.01097) and FedProx's power-law sample counts (Li et al.
    2020, arXiv:1812.06127).

    Args:
      arrays: ``{feature: [N, ...]}`` examples.
      num_clients: number of clients, in ``[1, N]``.
      rng: the randomness (``np.random.default_rng(seed)``).
      distribution: ``"lognormal"`` or ``"powerlaw"``.
      sigma: log-normal shape (standard deviation of the log of the sizes), > 0.
      exponent: power-law exponent of the size density, > 1 (the smaller, the heavier the tail).
      min_examples_per_client: every client gets at least this many examples (>= 0).

    Returns:
      A `FederatedData` with client ids ``0 .. num_clients - 1``.

    Example:
      >>> data = quantity_skew_partition({"y": np.arange(1000)}, 10, np.random.default_rng(0))
      >>> int(data.num_examples), int(data.client_sizes.min()) >= 1
      (1000, True)
    """
    arrays, num_examples = _as_arrays(arrays)
    _check_num_clients(num_clients, num_examples)
    if distribution not in QUANTITY_DISTRIBUTIONS:
        raise ValueError(
            f"distribution={distribution!r}: expected one of {list(QUANTITY_DISTRIBUTIONS)}"
        )
    if distribution == "lognormal" and not _is_finite_number(sigma, lower=0.0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if distribution == "powerlaw" and not _is_finite_number(exponent, lower=1.0):
        raise ValueError(f"exponent must be a finite number > 1, got {exponent!r}")
    if isinstance(min_examples_per_client, bool) or not isinstance(
        min_examples_per_client, (int, np.integer)
    ) or min_examples_per_client < 0:
        raise ValueError(
            f"min_examples_per_client must be an int >= 0, got {min_examples_per_client!r}"
        )
    if num_clients * min_examples_per_client > num_examples:
        raise ValueError(
            f"min_examples_per_client={min_examples_per_client} x num_clients={num_clients} "
            f"exceeds the {num_examples} examples; lower one of them"
        )
    if distribution == "lognormal":
        # Weights relative to their largest: exp() of a few hundred sigmas never overflows.
        log_weights = rng.normal(0.0, float(sigma), num_clients)
    else:
        # Inverse CDF of p(w) ∝ w^-exponent on [1, inf): w = u^(-1 / (exponent - 1)).
        log_weights = -np.log1p(-rng.random(num_clients)) / (float(exponent) - 1.0)
    weights = np.exp(log_weights - log_weights.max())
    free = num_examples - num_clients * min_examples_per_client
    shares = free * weights / weights.sum()
    sizes = np.floor(shares).astype(np.int64)
    # Largest remainder: the examples lost to flooring go to the largest fractional parts.
    missing = free - int(sizes.sum())
    sizes[np.argsort(sizes - shares, kind="stable")[:missing]] += 1
    sizes += min_examples_per_client
    order = rng.permutation(num_examples)
    return FederatedData(
        {name: value[order] for name, value in arrays.items()},
        np.concatenate([[0], np.cumsum(sizes)]),
        np.arange(num_clients),
    )


def _is_finite_number(value: object, lower: float) -> bool:
    """``value`` is a real number (not a bool), finite and ``> lower``."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and value > lower
    )


def classes_partition(
    arrays: Mapping[str, np.ndarray],
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator,
    *,
    label_key: str = "y",
) -> FederatedData:
    """Label-quantity skew: every client holds exactly ``classes_per_client`` labels.

    The "#C=k" setting of Li, Diao, Chen & He 2021 ("Federated Learning on Non-IID Data Silos:
    An Experimental Study", NIID-Bench, arXiv:2102.02079): each client is given ``k`` distinct
    labels, and each label's examples are shuffled and split into near-equal parts among the
    clients that hold it. The label sets are dealt from one random permutation ``pi`` of the
    ``K`` labels: client ``i`` gets ``pi[(i*k + j) mod K]`` for ``j < k``, so every label is held
    by ``floor(C*k/K)`` or ``ceil(C*k/K)`` clients and none is left out (NIID-Bench draws the
    ``k - 1`` further labels at random and drops the examples of labels no client drew; here
    every example is kept, which needs ``num_clients * k >= K``).

    Args:
      arrays: ``{feature: [N, ...]}`` examples; ``arrays[label_key]`` is ``[N]`` labels of any
        sortable dtype.
      num_clients: number of clients, >= 1.
      classes_per_client: labels per client ``k``, in ``[1, K]`` (``K`` the distinct labels).
      rng: the randomness (``np.random.default_rng(seed)``).
      label_key: the feature holding the labels.

    Returns:
      A `FederatedData` with client ids ``0 .. num_clients - 1``; within a client, examples are
      grouped by label.

    Raises:
      ValueError: bad arguments, ``num_clients * k < K`` (some label would have no client), or a
        label with fewer examples than clients holding it (some client would miss a label).

    Example:
      >>> y = np.repeat(np.arange(10), 30)
      >>> data = classes_partition({"y": y}, 20, 2, np.random.default_rng(0))
      >>> sorted({len(np.unique(data.client(i)["y"])) for i in range(20)})
      [2]
    """
    arrays, num_examples = _as_arrays(arrays)
    _check_positive_int("num_clients", num_clients)
    _check_positive_int("classes_per_client", classes_per_client)
    labels = _labels_of(arrays, label_key)
    classes, class_of_example = np.unique(labels, return_inverse=True)
    class_of_example = class_of_example.reshape(-1)
    num_classes = len(classes)
    if classes_per_client > num_classes:
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the {num_classes} distinct labels "
            f"in arrays[{label_key!r}]"
        )
    if num_clients * classes_per_client < num_classes:
        raise ValueError(
            f"num_clients={num_clients} x classes_per_client={classes_per_client} is fewer than "
            f"the {num_classes} labels: some label would have no client; raise one of them"
        )
    # Deal label sets cyclically from a random permutation: (client, class) pairs.
    dealt = rng.permutation(num_classes)[np.arange(num_clients * classes_per_client) % num_classes]
    pair_client = np.repeat(np.arange(num_clients), classes_per_client)
    by_class = np.argsort(dealt, kind="stable")
    holder_client = pair_client[by_class]  # clients holding class 0, then class 1, ...
    holders = np.bincount(dealt, minlength=num_classes)
    holder_start = np.concatenate([[0], np.cumsum(holders)[:-1]])
    class_sizes = np.bincount(class_of_example, minlength=num_classes)
    short = np.flatnonzero(class_sizes < holders)
    if short.size:
        c = short[0]
        raise ValueError(
            f"label {classes[c]!r} has {class_sizes[c]} examples but is dealt to {holders[c]} "
            f"clients (num_clients={num_clients}, classes_per_client={classes_per_client}), so "
            "some client would not get all its labels; lower num_clients or classes_per_client"
        )
    # Rank of each example within its class (shuffled), then the holder it falls to.
    shuffled = np.lexsort((rng.random(num_examples), class_of_example))
    class_start = np.concatenate([[0], np.cumsum(class_sizes)[:-1]])
    rank = np.empty(num_examples, np.int64)
    rank[shuffled] = np.arange(num_examples) - class_start[class_of_example[shuffled]]
    part = rank * holders[class_of_example] // class_sizes[class_of_example]
    client_of_example = holder_client[holder_start[class_of_example] + part]
    order = np.lexsort((rank, class_of_example, client_of_example))
    sizes = np.bincount(client_of_example, minlength=num_clients)
    return FederatedData(
        {name: value[order] for name, value in arrays.items()},
        np.concatenate([[0], np.cumsum(sizes)]),
        np.arange(num_clients),
    )


def partition_report(
    data: FederatedData,
    label_key: str = "y",
    num_classes: int | None = None,
    *,
    ignore_label: int | None = None,
) -> dict:
    """Clients, examples per client and the label distribution of a partition.

    Labels may have trailing axes (e.g. ``[N, T]`` next-token targets): every element counts.
    Integer labels index the columns directly (``0 .. num_classes - 1``; values outside, and
    ``ignore_label`` such as a padding label, are not counted); other labels (strings) get one
    column per distinct value, in sorted order.

    Args:
      data: the partition.
      label_key: the feature holding the labels.
      num_classes: the number of columns for integer labels; default ``max label + 1``.
      ignore_label: a label value never counted (e.g. the dataset's ``pad_label``).

    Returns:
      A dict with ``clients``, ``examples``, ``examples_per_client`` (``{"min", "median",
      "mean", "max"}``), ``client_sizes`` (``[clients]`` int64), ``labels`` (the label value of
      each column), ``label_counts`` (``[clients, classes]`` int64 counts),
      ``classes_per_client`` (``[clients]``: the labels with a nonzero count) and
      ``classes_per_client_summary`` (``{"min", "median", "mean", "max"}``).

    Example:
      >>> data = FederatedData({"y": np.array([0, 0, 1, 2])}, [0, 2, 4], ["a", "b"])
      >>> partition_report(data)["label_counts"].tolist()
      [[2, 0, 0], [0, 1, 1]]
    """
    if label_key not in data.arrays:
        raise ValueError(
            f"label_key {label_key!r} is not a feature; features: {list(data.arrays)}"
        )
    labels = np.asarray(data.arrays[label_key])
    sizes = data.client_sizes
    per_example = int(np.prod(labels.shape[1:], dtype=np.int64))
    client_of_element = np.repeat(np.repeat(np.arange(data.num_clients), sizes), per_example)
    flat = labels.reshape(-1)
    if flat.dtype.kind in "iub":
        flat = flat.astype(np.int64)
        if num_classes is None:
            num_classes = int(flat.max()) + 1 if flat.size else 0
        elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 or None, got {num_classes!r}")
        keep = (flat >= 0) & (flat < num_classes)
        if ignore_label is not None:
            keep &= flat != ignore_label
        label_values = np.arange(num_classes)
        column = flat
    else:
        keep = np.ones(flat.shape, bool) if ignore_label is None else flat != ignore_label
        label_values, column = np.unique(flat, return_inverse=True)
        column = column.reshape(-1)
        num_classes = len(label_values)
    counts = np.bincount(
        client_of_element[keep] * num_classes + column[keep],
        minlength=data.num_clients * num_classes,
    ).reshape(data.num_clients, num_classes)
    classes_per_client = (counts > 0).sum(axis=1)

    def stats(values: np.ndarray) -> dict[str, float]:
        if not values.size:
            return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
        return {
            "min": int(values.min()),
            "median": float(np.median(values)),
            "mean": float(values.mean()),
            "max": int(values.max()),
        }

    return {
        "clients": data.num_clients,
        "examples": data.num_examples,
        "examples_per_client": stats(sizes),
        "client_sizes": sizes,
        "labels": label_values,
        "label_counts": counts.astype(np.int64),
        "classes_per_client": classes_per_client,
        "classes_per_client_summary": stats(classes_per_client),
    }


PARTITIONS = ("iid", "dirichlet", "natural", "shards", "quantity", "classes")
"""The names `split_into_clients` accepts."""


def split_into_clients(
    arrays: Mapping[str, np.ndarray],
    partition: str,
    *,
    num_clients: int,
    alpha: float = 0.5,
    seed: int,
    test_fraction: float = 0.0,
    group_ids: np.ndarray | None = None,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    quantity_distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 2.5,
    label_key: str = "y",
) -> tuple[FederatedData, FederatedData | None]:
    """A centralized dataset split into clients by the partitioner's name.

    ``"iid"`` (`iid_partition`), ``"dirichlet"`` (`dirichlet_partition` with ``alpha``),
    ``"natural"`` (`natural_partition` by ``group_ids``), ``"shards"`` (`shards_partition` with
    ``shards_per_client``), ``"quantity"`` (`quantity_skew_partition` with
    ``quantity_distribution`` ``"lognormal"`` (``sigma``) or ``"powerlaw"`` (``exponent``)) and
    ``"classes"`` (`classes_partition` with ``classes_per_client``). Options a partitioner does
    not use are ignored.

    ``seed`` seeds the partition and, independently, the per-client test split (when
    ``test_fraction > 0``), so changing ``test_fraction`` leaves the partition unchanged.

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
        clients = dirichlet_partition(
            arrays, num_clients, alpha, partition_rng, label_key=label_key
        )
    elif partition == "shards":
        clients = shards_partition(
            arrays, num_clients, shards_per_client, partition_rng, label_key=label_key
        )
    elif partition == "quantity":
        clients = quantity_skew_partition(
            arrays, num_clients, partition_rng, distribution=quantity_distribution,
            sigma=sigma, exponent=exponent,
        )
    elif partition == "classes":
        clients = classes_partition(
            arrays, num_clients, classes_per_client, partition_rng, label_key=label_key
        )
    else:
        raise ValueError(f"partition={partition!r}: expected one of {list(PARTITIONS)}")
    if test_fraction <= 0:
        return clients, None
    return train_test_split_per_client(clients, test_fraction, np.random.default_rng(split_seed))
