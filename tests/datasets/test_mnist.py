"""MNIST and EMNIST from IDX files the tests write byte by byte in the real layout.

The real files are 60,000+ images; the tests write a few images under the real names (and, for
EMNIST, a ``gzip.zip`` with the real member paths) and point the loader's expected shapes and
digests at them, so every check the loader makes on real data runs here too.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

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


# The distributed files, their addresses and sha256 (tensorflow_datasets/url_checksums/mnist.txt;
# the same digests torchvision and others pin), written here independently of the loader.
REAL_MNIST = {
    "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
REAL_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/{}.gz"


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replaces the network: ``urlopen`` answers the URLs ending in a name of ``files``; returns
    the list of URLs asked for."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(download_lib.urllib.request, "urlopen", urlopen)
    return asked


def parse_by_hand(gz: bytes, magic: int, shape: tuple) -> np.ndarray:
    """Reference IDX parse: gunzip, check the big-endian magic and sizes, take the bytes."""
    data = gzip.decompress(gz)
    ndim = len(shape)
    assert struct.unpack(">I", data[:4])[0] == magic
    assert struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim]) == shape
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@needs_shared_data(*FASHION_MNIST_FILES)
def test_real_idx_files_at_the_real_counts_through_the_mnist_and_emnist_readers(
        tmp_path, monkeypatch):
    """Fashion-MNIST's four files are MNIST's format, names and counts (60,000 / 10,000
    28x28): read through the MNIST loader with its real shape checks (only the .gz digests
    are theirs), and through the EMNIST loader from a ``gzip.zip`` with NIST's member paths for
    the ``mnist`` split (real counts too; EMNIST stores images transposed)."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    gz = {}
    for name in REAL_MNIST:
        shutil.copyfile(SHARED_DATA / "fashion-mnist" / f"{name}.gz", folder / f"{name}.gz")
        gz[name] = (folder / f"{name}.gz").read_bytes()
    for key, spec in mn.MNIST_FILES.items():
        monkeypatch.setitem(mn.MNIST_FILES, key, dataclasses.replace(
            spec, gz_sha256=hashlib.sha256(gz[spec.name]).hexdigest()))
    expected = {}
    for split, prefix, n in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        expected[split] = (parse_by_hand(gz[f"{prefix}-images-idx3-ubyte"], 0x803, (n, 28, 28)),
                           parse_by_hand(gz[f"{prefix}-labels-idx1-ubyte"], 0x801, (n,)))
    train, test = mn.load_mnist_arrays(data_dir=tmp_path / "data")
    for split, arrays in (("train", train), ("test", test)):
        images, labels = expected[split]
        assert arrays["x"].shape == (len(labels), 28, 28, 1) and arrays["x"].dtype == np.float32
        np.testing.assert_array_equal(arrays["x"][..., 0] * np.float32(255),
                                      images.astype(np.float32))
        assert arrays["y"].dtype == np.int32
        np.testing.assert_array_equal(arrays["y"], labels)
    np.testing.assert_array_equal(np.bincount(train["y"]), np.full(10, 6000))
    # EMNIST: the same files as the mnist split's members of gzip.zip, counts unpatched.
    archive = tmp_path / "e" / "emnist" / "gzip.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for (part, kind), spec in mn.MNIST_FILES.items():
            zf.writestr(f"gzip/emnist-mnist-{part}-{kind}-idx{3 if kind == 'images' else 1}"
                        "-ubyte.gz", gz[spec.name])
    _trust_zip(monkeypatch, archive)
    etrain, etest = mn.load_emnist_arrays("mnist", data_dir=tmp_path / "e")
    for split, arrays in (("train", etrain), ("test", etest)):
        images, labels = expected[split]
        np.testing.assert_array_equal(arrays["x"][..., 0] * np.float32(255),
                                      images.transpose(0, 2, 1).astype(np.float32))
        np.testing.assert_array_equal(arrays["y"], labels)


def test_mnist_names_urls_and_digests_are_the_distributed_ones(tmp_path, monkeypatch):
    """With the real specs, a download asks for the real URL and refuses bytes that are not the
    distributed file, naming the file, the URL and the real digest; nothing is kept."""
    fake = gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)), mtime=0)
    asked = serve(monkeypatch, {f"{name}.gz": fake for name in REAL_MNIST})
    with pytest.raises(download_lib.ChecksumError) as error:
        mn.load_mnist_arrays(data_dir=tmp_path, download=True)
    url = REAL_URL.format("train-images-idx3-ubyte")
    assert asked == [url]
    message = str(error.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message and url in message
    assert REAL_MNIST["train-images-idx3-ubyte"] in message
    assert hashlib.sha256(fake).hexdigest() in message
    assert list((tmp_path / "mnist").iterdir()) == []  # no partial file left
    assert {spec.name: spec.gz_sha256 for spec in mn.MNIST_FILES.values()} == REAL_MNIST
    assert {spec.url(mn.MNIST_URL_BASE) for spec in mn.MNIST_FILES.values()} == {
        REAL_URL.format(name) for name in REAL_MNIST}


def test_mnist_download_once_then_the_files_on_disk(small_specs, tmp_path, monkeypatch):
    """Downloaded files are kept and used: a second load fetches nothing; a file damaged
    on disk afterwards is reported (its path and the expected digest), never re-fetched."""
    folder, written = small_specs
    served = {p.name: p.read_bytes() for p in folder.iterdir()}
    asked = serve(monkeypatch, served)
    target = tmp_path / "fresh"
    train, _ = mn.load_mnist_arrays(data_dir=target, download=True)
    assert sorted(asked) == sorted(REAL_URL.format(name) for name in REAL_MNIST)
    np.testing.assert_array_equal(train["y"], written["train", "labels"])
    for name, data in served.items():
        assert (target / "mnist" / name).read_bytes() == data
    asked.clear()
    again, _ = mn.load_mnist_arrays(data_dir=target, download=True)
    assert asked == []
    np.testing.assert_array_equal(again["x"], train["x"])
    labels = target / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-9])  # truncated: the gzip trailer is gone
    with pytest.raises(download_lib.ChecksumError) as error:
        mn.load_mnist_arrays(data_dir=target, download=True)
    assert asked == [] and str(labels) in str(error.value)
    assert mn.MNIST_FILES["test", "labels"].gz_sha256 in str(error.value)


def test_mnist_truncated_files_name_the_file_and_the_expectation(small_specs, monkeypatch):
    folder, written = small_specs
    # A truncated .gz whose digest is trusted: the gzip stream itself is refused.
    path = folder / "train-labels-idx1-ubyte.gz"
    cut = path.read_bytes()[:-5]
    path.write_bytes(cut)
    monkeypatch.setitem(mn.MNIST_FILES, ("train", "labels"), dataclasses.replace(
        mn.MNIST_FILES["train", "labels"], gz_sha256=hashlib.sha256(cut).hexdigest()))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: truncated or corrupt gzip "
                       r"stream .*fetch it again"):
        mn.load_mnist_arrays(data_dir=folder.parent)
    # A decompressed file cut short: the header's size against the bytes present.
    path.unlink()
    plain = folder / "train-labels-idx1-ubyte"
    plain.write_bytes(idx_bytes(written["train", "labels"])[:-3])
    with pytest.raises(DataError, match=rf"train-labels-idx1-ubyte: truncated IDX data: "
                       rf"{8 + NUM_TRAIN - 3} bytes, expected {8 + NUM_TRAIN}"):
        mn.load_mnist_arrays(data_dir=folder.parent)


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

