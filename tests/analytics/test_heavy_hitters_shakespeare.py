"""TrieHH and the prefix count sketch on the real Shakespeare roles (a few plays) against counts
made here with `collections.Counter`: the vote and threshold semantics, the one-vote-per-client
word choice, each client's contribution bound, the sketch's hashing and error, its noise."""

import collections
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARED_DATA, needs_shared_data

from fedjax_sim.analytics import (
    count_sketch_heavy_hitters,
    tokenize,
    triehh,
    words_per_client_data,
)
from fedjax_sim.analytics import heavy_hitters as hh
from fedjax_sim.analytics.sources import shakespeare_roles

PLAYS = "shakespeare/SOURCES.tsv"
KEY = jax.random.PRNGKey(0)
LENGTH = 6  # words truncated to 6 letters: 7 levels
pytestmark = needs_shared_data(PLAYS)


def role_words(plays):
    """The words of the roles of the first ``plays`` plays (by file name), one list per role,
    each word truncated to LENGTH, plus two roles with no word."""
    roles = shakespeare_roles(str(SHARED_DATA))
    first = sorted({cid.split(":")[0] for cid in roles.client_ids})[:plays]
    out = [[w[:LENGTH] for line in lines for w in tokenize(line)]
           for cid, lines in zip(roles.client_ids, roles.lines, strict=True)
           if cid.split(":")[0] in first]
    return out[:3] + [[]] + out[3:] + [[]]


def top_distinct(words, k):
    """A client's k most frequent distinct words, ties by first occurrence."""
    counts = collections.Counter(words)
    first = {}
    for i, w in enumerate(words):
        first.setdefault(w, i)
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]


def test_triehh_finds_exactly_the_words_with_theta_votes():
    """One client per (role, distinct word) holding that word as often as the role says it:
    each client's vote is then fixed, and with every client voting every round (no sampling)
    a word is found iff at least theta clients hold it, with that many votes."""
    clients = [[w] * c for words in role_words(3) for w, c in collections.Counter(words).items()]
    clients += [[]]  # a client with no word votes for nothing
    holders = collections.Counter(c[0] for c in clients if c)
    theta = 7
    assert {theta - 1, theta} <= set(holders.values())  # the boundary is exercised
    data = words_per_client_data(clients, np.arange(len(clients)), LENGTH)
    found = triehh(data, theta=theta, max_prefixes=1024, key=KEY)
    expected = {w for w, c in holders.items() if c >= theta}
    assert len(expected) > 800 and set(found.words) == expected
    assert found.votes == [holders[w] for w in found.words]
    assert found.counts == found.votes  # n / m = 1
    assert found.words == sorted(expected, key=lambda w: (-holders[w], w))
    assert found.epsilon == math.inf
    first_letters = collections.Counter(w[0] for c in clients if c for w in c[:1])
    assert found.history[0]["votes"] == sum(first_letters.values()) == len(clients) - 1
    assert found.history[0]["prefixes"] == sum(c >= theta for c in first_letters.values())
    assert all(row["dropped"] == 0 for row in found.history)
    assert found.rounds == LENGTH + 1 or found.history[-1]["prefixes"] == 0


def test_triehh_clients_vote_for_one_uniformly_chosen_word():
    """The real roles (many words each) in the first round: a client votes for the first letter
    of one of its words drawn uniformly, so the votes for letter a average sum_c (share of c's
    words starting with a) over rounds; checked over 300 keys against that expectation and its
    binomial variance."""
    words = role_words(3)
    data = words_per_client_data(words, np.arange(len(words)), LENGTH)
    share = np.zeros((len(words), hh.ALPHABET_SIZE))
    for c, ws in enumerate(words):
        for w in ws:
            share[c, hh.ALPHABET.index(w[0]) + 1] += 1 / len(ws)
    mean, variance = share.sum(0), (share * (1 - share)).sum(0)
    table = np.full((8, LENGTH + 1), hh.PAD, np.int32)
    valid = np.arange(8) == 0  # the empty prefix

    @jax.jit
    def first_round(key):
        return hh._triehh_level(jnp.asarray(data.arrays["word"]),
                                jnp.asarray(data.offsets[:-1], jnp.int32),
                                jnp.asarray(data.client_sizes, jnp.int32), jnp.asarray(table),
                                jnp.asarray(valid), jnp.int32(1), len(words), key)[0]

    draws = np.asarray(jax.vmap(first_round)(jax.random.split(KEY, 300)))
    assert np.all(draws.sum(1) == sum(1 for ws in words if ws))  # one vote per client
    letters = variance > 0
    z = (draws.sum(0) - 300 * mean)[letters] / np.sqrt(300 * variance[letters])
    assert np.max(np.abs(z)) < 4.5, z
    np.testing.assert_array_equal(draws[:, ~letters], np.round(mean[~letters])[None].repeat(
        300, 0))  # letters no one or every client's words start with


@pytest.mark.parametrize("theta, clients, holds", [(10, 129, True), (10, 131, False),
                                                    (5, 100, False)])
def test_triehh_reports_epsilon_only_inside_corollary_1(theta, clients, holds):
    """Sampled TrieHH on the real roles (L = 7 rounds, delta 1e-6): Corollary 1's epsilon
    L ln(1 / (1 - theta m / n)) holds only if ((theta-3)/(theta-2)) theta! >= 1/delta and theta
    >= e^(epsilon/L) - 1 (checked here in exact integers and floats). theta 5 (delta 1e-6 needs
    10) or 131 of 1,430 clients at theta 10 (theta < e^(eps/L) - 1 = 10.9) reported a finite
    epsilon that does not hold (with a printed warning); now inf."""
    words = role_words(3) * 13  # 1,430 clients: 110 roles' words 13 times
    n = len(words)
    assert n == 1430
    data = words_per_client_data(words, np.arange(n), LENGTH)
    found = triehh(data, theta=theta, clients_per_round=clients, max_prefixes=256, key=KEY)
    formula = (LENGTH + 1) * math.log(1 / (1 - theta * clients / n))
    delta_ok = Fraction(theta - 3, theta - 2) * math.factorial(theta) * Fraction(1e-6) >= 1
    assert (delta_ok and theta >= math.exp(formula / (LENGTH + 1)) - 1) == holds
    assert found.epsilon == (pytest.approx(formula, rel=1e-12) if holds else math.inf)


def prefix_counts(top):
    """Clients per distinct prefix ('$' ends a word) of their top words, by length."""
    counts = collections.Counter()
    for words in top:
        counts.update({p for w in words for p in word_prefixes(w)})
    return counts


def test_count_sketch_counts_each_client_once_per_top_word():
    """words_per_client bounds what a client sends: its 8 most frequent distinct words (ties by
    first occurrence), each word once. Without noise and with a wide sketch, the decoded words
    and counts are exactly "clients with the word among their top 8"."""
    words = role_words(6)
    data = words_per_client_data(words, np.arange(len(words)), LENGTH)
    top = [top_distinct(ws, 8) for ws in words]
    rows = hh._client_top_words(data, 8)
    assert [[hh.decode_word(r) for r in client if r[0] >= 0] for client in rows] == top
    assert np.all(rows[3] == hh.PAD) and np.all(rows[-1] == hh.PAD)  # the empty clients
    users = collections.Counter(w for ws in top for w in ws)
    found = count_sketch_heavy_hitters(data, words_per_client=8, width=32768, beam=1024,
                                       key=KEY)
    assert set(found.words) == set(users)
    assert found.counts == [float(users[w]) for w in found.words]
    assert found.epsilon == math.inf and found.extra["threshold"] == 0.5


def word_prefixes(word):
    return [word[:i] for i in range(1, len(word) + 1)] + [word + "$"]


@pytest.mark.parametrize("words_per_client, depth, width", [(4, 1, 2), (8, 3, 8)])
def test_count_sketch_sum_equals_numpy_messages_clipped_and_summed(words_per_client, depth,
                                                                   width):
    """The clients' summed sketch against one built here: each real role's dense message (+-1
    at (length, row, bucket) for each distinct prefix of its top words, colliding entries
    adding up), clipped to L2 norm sqrt(words * L * depth) in float64, summed. In a 2-bucket,
    1-row sketch collisions push some roles over the bound: the clip is exercised."""
    words = role_words(6)
    data = words_per_client_data(words, np.arange(len(words)), LENGTH)
    tops = [top_distinct(ws, words_per_client) for ws in words]
    prefixes = sorted({p for top in tops for w in top for p in word_prefixes(w)})
    codes = hh.encode_words([p.rstrip("$") for p in prefixes], LENGTH)
    levels = np.array([len(p) for p in prefixes])
    codes = np.where(np.arange(LENGTH + 1)[None] < levels[:, None], codes, hh.PAD)
    hashes = hh._prefix_hashes(jnp.asarray(codes))[np.arange(len(prefixes)), levels - 1]
    bucket, sign = (np.asarray(a) for a in hh._buckets(hashes, depth, width))
    row = {p: i for i, p in enumerate(prefixes)}
    bound = math.sqrt(words_per_client * (LENGTH + 1) * depth)
    total, clipped = np.zeros((LENGTH + 1, depth, width)), 0
    for top in tops:
        message = np.zeros_like(total)
        for p in {p for w in top for p in word_prefixes(w)}:
            message[len(p) - 1, np.arange(depth), bucket[row[p]]] += sign[row[p]]
        norm = np.linalg.norm(message)
        clipped += norm > bound
        total += message * min(1.0, bound / max(norm, 1e-12))
    sketch = hh._sketch_sum_jit(jnp.asarray(hh._client_top_words(data, words_per_client)),
                                depth, width, bound, jnp.float32(0.0), KEY)
    np.testing.assert_allclose(np.asarray(sketch), total, atol=2e-4)
    assert clipped > 0 if depth == 1 else clipped == 0


def test_count_sketch_rows_hash_independently():
    """The buckets and signs of all distinct 5-letter prefixes of Shakespeare's words (12,336)
    in 5 rows of width 64: each row puts a pair of prefixes in one bucket with probability
    1 / width, two rows both do with 1 / width^2 (independent rows), signs are balanced and
    uncorrelated across rows."""
    roles = shakespeare_roles(str(SHARED_DATA))
    vocabulary = sorted({w[:LENGTH] for lines in roles.lines for line in lines
                         for w in tokenize(line) if len(w) >= 5})
    prefixes = sorted({w[:5] for w in vocabulary})
    codes = hh.encode_words(prefixes, LENGTH)
    hashes = hh._prefix_hashes(jnp.asarray(codes))[:, 4]
    assert len(prefixes) > 10_000 and np.unique(np.asarray(hashes)).size == len(prefixes)
    width, depth = 64, 5
    bucket, sign = (np.asarray(a) for a in hh._buckets(hashes, depth, width))
    pairs = len(prefixes) * (len(prefixes) - 1) / 2

    def colliding(keys):
        sizes = np.bincount(keys)
        return np.sum(sizes * (sizes - 1) / 2)

    for row in range(depth):
        assert colliding(bucket[:, row]) / pairs == pytest.approx(1 / width, rel=0.03)
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4)):
        joint = colliding(bucket[:, a] * width + bucket[:, b]) / pairs
        assert joint == pytest.approx(1 / width ** 2, rel=0.1)
        assert abs(np.mean(sign[:, a] * sign[:, b])) < 4 / math.sqrt(len(prefixes))
    assert np.all(np.abs(sign.mean(0)) < 4 / math.sqrt(len(prefixes)))


def test_count_sketch_estimates_within_the_error_bound():
    """A narrow sketch (width 64, depth 5) of the real roles' prefixes against their direct
    counts: a row's estimate errs by the signed counts that share its bucket, mean 0 and
    variance (||f||^2 - f^2) / width over the hash functions (Charikar et al. 2002), so over
    the ~200 prefixes of a length the mean error is near 0 and the mean squared error near that
    variance; each row fails Chebyshev's |err| <= sqrt(3 / width) ||f|| for at most a third,
    and the median over the rows (the estimate) fails less often than any row."""
    words = role_words(6)
    data = words_per_client_data(words, np.arange(len(words)), LENGTH)
    counts = prefix_counts([top_distinct(ws, 8) for ws in words])
    width, depth = 64, 5
    bound = math.sqrt(8 * (LENGTH + 1) * depth)
    sketch = np.asarray(hh._sketch_sum_jit(jnp.asarray(hh._client_top_words(data, 8)), depth,
                                           width, bound, jnp.float32(0.0), KEY))
    errors = []
    for level in (3, 4, 5):
        prefixes = [p for p in counts if len(p) == level]
        f = np.array([counts[p] for p in prefixes], np.float64)
        codes = hh.encode_words([p.rstrip("$") for p in prefixes], LENGTH)
        codes = np.where(np.arange(LENGTH + 1)[None] < level, codes, hh.PAD)  # prefix (+ '$')
        hashes = hh._prefix_hashes(jnp.asarray(codes))[:, level - 1]
        bucket, sign = (np.asarray(a) for a in hh._buckets(hashes, depth, width))
        per_row = sign * sketch[level - 1][np.arange(depth)[None], bucket] - f[:, None]
        norm2 = np.sum(f ** 2)
        errors.append(per_row.ravel())
        assert np.mean(per_row ** 2) == pytest.approx(np.mean(norm2 - f ** 2) / width,
                                                      rel=0.25)
        limit = math.sqrt(3 / width * norm2)
        fails = np.mean(np.abs(per_row) > limit, axis=0)
        assert np.all(fails <= 1 / 3)
        estimate = np.asarray(hh._estimates(jnp.asarray(sketch), jnp.asarray(codes),
                                            jnp.int32(level)))
        np.testing.assert_allclose(estimate, f + np.median(per_row, axis=1), atol=1e-4)
        assert np.mean(np.abs(estimate - f) > limit) < np.min(fails)
    errors = np.concatenate(errors)
    assert abs(errors.mean()) < 4 * errors.std() / math.sqrt(errors.size)


def test_count_sketch_noise_has_the_stated_std():
    """Clients with no word send nothing: the released sketch is the noise alone, std z * sqrt(
    words * L * depth) on every cell and mean 0."""
    empty = np.full((4, 3, LENGTH + 1), hh.PAD, np.int32)
    bound = math.sqrt(3 * (LENGTH + 1) * 3)
    cells = np.asarray(hh._sketch_sum_jit(jnp.asarray(empty), 3, 4096, bound,
                                          jnp.float32(1.5), KEY)).ravel()
    assert cells.std() == pytest.approx(1.5 * bound, rel=0.02)
    assert abs(cells.mean()) < 4 * 1.5 * bound / math.sqrt(cells.size)
