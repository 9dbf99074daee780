"""Heavy hitters discovery with differential privacy: TrieHH and a one-shot prefix count sketch.

**TrieHH** (Zhu, Kairouz, McMahan, Sun and Li 2020, "Federated Heavy Hitters Discovery with
Differential Privacy", AISTATS, arXiv:1902.08534). Words end with a terminator ``$``; the server
grows a trie one character per round. In round i it samples ``m`` of the n clients uniformly
without replacement; each sampled client picks one of its words uniformly at random and votes
for the word's length-i prefix if the length-(i-1) prefix is already in the trie (one vote,
nothing otherwise). Prefixes with at least ``theta`` votes join the trie; a prefix ending in
``$`` is a discovered word. No noise is added: privacy comes from sampling and thresholding.

Privacy (the bound implemented, exactly): Corollary 1 of the paper as the authors' reference
code (google-research/federated, ``triehh``) applies it. For L rounds (the longest word plus
its ``$``), sampling rate ``gamma = m / n`` and threshold ``theta``, TrieHH is (epsilon,
delta)-DP with

  epsilon = L * ln(1 / (1 - theta * gamma))                (needs theta * gamma < 1)

provided ``((theta - 3) / (theta - 2)) * theta! >= 1 / delta`` and ``theta >= e^(epsilon / L)
- 1``. Given (epsilon, delta), `triehh_parameters` takes the smallest such theta (at least 5)
and ``m = floor(n (e^(epsilon/L) - 1) / (theta e^(epsilon/L)))``, which solves the formula for
gamma (rounding m down only lowers epsilon). This is the paper's analysis, not a
``dp-accounting`` event: sample-and-threshold has no Gaussian or Laplace mechanism to account.

**Prefix count sketch** (one shot): each client sends, in one message, a count sketch
(Charikar, Chen and Farach-Colton 2002) of the distinct prefixes of its ``words_per_client``
most frequent words at every length, one sketch per length; the sum over the clients (linear,
so a secure sum could compute it) gets Gaussian noise of std ``z * S`` with ``S = sqrt(words *
L * depth)`` the L2 bound of one client's message (enforced by clipping), so the release is
one Gaussian mechanism of multiplier z, accounted by ``dp-accounting``. The server decodes
the words without a dictionary by walking the prefix tree: extend each kept prefix by every
character, estimate its count (the median over the sketch's rows), keep those above a
threshold (a beam). TFF's one-shot method is an IBLT (``tff.analytics.heavy_hitters.iblt``);
this is the count-sketch variant of the same idea, with the tree decoding of Bassily et al.
2017 ("Practical Locally Private Heavy Hitters", TreeHist) in the central model.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import aggregators as agg
from fedjax_sim.analytics.mechanisms import gaussian_epsilon
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.federated import (
    at_clients,
    at_server,
    execution_context,
    federated_aggregate,
    federated_broadcast,
    federated_map,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz'"  # the apostrophe of "lov'd" and "king's" too
END = 0  # the terminator "$"; letters are 1..27
PAD = -1  # after the terminator
ALPHABET_SIZE = len(ALPHABET) + 1
_LETTERS = frozenset(ALPHABET)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")

__all__ = [
    "ALPHABET", "HeavyHitters", "count_sketch_heavy_hitters", "decode_word", "encode_words",
    "exact_counts", "tokenize", "triehh", "triehh_epsilon", "triehh_parameters",
    "triehh_smallest_theta", "words_per_client_data",
]


def tokenize(line: str) -> list[str]:
    """Lower-case words: runs of letters a-z joined by inner apostrophes (``"O, 'tis lov'd!"``
    -> ``["o", "tis", "lov'd"]``)."""
    return _WORD.findall(line.lower())


def encode_words(words: Sequence[str], max_length: int) -> np.ndarray:
    """``[N, max_length + 1]`` int32: letters 1..27, then ``END`` (0), then ``PAD`` (-1).

    Words longer than ``max_length`` are truncated to it. Each distinct word is encoded once.
    ValueError for a word with a character outside ``ALPHABET`` (`tokenize` gives none).
    """
    ids: dict[str, int] = {}
    index = np.fromiter((ids.setdefault(w, len(ids)) for w in words), np.int64, len(words))
    distinct = list(ids)
    for word in distinct:
        if not isinstance(word, str) or not word or set(word) - _LETTERS:
            raise ValueError(
                f"word {word!r}: expected a non-empty string of the characters {ALPHABET!r} "
                "(lower-case letters and the apostrophe; tokenize() splits and lower-cases "
                "text)")
    table = np.full((len(distinct), max_length + 1), PAD, np.int32)
    for row, word in enumerate(distinct):
        codes = [ALPHABET.index(c) + 1 for c in word[:max_length]]
        table[row, :len(codes)] = codes
        table[row, len(codes)] = END
    return table[index]


def decode_word(codes: Sequence[int]) -> str:
    """The letters before the first ``END`` / ``PAD``."""
    letters = []
    for code in codes:
        if code <= 0:
            break
        letters.append(ALPHABET[code - 1])
    return "".join(letters)


def words_per_client_data(client_words: Sequence[Sequence[str]], client_ids: Sequence[Any],
                          max_length: int) -> FederatedData:
    """A `FederatedData` with one example per word occurrence: ``{"word": [N, L + 1]}``."""
    flat = [w for words in client_words for w in words]
    sizes = [len(words) for words in client_words]
    return FederatedData({"word": encode_words(flat, max_length)},
                         np.concatenate([[0], np.cumsum(sizes)]), np.asarray(client_ids))


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One sortable key per encoded word: an int64 in base 29 (up to 12 codes), else bytes."""
    rows = np.ascontiguousarray(rows)
    if rows.shape[1] <= 12:
        powers = (ALPHABET_SIZE + 1) ** np.arange(rows.shape[1], dtype=np.int64)
        return (rows.astype(np.int64) + 1) @ powers
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()


def exact_counts(data: FederatedData) -> collections.Counter:
    """Occurrences of every (truncated) word over all clients: the reference."""
    rows = np.ascontiguousarray(data.arrays["word"])
    if rows.shape[0] == 0:
        return collections.Counter()
    _, first, counts = np.unique(_row_keys(rows), return_index=True, return_counts=True)
    return collections.Counter({decode_word(rows[i]): int(c) for i, c in
                                zip(first, counts, strict=True)})


@dataclasses.dataclass(frozen=True)
class HeavyHitters:
    """Discovered words, best first.

    Attributes:
      words: the words.
      counts: their estimated counts (TrieHH: votes scaled by n / m; sketch: its estimate).
      votes: TrieHH's raw votes (the sketch: its estimate again).
      epsilon, delta: the guarantee (inf: not private).
      rounds: the rounds (trie levels) run; 1 for the one-shot sketch.
      history: one dict per round (level, prefixes, new words, votes cast).
      extra: method facts (theta, clients per round, noise multiplier, ...).
    """

    words: list[str]
    counts: list[float]
    votes: list[float]
    epsilon: float
    delta: float
    rounds: int
    history: list[dict]
    extra: dict

    def top(self, k: int) -> list[str]:
        return self.words[:k]


# --- TrieHH -----------------------------------------------------------------------------------


def _delta_condition(theta: int, delta: float) -> bool:
    """``((theta - 3) / (theta - 2)) theta! >= 1 / delta``, in logarithms (no overflow)."""
    if theta <= 3:
        return False
    return math.log((theta - 3) / (theta - 2)) + math.lgamma(theta + 1) >= -math.log(delta)


def triehh_smallest_theta(epsilon: float, delta: float, levels: int) -> int:
    """The smallest integer theta >= 5 with ``((theta-3)/(theta-2)) theta! >= 1/delta`` and
    ``theta >= e^(epsilon/L) - 1`` (Corollary 1's conditions; both grow with theta)."""
    if not epsilon > 0 or not 0 < delta < 1:
        raise ValueError(f"TrieHH needs epsilon > 0 and delta in (0, 1), got {epsilon}, {delta}")
    theta = 5
    while not _delta_condition(theta, delta):
        theta += 1
    return max(theta, int(math.ceil(math.exp(epsilon / levels) - 1)))


def triehh_parameters(epsilon: float, delta: float, num_clients: int, levels: int,
                      theta: int | None = None) -> tuple[int, int]:
    """``(theta, clients_per_round)`` of Corollary 1 for a target (epsilon, delta).

    theta: None: the smallest that Corollary 1 allows (`triehh_smallest_theta`); or one's own,
    at least that (ValueError otherwise). Clients per round: the largest m whose epsilon is at
    most the target, ``floor(n (e^(epsilon/L) - 1) / (theta e^(epsilon/L)))``; ValueError when
    that is 0 (even one client a round would spend more than epsilon: too few clients).
    """
    smallest = triehh_smallest_theta(epsilon, delta, levels)
    if theta is None:
        theta = smallest
    elif theta < smallest:
        raise ValueError(
            f"theta {theta} is below the {smallest} that Corollary 1 needs at epsilon {epsilon:g}, "
            f"delta {delta:g} (((theta-3)/(theta-2)) theta! >= 1/delta and theta >= "
            f"e^(epsilon/L) - 1, L = {levels})")
    growth = math.exp(epsilon / levels)
    clients = int(num_clients * (growth - 1) / (theta * growth))
    if clients < 1:
        raise ValueError(
            f"epsilon {epsilon:g} is too small for {num_clients} clients at theta {theta}: one "
            f"client a round of {levels} rounds already spends epsilon "
            f"{triehh_epsilon(theta, 1, num_clients, levels):.3g}")
    return theta, min(clients, num_clients)


def triehh_epsilon(theta: int, clients_per_round: int, num_clients: int, levels: int) -> float:
    """``L ln(1 / (1 - theta * gamma))``, gamma = m / n (inf when theta * gamma >= 1)."""
    product = theta * clients_per_round / num_clients
    if product >= 1:
        return math.inf
    return levels * math.log(1.0 / (1.0 - product))


def _triehh_level(words, offsets, sizes, table, valid, level, clients_per_round, key):
    """One round: the sampled clients' votes, counted per (trie prefix, next character)."""
    num_clients = sizes.shape[0]
    rows, length = table.shape
    sample_key, choice_key = jax.random.split(key)
    # the round's cohort: m clients uniformly without replacement; only they compute
    chosen = jax.random.permutation(sample_key, num_clients)[:clients_per_round]
    client_keys = jax.random.split(choice_key, clients_per_round)
    clients = at_clients((offsets[chosen], sizes[chosen], client_keys))
    shared = federated_broadcast(at_server((words, table, valid, level)))

    def vote(client, trie):
        offset, size, client_key = client
        all_words, prefixes, prefix_valid, position = trie
        pick = jnp.floor(jax.random.uniform(client_key) * size).astype(jnp.int32)
        word = all_words[offset + jnp.minimum(pick, jnp.maximum(size - 1, 0))]
        before = jnp.arange(length) < position - 1
        match = jnp.all((prefixes == word[None]) | ~before[None], axis=1) & prefix_valid
        char = word[position - 1]
        ok = (size > 0) & jnp.any(match) & (char >= 0)
        return jnp.where(ok, jnp.argmax(match) * ALPHABET_SIZE + char, -1)

    with execution_context("vmap"):  # a few gathers and compares per client: vmap them
        ballots = federated_map(lambda c, t: vote(c, t), [clients, shared])
    bins = rows * ALPHABET_SIZE

    def accumulate(counts, ballot):
        return counts.at[jnp.where(ballot >= 0, ballot, bins)].add(1, mode="drop")

    counts = federated_aggregate(ballots, jnp.zeros((bins,), jnp.int32), accumulate,
                                 jnp.add, lambda c: c)
    return counts.value.reshape(rows, ALPHABET_SIZE)


_triehh_level_jit = jax.jit(_triehh_level, static_argnums=(6,))


def triehh(data: FederatedData, *, theta: int, clients_per_round: int | None = None,
           max_prefixes: int = 1024, key: jax.Array, delta: float = 1e-6,
           on_round: Callable[[dict], None] | None = None) -> HeavyHitters:
    """TrieHH over ``data`` (``{"word": [N, L + 1]}`` from `words_per_client_data`).

    Args:
      data: the clients' word occurrences (a client's words are its rows).
      theta: the vote threshold for a prefix to join the trie.
      clients_per_round: m, sampled uniformly without replacement each round (None: all).
      max_prefixes: static width of the trie table; if more prefixes pass the threshold in a
        round, the most voted are kept (reported in the history as ``dropped``).
      key: the randomness of the sampling and of the clients' word choices.
      delta: the delta of the reported epsilon (`triehh_epsilon`; inf when m = n or when
        Corollary 1's conditions fail: ``((theta-3)/(theta-2)) theta! < 1/delta`` or ``m (theta
        + 1) > n``, i.e. theta < e^(epsilon/L) - 1).
      on_round: called with each round's history row (progress bars, logs).
    """
    words = jnp.asarray(data.arrays["word"], jnp.int32)
    length = int(words.shape[1])
    n = data.num_clients
    m = n if clients_per_round is None else int(clients_per_round)
    if not 1 <= m <= n:
        raise ValueError(f"clients_per_round must be in [1, {n}], got {clients_per_round}")
    if theta < 1:
        raise ValueError(f"theta must be >= 1, got {theta}")
    offsets = jnp.asarray(data.offsets[:-1], jnp.int32)
    sizes = jnp.asarray(data.client_sizes, jnp.int32)
    table = np.full((max_prefixes, length), PAD, np.int32)
    valid = np.zeros(max_prefixes, bool)
    valid[0] = True  # the empty prefix
    found: dict[str, int] = {}
    history = []
    rounds = 0
    for level in range(1, length + 1):
        rounds = level
        counts = np.asarray(_triehh_level_jit(
            words, offsets, sizes, jnp.asarray(table), jnp.asarray(valid), jnp.int32(level), m,
            jax.random.fold_in(key, level)))
        parents, chars = np.nonzero(counts >= theta)
        new_words = 0
        extend = []
        for parent, char in zip(parents, chars, strict=True):
            if char == END:
                found[decode_word(table[parent])] = int(counts[parent, char])
                new_words += 1
            else:
                extend.append((int(counts[parent, char]), int(parent), int(char)))
        extend.sort(key=lambda e: (-e[0], e[1], e[2]))
        dropped = max(0, len(extend) - max_prefixes)
        new_table = np.full_like(table, PAD)
        for row, (_, parent, char) in enumerate(extend[:max_prefixes]):
            new_table[row] = table[parent]
            new_table[row, level - 1] = char
        valid = np.arange(max_prefixes) < min(len(extend), max_prefixes)
        table = new_table
        row = {"round": level, "prefixes": int(valid.sum()), "new_words": new_words,
               "words": len(found), "votes": int(counts.sum()), "dropped": dropped}
        history.append(row)
        if on_round is not None:
            on_round(row)
        if not valid.any():
            break
    order = sorted(found, key=lambda w: (-found[w], w))
    scale = n / m
    # Corollary 1 holds only under its conditions; theta >= e^(epsilon/L) - 1 with its epsilon
    # is m (theta + 1) <= n. Outside them there is no guarantee: epsilon inf.
    delta_condition = _delta_condition(int(theta), delta)
    holds = m < n and delta_condition and m * (theta + 1) <= n
    epsilon = triehh_epsilon(theta, m, n, length) if holds else math.inf
    return HeavyHitters(order, [found[w] * scale for w in order], [found[w] for w in order],
                        epsilon, delta, rounds, history,
                        {"method": "triehh", "theta": int(theta), "clients_per_round": m,
                         "sampling_rate": m / n, "levels": length,
                         "bound": "Zhu et al. 2020, Corollary 1: epsilon = L ln(1/(1 - theta "
                                  "m/n)), ((theta-3)/(theta-2)) theta! >= 1/delta",
                         "delta_condition": bool(delta_condition),
                         "sampling_condition": bool(m * (theta + 1) <= n)})


# --- the one-shot prefix count sketch -------------------------------------------------------


def _mix(h):
    """MurmurHash3's 32-bit finalizer (uint32 -> uint32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _prefix_hashes(words: jax.Array) -> jax.Array:
    """``[..., L]`` uint32: a hash of every prefix ``word[:i + 1]`` (a rolling hash)."""
    def step(h, code):
        h = _mix(h * jnp.uint32(0x9E3779B1) + (code + 2).astype(jnp.uint32))
        return h, h

    moved = jnp.moveaxis(words, -1, 0)
    _, hashes = jax.lax.scan(step, jnp.zeros(moved.shape[1:], jnp.uint32), moved)
    return jnp.moveaxis(hashes, 0, -1)


def _buckets(hashes: jax.Array, depth: int, width: int) -> tuple[jax.Array, jax.Array]:
    """``[..., depth]`` bucket in [0, width) and sign in {-1, 1} of each hash in each row."""
    seeds = jnp.asarray([0x3C6EF372 + 0x1000193 * d for d in range(depth)], jnp.uint32)
    h = _mix(hashes[..., None] ^ seeds)
    bucket = (h % jnp.uint32(width)).astype(jnp.int32)
    sign = jnp.where(_mix(h ^ jnp.uint32(0x5BD1E995)) >> 31 == 1, 1.0, -1.0)
    return bucket, sign


def _client_top_words(data: FederatedData, count: int) -> np.ndarray:
    """``[C, count, L + 1]``: each client's ``count`` most frequent distinct words (PAD rows
    when it has fewer; ties: first occurrence first). Each client's local preprocessing."""
    words = np.ascontiguousarray(data.arrays["word"])
    out = np.full((data.num_clients, count, words.shape[1]), PAD, np.int32)
    if words.shape[0] == 0:
        return out
    _, word_id = np.unique(_row_keys(words), return_inverse=True)
    client = np.repeat(np.arange(data.num_clients), data.client_sizes)
    pair = client.astype(np.int64) * (int(word_id.max()) + 1) + word_id.reshape(-1)
    pairs, first, frequency = np.unique(pair, return_index=True, return_counts=True)
    pair_client = client[first]
    order = np.lexsort((first, -frequency, pair_client))  # by client, most frequent first
    starts = np.searchsorted(pair_client[order], np.arange(data.num_clients))
    rank = np.arange(order.size) - starts[pair_client[order]]
    take = order[rank < count]
    out[pair_client[take], rank[rank < count]] = words[first[take]]
    return out


def _sketch_sum(top_words, depth, width, bound, noise_multiplier, key):
    """The clients' sketches summed (`federated_aggregate`), plus the Gaussian stage's noise."""
    num_clients, count, length = top_words.shape
    size = length * depth * width

    def message(words):  # one client's sparse sketch: (indices [K], values [K])
        codes_ok = words >= 0
        # a prefix counts once per client: drop it where an earlier word has the same prefix
        same = jnp.cumprod(words[:, None, :] == words[None, :, :], axis=-1).astype(bool)
        earlier = jnp.tril(jnp.ones((count, count), bool), -1)
        duplicate = jnp.any(same & earlier[:, :, None], axis=1)  # [count, L]
        keep = codes_ok & ~duplicate
        bucket, sign = _buckets(_prefix_hashes(words), depth, width)  # [count, L, depth]
        cell = ((jnp.arange(length)[:, None] * depth + jnp.arange(depth)[None, :]) * width)
        index = jnp.where(keep[..., None], cell[None] + bucket, size).reshape(-1)
        value = jnp.where(keep[..., None], sign, 0.0).reshape(-1)
        # the dense message's L2 norm (colliding entries add up), then clip to the bound
        norm = jnp.sqrt(jnp.sum(value * jnp.sum(
            jnp.where(index[:, None] == index[None, :], value[None, :], 0.0), axis=1)))
        return index, value * jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-12))

    # each message builds a [K, K] collision matrix: map the clients in chunks of 64
    with execution_context("map", client_batch_size=64):
        messages = federated_map(message, at_clients(top_words))

    def accumulate(sketch, entry):
        index, value = entry
        return sketch.at[index].add(value, mode="drop")

    total = federated_aggregate(messages, jnp.zeros((size,), jnp.float32), accumulate, jnp.add,
                                lambda s: s).value
    stage = agg.gaussian_noise(1.0)  # z as an array in its state: one compilation for all z
    state = {**stage.init(total), "noise_multiplier": noise_multiplier}
    total, _, _, _ = stage.apply(state, total, key, {"sensitivity": jnp.float32(bound)})
    return total.reshape(length, depth, width)


_sketch_sum_jit = jax.jit(_sketch_sum, static_argnums=(1, 2, 3))


@jax.jit
def _estimates(sketch, prefixes, level):
    length, depth, width = sketch.shape
    hashes = _prefix_hashes(prefixes)[:, level - 1]  # [P]
    bucket, sign = _buckets(hashes, depth, width)  # [P, depth]
    cells = sketch[level - 1][jnp.arange(depth)[None, :], bucket]
    return jnp.median(sign * cells, axis=1)


def count_sketch_heavy_hitters(
    data: FederatedData, *, words_per_client: int = 8, depth: int = 3, width: int = 32768,
    noise_multiplier: float = 0.0, threshold: float | None = None, beam: int = 256,
    key: jax.Array, delta: float = 1e-6, accountant: str = "rdp",
) -> HeavyHitters:
    """The one-shot prefix count sketch (module docstring) over ``data`` (``{"word": ...}``).

    Args:
      data: the clients' word occurrences.
      words_per_client: each client contributes its this many most frequent distinct words.
      depth, width: the sketch's rows and buckets per row (one sketch per prefix length).
      noise_multiplier: z; the noise on every cell has std ``z * sqrt(words * L * depth)``.
      threshold: a prefix is kept when its estimated count is at least this (None: 3 noise
        stds, or 0.5 without noise).
      beam: at most this many prefixes are extended per length.
      key: the noise's randomness.
      delta: the delta of the reported epsilon (one Gaussian query, ``dp-accounting``).
    """
    if words_per_client < 1 or depth < 1 or width < 2 or beam < 1:
        raise ValueError("words_per_client, depth and beam must be >= 1 and width >= 2, got "
                         f"{words_per_client}, {depth}, {width}, {beam}")
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    top_words = _client_top_words(data, words_per_client)
    length = top_words.shape[2]
    bound = math.sqrt(words_per_client * length * depth)
    sigma = noise_multiplier * bound
    if threshold is None:
        threshold = 3.0 * sigma if sigma > 0 else 0.5
    sketch = _sketch_sum_jit(jnp.asarray(top_words), depth, width, bound,
                             jnp.float32(noise_multiplier), key)
    kept = np.full((1, length), PAD, np.int32)
    found: dict[str, float] = {}
    history = []
    for level in range(1, length + 1):
        candidates = np.repeat(kept, ALPHABET_SIZE, axis=0)
        candidates[:, level - 1] = np.tile(np.arange(ALPHABET_SIZE), len(kept))
        # a fixed shape (beam x alphabet), so the estimate compiles once
        padded = np.full((beam * ALPHABET_SIZE, length), PAD, np.int32)
        padded[:len(candidates)] = candidates
        estimates = np.asarray(_estimates(sketch, jnp.asarray(padded), jnp.int32(level)))
        estimates = estimates[:len(candidates)]
        passing = estimates >= threshold
        if level == 1:
            passing[END] = False  # the empty word is not a word
        ends = passing & (candidates[:, level - 1] == END)
        for row in np.flatnonzero(ends):
            found[decode_word(candidates[row])] = float(estimates[row])
        extend = np.flatnonzero(passing & ~ends)
        extend = extend[np.argsort(-estimates[extend], kind="stable")][:beam]
        kept = candidates[extend]
        history.append({"round": level, "prefixes": int(kept.shape[0]),
                        "words": len(found)})
        if kept.shape[0] == 0:
            break
    order = sorted(found, key=lambda w: (-found[w], w))
    counts = [found[w] for w in order]
    epsilon = gaussian_epsilon(noise_multiplier, 1, delta, accountant=accountant)
    return HeavyHitters(order, counts, counts, epsilon, delta, 1, history,
                        {"method": "count_sketch", "noise_multiplier": float(noise_multiplier),
                         "noise_stddev": sigma, "sensitivity": bound, "threshold": threshold,
                         "words_per_client": words_per_client, "depth": depth,
                         "width": width, "beam": beam})
