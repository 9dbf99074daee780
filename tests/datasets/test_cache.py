"""The flat memory-mapped cache: bitwise round trips, memmaps, atomic writes, staleness."""

import json

import numpy as np
import pytest

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.datasets import cache as cache_lib
from fedjax_sim.datasets import convert_dataset


def small_dataset():
    rng = np.random.default_rng(0)
    sizes = [3, 0, 5, 1]
    n = sum(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    train = FederatedData(
        {"x": rng.normal(size=(n, 4, 2)).astype(np.float32),
         "y": rng.integers(0, 7, n).astype(np.int32),
         "tokens": rng.integers(0, 2**40, (n, 3)).astype(np.int64)},
        offsets, np.array(["a", "bb", "c:ROLE", "d"], dtype=object))
    test = FederatedData({"x": np.full((2, 4, 2), np.nan, np.float32),
                          "y": np.array([1, 2], np.int32),
                          "tokens": np.zeros((2, 3), np.int64)},
                         [0, 0, 2, 2, 2], np.array(["a", "bb", "c:ROLE", "d"]))
    central = {"x": rng.normal(size=(6, 4, 2)).astype(np.float32),
               "y": np.arange(6, dtype=np.uint8)}
    info = {"num_classes": 7, "input_shape": (4, 2), "pad_label": None, "names": ["p", "q"],
            "count": np.int64(3)}
    return FederatedDataset("toy", train, test, central, info)


def test_round_trip_is_bitwise_and_memory_mapped(tmp_path):
    dataset = small_dataset()
    path = cache_lib.write_cache(dataset, tmp_path / "toy")
    opened = cache_lib.open_cache(path)
    assert opened.name == "toy"
    for split in ("train", "test"):
        before, after = getattr(dataset, split), getattr(opened, split)
        assert set(after.arrays) == set(before.arrays)
        for name, array in before.arrays.items():
            assert isinstance(after.arrays[name], np.memmap)
            assert after.arrays[name].dtype == array.dtype
            assert after.arrays[name].tobytes() == array.tobytes()  # NaNs included
        np.testing.assert_array_equal(after.offsets, before.offsets)
        assert after.client_ids.tolist() == [str(c) for c in before.client_ids]
        assert after.client_ids.dtype.kind == "U"  # never a pickled object array
    for name, array in dataset.central_test.items():
        assert isinstance(opened.central_test[name], np.memmap)
        assert opened.central_test[name].tobytes() == array.tobytes()
    assert opened.info["input_shape"] == (4, 2) and opened.info["count"] == 3
    assert opened.info["names"] == ["p", "q"] and opened.info["cache"] == str(path)
    with pytest.raises(ValueError):  # read-only maps
        opened.train.arrays["y"][0] = 1
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == cache_lib.FORMAT_VERSION
    assert meta["splits"]["train"]["features"]["x"] == {"dtype": "<f4", "shape": [4, 2]}


def test_integer_client_ids_and_no_test_split(tmp_path):
    data = FederatedData({"x": np.arange(6.0).reshape(3, 2), "y": np.zeros(3, np.int64)},
                         [0, 1, 3], np.array([10, 20]))
    opened = cache_lib.open_cache(cache_lib.write_cache(FederatedDataset("ints", data),
                                                        tmp_path / "c"))
    assert opened.test is None and opened.central_test is None
    assert opened.train.client_ids.tolist() == [10, 20]
    assert opened.train.client(1)["x"].tolist() == [[2.0, 3.0], [4.0, 5.0]]


def test_writes_are_atomic_and_replace_an_old_cache(tmp_path):
    path = tmp_path / "toy"
    cache_lib.write_cache(small_dataset(), path)

    def failing_build(allocate):
        allocate("train", "x", (10, 3), np.float32)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache_lib.cached_load(path, {"v": 2}, failing_build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary folder left
    assert cache_lib.open_cache(path).train.num_examples == 9  # the old cache is intact

    def build(allocate):
        x = allocate("train", "x", (2, 3), np.float32)
        x[:] = 7.0
        return FederatedDataset("new", FederatedData({"x": x, "y": np.zeros(2, np.int32)},
                                                     [0, 2], ["only"]))

    opened = cache_lib.cached_load(path, {"v": 2}, build)
    assert opened.name == "new" and opened.train.arrays["x"].tolist() == [[7.0] * 3] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    # Same source: opened, build never called.
    assert cache_lib.cached_load(path, {"v": 2}, failing_build).name == "new"


def test_not_a_cache_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"not a fedjax_sim dataset cache"):
        cache_lib.open_cache(tmp_path)
    path = cache_lib.write_cache(small_dataset(), tmp_path / "toy")
    (path / "train" / "y.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"y\.npy: cannot open the cached array"):
        cache_lib.open_cache(path)


def test_convert_dataset_writes_a_cache_of_any_loader(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 4, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y, client_id=np.repeat(np.arange(5), 8))
    options = {"path": str(tmp_path / "d.npz")}
    path = convert_dataset("arrays", options, tmp_path / "caches")
    assert path.parent == tmp_path / "caches"
    opened = cache_lib.open_cache(path)
    assert opened.train.num_clients == 5
    order = np.argsort(np.repeat(np.arange(5), 8), kind="stable")
    np.testing.assert_array_equal(opened.train.arrays["x"], x[order])


def test_unwritable_cache_folder_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the dataset cache .*cache_dir"):
        cache_lib.cached_load(blocker / "c", {}, lambda allocate: small_dataset())
