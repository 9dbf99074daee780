"""Property tests (hypothesis) of every partitioner, against plain-numpy references.

Every partitioner is a permutation of its input (each example in exactly one client, its features
moved together) for arbitrary labels and client counts; each skew does what it promises.
"""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.partition import (
    classes_partition,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    quantity_skew_partition,
    shards_partition,
    split_into_clients,
)

FAST = settings(max_examples=40, deadline=None, database=None)
# Statistical properties hold with overwhelming (not certain) probability: a fixed example
# sequence keeps them from flaking.
STATISTICAL = settings(max_examples=15, deadline=None, database=None, derandomize=True)


def with_ids(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Examples with a unique id, the labels, and a 2-D feature that is a function of the id."""
    ids = np.arange(len(labels))
    return {"id": ids, "x": np.stack([ids * 2.0, -ids], axis=1), "y": labels}


def assert_permutation(data: FederatedData, arrays: dict[str, np.ndarray], num_clients: int):
    """Each input example lands in exactly one client, with all its features."""
    assert data.num_clients == num_clients
    assert data.offsets[0] == 0 and data.offsets[-1] == len(arrays["id"])
    assert np.all(np.diff(data.offsets) >= 0)
    ids = data.arrays["id"]
    np.testing.assert_array_equal(np.sort(ids), arrays["id"])
    for name, value in arrays.items():
        np.testing.assert_array_equal(data.arrays[name], value[ids])


def labels_per_client(data: FederatedData) -> list[set]:
    """The set of labels of each client, one client at a time (the reference loop)."""
    return [set(data.client(i)["y"].tolist()) for i in range(data.num_clients)]


labels_strategy = st.integers(1, 300).flatmap(
    lambda n: st.lists(st.integers(-3, 8), min_size=n, max_size=n).map(np.array)
)


@FAST
@given(labels=labels_strategy, data=st.data())
def test_iid_dirichlet_quantity_shards_are_permutations(labels, data):
    n = len(labels)
    arrays = with_ids(labels)
    num_clients = data.draw(st.integers(1, n), label="num_clients")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    assert_permutation(iid_partition(arrays, num_clients, rng), arrays, num_clients)
    alpha = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 1e3]), label="alpha")
    dirichlet = dirichlet_partition(arrays, num_clients, alpha, rng, min_examples_per_client=0)
    assert_permutation(dirichlet, arrays, num_clients)
    distribution = data.draw(st.sampled_from(["lognormal", "powerlaw"]), label="distribution")
    minimum = data.draw(st.integers(0, n // num_clients), label="min_examples_per_client")
    quantity = quantity_skew_partition(
        arrays, num_clients, rng, distribution=distribution, sigma=2.0, exponent=1.5,
        min_examples_per_client=minimum,
    )
    assert_permutation(quantity, arrays, num_clients)
    assert quantity.client_sizes.min() >= minimum
    shards_per_client = data.draw(st.integers(1, max(1, n // num_clients)), label="k")
    shards = shards_partition(arrays, num_clients, shards_per_client, rng)
    assert_permutation(shards, arrays, num_clients)
    # Every client holds exactly k of the S near-equal shards.
    num_shards = num_clients * shards_per_client
    assert shards.client_sizes.min() >= shards_per_client * (n // num_shards)
    assert shards.client_sizes.max() <= shards_per_client * -(-n // num_shards)


@FAST
@given(labels=labels_strategy, data=st.data())
def test_classes_partition_is_a_permutation_with_exactly_k_labels(labels, data):
    arrays = with_ids(labels)
    values, class_sizes = np.unique(labels, return_counts=True)
    num_classes = len(values)
    k = data.draw(st.integers(1, num_classes), label="classes_per_client")
    # Enough clients to hold every label, few enough that each label has one example per holder.
    low = -(-num_classes // k)
    high = int(class_sizes.min()) * num_classes // k
    assume(low <= high)
    num_clients = data.draw(st.integers(low, high), label="num_clients")
    holders_wanted = num_clients * k
    assume(class_sizes.min() >= -(-holders_wanted // num_classes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    result = classes_partition(arrays, num_clients, k, rng)
    assert_permutation(result, arrays, num_clients)
    sets = labels_per_client(result)
    assert all(len(s) == k for s in sets)
    holders = np.array([sum(v in s for s in sets) for v in values.tolist()])
    assert holders.sum() == num_clients * k
    assert holders.max() - holders.min() <= 1
    # Each label's examples are split near-equally among its holders.
    for value in values.tolist():
        counts = [int(np.sum(result.client(i)["y"] == value)) for i in range(num_clients)]
        held = [c for c in counts if c > 0]
        assert max(held) - min(held) <= 1


@FAST
@given(labels=labels_strategy, data=st.data())
def test_natural_and_split_into_clients_cover_every_example_once(labels, data):
    n = len(labels)
    arrays = with_ids(labels)
    groups = np.array(data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)))
    natural = natural_partition(arrays, groups)
    assert_permutation(natural, arrays, len(np.unique(groups)))
    for i, client_id in enumerate(natural.client_ids.tolist()):
        np.testing.assert_array_equal(natural.client(i)["id"], np.flatnonzero(groups == client_id))
    # Train and test parts of any named partition together hold every example once.
    # (dirichlet's default min_examples_per_client=1 can fail on tiny data: covered above.)
    partition = data.draw(st.sampled_from(["iid", "quantity", "shards"]))
    num_clients = data.draw(st.integers(1, n))
    test_fraction = data.draw(st.sampled_from([0.0, 0.25, 0.5]))
    train, test = split_into_clients(
        arrays, partition, num_clients=num_clients, seed=data.draw(st.integers(0, 99)),
        test_fraction=test_fraction, shards_per_client=1,
    )
    ids = train.arrays["id"] if test is None else np.concatenate(
        [train.arrays["id"], test.arrays["id"]]
    )
    np.testing.assert_array_equal(np.sort(ids), arrays["id"])
    if test is not None:
        assert test.num_clients == train.num_clients == num_clients


def balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def client_label_shares(data: FederatedData, num_classes: int) -> np.ndarray:
    histograms = np.stack(
        [np.bincount(data.client(i)["y"], minlength=num_classes) for i in range(data.num_clients)]
    )
    return histograms / np.maximum(histograms.sum(axis=1, keepdims=True), 1)


@STATISTICAL
@given(
    num_classes=st.integers(2, 10),
    num_clients=st.integers(2, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_huge_alpha_is_close_to_iid(num_classes, num_clients, seed):
    labels = balanced_labels(num_classes, 2000, seed)
    data = dirichlet_partition(with_ids(labels), num_clients, 1e5, np.random.default_rng(seed))
    shares = client_label_shares(data, num_classes)
    # Total variation distance between each client's labels and the global (uniform) ones.
    assert (0.5 * np.abs(shares - 1 / num_classes).sum(axis=1)).max() < 0.02


@STATISTICAL
@given(
    num_classes=st.integers(2, 10),
    num_clients=st.integers(10, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_tiny_alpha_gives_nearly_one_class_per_client(num_classes, num_clients, seed):
    labels = balanced_labels(num_classes, 200, seed)
    data = dirichlet_partition(
        with_ids(labels), num_clients, 1e-6, np.random.default_rng(seed),
        min_examples_per_client=0,
    )
    counts = np.stack(
        [np.bincount(data.client(i)["y"], minlength=num_classes) for i in range(num_clients)]
    )
    # alpha -> 0 sends each class whole to one client: exactly one client holds more than 1% of
    # it. A client therefore holds one class, or a few when several classes land on it (which
    # the sum over owners shows: every class is owned once).
    significant = counts > 0.01 * 200
    np.testing.assert_array_equal(significant.sum(axis=0), np.ones(num_classes))
    assert counts.max(axis=0).min() > 0.99 * 200
    owned = significant.sum(axis=1)
    assert owned.sum() == num_classes
    nonempty = data.client_sizes > 0
    np.testing.assert_array_equal(owned[nonempty] >= 1, True)


@FAST
@given(
    num_clients=st.integers(1, 20),
    shards_per_client=st.integers(1, 4),
    shard_size=st.integers(1, 8),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_give_each_client_at_most_k_labels(
    num_clients, shards_per_client, shard_size, num_classes, seed
):
    num_shards = num_clients * shards_per_client
    assume(num_classes <= num_shards)
    rng = np.random.default_rng(seed)
    # Class sizes are whole numbers of shards (McMahan et al.'s MNIST setting): a composition of
    # num_shards into num_classes positive parts.
    cuts = np.sort(rng.choice(np.arange(1, num_shards), num_classes - 1, replace=False))
    shards_per_class = np.diff(np.concatenate([[0], cuts, [num_shards]]))
    labels = rng.permutation(np.repeat(np.arange(num_classes), shards_per_class * shard_size))
    arrays = with_ids(labels)
    data = shards_partition(arrays, num_clients, shards_per_client, rng)
    assert_permutation(data, arrays, num_clients)
    assert np.all(data.client_sizes == shards_per_client * shard_size)
    for labels_of_client in labels_per_client(data):
        assert len(labels_of_client) <= shards_per_client
    # Each label's examples sit in whole shards: its count in every client is a shard multiple.
    for i in range(num_clients):
        counts = np.bincount(data.client(i)["y"], minlength=num_classes)
        assert np.all(counts % shard_size == 0)


@STATISTICAL
@given(sigma=st.floats(0.3, 1.2), seed=st.integers(0, 2**32 - 1))
def test_lognormal_quantity_skew_has_the_requested_sigma(sigma, seed):
    arrays = {"y": np.zeros(400_000, np.int8)}
    data = quantity_skew_partition(arrays, 1000, np.random.default_rng(seed), sigma=sigma)
    log_sizes = np.log(data.client_sizes)
    # The sample std of 1,000 normal draws is within ~3 standard errors (sigma / sqrt(2000)).
    assert abs(log_sizes.std() - sigma) < 0.1 * sigma


@STATISTICAL
@given(exponent=st.floats(2.2, 5.0), seed=st.integers(0, 2**32 - 1))
def test_powerlaw_quantity_skew_has_the_requested_exponent(exponent, seed):
    arrays = {"y": np.zeros(400_000, np.int8)}
    data = quantity_skew_partition(
        arrays, 2000, np.random.default_rng(seed), distribution="powerlaw", exponent=exponent
    )
    sizes = data.client_sizes.astype(np.float64)
    # Maximum-likelihood (Hill) estimate of a continuous power law's exponent, with x_min the
    # smallest size (Clauset, Shalizi & Newman 2009, eq. 3.1).
    estimate = 1 + len(sizes) / np.log(sizes / sizes.min()).sum()
    assert abs(estimate - exponent) < 0.12 * exponent
