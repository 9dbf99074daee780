"""TensorFlow Federated's h5 datasets: EMNIST, Shakespeare, StackOverflow and CIFAR-100.

TFF publishes its simulation datasets as HDF5 files with one group per client,
``examples/<client_id>/<feature>``, each feature an array over the client's examples
(``tff.simulation.datasets``; the archives live at `URL_BASE`). This module reads them with
h5py, without TensorFlow, and converts them once into a flat memory-mapped cache
(`fedjax_sim.datasets.cache`): later loads open the cache in well under a second.

Conversion does no Python work per example (beyond joining the byte strings h5py returns):
each client's datasets are read with h5py's low-level API (one read per client and feature,
which bounds the speed), a chunk of clients is concatenated, and the chunk is preprocessed with
whole-array numpy: byte-level character ids (Shakespeare, whose 16k snippets are decoded for
the shared windowing code), a vectorized word split and hashed vocabulary lookup
(StackOverflow, `lookup_words`), a crop and per-image standardization (CIFAR-100). Outputs
are written straight into the cache's memory-mapped ``.npy`` files: converting needs the
output arrays (file pages the OS can write back) plus one chunk of temporaries, never a second
copy of the dataset.

Datasets (sizes as TFF documents them):

* ``tff_emnist`` [1, 2]: handwritten characters by writer; ``only_digits=True`` 3,383 writers,
  341,873 train / 40,832 test examples, 10 classes; ``False`` 3,400 writers, 671,585 / 77,483,
  62 classes. ``x`` float32 ``[28, 28, 1]`` as TFF stores it (1.0 = background), ``y`` int32.
* ``tff_shakespeare`` [1, 3]: 715 speaking roles; snippets become TFF's character ids and
  80-character sequences exactly as `fedjax_sim.datasets.shakespeare` does for the play texts.
* ``tff_stackoverflow`` [4]: 342,477 users, 135,818,730 train examples. ``task="word"``:
  next-word prediction with TFF's 10,000-word vocabulary (pad 0, words 1..10000, OOV 10001,
  BOS 10002, EOS 10003), ``x``/``y`` int32 ``[20]``. ``task="tag"``: the 500 most frequent tags
  of a question from its words (see `load_tff_stackoverflow`).
* ``tff_cifar100`` [4, 5]: 500 train clients (100 images each, Pachinko allocation over the
  label hierarchy) and 100 test clients; TFF's center crop to 24x24 and per-image
  standardization are applied at conversion (train-time random crops and flips are not).

Train and test files list the same clients (except CIFAR-100, whose test clients are other
clients: its test files become the central test set). The per-client test split follows the
training clients' order; a client with no test examples has an empty test split, and clients
found only in the test file (StackOverflow users active only after 2018) are left out, their
count in ``info["test_only_clients"]``.

References:
  [1] Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018, arXiv:1812.01097.
  [2] Cohen et al., "EMNIST: an extension of MNIST to handwritten letters", 2017,
      arXiv:1702.05373.
  [3] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017, arXiv:1602.05629.
  [4] Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
  [5] Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.datasets import cache as cache_lib
from fedjax_sim.datasets import download as download_lib  # `download` is an argument name
from fedjax_sim.datasets import shakespeare as shakespeare_lib

URL_BASE = "https://storage.googleapis.com/tff-datasets-public/"
"""Where ``tff.simulation.datasets`` downloads its archives from."""

FOLDER = "tff"
"""Sub-folder of the data folder that holds the TFF archives and their extracted files."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """One of TFF's ``.tar.bz2`` archives: its name, sha256 and the files it holds."""

    name: str
    sha256: str
    members: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"{URL_BASE}{self.name}"


# Names and sha256 as in tensorflow_federated/python/simulation/datasets/{emnist,shakespeare,
# stackoverflow,cifar100}.py (`tf.keras.utils.get_file(..., file_hash=...)`).
ARCHIVES = {
    "fed_emnist": Archive(
        "fed_emnist.tar.bz2",
        "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0",
        ("fed_emnist_train.h5", "fed_emnist_test.h5"),
    ),
    "fed_emnist_digitsonly": Archive(
        "fed_emnist_digitsonly.tar.bz2",
        "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b",
        ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5"),
    ),
    "shakespeare": Archive(
        "shakespeare.tar.bz2",
        "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707",
        ("shakespeare_train.h5", "shakespeare_test.h5"),
    ),
    "stackoverflow": Archive(
        "stackoverflow.tar.bz2",
        "99eca2f8b8327a09e5fc123979df2d237acbc5e52322f6d86bf523ee47b961a2",
        ("stackoverflow_train.h5", "stackoverflow_test.h5", "stackoverflow_held_out.h5"),
    ),
    "stackoverflow.word_count": Archive(
        "stackoverflow.word_count.tar.bz2",
        "1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c",
        ("stackoverflow.word_count",),
    ),
    "stackoverflow.tag_count": Archive(
        "stackoverflow.tag_count.tar.bz2",
        "6fe281cec490d9384a290d560072438e7e2b377bbb823876ce7bd6f82696772d",
        ("stackoverflow.tag_count",),
    ),
    "fed_cifar100": Archive(
        "fed_cifar100.tar.bz2",
        "e8575e22c038ecef1ce6c7d492d7abee7da13b1e1ba9b70a7fc18531ba7590de",
        ("fed_cifar100_train.h5", "fed_cifar100_test.h5"),
    ),
}

EXAMPLES_GROUP = "examples"
CHUNK_EXAMPLES = 100_000
"""Examples preprocessed together: bounds conversion temporaries (~100 MB for StackOverflow)."""

# StackOverflow, as TFF's word/tag prediction baselines: 10,000 words, 500 tags, 20 tokens.
SO_VOCAB_SIZE = 10_000
SO_NUM_TAGS = 500
SO_SEQUENCE_LENGTH = 20
SO_MAX_TAGS = 5  # Stack Overflow allows at most 5 tags per question
CIFAR_CROP = 24

# --- files ----------------------------------------------------------------------------------------


def _candidates(folder: Path, member: str, archive: Archive) -> list[Path]:
    """Where an extracted file may be: the folder, keras' ``datasets/``, or the archive's stem."""
    stem = archive.name.removesuffix(".tar.bz2")
    return [folder / member, folder / "datasets" / member, folder / stem / member]


def extract_archive(archive_path: str | os.PathLike, folder: str | os.PathLike,
                    members: Sequence[str]) -> None:
    """Extracts the files named ``members`` (by base name) from a tar archive into ``folder``.

    Safe against hostile archives: only regular files whose base name is one of ``members`` are
    taken, ``tarfile``'s ``"data"`` filter refuses absolute paths, ``..``, links and devices, and
    each file lands in a temporary folder first and is renamed to ``folder/<member>``, so a
    failed extraction leaves no partial file behind.

    Raises:
      DataError: the archive is unreadable or lacks one of ``members``.
    """
    archive_path, folder = Path(archive_path), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".extract.", dir=folder))
    try:
        try:
            with tarfile.open(archive_path, "r:*") as tar:
                chosen = [m for m in tar.getmembers()
                          if m.isfile() and Path(m.name).name in members]
                found = {Path(m.name).name for m in chosen}
                missing = [name for name in members if name not in found]
                if missing:
                    raise DataError(
                        f"{archive_path}: the archive has no file {missing[0]!r} (it holds "
                        f"{[m.name for m in tar.getmembers()][:8]}); expected {list(members)}"
                    )
                tar.extractall(temp, members=chosen, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(
                f"{archive_path}: cannot read the archive ({error}); delete it and fetch it "
                "again (download=True)"
            ) from error
        for member in chosen:
            os.replace(temp / member.name, folder / Path(member.name).name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def find_file(folder: Path, member: str, archive: Archive, download: bool) -> Path:
    """The extracted file ``member`` of ``archive``, extracting or downloading it if needed.

    Order: the file itself (in ``folder``, ``folder/datasets`` or ``folder/<archive stem>``);
    else the archive in ``folder``, checked against its sha256 and extracted; else, with
    ``download``, the archive fetched from `URL_BASE` (verified, atomic) and extracted.

    Raises:
      MissingFileError: neither the file nor its archive is there and ``download`` is False;
        the message names the file, the archive, the URL and where to put them.
      ChecksumError: the archive's sha256 is not TFF's.
    """
    for path in _candidates(folder, member, archive):
        if path.is_file():
            return path
    archive_path = folder / archive.name
    if not archive_path.is_file():
        if not download:
            raise download_lib.MissingFileError(
                f"TFF file {member!r} not found: expected {folder / member} (or its archive "
                f"{archive_path}, which the loader checks and extracts). Get {archive.url} "
                f"(sha256 {archive.sha256}). Fix it either way: (1) put the archive or the "
                f"extracted file in {folder}: set the data folder with "
                f"{download_lib.DATA_DIR_ENV}=/path/to/data or data_dir= (config key "
                "`dataset.data_dir`), the files go in its 'tff/' sub-folder, or name the h5 file "
                "directly (train_file=, test_file=); or (2) pass download=True (config key "
                "`dataset.download: true`)."
            )
        download_lib.download_file(archive.url, archive_path, archive.sha256)
    else:
        download_lib.check_sha256(archive_path, download_lib.sha256_file(archive_path),
                                  archive.sha256)
    extract_archive(archive_path, folder, archive.members)
    return folder / member


def _resolve(explicit: str | os.PathLike | None, folder: Path, member: str, archive: Archive,
             download: bool) -> Path:
    if explicit is not None and os.fspath(explicit) != "":
        path = Path(os.path.expanduser(os.fspath(explicit))).resolve()
        if not path.is_file():
            raise download_lib.MissingFileError(
                f"TFF file {path} not found (given as an option); expected TFF's {member} "
                f"from {archive.url}"
            )
        return path
    return find_file(folder, member, archive, download)


# --- h5 layout ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feature:
    """What one per-client feature must look like: ``[n, *shape]`` of a dtype kind."""

    name: str
    shape: tuple[int, ...]
    kinds: str  # numpy dtype kinds accepted: "f" float, "iu" integers, "OS" byte strings

    def describe(self) -> str:
        what = {"f": "floats", "iu": "integers", "OS": "byte strings", "u": "uint8"}.get(
            self.kinds, self.kinds)
        return f"[n, {', '.join(map(str, self.shape))}] {what}" if self.shape else \
            f"[n] {what}"


def _open_h5(path: Path):
    import h5py

    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(
            f"{path}: not a readable HDF5 file ({error}); expected TFF's h5 layout "
            "examples/<client_id>/<feature>"
        ) from error
    if EXAMPLES_GROUP not in file or not isinstance(file[EXAMPLES_GROUP], h5py.Group):
        top = sorted(file.keys())[:5]
        file.close()
        raise DataError(
            f"{path}: no group '{EXAMPLES_GROUP}' (top level holds {top}); expected TFF's h5 "
            "layout examples/<client_id>/<feature>"
        )
    return file


def _describe_missing(path: Path, group, client: str, feature: Feature) -> DataError:
    import h5py

    entry = group.get(client)
    has = sorted(entry.keys()) if isinstance(entry, h5py.Group) else "no such group"
    return DataError(
        f"{path}: client {client!r} has no feature {feature.name!r} ({has}); expected "
        f"examples/{client}/{feature.name}: {feature.describe()}"
    )


def _dataset(path: Path, group, client: str, feature: Feature):
    """The low-level h5 dataset ``examples/<client>/<feature>``, its shape and dtype checked.

    h5py's low-level ``h5d.open`` costs a third of ``group[...]`` (no high-level objects),
    which matters at 342,477 clients.
    """
    import h5py

    try:
        node = h5py.h5d.open(group.id, f"{client}/{feature.name}".encode())
    except Exception:  # noqa: BLE001 - h5py raises KeyError/ValueError/TypeError by case
        raise _describe_missing(path, group, client, feature) from None
    shape, dtype = node.shape, node.dtype
    if len(shape) != 1 + len(feature.shape) or tuple(shape[1:]) != feature.shape \
            or dtype.kind not in feature.kinds:
        raise DataError(
            f"{path}: client {client!r}, feature {feature.name!r} has shape {shape} and "
            f"dtype {dtype}; expected {feature.describe()}"
        )
    return node


def _client_sizes(path: Path, group, clients: Sequence[str], feature: Feature) -> np.ndarray:
    return np.fromiter((_dataset(path, group, c, feature).shape[0] for c in clients),
                       dtype=np.int64, count=len(clients))


def _as_bytes(values: np.ndarray) -> list[bytes]:
    values = values.tolist()
    if values and isinstance(values[0], str):
        values = [v.encode("utf-8") for v in values]
    return values


def _read(path: Path, group, client: str, feature: Feature, size: int):
    import h5py

    node = _dataset(path, group, client, feature)
    if node.shape[0] != size:
        raise DataError(
            f"{path}: client {client!r}, feature {feature.name!r} has {node.shape[0]} examples, "
            f"its other features {size}; expected one length per client"
        )
    values = np.empty(node.shape, dtype=node.dtype)
    if values.size:
        node.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
    return _as_bytes(values) if feature.kinds == "OS" else values


def _chunks(sizes: np.ndarray, max_rows: int) -> Iterator[tuple[int, int]]:
    """``(first, last + 1)`` client ranges of about ``max_rows`` examples each."""
    start, rows = 0, 0
    for index, size in enumerate(sizes.tolist()):
        rows += size
        if rows >= max_rows:
            yield start, index + 1
            start, rows = index + 1, 0
    if start < len(sizes):
        yield start, len(sizes)


@dataclasses.dataclass
class _Split:
    """One h5 file's clients in output order: ids, sizes, and where each is in the file."""

    path: Path
    clients: list[str]  # h5 group names, in output order (absent ones included, size 0)
    present: np.ndarray  # bool: the client has a group in this file
    sizes: np.ndarray

    def read_chunks(self, features: Sequence[Feature]) -> Iterator[tuple[int, int, dict]]:
        """``(row_start, row_stop, {feature: concatenated values})`` chunk by chunk."""
        file = _open_h5(self.path)
        try:
            group = file[EXAMPLES_GROUP]
            row = 0
            for first, last in _chunks(self.sizes, CHUNK_EXAMPLES):
                parts: dict[str, list] = {f.name: [] for f in features}
                for index in range(first, last):
                    if not self.present[index]:
                        continue
                    for feature in features:
                        parts[feature.name].append(
                            _read(self.path, group, self.clients[index], feature,
                                  int(self.sizes[index])))
                rows = int(self.sizes[first:last].sum())
                values = {}
                for feature in features:
                    if feature.kinds == "OS":
                        values[feature.name] = list(itertools.chain.from_iterable(
                            parts[feature.name]))
                    elif parts[feature.name]:
                        values[feature.name] = np.concatenate(parts[feature.name])
                    else:
                        values[feature.name] = np.zeros((0, *feature.shape))
                yield row, row + rows, values
                row += rows
        finally:
            file.close()


def _train_split(path: Path, size_feature: Feature) -> _Split:
    file = _open_h5(path)
    try:
        group = file[EXAMPLES_GROUP]
        clients = sorted(group.keys())  # TFF's HDF5ClientData sorts its client ids too
        if not clients:
            raise DataError(f"{path}: group '{EXAMPLES_GROUP}' has no clients; expected at "
                            "least one examples/<client_id> group")
        sizes = _client_sizes(path, group, clients, size_feature)
    finally:
        file.close()
    return _Split(path, clients, np.ones(len(clients), bool), sizes)


def _test_split(path: Path, train_clients: Sequence[str], size_feature: Feature
                ) -> tuple[_Split, int]:
    """The test file's clients aligned to the training clients; and how many it has beyond."""
    file = _open_h5(path)
    try:
        group = file[EXAMPLES_GROUP]
        names = set(group.keys())
        present = np.fromiter((c in names for c in train_clients), bool, len(train_clients))
        sizes = np.zeros(len(train_clients), np.int64)
        listed = [c for c, p in zip(train_clients, present, strict=True) if p]
        sizes[present] = _client_sizes(path, group, listed, size_feature)
        extra = len(names) - len(listed)
    finally:
        file.close()
    return _Split(path, list(train_clients), present, sizes), extra


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# --- vectorized tokenization ----------------------------------------------------------------------

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


def lookup_words(texts: Sequence[bytes], vocab: Vocabulary, max_words: int,
                 sep: bytes | None = b" ") -> tuple[np.ndarray, np.ndarray]:
    """Splits every text into words and looks up its first ``max_words``, all vectorized.

    ``sep=b" "`` splits like ``bytes.split(b" ")`` (and ``tf.strings.split(s, sep=" ")``):
    consecutive separators give empty words. ``sep=None`` splits on runs of ASCII whitespace
    and drops empty words (``tf.strings.split(s)``). The texts are joined into one byte buffer
    once; word boundaries, per-text word ranks and the lookup (fixed-width byte rows against the
    sorted vocabulary with ``searchsorted``) are whole-array numpy operations.

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
    # Hash the kept words' zero-padded bytes, find candidates, confirm byte for byte.
    length = word_end - word_start
    fits = (length > 0) & (length <= vocab.width)
    keys = _pack_words(buffer, word_start, np.where(fits, length, 0), vocab.width)
    hashes = _hash_keys(keys)
    where = np.minimum(np.searchsorted(vocab.hashes, hashes), len(vocab) - 1)
    found = fits & (vocab.hashes[where] == hashes)
    candidates = np.flatnonzero(found)
    found[candidates] = (vocab.keys[where[candidates]] == keys[candidates]).all(axis=1)
    ids[text_of_word, rank] = np.where(found, vocab.ids[where], -1)
    return ids, counts


# --- loaders --------------------------------------------------------------------------------------


def _folder(data_dir: str | os.PathLike | None) -> Path:
    return download_lib.data_dir(data_dir) / FOLDER


def _load(name: str, options: Mapping[str, Any], files: Sequence[Path], cache: bool,
          cache_dir: str | os.PathLike | None, build) -> FederatedDataset:
    """``build(allocate)`` through the cache (``cache=True``) or in memory."""
    if not cache:
        return build(cache_lib.allocate_in_memory)
    root = Path(cache_dir).expanduser() if cache_dir not in (None, "") else \
        files[0].parent / "cache"
    keyed = {**options, "files": [str(f) for f in files]}
    source = {"loader": name, "options": keyed, "files": cache_lib.file_signature(*files)}
    return cache_lib.cached_load(root / cache_lib.options_key(name, keyed), source, build)


def _numeric_dataset(name: str, train_path: Path, test_path: Path, features: Sequence[Feature],
                     outputs: Mapping[str, tuple[tuple[int, ...], Any]], transform,
                     allocate, info: dict, central_test: bool = False) -> FederatedDataset:
    """Reads numeric features split by split, transforming each chunk into the outputs."""
    train = _train_split(train_path, features[0])
    if central_test:
        test_file = _train_split(test_path, features[0])
        splits = {"train": train, "central_test": test_file}
        extra = 0
    else:
        test, extra = _test_split(test_path, train.clients, features[0])
        splits = {"train": train, "test": test}
    parts: dict[str, Any] = {}
    for split, source in splits.items():
        total = int(source.sizes.sum())
        arrays = {key: allocate(split, key, (total, *shape), dtype)
                  for key, (shape, dtype) in outputs.items()}
        for lo, hi, values in source.read_chunks(features):
            for key, value in transform(values).items():
                arrays[key][lo:hi] = value
        if split == "central_test":
            parts[split] = arrays
        else:
            parts[split] = FederatedData(arrays, _offsets(source.sizes),
                                         np.asarray(train.clients))
    info = {**info, "test_only_clients": extra, "source_files": [str(train_path),
                                                                 str(test_path)]}
    return FederatedDataset(name=name, train=parts["train"], test=parts.get("test"),
                            central_test=parts.get("central_test"), info=info)


def load_tff_emnist(
    *,
    only_digits: bool = True,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated EMNIST by writer from TFF's h5 files [1, 2].

    Args:
      only_digits: the digits-only files (3,383 writers, 10 classes) or all 62 classes
        (3,400 writers).
      data_dir: the root data folder; files in ``<data_dir>/tff/`` (``fed_emnist[_digitsonly]
        _{train,test}.h5`` or the ``.tar.bz2`` archive, which is checked and extracted).
      download: fetch a missing archive from `URL_BASE`.
      train_file, test_file: explicit h5 paths (override the folder).
      cache: convert once into a memory-mapped cache and open that afterwards.
      cache_dir: where the cache folder goes (default ``cache/`` beside the train file).

    Returns:
      ``train`` and ``test`` over the writers: ``x`` float32 ``[n, 28, 28, 1]`` (TFF's pixels:
      1.0 is the background), ``y`` int32 ``[n]``.
    """
    prefix = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    archive = ARCHIVES[prefix]
    folder = _folder(data_dir)
    train_path = _resolve(train_file, folder, f"{prefix}_train.h5", archive, download)
    test_path = _resolve(test_file, folder, f"{prefix}_test.h5", archive, download)
    features = [Feature("pixels", (28, 28), "f"), Feature("label", (), "iu")]
    num_classes = 10 if only_digits else 62

    def transform(values):
        return {"x": values["pixels"].reshape(-1, 28, 28, 1),
                "y": values["label"].astype(np.int32)}

    def build(allocate):
        return _numeric_dataset(
            "tff_emnist", train_path, test_path, features,
            {"x": ((28, 28, 1), np.float32), "y": ((), np.int32)}, transform, allocate,
            {"num_classes": num_classes, "pad_label": None, "input_shape": (28, 28, 1),
             "input_dtype": "float32", "only_digits": only_digits})

    return _load("tff_emnist", {"only_digits": only_digits}, [train_path, test_path], cache,
                 cache_dir, build)


def standardize_images(images: np.ndarray, crop: int = CIFAR_CROP) -> np.ndarray:
    """TFF's CIFAR-100 evaluation preprocessing, vectorized over ``[n, H, W, C]`` images.

    ``tf.image.resize_with_crop_or_pad`` to ``crop x crop`` (a center crop, offset
    ``(H - crop) // 2``) of the float pixel values, then ``tf.image.per_image_standardization``:
    ``(x - mean) / max(std, 1 / sqrt(crop * crop * C))`` per image.

    Returns:
      float32 ``[n, crop, crop, C]``.
    """
    n, height, width, channels = images.shape
    top, left = (height - crop) // 2, (width - crop) // 2
    x = images[:, top:top + crop, left:left + crop, :].astype(np.float32)
    if n == 0:
        return x
    mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = x.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    scale = np.maximum(std, 1.0 / np.sqrt(crop * crop * channels))
    return ((x - mean) / scale).astype(np.float32)


def load_tff_cifar100(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated CIFAR-100 from TFF's h5 files [4, 5]: 500 train clients, 100 test clients.

    Images are center-cropped to 24x24 and standardized per image at conversion
    (`standardize_images`, TFF's evaluation preprocessing); TFF's train-time random crops and
    flips are not applied. The test clients are not the training clients, so the test file
    becomes the central test set.

    Args: as `load_tff_emnist` (files ``fed_cifar100_{train,test}.h5``).

    Returns:
      ``train`` over 500 clients and ``central_test``: ``x`` float32 ``[n, 24, 24, 3]``,
      ``y`` int32 ``[n]`` in ``[0, 100)``.
    """
    archive = ARCHIVES["fed_cifar100"]
    folder = _folder(data_dir)
    train_path = _resolve(train_file, folder, "fed_cifar100_train.h5", archive, download)
    test_path = _resolve(test_file, folder, "fed_cifar100_test.h5", archive, download)
    features = [Feature("image", (32, 32, 3), "u"), Feature("label", (), "iu")]

    def transform(values):
        return {"x": standardize_images(values["image"]), "y": values["label"].astype(np.int32)}

    def build(allocate):
        return _numeric_dataset(
            "tff_cifar100", train_path, test_path, features,
            {"x": ((CIFAR_CROP, CIFAR_CROP, 3), np.float32), "y": ((), np.int32)}, transform,
            allocate, {"num_classes": 100, "pad_label": None,
                       "input_shape": (CIFAR_CROP, CIFAR_CROP, 3), "input_dtype": "float32"},
            central_test=True)

    return _load("tff_cifar100", {}, [train_path, test_path], cache, cache_dir, build)


def load_tff_shakespeare(
    *,
    sequence_length: int = 80,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FederatedDataset:
    """Federated Shakespeare from TFF's h5 files [1, 3]: 715 roles, next-character prediction.

    Each client's ``snippets`` become TFF's character ids (``[BOS] + chars + [EOS]`` per
    snippet, vocabulary `fedjax_sim.datasets.shakespeare.CHAR_VOCAB`) cut into windows of
    ``sequence_length + 1`` exactly as `fedjax_sim.datasets.shakespeare` does.

    Args: as `load_tff_emnist` (files ``shakespeare_{train,test}.h5``), plus
      sequence_length: characters per example.

    Returns:
      ``train`` and ``test``: ``x``, ``y`` int32 ``[n, sequence_length]``, pad 0.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be a positive integer, got {sequence_length}")
    archive = ARCHIVES["shakespeare"]
    folder = _folder(data_dir)
    train_path = _resolve(train_file, folder, "shakespeare_train.h5", archive, download)
    test_path = _resolve(test_file, folder, "shakespeare_test.h5", archive, download)
    feature = Feature("snippets", (), "OS")

    def windows(split: _Split) -> tuple[np.ndarray, np.ndarray]:
        clients: list[list[str]] = [[] for _ in split.clients]
        file = _open_h5(split.path)
        try:
            group = file[EXAMPLES_GROUP]
            for index, client in enumerate(split.clients):
                if split.present[index]:
                    snippets = _read(split.path, group, client, feature,
                                     int(split.sizes[index]))
                    clients[index] = [s.decode("utf-8", "replace") for s in snippets]
        finally:
            file.close()
        try:
            return shakespeare_lib._windows(clients, sequence_length)  # noqa: SLF001
        except ValueError as error:
            raise DataError(f"{split.path}: {error}") from None

    def build(allocate):
        train = _train_split(train_path, feature)
        test, extra = _test_split(test_path, train.clients, feature)
        parts = {}
        for name, split in (("train", train), ("test", test)):
            tokens, counts = windows(split)
            x = allocate(name, "x", (tokens.shape[0], sequence_length), np.int32)
            y = allocate(name, "y", (tokens.shape[0], sequence_length), np.int32)
            x[:], y[:] = tokens[:, :-1], tokens[:, 1:]
            parts[name] = FederatedData({"x": x, "y": y}, _offsets(counts),
                                        np.asarray(train.clients))
        info = {
            "num_classes": shakespeare_lib.VOCAB_SIZE, "pad_label": shakespeare_lib.PAD_ID,
            "vocab_size": shakespeare_lib.VOCAB_SIZE, "sequence_length": sequence_length,
            "input_shape": (sequence_length,), "input_dtype": "int32",
            "char_vocab": "".join(shakespeare_lib.CHAR_VOCAB),
            "oov_id": shakespeare_lib.OOV_ID, "bos_id": shakespeare_lib.BOS_ID,
            "eos_id": shakespeare_lib.EOS_ID, "test_only_clients": extra,
            "source_files": [str(train_path), str(test_path)],
        }
        return FederatedDataset("tff_shakespeare", parts["train"], parts["test"], None, info)

    return _load("tff_shakespeare", {"sequence_length": sequence_length},
                 [train_path, test_path], cache, cache_dir, build)


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
    folder = _folder(data_dir)
    archive = ARCHIVES["stackoverflow"]
    train_path = _resolve(train_file, folder, "stackoverflow_train.h5", archive, download)
    test_path = _resolve(test_file, folder, "stackoverflow_test.h5", archive, download)
    words_path = _resolve(word_count_file, folder, "stackoverflow.word_count",
                          ARCHIVES["stackoverflow.word_count"], download)
    files = [train_path, test_path, words_path]
    if task == "tag":
        tags_path = _resolve(tag_count_file, folder, "stackoverflow.tag_count",
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

        train = _train_split(train_path, tokens_feature)
        test, extra = _test_split(test_path, train.clients, tokens_feature)
        parts = {}
        for name, split in (("train", train), ("test", test)):
            total = int(split.sizes.sum())
            arrays = {key: allocate(name, key, (total, *shape), np.int32)
                      for key, shape in shapes.items()}
            for lo, hi, values in split.read_chunks(features):
                for key, value in transform(values).items():
                    arrays[key][lo:hi] = value
            parts[name] = FederatedData(arrays, _offsets(split.sizes), np.asarray(train.clients))
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

    return _load("tff_stackoverflow", {"task": task}, files, cache, cache_dir, build)


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
