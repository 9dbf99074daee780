"""CIFAR-10/100 binary files written here record by record, in the real layout.

Records are built from the format description (label byte(s), then the red, green and blue
32x32 planes, each row-major), never with the reader; the real files hold 10,000 (CIFAR-10
batches) or 50,000 / 10,000 (CIFAR-100) records, so the tests shrink the expected counts.
"""

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedjax_sim.cli import main
from fedjax_sim.data.errors import DataError
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import PartitionOptions, cifar, load_dataset
from fedjax_sim.datasets import download as download_lib
from fedjax_sim.models import MODELS

ROOT = Path(__file__).resolve().parents[2]
PER_BATCH, TEST = 8, 6


def records(labels: np.ndarray, planes: np.ndarray) -> bytes:
    """Binary CIFAR records: ``labels`` [N, label_bytes] then ``planes`` [N, 3, 32, 32]."""
    out = bytearray()
    for label, image in zip(labels, planes, strict=True):
        out += bytes(int(v) for v in np.atleast_1d(label))
        for channel in range(3):  # R, G, B planes
            out += image[channel].astype(np.uint8).tobytes()  # rows of 32 bytes
    return bytes(out)


def write_cifar10(folder: Path, seed: int = 0) -> dict:
    """``data_batch_{1..5}.bin`` and ``test_batch.bin`` with small record counts."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [*((f"data_batch_{i}.bin", PER_BATCH) for i in range(1, 6)),
                    ("test_batch.bin", TEST)]:
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / name).write_bytes(records(labels, planes))
        written[name] = (planes, labels)
    return written


def write_cifar100(folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train.bin", 30), ("test.bin", TEST)):
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = np.stack([rng.integers(0, 20, n), rng.integers(0, 100, n)], 1).astype(np.uint8)
        (folder / name).write_bytes(records(labels, planes))
        written[name] = (planes, labels)
    return written


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(cifar, "CIFAR10", dataclasses.replace(
        cifar.CIFAR10, records={name: PER_BATCH if "data" in name else TEST
                                for name in cifar.CIFAR10.records}))
    monkeypatch.setattr(cifar, "CIFAR100", dataclasses.replace(
        cifar.CIFAR100, records={"train.bin": 30, "test.bin": TEST}))


def hwc(planes: np.ndarray) -> np.ndarray:
    """Reference: pixel (row r, column c, channel k) is byte ``k * 1024 + r * 32 + c``."""
    n = len(planes)
    flat = planes.reshape(n, 3 * 1024)
    r, c, k = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return flat[:, k * 1024 + r * 32 + c]


def test_cifar10_arrays_are_exactly_the_records(small_counts, tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-bin")
    train, test = cifar.load_cifar_arrays(cifar.CIFAR10, data_dir=tmp_path)
    batches = [written[f"data_batch_{i}.bin"] for i in range(1, 6)]
    expected_x = np.concatenate([hwc(planes) for planes, _ in batches])
    assert train["x"].shape == (5 * PER_BATCH, 32, 32, 3) and train["x"].dtype == np.float32
    np.testing.assert_array_equal(train["x"] * np.float32(255), expected_x.astype(np.float32))
    np.testing.assert_array_equal(train["y"], np.concatenate([labels for _, labels in batches]))
    assert train["y"].dtype == np.int32
    planes, labels = written["test_batch.bin"]
    np.testing.assert_array_equal(test["x"] * np.float32(255), hwc(planes).astype(np.float32))
    np.testing.assert_array_equal(test["y"], labels)
    # One pixel by hand: test image 2, row 7, column 30, green.
    assert test["x"][2, 7, 30, 1] == np.float32(planes[2, 1, 7, 30]) / np.float32(255)


@pytest.mark.parametrize("label_mode, column, classes", [("fine", 1, 100), ("coarse", 0, 20)])
def test_cifar100_label_modes(label_mode, column, classes, small_counts, tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-binary")
    dataset = cifar.load_cifar100(data_dir=tmp_path, label_mode=label_mode,
                                  partition=PartitionOptions("iid", num_clients=3))
    validate_dataset(dataset)
    planes, labels = written["test.bin"]
    np.testing.assert_array_equal(dataset.central_test["y"], labels[:, column])
    np.testing.assert_array_equal(dataset.central_test["x"] * np.float32(255),
                                  hwc(planes).astype(np.float32))
    assert dataset.info["num_classes"] == classes == len(dataset.info["class_names"])
    assert dataset.info["label_mode"] == label_mode
    np.testing.assert_array_equal(np.sort(dataset.train.arrays["y"]),
                                  np.sort(written["train.bin"][1][:, column]))


def test_class_name_tables():
    assert len(cifar.CIFAR100_FINE_CLASS_NAMES) == 100 == len(set(cifar.CIFAR100_FINE_CLASS_NAMES))
    assert list(cifar.CIFAR100_FINE_CLASS_NAMES) == sorted(cifar.CIFAR100_FINE_CLASS_NAMES)
    assert len(cifar.CIFAR100_COARSE_CLASS_NAMES) == 20
    assert list(cifar.CIFAR100_COARSE_CLASS_NAMES) == sorted(cifar.CIFAR100_COARSE_CLASS_NAMES)
    assert cifar.CIFAR10_CLASS_NAMES[0] == "airplane" and cifar.CIFAR10_CLASS_NAMES[9] == "truck"


def test_federated_cifar10_dirichlet_covers_the_train_set(small_counts, tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-bin")
    train, _ = cifar.load_cifar_arrays(cifar.CIFAR10, data_dir=tmp_path)
    dataset = load_dataset("cifar10", data_dir=str(tmp_path), num_clients=4, alpha=1.0, seed=2)
    validate_dataset(dataset)
    assert dataset.name == "cifar10" and dataset.train.num_clients == 4
    assert dataset.info["input_shape"] == (32, 32, 3) and dataset.info["num_classes"] == 10
    fingerprint = np.arange(32 * 32 * 3, dtype=np.float64)
    np.testing.assert_array_equal(
        np.sort(dataset.train.arrays["x"].reshape(40, -1) @ fingerprint),
        np.sort(train["x"].reshape(40, -1) @ fingerprint),
    )


def make_archive(path: Path, folder: str, files: dict[str, bytes], extra=()) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _trust(monkeypatch, attribute: str, archive: Path) -> None:
    version = getattr(cifar, attribute)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar, attribute, dataclasses.replace(version, sha256=digest))


def test_archive_is_checked_and_unpacked_atomically(small_counts, tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar10(source)
    archive = tmp_path / "data" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    make_archive(archive, "cifar-10-batches-bin",
                 {p.name: p.read_bytes() for p in sorted(source.iterdir())})
    with pytest.raises(download_lib.ChecksumError) as error:  # the real digest: this is not it
        cifar.load_cifar10(data_dir=tmp_path / "data")
    assert str(archive) in str(error.value) and cifar.CIFAR10.sha256 in str(error.value)
    _trust(monkeypatch, "CIFAR10", archive)
    dataset = cifar.load_cifar10(data_dir=tmp_path / "data",
                                 partition=PartitionOptions("iid", num_clients=2))
    assert dataset.train.num_examples == 5 * PER_BATCH
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "cifar-10-batches-bin", "cifar-10-binary.tar.gz"]  # no temporary folder left
    for p in source.iterdir():
        assert (tmp_path / "data" / "cifar-10-batches-bin" / p.name).read_bytes() == p.read_bytes()


def test_download_then_unpack(small_counts, tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar100(source)
    server = tmp_path / "server"
    server.mkdir()
    archive = server / "cifar-100-binary.tar.gz"
    make_archive(archive, "cifar-100-binary",
                 {p.name: p.read_bytes() for p in sorted(source.iterdir())})
    _trust(monkeypatch, "CIFAR100", archive)
    monkeypatch.setattr(cifar, "URL_BASE", server.as_uri() + "/")
    with pytest.raises(FileNotFoundError):
        cifar.load_cifar100(data_dir=tmp_path / "data")  # download defaults to False
    dataset = cifar.load_cifar100(data_dir=tmp_path / "data", download=True,
                                  partition=PartitionOptions("iid", num_clients=3))
    assert dataset.central_test["x"].shape == (TEST, 32, 32, 3)
    assert (tmp_path / "data" / "cifar-100-binary.tar.gz").read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("kind", ["dotdot", "absolute-link", "outside-link", "device"])
def test_unsafe_archive_members_are_refused(kind, tmp_path):
    info = tarfile.TarInfo()
    data = None
    if kind == "dotdot":
        info.name, data = "cifar-10-batches-bin/../../escaped.bin", b"x"
        info.size = 1
    elif kind == "absolute-link":
        info.name, info.type = "cifar-10-batches-bin/l", tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
    elif kind == "outside-link":
        info.name, info.type = "cifar-10-batches-bin/l", tarfile.SYMTYPE
        info.linkname = "../../x"
    else:
        info.name, info.type = "cifar-10-batches-bin/dev", tarfile.CHRTYPE
    archive = tmp_path / "root" / "a.tar.gz"
    archive.parent.mkdir()
    make_archive(archive, "cifar-10-batches-bin", {"test_batch.bin": b"\x00" * 3073},
                 extra=[(info, data)])
    with pytest.raises(DataError, match=r"a\.tar\.gz: cannot unpack it"):
        cifar.extract_archive(archive, archive.parent, "cifar-10-batches-bin")
    assert sorted(p.name for p in archive.parent.iterdir()) == ["a.tar.gz"]
    assert not (tmp_path / "escaped.bin").exists()


def test_archive_without_the_folder(tmp_path):
    archive = tmp_path / "a.tar.gz"
    make_archive(archive, "cifar-10-batches-py", {"data_batch_1": b"pickle"})
    with pytest.raises(DataError, match=r"a\.tar\.gz: has no cifar-10-batches-bin/ folder"):
        cifar.extract_archive(archive, tmp_path, "cifar-10-batches-bin")
    (tmp_path / "b.tar.gz").write_bytes(b"\x1f\x8b not a tar")
    with pytest.raises(DataError, match=r"b\.tar\.gz: cannot unpack it"):
        cifar.extract_archive(tmp_path / "b.tar.gz", tmp_path, "cifar-10-batches-bin")


def test_wrong_record_size_count_and_labels_name_the_file(small_counts, tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    written = write_cifar10(folder)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 24583 bytes is not a whole number "
                       r"of 3073-byte records"):
        cifar.load_cifar10(data_dir=tmp_path)
    planes, labels = written["data_batch_3.bin"]
    path.write_bytes(records(labels[:-1], planes[:-1]))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 7 records, expected 8"):
        cifar.load_cifar10(data_dir=tmp_path)
    labels = labels.copy()
    labels[4] = 10
    path.write_bytes(records(labels, planes))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: labels up to 10, expected "
                       r"\[0, 10\)"):
        cifar.load_cifar10(data_dir=tmp_path)
    # CIFAR-100 files are 3074-byte records: a CIFAR-10 file in their place is caught.
    c100 = tmp_path / "cifar-100-binary"
    write_cifar100(c100)
    (c100 / "test.bin").write_bytes(records(np.zeros(TEST, np.uint8), planes[:TEST]))
    with pytest.raises(DataError, match=r"test\.bin: 18438 bytes is not a whole number of "
                       r"3074-byte records"):
        cifar.load_cifar100(data_dir=tmp_path)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        cifar.load_cifar10(data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin") in message
    assert str(tmp_path / "cifar-10-binary.tar.gz") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert cifar.CIFAR10.sha256 in message and "download=True" in message
    assert "FEDJAX_SIM_DATA" in message


def test_incomplete_folder_is_not_mixed_with_a_fresh_unpack(small_counts, tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    (folder / "data_batch_2.bin").unlink()
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(download_lib.ChecksumError):  # the archive is checked first
        cifar.load_cifar10(data_dir=tmp_path)
    _trust(monkeypatch, "CIFAR10", archive)
    with pytest.raises(DataError, match=r"cifar-10-batches-bin is incomplete \(no "
                       r"data_batch_2\.bin\); delete the folder"):
        cifar.load_cifar10(data_dir=tmp_path)


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"label_mode must be 'fine' or 'coarse', got 'both'"):
        cifar.load_cifar100(data_dir=tmp_path, label_mode="both")
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        load_dataset("cifar10", data_dir=tmp_path, test_fraction=1.0)
    with pytest.raises(TypeError, match=r"partition must be a PartitionOptions.*got 'iid'"):
        cifar.load_cifar10(data_dir=tmp_path, partition="iid")


def test_cifar10_config_runs_on_small_files(small_counts, tmp_path):
    write_cifar10(tmp_path / "data" / "cifar-10-batches-bin")
    config = ROOT / "configs" / "cifar10_dirichlet_fedavg.yaml"
    assert "name: resnet18_gn" in config.read_text()
    assert "resnet18_gn" in MODELS
    workdir = tmp_path / "run"
    # The config's ResNet-18 takes minutes to compile on a CPU; a small CNN runs the rest.
    assert main(["run", str(config), "rounds=2", "eval.every=1", "log.every=1",
                 "log.progress=false", "log.plot=false", "cohort.size=2",
                 "dataset.num_clients=4", "client.batch_size=4", "model.name=emnist_cnn",
                 f"dataset.data_dir={tmp_path / 'data'}", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert np.isfinite(summary["final"]["test/accuracy"])


@pytest.mark.parametrize("version, name, label_bytes", [
    (cifar.CIFAR10, "test_batch.bin", 1), (cifar.CIFAR100, "test.bin", 2)])
def test_real_size_test_file_at_the_real_count(version, name, label_bytes, tmp_path):
    """The real counts, unpatched, on a file of the real size (10,000 records, 30 MB): read
    exactly; one record fewer or more is refused, naming the file and the expected count."""
    rng = np.random.default_rng(5)
    n = version.records[name]
    assert n == 10_000 and version.label_bytes == label_bytes
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, (n, label_bytes), dtype=np.uint8)
    flat = np.concatenate([labels, planes.reshape(n, -1)], axis=1)  # the record layout
    path = tmp_path / name
    path.write_bytes(flat.tobytes())
    assert path.stat().st_size == n * (label_bytes + 3072)
    images, read_labels = cifar.read_records(path, label_bytes, n)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, hwc(planes))
    np.testing.assert_array_equal(read_labels, labels)
    for records_present in (n - 1, n + 1):
        path.write_bytes(np.resize(flat, (records_present, flat.shape[1])).tobytes())
        with pytest.raises(DataError, match=rf"{name}: {records_present} records, expected "
                           rf"{n} \({n * (label_bytes + 3072)} bytes\)"):
            cifar.read_records(path, label_bytes, n)
