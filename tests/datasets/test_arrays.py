"""The "bring your own arrays" dataset: an .npz written here comes back partitioned, intact.

Every example carries its own index in ``x[:, 0]``, so the test can check against what it wrote
that each partition holds every example exactly once, with its own label and client.
"""

import json

import numpy as np
import pytest

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import PartitionOptions, load_dataset
from fedjax_sim.datasets import arrays as arrays_lib

N, FEATURES, CLASSES = 120, 3, 4


def load_arrays(**options):
    """The ``arrays`` loader with flat options, as configs and `load_dataset` give them."""
    return load_dataset("arrays", **options)


def examples(n=N, seed=0):
    """``x`` [n, FEATURES] float32 whose column 0 is the example index; ``y``; string ids."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[:, 0] = np.arange(n)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    client_id = rng.choice(np.array(["ann", "bob", "cy", "dee", "eve"]), n)
    return x, y, client_id


def write(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def rows_of(data):
    """Example index -> (client position, label), from the flat arrays and offsets."""
    index = data.arrays["x"][:, 0].astype(int)
    client = np.repeat(np.arange(data.num_clients), data.client_sizes)
    return index, client, data.arrays["y"]


def assert_each_example_once(data, x, y):
    index, _, labels = rows_of(data)
    assert sorted(index.tolist()) == list(range(len(x)))
    np.testing.assert_array_equal(data.arrays["x"], x[index])
    np.testing.assert_array_equal(labels, y[index])


def test_natural_partition_round_trip(tmp_path):
    x, y, client_id = examples()
    dataset = load_arrays(path=str(write(tmp_path, x=x, y=y, client_id=client_id)))
    train = dataset.train
    assert dataset.name == "arrays" and dataset.test is None and dataset.central_test is None
    assert train.client_ids.tolist() == ["ann", "bob", "cy", "dee", "eve"]
    assert_each_example_once(train, x, y)
    for position, name in enumerate(train.client_ids):  # reference: a loop over the ids
        expected = np.flatnonzero(client_id == name)  # in file order
        np.testing.assert_array_equal(train.client(position)["x"][:, 0], expected)
    assert dataset.info == {"num_classes": CLASSES, "pad_label": None,
                            "input_shape": (FEATURES,), "input_dtype": "float32"}
    validate_dataset(dataset)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_iid_and_dirichlet_cover_every_example_once(tmp_path, partition):
    x, y, _ = examples()
    path = write(tmp_path, x=x, y=y)
    dataset = load_arrays(path=path, partition=partition, num_clients=7, alpha=0.3, seed=3)
    assert dataset.train.num_clients == 7 and dataset.train.client_sizes.min() >= 1
    assert_each_example_once(dataset.train, x, y)
    # The loader itself, given the options object, splits exactly as the flat options do.
    again = arrays_lib.load_arrays(
        path=path, partition=PartitionOptions(partition, num_clients=7, alpha=0.3, seed=3))
    np.testing.assert_array_equal(again.train.arrays["x"], dataset.train.arrays["x"])
    if partition == "iid":
        assert sorted(dataset.train.client_sizes.tolist()) == [17] * 6 + [18]


def test_central_test_set_and_per_client_test_split(tmp_path):
    x, y, client_id = examples()
    x_test, y_test, _ = examples(30, seed=1)
    y_test[0] = CLASSES + 2  # the default num_classes counts test labels too
    path = write(tmp_path, x=x, y=y, client_id=client_id, x_test=x_test, y_test=y_test)
    dataset = load_arrays(path=path, test_fraction=0.25)
    np.testing.assert_array_equal(dataset.central_test["x"], x_test)
    np.testing.assert_array_equal(dataset.central_test["y"], y_test)
    assert dataset.info["num_classes"] == CLASSES + 3
    train_index, train_client, _ = rows_of(dataset.train)
    test_index, test_client, _ = rows_of(dataset.test)
    both = np.concatenate([train_index, test_index])
    assert sorted(both.tolist()) == list(range(N))  # train and test split each client's rows
    names = dataset.train.client_ids
    np.testing.assert_array_equal(names[train_client], client_id[train_index])
    np.testing.assert_array_equal(names[test_client], client_id[test_index])
    assert dataset.test.num_examples == sum(
        n - max(1, int(np.floor(n * 0.75))) for n in dataset.train.client_sizes
        + dataset.test.client_sizes
    )
    validate_dataset(dataset)


def test_integer_inputs_and_explicit_num_classes(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, (40, 6)).astype(np.int32)
    labels = np.arange(40) % 3
    dataset = load_dataset("arrays", path=str(write(tmp_path, x=tokens, y=labels)),
                           partition="iid", num_clients=4, num_classes=10)
    assert dataset.info["input_dtype"] == "int32" and dataset.info["input_shape"] == (6,)
    assert dataset.info["num_classes"] == 10
    assert dataset.train.arrays["x"].dtype == np.int32


def test_vocab_size_declares_token_ids_that_validation_checks(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 5, (40, 6)).astype(np.int32)
    labels = np.arange(40) % 3
    client_id = np.repeat(np.array(["ann", "bob", "cy", "dee"]), 10)
    dataset = load_arrays(path=str(write(tmp_path, x=tokens, y=labels, client_id=client_id)),
                          vocab_size=5)
    assert dataset.info["vocab_size"] == 5
    validate_dataset(dataset)
    tokens[20:30, 2] = 5  # every example of cy: its training examples hold them
    bad = load_arrays(path=str(write(tmp_path, "bad.npz", x=tokens, y=labels,
                                     client_id=client_id)), vocab_size=5)
    with pytest.raises(DataError) as info:
        validate_dataset(bad)
    message = str(info.value)
    for fragment in ("dataset 'arrays'", "split 'train'", "feature 'x'",
                     "token ids are outside [0, 5) (values 5) in 1 of 4 clients (client ids 'cy';",
                     "expected ids in [0, info['vocab_size'] = 5)"):
        assert fragment in message, message


def test_vocab_size_with_float_inputs_is_refused(tmp_path):
    x, y, client_id = examples()
    with pytest.raises(DataError, match=r"data\.npz: key 'x' has dtype float32, but "
                                        r"vocab_size=10 declares token ids"):
        load_arrays(path=str(write(tmp_path, x=x, y=y, client_id=client_id)), vocab_size=10)


def test_a_tiny_run_through_the_loop(tmp_path):
    from fedjax_sim.simulation.loop import run

    x, y, client_id = examples()
    path = write(tmp_path, x=x, y=y, client_id=client_id, x_test=x[:20], y_test=y[:20])
    config = {"name": "arrays_tiny", "rounds": 2, "dataset": {"name": "arrays", "path": str(path)},
              "model": {"name": "logistic"}, "cohort": {"size": 2},
              "client": {"local_steps": 2, "batch_size": 4}, "eval": {"every": 2},
              "log": {"progress": False, "every": 1, "plot": False}}
    result = run(config, workdir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and 0.0 <= result.summary["final"]["test/accuracy"] <= 1.0


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.npz.*does not exist.*'x' and 'y'"):
        load_arrays(path=str(tmp_path / "nothere.npz"))
    with pytest.raises(DataError, match="is a folder"):
        load_arrays(path=str(tmp_path))


@pytest.mark.parametrize("key", ["x", "y", "client_id"])
def test_missing_key_names_file_key_and_keys_present(tmp_path, key):
    x, y, client_id = examples()
    arrays = {"x": x, "y": y, "client_id": client_id}
    del arrays[key]
    path = write(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_arrays(path=path)
    message = str(info.value)
    assert str(path) in message and f"no key {key!r}" in message
    assert f"keys present: {sorted(arrays)}" in message


def test_client_id_is_only_needed_for_the_natural_partition(tmp_path):
    x, y, _ = examples()
    load_arrays(path=write(tmp_path, x=x, y=y), partition="iid")


@pytest.mark.parametrize("key", ["x", "y", "client_id"])
def test_object_arrays_are_refused_never_unpickled(tmp_path, key):
    x, y, client_id = examples(4)
    arrays = {"x": x, "y": y, "client_id": client_id}
    arrays[key] = np.array([{"a": 1}, None, 3, "s"], dtype=object)
    path = write(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_arrays(path=path)
    assert str(path) in str(info.value) and f"key {key!r} is an object (pickled) array" in str(
        info.value
    )


def test_files_that_are_not_npz(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(3))
    with pytest.raises(DataError, match=r"one\.npy: a single \.npy array"):
        load_arrays(path=tmp_path / "one.npy")
    (tmp_path / "pickle.npz").write_bytes(b"\x80\x04\x95...")
    with pytest.raises(DataError, match="a pickle, which is never loaded"):
        load_arrays(path=tmp_path / "pickle.npz")
    (tmp_path / "text.npz").write_text("x,y\n")
    with pytest.raises(DataError, match="not an .npz archive"):
        load_arrays(path=tmp_path / "text.npz")
    raw = write(tmp_path, x=np.zeros((5, 2)), y=np.zeros(5, int)).read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.npz"):
        load_arrays(path=tmp_path / "cut.npz", partition="iid", num_clients=2)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "hold no examples"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, int)}, "'x' (5, 2) and 'y' (4,) do not match"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5)}, "'y' has dtype float64, expected integer"),
        ({"x": np.array(list("abcde")), "y": np.zeros(5, int)}, "expected a numeric array"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5, int), "x_test": np.zeros((2, 2))},
         "has key 'x_test' but no 'y_test'"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5, int), "x_test": np.zeros((2, 3)),
          "y_test": np.zeros(2, int)}, "'x_test' has examples of shape (3,)"),
    ],
)
def test_arrays_that_do_not_fit_together(tmp_path, arrays, message):
    path = write(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_arrays(path=path, partition="iid", num_clients=2)
    assert str(path) in str(info.value) and message in str(info.value)


def test_client_ids_must_be_one_per_example(tmp_path):
    path = write(tmp_path, x=np.zeros((5, 2)), y=np.zeros(5, int), client_id=np.zeros(4, int))
    with pytest.raises(DataError, match=r"'client_id' is int64 \(4,\), expected .* \(5,\)"):
        load_arrays(path=path)


def test_dirichlet_needs_one_label_per_example(tmp_path):
    path = write(tmp_path, x=np.zeros((5, 2)), y=np.zeros((5, 2), int))
    with pytest.raises(DataError, match="partition='dirichlet' .* shape \\[N\\]"):
        load_arrays(path=path, partition="dirichlet", num_clients=2)


@pytest.mark.parametrize(
    "options, option",
    [
        ({"partition": "random"}, "partition"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2.5}, "num_clients"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"seed": -1}, "seed"),
        ({"num_classes": 0}, "num_classes"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"path": ""}, "path"),
    ],
)
def test_bad_option_values_name_the_option(tmp_path, options, option):
    x, y, client_id = examples()
    path = write(tmp_path, x=x, y=y, client_id=client_id)
    with pytest.raises(ValueError, match=f"^{option} must") as info:
        load_arrays(**{"path": str(path), **options})
    assert not isinstance(info.value, DataError)
