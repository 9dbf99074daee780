"""LEAF's federated datasets from the JSON files its scripts write (Caldas et al. 2018).

"LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097, github.com/TalwalkarLab/leaf).
Each JSON file holds ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}``; LEAF's ``preprocess.sh`` writes them to ``data/all_data/`` (everything),
``data/train/`` and ``data/test/`` (its train/test split, ``-t sample``: each user's examples
split, or ``-t user``: users split). The natural clients are LEAF's users.

* **FEMNIST** (``leaf_femnist``): x = 784 floats in [0, 1] (a 28x28 image, row-major, white
  background = 1), y = one of 62 classes (digits, upper-, lower-case letters). Images come back
  ``[N, 28, 28, 1]`` float32, exactly the values in the file.
* **Shakespeare** (``leaf_shakespeare``): x = an 80-character string, y = the character after
  it. Characters get the ids of `fedjax_sim.datasets.shakespeare` (TFF's 86-character
  vocabulary, 0 = PAD, 87 = OOV), and the example is laid out as the engine's sequences:
  ``x`` = the 80 ids, ``y`` = the next character at every position (``targets="all"``, i.e.
  ``x[1:] + [y]``) or only at the last one (``targets="last"``: PAD elsewhere, so loss and
  accuracy count LEAF's single next character, as LEAF reports it).
* **Sent140** (``leaf_sent140``): x = ``[tweet id, date, query, user, text]``, y = 0 / 1
  (negative / positive). The text is lower-cased and split by LEAF's ``split_line`` regex
  (``[\\w']+|[.,!?;]``); a vocabulary of the ``vocab_size`` most frequent training tokens gives
  ids (0 = PAD, 1 = OOV, words from 2 in order of frequency). ``features="tokens"``: ``x`` =
  the first ``sequence_length`` ids, PAD-filled, int32 (for a sequence classifier such as
  LEAF's stacked LSTM); ``features="bag_of_words"``: ``x`` = float32 word counts
  ``[N, vocab_size]`` over the whole tweet (LEAF's ``bag_log_reg`` input, for ``logistic``).
* **CelebA** (``leaf_celeba``): x = an image file name of CelebA's ``img_align_celeba`` folder,
  y = 0 / 1 (not smiling / smiling). Each image is read with Pillow and resized as LEAF's model
  does (``img.resize((84, 84)).convert("RGB")``, Pillow's default filter), float32 in [0, 1].

**Files.** ``<data_dir>/leaf/<dataset>/data/{train,test,all_data}/*.json``, i.e. LEAF's own
``leaf/data/<dataset>/data`` folder (link LEAF's ``data`` folder as ``<data_dir>/leaf``). The
data folder is ``dataset.data_dir`` > ``$FEDJAX_SIM_DATA`` > the user cache folder.
``source="auto"`` reads ``train/`` + ``test/`` when ``train/`` has JSON files, else
``all_data/`` split per client (``test_fraction``, shuffled with ``seed``, like LEAF's
``-t sample``). Test users that are train users form the per-client test split (same client
order as train); test users that are not (``-t user``) are pooled into the central test set.

**Memory.** Each file is parsed with `json` and converted to flat numpy arrays before the next
one is read; nothing per client outlives its file except its id and size. The arrays of all
files are concatenated at the end (a transient second copy).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import (
    FederatedData,
    FederatedDataset,
    train_test_split_per_client,
)
from fedjax_sim.datasets import download as download_lib
from fedjax_sim.datasets.vocab import (
    PAD_ID,
    Vocabulary,
    char_info,
    code_point_ids,
    lookup_tokens,
    most_frequent,
)

LEAF_FOLDER = "leaf"
"""Sub-folder of the data folder that mirrors LEAF's ``data/`` folder."""

LEAF_REPO = "https://github.com/TalwalkarLab/leaf"

SOURCES = ("auto", "split", "all_data", "sampled_data", "rem_user_data")
"""``split`` = LEAF's ``train/`` + ``test/``; the others are LEAF folders read whole."""


@dataclasses.dataclass(frozen=True)
class LeafTask:
    """How one LEAF dataset is produced: its folder under ``leaf/data/`` and the commands."""

    folder: str
    command: str
    before: str = ""  # a step before the command (files LEAF cannot download itself)


TASKS = {
    "femnist": LeafTask("femnist", "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample"),
    "shakespeare": LeafTask(
        "shakespeare", "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample -tf 0.8"
    ),
    "sent140": LeafTask("sent140", "./preprocess.sh -s niid --sf 1.0 -k 64 -t sample"),
    "celeba": LeafTask(
        "celeba",
        "./preprocess.sh -s niid --sf 1.0 -k 5 -t sample",
        before=(
            "put identity_CelebA.txt, list_attr_celeba.txt and the img_align_celeba/ image "
            "folder from CelebA's site (mmlab.ie.cuhk.edu.hk/projects/CelebA.html) in "
            "leaf/data/celeba/data/raw/, then "
        ),
    ),
}

FEMNIST_CLASS_NAMES = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)
"""LEAF's ``relabel_class``: 0-9 digits, 10-35 upper-case, 36-61 lower-case letters."""

SENT140_PAD_ID = 0
SENT140_OOV_ID = 1
SENT140_TOKEN = re.compile(r"[\w']+|[.,!?;]|\x00")  # LEAF's split_line, plus a text separator
_TEXT_END = "\x00"

CELEBA_IMAGE_SIZE = 84
"""LEAF's ``IMAGE_SIZE`` for CelebA (models/celeba/cnn.py)."""


# --- files ----------------------------------------------------------------------------------------


def leaf_folder(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/leaf/<task>/data``: LEAF's ``leaf/data/<task>/data`` folder."""
    return download_lib.data_dir(data_dir) / LEAF_FOLDER / TASKS[task].folder / "data"


def _missing_message(task: str, base: Path, what: str) -> str:
    spec = TASKS[task]
    root = base.parent.parent.parent
    return (
        f"LEAF {task} data not found: {what}. Expected LEAF's JSON files in {base}/train/ and "
        f"{base}/test/ (its train/test split) or {base}/all_data/ (data folder {root}, "
        f"resolved from the data_dir argument, else ${download_lib.DATA_DIR_ENV}, else the "
        "user cache folder). LEAF's data is made by its scripts, not downloaded as a file: "
        f"git clone {LEAF_REPO} && cd leaf/data/{spec.folder} && {spec.before}"
        f"{spec.command} (see leaf/data/{spec.folder}/README.md for smaller samples); then "
        f"copy or link leaf/data/{spec.folder}/data to {base} (or link leaf/data to "
        f"{root / LEAF_FOLDER}). Or point the data folder elsewhere: set "
        f"{download_lib.DATA_DIR_ENV}=/path/to/data or pass data_dir= (config key "
        "`dataset.data_dir`)."
    )


def _json_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def resolve_files(task: str, base: Path, source: str) -> tuple[list[Path], list[Path] | None]:
    """``(train files, test files)`` for ``source``; test files are None for a whole folder."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    train, test = _json_files(base / "train"), _json_files(base / "test")
    if source == "split" or (source == "auto" and train):
        if not train:
            raise download_lib.MissingFileError(
                _missing_message(task, base, f"no *.json in {base / 'train'}")
            )
        if not test:
            raise download_lib.MissingFileError(
                _missing_message(
                    task, base, f"{base / 'train'} has JSON files but {base / 'test'} has none"
                )
            )
        return train, test
    folder = base / ("all_data" if source == "auto" else source)
    files = _json_files(folder)
    if not files:
        what = (
            f"no *.json in {base / 'train'} nor in {folder}"
            if source == "auto"
            else f"no *.json in {folder}"
        )
        raise download_lib.MissingFileError(_missing_message(task, base, what))
    return files, None


def read_leaf_json(path: str | os.PathLike) -> tuple[list, list[list], list[list]]:
    """Parses one LEAF JSON file and checks its layout.

    Returns:
      ``(users, xs, ys)``: the user ids and, per user, its ``x`` and ``y`` lists, in the
      order of ``users``.

    Raises:
      DataError (naming the file, and the user where one is at fault): invalid JSON, a
        missing key, a user without data, or ``x`` / ``y`` / ``num_samples`` that disagree.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected a LEAF data file") from e
    layout = (
        'a LEAF file: {"users": [...], "num_samples": [...], "user_data": {user: {"x": '
        '[...], "y": [...]}}}'
    )
    if not isinstance(data, dict) or not all(
        k in data for k in ("users", "num_samples", "user_data")
    ):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: has {keys}, expected {layout}")
    users, num_samples, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not isinstance(num_samples, list) or not isinstance(
        user_data, dict
    ):
        raise DataError(f"{path}: wrong types, expected {layout}")
    if len(users) != len(num_samples):
        raise DataError(
            f"{path}: {len(users)} users but {len(num_samples)} num_samples; expected one "
            "count per user"
        )
    xs, ys = [], []
    for user, count in zip(users, num_samples, strict=True):
        record = user_data.get(user) if isinstance(user, str) else None
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DataError(
                f"{path}: user {user!r} has no user_data entry with 'x' and 'y'; expected "
                f"{layout}"
            )
        x, y = record["x"], record["y"]
        if not isinstance(x, list) or not isinstance(y, list) or not len(x) == len(y) == count:
            lengths = (len(x) if isinstance(x, list) else type(x).__name__,
                       len(y) if isinstance(y, list) else type(y).__name__)  # fmt: skip
            raise DataError(
                f"{path}: user {user!r} has {lengths[0]} x and {lengths[1]} y for num_samples "
                f"{count}; expected two lists of num_samples entries"
            )
        xs.append(x)
        ys.append(y)
    return users, xs, ys


@dataclasses.dataclass
class _ConvertedFiles:
    """One split's files, converted: their pieces (one per file), client ids and sizes."""

    pieces: list[Any]
    client_ids: list
    sizes: list[int]
    files: list[Path]


def _read_files(
    files: Sequence[Path], convert: Callable[[list, list, Path], Any]
) -> _ConvertedFiles:
    """Reads ``files`` one by one; ``convert(xs, ys, path)`` turns a file's examples (all its
    users' ``x`` and ``y`` lists concatenated) into arrays before the next file is parsed."""
    split = _ConvertedFiles([], [], [], list(files))
    for path in files:
        users, xs, ys = read_leaf_json(path)
        split.client_ids.extend(users)
        split.sizes.extend(len(y) for y in ys)
        flat_x = list(itertools.chain.from_iterable(xs))
        flat_y = list(itertools.chain.from_iterable(ys))
        del xs, ys
        split.pieces.append(convert(flat_x, flat_y, path))
        del flat_x, flat_y  # before the next file is parsed
    return split


def _federated(arrays: dict[str, np.ndarray], client_ids: list, sizes: list[int]) -> FederatedData:
    """Flat arrays + offsets; a user found in several files becomes one client."""
    ids = np.asarray(client_ids, dtype=str)
    sizes = np.asarray(sizes, dtype=np.int64)
    unique, inverse = np.unique(ids, return_inverse=True)
    if len(unique) == len(ids):
        return FederatedData(arrays, np.concatenate([[0], np.cumsum(sizes)]), ids)
    merged = FederatedData.from_assignment(arrays, np.repeat(inverse, sizes), len(unique))
    return dataclasses.replace(merged, client_ids=unique)


def _labels(ys: list, path: Path, num_classes: int) -> np.ndarray:
    """int32 labels; integral floats (CelebA's ``(a + 1) / 2``) are accepted."""
    try:
        y = np.asarray(ys, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: labels y must be numbers ({e})") from e
    if y.size != len(ys) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        raise DataError(f"{path}: labels y must be whole numbers, one per example")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{path}: labels span [{y.min():g}, {y.max():g}], expected [0, {num_classes})"
        )
    return y.astype(np.int32)


def _rows(data: FederatedData, indices: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row numbers of the first ``sizes[i]`` examples of client ``indices[i]``, in order."""
    starts = data.offsets[indices]
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return np.repeat(starts - before, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def align_test(
    train: FederatedData, test: FederatedData
) -> tuple[FederatedData | None, dict[str, np.ndarray] | None, int]:
    """Splits LEAF's test users into a per-client test split and a pooled central test set.

    Test users that are train users become ``test`` (in ``train``'s client order, with zero
    examples for train users without test data); when none of them is a train user (LEAF's
    ``-t user``), all test examples become the central test set. Test users that are not train
    users while others are (rare: users whose train part was empty) are dropped.

    Returns:
      ``(per-client test or None, central test or None, number of test examples dropped)``.
    """
    order = np.argsort(test.client_ids, kind="stable")
    sorted_ids = test.client_ids[order]
    if len(sorted_ids):
        position = np.minimum(np.searchsorted(sorted_ids, train.client_ids), len(order) - 1)
        found = sorted_ids[position] == train.client_ids
    else:
        position, found = np.zeros(train.num_clients, np.int64), np.zeros(train.num_clients, bool)
    if not np.any(found):
        return None, (dict(test.arrays) if test.num_examples else None), 0
    indices = order[position]
    sizes = np.where(found, test.client_sizes[indices], 0)
    rows = _rows(test, indices, sizes)
    per_client = FederatedData(
        {k: v[rows] for k, v in test.arrays.items()},
        np.concatenate([[0], np.cumsum(sizes)]),
        train.client_ids,
    )
    return per_client, None, test.num_examples - per_client.num_examples


def _build(
    name: str,
    task: str,
    data_dir,
    source: str,
    test_fraction: float,
    seed: int,
    convert: Callable[[list, list, Path], Any],
    finish: Callable[[_ConvertedFiles, _ConvertedFiles | None], tuple[dict, dict | None, dict]],
) -> FederatedDataset:
    """Reads the files, builds train / test / central test and drops empty train clients.

    ``finish(train_split, test_split)`` turns the converted pieces into
    ``(train arrays, test arrays or None, info)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    base = leaf_folder(task, data_dir)
    train_files, test_files = resolve_files(task, base, source)
    train_split = _read_files(train_files, convert)
    test_split = _read_files(test_files, convert) if test_files is not None else None
    train_arrays, test_arrays, info = finish(train_split, test_split)
    if train_arrays is None:
        raise DataError(
            f"LEAF {task}: the training files {[str(p) for p in train_files]} hold no "
            "examples; expected at least one"
        )
    train = _federated(train_arrays, train_split.client_ids, train_split.sizes)
    del train_arrays
    test, central, dropped = None, None, 0
    if test_arrays is not None:
        test, central, dropped = align_test(
            train, _federated(test_arrays, test_split.client_ids, test_split.sizes)
        )
    keep = np.flatnonzero(train.client_sizes > 0)
    if keep.size < train.num_clients:
        train = train.subset(keep)
        if test is not None:  # the test examples of users without training examples go too
            kept = test.subset(keep)
            dropped += test.num_examples - kept.num_examples
            test = kept
    if test_split is None and test_fraction > 0:
        train, test = train_test_split_per_client(
            train, test_fraction, np.random.default_rng(seed)
        )
    info = {
        "pad_label": None,
        **info,
        "files": [str(p) for p in train_files + (test_split.files if test_split else [])],
        "test_examples_dropped": dropped,
    }
    return FederatedDataset(name=name, train=train, test=test, central_test=central, info=info)


def _stack(split: _ConvertedFiles | None) -> dict[str, Any] | None:
    """The files' converted pieces concatenated, arrays and lists alike (None pieces: files
    without examples); the pieces are dropped. None when there are no examples."""
    if split is None:
        return None
    pieces = [piece for piece in split.pieces if piece is not None]
    split.pieces.clear()
    if not pieces:
        return None
    return {
        key: np.concatenate([piece[key] for piece in pieces])
        if isinstance(pieces[0][key], np.ndarray)
        else list(itertools.chain.from_iterable(piece[key] for piece in pieces))
        for key in pieces[0]
    }


# --- FEMNIST --------------------------------------------------------------------------------------


def _femnist_convert(xs: list, ys: list, path: Path) -> dict[str, np.ndarray] | None:
    if not xs:
        return None
    try:
        x = np.asarray(xs, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(
            f"{path}: FEMNIST images must be lists of 784 numbers (a 28x28 image), got "
            f"ragged or non-numeric lists ({e})"
        ) from e
    if x.ndim != 2 or x.shape[1] != 784:
        raise DataError(
            f"{path}: FEMNIST images have shape {x.shape[1:]}, expected lists of 784 numbers "
            "(a 28x28 image, row-major)"
        )
    return {"x": x.reshape(-1, 28, 28, 1), "y": _labels(ys, path, len(FEMNIST_CLASS_NAMES))}


def load_leaf_femnist(
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    test_fraction: float = 0.1,
    seed: int = 0,
) -> FederatedDataset:
    """LEAF's FEMNIST: one client per writer, 62 classes, 28x28 images.

    Args:
      data_dir: the root data folder (files in ``<data_dir>/leaf/femnist/data/``).
      source: ``"auto"``, ``"split"`` (``train/`` + ``test/``), or a LEAF folder read whole
        (``"all_data"``, ``"sampled_data"``, ``"rem_user_data"``) and split per client.
      test_fraction: share of each client's examples held out when a whole folder is read
        (LEAF's default ``--tf 0.9`` = 0.1).
      seed: shuffles each client's examples before that split.

    Returns:
      A `FederatedDataset` named ``"leaf_femnist"``: ``x`` float32 ``[N, 28, 28, 1]`` (the
      file's values), ``y`` int32 in [0, 62).
    """

    def finish(train, test):
        info = {
            "num_classes": len(FEMNIST_CLASS_NAMES),
            "input_shape": (28, 28, 1),
            "input_dtype": "float32",
            "class_names": list(FEMNIST_CLASS_NAMES),
        }
        return _stack(train), _stack(test), info

    return _build(
        "leaf_femnist", "femnist", data_dir, source, test_fraction, seed, _femnist_convert, finish
    )


# --- Shakespeare ----------------------------------------------------------------------------------


def char_ids(strings: Sequence[str], length: int, path: Path, what: str) -> np.ndarray:
    """``[len(strings), length]`` int32 ids of equal-length strings, one id per character.

    Characters outside TFF's vocabulary (any non-ASCII one included) are OOV
    (`fedjax_sim.datasets.vocab.code_point_ids`: per character, not per UTF-8 byte, so that
    LEAF's 80 positions and its next-character target stay aligned).
    """
    n = len(strings)
    try:
        joined = "".join(strings)
    except TypeError as e:
        raise DataError(f"{path}: Shakespeare {what} must be strings ({e})") from e
    lengths = np.fromiter(map(len, strings), np.int64, count=n)
    if n and np.any(lengths != length):
        bad = int(np.flatnonzero(lengths != length)[0])
        hint = " (every x as long as the dataset's first)" if what == "x" else ""
        raise DataError(
            f"{path}: Shakespeare {what} number {bad} has {int(lengths[bad])} characters, "
            f"expected {length}{hint}"
        )
    return code_point_ids(joined).reshape(n, length)


def load_leaf_shakespeare(
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    targets: str = "all",
) -> FederatedDataset:
    """LEAF's Shakespeare: one client per role, next-character prediction.

    Args:
      data_dir: the root data folder (files in ``<data_dir>/leaf/shakespeare/data/``).
      source: ``"auto"``, ``"split"`` or a LEAF folder read whole (see `load_leaf_femnist`).
      test_fraction: share of each client's examples held out when a whole folder is read
        (0.2 = the ``-tf 0.8`` of McMahan et al.).
      seed: shuffles each client's examples before that split.
      targets: ``"all"``: ``y`` is the next character at every position (``x[1:] + [y]``);
        ``"last"``: only the last position holds LEAF's target, the rest is PAD (ignored).

    Returns:
      A `FederatedDataset` named ``"leaf_shakespeare"``: ``x`` and ``y`` int32
      ``[N, 80]`` with `fedjax_sim.datasets.shakespeare`'s ids; ``info`` as that dataset's
      (``num_classes = vocab_size = 90``, ``pad_label = 0``).
    """
    if targets not in ("all", "last"):
        raise ValueError(f"targets must be 'all' or 'last', got {targets!r}")
    state: dict[str, int] = {}

    def convert(xs, ys, path):
        if not xs:
            return None
        if "length" not in state:
            if not isinstance(xs[0], str):
                raise DataError(f"{path}: Shakespeare x must be strings, got {xs[0]!r:.40}")
            state["length"] = len(xs[0])
        x = char_ids(xs, state["length"], path, "x")
        y = char_ids(ys, 1, path, "y")[:, 0]
        if targets == "all":
            sequence_y = np.concatenate([x[:, 1:], y[:, None]], axis=1)
        else:
            sequence_y = np.full_like(x, PAD_ID)
            sequence_y[:, -1] = y
        return {"x": x, "y": sequence_y}

    def finish(train, test):
        length = state.get("length", 0)
        info = {**char_info(length), "targets": targets}
        return _stack(train), _stack(test), info

    return _build(
        "leaf_shakespeare", "shakespeare", data_dir, source, test_fraction, seed, convert, finish
    )


# --- Sent140 --------------------------------------------------------------------------------------


def _sent140_convert(xs: list, ys: list, path: Path) -> dict[str, Any] | None:
    if not xs:
        return None
    texts = []
    for row in xs:
        if not isinstance(row, list) or len(row) < 5 or not isinstance(row[4], str):
            raise DataError(
                f"{path}: a Sent140 x is {row!r:.80}; expected [tweet id, date, query, user, "
                "text] with the text a string"
            )
        texts.append(row[4])
    return {"texts": texts, "y": _labels(ys, path, 2)}


def tokenize(texts: Sequence[str], lowercase: bool = True) -> list[str]:
    """LEAF's ``split_line`` over all texts at once: tokens, each text ended by ``"\\x00"``."""
    if not texts:
        return []
    corpus = _TEXT_END.join(t.replace(_TEXT_END, " ") for t in texts) + _TEXT_END
    return SENT140_TOKEN.findall(corpus.lower() if lowercase else corpus)


def build_vocabulary(tokens: Sequence[str], vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent tokens (ties: alphabetical), most frequent first."""
    return most_frequent([token for token in tokens if token != _TEXT_END], vocab_size)


def token_ids(
    tokens: Sequence[str], vocab: Sequence[str], num_texts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, text, position)`` of every word token (text ends dropped), vectorized.

    ``ids``: 0 PAD is never produced, 1 = OOV, vocabulary words from 2; ``text``: the text
    each token is in; ``position``: its index in that text.
    """
    end = np.fromiter((token == _TEXT_END for token in tokens), bool, len(tokens))
    if int(end.sum()) != num_texts:
        raise DataError(f"tokenizer found {int(end.sum())} text ends for {num_texts} texts")
    index = lookup_tokens(tokens, Vocabulary.of(vocab))
    ids = np.where(index >= 0, index + 2, SENT140_OOV_ID).astype(np.int32)
    text = np.cumsum(end) - end  # a text's end marker closes it
    first = np.concatenate([[0], np.flatnonzero(end)[:-1] + 1]).astype(np.int64)
    position = np.arange(len(ids), dtype=np.int64) - first[text]
    word = ~end
    return ids[word], text[word], position[word]


def sent140_features(
    tokens: Sequence[str],
    num_texts: int,
    vocab: Sequence[str],
    features: str,
    sequence_length: int,
) -> np.ndarray:
    """Token ids ``[N, sequence_length]`` int32 or word counts ``[N, len(vocab)]`` float32.

    Args:
      tokens: `tokenize`'s output for ``num_texts`` texts.
      num_texts: N.
      vocab: `build_vocabulary`'s words (id ``i + 2`` for ``vocab[i]``).
      features: ``"tokens"`` or ``"bag_of_words"``.
      sequence_length: ids kept per text for ``"tokens"`` (the rest is cut; PAD fills).
    """
    ids, text, position = token_ids(tokens, vocab, num_texts)
    if features == "tokens":
        x = np.full((num_texts, sequence_length), SENT140_PAD_ID, np.int32)
        keep = position < sequence_length
        x[text[keep], position[keep]] = ids[keep]
        return x
    x = np.zeros((num_texts, len(vocab)), np.float32)
    known = ids >= 2
    np.add.at(x, (text[known], ids[known] - 2), np.float32(1.0))
    return x


def load_leaf_sent140(
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    test_fraction: float = 0.1,
    seed: int = 0,
    features: str = "tokens",
    vocab_size: int = 10_000,
    sequence_length: int = 25,
    lowercase: bool = True,
) -> FederatedDataset:
    """LEAF's Sent140: one client per Twitter user, tweet sentiment (0 negative, 1 positive).

    Args:
      data_dir: the root data folder (files in ``<data_dir>/leaf/sent140/data/``).
      source: ``"auto"``, ``"split"`` or a LEAF folder read whole (see `load_leaf_femnist`).
      test_fraction: share of each client's examples held out when a whole folder is read.
      seed: shuffles each client's examples before that split.
      features: ``"tokens"`` (``x`` int32 ``[N, sequence_length]`` word ids, PAD = 0,
        OOV = 1) or ``"bag_of_words"`` (``x`` float32 ``[N, vocab_size]`` counts of each
        vocabulary word in the whole tweet; memory N x vocab_size x 4 bytes).
      vocab_size: the most frequent training-split tokens kept as the vocabulary.
      sequence_length: tokens per tweet for ``"tokens"`` (LEAF's ``max_words`` = 25); longer
        tweets are cut, shorter ones PAD-filled.
      lowercase: lower-case the text before splitting it (LEAF matches lower-case GloVe words).

    Returns:
      A `FederatedDataset` named ``"leaf_sent140"`` with ``info["vocab"]`` (the words, id
      ``i + 2`` for ``vocab[i]``) and ``info["vocab_size"]`` (ids in all: words + PAD + OOV).
    """
    if features not in ("tokens", "bag_of_words"):
        raise ValueError(f"features must be 'tokens' or 'bag_of_words', got {features!r}")
    for key, value in (("vocab_size", vocab_size), ("sequence_length", sequence_length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")

    def finish(train, test):
        split_arrays = []
        vocab: list[str] = []
        for split in (train, test):
            columns = _stack(split)
            if columns is None:
                split_arrays.append(None)
                continue
            texts = columns.pop("texts")
            tokens = tokenize(texts, lowercase)
            if split is train:  # the vocabulary comes from the training split only
                vocab = build_vocabulary(tokens, vocab_size)
            x = sent140_features(tokens, len(texts), vocab, features, sequence_length)
            del tokens, texts
            split_arrays.append({"x": x, "y": columns["y"]})
        tokens_mode = features == "tokens"
        info = {
            "num_classes": 2,
            "class_names": ["negative", "positive"],
            "input_shape": (sequence_length,) if tokens_mode else (len(vocab),),
            "input_dtype": "int32" if tokens_mode else "float32",
            "features": features,
            "vocab": vocab,
            "vocab_size": len(vocab) + 2,
            "pad_id": SENT140_PAD_ID,
            "oov_id": SENT140_OOV_ID,
        }
        return split_arrays[0], split_arrays[1], info

    return _build(
        "leaf_sent140", "sent140", data_dir, source, test_fraction, seed, _sent140_convert, finish
    )


# --- CelebA ---------------------------------------------------------------------------------------


def _celeba_convert(xs: list, ys: list, path: Path) -> dict[str, Any] | None:
    if not xs:
        return None
    for name in xs:
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise DataError(
                f"{path}: a CelebA x is {name!r:.80}; expected an image file name of "
                "img_align_celeba (e.g. '000001.jpg'), without folders"
            )
    return {"names": xs, "y": _labels(ys, path, 2)}


def load_images(
    names: Sequence[str], images_dir: Path, image_size: int = CELEBA_IMAGE_SIZE
) -> np.ndarray:
    """``[len(names), image_size, image_size, 3]`` float32 in [0, 1], resized as LEAF does."""
    # Lazy, not for a cycle: only CelebA needs Pillow, and importing it costs every other load.
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(names), image_size, image_size, 3), np.float32)
    for index, name in enumerate(names):
        path = images_dir / name
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.resize((image_size, image_size)).convert("RGB"))
        except FileNotFoundError as e:
            raise DataError(
                f"CelebA image {path} not found; the LEAF files name it but {images_dir} does "
                "not have it: unzip the whole img_align_celeba.zip there"
            ) from e
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: not a readable image ({e}); fetch it again") from e
        np.divide(pixels, np.float32(255.0), out=x[index], dtype=np.float32)
    return x


def load_leaf_celeba(
    *,
    data_dir: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    source: str = "auto",
    test_fraction: float = 0.1,
    seed: int = 0,
    image_size: int = CELEBA_IMAGE_SIZE,
) -> FederatedDataset:
    """LEAF's CelebA: one client per celebrity, smiling or not, from the aligned face images.

    Args:
      data_dir: the root data folder (files in ``<data_dir>/leaf/celeba/data/``).
      images_dir: the ``img_align_celeba`` folder; default
        ``<data_dir>/leaf/celeba/data/raw/img_align_celeba`` (where LEAF's scripts want it).
      source: ``"auto"``, ``"split"`` or a LEAF folder read whole (see `load_leaf_femnist`).
      test_fraction: share of each client's examples held out when a whole folder is read.
      seed: shuffles each client's examples before that split.
      image_size: the side images are resized to (LEAF: 84). Memory: N x size^2 x 3 x 4 bytes.

    Returns:
      A `FederatedDataset` named ``"leaf_celeba"``: ``x`` float32
      ``[N, image_size, image_size, 3]`` in [0, 1], ``y`` int32 (1 = smiling).

    Raises:
      FileNotFoundError: the JSON files or the ``img_align_celeba`` folder are missing (the
        message names the folder and where to get it).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or \
            image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    base = leaf_folder("celeba", data_dir)
    folder = Path(images_dir) if images_dir is not None else base / "raw" / "img_align_celeba"
    folder = Path(os.path.abspath(os.path.expanduser(folder)))

    def finish(train, test):
        if not folder.is_dir():
            raise download_lib.MissingFileError(
                f"CelebA image folder {folder} not found: the LEAF files name images of "
                "CelebA's img_align_celeba folder. Download img_align_celeba.zip (aligned and "
                "cropped faces, 1.4 GB) from mmlab.ie.cuhk.edu.hk/projects/CelebA.html and "
                f"unzip it so that {folder}/000001.jpg exists, or pass images_dir= (config "
                "key `dataset.images_dir`)."
            )
        arrays = []
        for split in (train, test):
            columns = _stack(split)
            arrays.append(None if columns is None else
                          {"x": load_images(columns["names"], folder, image_size),
                           "y": columns["y"]})
        info = {
            "num_classes": 2,
            "class_names": ["not smiling", "smiling"],
            "input_shape": (image_size, image_size, 3),
            "input_dtype": "float32",
            "images_dir": str(folder),
        }
        return arrays[0], arrays[1], info

    return _build(
        "leaf_celeba", "celeba", data_dir, source, test_fraction, seed, _celeba_convert, finish
    )
