"""Partitioners against independent references: coverage, sizes, label histograms, seeds."""

from collections import defaultdict

import numpy as np
import pytest

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.partition import (
    classes_partition,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition_report,
    quantity_skew_partition,
    shards_partition,
    split_into_clients,
)

NUM_CLASSES = 10


def make_arrays(num_examples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Examples with a unique id, labels, and a feature that is a function of the id."""
    rng = np.random.default_rng(seed)
    ids = np.arange(num_examples)
    return {
        "id": ids,
        "x": np.stack([ids * 2.0, ids * 3.0], axis=1).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
    }


def assert_exact_cover(data: FederatedData, arrays: dict[str, np.ndarray]) -> None:
    """Every example is in exactly one client, with all its features moved together."""
    ids = data.arrays["id"]
    np.testing.assert_array_equal(np.sort(ids), arrays["id"])  # each id exactly once
    for name, value in arrays.items():
        np.testing.assert_array_equal(data.arrays[name], value[ids])
    assert data.offsets[0] == 0 and data.offsets[-1] == len(arrays["id"])


def label_histograms(data: FederatedData) -> np.ndarray:
    """[clients, classes] label counts, one client at a time (a plain loop as reference)."""
    return np.stack(
        [np.bincount(data.client(i)["y"], minlength=NUM_CLASSES) for i in range(data.num_clients)]
    )


# --- IID --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_examples, num_clients", [(1003, 10), (10, 10), (7, 1), (100, 3)])
def test_iid_covers_every_example_once_with_sizes_within_one(num_examples, num_clients):
    arrays = make_arrays(num_examples)
    data = iid_partition(arrays, num_clients, np.random.default_rng(0))
    assert_exact_cover(data, arrays)
    sizes = data.client_sizes
    assert data.num_clients == num_clients and sizes.sum() == num_examples
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(data.client_ids, np.arange(num_clients))


def test_iid_shuffles():
    arrays = make_arrays(1000)
    data = iid_partition(arrays, 10, np.random.default_rng(0))
    assert not np.array_equal(data.arrays["id"], arrays["id"])
    # Each client's label histogram is close to the global one (it is a uniform sample).
    global_share = np.bincount(arrays["y"], minlength=NUM_CLASSES) / 1000
    shares = label_histograms(data) / 100
    assert np.abs(shares - global_share).max() < 0.15


# --- Dirichlet --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 0.5, 1.0, 100.0])
def test_dirichlet_covers_every_example_once(alpha):
    arrays = make_arrays(2000)
    data = dirichlet_partition(
        arrays, 10, alpha, np.random.default_rng(1), min_examples_per_client=0
    )
    assert_exact_cover(data, arrays)
    assert data.num_clients == 10
    np.testing.assert_array_equal(data.client_ids, np.arange(10))


def test_dirichlet_large_alpha_matches_global_histogram():
    arrays = make_arrays(20_000)
    data = dirichlet_partition(arrays, 10, 1e4, np.random.default_rng(0))
    assert_exact_cover(data, arrays)
    global_share = np.bincount(arrays["y"], minlength=NUM_CLASSES) / 20_000
    histograms = label_histograms(data)
    shares = histograms / histograms.sum(axis=1, keepdims=True)
    # Total variation distance to the global label distribution, per client.
    assert (0.5 * np.abs(shares - global_share).sum(axis=1)).max() < 0.02
    # Near-equal client sizes too (each class is split ~1/10 to every client).
    assert np.abs(data.client_sizes / 2000 - 1).max() < 0.05


def test_dirichlet_tiny_alpha_gives_about_one_class_per_client():
    arrays = make_arrays(5000)
    data = dirichlet_partition(
        arrays, 20, 1e-3, np.random.default_rng(0), min_examples_per_client=0
    )
    assert_exact_cover(data, arrays)
    histograms = label_histograms(data)
    # alpha -> 0 sends each class (almost) entirely to one client ...
    class_top_share = histograms.max(axis=0) / histograms.sum(axis=0)
    assert class_top_share.min() > 0.95
    # ... so a client holds one class, or two when two classes land on the same client.
    nonempty = histograms[histograms.sum(axis=1) > 0]
    classes_per_client = (nonempty / nonempty.sum(axis=1, keepdims=True) > 0.01).sum(axis=1)
    assert classes_per_client.max() <= 2 and classes_per_client.mean() < 1.5


def test_dirichlet_resamples_until_min_examples():
    arrays = make_arrays(1000)
    # A single Dir(1) draw leaves some client below 25 examples about 40% of the time.
    data = dirichlet_partition(
        arrays, 20, 1.0, np.random.default_rng(0), min_examples_per_client=25
    )
    assert_exact_cover(data, arrays)
    assert data.client_sizes.min() >= 25
    for seed in range(10):
        sizes = dirichlet_partition(
            arrays, 20, 1.0, np.random.default_rng(seed), min_examples_per_client=25
        ).client_sizes
        assert sizes.min() >= 25


def test_dirichlet_gives_up_with_a_clear_error():
    arrays = make_arrays(1000)
    with pytest.raises(ValueError, match=r"max_tries=3.*min_examples_per_client=20"):
        dirichlet_partition(
            arrays, 50, 1e-3, np.random.default_rng(0), min_examples_per_client=20, max_tries=3
        )


def test_dirichlet_string_labels():
    arrays = make_arrays(500)
    arrays["label"] = np.array(["cat", "dog", "eel"])[arrays["y"] % 3]
    data = dirichlet_partition(arrays, 5, 0.5, np.random.default_rng(0), label_key="label")
    assert_exact_cover(data, arrays)


# --- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partition",
    [
        lambda arrays, rng: iid_partition(arrays, 10, rng),
        lambda arrays, rng: dirichlet_partition(arrays, 10, 0.5, rng),
        lambda arrays, rng: shards_partition(arrays, 10, 2, rng),
        lambda arrays, rng: quantity_skew_partition(arrays, 10, rng),
        lambda arrays, rng: quantity_skew_partition(arrays, 10, rng, distribution="powerlaw"),
        lambda arrays, rng: classes_partition(arrays, 10, 3, rng),
    ],
    ids=["iid", "dirichlet", "shards", "lognormal", "powerlaw", "classes"],
)
def test_same_seed_same_partition_different_seed_different(partition):
    arrays = make_arrays(1000)
    first = partition(arrays, np.random.default_rng(42))
    again = partition(arrays, np.random.default_rng(42))
    other = partition(arrays, np.random.default_rng(43))
    np.testing.assert_array_equal(first.offsets, again.offsets)
    for name in arrays:
        np.testing.assert_array_equal(first.arrays[name], again.arrays[name])
    assert not np.array_equal(first.arrays["id"], other.arrays["id"])


# --- natural ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int", "str"])
def test_natural_partition_matches_dict_of_lists(kind):
    arrays = make_arrays(500)
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 37, 500) * 7 - 50  # sparse, partly negative ids
    if kind == "str":
        groups = np.array([f"writer_{g}" for g in groups])
    reference = defaultdict(list)
    for example_id, group in zip(arrays["id"].tolist(), groups.tolist(), strict=True):
        reference[group].append(example_id)

    data = natural_partition(arrays, groups)
    assert_exact_cover(data, arrays)
    assert data.client_ids.tolist() == sorted(reference)
    for i, client_id in enumerate(data.client_ids.tolist()):
        assert data.client(i)["id"].tolist() == reference[client_id]


# --- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a, r: iid_partition(a, 0, r), r"num_clients .*got 0"),
        (lambda a, r: iid_partition(a, 101, r), r"num_clients .*100.*got 101"),
        (lambda a, r: iid_partition(a, 2.5, r), r"num_clients must be an int, got 2.5"),
        (lambda a, r: dirichlet_partition(a, 0, 0.5, r), r"num_clients .*got 0"),
        (lambda a, r: dirichlet_partition(a, 10, 0.0, r), r"alpha must be .*> 0, got 0.0"),
        (lambda a, r: dirichlet_partition(a, 10, -1, r), r"alpha must be .*got -1"),
        (lambda a, r: dirichlet_partition(a, 10, float("nan"), r), r"alpha .*nan"),
        (lambda a, r: dirichlet_partition(a, 10, 1.0, r, label_key="z"), r"label_key 'z'"),
        (
            lambda a, r: dirichlet_partition(a, 10, 1.0, r, min_examples_per_client=11),
            r"min_examples_per_client=11 x num_clients=10 exceeds the 100 examples",
        ),
        (
            lambda a, r: dirichlet_partition(a, 10, 1.0, r, min_examples_per_client=-1),
            r"min_examples_per_client must be an int >= 0, got -1",
        ),
        (lambda a, r: dirichlet_partition(a, 10, 1.0, r, label_key="x"), r"\[N\] labels"),
        (lambda a, r: natural_partition(a, np.zeros(99)), r"group_ids must be \[N\] = \[100\]"),
        (
            lambda a, r: iid_partition({**a, "bad": np.zeros(3)}, 2, r),
            r"same leading .*'bad': 3",
        ),
        (lambda a, r: iid_partition({}, 2, r), r"non-empty dict"),
        (lambda a, r: shards_partition(a, 0, 2, r), r"num_clients must be an int >= 1, got 0"),
        (lambda a, r: shards_partition(a, 10, 0, r), r"shards_per_client .*got 0"),
        (lambda a, r: shards_partition(a, 10, 2.0, r), r"shards_per_client .*got 2.0"),
        (
            lambda a, r: shards_partition(a, 60, 2, r),
            r"num_clients=60 x shards_per_client=2 = 120 shards exceeds the 100 examples",
        ),
        (lambda a, r: shards_partition(a, 10, 2, r, label_key="z"), r"label_key 'z'"),
        (lambda a, r: shards_partition(a, 10, 2, r, label_key="x"), r"\[N\] labels"),
        (lambda a, r: quantity_skew_partition(a, 101, r), r"num_clients .*100.*got 101"),
        (
            lambda a, r: quantity_skew_partition(a, 10, r, distribution="zipf"),
            r"distribution='zipf': expected one of \['lognormal', 'powerlaw'\]",
        ),
        (lambda a, r: quantity_skew_partition(a, 10, r, sigma=0), r"sigma must be .*> 0, got 0"),
        (
            lambda a, r: quantity_skew_partition(a, 10, r, distribution="powerlaw", exponent=1),
            r"exponent must be a finite number > 1, got 1",
        ),
        (
            lambda a, r: quantity_skew_partition(a, 10, r, min_examples_per_client=11),
            r"min_examples_per_client=11 x num_clients=10 exceeds the 100 examples",
        ),
        (lambda a, r: classes_partition(a, 10, 0, r), r"classes_per_client .*got 0"),
        (
            lambda a, r: classes_partition(a, 10, 11, r),
            r"classes_per_client=11 exceeds the 10 distinct labels",
        ),
        (
            lambda a, r: classes_partition(a, 4, 2, r),
            r"num_clients=4 x classes_per_client=2 is fewer than the 10 labels",
        ),
        (
            lambda a, r: classes_partition(a, 100, 10, r),
            r"label .* has \d+ examples but is dealt to 100 clients",
        ),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_arrays(100), np.random.default_rng(0))


# --- shards, quantity skew, k classes -----------------------------------------------------------


def test_shards_reproduce_mcmahan_pathological_mnist_split():
    # McMahan et al. 2017: 60,000 examples, 200 shards of 300, 2 shards for each of 100 clients.
    labels = np.repeat(np.arange(10), 6000)
    arrays = {"id": np.arange(60_000), "y": np.random.default_rng(0).permutation(labels)}
    data = shards_partition(arrays, 100, 2, np.random.default_rng(0))
    assert np.all(data.client_sizes == 600)
    counts = np.stack([np.bincount(data.client(i)["y"], minlength=10) for i in range(100)])
    assert set(np.unique(counts).tolist()) <= {0, 300, 600}  # whole shards of one label
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert (counts > 0).sum(axis=1).mean() > 1.5  # mostly two different labels


def test_shards_and_classes_take_string_labels():
    arrays = make_arrays(600)
    arrays["label"] = np.array(["cat", "dog", "eel"])[arrays["y"] % 3]
    shards = shards_partition(arrays, 6, 1, np.random.default_rng(0), label_key="label")
    assert_exact_cover(shards, arrays)
    classes = classes_partition(arrays, 6, 2, np.random.default_rng(0), label_key="label")
    assert_exact_cover(classes, arrays)
    assert all(len(set(classes.client(i)["label"])) == 2 for i in range(6))


def test_quantity_skew_keeps_the_global_label_mix():
    arrays = make_arrays(50_000)
    data = quantity_skew_partition(arrays, 20, np.random.default_rng(0), sigma=1.0)
    assert_exact_cover(data, arrays)
    assert data.client_sizes.max() > 3 * data.client_sizes.min()  # skewed sizes ...
    global_share = np.bincount(arrays["y"], minlength=NUM_CLASSES) / 50_000
    big = data.client_sizes >= 1000
    shares = label_histograms(data)[big] / data.client_sizes[big, None]
    assert np.abs(shares - global_share).max() < 0.06  # ... IID labels


# --- partition_report ---------------------------------------------------------------------------


def test_partition_report_matches_a_loop():
    arrays = make_arrays(3000)
    data = dirichlet_partition(arrays, 17, 0.3, np.random.default_rng(0))
    report = partition_report(data, num_classes=12)
    sizes = [len(data.client(i)["y"]) for i in range(17)]
    counts = np.zeros((17, 12), np.int64)
    for i in range(17):
        for label in data.client(i)["y"].tolist():
            counts[i, label] += 1
    assert report["clients"] == 17 and report["examples"] == 3000
    assert report["examples_per_client"] == {
        "min": min(sizes), "median": float(np.median(sizes)), "mean": 3000 / 17,
        "max": max(sizes),
    }
    np.testing.assert_array_equal(report["label_counts"], counts)
    np.testing.assert_array_equal(report["labels"], np.arange(12))
    np.testing.assert_array_equal(report["classes_per_client"], (counts > 0).sum(axis=1))
    assert report["classes_per_client_summary"]["max"] == int((counts > 0).sum(axis=1).max())


def test_partition_report_sequences_padding_and_strings():
    y = np.array([[1, 2, 0], [1, 1, 0], [3, 0, 0]])  # next-token targets, 0 = padding
    data = FederatedData({"y": y}, [0, 2, 3], ["a", "b"])
    report = partition_report(data, ignore_label=0)
    np.testing.assert_array_equal(report["label_counts"], [[0, 3, 1, 0], [0, 0, 0, 1]])
    words = FederatedData({"y": np.array(["dog", "cat", "dog"])}, [0, 1, 3], [0, 1])
    report = partition_report(words)
    assert report["labels"].tolist() == ["cat", "dog"]
    np.testing.assert_array_equal(report["label_counts"], [[0, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"label_key 'label' is not a feature"):
        partition_report(words, label_key="label")


# --- split_into_clients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partition, options, reference",
    [
        ("shards", {"shards_per_client": 3}, lambda a, r: shards_partition(a, 10, 3, r)),
        ("classes", {"classes_per_client": 4}, lambda a, r: classes_partition(a, 10, 4, r)),
        (
            "quantity", {"quantity_distribution": "powerlaw", "exponent": 3.0},
            lambda a, r: quantity_skew_partition(a, 10, r, distribution="powerlaw", exponent=3.0),
        ),
        ("quantity", {"sigma": 0.7}, lambda a, r: quantity_skew_partition(a, 10, r, sigma=0.7)),
    ],
)
def test_split_into_clients_by_name(partition, options, reference):
    arrays = make_arrays(1000)
    train, test = split_into_clients(arrays, partition, num_clients=10, seed=5, **options)
    assert test is None
    # The same partitioner with the partition half of the seed's spawned streams.
    rng = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[0])
    expected = reference(arrays, rng)
    np.testing.assert_array_equal(train.offsets, expected.offsets)
    np.testing.assert_array_equal(train.arrays["id"], expected.arrays["id"])
    train, test = split_into_clients(
        arrays, partition, num_clients=10, seed=5, test_fraction=0.2, **options
    )
    assert_exact_cover(
        FederatedData(
            {k: np.concatenate([train.arrays[k], test.arrays[k]]) for k in arrays},
            [0, 1000], [0],
        ),
        arrays,
    )


def test_split_into_clients_names_the_bad_partition():
    with pytest.raises(ValueError, match=r"partition='shard': expected one of \['iid', "):
        split_into_clients(make_arrays(10), "shard", num_clients=2, alpha=0.5, seed=0)
