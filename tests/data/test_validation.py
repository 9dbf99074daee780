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


VOCAB, LENGTH = 7, 6
TRAIN_IDS = ["ann", "bob", "cy", "dee"]
TRAIN_SIZES = [3, 5, 2, 4]  # rows 0-2 ann, 3-7 bob, 8-9 cy, 10-13 dee
TEST_SIZES = [2, 0, 3, 1]  # rows 0-1 ann, bob none, 2-4 cy, 5 dee


def token_clients(sizes, seed) -> FederatedData:
    """Clients of int32 token ids ``x`` [n, LENGTH] in [0, VOCAB) and next-token labels ``y``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (sum(sizes), LENGTH)).astype(np.int32)
    return FederatedData({"x": x, "y": x.copy()}, np.concatenate([[0], np.cumsum(sizes)]),
                         TRAIN_IDS)


def token_dataset(**changes) -> FederatedDataset:
    """A next-token dataset whose ``info`` declares ``vocab_size = VOCAB`` (pad id 0)."""
    x = np.random.default_rng(5).integers(0, VOCAB, (4, LENGTH)).astype(np.int32)
    base = FederatedDataset(
        name="tokens",
        train=token_clients(TRAIN_SIZES, seed=3),
        test=token_clients(TEST_SIZES, seed=4),
        central_test={"x": x, "y": x.copy()},
        info={"num_classes": VOCAB, "pad_label": 0, "vocab_size": VOCAB,
              "input_shape": (LENGTH,), "input_dtype": "int32"},
    )
    return dataclasses.replace(base, **changes)


def test_token_ids_in_range_pass_pad_and_last_id_included():
    train = token_dataset().train
    x = train.arrays["x"].copy()
    x[:, -2:] = 0  # padding
    x[0, 0] = VOCAB - 1
    assert validate_dataset(token_dataset(train=with_array(train, "x", x))) is None


def test_a_token_id_equal_to_vocab_size_names_split_client_value_and_range():
    train = token_dataset().train
    x = train.arrays["x"].copy()
    x[9, 4] = VOCAB  # cy's second example (rows 8-9 are cy's)
    raises(token_dataset(train=with_array(train, "x", x)), "dataset 'tokens'", "split 'train'",
           "feature 'x'", "1 token ids are outside [0, 7)", "(values 7)",
           "in 1 of 4 clients (client ids 'cy';", "the first in example 1 of client 'cy'",
           "example 9 of the split",
           "expected ids in [0, info['vocab_size'] = 7)")


def test_negative_token_ids_in_the_test_split_name_the_client_after_an_empty_one():
    test = token_dataset().test
    x = test.arrays["x"].copy()
    x[2, 0] = -1  # cy's first test example (bob has none)
    x[5, 3] = -3  # dee's only one
    message = raises(token_dataset(test=with_array(test, "x", x)), "split 'test'",
                     "feature 'x'", "2 token ids are outside [0, 7)", "(values -3, -1)",
                     "in 2 of 4 clients (client ids 'cy', 'dee';",
                     "the first in example 0 of client 'cy', example 2 of the split",
                     "expected ids in [0, info['vocab_size'] = 7)")
    assert "'bob'" not in message


def test_token_ids_out_of_range_in_many_clients_name_five():
    ids = [f"w{i}" for i in range(8)]
    x = np.ones((16, LENGTH), np.int32)
    x[::2, 0] = [9, 8, 7, 10, 11, 12, 13, 14]  # every client's first example; 8 values
    train = FederatedData({"x": x, "y": x.copy()}, np.arange(0, 17, 2), ids)
    message = raises(token_dataset(train=train, test=None), "8 token ids are outside [0, 7)",
                     "(values 7, 8, 9, 10, 11 and 3 more values)", "in 8 of 8 clients",
                     "'w0', 'w1', 'w2', 'w3', 'w4' and 3 more;",
                     "the first in example 0 of client 'w0', example 0 of the split")
    assert "'w5'" not in message


def test_token_ids_out_of_range_in_the_central_test_set_name_the_example():
    central = dict(token_dataset().central_test)
    central["x"] = central["x"].copy()
    central["x"][2, 1] = 100
    raises(token_dataset(central_test=central), "split 'central_test'", "feature 'x'",
           "1 token ids are outside [0, 7)", "(values 100; the first in example 2)",
           "expected ids in [0, info['vocab_size'] = 7)")


def test_float_inputs_and_inputs_without_a_vocab_size_are_not_read_as_ids():
    train = token_dataset().train
    wide = train.arrays["x"].astype(np.float32) * 100  # e.g. a bag of words' counts
    info = {**token_dataset().info, "input_dtype": "float32"}
    validate_dataset(token_dataset(train=with_array(train, "x", wide), test=None,
                                   central_test=None, info=info))
    x = train.arrays["x"].copy()
    x[0, 0] = 1000
    no_vocab = {k: v for k, v in token_dataset().info.items() if k != "vocab_size"}
    validate_dataset(token_dataset(train=with_array(train, "x", x), info=no_vocab))


@pytest.mark.parametrize("vocab_size", [0, -2, 7.0, True, "7"])
def test_info_vocab_size_must_be_a_positive_int(vocab_size):
    info = {**token_dataset().info, "vocab_size": vocab_size}
    raises(token_dataset(info=info), "dataset 'tokens'",
           f"info['vocab_size'] is {vocab_size!r}", "expected an int >= 1")


def test_real_shakespeare_passes_its_token_ids_checked_in_a_few_milliseconds():
    from fedjax_sim.datasets import load_dataset

    data = load_dataset("shakespeare")
    # The check runs: TFF's character ids [0, 90) (pad 0) as int32 inputs.
    assert data.info["vocab_size"] == 90 and data.train.arrays["x"].dtype == np.int32
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        validate_dataset(data)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.1, seconds  # 2.5 ms measured on 2 cores
    # One id past the vocabulary in a known client's known example is found.
    train = data.train
    client = 7
    row = int(train.offsets[client]) + 1  # its second example
    x = train.arrays["x"].copy()
    x[row, 0] = 90
    raises(dataclasses.replace(data, train=with_array(train, "x", x)), "split 'train'",
           "1 token ids are outside [0, 90)", "(values 90)",
           f"the first in example 1 of client {str(train.client_ids[client])!r}",
           "expected ids in [0, info['vocab_size'] = 90)")


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
