"""The shared vocabularies: character ids of all three Shakespeare datasets, exact word lookup.

References are plain Python: TFF's vocabulary literal indexed by hand, dict lookups, Counter.
"""

import collections
import json
import string

import numpy as np
import pytest

from fedjax_sim.datasets import leaf
from fedjax_sim.datasets.shakespeare import snippets_to_sequences
from fedjax_sim.datasets.vocab import (
    BOS_ID,
    OOV_ID,
    Vocabulary,
    char_ids,
    code_point_ids,
    lookup_tokens,
    lookup_words,
    most_frequent,
)

# The literal from tensorflow_federated/python/simulation/baselines/shakespeare/
# char_prediction_preprocessing.py.
TFF_CHARS = (
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)


def reference_ids(units) -> list[int]:
    """Position in TFF's literal + 1 (0 pads), OOV for anything else."""
    return [TFF_CHARS.index(u) + 1 if u in TFF_CHARS else OOV_ID for u in units]


ASCII_TEXT = string.printable + "".join(map(chr, range(32))) + "\x7f"


def test_ascii_text_gets_the_same_ids_per_byte_and_per_character():
    # Every ASCII character, vocabulary or not: byte and character units coincide, so the
    # Gutenberg/TFF datasets (per byte) and LEAF's (per character) agree.
    expected = reference_ids(ASCII_TEXT)
    assert char_ids(ASCII_TEXT).tolist() == expected
    assert code_point_ids(ASCII_TEXT).tolist() == expected
    assert char_ids(ASCII_TEXT).dtype == code_point_ids(ASCII_TEXT).dtype == np.int32


def test_non_ascii_is_oov_per_byte_or_per_character_as_documented():
    text = "a\u00e9b\u4e2d"  # 1 + 2 + 1 + 3 UTF-8 bytes
    assert char_ids(text).tolist() == reference_ids("a") + [OOV_ID] * 2 + reference_ids("b") + \
        [OOV_ID] * 3
    assert code_point_ids(text).tolist() == reference_ids("a") + [OOV_ID] + \
        reference_ids("b") + [OOV_ID]
    assert code_point_ids("\ud800").tolist() == [OOV_ID]  # a lone surrogate, as JSON may hold


def test_leaf_and_play_shakespeare_give_one_text_the_same_ids(tmp_path):
    text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind!~{x}"
    window = text + "Q"  # LEAF's x: 80 characters
    assert len(window) == 80
    folder = tmp_path / "leaf" / "shakespeare" / "data" / "all_data"
    folder.mkdir(parents=True)
    record = {"x": [window], "y": ["Z"]}
    (folder / "a.json").write_text(json.dumps(
        {"users": ["ROLE"], "num_samples": [1], "user_data": {"ROLE": record}}))
    leaf_x = leaf.load_leaf_shakespeare(data_dir=tmp_path, test_fraction=0.0).train.arrays["x"]
    play_x, _ = snippets_to_sequences([window], sequence_length=81)
    assert play_x[0, 0] == BOS_ID
    assert leaf_x[0].tolist() == play_x[0, 1:].tolist() == reference_ids(window)


def test_vocabulary_lookup_is_a_dict_lookup():
    rng = np.random.default_rng(0)
    words = ["a", "bb", "ccc", "a-b", "\u00e9t\u00e9", "x" * 30, "never", "ab", "ba"]
    vocab = Vocabulary.of(words)
    index = {w: i for i, w in enumerate(words)}
    pool = words + ["", "b", "abc", "x" * 31, "x" * 29, "\u00e9", "A", "never!"]
    tokens = [str(t) for t in rng.choice(np.array(pool, dtype=object), 500)]
    assert lookup_tokens(tokens, vocab).tolist() == [index.get(t, -1) for t in tokens]
    assert lookup_tokens([t.encode() for t in tokens], vocab).tolist() == \
        [index.get(t, -1) for t in tokens]
    assert lookup_tokens(["a", "b"], Vocabulary.of([])).tolist() == [-1, -1]
    assert lookup_tokens([], vocab).tolist() == []
    ids, counts = lookup_words([b"a zz bb", b"", b"ccc"], vocab, max_words=2)
    assert ids.tolist() == [[0, -1], [-1, -2], [2, -2]] and counts.tolist() == [3, 1, 1]


def test_vocabulary_refuses_duplicates_and_nul():
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary.of(["a", "a"])
    with pytest.raises(ValueError, match="non-empty and free of NUL"):
        Vocabulary.of(["a\0b"])


def test_most_frequent_ranks_by_count_then_alphabet():
    tokens = list("abracadabra") + ["zz", "zz", "zz", "zz", "zz"]
    counts = collections.Counter(tokens)
    expected = sorted(counts, key=lambda t: (-counts[t], t))
    assert most_frequent(tokens, 100) == expected
    assert most_frequent(tokens, 2) == expected[:2] == ["a", "zz"]
