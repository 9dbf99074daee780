"""TFF's federated StackOverflow [1]: 342,477 users, next-word or tag prediction.

References:
  [1] Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.datasets.tff_h5.files import (
    ARCHIVES,
    cached_load,
    resolve_file,
    split_files,
    tff_folder,
)
from fedjax_sim.datasets.tff_h5.reader import Feature, offsets, test_clients, train_clients
from fedjax_sim.datasets.vocab import Vocabulary, lookup_words

# StackOverflow, as TFF's word/tag prediction baselines: 10,000 words, 500 tags, 20 tokens.
SO_VOCAB_SIZE = 10_000
SO_NUM_TAGS = 500
SO_SEQUENCE_LENGTH = 20
SO_MAX_TAGS = 5  # Stack Overflow allows at most 5 tags per question


def read_word_counts(path: str | os.PathLike, size: int) -> list[str]:
    """The first ``size`` words of TFF's ``stackoverflow.word_count`` (``word count`` lines,
    most frequent first), as ``tff.simulation.datasets.stackoverflow.load_word_counts``."""
    words = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}, line {number}: {line.strip()!r}; expected "
                                "'<word> <count>'")
            words.append(parts[0])
            if len(words) >= size:
                break
    if len(words) < size:
        raise DataError(f"{path}: {len(words)} words, expected at least {size}")
    return words


def read_tag_counts(path: str | os.PathLike, size: int) -> list[str]:
    """The ``size`` most frequent tags of TFF's ``stackoverflow.tag_count`` (a JSON object
    ``{tag: count}``), sorted by count as ``load_tag_counts`` does (ties keep file order)."""
    try:
        counts = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{path}: not valid JSON ({error}); expected {{tag: count}}") from None
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        raise DataError(f"{path}: expected a JSON object {{tag: count}}")
    tags = [tag for tag, _ in sorted(counts.items(), key=lambda item: item[1], reverse=True)]
    if len(tags) < size:
        raise DataError(f"{path}: {len(tags)} tags, expected at least {size}")
    return tags[:size]


def word_sequences(ids: np.ndarray, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """TFF's next-word sequences ``[N, L + 1]`` from `lookup_words` output (``L`` columns).

    As TFF's ``build_to_ids_fn``: word ids are vocabulary index + 1, out-of-vocabulary words
    ``vocab_size + 1``; the first ``L`` words are kept, EOS (``vocab_size + 3``) follows when a
    text has fewer than ``L`` words, BOS (``vocab_size + 2``) leads, PAD 0 fills.
    """
    n, length = ids.shape
    oov, bos, eos = vocab_size + 1, vocab_size + 2, vocab_size + 3
    tokens = np.where(ids >= 0, ids + 1, np.where(ids == -1, oov, 0)).astype(np.int32)
    sequences = np.zeros((n, length + 1), np.int32)
    sequences[:, 0] = bos
    sequences[:, 1:] = tokens
    short = np.flatnonzero(counts < length)
    sequences[short, 1 + counts[short]] = eos
    return sequences


def load_tff_stackoverflow(
    *,
    task: str = "word",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    word_count_file: str | os.PathLike | None = None,
    tag_count_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated StackOverflow from TFF's h5 files [4]: 342,477 users.

    ``task="word"`` (next-word prediction, TFF's ``word_prediction_preprocessing``): each
    example's ``tokens`` split on ``" "``, the first 20 words mapped to TFF's 10,000-word
    vocabulary (the first lines of ``stackoverflow.word_count``; ids: pad 0, words 1..10000,
    OOV 10001, BOS 10002, EOS 10003), ``[BOS] + words (+ [EOS] when shorter than 20)`` padded to
    21; ``x = seq[:20]``, ``y = seq[1:]``. ``info``: ``num_classes = vocab_size = 10004``,
    ``pad_label = 0``.

    ``task="tag"`` (tag prediction): ``x`` int32 ``[20]``, the word ids (as above, 0 pad, no
    BOS/EOS) of the first 20 whitespace-separated words of ``title + " " + tokens``; ``y`` int32
    ``[5]``, the ids in ``[0, 500)`` of the example's tags (``tags`` split on ``"|"``) among the
    500 most frequent of ``stackoverflow.tag_count``, in order, ``-1`` padding. ``info``:
    ``num_classes = 500``, ``task = "multilabel"``, ``vocab_size = 10004``, ``pad_label = -1``.
    TFF's tag baseline reads a bag of *all* the words; the first 20 are what this layout keeps.

    Args:
      task: ``"word"`` or ``"tag"``.
      data_dir: the root data folder; files in ``<data_dir>/tff/``.
      download: fetch missing archives from `URL_BASE`.
      train_file, test_file, word_count_file, tag_count_file: explicit paths.
      cache: convert once into a memory-mapped cache (strongly advised: ~135M examples).
      cache_dir: where the cache folder goes (default ``cache/`` beside the train file).

    Returns:
      ``train`` and ``test`` over the training users (test-only users left out).
    """
    if task not in ("word", "tag"):
        raise ValueError(f"task must be 'word' or 'tag', got {task!r}")
    folder = tff_folder(data_dir)
    train_path, test_path = split_files("stackoverflow", data_dir, train_file, test_file,
                                        download)
    words_path = resolve_file(word_count_file, folder, "stackoverflow.word_count",
                          ARCHIVES["stackoverflow.word_count"], download)
    files = [train_path, test_path, words_path]
    if task == "tag":
        tags_path = resolve_file(tag_count_file, folder, "stackoverflow.tag_count",
                             ARCHIVES["stackoverflow.tag_count"], download)
        files.append(tags_path)
    length = SO_SEQUENCE_LENGTH
    vocab_size = SO_VOCAB_SIZE + 4
    tokens_feature = Feature("tokens", (), "OS")

    def build(allocate):
        words = Vocabulary.of(read_word_counts(words_path, SO_VOCAB_SIZE))
        if task == "tag":
            tags = Vocabulary.of(read_tag_counts(tags_path, SO_NUM_TAGS))
            features = [tokens_feature, Feature("title", (), "OS"), Feature("tags", (), "OS")]
            shapes = {"x": (length,), "y": (SO_MAX_TAGS,)}
        else:
            features = [tokens_feature]
            shapes = {"x": (length,), "y": (length,)}

        def transform(values):
            if task == "word":
                ids, counts = lookup_words(values["tokens"], words, length, sep=b" ")
                sequences = word_sequences(ids, counts, SO_VOCAB_SIZE)
                return {"x": sequences[:, :-1], "y": sequences[:, 1:]}
            # The first 20 words of title + " " + tokens, without joining strings per example:
            # position p takes title word p while p < the title's word count, else body word
            # p - count.
            title, title_count = lookup_words(values["title"], words, length, sep=None)
            body, _ = lookup_words(values["tokens"], words, length, sep=None)
            position = np.arange(length)[None, :]
            count = np.minimum(title_count, length)[:, None]
            pick = np.where(position < count, position, length + position - count)
            ids = np.take_along_axis(np.concatenate([title, body], axis=1), pick, axis=1)
            x = np.where(ids >= 0, ids + 1, np.where(ids == -1, SO_VOCAB_SIZE + 1, 0))
            return {"x": x.astype(np.int32), "y": tag_ids(values["tags"], tags)}

        train = train_clients(train_path, tokens_feature)
        test, extra = test_clients(test_path, train.clients, tokens_feature)
        parts = {}
        for name, split in (("train", train), ("test", test)):
            total = int(split.sizes.sum())
            arrays = {key: allocate(name, key, (total, *shape), np.int32)
                      for key, shape in shapes.items()}
            for lo, hi, values in split.read_chunks(features):
                for key, value in transform(values).items():
                    arrays[key][lo:hi] = value
            parts[name] = FederatedData(arrays, offsets(split.sizes), np.asarray(train.clients))
        info: dict[str, Any] = {
            "input_shape": (length,), "input_dtype": "int32", "vocab_size": vocab_size,
            "sequence_length": length, "oov_id": SO_VOCAB_SIZE + 1,
            "bos_id": SO_VOCAB_SIZE + 2, "eos_id": SO_VOCAB_SIZE + 3,
            "test_only_clients": extra, "source_files": [str(f) for f in files],
        }
        if task == "word":
            info.update(num_classes=vocab_size, pad_label=0, task="next_word")
        else:
            info.update(num_classes=SO_NUM_TAGS, pad_label=-1, task="multilabel",
                        max_tags=SO_MAX_TAGS)
        return FederatedDataset("tff_stackoverflow", parts["train"], parts["test"], None, info)

    return cached_load("tff_stackoverflow", {"task": task}, files, cache, cache_dir, build)


def tag_ids(tags: Sequence[bytes], vocab: Vocabulary, max_tags: int = SO_MAX_TAGS) -> np.ndarray:
    """``[N, max_tags]`` int32 ids of each ``"a|b|c"`` tag string's in-vocabulary tags, in
    order, ``-1`` padding (tags outside the vocabulary are dropped, as TFF's one-hot of the
    OOV bucket is sliced off)."""
    ids, _ = lookup_words(tags, vocab, max_words=4 * max_tags, sep=b"|")
    found = ids >= 0
    # Rank of each found tag among its row's found tags: keep the first `max_tags`.
    rank = np.cumsum(found, axis=1) - 1
    out = np.full((len(tags), max_tags), -1, np.int32)
    rows, cols = np.nonzero(found & (rank < max_tags))
    out[rows, rank[rows, cols]] = ids[rows, cols]
    return out
