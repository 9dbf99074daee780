"""Checks a loaded `FederatedDataset` before anything is built from it.

A bad dataset (a client without examples, a label outside the classes, a NaN pixel, inputs of
the wrong shape) otherwise shows up much later and far from its cause: as a shape error deep in
a trace, a silent out-of-range gather inside the jitted round, or a NaN loss hundreds of rounds
in. `validate_dataset` raises `DataError` with one sentence that names the dataset, the split,
the feature or client, the bad value and what was expected.

Every check is a vectorised numpy reduction over the flat arrays: O(examples), no Python loop
over clients or examples (about 15 ms for the 70,000 Fashion-MNIST images on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset

REQUIRED_FEATURES = ("x", "y")
"""Features every split must have: the model's input ``x`` and the label ``y``."""

_MAX_NAMED = 5  # client ids named in a message


def validate_dataset(dataset: FederatedDataset) -> None:
    """Raises `DataError` if ``dataset`` cannot be trained and evaluated as it is.

    Checks, in this order: ``info`` has ``num_classes`` and ``input_shape``; there are training
    clients and training examples; no training client is empty; the per-client test split has
    the training clients; then for each split (``train``, ``test``, ``central_test``): features
    ``x`` and ``y`` exist (and, for ``central_test``, have one length), every example of ``x``
    has shape ``info["input_shape"]``, labels are integers in ``[0, num_classes)`` or equal to
    ``info["pad_label"]``, and floating-point features are finite.

    Args:
      dataset: a loaded dataset, e.g. from `fedjax_sim.datasets.load_dataset`.

    Raises:
      DataError: the first problem found, in one sentence naming the dataset, the split, the
        feature or client, the bad value and what was expected.

    Example:
      >>> validate_dataset(load_dataset("shakespeare"))  # doctest: +SKIP
    """
    name = f"dataset {dataset.name!r}"
    info = dataset.info
    for key in ("num_classes", "input_shape"):
        if key not in info:
            raise DataError(
                f"{name}: info has no {key!r} (it has {sorted(info)}); the loader must set "
                "info['num_classes'] and info['input_shape']"
            )
    num_classes = info["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise DataError(f"{name}: info['num_classes'] is {num_classes!r}, expected an int >= 1")
    input_shape = tuple(int(d) for d in info["input_shape"])

    train = dataset.train
    if train is None or train.num_clients == 0:
        raise DataError(f"{name} has no training clients; expected at least one")
    if train.num_examples == 0:
        raise DataError(
            f"{name}: its {train.num_clients} training clients hold no examples; expected at "
            "least one training example"
        )
    _check_no_empty_clients(name, train)
    if dataset.test is not None and dataset.test.num_clients != train.num_clients:
        raise DataError(
            f"{name}: the per-client test split has {dataset.test.num_clients} clients, the "
            f"train split {train.num_clients}; expected the same clients in the same order"
        )

    splits: dict[str, Mapping[str, Any]] = {"train": train.arrays}
    if dataset.test is not None:
        splits["test"] = dataset.test.arrays
    if dataset.central_test is not None:
        splits["central_test"] = dataset.central_test
    for split, arrays in splits.items():
        where = f"{name}, split {split!r}"
        arrays = _check_features(where, arrays, central=split == "central_test")
        _check_input_shape(where, arrays["x"], input_shape)
        _check_labels(where, arrays["y"], num_classes, info.get("pad_label"))
        for feature, array in arrays.items():
            _check_finite(where, feature, array)


def _check_no_empty_clients(name: str, train: FederatedData) -> None:
    empty = np.flatnonzero(train.client_sizes == 0)
    if empty.size == 0:
        return
    ids = ", ".join(repr(_plain(i)) for i in train.client_ids[empty[:_MAX_NAMED]])
    more = f" and {empty.size - _MAX_NAMED} more" if empty.size > _MAX_NAMED else ""
    raise DataError(
        f"{name}: {empty.size} of {train.num_clients} training clients have no examples "
        f"(client ids {ids}{more}); expected at least one example per client: drop them "
        "(FederatedData.subset) or partition the data into fewer clients"
    )


def _check_features(where: str, arrays: Mapping[str, Any], central: bool) -> dict:
    if not isinstance(arrays, Mapping):
        raise DataError(
            f"{where} is a {type(arrays).__name__}, expected a dict of feature arrays"
        )
    missing = [key for key in REQUIRED_FEATURES if key not in arrays]
    if missing:
        raise DataError(
            f"{where} has no feature {missing[0]!r} (features: {sorted(arrays)}); expected "
            "'x' (the inputs) and 'y' (the labels)"
        )
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    if central:  # FederatedData checks its own lengths; a central test set is a plain dict
        lengths = {key: (len(value) if value.ndim else None) for key, value in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise DataError(
                f"{where}: features have different numbers of examples {lengths}; expected "
                "one leading (example) axis of the same length"
            )
    return arrays


def _check_input_shape(where: str, x: np.ndarray, input_shape: tuple[int, ...]) -> None:
    if x.shape[1:] != input_shape:
        raise DataError(
            f"{where}, feature 'x': each example has shape {x.shape[1:]}, expected "
            f"info['input_shape'] = {input_shape} (x is {x.shape})"
        )


def _check_labels(where: str, y: np.ndarray, num_classes: int, pad_label: Any) -> None:
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(
            f"{where}, feature 'y': labels have dtype {y.dtype}, expected integer class ids in "
            f"[0, {num_classes})"
        )
    if y.size == 0:
        return
    # Two reductions decide the common (valid) case; the mask is built only when they fail.
    low, high = int(y.min()), int(y.max())
    if low >= 0 and high < num_classes:
        return
    bad = (y < 0) | (y >= num_classes)
    if pad_label is not None:
        bad &= y != pad_label
    count = int(np.count_nonzero(bad))
    if count == 0:
        return
    values = np.unique(y[bad])
    shown = ", ".join(str(v) for v in values[:_MAX_NAMED])
    more = f" and {values.size - _MAX_NAMED} more values" if values.size > _MAX_NAMED else ""
    pad = f" or the pad label {pad_label}" if pad_label is not None else ""
    raise DataError(
        f"{where}, feature 'y': {count} labels are outside [0, {num_classes}) (values "
        f"{shown}{more}); expected class ids in [0, info['num_classes'] = {num_classes}){pad}"
    )


def _check_finite(where: str, feature: str, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.inexact) or array.size == 0:
        return
    # min and max propagate NaN and reach +-inf, so two allocation-free reductions decide.
    if np.isfinite(array.min()) and np.isfinite(array.max()):
        return
    finite = np.isfinite(array)
    count = int(finite.size - np.count_nonzero(finite))
    nans = int(np.count_nonzero(np.isnan(array)))
    first = int(np.argmin(finite.reshape(len(array), -1).all(axis=1))) if array.ndim else 0
    raise DataError(
        f"{where}, feature {feature!r}: {count} non-finite values ({nans} NaN, "
        f"{count - nans} inf; the first in example {first}); expected finite numbers: "
        "fix or drop those examples"
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
