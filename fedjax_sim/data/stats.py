"""What a federated dataset looks like: client sizes and label distributions.

Pure numpy functions over `FederatedData`'s flat arrays (no Python loop over examples), plus two
matplotlib plots; ``fedjax-sim data stats CONFIG`` prints and draws them. Labels may be one per
example (``[N]``), one per position (``[N, T]``, next-token tasks) or a padded set
(``[N, K]``, multi-label tasks): every label occurrence counts, the pad label never does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData

_CHUNK_ROWS = 1 << 20


def size_summary(sizes: np.ndarray) -> dict[str, float]:
    """Clients, examples and examples per client (min / median / mean / max) of ``sizes``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size == 0:
        return {"clients": 0, "examples": 0, "min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    return {
        "clients": int(sizes.size),
        "examples": int(sizes.sum()),
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "mean": float(sizes.mean()),
        "max": int(sizes.max()),
    }


def _valid(labels: np.ndarray, num_classes: int, pad_label: Any) -> np.ndarray:
    """Mask of label occurrences that count: in ``[0, num_classes)`` and not the pad label."""
    keep = (labels >= 0) & (labels < num_classes)
    if pad_label is not None:
        keep &= labels != pad_label
    return keep


def class_counts(labels: np.ndarray, num_classes: int, pad_label: Any = None) -> np.ndarray:
    """``[num_classes]`` int64 occurrences of each class in ``labels`` (any shape).

    The pad label and values outside ``[0, num_classes)`` (e.g. ``-1`` tag padding) are not
    counted. Large (memory-mapped) arrays are read in chunks of rows.
    """
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, max(len(labels), 1), _CHUNK_ROWS):
        chunk = np.asarray(labels[start:start + _CHUNK_ROWS]).reshape(-1)
        chunk = chunk[_valid(chunk, num_classes, pad_label)]
        counts += np.bincount(chunk.astype(np.int64), minlength=num_classes)
    return counts


def client_label_counts(data: FederatedData, clients: np.ndarray, num_classes: int,
                        pad_label: Any = None, label: str = "y") -> np.ndarray:
    """``[len(clients), num_classes]`` int64 label occurrences of each listed client.

    Args:
      data: the clients' examples; ``data.arrays[label]`` holds the labels.
      clients: client positions (not ids) to count.
      num_classes: number of classes.
      pad_label: a label value never counted (None: every in-range value counts).
      label: the feature that holds the labels.
    """
    clients = np.asarray(clients, dtype=np.int64)
    sizes = data.client_sizes[clients]
    starts = data.offsets[clients]
    rows = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    labels = np.asarray(data.arrays[label][rows])
    owner = np.repeat(np.arange(clients.size), sizes)
    owner = np.broadcast_to(owner.reshape(-1, *([1] * (labels.ndim - 1))), labels.shape)
    keep = _valid(labels, num_classes, pad_label)
    flat = owner[keep] * num_classes + labels[keep].astype(np.int64)
    counts = np.bincount(flat, minlength=clients.size * num_classes)
    return counts.reshape(clients.size, num_classes)


def sample_clients(num_clients: int, count: int, seed: int = 0) -> np.ndarray:
    """``min(count, num_clients)`` distinct client positions, sorted, drawn with a seeded
    ``numpy.random.Generator``."""
    count = min(count, num_clients)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_clients, size=count, replace=False))


def plot_client_sizes(sizes: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """A histogram of examples per client (log-spaced bins when sizes span > 2 decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.asarray(sizes)
    figure, axis = plt.subplots(figsize=(6, 4))
    positive = sizes[sizes > 0]
    if positive.size and positive.max() > 100 * max(positive.min(), 1):
        bins = np.geomspace(max(positive.min(), 1), positive.max() + 1, 50)
        axis.set_xscale("log")
    else:
        bins = min(50, max(int(sizes.max(initial=0)) + 1, 1))
    axis.hist(sizes, bins=bins, color="tab:blue")
    axis.set_xlabel("examples per client")
    axis.set_ylabel("clients")
    axis.set_title(title or f"{sizes.size:,} clients, {int(sizes.sum()):,} examples")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_label_distribution(counts: np.ndarray, client_ids: np.ndarray,
                            path: str | os.PathLike, max_classes: int = 50,
                            title: str = "") -> Path:
    """A heatmap of each sampled client's label distribution (rows: clients, columns: classes).

    Each row is normalized to sum to one. With more than ``max_classes`` classes only the most
    frequent ``max_classes`` (over the sample) are drawn, in class order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=np.float64)
    classes = np.arange(counts.shape[1])
    if classes.size > max_classes:
        classes = np.sort(np.argsort(-counts.sum(axis=0), kind="stable")[:max_classes])
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts[:, classes], totals, out=np.zeros((counts.shape[0], classes.size)),
                       where=totals > 0)
    figure, axis = plt.subplots(figsize=(max(6, 0.15 * classes.size + 3),
                                         max(4, 0.12 * counts.shape[0] + 1.5)))
    image = axis.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=axis, label="share of the client's labels")
    axis.set_xlabel("class" if classes.size == counts.shape[1] else
                    f"class ({classes.size} most frequent of {counts.shape[1]})")
    axis.set_ylabel("client")
    ticks = np.arange(0, classes.size, max(1, -(-classes.size // 30)))  # at most 30 labels
    axis.set_xticks(ticks, [str(c) for c in classes[ticks]], rotation=90 if ticks.size > 15
                    else 0)
    if counts.shape[0] <= 40:
        axis.set_yticks(range(counts.shape[0]), [str(c)[:24] for c in client_ids])
    axis.set_title(title or f"label distribution of {counts.shape[0]} sampled clients")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
