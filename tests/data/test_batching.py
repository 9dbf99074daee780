"""In-graph cohort batching against plain set/count arithmetic done in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.data.batching import (
    ClientSchedule,
    client_stream,
    cohort_indices,
    first_pass_mask,
)


@functools.cache
def compiled_stream(schedule):
    return jax.jit(lambda k, n: client_stream(k, n, schedule))


def stream(size, schedule, seed=0):
    positions, mask = compiled_stream(schedule)(jax.random.key(seed), jnp.int32(size))
    return np.asarray(positions).ravel(), np.asarray(mask).ravel()


@pytest.mark.parametrize("size", [1, 3, 7, 20, 23])
@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_mode_visits_every_example_once_per_epoch(size, epochs):
    schedule = ClientSchedule.from_sizes(np.array([size, 23]), 4, local_epochs=epochs)
    positions, mask = stream(size, schedule)
    real = positions[mask]
    assert len(real) == size * epochs  # the mask covers exactly n * E slots ...
    assert mask[: size * epochs].all() and not mask[size * epochs:].any()  # ... at the front
    for e in range(epochs):  # every epoch is a permutation of the client's examples
        assert sorted(real[e * size:(e + 1) * size]) == list(range(size))
    assert (positions[~mask] == 0).all()


@pytest.mark.parametrize("size", [1, 5, 8, 13, 50])
def test_fixed_steps_mode_runs_full_batches_and_repeats_data(size):
    schedule = ClientSchedule.from_sizes(np.array([size, 50]), 8, local_steps=4)
    positions, mask = stream(size, schedule, seed=3)
    assert mask.all() and len(positions) == 32
    full_epochs = 32 // size
    for e in range(full_epochs):
        assert sorted(positions[e * size:(e + 1) * size]) == list(range(size))
    tail = positions[full_epochs * size:]
    assert len(set(tail)) == len(tail) and set(tail) <= set(range(size))  # a subset, no repeats


def test_epochs_are_reshuffled_and_keys_matter():
    schedule = ClientSchedule.from_sizes(np.array([30]), 10, local_epochs=2)
    positions, _ = stream(30, schedule, seed=1)
    assert not np.array_equal(positions[:30], positions[30:60])
    other, _ = stream(30, schedule, seed=2)
    assert not np.array_equal(positions, other)


def test_partial_epoch_is_a_uniform_subset():
    """The last, partial epoch must not always take the same examples."""
    schedule = ClientSchedule.from_sizes(np.array([10]), 3, local_steps=1)  # 3 of 10 examples
    counts = np.zeros(10)
    for seed in range(300):
        positions, _ = stream(10, schedule, seed=seed)
        counts[positions] += 1
    assert counts.min() > 0.6 * counts.mean()  # every example drawn about equally often


def test_max_local_steps_truncates_large_clients():
    schedule = ClientSchedule.from_sizes(np.array([5, 100]), 10, local_epochs=1,
                                         max_local_steps=3)
    assert schedule.num_steps == 3
    np.testing.assert_array_equal(schedule.steps_for(jnp.array([5, 100, 0])), [1, 3, 0])
    positions, mask = stream(100, schedule)
    assert mask.all() and len(set(positions)) == 30


@pytest.mark.parametrize("size", [1, 5, 12, 13, 50])
@pytest.mark.parametrize("options", [{"local_epochs": 1}, {"local_epochs": 3},
                                     {"local_epochs": 2, "max_local_steps": 4},
                                     {"local_steps": 3}])
def test_first_pass_holds_every_example_once_or_the_distinct_ones_trained_on(size, options):
    """SCAFFOLD's option I pass: all n examples once when the stream reaches n slots, else every
    real slot (distinct examples); never a padded slot; nothing for a client without examples."""
    schedule = ClientSchedule.from_sizes(np.array([size, 50]), 4, **options)
    for seed in range(3):
        positions, mask = compiled_stream(schedule)(jax.random.key(seed), jnp.int32(size))
        once = np.asarray(first_pass_mask(mask, jnp.int32(size)))
        assert not (once & ~np.asarray(mask)).any()
        seen = sorted(np.asarray(positions)[once].tolist())
        if mask.sum() >= size:
            assert seen == list(range(size))
        else:
            assert len(set(seen)) == len(seen) == int(mask.sum())
        assert not first_pass_mask(mask, jnp.int32(0)).any()


def test_cohort_indices_point_into_each_clients_rows():
    sizes = np.array([4, 9, 1, 6])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    schedule = ClientSchedule.from_sizes(sizes, 3, local_epochs=1)
    cohort = jnp.array([3, 0, 2], jnp.int32)
    indices, mask, got_sizes = cohort_indices(jax.random.key(0), cohort,
                                              jnp.asarray(offsets), schedule)
    assert indices.shape == mask.shape == (3, 3, 3)
    np.testing.assert_array_equal(got_sizes, sizes[[3, 0, 2]])
    for row, client in enumerate([3, 0, 2]):
        rows = np.asarray(indices[row])[np.asarray(mask[row])]
        assert sorted(rows) == list(range(offsets[client], offsets[client + 1]))


def test_schedule_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ClientSchedule(num_steps=1, batch_size=0, local_epochs=1, max_client_size=3)
    with pytest.raises(ValueError, match="local_epochs must be >= 1"):
        ClientSchedule(num_steps=1, batch_size=2, local_epochs=0, max_client_size=3)
