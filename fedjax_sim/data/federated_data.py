"""Federated data as flat example arrays plus per-client offsets (CSR layout).

All examples of all clients live in one flat array per feature, sorted by client; client ``i``
owns the rows ``offsets[i]:offsets[i + 1]``. Memory is O(examples), never
O(clients x largest client), and a client is a slice, not a Python object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Examples of many clients, stored flat and sliced by ``offsets``.

    Attributes:
      arrays: feature name -> array whose leading axis runs over all examples, client by client
        (e.g. ``{"x": [N, 28, 28, 1] float32, "y": [N] int32}``).
      offsets: ``[num_clients + 1]`` int64, non-decreasing, ``offsets[0] == 0`` and
        ``offsets[-1] == N``.
      client_ids: ``[num_clients]`` identifiers (strings or ints), for reports and lookups.
    """

    arrays: Mapping[str, np.ndarray]
    offsets: np.ndarray
    client_ids: np.ndarray

    def __post_init__(self):
        offsets = np.asarray(self.offsets, dtype=np.int64)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "client_ids", np.asarray(self.client_ids))
        object.__setattr__(self, "arrays", dict(self.arrays))
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
            raise ValueError(f"offsets must be 1-D and start at 0, got {offsets[:5]}...")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing (examples sorted by client)")
        if len(self.client_ids) != offsets.size - 1:
            raise ValueError(
                f"{len(self.client_ids)} client_ids for {offsets.size - 1} clients in offsets"
            )
        if not self.arrays:
            raise ValueError("FederatedData needs at least one feature array")
        for name, array in self.arrays.items():
            if len(array) != offsets[-1]:
                raise ValueError(
                    f"feature {name!r} has {len(array)} examples, offsets say {offsets[-1]}"
                )

    @classmethod
    def from_client_lists(
        cls, clients: Mapping[Any, Mapping[str, np.ndarray]]
    ) -> FederatedData:
        """Builds flat arrays from ``{client_id: {feature: array}}`` (small data, tests)."""
        ids = list(clients)
        sizes = [len(next(iter(clients[c].values()))) for c in ids]
        names = list(next(iter(clients.values())))
        arrays = {n: np.concatenate([np.asarray(clients[c][n]) for c in ids]) for n in names}
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return cls(arrays, offsets, np.asarray(ids))

    @classmethod
    def from_assignment(
        cls, arrays: Mapping[str, np.ndarray], client_of_example: np.ndarray, num_clients: int
    ) -> FederatedData:
        """Groups examples by ``client_of_example[i] in [0, num_clients)`` (stable order)."""
        client_of_example = np.asarray(client_of_example)
        order = np.argsort(client_of_example, kind="stable")
        counts = np.bincount(client_of_example, minlength=num_clients)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls({k: np.asarray(v)[order] for k, v in arrays.items()}, offsets,
                   np.arange(num_clients))

    @property
    def num_clients(self) -> int:
        return self.offsets.size - 1

    @property
    def num_examples(self) -> int:
        return int(self.offsets[-1])

    @property
    def client_sizes(self) -> np.ndarray:
        """``[num_clients]`` int64 examples per client."""
        return np.diff(self.offsets)

    def client(self, index: int) -> dict[str, np.ndarray]:
        """The examples of the client at position ``index`` (a view, no copy)."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return {k: v[lo:hi] for k, v in self.arrays.items()}

    def subset(self, indices: Sequence[int] | np.ndarray) -> FederatedData:
        """A new FederatedData with the clients at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        sizes = self.client_sizes[indices]
        starts = self.offsets[indices]
        rows = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        rows = rows + np.arange(sizes.sum())
        return FederatedData(
            {k: v[rows] for k, v in self.arrays.items()},
            np.concatenate([[0], np.cumsum(sizes)]),
            self.client_ids[indices],
        )

    def summary(self) -> dict[str, float]:
        """Clients and examples per client (min / median / mean / max)."""
        sizes = self.client_sizes
        return {
            "clients": self.num_clients,
            "examples": self.num_examples,
            "min": int(sizes.min()) if sizes.size else 0,
            "median": float(np.median(sizes)) if sizes.size else 0.0,
            "mean": float(sizes.mean()) if sizes.size else 0.0,
            "max": int(sizes.max()) if sizes.size else 0,
        }


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """A federated task: per-client train (and test) splits plus an optional central test set.

    Attributes:
      name: dataset name, e.g. ``"shakespeare"``.
      train: the clients' training examples.
      test: the same clients' held-out examples (same client order as ``train``), or None.
      central_test: a centralized test set ``{feature: [N, ...]}``, or None.
      info: task facts a model needs: ``num_classes``, ``input_shape``, ``pad_label`` (a label
        value that never counts in losses or metrics, or None), ``vocab`` ...
    """

    name: str
    train: FederatedData
    test: FederatedData | None = None
    central_test: Mapping[str, np.ndarray] | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def train_counts(sizes: np.ndarray | int, test_fraction: float) -> np.ndarray:
    """``floor(n * (1 - test_fraction))`` training examples of each size ``n`` (at least one when
    ``n > 0``), floored in exact arithmetic: ``1 - test_fraction`` is inexact in binary
    (``10 * (1 - 0.8)`` is 1.9999999999999996), so a product within a relative 1e-9 below a whole
    number counts as that number (10 examples at ``test_fraction=0.8`` keep 2, not 1).
    """
    sizes = np.asarray(sizes, np.int64)
    share = sizes * (1.0 - float(test_fraction))
    n_train = np.floor(share + 1e-9 * np.maximum(share, 1.0))
    return np.where(sizes > 0, np.maximum(1, n_train), 0).astype(np.int64)


def train_test_split_per_client(
    data: FederatedData, test_fraction: float, rng: np.random.Generator | None = None
) -> tuple[FederatedData, FederatedData]:
    """Splits every client's examples into train and test parts.

    Each client keeps ``floor(n * (1 - test_fraction))`` examples (at least one when it has any)
    for training. With ``rng`` the examples are shuffled within the client first; without it the
    split is by position (the first part trains), which keeps sequential text in order.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_train = train_counts(data.client_sizes, test_fraction)
    train_rows, test_rows = [], []
    for i in range(data.num_clients):
        rows = np.arange(data.offsets[i], data.offsets[i + 1])
        if rng is not None:
            rows = rng.permutation(rows)
        train_rows.append(rows[: n_train[i]])
        test_rows.append(rows[n_train[i]:])

    def take(parts):
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        sizes = np.array([len(p) for p in parts], np.int64)
        return FederatedData({k: v[rows] for k, v in data.arrays.items()},
                             np.concatenate([[0], np.cumsum(sizes)]), data.client_ids)

    return take(train_rows), take(test_rows)
