"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from their *binary* versions, split into clients.

"Learning Multiple Layers of Features from Tiny Images" (Krizhevsky 2009): 60,000 32x32 colour
images (50,000 train, 10,000 test). Only the binary versions are read, never the Python pickle
versions (unpickling a downloaded file can run arbitrary code):

* CIFAR-10, ``cifar-10-binary.tar.gz`` -> ``cifar-10-batches-bin/data_batch_1.bin`` ...
  ``data_batch_5.bin`` (10,000 records each) and ``test_batch.bin``; a record is 1 label byte
  (0..9) + 3,072 pixel bytes.
* CIFAR-100, ``cifar-100-binary.tar.gz`` -> ``cifar-100-binary/train.bin`` (50,000 records) and
  ``test.bin`` (10,000); a record is 2 label bytes (coarse 0..19, fine 0..99) + 3,072 pixels.

The 3,072 pixel bytes are the red, green and blue 32x32 planes, each row-major (CHW); images
come back HWC float32 in ``[0, 1]`` (pixel / 255, no per-channel normalization: models that
want it do it themselves), labels int32. The training images are split into clients by a
partitioner (`split_into_clients`: Dirichlet label skew, IID, shards ...); the test file is the
central test set.

Files live in the data folder (``dataset.data_dir`` > ``$FEDJAX_SIM_DATA`` > the user cache)
as the archive unpacks: ``<data_dir>/cifar-10-batches-bin/*.bin``. When that folder is absent
but the archive ``<data_dir>/cifar-10-binary.tar.gz`` is there (or ``download=True`` fetches
it), the archive's sha256 is checked (the digests tensorflow-datasets registers) and it is
unpacked safely (``tarfile``'s ``data`` filter: no absolute paths, no ``..``, no links out,
no devices) into a temporary folder that is renamed into place only when complete. The
unpacked ``.bin`` files are checked by size (whole records, the expected count) and label
range on every load; no digest of the unpacked files is published.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.datasets import download as download_lib  # `download` is an argument name
from fedjax_sim.datasets.partition_options import (
    DEFAULT_PARTITION,
    PartitionOptions,
    centralized_dataset,
    check_partition,
    image_info,
)

IMAGE_SHAPE = (32, 32, 3)
PIXELS = 32 * 32 * 3
URL_BASE = "https://www.cs.toronto.edu/~kriz/"
"""Krizhevsky's page (www.cs.toronto.edu/~kriz/cifar.html) and the archives' location."""

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_COARSE_CLASS_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip
CIFAR100_FINE_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CifarVersion:
    """One binary CIFAR release: its archive, the folder it unpacks to and its files.

    Attributes:
      archive: the archive's file name (downloaded from `URL_BASE`).
      sha256: the archive's sha256 (tensorflow_datasets/url_checksums/cifar10.txt, cifar100.txt).
      folder: the folder the archive unpacks to.
      train_files: the training files, in order.
      test_files: the test files.
      records: ``{file name: number of records}``.
      label_bytes: label bytes in front of each record's pixels.
    """

    archive: str
    sha256: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    records: dict[str, int]
    label_bytes: int

    @property
    def url(self) -> str:
        return f"{URL_BASE}{self.archive}"


CIFAR10 = CifarVersion(
    archive="cifar-10-binary.tar.gz",
    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    folder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    records={**{f"data_batch_{i}.bin": 10_000 for i in range(1, 6)}, "test_batch.bin": 10_000},
    label_bytes=1,
)
CIFAR100 = CifarVersion(
    archive="cifar-100-binary.tar.gz",
    sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
    folder="cifar-100-binary",
    train_files=("train.bin",),
    test_files=("test.bin",),
    records={"train.bin": 50_000, "test.bin": 10_000},
    label_bytes=2,
)


# --- archive --------------------------------------------------------------------------------------


def _missing_message(root: Path, version: CifarVersion, missing: Path) -> str:
    return (
        f"CIFAR file {missing.name!r} not found: expected {missing} (folder {version.folder}/ "
        f"in the data folder {root}, resolved from the data_dir argument, else "
        f"${download_lib.DATA_DIR_ENV}, else the user cache folder), or the archive "
        f"{root / version.archive} to unpack it from. Get {version.archive} (the binary "
        f"version, sha256 {version.sha256}) from {version.url} and either put it in {root} "
        f"(it is checked and unpacked on the next load) or unpack it there yourself "
        f"(tar xzf {version.archive} -C {root}); or point the data folder elsewhere: set "
        f"{download_lib.DATA_DIR_ENV}=/path/to/data or pass data_dir= (config key "
        "`dataset.data_dir`); or let the loader download it: pass download=True (config key "
        "`dataset.download: true`)."
    )


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike, folder: str) -> Path:
    """Unpacks ``folder/`` from a ``.tar.gz`` into ``root`` safely and atomically.

    Members are extracted with `tarfile`'s ``data`` filter (it refuses absolute paths, ``..``,
    links pointing outside, devices; Python >= 3.10.12 / 3.11.4) into a temporary folder in
    ``root``; only a complete ``folder`` is moved into place. Members outside ``folder/`` are
    not extracted.

    Returns:
      ``root / folder``.

    Raises:
      DataError (naming the archive): not a readable ``.tar.gz``, an unsafe member, or no
        ``folder/`` in it.
    """
    root = Path(root)
    with download_lib.extracted_tar(
        archive, root, lambda member: member.name.split("/", 1)[0] == folder
    ) as (temp, members):
        if not members:
            raise DataError(
                f"{archive}: has no {folder}/ folder; expected the binary CIFAR archive (the "
                f"one with {folder}/ inside)"
            )
        target = root / folder
        if not target.exists():  # else another process unpacked it meanwhile
            os.replace(temp / folder, target)
        return target


def _ensure_folder(root: Path, version: CifarVersion, download: bool) -> Path:
    """The unpacked folder, unpacking (and first downloading) the archive when it is absent."""
    folder = root / version.folder
    files = (*version.train_files, *version.test_files)
    if all((folder / name).is_file() for name in files):
        return folder
    missing = next(folder / name for name in files if not (folder / name).is_file())
    archive = download_lib.ensure_archive(
        root / version.archive, url=version.url, sha256=version.sha256, download=download,
        missing_message=_missing_message(root, version, missing),
    )
    if folder.exists():
        missing = [name for name in files if not (folder / name).is_file()]
        raise DataError(
            f"{folder} is incomplete (no {', '.join(missing)}); delete the folder to have it "
            f"unpacked again from {archive}"
        )
    return extract_archive(archive, root, version.folder)


# --- records --------------------------------------------------------------------------------------


def read_records(
    path: str | os.PathLike, label_bytes: int, num_records: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one binary CIFAR file.

    Args:
      path: a ``.bin`` file of records ``label_bytes`` label bytes + 3,072 pixel bytes (the red,
        green and blue 32x32 planes, row-major).
      label_bytes: 1 for CIFAR-10, 2 for CIFAR-100 (coarse, fine).
      num_records: the number of records the file must hold, or None for any.

    Returns:
      ``(images, labels)``: uint8 ``[N, 32, 32, 3]`` (HWC) and uint8 ``[N, label_bytes]``.

    Raises:
      DataError (naming the file): its size is not a whole number of records, or not
        ``num_records`` of them.
    """
    path = Path(path)
    record = label_bytes + PIXELS
    data = np.fromfile(path, dtype=np.uint8)
    if data.size % record or data.size == 0:
        raise DataError(
            f"{path}: {data.size} bytes is not a whole number of {record}-byte records "
            f"({label_bytes} label byte(s) + {PIXELS} pixels); expected the binary CIFAR-"
            f"{'10' if label_bytes == 1 else '100'} version (not the Python or MATLAB one)"
        )
    records = data.reshape(-1, record)
    if num_records is not None and len(records) != num_records:
        raise DataError(
            f"{path}: {len(records)} records, expected {num_records} ({num_records * record} "
            "bytes); the file is truncated or not the expected one: delete the folder and "
            "unpack the archive again"
        )
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, records[:, :label_bytes]


def _read_split(
    folder: Path, version: CifarVersion, files: tuple[str, ...], label_column: int,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """``{"x": float32 [N, 32, 32, 3] in [0, 1], "y": int32 [N]}`` of ``files`` in order."""
    total = sum(version.records[name] for name in files)
    x = np.empty((total, *IMAGE_SHAPE), np.float32)
    y = np.empty(total, np.int32)
    start = 0
    for name in files:
        path = folder / name
        images, labels = read_records(path, version.label_bytes, version.records[name])
        label = labels[:, label_column]
        if int(label.max()) >= num_classes:
            kind = ("coarse ", "fine ")[label_column] if version.label_bytes == 2 else ""
            raise DataError(
                f"{path}: {kind}labels up to {int(label.max())}, expected [0, {num_classes}); "
                "the file is not the expected one"
            )
        stop = start + len(images)
        np.divide(images, np.float32(255.0), out=x[start:stop], dtype=np.float32)
        y[start:stop] = label
        start = stop
    return {"x": x, "y": y}


def load_cifar_arrays(
    version: CifarVersion,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    label_mode: str = "fine",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The train and test splits of `CIFAR10` or `CIFAR100` as flat arrays.

    Args:
      version: `CIFAR10` or `CIFAR100`.
      data_dir: the root data folder; None falls back to ``$FEDJAX_SIM_DATA``, then the user
        cache folder.
      download: fetch a missing archive from `URL_BASE` (sha256-checked, atomic).
      label_mode: CIFAR-100's ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses)
        labels; ignored for CIFAR-10.

    Returns:
      ``(train, test)``, each ``{"x": float32 [N, 32, 32, 3] in [0, 1], "y": int32 [N]}`` with
      N = 50,000 and 10,000.
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    root = download_lib.data_dir(data_dir)
    folder = _ensure_folder(root, version, download)
    if version.label_bytes == 1:
        column, num_classes = 0, len(CIFAR10_CLASS_NAMES)
    elif label_mode == "coarse":
        column, num_classes = 0, len(CIFAR100_COARSE_CLASS_NAMES)
    else:
        column, num_classes = 1, len(CIFAR100_FINE_CLASS_NAMES)
    train = _read_split(folder, version, version.train_files, column, num_classes)
    test = _read_split(folder, version, version.test_files, column, num_classes)
    return train, test


def load_cifar10(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    partition: PartitionOptions = DEFAULT_PARTITION,
) -> FederatedDataset:
    """CIFAR-10's 50,000 training images split into clients.

    Args:
      data_dir: the root data folder (``<data_dir>/cifar-10-batches-bin/`` or the archive
        ``<data_dir>/cifar-10-binary.tar.gz``).
      download: fetch the archive (170 MB) when neither is there.
      partition: how the training images are split into clients (`PartitionOptions`; default
        Dirichlet(0.5) label skew over 100 clients, as Hsu et al. 2019 use CIFAR-10).

    Returns:
      A `FederatedDataset` named ``"cifar10"``, the 10,000 test images as ``central_test``.

    Example:
      >>> dataset = load_cifar10(partition=PartitionOptions(alpha=0.1))  # doctest: +SKIP
    """
    partition = check_partition(partition, "cifar10")  # before any file is read
    train, central_test = load_cifar_arrays(CIFAR10, data_dir, download)
    return centralized_dataset("cifar10", train, central_test, partition,
                               image_info(CIFAR10_CLASS_NAMES, IMAGE_SHAPE))


def load_cifar100(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    label_mode: str = "fine",
    partition: PartitionOptions = DEFAULT_PARTITION,
) -> FederatedDataset:
    """CIFAR-100's 50,000 training images split into clients.

    (TFF's federated CIFAR-100, 500 clients by a two-level Pachinko allocation, is the
    ``tff_cifar100`` dataset.)

    Args:
      data_dir: the root data folder (``<data_dir>/cifar-100-binary/`` or the archive
        ``<data_dir>/cifar-100-binary.tar.gz``).
      download: fetch the archive (169 MB) when neither is there.
      label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
      partition: how the training images are split into clients (`PartitionOptions`; default
        Dirichlet(0.5) label skew over 100 clients).

    Returns:
      A `FederatedDataset` named ``"cifar100"``, the 10,000 test images as ``central_test``;
      ``info["label_mode"]`` says which labels ``y`` holds.
    """
    partition = check_partition(partition, "cifar100")  # before any file is read
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    names = CIFAR100_FINE_CLASS_NAMES if label_mode == "fine" else CIFAR100_COARSE_CLASS_NAMES
    train, central_test = load_cifar_arrays(CIFAR100, data_dir, download, label_mode)
    info = {**image_info(names, IMAGE_SHAPE), "label_mode": label_mode}
    return centralized_dataset("cifar100", train, central_test, partition, info)
