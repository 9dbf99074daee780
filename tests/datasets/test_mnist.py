"""MNIST and EMNIST from IDX files the tests write byte by byte in the real layout.

The real files are 60,000+ images; the tests write a few images under the real names (and, for
EMNIST, a ``gzip.zip`` with the real member paths) and point the loader's expected shapes and
digests at them, so every check the loader makes on real data runs here too.
"""

import dataclasses
import gzip
import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedjax_sim.cli import main
from fedjax_sim.data.errors import DataError
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import PartitionOptions, idx, load_dataset
from fedjax_sim.datasets import download as download_lib
from fedjax_sim.datasets import mnist as mn

ROOT = Path(__file__).resolve().parents[2]
NUM_TRAIN, NUM_TEST = 24, 7


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written from the format description."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def small_mnist(folder: Path, compress: bool = True, seed: int = 0) -> dict:
    """The four MNIST files with the real names and small content; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for kind, array in (("images", images), ("labels", labels)):
            name = mn.MNIST_FILES[split, kind].name
            payload = idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
            else:
                (folder / name).write_bytes(payload)
            written[split, kind] = array
    return written


@pytest.fixture
def small_specs(monkeypatch, tmp_path):
    """Points MNIST_FILES at the small files' shapes and .gz digests; returns their folder."""
    folder = tmp_path / "data" / "mnist"
    written = small_mnist(folder)
    specs = {}
    for key, spec in mn.MNIST_FILES.items():
        digest = hashlib.sha256((folder / f"{spec.name}.gz").read_bytes()).hexdigest()
        specs[key] = dataclasses.replace(spec, gz_sha256=digest, shape=written[key].shape)
    monkeypatch.setattr(mn, "MNIST_FILES", specs)
    return folder, written


def test_idx_module_reads_what_was_written(tmp_path):
    array = np.arange(3 * 28 * 28).reshape(3, 28, 28).astype(np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "a.gz"), array)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "a"), array)
    with pytest.raises(DataError, match=r"b: not an IDX file: magic number 0x00000701"):
        (tmp_path / "b").write_bytes(b"\x00\x00\x07\x01" + b"\x00" * 8)
        idx.read_idx(tmp_path / "b")


@pytest.mark.parametrize("dims, data_bytes", [
    ((2**31, 2**31, 4), 0),  # 2**64 values: an int64 product wraps to 0 = the bytes present
    ((60_000, 2**31, 2**31), 100),  # wraps to 0 as well: was "trailing bytes, expected 16"
])
def test_damaged_header_with_huge_sizes_is_truncated_data_naming_the_file(
        dims, data_bytes, tmp_path):
    """Reference: the size the header claims, in Python integers (no overflow)."""
    path = tmp_path / "damaged"
    path.write_bytes(struct.pack(">HBB3I", 0, 0x08, 3, *dims) + b"\x00" * data_bytes)
    claimed = 16 + dims[0] * dims[1] * dims[2]
    with pytest.raises(DataError, match=rf"damaged: truncated IDX data: {16 + data_bytes} bytes, "
                       rf"expected {claimed} \(a 16-byte header"):
        idx.read_idx(path)


def test_mnist_arrays_are_exactly_the_files(small_specs):
    folder, written = small_specs
    train, test = mn.load_mnist_arrays(data_dir=folder.parent)
    for arrays, split in ((train, "train"), (test, "test")):
        assert arrays["x"].dtype == np.float32 and arrays["x"].shape[1:] == (28, 28, 1)
        assert arrays["x"].flags.c_contiguous
        expected = written[split, "images"].astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(arrays["x"][..., 0], expected)
        assert arrays["y"].dtype == np.int32
        np.testing.assert_array_equal(arrays["y"], written[split, "labels"])
    # A pixel by hand: image 3, row 5, column 17 of the training file.
    pixel = float(written["train", "images"][3, 5, 17])
    assert train["x"][3, 5, 17, 0] * 255 == pytest.approx(pixel)


def test_mnist_decompressed_files_load_the_same(small_specs, tmp_path):
    folder, written = small_specs
    plain = tmp_path / "plain"
    for spec in mn.MNIST_FILES.values():
        (plain / "mnist").mkdir(parents=True, exist_ok=True)
        payload = gzip.decompress((folder / f"{spec.name}.gz").read_bytes())
        (plain / "mnist" / spec.name).write_bytes(payload)
    train, _ = mn.load_mnist_arrays(data_dir=plain)
    np.testing.assert_array_equal(train["y"], written["train", "labels"])


def test_mnist_federated_covers_every_example(small_specs):
    folder, written = small_specs
    dataset = mn.load_mnist(data_dir=folder.parent,
                            partition=PartitionOptions("iid", num_clients=4, seed=1))
    validate_dataset(dataset)
    assert dataset.name == "mnist" and dataset.train.num_clients == 4
    assert dataset.train.num_examples == NUM_TRAIN
    np.testing.assert_array_equal(
        np.sort(dataset.train.arrays["y"]), np.sort(written["train", "labels"])
    )
    np.testing.assert_array_equal(dataset.central_test["y"], written["test", "labels"])
    assert dataset.info["num_classes"] == 10 and dataset.info["input_shape"] == (28, 28, 1)
    assert dataset.info["class_names"] == list("0123456789")
    # Through the registry, with the per-client split.
    split = load_dataset("mnist", data_dir=str(folder.parent), partition="iid", num_clients=4,
                         seed=1, test_fraction=0.25)
    np.testing.assert_array_equal(
        split.train.client_sizes + split.test.client_sizes, dataset.train.client_sizes
    )


def test_mnist_checksum_mismatch_names_the_file_and_digest(small_specs, monkeypatch):
    folder, _ = small_specs
    key = ("train", "images")
    spec = mn.MNIST_FILES[key]
    monkeypatch.setitem(mn.MNIST_FILES, key, dataclasses.replace(spec, gz_sha256="ab" * 32))
    with pytest.raises(download_lib.ChecksumError) as error:
        mn.load_mnist_arrays(data_dir=folder.parent)
    message = str(error.value)
    assert str(folder / "train-images-idx3-ubyte.gz") in message and "ab" * 32 in message


def test_mnist_wrong_shape_and_mismatched_counts_name_the_file(small_specs, monkeypatch):
    folder, written = small_specs
    images = mn.MNIST_FILES["train", "images"]
    payload = gzip.compress(idx_bytes(written["train", "images"][:, :27, :]))  # 28x27 images
    (folder / f"{images.name}.gz").write_bytes(payload)
    monkeypatch.setitem(mn.MNIST_FILES, ("train", "images"), dataclasses.replace(
        images, gz_sha256=hashlib.sha256(payload).hexdigest()))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: IDX values have shape "
                       r"\(24, 27, 28\), expected \(24, 28, 28\)"):
        mn.load_mnist_arrays(data_dir=folder.parent)
    # Consistent shapes in the specs, but labels for fewer images than there are.
    labels = mn.MNIST_FILES["train", "labels"]
    payload = gzip.compress(idx_bytes(written["train", "labels"][:-1]))
    (folder / f"{labels.name}.gz").write_bytes(payload)
    (folder / f"{images.name}.gz").write_bytes(gzip.compress(idx_bytes(written["train", "images"])))
    monkeypatch.setitem(mn.MNIST_FILES, ("train", "images"), dataclasses.replace(
        images, gz_sha256=hashlib.sha256((folder / f"{images.name}.gz").read_bytes()).hexdigest()))
    monkeypatch.setitem(mn.MNIST_FILES, ("train", "labels"), dataclasses.replace(
        labels, gz_sha256=hashlib.sha256(payload).hexdigest(), shape=(NUM_TRAIN - 1,)))
    with pytest.raises(DataError, match=r"24 images but .*train-labels-idx1-ubyte\.gz has 23"):
        mn.load_mnist_arrays(data_dir=folder.parent)


def test_mnist_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mn.load_mnist_arrays(data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert f"{mn.MNIST_URL_BASE}train-images-idx3-ubyte.gz" in message
    assert "FEDJAX_SIM_DATA" in message and "download=True" in message


def test_mnist_download_checks_digests_and_loads(small_specs, tmp_path, monkeypatch):
    folder, written = small_specs
    monkeypatch.setattr(mn, "MNIST_URL_BASE", folder.as_uri() + "/")  # a file:// "server"
    target = tmp_path / "fresh"
    train, _ = mn.load_mnist_arrays(data_dir=target, download=True)
    np.testing.assert_array_equal(train["y"], written["train", "labels"])
    assert sorted(p.name for p in (target / "mnist").iterdir()) == sorted(
        f"{spec.name}.gz" for spec in mn.MNIST_FILES.values()
    )


# --- EMNIST ---------------------------------------------------------------------------------------


def emnist_arrays(split: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    spec = mn.EMNIST_SPLITS[split]
    num_classes = len(spec.class_names)
    out = {}
    for part, n in (("train", 20), ("test", 6)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % num_classes + spec.label_offset).astype(np.uint8)
        out[part, "images"], out[part, "labels"] = images, labels
    return out


def write_emnist_zip(path: Path, split: str, arrays: dict, extra: dict | None = None) -> None:
    """A ``gzip.zip`` with NIST's member layout (``gzip/emnist-<split>-...-ubyte.gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for (part, kind), array in arrays.items():
            name = mn.emnist_file_name(split, part, kind)
            zf.writestr(f"gzip/{name}", gzip.compress(idx_bytes(array), mtime=0))
        zf.writestr(f"gzip/emnist-{split}-mapping.txt", "0 48\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


@pytest.fixture
def small_emnist(monkeypatch):
    """Shrinks the expected example counts to the test files' (20 train, 6 test)."""
    small = {
        k: dataclasses.replace(v, num_train=20, num_test=6) for k, v in mn.EMNIST_SPLITS.items()
    }
    monkeypatch.setattr(mn, "EMNIST_SPLITS", small)


def _trust_zip(monkeypatch, path: Path) -> None:
    monkeypatch.setattr(mn, "EMNIST_ZIP_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("split", ["byclass", "letters", "digits"])
def test_emnist_zip_arrays_are_upright_and_exact(split, small_emnist, tmp_path, monkeypatch):
    arrays = emnist_arrays(split)
    archive = tmp_path / "emnist" / "gzip.zip"
    write_emnist_zip(archive, split, arrays)
    _trust_zip(monkeypatch, archive)
    train, test = mn.load_emnist_arrays(split, data_dir=tmp_path)
    for part, loaded in (("train", train), ("test", test)):
        stored = arrays[part, "images"]
        # EMNIST stores images transposed: pixel (row r, column c) is at stored[c, r].
        np.testing.assert_array_equal(
            loaded["x"][..., 0] * np.float32(255), stored.transpose(0, 2, 1).astype(np.float32)
        )
        assert loaded["x"].shape[1:] == (28, 28, 1) and loaded["x"].flags.c_contiguous
        offset = mn.EMNIST_SPLITS[split].label_offset
        np.testing.assert_array_equal(loaded["y"], arrays[part, "labels"].astype(np.int32) - offset)
    assert int(train["y"].min()) == 0


def test_emnist_orientation_by_hand(small_emnist, tmp_path, monkeypatch):
    """A stored image whose first *row* is bright comes out with a bright first *column*."""
    arrays = emnist_arrays("mnist")
    arrays["train", "images"][0] = 0
    arrays["train", "images"][0, 0, :] = 255
    archive = tmp_path / "emnist" / "gzip.zip"
    write_emnist_zip(archive, "mnist", arrays)
    _trust_zip(monkeypatch, archive)
    train, _ = mn.load_emnist_arrays("mnist", data_dir=tmp_path)
    image = train["x"][0, :, :, 0]
    assert np.all(image[:, 0] == 1.0) and np.all(image[:, 1:] == 0.0)


def test_emnist_extracted_files_work_without_the_zip(small_emnist, tmp_path):
    arrays = emnist_arrays("balanced")
    folder = tmp_path / "emnist" / "gzip"
    folder.mkdir(parents=True)
    for (part, kind), array in arrays.items():
        (folder / mn.emnist_file_name("balanced", part, kind)).write_bytes(
            gzip.compress(idx_bytes(array)))
    dataset = mn.load_emnist(split="balanced", data_dir=tmp_path,
                             partition=PartitionOptions("iid", num_clients=5))
    validate_dataset(dataset)
    assert dataset.info["num_classes"] == 47 and dataset.info["split"] == "balanced"
    assert dataset.info["class_names"][36:] == list("abdefghnqrt")
    np.testing.assert_array_equal(dataset.central_test["y"], arrays["test", "labels"])


def test_emnist_zip_checksum_and_members(small_emnist, tmp_path, monkeypatch):
    archive = tmp_path / "emnist" / "gzip.zip"
    write_emnist_zip(archive, "digits", emnist_arrays("digits"))
    with pytest.raises(download_lib.ChecksumError) as error:
        mn.load_emnist_arrays("digits", data_dir=tmp_path)
    assert str(archive) in str(error.value) and mn.EMNIST_ZIP_SHA256 in str(error.value)
    _trust_zip(monkeypatch, archive)
    with pytest.raises(DataError, match=r"gzip\.zip: has no member "
                       r"'gzip/emnist-letters-train-images-idx3-ubyte\.gz'"):
        mn.load_emnist_arrays("letters", data_dir=tmp_path)
    # A member of the wrong size is named with its path inside the archive.
    arrays = emnist_arrays("digits")
    arrays["test", "images"] = arrays["test", "images"][:5]
    write_emnist_zip(archive, "digits", arrays)
    _trust_zip(monkeypatch, archive)
    with pytest.raises(DataError, match=r"gzip\.zip:gzip/emnist-digits-test-images-idx3-ubyte"
                       r"\.gz: EMNIST digits test images have shape \(5, 28, 28\), expected "
                       r"\(6, 28, 28\)"):
        mn.load_emnist_arrays("digits", data_dir=tmp_path)
    (archive).write_bytes(b"PK\x03\x04 not really a zip")
    _trust_zip(monkeypatch, archive)
    with pytest.raises(DataError, match=r"gzip\.zip: not a readable zip archive"):
        mn.load_emnist_arrays("digits", data_dir=tmp_path)


def test_emnist_missing_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mn.load_emnist_arrays("byclass", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "emnist" / "gzip.zip") in message and mn.EMNIST_URL in message
    assert "emnist-byclass-train-images-idx3-ubyte.gz" in message and "download=True" in message
    with pytest.raises(ValueError, match=r"split must be one of .*got 'byletter'"):
        mn.load_emnist_arrays("byletter", data_dir=tmp_path)


def test_emnist_download(small_emnist, tmp_path, monkeypatch):
    server = tmp_path / "server" / "gzip.zip"
    write_emnist_zip(server, "mnist", emnist_arrays("mnist"))
    _trust_zip(monkeypatch, server)
    monkeypatch.setattr(mn, "EMNIST_URL", server.as_uri())
    train, _ = mn.load_emnist_arrays("mnist", data_dir=tmp_path / "data", download=True)
    assert train["x"].shape == (20, 28, 28, 1)
    assert (tmp_path / "data" / "emnist" / "gzip.zip").read_bytes() == server.read_bytes()


def test_emnist_split_table_matches_the_paper():
    """Class and example counts of Cohen et al. 2017, Table II."""
    table = {name: (len(s.class_names), s.num_train, s.num_test)
             for name, s in mn.EMNIST_SPLITS.items()}
    assert table == {
        "byclass": (62, 697_932, 116_323), "bymerge": (47, 697_932, 116_323),
        "balanced": (47, 112_800, 18_800), "letters": (26, 124_800, 20_800),
        "digits": (10, 240_000, 40_000), "mnist": (10, 60_000, 10_000),
    }
    assert sum(table["balanced"][1:]) == 131_600 and sum(table["letters"][1:]) == 145_600


# --- the config -----------------------------------------------------------------------------------

TINY_RUN = ["rounds=2", "eval.every=1", "log.every=1", "log.progress=false", "log.plot=false",
            "cohort.size=2", "dataset.num_clients=4", "client.batch_size=4"]


def _run(config: str, tmp_path: Path, *overrides: str) -> dict:
    workdir = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / config), *TINY_RUN, *overrides,
                 "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert np.isfinite(summary["final"]["test/accuracy"])
    return summary


def test_mnist_config_runs_on_small_files(small_specs, tmp_path):
    folder, _ = small_specs
    _run("mnist_fedavg.yaml", tmp_path, f"dataset.data_dir={folder.parent}")


def test_emnist_runs_through_the_mnist_config(small_emnist, tmp_path, monkeypatch):
    archive = tmp_path / "data" / "emnist" / "gzip.zip"
    write_emnist_zip(archive, "digits", emnist_arrays("digits"))
    _trust_zip(monkeypatch, archive)
    _run("mnist_fedavg.yaml", tmp_path, "dataset.name=emnist", "dataset.split=digits",
         f"dataset.data_dir={tmp_path / 'data'}", "dataset.partition=iid",
         "dataset.num_clients=4")

