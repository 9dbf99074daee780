"""MNIST (LeCun et al. 1998) and EMNIST (Cohen et al. 2017) from IDX files, split into clients.

Both are centralized datasets: the training images are split into clients by a partitioner
(`fedjax_sim.data.partition.split_into_clients`: Dirichlet label skew, IID, shards ...), the
test images are the central test set. Images come back as float32 ``[N, 28, 28, 1]`` in
``[0, 1]`` (pixel / 255), labels as int32.

**MNIST** ("Gradient-based learning applied to document recognition", Proc. IEEE 1998): the
four files ``train-images-idx3-ubyte`` ... in ``<data_dir>/mnist/``, gzip'd as distributed or
decompressed. A ``.gz`` file is checked against the sha256 of the distributed ``.gz`` (the
digests tensorflow-datasets registers for the same files); a decompressed file cannot be
checked by digest (no published sha256 of the decompressed bytes is at hand), so it is checked
by shape and label range only.

**EMNIST** ("EMNIST: an extension of MNIST to handwritten letters", arXiv:1702.05373): NIST's
``gzip.zip`` (562 MB, all six splits) in ``<data_dir>/emnist/``, read in place without
extracting; its sha256 is checked on every load (about a second). An extracted copy also
works: ``<data_dir>/emnist/gzip/emnist-<split>-train-images-idx3-ubyte.gz`` ... (checked by
shape, example counts and label range). EMNIST stores every image transposed (mirrored and
rotated by 90 degrees); the loader transposes it back, so characters read upright as in MNIST.
``letters`` labels are 1..26 in the files and become 0..25 here.

Splits (Cohen et al. 2017, Table II): ``byclass`` 62 classes (digits, upper- and lower-case
letters; 697,932 train / 116,323 test), ``bymerge`` and ``balanced`` 47 classes (case merged
for 15 letters; 697,932 / 116,323 and 112,800 / 18,800), ``letters`` 26 (124,800 / 20,800),
``digits`` 10 (240,000 / 40,000), ``mnist`` 10 (60,000 / 10,000). The writers' ids are not in
these files: for EMNIST split by writer, use the TFF or LEAF versions (``tff_emnist``,
``leaf_femnist``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import string
import zipfile
from pathlib import Path

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.datasets import download as download_lib  # `download` is an argument name
from fedjax_sim.datasets import idx
from fedjax_sim.datasets.partition_options import (
    DEFAULT_PARTITION,
    PartitionOptions,
    centralized_dataset,
    check_partition,
    image_info,
)

IMAGE_SHAPE = (28, 28)

# --- MNIST ----------------------------------------------------------------------------------------

MNIST_URL_BASE = "https://storage.googleapis.com/cvdf-datasets/mnist/"
"""The mirror tensorflow-datasets downloads from (LeCun's page, yann.lecun.com/exdb/mnist/, has
the same files but often refuses scripted downloads)."""

MNIST_FOLDER = "mnist"
"""Sub-folder of the data folder that holds the four files."""


# sha256 of the distributed .gz files: tensorflow_datasets/url_checksums/mnist.txt.
MNIST_FILES = {
    ("train", "images"): idx.IdxFile(
        "train-images-idx3-ubyte",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        (60_000, 28, 28)),
    ("train", "labels"): idx.IdxFile(
        "train-labels-idx1-ubyte",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        (60_000,)),
    ("test", "images"): idx.IdxFile(
        "t10k-images-idx3-ubyte",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        (10_000, 28, 28)),
    ("test", "labels"): idx.IdxFile(
        "t10k-labels-idx1-ubyte",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        (10_000,)),
}

# --- EMNIST ---------------------------------------------------------------------------------------

EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
"""NIST's archive of all six splits as gzip'd IDX files (tensorflow-datasets uses it too)."""

EMNIST_ZIP_SHA256 = "fb9bb67e33772a9cc0b895e4ecf36d2cf35be8b709693c3564cea2a019fcda8e"
"""sha256 of ``gzip.zip`` (561,753,746 bytes): tensorflow_datasets/url_checksums/emnist.txt."""

EMNIST_FOLDER = "emnist"
EMNIST_ARCHIVE = "gzip.zip"
EMNIST_MEMBER_FOLDER = "gzip"
"""The folder inside ``gzip.zip`` that holds the files (and the folder an extraction makes)."""

_DIGITS = tuple(string.digits)
_UPPER = tuple(string.ascii_uppercase)
_LOWER = tuple(string.ascii_lowercase)
# bymerge / balanced merge the 15 letters whose cases look alike (c i j k l m o p s u v w x y z).
_UNMERGED_LOWER = tuple("abdefghnqrt")


@dataclasses.dataclass(frozen=True)
class EmnistSplit:
    """One EMNIST split: class names and example counts (Cohen et al. 2017, Table II)."""

    class_names: tuple[str, ...]
    num_train: int
    num_test: int
    label_offset: int = 0  # subtracted from the stored labels (letters are stored as 1..26)


EMNIST_SPLITS = {
    "byclass": EmnistSplit(_DIGITS + _UPPER + _LOWER, 697_932, 116_323),
    "bymerge": EmnistSplit(_DIGITS + _UPPER + _UNMERGED_LOWER, 697_932, 116_323),
    "balanced": EmnistSplit(_DIGITS + _UPPER + _UNMERGED_LOWER, 112_800, 18_800),
    "letters": EmnistSplit(tuple(u + u.lower() for u in _UPPER), 124_800, 20_800, 1),
    "digits": EmnistSplit(_DIGITS, 240_000, 40_000),
    "mnist": EmnistSplit(_DIGITS, 60_000, 10_000),
}


def emnist_file_name(split: str, part: str, kind: str) -> str:
    """``emnist-<split>-<part>-<images-idx3|labels-idx1>-ubyte.gz``, as in ``gzip.zip``."""
    suffix = "images-idx3" if kind == "images" else "labels-idx1"
    return f"emnist-{split}-{part}-{suffix}-ubyte.gz"


# --- shared ---------------------------------------------------------------------------------------


def _images_and_labels(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    images_path: str,
    labels_path: str,
    *,
    transpose: bool = False,
    label_offset: int = 0,
) -> dict[str, np.ndarray]:
    """``{"x": float32 [N, 28, 28, 1] in [0, 1], "y": int32 [N]}`` from parsed IDX arrays."""
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; expected one label per image (files of different splits?)"
        )
    y = labels.astype(np.int32) - np.int32(label_offset)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{labels_path}: labels span [{int(y.min()) + label_offset}, "
            f"{int(y.max()) + label_offset}], expected [{label_offset}, "
            f"{num_classes + label_offset}) ({num_classes} classes)"
        )
    if transpose:
        images = images.transpose(0, 2, 1)
    x = images.astype(np.float32, order="C")[..., None]
    x /= np.float32(255.0)  # in place: one float32 copy of the images, no more
    return {"x": x, "y": y}


# --- MNIST loading --------------------------------------------------------------------------------


def _load_mnist_file(folder: Path, spec: idx.IdxFile, download: bool) -> tuple[np.ndarray, str]:
    """Finds (or downloads) one MNIST file, checks it and parses it."""
    gz_path, plain_path = folder / f"{spec.name}.gz", folder / spec.name
    if not gz_path.is_file() and plain_path.is_file():
        path = plain_path
        raw = path.read_bytes()
    else:
        path = download_lib.ensure_file(
            gz_path, url=spec.url(MNIST_URL_BASE), sha256=spec.gz_sha256, download=download
        )
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # the distributed .gz: its digest is known
            download_lib.check_sha256(path, hashlib.sha256(raw).hexdigest(), spec.gz_sha256)
    array = idx.parse_idx(idx.gunzip_if_gzipped(raw, path), path)
    idx.check_shape(array, spec.shape, path, "IDX values")
    return idx.to_native(array), str(path)


def load_mnist_arrays(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MNIST's train and test splits as flat arrays.

    Args:
      data_dir: the root data folder (files in ``<data_dir>/mnist/``); None falls back to
        ``$FEDJAX_SIM_DATA``, then the user cache folder.
      download: fetch missing files from `MNIST_URL_BASE` (sha256-checked, atomic).

    Returns:
      ``(train, test)``, each ``{"x": float32 [N, 28, 28, 1] in [0, 1], "y": int32 [N]}`` with
      N = 60,000 and 10,000.

    Raises:
      FileNotFoundError: a file is missing and ``download`` is False (the message says where
        to put it and how to download it).
      ChecksumError: a ``.gz`` file is not the distributed one.
      DataError: a file is not a valid IDX file of the expected shape.
    """
    folder = download_lib.data_dir(data_dir) / MNIST_FOLDER
    splits = []
    for split in ("train", "test"):
        images, images_path = _load_mnist_file(folder, MNIST_FILES[split, "images"], download)
        labels, labels_path = _load_mnist_file(folder, MNIST_FILES[split, "labels"], download)
        splits.append(_images_and_labels(images, labels, 10, images_path, labels_path))
    return splits[0], splits[1]


def load_mnist(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    partition: PartitionOptions = DEFAULT_PARTITION,
) -> FederatedDataset:
    """MNIST's 60,000 training digits split into clients.

    Args:
      data_dir: the root data folder (see `load_mnist_arrays`).
      download: fetch missing files.
      partition: how the training digits are split into clients (`PartitionOptions`; default
        Dirichlet(0.5) label skew over 100 clients).

    Returns:
      A `FederatedDataset` named ``"mnist"`` with the 10,000 test digits as ``central_test``.

    Example:
      >>> dataset = load_mnist(partition=PartitionOptions("iid"))  # doctest: +SKIP
    """
    partition = check_partition(partition, "mnist")  # before any file is read
    train, central_test = load_mnist_arrays(data_dir, download)
    return centralized_dataset("mnist", train, central_test, partition,
                               image_info(_DIGITS, (*IMAGE_SHAPE, 1)))


# --- EMNIST loading -------------------------------------------------------------------------------


def _emnist_missing_message(folder: Path, split: str) -> str:
    example = folder / EMNIST_MEMBER_FOLDER / emnist_file_name(split, "train", "images")
    return (
        f"EMNIST not found: expected NIST's archive at {folder / EMNIST_ARCHIVE} (or its "
        f"extracted files, e.g. {example}). "
        f"Get gzip.zip (562 MB, sha256 {EMNIST_ZIP_SHA256}) from {EMNIST_URL} "
        "(page: https://www.nist.gov/itl/products-and-services/emnist-dataset). Fix it either "
        f"way: (1) put it in {folder} or point the data folder at a copy that has "
        f"{EMNIST_FOLDER}/{EMNIST_ARCHIVE} in it: set {download_lib.DATA_DIR_ENV}=/path/to/data "
        "or pass data_dir= (config key `dataset.data_dir`); or (2) let the loader download it: "
        "pass download=True (config key `dataset.download: true`)."
    )


def _emnist_members(folder: Path, split: str, download: bool) -> dict[tuple[str, str], tuple]:
    """``{(part, kind): (bytes, name for messages)}`` of the four files of one split."""
    names = {
        (part, kind): emnist_file_name(split, part, kind)
        for part in ("train", "test")
        for kind in ("images", "labels")
    }
    archive = folder / EMNIST_ARCHIVE
    extracted = folder / EMNIST_MEMBER_FOLDER
    if not archive.is_file() and all((extracted / n).is_file() for n in names.values()):
        return {key: ((extracted / n).read_bytes(), str(extracted / n)) for key, n in names.items()}
    download_lib.ensure_archive(
        archive, url=EMNIST_URL, sha256=EMNIST_ZIP_SHA256, download=download,
        missing_message=_emnist_missing_message(folder, split),
    )
    members = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            present = set(zf.namelist())
            for key, name in names.items():
                member = f"{EMNIST_MEMBER_FOLDER}/{name}"
                if member not in present:
                    raise DataError(
                        f"{archive}: has no member {member!r}; expected NIST's gzip.zip with "
                        f"{EMNIST_MEMBER_FOLDER}/emnist-<split>-<train|test>-<images-idx3|"
                        "labels-idx1>-ubyte.gz for the six splits"
                    )
                members[key] = (zf.read(member), f"{archive}:{member}")  # CRC-checked
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
        raise DataError(f"{archive}: not a readable zip archive ({e}); fetch it again") from e
    return members


def load_emnist_arrays(
    split: str = "byclass",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One EMNIST split's train and test sets as flat arrays, images upright.

    Args:
      split: ``"byclass"``, ``"bymerge"``, ``"balanced"``, ``"letters"``, ``"digits"`` or
        ``"mnist"``.
      data_dir: the root data folder (``<data_dir>/emnist/gzip.zip``); None falls back to
        ``$FEDJAX_SIM_DATA``, then the user cache folder.
      download: fetch a missing ``gzip.zip`` from `EMNIST_URL` (sha256-checked, atomic).

    Returns:
      ``(train, test)``, each ``{"x": float32 [N, 28, 28, 1] in [0, 1], "y": int32 [N]}``.

    Raises:
      ValueError: an unknown split.
      FileNotFoundError: neither the archive nor the extracted files are there.
      ChecksumError: the archive is not NIST's ``gzip.zip``.
      DataError: a member is missing or not a valid IDX file of the expected shape.
    """
    if split not in EMNIST_SPLITS:
        raise ValueError(f"split must be one of {sorted(EMNIST_SPLITS)}, got {split!r}")
    spec = EMNIST_SPLITS[split]
    folder = download_lib.data_dir(data_dir) / EMNIST_FOLDER
    members = _emnist_members(folder, split, download)
    out = []
    for part, count in (("train", spec.num_train), ("test", spec.num_test)):
        arrays = {}
        for kind, shape in (("images", (count, *IMAGE_SHAPE)), ("labels", (count,))):
            raw, where = members.pop((part, kind))  # drop the compressed bytes once parsed
            array = idx.parse_idx(idx.gunzip_if_gzipped(raw, where), where)
            idx.check_shape(array, shape, where, f"EMNIST {split} {part} {kind}")
            arrays[kind] = (array, where)
        (images, images_path), (labels, labels_path) = arrays["images"], arrays["labels"]
        out.append(
            _images_and_labels(
                images,
                labels,
                len(spec.class_names),
                images_path,
                labels_path,
                transpose=True,
                label_offset=spec.label_offset,
            )
        )
    return out[0], out[1]


def load_emnist(
    *,
    split: str = "byclass",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    partition: PartitionOptions = DEFAULT_PARTITION,
) -> FederatedDataset:
    """One EMNIST split's training images split into clients.

    Args:
      split: the EMNIST split (see `EMNIST_SPLITS`); ``"byclass"`` has the 62 classes of
        FEMNIST.
      data_dir: the root data folder (see `load_emnist_arrays`).
      download: fetch a missing ``gzip.zip``.
      partition: how the training images are split into clients (`PartitionOptions`; default
        Dirichlet(0.5) label skew over 100 clients).

    Returns:
      A `FederatedDataset` named ``"emnist"`` with the split's test images as
      ``central_test``; ``info["class_names"]`` are the characters (``"Aa"`` for a merged
      letter class), ``info["split"]`` the split.
    """
    partition = check_partition(partition, "emnist")  # before any file is read
    train, central_test = load_emnist_arrays(split, data_dir, download)
    info = image_info(EMNIST_SPLITS[split].class_names, (*IMAGE_SHAPE, 1))
    return centralized_dataset("emnist", train, central_test, partition, {**info, "split": split})
