"""TFF's federated EMNIST [1, 2] and CIFAR-100 [3, 4]: numeric features, converted chunk by chunk.

References:
  [1] Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018, arXiv:1812.01097.
  [2] Cohen et al., "EMNIST: an extension of MNIST to handwritten letters", 2017,
      arXiv:1702.05373.
  [3] Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
  [4] Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.datasets.tff_h5.files import cached_load, split_files
from fedjax_sim.datasets.tff_h5.reader import Feature, offsets, test_clients, train_clients

CIFAR_CROP = 24


def _numeric_dataset(name: str, train_path: Path, test_path: Path, features: Sequence[Feature],
                     outputs: Mapping[str, tuple[tuple[int, ...], Any]], transform,
                     allocate, info: dict, central_test: bool = False) -> FederatedDataset:
    """Reads numeric features split by split, transforming each chunk into the outputs."""
    train = train_clients(train_path, features[0])
    if central_test:
        test_file = train_clients(test_path, features[0])
        splits = {"train": train, "central_test": test_file}
        extra = 0
    else:
        test, extra = test_clients(test_path, train.clients, features[0])
        splits = {"train": train, "test": test}
    parts: dict[str, Any] = {}
    for split, source in splits.items():
        total = int(source.sizes.sum())
        arrays = {key: allocate(split, key, (total, *shape), dtype)
                  for key, (shape, dtype) in outputs.items()}
        for lo, hi, values in source.read_chunks(features):
            for key, value in transform(values).items():
                arrays[key][lo:hi] = value
        if split == "central_test":
            parts[split] = arrays
        else:
            parts[split] = FederatedData(arrays, offsets(source.sizes),
                                         np.asarray(train.clients))
    info = {**info, "test_only_clients": extra, "source_files": [str(train_path),
                                                                 str(test_path)]}
    return FederatedDataset(name=name, train=parts["train"], test=parts.get("test"),
                            central_test=parts.get("central_test"), info=info)


def load_tff_emnist(
    *,
    only_digits: bool = True,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated EMNIST by writer from TFF's h5 files [1, 2].

    Args:
      only_digits: the digits-only files (3,383 writers, 10 classes) or all 62 classes
        (3,400 writers).
      data_dir: the root data folder; files in ``<data_dir>/tff/`` (``fed_emnist[_digitsonly]
        _{train,test}.h5`` or the ``.tar.bz2`` archive, which is checked and extracted).
      download: fetch a missing archive from `URL_BASE`.
      train_file, test_file: explicit h5 paths (override the folder).
      cache: convert once into a memory-mapped cache and open that afterwards.
      cache_dir: where the cache folder goes (default ``cache/`` beside the train file).

    Returns:
      ``train`` and ``test`` over the writers: ``x`` float32 ``[n, 28, 28, 1]`` (TFF's pixels:
      1.0 is the background), ``y`` int32 ``[n]``.
    """
    prefix = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    train_path, test_path = split_files(prefix, data_dir, train_file, test_file, download)
    features = [Feature("pixels", (28, 28), "f"), Feature("label", (), "iu")]
    num_classes = 10 if only_digits else 62

    def transform(values):
        return {"x": values["pixels"].reshape(-1, 28, 28, 1),
                "y": values["label"].astype(np.int32)}

    def build(allocate):
        return _numeric_dataset(
            "tff_emnist", train_path, test_path, features,
            {"x": ((28, 28, 1), np.float32), "y": ((), np.int32)}, transform, allocate,
            {"num_classes": num_classes, "pad_label": None, "input_shape": (28, 28, 1),
             "input_dtype": "float32", "only_digits": only_digits})

    return cached_load("tff_emnist", {"only_digits": only_digits}, [train_path, test_path], cache,
                 cache_dir, build)


def standardize_images(images: np.ndarray, crop: int = CIFAR_CROP) -> np.ndarray:
    """TFF's CIFAR-100 evaluation preprocessing, vectorized over ``[n, H, W, C]`` images.

    ``tf.image.resize_with_crop_or_pad`` to ``crop x crop`` (a center crop, offset
    ``(H - crop) // 2``) of the float pixel values, then ``tf.image.per_image_standardization``:
    ``(x - mean) / max(std, 1 / sqrt(crop * crop * C))`` per image.

    Returns:
      float32 ``[n, crop, crop, C]``.
    """
    n, height, width, channels = images.shape
    top, left = (height - crop) // 2, (width - crop) // 2
    x = images[:, top:top + crop, left:left + crop, :].astype(np.float32)
    if n == 0:
        return x
    mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = x.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    scale = np.maximum(std, 1.0 / np.sqrt(crop * crop * channels))
    return ((x - mean) / scale).astype(np.float32)


def load_tff_cifar100(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated CIFAR-100 from TFF's h5 files [3, 4]: 500 train clients, 100 test clients.

    Images are center-cropped to 24x24 and standardized per image at conversion
    (`standardize_images`, TFF's evaluation preprocessing); TFF's train-time random crops and
    flips are not applied. The test clients are not the training clients, so the test file
    becomes the central test set.

    Args: as `load_tff_emnist` (files ``fed_cifar100_{train,test}.h5``).

    Returns:
      ``train`` over 500 clients and ``central_test``: ``x`` float32 ``[n, 24, 24, 3]``,
      ``y`` int32 ``[n]`` in ``[0, 100)``.
    """
    train_path, test_path = split_files("fed_cifar100", data_dir, train_file, test_file, download)
    features = [Feature("image", (32, 32, 3), "u"), Feature("label", (), "iu")]

    def transform(values):
        return {"x": standardize_images(values["image"]), "y": values["label"].astype(np.int32)}

    def build(allocate):
        return _numeric_dataset(
            "tff_cifar100", train_path, test_path, features,
            {"x": ((CIFAR_CROP, CIFAR_CROP, 3), np.float32), "y": ((), np.int32)}, transform,
            allocate, {"num_classes": 100, "pad_label": None,
                       "input_shape": (CIFAR_CROP, CIFAR_CROP, 3), "input_dtype": "float32"},
            central_test=True)

    return cached_load("tff_cifar100", {}, [train_path, test_path], cache, cache_dir, build)
