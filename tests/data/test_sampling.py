"""Samplers: empirical frequencies over many draws against the exact probabilities."""

import itertools

import jax
import numpy as np
import pytest

from fedjax_sim.data.sampling import full_participation, uniform_sampler, weighted_sampler

DRAWS = 4000
SIZES = np.array([1, 2, 3, 4, 0, 10], np.int64)


def draw(sampler, draws=DRAWS):
    keys = jax.random.split(jax.random.key(0), draws)
    return np.asarray(jax.jit(jax.vmap(sampler))(keys))


def chi_square(observed, expected):
    """Pearson's statistic over the cells with a positive expectation."""
    keep = expected > 0
    return float(np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep]))


# chi-square 0.999 quantiles for the degrees of freedom used below (k cells - 1).
CHI2_999 = {4: 18.47, 5: 20.52, 9: 27.88}


def successive_inclusion(p, cohort_size):
    """P(client i in a cohort drawn without replacement, each draw proportional to p among the
    clients not drawn yet): a sum over every ordered sequence of distinct clients."""
    n = len(p)
    inclusion = np.zeros(n)
    for sequence in itertools.permutations(range(n), cohort_size):
        probability, left = 1.0, 1.0
        for i in sequence:
            if left <= 0:
                probability = 0.0
                break
            probability *= p[i] / left
            left -= p[i]
        for i in sequence:
            inclusion[i] += probability
    return inclusion


def test_uniform_without_replacement_has_no_duplicates_and_uniform_frequencies():
    cohorts = draw(uniform_sampler(10, 4))
    assert all(len(set(c)) == 4 for c in cohorts)
    counts = np.bincount(cohorts.ravel(), minlength=10)
    assert chi_square(counts, np.full(10, DRAWS * 4 / 10)) < CHI2_999[9]


def test_uniform_with_replacement_repeats_clients_at_the_birthday_rate():
    cohorts = draw(uniform_sampler(5, 3, replace=True))
    counts = np.bincount(cohorts.ravel(), minlength=5)
    assert chi_square(counts, np.full(5, DRAWS * 3 / 5)) < CHI2_999[4]
    # P(all three distinct) = 5 * 4 * 3 / 5^3 = 0.48
    distinct = np.mean([len(set(c)) == 3 for c in cohorts])
    assert abs(distinct - 0.48) < 4 * np.sqrt(0.48 * 0.52 / DRAWS)


def test_uniform_with_replacement_allows_more_clients_than_exist():
    cohorts = draw(uniform_sampler(2, 5, replace=True), draws=10)
    assert cohorts.shape == (10, 5) and set(np.unique(cohorts)) <= {0, 1}


def test_weighted_with_replacement_matches_size_proportions():
    cohorts = draw(weighted_sampler(SIZES, 3, replace=True))
    counts = np.bincount(cohorts.ravel(), minlength=len(SIZES))
    expected = DRAWS * 3 * SIZES / SIZES.sum()
    assert counts[4] == 0  # the empty client is never drawn
    assert chi_square(counts, expected) < CHI2_999[4]


def test_weighted_without_replacement_matches_successive_sampling_inclusion():
    cohorts = draw(weighted_sampler(SIZES, 3))
    assert all(len(set(c)) == 3 for c in cohorts)
    counts = np.bincount(cohorts.ravel(), minlength=len(SIZES))
    inclusion = successive_inclusion(SIZES / SIZES.sum(), 3)
    assert np.isclose(inclusion.sum(), 3.0)
    # Each client is in or out of a cohort: a binomial per client (the cells are not a
    # multinomial), so check each one at 4.5 standard deviations.
    expected = DRAWS * inclusion
    sd = np.sqrt(DRAWS * inclusion * (1 - inclusion))
    assert counts[4] == 0
    np.testing.assert_array_less(np.abs(counts - expected), 4.5 * sd + 1e-9)
    # The first draw alone is proportional to size.
    first = np.bincount(cohorts[:, 0], minlength=len(SIZES))
    assert chi_square(first, DRAWS * SIZES / SIZES.sum()) < CHI2_999[4]


def test_full_participation_is_every_client_in_order():
    np.testing.assert_array_equal(full_participation(4)(jax.random.key(0)), np.arange(4))


def test_samplers_reject_impossible_cohorts():
    with pytest.raises(ValueError, match="cohort size 6"):
        uniform_sampler(5, 6)
    with pytest.raises(ValueError, match="clients with data"):
        weighted_sampler(SIZES, 6)  # only 5 clients have data
    with pytest.raises(ValueError, match="client_sizes"):
        weighted_sampler(np.array([1, -1]), 1)
