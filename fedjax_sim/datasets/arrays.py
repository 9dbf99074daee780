"""Bring your own arrays: a federated dataset from one ``.npz`` file.

Write the examples with numpy and train on them by name (``dataset.name: arrays``)::

  np.savez("my_data.npz", x=x, y=y, client_id=writer)        # [N, ...], [N] ints, [N]
  fedjax-sim run configs/fashion_mnist_fedavg.yaml dataset.name=arrays \\
      dataset.path=my_data.npz dataset.partition=natural model.name=logistic

Keys: ``x`` (inputs, any numeric dtype: floats, or ints such as token ids), ``y`` (integer class
labels), optionally ``client_id`` (``[N]`` ints or strings; the natural partition groups by it),
and optionally ``x_test`` / ``y_test`` (a central test set). The file is read with
``np.load(path, allow_pickle=False)``: arrays only, never pickled Python objects, so an ``.npz``
from an untrusted source cannot run code; an object array is refused with a `DataError`.

Integer ``x`` of token ids for an embedding model (``char_lstm``, ``stackoverflow_lstm``) takes
``dataset.vocab_size``: validation then refuses any id outside ``[0, vocab_size)``, which the
embedding would otherwise read silently (as NaN or as another token's row).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.data.partition import PARTITIONS
from fedjax_sim.datasets.partition_options import (
    LABEL_PARTITIONS,
    PartitionOptions,
    centralized_dataset,
    check_partition,
)

NATURAL_PARTITION = PartitionOptions("natural", num_clients=10)
"""The default partition: one client per ``client_id`` (10 clients for the other partitions)."""

KEYS = ("x", "y", "client_id", "x_test", "y_test")
"""Keys the file may hold (others are ignored)."""

_EXPECTED = {
    "x": "'x', the inputs [N, ...]",
    "y": "'y', the integer labels [N]",
    "client_id": "'client_id', one client id per example [N], for partition='natural' (or use "
    "partition='iid', 'dirichlet', 'shards', 'quantity' or 'classes')",
}


def load_arrays(
    *,
    path: str | os.PathLike,
    partition: PartitionOptions = NATURAL_PARTITION,
    num_classes: int | None = None,
    vocab_size: int | None = None,
) -> FederatedDataset:
    """A `FederatedDataset` from the arrays in an ``.npz`` file.

    Args:
      path: the ``.npz`` file (``np.savez``/``np.savez_compressed``) with keys ``x`` ``[N, ...]``
        and ``y`` ``[N]`` integer labels, optionally ``client_id`` ``[N]`` (needed for
        ``partition="natural"``), ``x_test`` and ``y_test`` (the central test set). Relative
        paths resolve against the current folder.
      partition: how the examples are split into clients (`PartitionOptions`; default
        ``"natural"``: one client per distinct ``client_id``; any other partition splits
        ``num_clients`` clients, 10 by default).
      num_classes: the number of classes; default ``max(y, y_test) + 1``.
      vocab_size: when ``x`` holds token ids, their number (``info["vocab_size"]``):
        `fedjax_sim.data.validation.validate_dataset` then checks every id of ``x`` and
        ``x_test`` lies in ``[0, vocab_size)``. ``char_lstm`` and ``stackoverflow_lstm`` embed
        ``num_classes`` rows, so for them set both to the same. Default None: no ids declared.

    Returns:
      A `FederatedDataset` named ``"arrays"`` whose ``info`` has ``num_classes``,
      ``pad_label=None``, ``input_shape = x.shape[1:]``, ``input_dtype = str(x.dtype)`` and,
      when given, ``vocab_size``.

    Raises:
      DataError: the file is missing or not an ``.npz``, a key is missing, an array is an
        object (pickled) array, the arrays do not fit together, or ``vocab_size`` is given for
        float ``x`` (the message names the file and the key).
      ValueError: an option has a bad value (the message names the option).

    Example:
      >>> np.savez(tmp / "d.npz", x=x, y=y, client_id=writers)  # doctest: +SKIP
      >>> load_arrays(path=tmp / "d.npz").train.num_clients  # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must name an .npz file, got {path!r}")
    partition = check_partition(partition, "arrays", PARTITIONS)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an int >= 1 or null, got {num_classes!r}")
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer))
        or vocab_size < 1
    ):
        raise ValueError(f"vocab_size must be an int >= 1 or null, got {vocab_size!r}")
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    arrays = _read_npz(path, need_client_id=partition.partition == "natural")
    x, y = arrays["x"], arrays["y"]
    if vocab_size is not None and x.dtype.kind not in "iu":
        raise DataError(
            f"{path}: key 'x' has dtype {x.dtype}, but vocab_size={vocab_size} declares token "
            "ids; expected integer ids in x (or no vocab_size for float inputs)"
        )
    if partition.partition in LABEL_PARTITIONS and y.ndim != 1:
        raise DataError(
            f"{path}: key 'y' has shape {y.shape}; partition={partition.partition!r} splits by "
            "label and expects one label per example, shape [N]"
        )
    test = {"x": arrays["x_test"], "y": arrays["y_test"]} if "x_test" in arrays else None
    labels = [y] + ([test["y"]] if test is not None else [])
    if num_classes is None:
        # At least 1, so that all-negative labels get the label-range message, not this one.
        num_classes = max(1, max(int(part.max()) for part in labels if part.size) + 1)
    info = {"num_classes": int(num_classes), "input_shape": tuple(x.shape[1:]),
            "input_dtype": str(x.dtype)}
    if vocab_size is not None:
        info["vocab_size"] = int(vocab_size)
    return centralized_dataset("arrays", {"x": x, "y": y}, test, partition, info,
                               group_ids=arrays.get("client_id"))


def _read_npz(path: Path, need_client_id: bool) -> dict[str, np.ndarray]:
    """The known keys of the archive as arrays, checked for presence, dtype and lengths."""
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(
            f"arrays dataset file {str(path)!r} {where}; expected an .npz file with keys 'x' "
            "and 'y' (and 'client_id' for partition='natural'), written with "
            "np.savez(path, x=..., y=..., client_id=...); set config key 'dataset.path'"
        )
    # numpy leaves its own file handle open when a zip is corrupt: hand it ours to close.
    with open(path, "rb") as file:
        arrays = _read_archive(path, file, need_client_id)
    _check_arrays(path, arrays)
    return arrays


def _read_archive(path: Path, file: BinaryIO, need_client_id: bool) -> dict[str, np.ndarray]:
    head = file.read(6)
    file.seek(0)
    if head == b"\x93NUMPY":
        raise DataError(
            f"{path}: a single .npy array, expected an .npz archive with keys 'x' and 'y' "
            "(np.savez(path, x=..., y=...))"
        )
    if not head.startswith(b"PK"):  # an .npz is a zip archive
        what = "a pickle, which is never loaded" if head[:1] == b"\x80" else \
            f"it starts with the bytes {head!r}"
        raise DataError(
            f"{path}: not an .npz archive ({what}); expected a zip of arrays written with "
            "np.savez(path, x=..., y=...)"
        )
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path}: not a readable .npz archive ({error}); expected a zip of arrays written "
            "with np.savez"
        ) from None
    with archive:
        present = sorted(archive.files)
        required = ["x", "y"] + (["client_id"] if need_client_id else [])
        for key in required:
            if key not in present:
                raise DataError(
                    f"{path}: no key {key!r} (keys present: {present}); expected "
                    f"{_EXPECTED[key]}"
                )
        if ("x_test" in present) != ("y_test" in present):
            has, lacks = ("x_test", "y_test") if "x_test" in present else ("y_test", "x_test")
            raise DataError(
                f"{path}: has key {has!r} but no {lacks!r} (keys present: {present}); a "
                "central test set needs both"
            )
        arrays = {}
        for key in KEYS:
            if key not in present or (key == "client_id" and not need_client_id):
                continue
            try:
                arrays[key] = archive[key]
            except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
                raise DataError(
                    f"{path}: key {key!r} is an object (pickled) array, which is never loaded; "
                    "expected a numeric array (save it with a numeric dtype, e.g. "
                    "np.asarray(values, np.float32))"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise DataError(f"{path}: key {key!r} cannot be read ({error})") from None
    return arrays


def _check_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        if x_key not in arrays:
            continue
        x, y = arrays[x_key], arrays[y_key]
        if x.dtype.kind not in "biuf":
            raise DataError(
                f"{path}: key {x_key!r} has dtype {x.dtype}, expected a numeric array "
                "(floats, or integer ids)"
            )
        if y.dtype.kind not in "iu":
            raise DataError(
                f"{path}: key {y_key!r} has dtype {y.dtype}, expected integer class labels"
            )
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
            raise DataError(
                f"{path}: keys {x_key!r} {x.shape} and {y_key!r} {y.shape} do not match; "
                f"expected {x_key!r} [N, ...] and {y_key!r} [N] with the same N"
            )
    if len(arrays["x"]) == 0:
        raise DataError(
            f"{path}: keys 'x' and 'y' hold no examples ('x' has shape {arrays['x'].shape}); "
            "expected at least one training example"
        )
    if "x_test" in arrays and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise DataError(
            f"{path}: key 'x_test' has examples of shape {arrays['x_test'].shape[1:]}, "
            f"expected the shape of 'x' examples, {arrays['x'].shape[1:]}"
        )
    if "client_id" in arrays:
        ids = arrays["client_id"]
        if ids.shape != (len(arrays["x"]),) or ids.dtype.kind not in "iuUS":
            raise DataError(
                f"{path}: key 'client_id' is {ids.dtype} {ids.shape}, expected one integer or "
                f"string id per example, shape ({len(arrays['x'])},)"
            )
