"""Every partition reachable from every centralized loader: through `load_dataset`, through a
config override, and a bad value named.

References are independent of the partitioners: every example is counted back (a per-example
key multiset), and each partition's defining property is checked on the loaded clients (sizes
within one for iid, at most k labels for k shards of single-label runs, exactly k labels for k
classes, spread of client sizes for quantity skew, labels per client for Dirichlet's alpha).
Real Fashion-MNIST from ``$FEDJAX_SIM_DATA`` or ``../shared/data`` (see tests/helpers.py); MNIST,
EMNIST, CIFAR, ``.npz`` and TFDS from small files written here in their real formats.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.cli import main
from fedjax_sim.config import ConfigError, load_config
from fedjax_sim.data.partition import PARTITIONS
from fedjax_sim.datasets import cifar, fashion_mnist, load_dataset
from fedjax_sim.datasets import mnist as mn
from fedjax_sim.datasets.partition_options import CENTRALIZED_PARTITIONS
from fedjax_sim.simulation.loop import build_experiment

ROOT = Path(__file__).resolve().parents[2]
needs_fashion_mnist = needs_shared_data(*FASHION_MNIST_FILES)

# 60 training examples, 6 of each of 10 labels: 5 clients x 2 shards are 10 single-label shards
# of 6, and 5 clients x 2 classes deal every label to exactly one client.
NUM_TRAIN, NUM_TEST, NUM_CLIENTS = 60, 10, 5
SMALL_OPTIONS = {"num_clients": NUM_CLIENTS, "shards_per_client": 2, "classes_per_client": 2}


def labels_per_client(data) -> list[int]:
    return [len(np.unique(data.client(i)["y"])) for i in range(data.num_clients)]


def example_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One sortable key per example: its label and a checksum of (every 7th of) its pixels."""
    flat = np.asarray(x).reshape(len(x), -1)[:, ::7].astype(np.float64)
    weights = np.random.default_rng(0).uniform(size=flat.shape[1])
    return np.sort(np.round(flat @ weights, 6) * 1000 + np.asarray(y))


def check_partition(dataset, partition: str, x: np.ndarray, y: np.ndarray, options: dict):
    """The clients hold every example exactly once, and ``partition``'s own property."""
    train = dataset.train
    np.testing.assert_array_equal(
        example_keys(train.arrays["x"], train.arrays["y"]), example_keys(x, y)
    )
    sizes = train.client_sizes
    assert int(sizes.sum()) == len(y) and int(sizes.min()) >= 1
    if partition != "natural":
        assert train.num_clients == options["num_clients"]
    if partition == "iid":
        assert int(sizes.max()) - int(sizes.min()) <= 1
    elif partition == "shards":
        assert max(labels_per_client(train)) <= options["shards_per_client"]
    elif partition == "classes":
        assert set(labels_per_client(train)) == {options["classes_per_client"]}


# --- small files in the real formats ------------------------------------------------------------


def small_arrays(seed: int = 0, n: int = NUM_TRAIN) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return images, (np.arange(n) % 10).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's four files (real names, gzip'd IDX) with 60 + 10 examples."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    specs = {}
    for (split, kind), spec in mn.MNIST_FILES.items():
        images, labels = small_arrays(seed=0 if split == "train" else 1,
                                      n=NUM_TRAIN if split == "train" else NUM_TEST)
        array = images if kind == "images" else labels
        payload = gzip.compress(idx_bytes(array), mtime=0)
        (folder / f"{spec.name}.gz").write_bytes(payload)
        specs[split, kind] = dataclasses.replace(
            spec, gz_sha256=hashlib.sha256(payload).hexdigest(), shape=array.shape
        )
    monkeypatch.setattr(mn, "MNIST_FILES", specs)
    images, labels = small_arrays(0)
    return images[..., None] / np.float32(255), labels


def write_emnist(root: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """EMNIST 'digits' as extracted from gzip.zip (``emnist/gzip/emnist-digits-...gz``)."""
    folder = root / "emnist" / "gzip"
    folder.mkdir(parents=True)
    monkeypatch.setitem(mn.EMNIST_SPLITS, "digits", dataclasses.replace(
        mn.EMNIST_SPLITS["digits"], num_train=NUM_TRAIN, num_test=NUM_TEST))
    for part, n, seed in (("train", NUM_TRAIN, 0), ("test", NUM_TEST, 1)):
        images, labels = small_arrays(seed, n)
        for kind, array in (("images", images), ("labels", labels)):
            name = mn.emnist_file_name("digits", part, kind)
            (folder / name).write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    images, labels = small_arrays(0)
    # EMNIST stores images transposed; the loader transposes them back.
    return images.transpose(0, 2, 1)[..., None] / np.float32(255), labels


def cifar_records(labels: np.ndarray, images: np.ndarray) -> bytes:
    """Binary CIFAR records: label byte(s), then the R, G, B 32x32 planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.reshape(len(labels), -1), planes], axis=1).astype(
        np.uint8).tobytes()


def write_cifar(root: Path, monkeypatch, version: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's 5 data batches + test batch (12 records each), or CIFAR-100's train/test."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (NUM_TRAIN, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(NUM_TRAIN) % 10).astype(np.uint8)
    spec = cifar.CIFAR10 if version == "cifar10" else cifar.CIFAR100
    folder = root / spec.folder
    folder.mkdir(parents=True)
    per_file = NUM_TRAIN // len(spec.train_files)
    records = {}
    for i, name in enumerate(spec.train_files):
        rows = slice(i * per_file, (i + 1) * per_file)
        file_labels = labels[rows] if version == "cifar10" else \
            np.stack([labels[rows] // 5, labels[rows]], axis=1)  # coarse, fine
        (folder / name).write_bytes(cifar_records(file_labels, images[rows]))
        records[name] = per_file
    test_labels = np.zeros((NUM_TEST, spec.label_bytes), np.uint8)
    test_images = rng.integers(0, 256, (NUM_TEST, 32, 32, 3), dtype=np.uint8)
    (folder / spec.test_files[0]).write_bytes(cifar_records(test_labels, test_images))
    records[spec.test_files[0]] = NUM_TEST
    attribute = "CIFAR10" if version == "cifar10" else "CIFAR100"
    monkeypatch.setattr(cifar, attribute, dataclasses.replace(spec, records=records))
    return images / np.float32(255), labels


def write_npz(root: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    x, y = small_arrays(3)
    client_id = np.array([f"writer{i % 7}" for i in range(NUM_TRAIN)])
    np.savez(root / "data.npz", x=x, y=y.astype(np.int64), client_id=client_id)
    return x, y


SMALL_LOADERS = {
    "mnist": (write_mnist, {}),
    "emnist": (write_emnist, {"split": "digits"}),
    "cifar10": (lambda root, mp: write_cifar(root, mp, "cifar10"), {}),
    "cifar100": (lambda root, mp: write_cifar(root, mp, "cifar100"), {"label_mode": "fine"}),
    "arrays": (write_npz, {}),
}


@pytest.mark.parametrize("name", list(SMALL_LOADERS))
def test_every_partition_through_load_dataset_on_small_files(name, tmp_path, monkeypatch):
    write, extra = SMALL_LOADERS[name]
    x, y = write(tmp_path, monkeypatch)
    location = {"path": str(tmp_path / "data.npz")} if name == "arrays" else \
        {"data_dir": str(tmp_path)}
    partitions = PARTITIONS if name == "arrays" else CENTRALIZED_PARTITIONS
    for partition in partitions:
        options = {**SMALL_OPTIONS, "partition": partition, "seed": 1}
        dataset = load_dataset(name, **location, **extra, **options)
        check_partition(dataset, partition, x, y, options)
        if partition == "natural":  # one client per writer id, holding that writer's examples
            ids = np.array([f"writer{i % 7}" for i in range(NUM_TRAIN)])
            assert sorted(dataset.train.client_ids.tolist()) == sorted(set(ids.tolist()))
            for i, writer in enumerate(dataset.train.client_ids):
                assert dataset.train.client_sizes[i] == int((ids == writer).sum())
    if name != "arrays":  # no client id per example: natural is refused, by name
        with pytest.raises(ValueError, match=r"partition must be one of \['iid', 'dirichlet', "
                           r"'shards', 'quantity', 'classes'\], got 'natural' \(" + name):
            load_dataset(name, **location, **extra, partition="natural")


def test_every_partition_through_tfds(tmp_path):
    from fedjax_sim.datasets.tfds import build_tfds_from_arrays

    images, labels = small_arrays(4)
    writers = (np.arange(NUM_TRAIN) % 4).astype(np.int64)
    build_tfds_from_arrays(
        "toy_digits",
        {"train": {"image": images[..., None], "label": labels.astype(np.int64),
                   "writer": writers},
         "test": {"image": images[:NUM_TEST, ..., None], "label": labels[:NUM_TEST].astype(
             np.int64), "writer": writers[:NUM_TEST]}},
        tmp_path,
    )
    for partition in PARTITIONS:
        options = {**SMALL_OPTIONS, "partition": partition}
        if partition == "natural":
            options["client_id_feature"] = "writer"
        dataset = load_dataset("tfds", tfds_name="toy_digits", data_dir=str(tmp_path), **options)
        check_partition(dataset, partition, images[..., None] / np.float32(255), labels, options)
        if partition == "natural":
            assert dataset.train.num_clients == 4


# --- the real Fashion-MNIST -----------------------------------------------------------------------


@pytest.fixture
def fashion(monkeypatch):
    """The real files, read once per session by the loader's own reader (cached)."""
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))
    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist_arrays",
                        _cached_fashion_arrays(fashion_mnist.load_fashion_mnist_arrays))
    train, _ = fashion_mnist.load_fashion_mnist_arrays()
    return train["x"], train["y"]


@functools.cache
def _cached_fashion_arrays(reader):
    result = reader()
    return lambda data_dir=None, download=False: result


@needs_fashion_mnist
def test_fashion_mnist_every_partition_and_its_options(fashion):
    x, y = fashion
    counts = np.bincount(y)
    assert counts.tolist() == [6000] * 10  # the published class balance
    cases = [
        ("iid", {}),
        ("shards", {"shards_per_client": 1}),   # 20 shards of 3,000: one label each
        ("shards", {"shards_per_client": 2}),
        ("classes", {"classes_per_client": 3}),
        ("quantity", {"quantity_distribution": "lognormal", "sigma": 0.01}),
        ("quantity", {"quantity_distribution": "lognormal", "sigma": 2.0}),
        ("quantity", {"quantity_distribution": "powerlaw", "exponent": 1.5}),
        ("dirichlet", {"alpha": 0.05}),
        ("dirichlet", {"alpha": 1000.0}),
    ]
    for partition, extra in cases:
        options = {"partition": partition, "num_clients": 20, "seed": 3, **extra}
        dataset = load_dataset("fashion_mnist", **options)
        check_partition(dataset, partition, x, y, {**SMALL_OPTIONS, **options})
        sizes = dataset.train.client_sizes
        labels = labels_per_client(dataset.train)
        if partition == "shards":
            assert sizes.tolist() == [3000] * 20
            if extra["shards_per_client"] == 1:  # a shard of 3,000 never crosses a label
                assert labels == [1] * 20
        if partition == "quantity" and extra.get("sigma") == 0.01:
            assert sizes.max() / sizes.min() < 1.2
        elif partition == "quantity":  # heavy tails: the option reached the partitioner
            assert sizes.max() / sizes.min() > 5
        if partition == "dirichlet" and extra["alpha"] < 1:
            assert np.mean(labels) < 5  # label skew: few labels a client
        elif partition == "dirichlet":
            assert labels == [10] * 20
            shares = np.array([np.bincount(dataset.train.client(i)["y"], minlength=10) / s
                               for i, s in enumerate(sizes)])
            assert np.abs(shares - 0.1).max() < 0.03  # every client ~ the global histogram


@needs_fashion_mnist
def test_fashion_mnist_config_overrides_reach_every_partition(fashion):
    x, y = fashion
    config_path = ROOT / "configs" / "fashion_mnist_fedavg.yaml"
    for partition, extra in [
        ("iid", []), ("dirichlet", ["dataset.alpha=0.1"]),
        ("shards", ["dataset.shards_per_client=1"]),
        ("quantity", ["dataset.quantity_distribution=powerlaw", "dataset.exponent=1.5"]),
        ("classes", ["dataset.classes_per_client=4"]),
    ]:
        config = load_config(config_path, [f"dataset.partition={partition}",
                                           "dataset.num_clients=10", *extra])
        options = config.dataset.options
        dataset = load_dataset(config.dataset.name, **options)
        check_partition(dataset, partition, x, y, {**SMALL_OPTIONS, **options})
        if partition == "shards":
            assert labels_per_client(dataset.train) == [1] * 10
        if partition == "classes":
            assert labels_per_client(dataset.train) == [4] * 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.partition=shard",
         r"partition must be one of \['iid', 'dirichlet', 'natural', 'shards', 'quantity', "
         r"'classes'\], got 'shard' \(did you mean 'shards'\?\)"),
        ("dataset.partition=natural",
         r"partition must be one of .*, got 'natural' \(fashion_mnist has no client id"),
        ("dataset.shards_per_client=0", r"shards_per_client must be an int >= 1, got 0"),
        ("dataset.classes_per_client=2.5", r"classes_per_client must be an int >= 1, got 2.5"),
        ("dataset.quantity_distribution=zipf",
         r"quantity_distribution must be one of \['lognormal', 'powerlaw'\], got 'zipf'"),
        ("dataset.sigma=0", r"sigma must be a finite number > 0, got 0"),
        ("dataset.exponent=1", r"exponent must be a finite number > 1, got 1"),
        ("dataset.alpha=-1", r"alpha must be a finite number > 0, got -1"),
        ("dataset.num_clients=0", r"num_clients must be an int >= 1, got 0"),
        ("dataset.seed=-2", r"seed must be an int >= 0, got -2"),
    ],
)
def test_bad_partition_values_are_config_errors_naming_the_option(override, message, tmp_path):
    # Checked before any file is read: no data folder is needed for the error.
    config = load_config(ROOT / "configs" / "fashion_mnist_fedavg.yaml",
                         [override, f"dataset.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"config key 'dataset' \(fashion_mnist\): " + message):
        build_experiment(config)


def test_bad_partition_on_the_command_line(tmp_path, capsys):
    code = main(["run", str(ROOT / "configs" / "fashion_mnist_fedavg.yaml"),
                 "dataset.partition=pathological", f"dataset.data_dir={tmp_path}",
                 "--workdir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "config key 'dataset' (fashion_mnist)" in err and "'pathological'" in err
    assert "'shards'" in err  # the valid names are listed


@pytest.mark.parametrize("name", ["mnist", "emnist", "cifar10", "cifar100", "arrays", "tfds"])
def test_bad_values_are_named_by_every_loader(name, tmp_path):
    location = {"path": str(tmp_path / "missing.npz")} if name == "arrays" else \
        {"data_dir": str(tmp_path)}
    if name == "tfds":
        location["tfds_name"] = "nothing"
    for options, message in [
        ({"partition": "pathological"}, r"^partition must be one of \['iid', "),
        ({"sigma": float("nan")}, r"^sigma must be a finite number > 0, got nan"),
        ({"shards_per_client": True}, r"^shards_per_client must be an int >= 1, got True"),
        ({"test_fraction": 1.0}, r"^test_fraction must be in \[0, 1\), got 1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_dataset(name, **location, **options)


# --- the options object and its flat form --------------------------------------------------------


def test_flat_options_are_the_fields_with_the_loaders_defaults():
    import inspect

    from fedjax_sim.datasets import PartitionOptions, dataset_loader

    fields = [f.name for f in dataclasses.fields(PartitionOptions)]
    for name, default in (("mnist", PartitionOptions()),
                          ("arrays", PartitionOptions("natural", num_clients=10))):
        parameters = inspect.signature(dataset_loader(name)).parameters
        assert {f: parameters[f].default for f in fields} == dataclasses.asdict(default)
        assert "data_dir" in parameters or "path" in parameters
    # Loaders without a partition keep their own signature.
    assert "partition" not in inspect.signature(dataset_loader("shakespeare")).parameters


def test_unknown_keys_get_a_did_you_mean_everywhere(tmp_path):
    from fedjax_sim.datasets import PartitionOptions

    with pytest.raises(ValueError, match=r"unknown partition option 'alpah' \(did you mean "
                       r"'alpha'\?\)"):
        PartitionOptions.from_mapping({"alpah": 0.1})
    with pytest.raises(ValueError, match=r"dataset 'mnist' has no option 'alpah' \(did you mean "
                       r"'alpha'\?\)"):
        load_dataset("mnist", data_dir=str(tmp_path), alpah=0.1)
    config = load_config(ROOT / "configs" / "fashion_mnist_fedavg.yaml",
                         ["dataset.num_clinets=5", f"dataset.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'dataset.num_clinets'.*did you "
                       r"mean 'dataset.num_clients'"):
        build_experiment(config)


def test_an_options_object_and_flat_fields_combine(tmp_path, monkeypatch):
    from fedjax_sim.datasets import PartitionOptions

    x, y = write_mnist(tmp_path, monkeypatch)
    base = PartitionOptions("shards", num_clients=NUM_CLIENTS, shards_per_client=2, seed=4)
    given = load_dataset("mnist", data_dir=str(tmp_path), partition=base, seed=5)
    flat = load_dataset("mnist", data_dir=str(tmp_path), partition="shards",
                        num_clients=NUM_CLIENTS, shards_per_client=2, seed=5)
    direct = mn.load_mnist(data_dir=tmp_path, partition=dataclasses.replace(base, seed=5))
    for dataset in (given, direct):
        np.testing.assert_array_equal(dataset.train.offsets, flat.train.offsets)
        np.testing.assert_array_equal(dataset.train.arrays["y"], flat.train.arrays["y"])
    check_partition(flat, "shards", x, y, {**SMALL_OPTIONS, "shards_per_client": 2})
    seed4 = load_dataset("mnist", data_dir=str(tmp_path), partition=base)
    assert not np.array_equal(seed4.train.arrays["y"], flat.train.arrays["y"])  # seed reached
