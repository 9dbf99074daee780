"""Tiny models and federated data for unit tests (synthetic data lives only in tests), and where
the tests find real data that lives outside the repository."""

import functools
import os
from pathlib import Path

import flax.linen as nn
import numpy as np
import pytest

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.models.base import Model

USERS_BACKEND_OPT = {"xla_backend_optimization_level": 3}
"""XLA's default LLVM level as a per-program option: the suite compiles at level 1
(`tests/conftest.py`); tests that check what users' programs compute pass this."""


class TinyMLP(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


@functools.cache
def tiny_model(features=4, num_classes=3) -> Model:
    """One shared `Model` per argument list: `Model` is frozen and hashed by identity (a static
    jit argument), so sharing it lets tests reuse each other's compiled round steps."""
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
    from fedjax_sim.core import FederatedAlgorithm

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


# --- Real data outside the repository ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_FILES = tuple(
    f"fashion-mnist/{name}.gz" for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
# Every skip for missing data starts with this, so conftest can count them in its summary.
MISSING_DATA = "real data missing:"


def shared_data_dir() -> Path:
    """The folder of real data: ``$FEDJAX_SIM_DATA``, else ``../shared/data`` beside the repo.

    A relative ``FEDJAX_SIM_DATA`` resolves against the current folder (as the loaders do).
    """
    chosen = os.environ.get("FEDJAX_SIM_DATA")
    if chosen:
        return Path(os.path.abspath(os.path.expanduser(chosen)))
    return REPO.parent / "shared" / "data"


# Read once, at import: tests monkeypatch FEDJAX_SIM_DATA to point the loaders elsewhere.
SHARED_DATA = shared_data_dir()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_data(*paths: str) -> Path:
    """``SHARED_DATA``, after checking that each of ``paths`` (relative to it) exists.

    When one is missing the test skips, naming the files and how to provide them, except under
    ``CI=true``: CI has ``../shared``, so there a data test that cannot run fails.
    """
    missing = [path for path in paths if not (SHARED_DATA / path).exists()]
    if missing:
        message = (f"{MISSING_DATA} {', '.join(missing)} not found in {SHARED_DATA} (set "
                   f"FEDJAX_SIM_DATA to the data folder, or put it at ../shared/data beside "
                   f"the repository)")
        if in_ci():
            pytest.fail(f"{message}; CI=true, and CI must run the data tests", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


def needs_shared_data(*paths: str) -> pytest.MarkDecorator:
    """Marks a test (or a parametrize case) as needing ``paths`` under ``SHARED_DATA``.

    conftest's ``pytest_runtest_setup`` calls `require_shared_data` for it before the test runs.
    """
    return pytest.mark.shared_data(*paths)
