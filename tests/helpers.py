"""Tiny models and federated data for unit tests (synthetic data lives only in tests)."""

import flax.linen as nn
import numpy as np

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.models.base import Model


class TinyMLP(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def tiny_model(features=4, num_classes=3) -> Model:
    return Model(TinyMLP(num_classes), np.zeros((1, features), np.float32), num_classes)


def tiny_data(sizes=(5, 17, 40, 3, 11), features=4, num_classes=3, seed=0) -> FederatedData:
    rng = np.random.default_rng(seed)
    clients = {
        i: {
            "x": rng.normal(size=(n, features)).astype(np.float32),
            "y": rng.integers(0, num_classes, n).astype(np.int32),
        }
        for i, n in enumerate(sizes)
    }
    return FederatedData.from_client_lists(clients)
