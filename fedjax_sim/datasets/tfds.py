"""Any TensorFlow Datasets (TFDS) dataset as a federated dataset, read without TensorFlow.

TFDS datasets stored in the ``array_record`` format are read through TFDS's random-access data
sources (``tfds.builder_from_directory(path).as_data_source(split)``, the machinery behind
``tfds.data_source``): no TensorFlow, no ``tf.data``. Examples are fetched in batches with
``__getitems__`` and stacked into flat numpy arrays ``{"x", "y"}``; the training split is then
cut into clients by any partitioner of `fedjax_sim.data.partition.split_into_clients`, or by a
feature that holds each example's natural client id (``client_id_feature``), and the test split
becomes the central test set. Split slicing (``"train[:10%]"``, ``"train+test"``) works as in
TFDS.

TensorFlow is needed by TFDS only to *prepare* most stock datasets (and to read ``tfrecord``
files). Without it:

* `build_tfds_from_arrays` writes any ``{split: {feature: array}}`` as a real TFDS dataset
  (``GeneratorBasedBuilder``, ``file_format="array_record"``, images fed as PIL images);
* `build_fashion_mnist_tfds` builds Fashion-MNIST (``fashion_mnist`` 3.0.1, the stock builder's
  name, version and features) from Zalando's four IDX files;
* a dataset prepared elsewhere with ``tfds build NAME --file_format=array_record`` can be copied
  into the data folder.

Reference: TensorFlow Datasets, "TFDS and Grain / random access data sources"
(https://www.tensorflow.org/datasets/api_docs/python/tfds/data_source).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.data.partition import PARTITIONS
from fedjax_sim.datasets import download as download_lib
from fedjax_sim.datasets.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASS_NAMES
from fedjax_sim.datasets.fashion_mnist import read_fashion_mnist_files
from fedjax_sim.datasets.partition_options import (
    DEFAULT_PARTITION,
    PartitionOptions,
    centralized_dataset,
    check_partition,
)

TFDS_FOLDER = "tfds"
"""Sub-folder of the root data folder used as the TFDS data dir when none is given."""

IMAGE_DTYPES = ("float32", "uint8")

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _tfds():
    """``tensorflow_datasets``, imported on first use (0.2 s; it never imports TensorFlow)."""
    # Lazy so that importing this module (the registry does, for `tfds` configs only) and the
    # functions that never touch TFDS stay cheap; not to dodge an import cycle.
    import tensorflow_datasets

    return tensorflow_datasets


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The TFDS data dir: ``data_dir`` itself, else ``<root data folder>/tfds``.

    The root data folder is ``$FEDJAX_SIM_DATA`` or the user cache folder (see
    `fedjax_sim.datasets.download.data_dir`).
    """
    if data_dir is not None and os.fspath(data_dir) != "":
        return download_lib.data_dir(data_dir)
    return download_lib.data_dir(None) / TFDS_FOLDER


# --- reading ------------------------------------------------------------------------------------


def _prepared_versions(folder: Path) -> list[str]:
    """The version sub-folders of ``folder`` that hold a prepared dataset, oldest first."""
    if not folder.is_dir():
        return []
    versions = [
        child.name
        for child in folder.iterdir()
        if _VERSION.match(child.name) and (child / "dataset_info.json").is_file()
    ]
    return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def _datasets_in(root: Path) -> list[str]:
    """``name`` / ``name/config`` of every prepared dataset under the data dir ``root``."""
    if not root.is_dir():
        return []
    found = []
    for info in root.glob("*/*/dataset_info.json"):
        found.append(info.parent.parent.name)
    for info in root.glob("*/*/*/dataset_info.json"):
        found.append(f"{info.parent.parent.parent.name}/{info.parent.parent.name}")
    return sorted(set(found))


def open_tfds_builder(name: str, data_dir: str | os.PathLike | None = None, download: bool = False):
    """The read-only TFDS builder of a prepared dataset, found by name in the data dir.

    Args:
      name: ``"name"``, ``"name:1.2.3"``, ``"name/config"`` or ``"name/config:1.2.3"``; without a
        version, the newest prepared one.
      data_dir: the TFDS data dir (see `tfds_data_dir`).
      download: when the dataset is not there, run TFDS's own ``download_and_prepare`` in the
        array_record format (online; most stock builders need TensorFlow to prepare).

    Returns:
      A ``tfds.core.DatasetBuilder`` whose ``as_data_source`` reads the files.

    Raises:
      DataError: the dataset is not in the data dir (the message lists the datasets there and
        how to build one), or it is stored in a format that needs TensorFlow.
    """
    tfds = _tfds()
    root = tfds_data_dir(data_dir)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+(/[\w.-]+)?(:[\d.]+)?", name):
        raise ValueError(
            f"tfds_name must be a TFDS dataset name such as 'fashion_mnist', 'mnist:3.0.1' or "
            f"'name/config', got {name!r}"
        )
    base, _, version = name.partition(":")
    folder = root / base
    versions = _prepared_versions(folder)
    if version and version not in versions:
        versions = []
    if not versions and download:
        builder = tfds.builder(name, data_dir=os.fspath(root), file_format="array_record")
        try:
            builder.download_and_prepare()
        except Exception as error:  # offline, TensorFlow missing, a checksum: all say the same
            raise DataError(
                f"TFDS could not download and prepare {name!r} in {root} "
                f"({type(error).__name__}: {error}); most stock builders need the internet and "
                "TensorFlow to prepare. Build it offline with "
                "fedjax_sim.datasets.tfds.build_tfds_from_arrays, or run "
                f"`tfds build {base} --file_format=array_record --data_dir {root}` where "
                "TensorFlow is installed"
            ) from error
        versions = _prepared_versions(folder)
    if not versions:
        present = _datasets_in(root)
        wanted = f"version {version} of " if version else ""
        raise DataError(
            f"no prepared TFDS dataset: {wanted}{base!r} is not in the TFDS data dir {root} "
            f"(datasets there: {present or 'none'}; versions of {base!r} there: "
            f"{_prepared_versions(folder) or 'none'}). Build it offline with "
            "fedjax_sim.datasets.tfds.build_tfds_from_arrays (Fashion-MNIST: "
            "build_fashion_mnist_tfds), copy a dataset prepared with `tfds build "
            f"{base} --file_format=array_record` there, set dataset.data_dir, or set "
            "dataset.download: true online"
        )
    path = folder / (version or versions[-1])
    try:
        builder = tfds.builder_from_directory(os.fspath(path))
    except Exception as error:  # TFDS raises several kinds for a damaged folder
        raise DataError(f"{path}: not a readable TFDS dataset folder ({error})") from error
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise DataError(
            f"{path}: TFDS dataset {name!r} is stored as {file_format!r}, which only "
            "TensorFlow reads; expected 'array_record' (rebuild it with "
            "`tfds build --file_format=array_record`, or build_tfds_from_arrays)"
        )
    return builder


def _split_names(builder) -> list[str]:
    return sorted(builder.info.splits.keys())


def _data_source(builder, split: str, what: str):
    """``builder.as_data_source(split)``, with a DataError naming the splits that exist."""
    base_names = re.findall(r"([A-Za-z0-9_-]+)(?:\[[^\]]*\])?", split)
    splits = _split_names(builder)
    unknown = [b for b in base_names if b not in splits]
    if not base_names or unknown:
        raise DataError(
            f"{builder.data_dir}: {what}={split!r} names no split of TFDS dataset "
            f"{builder.name!r}; splits: {splits} (slices such as 'train[:10%]' are allowed)"
        )
    try:
        return builder.as_data_source(split=split)
    except (ValueError, KeyError, AssertionError) as error:
        raise DataError(
            f"{builder.data_dir}: {what}={split!r} is not a valid split of TFDS dataset "
            f"{builder.name!r} ({error}); splits: {splits}"
        ) from error


def _describe_features(builder) -> str:
    return ", ".join(f"{k!r} ({type(v).__name__})" for k, v in builder.info.features.items())


def read_tfds_split(
    builder, split: str, features: list[str], batch_size: int = 10_000, what: str = "split"
) -> dict[str, np.ndarray]:
    """Reads ``features`` of every example of ``split`` into stacked numpy arrays.

    Examples are fetched ``batch_size`` at a time with the data source's batched
    ``__getitems__`` (2-4x faster than one ``__getitem__`` per index) and written into
    preallocated arrays.

    Args:
      builder: from `open_tfds_builder`.
      split: a TFDS split string (``"train"``, ``"train[:10%]"``, ``"train+test"``).
      features: top-level feature names to keep.
      batch_size: examples per ``__getitems__`` call.
      what: the option name for messages.

    Returns:
      ``{feature: [N, ...] array}``; text features come back as ``bytes`` objects in an object
      array (decode them with `_decode_text`).
    """
    available = list(builder.info.features.keys())
    for feature in features:
        if feature not in available:
            raise DataError(
                f"{builder.data_dir}: TFDS dataset {builder.name!r} has no feature {feature!r}; "
                f"features: {_describe_features(builder)}"
            )
    source = _data_source(builder, split, what)
    num_examples = len(source)
    if num_examples == 0:
        raise DataError(f"{builder.data_dir}: {what}={split!r} holds no examples")
    out: dict[str, np.ndarray] = {}
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        examples = source.__getitems__(range(start, stop))
        for feature in features:
            values = [example[feature] for example in examples]
            if feature not in out:
                first = np.asarray(values[0])
                dtype = object if isinstance(values[0], (bytes, str)) else first.dtype
                out[feature] = np.empty((num_examples, *first.shape), dtype)
            out[feature][start:stop] = values if out[feature].dtype == object else np.stack(values)
    return out


def _decode_text(values: np.ndarray) -> np.ndarray:
    """bytes/str object array -> a numpy unicode array; other arrays unchanged."""
    if values.dtype != object:
        return values
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])


def _inputs(builder, values: np.ndarray, image_dtype: str, feature: str) -> np.ndarray:
    if values.dtype == object or values.dtype.kind not in "biuf":
        raise DataError(
            f"{builder.data_dir}: feature {feature!r} of TFDS dataset {builder.name!r} holds "
            f"{values.dtype} values, expected numbers (an image or tensor); features: "
            f"{_describe_features(builder)}"
        )
    if image_dtype == "uint8":
        if values.dtype != np.uint8:
            raise DataError(
                f"{builder.data_dir}: image_dtype='uint8' but feature {feature!r} is "
                f"{values.dtype}; use image_dtype='float32'"
            )
        return values
    if values.dtype == np.uint8:  # 8-bit pixels -> [0, 1], like the IDX/binary loaders
        x = values.astype(np.float32)
        x /= np.float32(255.0)
        return x
    return values.astype(np.float32)


def _labels(builder, values: np.ndarray, feature: str) -> np.ndarray:
    if values.dtype.kind not in "iub":
        raise DataError(
            f"{builder.data_dir}: label feature {feature!r} of TFDS dataset {builder.name!r} "
            f"holds {values.dtype} values, expected integer class labels (a ClassLabel); "
            f"features: {_describe_features(builder)}"
        )
    return values.astype(np.int32)


def load_tfds(
    *,
    tfds_name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    split: str = "train",
    test_split: str | None = "test",
    image_feature: str = "image",
    label_feature: str = "label",
    client_id_feature: str | None = None,
    image_dtype: str = "float32",
    partition: PartitionOptions = DEFAULT_PARTITION,
    num_classes: int | None = None,
    batch_size: int = 10_000,
) -> FederatedDataset:
    """A TFDS dataset (array_record, no TensorFlow) split into clients.

    Args:
      tfds_name: TFDS name, optionally with config and version (``"fashion_mnist"``,
        ``"mnist:3.0.1"``); the newest prepared version by default. (Not ``name``: in configs
        ``dataset.name`` is ``tfds``, the loader.)
      data_dir: the TFDS data dir; default ``<root data folder>/tfds`` (`tfds_data_dir`).
      download: prepare a missing dataset with TFDS's ``download_and_prepare`` (online; most
        stock builders need TensorFlow for that).
      split: the split the clients are made of (TFDS slicing allowed: ``"train[:10%]"``).
      test_split: the central test set's split, or None for none.
      image_feature: the feature that becomes the model input ``x`` (an image or a tensor).
      label_feature: the feature that becomes the integer label ``y``.
      client_id_feature: a feature holding each example's natural client id (ints or text);
        used by ``partition="natural"`` (one client per distinct id).
      image_dtype: ``"float32"`` (8-bit images scaled to [0, 1], other numbers cast) or
        ``"uint8"`` (raw pixels).
      partition: how the examples are split into clients (`PartitionOptions`; default
        Dirichlet(0.5) label skew over 100 clients); ``"natural"`` makes one client per
        distinct ``client_id_feature``.
      num_classes: number of classes; default the label ClassLabel's ``num_classes``, else
        ``max label + 1``.
      batch_size: examples per batched read.

    Returns:
      A `FederatedDataset` named ``"tfds:<tfds_name>"`` with ``x``/``y`` arrays, the test split as
      ``central_test`` and ``info`` with ``num_classes``, ``pad_label=None``, ``input_shape``,
      ``input_dtype``, ``class_names`` (when the label is a ClassLabel with names),
      ``tfds_name``, ``tfds_version`` and ``tfds_dir``.

    Raises:
      DataError: the dataset, a split or a feature is missing (the message lists what exists),
        or a feature has the wrong kind of values.
      ValueError: an option has a bad value.
    """
    partition = check_partition(partition, f"tfds:{tfds_name}", PARTITIONS)
    natural = partition.partition == "natural"
    _check_options(partition.partition, client_id_feature, image_dtype, batch_size, num_classes)
    builder = open_tfds_builder(tfds_name, data_dir, download)
    wanted = [image_feature, label_feature]
    if natural:
        wanted.append(client_id_feature)
    train = read_tfds_split(builder, split, wanted, batch_size, what="split")
    x = _inputs(builder, train[image_feature], image_dtype, image_feature)
    y = _labels(builder, train[label_feature], label_feature)
    group_ids = None
    if natural:
        group_ids = _decode_text(train[client_id_feature])
        if group_ids.ndim != 1:
            raise DataError(
                f"{builder.data_dir}: client_id_feature {client_id_feature!r} has shape "
                f"{group_ids.shape[1:]} per example, expected one scalar id per example"
            )
    del train
    central_test = None
    if test_split is not None:
        test = read_tfds_split(
            builder, test_split, [image_feature, label_feature], batch_size, what="test_split"
        )
        central_test = {
            "x": _inputs(builder, test[image_feature], image_dtype, image_feature),
            "y": _labels(builder, test[label_feature], label_feature),
        }
    label_info = builder.info.features[label_feature]
    class_names = None
    if num_classes is None:
        num_classes = getattr(label_info, "num_classes", None)
        if num_classes is None:
            labels = [y] + ([central_test["y"]] if central_test is not None else [])
            num_classes = max(1, max(int(part.max()) for part in labels) + 1)
    names = getattr(label_info, "names", None)
    if names and not all(n == str(i) for i, n in enumerate(names)):
        class_names = list(names)
    info: dict[str, Any] = {
        "num_classes": int(num_classes),
        "input_shape": tuple(x.shape[1:]),
        "input_dtype": str(x.dtype),
        "tfds_name": builder.name,
        "tfds_version": str(builder.version),
        "tfds_dir": str(builder.data_dir),
    }
    if class_names:
        info["class_names"] = class_names
    return centralized_dataset(f"tfds:{tfds_name}", {"x": x, "y": y}, central_test, partition,
                               info, group_ids=group_ids)


def _check_options(partition, client_id_feature, image_dtype, batch_size, num_classes):
    """ValueError naming the first option with a bad value (the partition's: see
    `PartitionOptions`)."""
    if partition == "natural" and not client_id_feature:
        raise ValueError(
            "partition='natural' needs client_id_feature (the TFDS feature that holds each "
            "example's client id)"
        )
    if partition != "natural" and client_id_feature is not None:
        raise ValueError(
            f"client_id_feature={client_id_feature!r} is only used by partition='natural', got "
            f"partition={partition!r}; set partition: natural or drop client_id_feature"
        )
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {list(IMAGE_DTYPES)}, got {image_dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an int >= 1 or null, got {num_classes!r}")


# --- building -----------------------------------------------------------------------------------


def _infer_feature(name: str, values: np.ndarray):
    """A TFDS feature for ``values`` ``[N, ...]``: uint8 [N, H, W, 1|3|4] -> Image, text -> Text,
    other numbers -> Scalar / Tensor of their dtype."""
    tfds = _tfds()
    if values.dtype.kind in "USO":
        return tfds.features.Text()
    if values.dtype.kind not in "biuf":
        raise ValueError(f"feature {name!r}: cannot store {values.dtype} values in TFDS")
    if values.dtype == np.uint8 and values.ndim == 4 and values.shape[-1] in (1, 3, 4):
        return tfds.features.Image(shape=values.shape[1:])
    if values.ndim == 1:
        return tfds.features.Scalar(dtype=values.dtype)
    return tfds.features.Tensor(shape=values.shape[1:], dtype=values.dtype)


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _encoder(feature):
    """Per-example conversion for ``feature``: PIL images for Image features (TFDS encodes a
    numpy image with TensorFlow, a PIL image with Pillow), the value itself otherwise."""
    tfds = _tfds()
    if isinstance(feature, tfds.features.Image):
        from PIL import Image  # lazy: only building a dataset with images needs Pillow

        def to_pil(array: np.ndarray):
            array = np.asarray(array)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in _PIL_MODES:
                raise ValueError(
                    f"Image features take uint8 [H, W, 1|3|4] images, got {array.dtype} "
                    f"{array.shape}"
                )
            channels = array.shape[-1]
            pixels = array[..., 0] if channels == 1 else array
            return Image.fromarray(pixels, _PIL_MODES[channels])

        return to_pil
    return lambda value: value


def build_tfds_from_arrays(
    name: str,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    data_dir: str | os.PathLike,
    features: Mapping[str, Any] | None = None,
    *,
    version: str = "1.0.0",
    description: str = "",
    supervised_keys: tuple[str, str] | None = None,
    homepage: str | None = None,
    citation: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes in-memory arrays as a real TFDS dataset (array_record), offline, without TensorFlow.

    A ``tfds.core.GeneratorBasedBuilder`` subclass (unregistered) yields every split's examples
    in order (``disable_shuffling=True``, so example ``i`` of the split is row ``i`` of the
    arrays); images go through Pillow. The result is indistinguishable from a dataset that
    ``tfds build`` prepared: `load_tfds`, ``tfds.data_source(name, data_dir=...)`` and
    ``tfds.builder_from_directory`` read it.

    Args:
      name: the dataset name (snake_case, e.g. ``"my_writers"``).
      splits: ``{split: {feature: [N, ...] array}}``; every split has the same features.
      data_dir: the TFDS data dir; the dataset goes to ``<data_dir>/<name>/<version>``.
      features: ``{feature: tfds.features.FeatureConnector}`` for some or all features (e.g.
        ``tfds.features.ClassLabel(names=[...])`` for labels); the others are inferred: uint8
        ``[N, H, W, 1|3|4]`` -> ``Image``, text -> ``Text``, ``[N]`` numbers -> ``Scalar``,
        other numbers -> ``Tensor``.
      version: ``"major.minor.patch"``.
      description: free text stored in the dataset info.
      supervised_keys: e.g. ``("image", "label")``.
      homepage: stored in the dataset info.
      citation: stored in the dataset info.
      overwrite: replace an existing ``<data_dir>/<name>/<version>``; otherwise that is an error.

    Returns:
      The dataset's folder ``<data_dir>/<name>/<version>``.

    Raises:
      ValueError: bad arguments (a name, a split without examples, features that differ between
        splits or arrays of different lengths), or the dataset exists and ``overwrite`` is False.

    Example:
      >>> build_tfds_from_arrays(  # doctest: +SKIP
      ...     "toy", {"train": {"image": x, "label": y}}, "/data/tfds",
      ...     {"label": tfds.features.ClassLabel(num_classes=10)})
    """
    tfds = _tfds()
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"name must be a snake_case dataset name such as 'my_data', got {name!r}")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"version must be 'major.minor.patch' such as '1.0.0', got {version!r}")
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(
            f"splits must be a non-empty {{split: {{feature: array}}}}, got {splits!r:.80}"
        )
    arrays = {s: {k: np.asarray(v) for k, v in split.items()} for s, split in splits.items()}
    first_split = next(iter(arrays))
    names = sorted(arrays[first_split])
    for split, split_arrays in arrays.items():
        if sorted(split_arrays) != names:
            raise ValueError(
                f"split {split!r} has features {sorted(split_arrays)}, split {first_split!r} has "
                f"{names}; every split needs the same features"
            )
        lengths = {k: len(v) if v.ndim else None for k, v in split_arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values() or not min(
            lengths.values()
        ):
            raise ValueError(
                f"split {split!r}: every feature needs the same number (>= 1) of examples, got "
                f"{lengths}"
            )
    spec = dict(features or {})
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"features {unknown} are not in the arrays; features: {names}")
    for feature in names:
        if feature not in spec:
            spec[feature] = _infer_feature(feature, arrays[first_split][feature])
    features_dict = tfds.features.FeaturesDict(spec)
    encoders = {feature: _encoder(spec[feature]) for feature in names}
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(data_dir))))
    target = root / name / version
    if target.exists():
        if not overwrite:
            raise ValueError(
                f"TFDS dataset {name!r} version {version} already exists at {target}; pass "
                "overwrite=True to rebuild it"
            )
        shutil.rmtree(target)

    dataset_name, dataset_version = name, version

    class _ArraysBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(dataset_version)
        RELEASE_NOTES = {dataset_version: "Built from arrays by fedjax_sim (no TensorFlow)."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=features_dict,
                supervised_keys=supervised_keys,
                homepage=homepage,
                citation=citation,
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in arrays}

        def _generate_examples(self, split):
            columns = arrays[split]
            for i in range(len(columns[names[0]])):
                yield i, {f: encoders[f](columns[f][i]) for f in names}

    root.mkdir(parents=True, exist_ok=True)
    # TFDS makes a downloads/ folder even when nothing is downloaded: keep it out of data_dir.
    with tempfile.TemporaryDirectory(prefix="tfds_downloads_") as downloads:
        builder = _ArraysBuilder(data_dir=os.fspath(root), file_format="array_record")
        builder.download_and_prepare(download_dir=downloads)
    return target


def build_fashion_mnist_tfds(
    idx_dir: str | os.PathLike, data_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Builds TFDS's ``fashion_mnist`` (3.0.1) from Zalando's four IDX files, offline.

    The stock TFDS builder cannot do this without the internet and TensorFlow (it checks the
    ``.gz`` bytes against its registered digests, which re-gzipped copies fail, and reads with
    TF). Here the files are read and checked (sha256 of their decompressed content) with
    `fedjax_sim.datasets.fashion_mnist`'s IDX reader and written with `build_tfds_from_arrays`
    under the stock name, version and features (``image`` uint8 ``[28, 28, 1]``, ``label``
    ClassLabel with the 10 class names), so ``tfds.data_source("fashion_mnist", data_dir=...)``
    finds it too.

    Args:
      idx_dir: the folder with ``train-images-idx3-ubyte(.gz)`` and the three other files
        (e.g. ``/work/shared/data/fashion-mnist``).
      data_dir: the TFDS data dir to write into.
      overwrite: rebuild an existing dataset.

    Returns:
      The dataset folder ``<data_dir>/fashion_mnist/3.0.1``.
    """
    tfds = _tfds()
    idx_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(idx_dir))))
    splits = {
        split: {"image": images[..., None], "label": labels.astype(np.int64)}
        for split, (images, labels) in read_fashion_mnist_files(idx_dir).items()
    }
    return build_tfds_from_arrays(
        "fashion_mnist",
        splits,
        data_dir,
        {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=list(FASHION_MNIST_CLASS_NAMES)),
        },
        version="3.0.1",
        description="Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747), built "
        "offline from Zalando's IDX files.",
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation="Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747",
        overwrite=overwrite,
    )
