"""FederatedData: CSR slicing against dict-of-lists references."""

import math
from fractions import Fraction

import numpy as np
import pytest

from fedjax_sim.data.federated_data import FederatedData, train_test_split_per_client


def reference(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": {"x": rng.normal(size=(n, 2)).astype(np.float32),
                      "y": np.arange(n, dtype=np.int32) + 100 * i} for i, n in enumerate(sizes)}


def test_client_slices_and_subset_match_the_dict_reference():
    clients = reference([3, 0, 5, 2])
    data = FederatedData.from_client_lists(clients)
    assert data.num_clients == 4 and data.num_examples == 10
    np.testing.assert_array_equal(data.client_sizes, [3, 0, 5, 2])
    for i, cid in enumerate(clients):
        for k in ("x", "y"):
            np.testing.assert_array_equal(data.client(i)[k], clients[cid][k])
    sub = data.subset([3, 0])
    assert list(sub.client_ids) == ["c3", "c0"]
    np.testing.assert_array_equal(sub.client(0)["y"], clients["c3"]["y"])
    np.testing.assert_array_equal(sub.client(1)["y"], clients["c0"]["y"])
    assert data.summary() == {"clients": 4, "examples": 10, "min": 0, "median": 2.5,
                              "mean": 2.5, "max": 5}


def test_from_assignment_groups_stably():
    arrays = {"y": np.arange(8)}
    data = FederatedData.from_assignment(arrays, np.array([1, 0, 1, 2, 0, 1, 2, 2]), 3)
    assert [list(data.client(i)["y"]) for i in range(3)] == [[1, 4], [0, 2, 5], [3, 6, 7]]


def test_per_client_split_by_position_and_shuffled():
    data = FederatedData.from_client_lists(reference([10, 1, 4]))
    train, test = train_test_split_per_client(data, 0.3)
    np.testing.assert_array_equal(train.client_sizes, [7, 1, 2])
    np.testing.assert_array_equal(test.client_sizes, [3, 0, 2])
    np.testing.assert_array_equal(train.client(0)["y"], np.arange(7))  # the first part trains
    train2, test2 = train_test_split_per_client(data, 0.3, np.random.default_rng(0))
    both = np.concatenate([train2.client(0)["y"], test2.client(0)["y"]])
    assert sorted(both) == list(range(10)) and not np.array_equal(both, np.arange(10))


@pytest.mark.parametrize("test_fraction", ["0.3", "0.55", "0.8", "0.9"])
def test_per_client_split_sizes_are_exact_floors(test_fraction):
    """floor(n * (1 - f)) in exact rational arithmetic (10 examples at f=0.8 keep 2 for
    training, 90 at f=0.3 keep 63), not in floats where 1 - 0.8 is below 0.2."""
    sizes = np.arange(1, 201)
    data = FederatedData({"y": np.arange(sizes.sum())}, np.concatenate([[0], np.cumsum(sizes)]),
                         np.arange(sizes.size))
    keep = 1 - Fraction(test_fraction)
    expected = [max(1, math.floor(n * keep)) for n in sizes.tolist()]
    train, test = train_test_split_per_client(data, float(test_fraction))
    np.testing.assert_array_equal(train.client_sizes, expected)
    np.testing.assert_array_equal(test.client_sizes, sizes - np.array(expected))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"offsets": [1, 2]}, "start at 0"),
        ({"offsets": [0, 3, 2]}, "non-decreasing"),
        ({"client_ids": ["a"]}, "1 client_ids for 2 clients"),
        ({"arrays": {"x": np.zeros(4)}}, "has 4 examples, offsets say 3"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, message):
    args = {"arrays": {"x": np.zeros(3)}, "offsets": [0, 1, 3], "client_ids": ["a", "b"]}
    with pytest.raises(ValueError, match=message):
        FederatedData(**{**args, **kwargs})
