"""`fedjax_sim.models.dropout.Dropout`: packed masks against the random bits unpacked
independently (numpy), their frequencies, and flax's own mask for the other rates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.models import create_model
from fedjax_sim.models.dropout import Dropout, keep_mask, packed_bits


def _reference_mask(rng, keep_prob, size):
    """numpy: unit i reads bits [b (i mod k), b (i mod k + 1)) of word i // k."""
    bits = packed_bits(keep_prob)
    per_word = 32 // bits
    words = np.asarray(jax.random.bits(rng, (-(-size // per_word),), jnp.uint32), np.uint64)
    i = np.arange(size)
    units = (words[i // per_word] >> (bits * (i % per_word)).astype(np.uint64)) % (1 << bits)
    return units < keep_prob * (1 << bits)


@pytest.mark.parametrize("keep_prob, bits", [
    (0.5, 1), (0.75, 2), (0.25, 2), (0.125, 4), (0.9375, 4), (3 / 256, 8), (0.9, None),
    (0.7, None), (1 / 512, None),
])
def test_packed_bits_are_the_fewest_that_hold_keep_exactly(keep_prob, bits):
    assert packed_bits(keep_prob) == bits


@pytest.mark.parametrize("shape,rate,broadcast_dims", [
    ((20, 12, 12, 64), 0.25, ()),
    ((20, 128), 0.5, ()),
    ((3, 5, 7), 0.875, (1,)),
    ((4, 6, 2, 3), 0.75, (0, 2)),
    ((7,), 0.5, ()),
    ((33,), 1 - 3 / 256, ()),
])
def test_packed_mask_is_the_unpacked_bits(shape, rate, broadcast_dims):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    rng = jax.random.PRNGKey(2)
    ours = np.asarray(Dropout(rate, broadcast_dims=broadcast_dims).apply(
        {}, x, False, rngs={"dropout": rng}))
    # The rng the module draws from: flax folds the module's name into the stream's key.
    module_rng = nn.Dropout(rate).apply({}, x, False, rngs={"dropout": rng},
                                        method=lambda m, _x, _d: m.make_rng("dropout"))
    mask_shape = [1 if d in broadcast_dims else n for d, n in enumerate(shape)]
    mask = _reference_mask(module_rng, 1.0 - rate, int(np.prod(mask_shape)))
    mask = np.broadcast_to(mask.reshape(mask_shape), shape)
    np.testing.assert_array_equal(ours != 0, mask)  # x has no zeros: kept = nonzero
    expected = np.where(mask, np.asarray(x) / np.float32(1.0 - rate), 0.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)  # XLA may multiply by 1 / keep
    assert 0 < np.mean(ours == 0) < 1 or np.asarray(x).size < 40  # some units dropped


@pytest.mark.parametrize("keep_prob", [0.75, 0.5, 0.25, 0.125, 3 / 256])
def test_packed_mask_keeps_each_unit_with_probability_keep(keep_prob):
    """Every lane of the packed words (unit i mod 32 / b) keeps with probability ``keep``:
    a binomial test at 5 standard deviations per lane and overall."""
    bits = packed_bits(keep_prob)
    per_word = 32 // bits
    size = per_word * 20_000
    mask = np.asarray(keep_mask(jax.random.PRNGKey(7), keep_prob, size)).reshape(-1, per_word)
    sd = np.sqrt(keep_prob * (1 - keep_prob) / mask.shape[0])
    assert np.all(np.abs(mask.mean(axis=0) - keep_prob) < 5 * sd)
    assert abs(mask.mean() - keep_prob) < 5 * sd / np.sqrt(per_word)
    # neighbouring units are independent: P(both kept) = keep^2
    both = np.mean(mask[:, :-1] & mask[:, 1:]) if per_word > 1 else keep_prob**2
    assert abs(both - keep_prob**2) < 5 * np.sqrt(keep_prob**2 / mask[:, 1:].size) + 1e-12


@pytest.mark.parametrize("shape,rate,broadcast_dims", [
    ((3, 5, 7), 0.1, (1,)),
    ((4, 6, 2, 3), 0.3, (0, 2)),
    ((40,), 0.2, ()),
])
def test_other_rates_draw_flaxs_mask(shape, rate, broadcast_dims):
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


class _ReferenceDropout(nn.Module):
    """Dropout from `_reference_mask` (numpy), drawing from flax's rng stream like flax's."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic):
        if deterministic:
            return x
        keep = 1.0 - self.rate
        mask = _reference_mask(self.make_rng("dropout"), keep, x.size).reshape(x.shape)
        return jnp.where(mask, x / keep, 0.0)


class _FlaxCNN(nn.Module):
    """The EMNIST CNN's layers in flax with the reference dropout (named as flax names it)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = _ReferenceDropout(0.25, name="Dropout_0")(x, not train)
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        x = _ReferenceDropout(0.5, name="Dropout_1")(x, not train)
        return nn.Dense(62)(x)


def test_emnist_cnn_in_training_equals_flax_layers_with_the_reference_dropout():
    model = create_model("emnist_cnn", num_classes=62, input_shape=(28, 28, 1))
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(3), (8, 28, 28, 1))
    rng = jax.random.PRNGKey(4)
    ours = model.apply(params, x, train=True, rng=rng)
    reference = _FlaxCNN().apply({"params": params}, x, True, rngs={"dropout": rng})
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, model.apply(params, x, train=False), atol=1e-3)  # dropout on


@pytest.mark.parametrize("rate", [-0.5, 1.5, float("nan")])
def test_a_rate_outside_zero_to_one_is_refused_by_name(rate):
    """A rate below 0 kept every unit scaled by 1 / (1 - rate) (-0.5: x * 2/3, silently); one
    above 1 failed with 'OverflowError: Python integer -1 out of bounds for uint32'."""
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"Dropout rate=.*expected 0 <= rate <= 1"):
        Dropout(rate).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
