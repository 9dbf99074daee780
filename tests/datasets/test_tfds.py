"""TFDS without TensorFlow: a real TFDS dataset built here in a temp dir, read back by load_tfds."""

import gzip
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.partition import split_into_clients
from fedjax_sim.datasets import PartitionOptions, load_dataset
from fedjax_sim.datasets import tfds as tfds_lib
from fedjax_sim.datasets.download import ChecksumError, MissingFileError
from fedjax_sim.datasets.tfds import build_fashion_mnist_tfds, build_tfds_from_arrays

tfds = pytest.importorskip("tensorflow_datasets")

SHARED_FASHION_MNIST = SHARED_DATA / "fashion-mnist"
WRITERS = np.array(["ann", "bob", "cy", "dee", "eve"])
CLASS_NAMES = ["cat", "dog", "eel", "fox"]


def load_tfds(**options):
    """The ``tfds`` loader with flat options, as configs and `load_dataset` give them."""
    return load_dataset("tfds", **options)


def make_split(num_examples: int, seed: int) -> dict[str, np.ndarray]:
    """Gray 6x5 images whose first pixel is the example's index (so rows can be traced)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (num_examples, 6, 5, 1), dtype=np.uint8)
    image[:, 0, 0, 0] = np.arange(num_examples)
    return {
        "image": image,
        "label": rng.integers(0, len(CLASS_NAMES), num_examples),
        "writer": WRITERS[rng.integers(0, len(WRITERS), num_examples)],
        "writer_number": rng.integers(0, 3, num_examples),
        "vector": rng.normal(size=(num_examples, 3)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A real TFDS dataset 'toy_writers' (train 80, test 20) in a fresh TFDS data dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    splits = {"train": make_split(80, 0), "test": make_split(20, 1)}
    path = build_tfds_from_arrays(
        "toy_writers", splits, data_dir,
        {"label": tfds.features.ClassLabel(names=CLASS_NAMES)},
        supervised_keys=("image", "label"),
    )
    return data_dir, splits, path


def reference_clients(ids, rows):
    """{client id: [row, ...]} in original order: a plain dict-of-lists grouping."""
    groups = defaultdict(list)
    for row, client in enumerate(ids.tolist()):
        if row in rows:
            groups[client].append(row)
    return groups


def test_builds_a_real_tfds_dataset(toy):
    data_dir, splits, path = toy
    assert path == data_dir / "toy_writers" / "1.0.0"
    assert (path / "dataset_info.json").is_file()
    assert sorted(p.name for p in path.glob("*.array_record-*")) == [
        "toy_writers-test.array_record-00000-of-00001",
        "toy_writers-train.array_record-00000-of-00001",
    ]
    # TFDS's own reader (no fedjax_sim code) sees the examples in order, exactly.
    source = tfds.data_source("toy_writers", split="train", data_dir=str(data_dir), download=False)
    assert len(source) == 80
    example = source[7]
    np.testing.assert_array_equal(example["image"], splits["train"]["image"][7])
    assert example["label"] == splits["train"]["label"][7]
    assert example["writer"].decode() == splits["train"]["writer"][7]
    np.testing.assert_array_equal(example["vector"], splits["train"]["vector"][7])
    features = tfds.builder_from_directory(str(path)).info.features
    assert features["label"].names == CLASS_NAMES
    assert isinstance(features["image"], tfds.features.Image)
    assert isinstance(features["writer"], tfds.features.Text)


@pytest.mark.parametrize("feature", ["writer", "writer_number"])
def test_natural_clients_give_back_the_exact_arrays(toy, feature):
    data_dir, splits, _ = toy
    train, test = splits["train"], splits["test"]
    dataset = load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, partition="natural", client_id_feature=feature,
        image_dtype="uint8",
    )
    groups = reference_clients(train[feature], set(range(80)))
    assert dataset.train.client_ids.tolist() == sorted(groups)
    for i, client in enumerate(dataset.train.client_ids.tolist()):
        rows = groups[client]
        np.testing.assert_array_equal(dataset.train.client(i)["x"], train["image"][rows])
        np.testing.assert_array_equal(dataset.train.client(i)["y"], train["label"][rows])
    assert dataset.train.arrays["x"].dtype == np.uint8
    assert dataset.train.arrays["y"].dtype == np.int32
    np.testing.assert_array_equal(dataset.central_test["x"], test["image"])
    np.testing.assert_array_equal(dataset.central_test["y"], test["label"])
    assert dataset.info["num_classes"] == 4
    assert dataset.info["class_names"] == CLASS_NAMES
    assert dataset.info["input_shape"] == (6, 5, 1)
    assert dataset.name == "tfds:toy_writers"


def test_float32_images_and_tensor_inputs(toy):
    data_dir, splits, _ = toy
    dataset = load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, partition="natural", client_id_feature="writer"
    )
    rows = reference_clients(splits["train"]["writer"], set(range(80)))["ann"]
    first = dataset.train.client(0)["x"]
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, splits["train"]["image"][rows] / np.float32(255))
    vectors = load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, image_feature="vector", partition="iid",
        num_clients=1, test_split=None,
    )
    assert vectors.central_test is None
    np.testing.assert_array_equal(
        np.sort(vectors.train.arrays["x"], axis=0), np.sort(splits["train"]["vector"], axis=0)
    )


@pytest.mark.parametrize(
    "partition, options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("shards", {"shards_per_client": 2}),
        ("quantity", {"quantity_distribution": "powerlaw", "exponent": 3.0}),
        ("classes", {"classes_per_client": 2}),
    ],
)
def test_partitioners_split_the_training_arrays(toy, partition, options):
    data_dir, splits, _ = toy
    dataset = tfds_lib.load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, image_dtype="uint8",
        partition=PartitionOptions(partition, num_clients=4, seed=3, test_fraction=0.25,
                                   **options),
    )
    train = splits["train"]
    expected_train, expected_test = split_into_clients(
        {"x": train["image"], "y": train["label"].astype(np.int32)}, partition, num_clients=4,
        seed=3, test_fraction=0.25, **options,
    )
    for got, expected in ((dataset.train, expected_train), (dataset.test, expected_test)):
        np.testing.assert_array_equal(got.offsets, expected.offsets)
        np.testing.assert_array_equal(got.arrays["x"], expected.arrays["x"])
        np.testing.assert_array_equal(got.arrays["y"], expected.arrays["y"])


def test_split_slicing(toy):
    data_dir, splits, _ = toy
    dataset = load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, split="train[:25%]", test_split="test[50%:]",
        partition="natural", client_id_feature="writer", image_dtype="uint8",
    )
    first_pixels = np.sort(dataset.train.arrays["x"][:, 0, 0, 0])
    np.testing.assert_array_equal(first_pixels, np.arange(20))  # rows 0..19 of 80
    np.testing.assert_array_equal(dataset.central_test["x"], splits["test"]["image"][10:])
    both = load_tfds(
        tfds_name="toy_writers", data_dir=data_dir, split="train+test", partition="iid",
        num_clients=2, test_split=None,
    )
    assert both.train.num_examples == 100


def test_load_by_name_through_the_registry(toy):
    data_dir, _, _ = toy
    dataset = load_dataset(
        "tfds", tfds_name="toy_writers:1.0.0", data_dir=str(data_dir), num_clients=5, alpha=1.0
    )
    assert dataset.train.num_clients == 5 and dataset.train.num_examples == 80


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"tfds_name": "nope"},
            r"'nope' is not in the TFDS data dir .*datasets there: \['toy_writers'\]",
        ),
        (
            {"tfds_name": "toy_writers:2.0.0"},
            r"version 2.0.0 of 'toy_writers' .*versions .*'1.0.0'",
        ),
        (
            {"split": "validation"},
            r"split='validation' names no split .*splits: \['test', 'train'\]",
        ),
        ({"test_split": "valid[:5]"}, r"test_split='valid\[:5\]' names no split"),
        ({"image_feature": "img"}, r"no feature 'img'; features: .*'image' \(Image\)"),
        ({"label_feature": "writer"}, r"label feature 'writer' .*expected integer class labels"),
        ({"image_feature": "writer"}, r"feature 'writer' .*expected numbers"),
        (
            {"image_feature": "vector", "image_dtype": "uint8"},
            r"image_dtype='uint8' but feature 'vector' is float32",
        ),
        (
            {"partition": "natural", "client_id_feature": "author"},
            r"no feature 'author'; features:",
        ),
    ],
)
def test_missing_dataset_split_or_feature_names_what_exists(toy, options, message):
    data_dir, _, _ = toy
    options = {"tfds_name": "toy_writers", "data_dir": data_dir, "num_clients": 4, **options}
    with pytest.raises(DataError, match=message):
        load_tfds(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"partition": "natural"}, r"partition='natural' needs client_id_feature"),
        ({"client_id_feature": "writer"}, r"client_id_feature='writer' is only used by"),
        ({"partition": "shard"}, r"partition must be one of \['iid', .*got 'shard'"),
        ({"image_dtype": "float16"}, r"image_dtype must be one of \['float32', 'uint8'\]"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"tfds_name": "Bad Name"}, r"tfds_name must be a TFDS dataset name"),
    ],
)
def test_bad_options_name_the_option(toy, options, message):
    data_dir, _, _ = toy
    with pytest.raises(ValueError, match=message):
        load_tfds(**{"tfds_name": "toy_writers", "data_dir": data_dir, **options})


def test_small_batches_read_the_same_arrays(toy):
    data_dir, _, _ = toy
    kwargs = {"tfds_name": "toy_writers", "data_dir": data_dir, "partition": "iid"}
    kwargs["num_clients"] = 3
    one_read = load_tfds(**kwargs)
    many_reads = load_tfds(**kwargs, batch_size=7)
    np.testing.assert_array_equal(one_read.train.arrays["x"], many_reads.train.arrays["x"])
    np.testing.assert_array_equal(one_read.central_test["y"], many_reads.central_test["y"])


def test_builder_checks_its_arguments(tmp_path, toy):
    data_dir, _, _ = toy
    with pytest.raises(ValueError, match=r"already exists at .*toy_writers.1\.0\.0.*overwrite"):
        build_tfds_from_arrays("toy_writers", {"train": make_split(3, 0)}, data_dir)
    with pytest.raises(ValueError, match=r"split 'test' has features .*every split needs"):
        build_tfds_from_arrays(
            "mixed", {"train": {"a": np.zeros(2)}, "test": {"b": np.zeros(2)}}, tmp_path
        )
    with pytest.raises(ValueError, match=r"same number .*\{'a': 2, 'b': 3\}"):
        build_tfds_from_arrays("lengths", {"train": {"a": np.zeros(2), "b": np.zeros(3)}}, tmp_path)
    with pytest.raises(ValueError, match=r"features \['c'\] are not in the arrays"):
        build_tfds_from_arrays(
            "extra", {"train": {"a": np.zeros(2)}}, tmp_path, {"c": tfds.features.Text()}
        )
    with pytest.raises(ValueError, match=r"name must be a snake_case dataset name"):
        build_tfds_from_arrays("My-Data", {"train": {"a": np.zeros(2)}}, tmp_path)


def test_rgb_images_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    first = {"image": rng.integers(0, 256, (9, 4, 3, 3), dtype=np.uint8), "label": np.arange(9)}
    build_tfds_from_arrays("rgb", {"train": first}, tmp_path)
    second = {"image": first["image"][::-1].copy(), "label": np.arange(9)}
    build_tfds_from_arrays("rgb", {"train": second}, tmp_path, overwrite=True)
    dataset = load_tfds(
        tfds_name="rgb", data_dir=tmp_path, partition="natural", client_id_feature="label",
        test_split=None, image_dtype="uint8",
    )
    np.testing.assert_array_equal(dataset.train.arrays["x"], second["image"])
    assert dataset.info["num_classes"] == 9  # a Scalar label: max + 1


def test_importing_tfds_does_not_import_tensorflow():
    code = (
        "import sys, tensorflow_datasets, fedjax_sim.datasets.tfds as t; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "tensorflow" not in sys.modules  # nor did anything this test module ran


# --- Fashion-MNIST ------------------------------------------------------------------------------


def idx_gz(path: Path, array: np.ndarray) -> None:
    """An IDX file written from the format description: magic 0x0000TTNN, sizes, uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_builder_checks_the_idx_files(tmp_path):
    idx_dir = tmp_path / "fashion-mnist"
    idx_dir.mkdir()
    with pytest.raises(MissingFileError, match=r"train-images-idx3-ubyte"):
        build_fashion_mnist_tfds(idx_dir, tmp_path / "tfds")
    # Well-formed IDX files with other content: the content digest names the file.
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 2)):
        idx_gz(idx_dir / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        idx_gz(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte"):
        build_fashion_mnist_tfds(idx_dir, tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "fashion_mnist").exists()


@pytest.mark.slow
@needs_shared_data(*FASHION_MNIST_FILES)
def test_fashion_mnist_through_tfds_equals_the_idx_loader(tmp_path):
    from fedjax_sim.datasets.fashion_mnist import load_fashion_mnist_arrays

    build_fashion_mnist_tfds(SHARED_FASHION_MNIST, tmp_path)
    dataset = load_tfds(tfds_name="fashion_mnist", data_dir=tmp_path, num_clients=100, alpha=0.5)
    train, test = load_fashion_mnist_arrays(SHARED_FASHION_MNIST.parent)
    np.testing.assert_array_equal(dataset.central_test["x"], test["x"])
    np.testing.assert_array_equal(dataset.central_test["y"], test["y"])
    expected, _ = split_into_clients(train, "dirichlet", num_clients=100, alpha=0.5, seed=0)
    np.testing.assert_array_equal(dataset.train.offsets, expected.offsets)
    np.testing.assert_array_equal(dataset.train.arrays["x"], expected.arrays["x"])
    np.testing.assert_array_equal(dataset.train.arrays["y"], expected.arrays["y"])
    assert dataset.info["class_names"][0] == "T-shirt/top"
    # The stock registered builder finds the dataset too (same name, version and features).
    source = tfds.data_source("fashion_mnist", split="test", data_dir=str(tmp_path), download=False)
    assert len(source) == 10_000
