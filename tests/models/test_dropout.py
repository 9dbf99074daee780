"""`fedjax_sim.models.dropout.Dropout` draws flax's mask, bit for bit (reference: flax itself)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.models import create_model
from fedjax_sim.models.dropout import Dropout


@pytest.mark.parametrize("shape,rate,broadcast_dims", [
    ((20, 12, 12, 64), 0.25, ()),
    ((20, 128), 0.5, ()),
    ((3, 5, 7), 0.1, (1,)),
    ((4, 6, 2, 3), 0.9, (0, 2)),
    ((7,), 0.5, ()),
])
def test_mask_equals_flax_dropout(shape, rate, broadcast_dims):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    ours = Dropout(rate, broadcast_dims=broadcast_dims).apply({}, x, False, rngs=rngs)
    flax = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply({}, x, False, rngs=rngs)
    np.testing.assert_array_equal(ours, flax)
    assert 0 < np.mean(np.asarray(ours) == 0) < 1  # some units dropped, not all


def test_deterministic_rate_zero_and_one_are_flaxs():
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(Dropout(0.5).apply({}, x, True), x)
    np.testing.assert_array_equal(
        Dropout(0.0).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)}), x)
    np.testing.assert_array_equal(
        Dropout(1.0).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)}), 0 * x)


class _FlaxCNN(nn.Module):
    """The EMNIST CNN's layers with flax's own Dropout (the reference)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Dropout(0.25)(x, deterministic=not train)
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.5)(x, deterministic=not train)
        return nn.Dense(62)(x)


def test_emnist_cnn_in_training_equals_the_model_with_flax_dropout():
    model = create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(3), (8, 28, 28, 1))
    rng = jax.random.PRNGKey(4)
    ours = model.apply(params, x, train=True, rng=rng)
    reference = _FlaxCNN().apply({"params": params}, x, True, rngs={"dropout": rng})
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, model.apply(params, x, train=False), atol=1e-3)  # dropout on
