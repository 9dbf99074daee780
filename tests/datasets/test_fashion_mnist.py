"""Fashion-MNIST loading: the real offline copy, and small IDX files written here byte by byte."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data, require_shared_data

from fedjax_sim.data.errors import DataError
from fedjax_sim.datasets import PartitionOptions, load_dataset
from fedjax_sim.datasets import download as download_lib
from fedjax_sim.datasets import fashion_mnist as fm

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the decompressed files, from `gunzip -c FILE | sha256sum` on the offline copy.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# sha256 of upstream's .gz files, from shared/data/fashion-mnist/README.md (= TFDS's).
UPSTREAM_GZ_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
IDX_TYPE = {
    np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
    np.float64: 0x0E,
}  # fmt: skip

needs_shared = needs_shared_data(*FASHION_MNIST_FILES)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format description (not the reader)."""
    header = struct.pack(">HBB", 0, IDX_TYPE[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))
    return path


def small_files(folder: Path, num_train: int = 6, num_test: int = 3) -> None:
    """Four valid IDX .gz files with the real names but other (small) content."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_gz(folder / f"{NAMES[split + '_images']}.gz", idx_bytes(images))
        write_gz(folder / f"{NAMES[split + '_labels']}.gz", idx_bytes(labels))


def fingerprints(images: np.ndarray) -> np.ndarray:
    """Sorted per-image weighted pixel sums: equal iff the same images (whp), in any order.

    Exact in float64 (k/255 float32 pixels x weights < 784, summed 784 times), so the row order
    cannot change the rounding.
    """
    return np.sort(images.reshape(len(images), -1) @ np.arange(784, dtype=np.float64))


# --- (a) the real offline copy ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_arrays(tmp_path_factory):
    """Loads the shared copy the way a user would: ``FEDJAX_SIM_DATA`` relative to the cwd."""
    require_shared_data(*FASHION_MNIST_FILES)
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv(download_lib.DATA_DIR_ENV, os.path.relpath(SHARED_DATA, cwd))
        return fm.load_fashion_mnist_arrays()


def test_real_arrays_shapes_dtypes_and_statistics(real_arrays):
    train, test = real_arrays
    for arrays, n in ((train, 60_000), (test, 10_000)):
        assert set(arrays) == {"x", "y"}
        assert arrays["x"].shape == (n, 28, 28, 1) and arrays["x"].dtype == np.float32
        assert arrays["y"].shape == (n,) and arrays["y"].dtype == np.int32
        assert arrays["x"].min() == 0.0 and arrays["x"].max() == 1.0
        np.testing.assert_array_equal(np.bincount(arrays["y"]), np.full(10, n // 10))
    # Published statistics: mean pixel 0.2860 (train), 0.2868 (test).
    assert abs(train["x"].mean(dtype=np.float64) - 0.2860) < 5e-5
    assert abs(test["x"].mean(dtype=np.float64) - 0.2868) < 5e-5
    # Pixels are k / 255 exactly.
    np.testing.assert_array_equal(train["x"][:100] * 255, np.round(train["x"][:100] * 255))


@needs_shared
def test_real_dirichlet_federated_dataset_covers_the_train_set(real_arrays):
    train, test = real_arrays
    dataset = fm.load_fashion_mnist(data_dir=SHARED_DATA, partition=PartitionOptions(
        "dirichlet", num_clients=100, alpha=0.5, seed=0))
    assert dataset.name == "fashion_mnist"
    assert dataset.train.num_clients == 100 and dataset.train.num_examples == 60_000
    assert dataset.train.client_sizes.min() >= 1
    assert dataset.test is None
    # The same 60,000 examples, rearranged: compare per-image fingerprints as multisets.
    np.testing.assert_array_equal(fingerprints(dataset.train.arrays["x"]), fingerprints(train["x"]))
    np.testing.assert_array_equal(np.bincount(dataset.train.arrays["y"]), np.full(10, 6000))
    np.testing.assert_array_equal(dataset.central_test["y"], test["y"])
    assert dataset.info == {
        "num_classes": 10,
        "pad_label": None,
        "input_shape": (28, 28, 1),
        "input_dtype": "float32",
        "class_names": list(fm.CLASS_NAMES),
    }
    assert dataset.info["class_names"][0] == "T-shirt/top"
    assert dataset.info["class_names"][9] == "Ankle boot"


def test_per_client_test_split_keeps_the_partition(real_arrays, monkeypatch):
    monkeypatch.setattr(fm, "load_fashion_mnist_arrays", lambda *args, **kwargs: real_arrays)
    whole = fm.load_fashion_mnist(partition=PartitionOptions("iid", num_clients=10, seed=3))
    split = fm.load_fashion_mnist(
        partition=PartitionOptions("iid", num_clients=10, seed=3, test_fraction=0.25))
    np.testing.assert_array_equal(
        split.train.client_sizes + split.test.client_sizes, whole.train.client_sizes
    )
    np.testing.assert_array_equal(split.train.client_sizes, np.full(10, 4500))
    for i in range(10):  # each client's train + test = that client's examples in `whole`
        joined = np.concatenate([split.train.client(i)["y"], split.test.client(i)["y"]])
        np.testing.assert_array_equal(np.sort(joined), np.sort(whole.train.client(i)["y"]))
    assert whole.train.client_sizes.tolist() == [6000] * 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"partition": "shard"}, r"partition must be one of \['iid', 'dirichlet', 'natural', "
         r"'shards', 'quantity', 'classes'\], got 'shard' \(did you mean 'shards'\?\)"),
        ({"partition": "natural"}, r"partition must be one of \['iid', 'dirichlet', 'shards', "
         r"'quantity', 'classes'\], got 'natural' \(fashion_mnist has no client id"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\), got 1.0"),
        ({"test_fraction": -0.1}, r"test_fraction must be in \[0, 1\), got -0.1"),
    ],
)
def test_invalid_loader_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_dataset("fashion_mnist", data_dir=tmp_path, **kwargs)


# --- (b) IDX files written here ---------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(7 * 28 * 28, dtype=np.int64).reshape(7, 28, 28).astype(np.uint8),
        np.array([3, 1, 4, 1, 5, 9, 2, 6], np.uint8),
        np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
        np.array([[-300, 2], [7, 32000]], np.int16),
        np.array([-(2**31), 2**31 - 1, 5], np.int32),
        np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
        np.array([np.pi, -np.e], np.float64),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i16", "i32", "f32", "f64"],
)
def test_read_idx_returns_exactly_what_was_written(array, compress, tmp_path):
    path = tmp_path / "file.idx"
    if compress:
        write_gz(path, idx_bytes(array))
    else:
        path.write_bytes(idx_bytes(array))
    result = fm.read_idx(path)
    assert result.dtype == array.dtype and result.dtype.isnative
    np.testing.assert_array_equal(result, array)
    result[...] = 0  # a writable array of its own


@pytest.mark.parametrize(
    "magic",
    [b"\x00\x00\x07\x01", b"\x12\x34\x08\x03", b"\x00\x00\x08\x00", b"\x00\x00"],
    ids=["unknown-type", "nonzero-prefix", "zero-dims", "short"],
)
def test_wrong_magic_number_names_the_file(magic, tmp_path):
    path = write_gz(tmp_path / "bad-magic.gz", magic + idx_bytes(np.zeros(4, np.uint8))[4:])
    with pytest.raises(ValueError, match=r"bad-magic\.gz.*magic number"):
        fm.read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    full = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*truncated or corrupt gzip"):
        fm.read_idx(path)


def test_corrupt_gzip_names_the_file(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32))))
    data[-8] ^= 0xFF  # the CRC32 in the trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"crc\.gz.*truncated or corrupt gzip"):
        fm.read_idx(path)


@pytest.mark.parametrize("cut", [1, 100, 28 * 28])
def test_truncated_payload_names_the_file(cut, tmp_path):
    payload = idx_bytes(np.ones((3, 28, 28), np.uint8))
    path = write_gz(tmp_path / "short-images.gz", payload[:-cut])  # a valid gzip of too few bytes
    with pytest.raises(ValueError, match=r"short-images\.gz: truncated IDX data"):
        fm.read_idx(path)


def test_trailing_bytes_and_truncated_header_name_the_file(tmp_path):
    path = write_gz(tmp_path / "long.gz", idx_bytes(np.ones(3, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match=r"long\.gz: trailing bytes"):
        fm.read_idx(path)
    path = write_gz(tmp_path / "header.gz", b"\x00\x00\x08\x03\x00\x00\x00\x01")
    with pytest.raises(ValueError, match=r"header\.gz: truncated IDX header"):
        fm.read_idx(path)


def test_checksum_mismatch_names_the_file_and_the_expected_digest(tmp_path):
    small_files(tmp_path / "fashion-mnist")
    with pytest.raises(download_lib.ChecksumError) as error:
        fm.load_fashion_mnist_arrays(data_dir=tmp_path)
    name = "train-images-idx3-ubyte"  # the first file the loader reads
    message = str(error.value)
    assert str(tmp_path / "fashion-mnist" / f"{name}.gz") in message
    assert CONTENT_SHA256[name] in message
    with gzip.open(tmp_path / "fashion-mnist" / f"{name}.gz") as f:
        assert hashlib.sha256(f.read()).hexdigest() in message  # and the actual one


@needs_shared
@pytest.mark.parametrize("bad", list(NAMES.values()))
def test_every_file_is_checked(bad, tmp_path):
    """Three real files (links to the shared copy) and one valid impostor: the impostor fails."""
    folder = tmp_path / "fashion-mnist"
    small_files(tmp_path / "impostors")
    folder.mkdir()
    for name in NAMES.values():
        source = tmp_path / "impostors" if name == bad else SHARED_DATA / "fashion-mnist"
        (folder / f"{name}.gz").symlink_to(source / f"{name}.gz")
    with pytest.raises(download_lib.ChecksumError, match=rf"{bad}\.gz.*{CONTENT_SHA256[bad]}"):
        fm.load_fashion_mnist_arrays(data_dir=tmp_path)


def test_decompressed_files_are_accepted_too(tmp_path):
    """Plain (gunzipped) files pass the same content check, so they fail the same way."""
    small_files(tmp_path / "gz")
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in NAMES.values():
        with gzip.open(tmp_path / "gz" / f"{name}.gz") as f:
            (folder / name).write_bytes(f.read())
    with pytest.raises(download_lib.ChecksumError, match=r"train-images-idx3-ubyte: sha256"):
        fm.load_fashion_mnist_arrays(data_dir=tmp_path)


def test_loader_reports_a_damaged_file_as_such(tmp_path):
    """A truncated payload is reported as truncated (not just as a digest mismatch)."""
    folder = tmp_path / "fashion-mnist"
    small_files(folder)
    write_gz(folder / "train-images-idx3-ubyte.gz", idx_bytes(np.ones((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated IDX data"):
        fm.load_fashion_mnist_arrays(data_dir=tmp_path)


def test_missing_file_says_where_and_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fm.load_fashion_mnist_arrays(data_dir=tmp_path)
    message = str(error.value)
    expected_path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    assert str(expected_path) in message
    assert f"{fm.URL_BASE}train-images-idx3-ubyte.gz" in message
    assert "FEDJAX_SIM_DATA" in message and "data_dir" in message
    assert "download=True" in message and "dataset.download: true" in message


@needs_shared
def test_download_verifies_upstream_digests_and_loads(tmp_path, monkeypatch):
    """Serves upstream's exact .gz bytes (rebuilt per the offline copy's README) via file://."""
    server = tmp_path / "server"
    server.mkdir()
    mtimes = {"train": 1504176606, "t10k": 1504176627}  # upstream's gzip mtimes
    for name in NAMES.values():
        debian = (SHARED_DATA / "fashion-mnist" / f"{name}.gz").read_bytes()
        upstream = (
            b"\x1f\x8b\x08\x08"  # FNAME flag set
            + struct.pack("<I", mtimes[name.split("-")[0]])
            + debian[8:10]
            + name.encode()
            + b"\x00"
            + debian[10:]
        )
        assert hashlib.sha256(upstream).hexdigest() == UPSTREAM_GZ_SHA256[name]
        (server / f"{name}.gz").write_bytes(upstream)
    monkeypatch.setattr(fm, "URL_BASE", server.as_uri() + "/")

    data = tmp_path / "data"
    with pytest.raises(FileNotFoundError):
        fm.load_fashion_mnist_arrays(data_dir=data)  # download defaults to False
    train, test = fm.load_fashion_mnist_arrays(data_dir=data, download=True)
    assert train["x"].shape == (60_000, 28, 28, 1) and test["y"].shape == (10_000,)
    for name in NAMES.values():
        path = data / "fashion-mnist" / f"{name}.gz"
        assert download_lib.sha256_file(path) == UPSTREAM_GZ_SHA256[name]
    assert sorted(p.name for p in (data / "fashion-mnist").iterdir()) == sorted(
        f"{name}.gz" for name in NAMES.values()
    )


# --- download helpers -------------------------------------------------------------------------


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDJAX_SIM_DATA", "from-env")
    assert download_lib.data_dir("explicit") == tmp_path / "explicit"
    assert download_lib.data_dir(Path("/abs/explicit")) == Path("/abs/explicit")
    assert download_lib.data_dir() == tmp_path / "from-env"
    assert download_lib.data_dir(None) == tmp_path / "from-env"
    monkeypatch.setenv("FEDJAX_SIM_DATA", "../shared/data")  # relative to the cwd
    assert download_lib.data_dir() == tmp_path.parent / "shared" / "data"
    monkeypatch.setenv("FEDJAX_SIM_DATA", "")  # empty = unset
    cache = Path(platformdirs.user_cache_dir("fedjax_sim"))
    assert download_lib.data_dir() == cache
    monkeypatch.delenv("FEDJAX_SIM_DATA")
    assert download_lib.data_dir() == cache
    assert download_lib.data_dir("x") == tmp_path / "x"


def test_download_file_is_atomic_and_checked(tmp_path):
    payload = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    target = tmp_path / "out" / "nested" / "file.bin"

    assert download_lib.download_file(source.as_uri(), target, digest) == target
    assert target.read_bytes() == payload
    assert download_lib.sha256_file(target) == digest
    assert os.listdir(target.parent) == ["file.bin"]  # no temporary file left

    # A wrong digest: nothing is kept, and the verified file already there is untouched.
    with pytest.raises(download_lib.ChecksumError, match=rf"file\.bin.*expected {'0' * 64}"):
        download_lib.download_file(source.as_uri(), target, "0" * 64)
    assert target.read_bytes() == payload and os.listdir(target.parent) == ["file.bin"]
    fresh = tmp_path / "fresh" / "file.bin"
    with pytest.raises(download_lib.ChecksumError):
        download_lib.download_file(source.as_uri(), fresh, "0" * 64)
    assert os.listdir(fresh.parent) == []

    with pytest.raises(DataError, match=r"could not download .*missing\.bin"):
        download_lib.download_file((tmp_path / "missing.bin").as_uri(), fresh, digest)
    assert os.listdir(fresh.parent) == []


def test_ensure_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    target = tmp_path / "data" / "set" / "file.bin"
    with pytest.raises(FileNotFoundError, match=r"file\.bin.*download=True"):
        download_lib.ensure_file(target, url=source.as_uri(), sha256=digest)
    assert download_lib.ensure_file(target, url=source.as_uri(), sha256=digest, download=True)
    assert target.read_bytes() == b"abc"
    source.unlink()  # an existing file is used as is, without the network
    assert download_lib.ensure_file(target, url=source.as_uri(), sha256=digest) == target
