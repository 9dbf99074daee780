"""Data attacks: the malicious clients' training rows, changed once when the experiment is built.

* `flip_labels`: label flipping, ``y -> num_classes - 1 - y`` on every row of a malicious
  client (Biggio et al. 2012; Fang et al. 2020 use the same map);
* `poison_backdoor`: the data half of the backdoor of Bagdasaryan et al. 2020
  (arXiv:1807.00459): a fraction of each malicious client's images get a trigger pattern (a
  bright square in the bottom-right corner, `add_trigger`) and the target label; the rest stay
  clean, so the attacker keeps the main task while learning the backdoor;
* `trigger_set`: the evaluation set of the backdoor: held-out examples *not* of the target
  class with the trigger added and labelled as the target, so the accuracy on it is the
  fraction classified as the target (the backdoor accuracy).

Host-side numpy; the arrays handed in are never modified (changed features are copied).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedjax_sim.data.federated_data import FederatedData


def _labels(arrays: Mapping[str, np.ndarray], attack: str) -> np.ndarray:
    labels = arrays.get("y")
    if labels is None or np.ndim(labels) != 1 or not np.issubdtype(np.asarray(labels).dtype,
                                                                   np.integer):
        raise ValueError(f"{attack}: needs one integer class label per example (a 1-D 'y' "
                         f"feature); this dataset's 'y' has shape "
                         f"{None if labels is None else np.shape(labels)}")
    return np.asarray(labels)


def malicious_rows(data: FederatedData, malicious: np.ndarray) -> np.ndarray:
    """``[N]`` bool over the flat example rows: True for rows of a malicious client."""
    malicious = np.asarray(malicious, bool)
    if malicious.shape != (data.num_clients,):
        raise ValueError(f"malicious has shape {malicious.shape}, expected "
                         f"({data.num_clients},) (one flag per client)")
    return np.repeat(malicious, data.client_sizes)


def flip_labels(data: FederatedData, malicious: np.ndarray, num_classes: int) -> FederatedData:
    """The malicious clients' labels mapped ``y -> num_classes - 1 - y``."""
    labels = _labels(data.arrays, "label_flip")
    rows = malicious_rows(data, malicious)
    flipped = np.where(rows, num_classes - 1 - labels, labels).astype(labels.dtype)
    return FederatedData({**data.arrays, "y": flipped}, data.offsets, data.client_ids)


def add_trigger(x: np.ndarray, size: int = 4, value: float = 1.0) -> np.ndarray:
    """A copy of images ``[N, H, W]`` or ``[N, H, W, C]`` with a ``size x size`` square of
    ``value`` in the bottom-right corner, one pixel from the edges (the trigger pattern)."""
    x = np.array(x, copy=True)
    if x.ndim not in (3, 4) or min(x.shape[1:3]) < size + 2:
        raise ValueError(f"backdoor: the trigger needs images [N, H, W(, C)] of at least "
                         f"{size + 2} pixels a side, got features of shape {x.shape}")
    x[:, -size - 1:-1, -size - 1:-1, ...] = value
    return x


def poison_backdoor(data: FederatedData, malicious: np.ndarray, target: int,
                    fraction: float = 0.5, trigger_size: int = 4, trigger_value: float = 1.0,
                    seed: int = 0) -> FederatedData:
    """Each malicious client's training rows: ``round(fraction * n_i)`` of them (drawn with
    ``seed``) get the trigger and label ``target``; the other rows are unchanged."""
    labels = _labels(data.arrays, "backdoor")
    if "x" not in data.arrays:
        raise ValueError("backdoor: needs image features 'x'")
    rng = np.random.default_rng(seed)
    poisoned = np.zeros(data.num_examples, bool)
    for client in np.flatnonzero(np.asarray(malicious, bool)):
        lo, hi = int(data.offsets[client]), int(data.offsets[client + 1])
        count = int(round(fraction * (hi - lo)))
        poisoned[lo + rng.choice(hi - lo, count, replace=False)] = True
    x = np.asarray(data.arrays["x"])
    triggered = add_trigger(x[poisoned], trigger_size, trigger_value)
    new_x = np.array(x, copy=True)
    new_x[poisoned] = triggered
    new_y = np.where(poisoned, target, labels).astype(labels.dtype)
    return FederatedData({**data.arrays, "x": new_x, "y": new_y}, data.offsets, data.client_ids)


def trigger_set(arrays: Mapping[str, np.ndarray], target: int, trigger_size: int = 4,
                trigger_value: float = 1.0) -> dict[str, np.ndarray]:
    """Held-out examples not of class ``target``, with the trigger, labelled ``target``."""
    labels = _labels(arrays, "backdoor")
    keep = labels != target
    x = add_trigger(np.asarray(arrays["x"])[keep], trigger_size, trigger_value)
    return {"x": x, "y": np.full(int(keep.sum()), target, labels.dtype)}
