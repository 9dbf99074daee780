"""`validate_dataset`: every defect of a small synthetic dataset gets one sentence naming it.

The expected counts, values and client ids are known by construction (each test plants its
defect), so the messages are checked against the planted truth; the real Shakespeare and
Fashion-MNIST datasets must pass (and Fashion-MNIST quickly).
"""

import dataclasses
import time

import numpy as np
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.data.validation import validate_dataset

FEATURES, CLASSES = 4, 3


def clients(sizes, seed=0, features=FEATURES, ids=None) -> FederatedData:
    """Clients of Gaussian ``x`` [n, features] float32 and labels ``y`` [n] in [0, CLASSES)."""
    rng = np.random.default_rng(seed)
    total = int(sum(sizes))
    arrays = {
        "x": rng.normal(size=(total, features)).astype(np.float32),
        "y": rng.integers(0, CLASSES, total).astype(np.int32),
    }
    ids = np.arange(len(sizes)) if ids is None else np.asarray(ids)
    return FederatedData(arrays, np.concatenate([[0], np.cumsum(sizes)]), ids)


def dataset(**changes) -> FederatedDataset:
    """5 train clients, their test splits (one empty: allowed) and a central test set."""
    rng = np.random.default_rng(1)
    base = FederatedDataset(
        name="tiny",
        train=clients([5, 17, 40, 3, 11]),
        test=clients([2, 3, 4, 1, 0], seed=2),
        central_test={
            "x": rng.normal(size=(9, FEATURES)).astype(np.float32),
            "y": rng.integers(0, CLASSES, 9).astype(np.int32),
        },
        info={"num_classes": CLASSES, "pad_label": None, "input_shape": (FEATURES,),
              "input_dtype": "float32"},
    )
    return dataclasses.replace(base, **changes)


def with_array(data: FederatedData, name: str, array) -> FederatedData:
    return dataclasses.replace(data, arrays={**data.arrays, name: array})


def raises(data: FederatedDataset, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        validate_dataset(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_valid_dataset_passes():
    assert validate_dataset(dataset()) is None
    assert validate_dataset(dataset(test=None, central_test=None)) is None


def test_no_training_clients():
    empty = FederatedData({"x": np.zeros((0, FEATURES), np.float32), "y": np.zeros(0, int)},
                          [0], np.zeros(0, int))
    raises(dataset(train=empty, test=None), "dataset 'tiny'", "no training clients",
           "expected at least one")


def test_no_training_examples():
    raises(dataset(train=clients([0, 0, 0]), test=None), "dataset 'tiny'",
           "3 training clients hold no examples", "expected at least one training example")


def test_empty_clients_are_named_up_to_five():
    sizes = [4, 0, 6, 0, 0, 2, 0, 0, 0, 0, 3]
    ids = [f"c{i}" for i in range(len(sizes))]
    empty = [ids[i] for i, n in enumerate(sizes) if n == 0]  # 7 of them
    message = raises(dataset(train=clients(sizes, ids=ids), test=None),
                     "7 of 11 training clients have no examples", "and 2 more", "drop them")
    assert all(repr(i) in message for i in empty[:5])
    assert not any(repr(i) in message for i in empty[5:])


def test_labels_out_of_range_name_split_values_and_range():
    train = dataset().train
    y = train.arrays["y"].copy()
    y[[3, 10, 11]] = [5, 3, 5]
    raises(dataset(train=with_array(train, "y", y)), "split 'train'", "feature 'y'",
           "3 labels are outside [0, 3)", "values 3, 5", "expected class ids")


def test_negative_labels_in_the_central_test_set():
    central = dict(dataset().central_test)
    central["y"] = np.array([0, 1, -1, 2, 0, 0, -4, 1, 1], np.int32)
    raises(dataset(central_test=central), "split 'central_test'", "2 labels", "values -4, -1")


def test_the_pad_label_is_allowed_and_nothing_else():
    test = dataset().test
    y = test.arrays["y"].copy()
    y[:3] = -1
    padded = {**dataset().info, "pad_label": -1}
    validate_dataset(dataset(test=with_array(test, "y", y), info=padded))
    y[5] = -2
    raises(dataset(test=with_array(test, "y", y), info=padded), "split 'test'", "values -2",
           "or the pad label -1")


def test_float_labels_are_refused():
    train = dataset().train
    raises(dataset(train=with_array(train, "y", train.arrays["y"].astype(np.float32))),
           "split 'train'", "feature 'y'", "dtype float32", "integer class ids")


@pytest.mark.parametrize("split", ["train", "test", "central_test"])
def test_non_finite_features_name_split_feature_and_count(split):
    data = dataset()
    arrays = dict(getattr(data, split).arrays if split != "central_test" else data.central_test)
    x = arrays["x"].copy()
    x[1, 2], x[1, 3], x[2, 0] = np.nan, np.inf, -np.inf
    if split == "central_test":
        data = dataset(central_test={**arrays, "x": x})
    else:
        data = dataset(**{split: with_array(getattr(data, split), "x", x)})
    raises(data, f"split {split!r}", "feature 'x'", "3 non-finite values (1 NaN, 2 inf",
           "first in example 1")


def test_any_float_feature_is_checked_and_integer_features_are_not():
    train = dataset().train
    weights = np.ones(train.num_examples, np.float64)
    weights[-1] = np.nan
    raises(dataset(train=with_array(train, "weight", weights)), "feature 'weight'",
           "1 non-finite")
    ids = np.full(train.num_examples, np.iinfo(np.int64).max)
    validate_dataset(dataset(train=with_array(train, "token", ids)))


def test_input_shape_must_match_info():
    raises(dataset(info={**dataset().info, "input_shape": (2, 2)}), "split 'train'",
           "feature 'x'", "shape (4,)", "expected info['input_shape'] = (2, 2)")
    central = {"x": np.zeros((3, 5), np.float32), "y": np.zeros(3, np.int32)}
    raises(dataset(central_test=central), "split 'central_test'", "shape (5,)")


@pytest.mark.parametrize("feature", ["x", "y"])
def test_missing_feature(feature):
    central = {k: v for k, v in dataset().central_test.items() if k != feature}
    raises(dataset(central_test=central), "split 'central_test'", f"no feature {feature!r}",
           "expected 'x' (the inputs) and 'y' (the labels)")
    train = dataset().train
    arrays = {k: v for k, v in train.arrays.items() if k != feature}
    raises(dataset(train=dataclasses.replace(train, arrays=arrays)), "split 'train'",
           f"no feature {feature!r}")


def test_central_test_features_of_different_lengths():
    central = {**dataset().central_test, "y": np.zeros(4, np.int32)}
    raises(dataset(central_test=central), "split 'central_test'", "'x': 9", "'y': 4")


def test_test_split_must_list_the_training_clients():
    raises(dataset(test=clients([1, 1])), "per-client test split has 2 clients",
           "train split 5")


def test_info_must_have_num_classes_and_input_shape():
    info = {k: v for k, v in dataset().info.items() if k != "num_classes"}
    raises(dataset(info=info), "info has no 'num_classes'")
    raises(dataset(info={**dataset().info, "num_classes": 0}), "info['num_classes'] is 0")


def test_real_shakespeare_passes():
    from fedjax_sim.datasets import load_dataset

    validate_dataset(load_dataset("shakespeare"))


@needs_shared_data(*FASHION_MNIST_FILES)
def test_real_fashion_mnist_passes_in_under_a_fifth_of_a_second():
    from fedjax_sim.datasets import load_dataset

    data = load_dataset("fashion_mnist", data_dir=str(SHARED_DATA), test_fraction=0.1)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        validate_dataset(data)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.2, seconds
