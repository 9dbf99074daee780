"""Token ids of the text datasets: TFF's character vocabulary and exact word vocabularies.

**Characters** (Shakespeare by role, ``tff_shakespeare``, ``leaf_shakespeare``): TFF's
86-character vocabulary in its order (``char_prediction_preprocessing``), ``0`` pads, the
characters are ``1..86``, then OOV ``87``, BOS ``88``, EOS ``89``. Every character outside the
vocabulary is OOV. The datasets differ in their *unit* only where the text is not ASCII (the
vocabulary is all ASCII, so ASCII text gets the same ids everywhere):

* `char_ids` / `char_windows` (Shakespeare by role, ``tff_shakespeare``): one id per UTF-8 byte,
  as TFF's ``tf.strings.bytes_split`` does, so a non-ASCII character is one OOV per byte;
* `code_point_ids` (``leaf_shakespeare``): one id per character, as LEAF's 80-character strings
  are indexed; a per-byte split would shift LEAF's next-character target off its position.

**Words** (``tff_stackoverflow``, ``leaf_sent140``): a `Vocabulary` looks words up exactly and
vectorized (hashes over fixed-width byte keys, confirmed byte for byte); `lookup_words` splits
texts and looks their leading words up, `lookup_tokens` looks up already split tokens, and
`most_frequent` builds a vocabulary from training tokens. Each dataset maps the vocabulary index
to its own ids (TFF: ``index + 1``, LEAF's Sent140: ``index + 2``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# --- characters -----------------------------------------------------------------------------------

# TFF's vocabulary, copied in its order from tensorflow_federated/python/simulation/baselines/
# shakespeare/char_prediction_preprocessing.py (itself from the "Federated Learning for Text
# Generation" tutorial). The order fixes the ids, so TFF-trained models read our data.
CHAR_VOCAB: tuple[str, ...] = tuple(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
# Special ids as TFF's `get_special_tokens`: 0 pads, the characters are 1..86, then OOV, BOS, EOS.
PAD_ID = 0
OOV_ID = len(CHAR_VOCAB) + 1  # 87
BOS_ID = len(CHAR_VOCAB) + 2  # 88
EOS_ID = len(CHAR_VOCAB) + 3  # 89
VOCAB_SIZE = len(CHAR_VOCAB) + 4  # 90

# Sentinel bytes that never occur in the texts: each snippet becomes BOS + chars + EOS with one
# byte-level lookup over the whole corpus instead of a Python loop per character.
_BOS_BYTE, _EOS_BYTE = 0x02, 0x03


def _ascii_table() -> np.ndarray:
    """``[128]`` int32: each ASCII code's id (the vocabulary is all ASCII; the rest is OOV)."""
    table = np.full(128, OOV_ID, dtype=np.int32)
    for index, char in enumerate(CHAR_VOCAB):
        table[ord(char)] = index + 1
    return table


_ASCII_TO_ID = _ascii_table()
_BYTE_TO_ID = np.concatenate([_ASCII_TO_ID, np.full(128, OOV_ID, np.int32)])  # non-ASCII: OOV
_SNIPPET_BYTE_TO_ID = _BYTE_TO_ID.copy()
_SNIPPET_BYTE_TO_ID[[_BOS_BYTE, _EOS_BYTE]] = BOS_ID, EOS_ID


def char_ids(text: str) -> np.ndarray:
    """``[len(UTF-8 bytes)]`` int32 ids of a string, one per byte (1..86, OOV for the rest)."""
    return _BYTE_TO_ID[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]


def code_point_ids(text: str) -> np.ndarray:
    """``[len(text)]`` int32 ids of a string, one per character (1..86, OOV for the rest).

    JSON may hold lone surrogates: they pass through as OOV.
    """
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return np.where(codes < 128, _ASCII_TO_ID[np.minimum(codes, 127)], OOV_ID).astype(np.int32)


def char_windows(
    clients: Sequence[Sequence[str]], sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token windows ``[N, sequence_length + 1]`` of many clients' snippets, and windows per client.

    A client's snippets become ``[BOS] + char ids + [EOS]`` each (`char_ids`: one id per UTF-8
    byte), concatenated, cut into non-overlapping windows; only the client's last window is
    padded (PAD = 0). (TFF pads every snippet to a whole window; packing wastes fewer tokens.)

    Raises:
      ValueError: a snippet holds the control characters ``\\x02`` or ``\\x03``.
    """
    width = sequence_length + 1
    streams = ["".join(f"\x02{snippet}\x03" for snippet in snippets) for snippets in clients]
    corpus = "".join(streams)
    count = sum(len(s) for s in clients)
    if corpus.count("\x02") != count or corpus.count("\x03") != count:
        raise ValueError("snippets must not contain the control characters \\x02 or \\x03")
    tokens = _SNIPPET_BYTE_TO_ID[np.frombuffer(corpus.encode("utf-8"), dtype=np.uint8)]
    # Byte lengths, not character lengths: a non-ASCII character is one OOV per UTF-8 byte.
    lengths = np.array([len(s.encode("utf-8")) for s in streams], dtype=np.int64)
    counts = -(-lengths // width)  # ceil: a client with any snippet gets at least one window
    source_start = np.cumsum(lengths) - lengths
    target_start = np.cumsum(counts * width) - counts * width
    # Token j of client c lands at target_start[c] + (j - source_start[c]).
    shift = np.repeat(target_start - source_start, lengths)
    windows = np.zeros(int(counts.sum()) * width, dtype=np.int32)
    windows[np.arange(tokens.size) + shift] = tokens
    return windows.reshape(-1, width), counts


def char_info(sequence_length: int) -> dict[str, Any]:
    """``info`` of a next-character dataset of ``[n, sequence_length]`` int32 sequences."""
    return {
        "num_classes": VOCAB_SIZE,
        "pad_label": PAD_ID,
        "vocab_size": VOCAB_SIZE,
        "sequence_length": sequence_length,
        "input_shape": (sequence_length,),
        "input_dtype": "int32",
        "char_vocab": "".join(CHAR_VOCAB),
        "oov_id": OOV_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
    }


# --- words ----------------------------------------------------------------------------------------

_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # tf.strings.split without `sep`: ASCII whitespace

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio (Fibonacci hashing)


def _pack_words(buffer: np.ndarray, start: np.ndarray, length: np.ndarray,
                width: int) -> np.ndarray:
    """``[K, width // 8]`` uint64 keys: each word's bytes, zero padded to ``width`` bytes.

    Filled one byte column at a time, so temporaries are ``[K]``, never ``[K, width]`` int64.
    """
    rows = np.zeros((start.size, width), np.uint8)
    for column in range(min(width, int(length.max(initial=0)))):
        inside = np.flatnonzero(length > column)
        rows[inside, column] = buffer[start[inside] + column]
    return rows.view(np.uint64)


def _hash_keys(keys: np.ndarray) -> np.ndarray:
    """``[K]`` uint64 hashes of ``[K, M]`` uint64 keys (xor-multiply per column, wrapping)."""
    hashes = np.zeros(keys.shape[0], np.uint64)
    for column in range(keys.shape[1]):
        hashes = (hashes ^ keys[:, column]) * _HASH_MULTIPLIER
    return hashes


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Words as fixed-width uint64 keys sorted by hash, for a vectorized exact lookup.

    A word is looked up by its hash (``searchsorted`` over integers, much faster than over byte
    strings), then confirmed by comparing its bytes with the candidate's: the result is exact,
    a hash collision can only make a candidate fail the comparison, and the vocabulary's own
    hashes are checked to be distinct.

    Attributes:
      keys: ``[V, width // 8]`` uint64, the words' bytes zero padded, in hash order.
      hashes: ``[V]`` uint64, sorted.
      ids: ``[V]`` int32: each word's position in the original list.
      width: bytes of the longest word rounded up to a multiple of 8 (longer words are out of
        vocabulary).
    """

    keys: np.ndarray
    hashes: np.ndarray
    ids: np.ndarray
    width: int

    @classmethod
    def of(cls, words: Sequence[str | bytes]) -> Vocabulary:
        encoded = [w.encode("utf-8") if isinstance(w, str) else bytes(w) for w in words]
        if len(set(encoded)) != len(encoded):
            raise ValueError("vocabulary words must be distinct")
        if any(not w or b"\0" in w for w in encoded):
            raise ValueError("vocabulary words must be non-empty and free of NUL bytes")
        lengths = np.array([len(w) for w in encoded], np.int64)
        width = max(8, -(-int(lengths.max(initial=1)) // 8) * 8)
        buffer = np.frombuffer(b"".join(encoded), np.uint8)
        keys = _pack_words(buffer, np.cumsum(lengths) - lengths, lengths, width)
        hashes = _hash_keys(keys)
        order = np.argsort(hashes, kind="stable")
        if np.any(np.diff(hashes[order]) == 0):
            raise ValueError("two vocabulary words share a 64-bit hash; use another multiplier")
        return cls(keys[order], hashes[order], order.astype(np.int32), width)

    def __len__(self) -> int:
        return int(self.ids.size)

    def find(self, buffer: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """``[K]`` int32 index of each word ``buffer[start:start + length]``, ``-1`` if absent.

        Hashes the words' zero-padded bytes, finds candidates, confirms them byte for byte.
        """
        if len(self) == 0:
            return np.full(start.size, -1, np.int32)
        fits = (length > 0) & (length <= self.width)
        keys = _pack_words(buffer, start, np.where(fits, length, 0), self.width)
        hashes = _hash_keys(keys)
        where = np.minimum(np.searchsorted(self.hashes, hashes), len(self) - 1)
        found = fits & (self.hashes[where] == hashes)
        candidates = np.flatnonzero(found)
        found[candidates] = (self.keys[where[candidates]] == keys[candidates]).all(axis=1)
        return np.where(found, self.ids[where], -1).astype(np.int32)


def most_frequent(tokens: Sequence[str], size: int) -> list[str]:
    """The ``size`` most frequent tokens (ties: alphabetical), most frequent first."""
    ranked = sorted(collections.Counter(tokens).items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


def lookup_tokens(tokens: Sequence[str | bytes], vocab: Vocabulary) -> np.ndarray:
    """``[len(tokens)]`` int32 vocabulary index of each token, ``-1`` if it is not a word."""
    encoded = [t.encode("utf-8") if isinstance(t, str) else t for t in tokens]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    buffer = np.frombuffer(b"".join(encoded), np.uint8)
    return vocab.find(buffer, np.cumsum(lengths) - lengths, lengths)


def lookup_words(texts: Sequence[bytes], vocab: Vocabulary, max_words: int,
                 sep: bytes | None = b" ") -> tuple[np.ndarray, np.ndarray]:
    """Splits every text into words and looks up its first ``max_words``, all vectorized.

    ``sep=b" "`` splits like ``bytes.split(b" ")`` (and ``tf.strings.split(s, sep=" ")``):
    consecutive separators give empty words. ``sep=None`` splits on runs of ASCII whitespace
    and drops empty words (``tf.strings.split(s)``). The texts are joined into one byte buffer
    once; word boundaries, per-text word ranks and the lookup (`Vocabulary.find`) are
    whole-array numpy operations.

    Args:
      texts: ``N`` byte strings.
      vocab: the words to find.
      max_words: how many leading words of each text to look up.
      sep: a one-byte separator, or None for whitespace.

    Returns:
      ``(ids, counts)``: ``ids`` ``[N, max_words]`` int32, the vocabulary index of each leading
      word, ``-1`` for a word not in the vocabulary and ``-2`` past the text's last word;
      ``counts`` ``[N]`` int64, the number of words of each text (all of them, not only the
      first ``max_words``).

    Example:
      >>> v = Vocabulary.of(["a", "b"])
      >>> lookup_words([b"a c b", b""], v, max_words=2)[0].tolist()
      [[0, -1], [-1, -2]]
    """
    count = len(texts)
    ids = np.full((count, max_words), -2, np.int32)
    if count == 0:
        return ids, np.zeros(0, np.int64)
    joiner = sep if sep is not None else b" "
    if len(joiner) != 1:
        raise ValueError(f"sep must be one byte or None, got {sep!r}")
    lengths = np.fromiter(map(len, texts), np.int64, count)
    buffer = np.frombuffer(joiner.join(texts), np.uint8)
    starts = np.cumsum(lengths + 1) - (lengths + 1)  # byte offset of each text in the buffer
    joints = (starts + lengths)[:-1]  # the joining separators
    if sep is not None:
        cuts = np.flatnonzero(buffer == sep[0])
        word_start = np.concatenate([[0], cuts + 1])
        word_end = np.concatenate([cuts, [buffer.size]])
    else:
        solid = np.concatenate([[0], (~_WHITESPACE[buffer]).astype(np.int8), [0]])
        edges = np.diff(solid)
        word_start = np.flatnonzero(edges == 1)
        word_end = np.flatnonzero(edges == -1)
    # Words are in text order. Counting the words of texts 0..i takes one binary search per
    # joint (N searches, not one per word): with a separator, joint i is the cut that ends
    # text i's last word; with whitespace, the words of texts 0..i start before joint i.
    if sep is not None:
        through = np.searchsorted(cuts, joints) + 1
    else:
        through = np.searchsorted(word_start, joints)
    counts = np.diff(np.concatenate([[0], through, [word_start.size]])).astype(np.int64)
    first_word = np.cumsum(counts) - counts
    kept = np.minimum(counts, max_words)
    text_of_word = np.repeat(np.arange(count), kept)
    rank = np.arange(int(kept.sum())) - (np.cumsum(kept) - kept)[text_of_word]
    index = first_word[text_of_word] + rank
    word_start, word_end = word_start[index], word_end[index]
    ids[text_of_word, rank] = vocab.find(buffer, word_start, word_end - word_start)
    return ids, counts
