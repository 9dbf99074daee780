"""Where TFF's files are: its archives (names, sha256), safe extraction, and the cache.

``tff.simulation.datasets`` downloads ``.tar.bz2`` archives from `URL_BASE`; the loaders look for
the extracted h5 files in ``<data_dir>/tff/`` (or a path given as an option), extract a present
archive after checking its sha256, or download it with ``download=True``. `cached_load` converts
a dataset once into a memory-mapped cache (`fedjax_sim.datasets.cache`) keyed by the files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.datasets import cache as cache_lib
from fedjax_sim.datasets import download as download_lib  # `download` is an argument name

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
    folder = Path(folder)
    with download_lib.extracted_tar(
        archive_path, folder, lambda member: member.isfile() and Path(member.name).name in members
    ) as (temp, chosen):
        found = {Path(member.name).name for member in chosen}
        missing = [name for name in members if name not in found]
        if missing:
            raise DataError(
                f"{archive_path}: the archive has no file {missing[0]!r}; expected "
                f"{list(members)}"
            )
        for member in chosen:
            os.replace(temp / member.name, folder / Path(member.name).name)


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
    archive_path = download_lib.ensure_archive(
        folder / archive.name, url=archive.url, sha256=archive.sha256, download=download,
        missing_message=(
            f"TFF file {member!r} not found: expected {folder / member} (or its archive "
            f"{folder / archive.name}, which the loader checks and extracts). Get {archive.url} "
            f"(sha256 {archive.sha256}). Fix it either way: (1) put the archive or the "
            f"extracted file in {folder}: set the data folder with "
            f"{download_lib.DATA_DIR_ENV}=/path/to/data or data_dir= (config key "
            "`dataset.data_dir`), the files go in its 'tff/' sub-folder, or name the h5 file "
            "directly (train_file=, test_file=); or (2) pass download=True (config key "
            "`dataset.download: true`)."
        ),
    )
    extract_archive(archive_path, folder, archive.members)
    return folder / member


def resolve_file(explicit: str | os.PathLike | None, folder: Path, member: str, archive: Archive,
                 download: bool) -> Path:
    """``explicit`` (a path given as an option) if given, else `find_file`."""
    if explicit is not None and os.fspath(explicit) != "":
        path = Path(os.path.expanduser(os.fspath(explicit))).resolve()
        if not path.is_file():
            raise download_lib.MissingFileError(
                f"TFF file {path} not found (given as an option); expected TFF's {member} "
                f"from {archive.url}"
            )
        return path
    return find_file(folder, member, archive, download)


def split_files(archive: str, data_dir: str | os.PathLike | None,
                train_file: str | os.PathLike | None, test_file: str | os.PathLike | None,
                download: bool) -> tuple[Path, Path]:
    """The ``<archive>_train.h5`` and ``<archive>_test.h5`` of one of TFF's `ARCHIVES`
    (explicit paths win; see `resolve_file`)."""
    folder, spec = tff_folder(data_dir), ARCHIVES[archive]
    return (resolve_file(train_file, folder, f"{archive}_train.h5", spec, download),
            resolve_file(test_file, folder, f"{archive}_test.h5", spec, download))


def tff_folder(data_dir: str | os.PathLike | None) -> Path:
    """``<data_dir>/tff``: where the archives and their extracted files go."""
    return download_lib.data_dir(data_dir) / FOLDER


def cached_load(name: str, options: Mapping[str, Any], files: Sequence[Path], cache: bool,
                cache_dir: str | os.PathLike | None,
                build: Callable[[cache_lib.Allocator], FederatedDataset]) -> FederatedDataset:
    """``build(allocate)`` through the cache (``cache=True``) or in memory.

    The cache folder is ``<cache_dir>/<name>-<hash of options and file paths>`` (default
    ``cache_dir``: ``cache/`` beside the first file); it is rebuilt when a file's size or mtime
    changes.
    """
    if not cache:
        return build(cache_lib.allocate_in_memory)
    root = Path(cache_dir).expanduser() if cache_dir not in (None, "") else \
        files[0].parent / "cache"
    keyed = {**options, "files": [str(f) for f in files]}
    source = {"loader": name, "options": keyed, "files": cache_lib.file_signature(*files)}
    return cache_lib.cached_load(root / cache_lib.options_key(name, keyed), source, build)
