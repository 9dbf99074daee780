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


def spy(algorithm):
    """Wraps an algorithm so each round's metrics also hold the cohort it trained on."""
    from fedjax_sim.algorithms.base import FederatedAlgorithm

    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        c = cohort.clients
        return state, {**metrics, "ids": c.client_id, "indices": c.indices, "mask": c.mask,
                       "valid": c.valid, "num_examples": c.num_examples}

    return FederatedAlgorithm(algorithm.init, apply)


def mean_loss(model, params, x, y):
    """Plain mean cross-entropy of a batch (for sequential references)."""
    import optax

    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _loss_gradient():
    import jax

    return jax.jit(jax.grad(mean_loss, argnums=1), static_argnums=0)


# One jitted gradient of one batch (the loops around it in the references stay plain Python).
loss_gradient = _loss_gradient()
