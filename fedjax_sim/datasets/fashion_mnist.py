"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) as a federated dataset.

70,000 28x28 grayscale images of 10 clothing classes (60,000 train, 10,000 test) in Zalando's
four IDX files. The 60k training images are split into clients by a partitioner (Dirichlet label
skew, IID, shards, quantity skew or k classes per client); the 10k test images are the central
test set.

The files live in ``<data_dir>/fashion-mnist/`` (see `fedjax_sim.datasets.download.data_dir`),
gzip'd as distributed (``train-images-idx3-ubyte.gz`` ...) or already decompressed. Integrity is
checked on the *decompressed* IDX bytes, so any gzip wrapping of the same content is accepted
(e.g. Debian's ``dataset-fashion-mnist`` package rewrites the gzip header, which changes the
``.gz`` digest but not the content); downloads are additionally checked against upstream's
``.gz`` digest before they are kept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

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

URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""Where Zalando's README (github.com/zalandoresearch/fashion-mnist) points for the files."""

FOLDER = "fashion-mnist"
"""Sub-folder of the data folder that holds the four files."""

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

IMAGE_SHAPE = (28, 28)


# gz_sha256: upstream's .gz (checked on download; the digest tensorflow-datasets registers);
# content_sha256: the decompressed IDX bytes (checked on every load).
_FILES = {
    ("train", "images"): idx.IdxFile(
        "train-images-idx3-ubyte",
        gz_sha256="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train", "labels"): idx.IdxFile(
        "train-labels-idx1-ubyte",
        gz_sha256="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("test", "images"): idx.IdxFile(
        "t10k-images-idx3-ubyte",
        gz_sha256="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("test", "labels"): idx.IdxFile(
        "t10k-labels-idx1-ubyte",
        gz_sha256="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}

# The IDX parser lives in `fedjax_sim.datasets.idx` (shared with MNIST and EMNIST).
read_idx = idx.read_idx


def _load_file(folder: Path, spec: idx.IdxFile, download: bool) -> np.ndarray:
    """Finds (or downloads) one file, checks its decompressed digest and parses it."""
    gz_path, plain_path = folder / f"{spec.name}.gz", folder / spec.name
    if not gz_path.is_file() and plain_path.is_file():
        path = plain_path
    else:
        path = download_lib.ensure_file(
            gz_path, url=spec.url(URL_BASE), sha256=spec.gz_sha256, download=download
        )
    data = idx.read_bytes(path)
    array = idx.parse_idx(data, path)  # format errors first: they say more than a digest does
    download_lib.check_sha256(
        path, hashlib.sha256(data).hexdigest(), spec.content_sha256, what="decompressed IDX content"
    )
    return array


def read_fashion_mnist_files(
    folder: str | os.PathLike, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four files of ``folder`` as stored: ``{split: (images, labels)}``, digests checked.

    Args:
      folder: the folder with ``train-images-idx3-ubyte(.gz)`` and the three other files.
      download: fetch missing files from `URL_BASE` (verified, atomic).

    Returns:
      ``{"train": ..., "test": ...}``, each ``(uint8 [N, 28, 28], uint8 [N])`` (read-only
      big-endian views of the files; uint8 has no byte order).
    """
    folder = Path(folder)
    return {
        split: (_load_file(folder, _FILES[split, "images"], download),
                _load_file(folder, _FILES[split, "labels"], download))
        for split in ("train", "test")
    }


def load_fashion_mnist_arrays(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Loads the train and test splits as flat arrays.

    Args:
      data_dir: the root data folder (files in ``<data_dir>/fashion-mnist/``); None falls back
        to ``$FEDJAX_SIM_DATA``, then the user cache folder.
      download: fetch missing files from `URL_BASE` (verified, atomic).

    Returns:
      ``(train, test)``, each ``{"x": float32 [N, 28, 28, 1] in [0, 1], "y": int32 [N]}`` with
      N = 60,000 and 10,000.

    Raises:
      FileNotFoundError: a file is missing and ``download`` is False (the message says where to
        put it and how to download it).
      ChecksumError: a file's decompressed content is not the expected one.
      ValueError: a file is not a valid (gzip'd) IDX file.
    """
    files = read_fashion_mnist_files(download_lib.data_dir(data_dir) / FOLDER, download)
    splits = []
    for split in ("train", "test"):
        images, labels = files.pop(split)
        x = images.reshape(-1, *IMAGE_SHAPE, 1).astype(np.float32)
        x /= np.float32(255.0)  # in place: one float32 copy of the images, no more
        splits.append({"x": x, "y": labels.astype(np.int32)})
    return splits[0], splits[1]


def load_fashion_mnist(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    partition: PartitionOptions = DEFAULT_PARTITION,
) -> FederatedDataset:
    """Fashion-MNIST's 60,000 training images split into clients.

    Args:
      data_dir: the root data folder (see `load_fashion_mnist_arrays`).
      download: fetch missing files.
      partition: how the training images are split into clients (`PartitionOptions`;
        default Dirichlet(0.5) label skew over 100 clients); ``partition.seed`` seeds the
        partition and, independently, the per-client test split of ``test_fraction``.

    Returns:
      A `FederatedDataset` named ``"fashion_mnist"``: ``train`` (and ``test`` when
      ``test_fraction > 0``) over the clients, the 10,000 test images as ``central_test``, and
      ``info`` with ``num_classes``, ``pad_label``, ``input_shape``, ``input_dtype`` and
      ``class_names``.

    Example:
      >>> dataset = load_fashion_mnist(  # doctest: +SKIP
      ...     partition=PartitionOptions("dirichlet", num_clients=100, alpha=0.1))
      >>> dataset.train.num_examples  # doctest: +SKIP
      60000
    """
    partition = check_partition(partition, "fashion_mnist")  # before any file is read
    train, central_test = load_fashion_mnist_arrays(data_dir, download)
    return centralized_dataset("fashion_mnist", train, central_test, partition,
                               image_info(CLASS_NAMES, (*IMAGE_SHAPE, 1)))
