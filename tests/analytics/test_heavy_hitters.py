"""TrieHH and the prefix count sketch against exact counts of a synthetic Zipf vocabulary, and
their privacy parameters against the paper's formulas and dp-accounting."""

import collections
import math
from fractions import Fraction

import jax
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim.analytics import (
    count_sketch_heavy_hitters,
    exact_counts,
    tokenize,
    triehh,
    triehh_epsilon,
    triehh_parameters,
    words_per_client_data,
)
from fedjax_sim.analytics.heavy_hitters import decode_word, encode_words

KEY = jax.random.PRNGKey(0)


def zipf_clients(num_clients=1000, vocabulary=200, words_each=1, seed=0):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnop")
    vocab = list(dict.fromkeys("".join(rng.choice(letters, size=rng.integers(1, 7)))
                               for _ in range(vocabulary)))
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.2
    draws = rng.choice(len(vocab), size=(num_clients, words_each), p=p / p.sum())
    return [[vocab[i] for i in row] for row in draws]


def top_k(counter, k):
    """The most common words, ordered by (-count, word), cut at k or before, where no tie with
    the next word makes the set ambiguous."""
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    while 0 < k < len(ranked) and ranked[k - 1][1] == ranked[k][1]:
        k -= 1
    assert k >= 5
    return [w for w, _ in ranked[:k]]


@pytest.fixture(scope="module")
def zipf():
    """1,000 clients with one word each, and 1,000 with three (one shape per compile)."""
    one = zipf_clients()
    three = zipf_clients(words_each=3, seed=3)
    return {name: (clients, words_per_client_data(clients, np.arange(len(clients)), 6))
            for name, clients in (("one", one), ("three", three))}


def test_encoding_round_trip_and_tokenizer():
    codes = encode_words(["the", "a", "toolongword"], max_length=5)
    assert codes.shape == (3, 6)
    assert [decode_word(c) for c in codes] == ["the", "a", "toolo"]
    assert codes[0].tolist() == [20, 8, 5, 0, -1, -1]
    assert tokenize("O, 'tis TRUE!  Good-night, lov'd king's.") == [
        "o", "tis", "true", "good", "night", "lov'd", "king's"]
    assert decode_word(encode_words(["lov'd"], 6)[0]) == "lov'd"


def test_triehh_without_privacy_recovers_the_exact_top_k(zipf):
    clients, data = zipf["one"]
    exact = collections.Counter(w for words in clients for w in words)
    assert exact == exact_counts(data)
    found = triehh(data, theta=1, max_prefixes=256, key=KEY)  # every client votes in every round
    assert found.epsilon == math.inf
    expected = top_k(exact, 15)
    assert found.top(len(expected)) == expected
    assert found.counts == [exact[w] for w in found.words]  # all clients vote: exact counts
    assert set(found.words) == set(exact)  # theta 1: every word
    assert all(row["votes"] <= len(clients) for row in found.history)


def test_triehh_threshold_keeps_exactly_the_words_with_enough_votes(zipf):
    clients, data = zipf["one"]
    exact = collections.Counter(w for words in clients for w in words)
    found = triehh(data, theta=12, max_prefixes=256, key=KEY)
    # with every client voting a word's votes are its count, and its prefixes have more
    assert set(found.words) == {w for w, c in exact.items() if c >= 12}


def test_triehh_sampling_votes_once_per_sampled_client(zipf):
    _, data = zipf["three"]
    found = triehh(data, theta=3, clients_per_round=60, max_prefixes=256, key=KEY)
    assert found.history[0]["votes"] == 60  # every sampled client votes for a first letter
    assert all(row["votes"] <= 60 for row in found.history)
    # theta 3 is outside Corollary 1 (((theta-3)/(theta-2)) theta! >= 1/delta needs theta > 3)
    assert found.epsilon == math.inf and found.extra["delta_condition"] is False


def brute_force_theta(epsilon, delta, levels):
    theta = 5  # exact integer arithmetic: (theta - 3) theta! delta >= theta - 2
    while (Fraction(theta - 3) * math.factorial(theta) * Fraction(delta) < theta - 2
           or theta < math.exp(epsilon / levels) - 1):
        theta += 1
    return theta


@pytest.mark.parametrize("epsilon, delta, n, levels", [
    (1.0, 1e-6, 1390, 11), (8.0, 1e-6, 10**6, 11), (4.0, 2.3e-12, 10**5, 10),
    (30, 1e-3, 10**6, 5)])  # the last: theta from e^(epsilon / L) - 1 = 402
def test_triehh_parameters_follow_corollary_1(epsilon, delta, n, levels):
    theta, m = triehh_parameters(epsilon, delta, n, levels)
    assert theta == brute_force_theta(epsilon, delta, levels)
    assert m == max(1, int(n * (math.exp(epsilon / levels) - 1)
                           / (theta * math.exp(epsilon / levels))))
    spent = triehh_epsilon(theta, m, n, levels)
    assert spent <= epsilon + 1e-9
    assert triehh_epsilon(theta, m + 1, n, levels) > epsilon  # m is the largest that fits


def test_count_sketch_without_noise_recovers_the_exact_top_k(zipf):
    clients, data = zipf["three"]
    # each client sends its (at most 3) distinct words once: the count is "clients using it"
    users = collections.Counter(w for words in clients for w in set(words))
    found = count_sketch_heavy_hitters(data, words_per_client=3, width=4096, key=KEY)
    expected = top_k(users, 15)
    assert found.top(len(expected)) == expected
    assert found.counts[:len(expected)] == [users[w] for w in expected]
    assert found.epsilon == math.inf


def test_count_sketch_noise_and_epsilon_equal_dp_accounting(zipf):
    clients, data = zipf["three"]
    found = count_sketch_heavy_hitters(data, words_per_client=3, noise_multiplier=1.5,
                                       width=4096, key=KEY, delta=1e-6)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(1.5), 1)
    assert found.epsilon == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9)
    assert found.extra["sensitivity"] == pytest.approx(math.sqrt(3 * 7 * 3))
    users = collections.Counter(w for words in clients for w in set(words))
    assert found.top(2) == top_k(users, 5)[:2]  # the head stands far above 3 noise stds


def test_private_triehh_finds_the_head_of_a_large_population():
    """Corollary 1's theta and sampling at epsilon 8 on 50,000 one-word clients."""
    clients = zipf_clients(num_clients=50_000, seed=6)
    data = words_per_client_data(clients, np.arange(len(clients)), max_length=6)
    theta, m = triehh_parameters(8.0, 1e-6, len(clients), levels=7)
    assert (theta, m) == (10, 3405)
    found = triehh(data, theta=theta, clients_per_round=m, max_prefixes=256, key=KEY)
    assert found.epsilon == pytest.approx(triehh_epsilon(10, 3405, 50_000, 7)) and \
        found.epsilon <= 8.0
    exact = collections.Counter(w for words in clients for w in words)
    assert found.top(5) == top_k(exact, 5)
    # an estimate is the votes scaled by n / m: within 25% for the head
    for word, estimate in zip(found.top(5), found.counts[:5], strict=True):
        assert estimate == pytest.approx(exact[word], rel=0.25)


def brute_force_clients(epsilon, theta, n, levels):
    """The largest m with L ln(1 / (1 - theta m / n)) <= epsilon, by trying every m."""
    fits = [m for m in range(n + 1)
            if theta * m < n and levels * math.log(n / (n - theta * m)) <= epsilon]
    return max(fits)


@pytest.mark.parametrize("epsilon, delta, n, levels, theta", [
    (8.0, 1e-6, 1390, 11, 12), (1.0, 1e-6, 10**5, 7, 10), (4.0, 1e-9, 5000, 11, 40)])
def test_triehh_parameters_for_a_given_theta_fit_the_target(epsilon, delta, n, levels, theta):
    """A theta of one's own (at least Corollary 1's): the clients per round are the most that
    the target epsilon allows at that theta, found by trying every m."""
    assert theta >= brute_force_theta(epsilon, delta, levels)
    assert triehh_parameters(epsilon, delta, n, levels, theta=theta) == (
        theta, brute_force_clients(epsilon, theta, n, levels))


def test_triehh_parameters_refuse_what_corollary_1_does_not_allow():
    """A theta below Corollary 1's (5 at delta 1e-6, which needs 10), and a target so small
    for 1,390 clients that even one client a round spends more: at epsilon 0.05 the old code
    returned (10, 1), whose epsilon is 0.0794."""
    assert brute_force_theta(8.0, 1e-6, 11) == 10
    with pytest.raises(ValueError, match="theta 5 is below the 10 that Corollary 1 needs"):
        triehh_parameters(8.0, 1e-6, 1390, 11, theta=5)
    assert brute_force_clients(0.05, 10, 1390, 11) == 0
    assert 11 * math.log(1390 / 1380) > 0.05
    with pytest.raises(ValueError, match="epsilon 0.05 is too small for 1390 clients"):
        triehh_parameters(0.05, 1e-6, 1390, 11)


@pytest.mark.parametrize("word", ["The", "café", "", "good-night", 3])
def test_a_word_outside_the_alphabet_is_named(word):
    """'The' (a word not lower-cased) raised "substring not found"; the empty word was encoded
    as a bare terminator (TrieHH then discovered '' as a word)."""
    with pytest.raises(ValueError, match=r"word .*: expected a non-empty string of the "
                                         r"characters \"abcdefghijklmnopqrstuvwxyz'\""):
        words_per_client_data([["king", word]], [0], 6)
