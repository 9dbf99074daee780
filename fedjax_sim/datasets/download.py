"""Where dataset files live, and how they get there intact.

Every loader resolves its folder with `data_dir` (explicit argument > ``$FEDJAX_SIM_DATA`` >
the user cache folder), finds its files with `ensure_file`, and downloads only when asked
(``download=True``, config key ``dataset.download: true``). Downloads are atomic: the bytes go to
a temporary file in the destination folder, their sha256 is checked, and only then does
``os.replace`` put the file in place, so an interrupted or corrupt download never looks like a
valid file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import platformdirs

from fedjax_sim.data.errors import DataError

DATA_DIR_ENV = "FEDJAX_SIM_DATA"
"""Environment variable naming the root data folder (relative paths resolve against the cwd)."""

_CHUNK_BYTES = 1 << 20
_log = logging.getLogger(__name__)


class MissingFileError(DataError, FileNotFoundError):
    """A data file is not where it is expected; the message says where and how to get it."""


class ChecksumError(DataError):
    """A file's sha256 is not the expected one (corrupt, truncated or a different file)."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The root folder that holds one sub-folder per dataset (e.g. ``<root>/fashion-mnist/``).

    Precedence: ``explicit`` (the ``data_dir`` argument / config key ``dataset.data_dir``) >
    the environment variable ``FEDJAX_SIM_DATA`` > ``platformdirs.user_cache_dir("fedjax_sim")``.
    Relative paths resolve against the current working directory, ``~`` expands to the home
    folder. An empty string counts as unset.

    Args:
      explicit: a folder that overrides the environment and the default, or None.

    Returns:
      An absolute path (it need not exist yet).
    """
    if explicit is not None and os.fspath(explicit) != "":
        chosen = os.fspath(explicit)
    elif os.environ.get(DATA_DIR_ENV):
        chosen = os.environ[DATA_DIR_ENV]
    else:
        chosen = platformdirs.user_cache_dir("fedjax_sim")
    return Path(os.path.abspath(os.path.expanduser(chosen)))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, actual: str, expected: str, what: str = "") -> None:
    """Raises `ChecksumError` naming ``path`` and both digests when they differ.

    Args:
      path: the file the digest belongs to (for the message only).
      actual: the digest computed.
      expected: the digest the file must have.
      what: what was hashed when not the file's raw bytes, e.g. ``"decompressed content"``.
    """
    if actual.lower() == expected.lower():
        return
    of = f" of the {what}" if what else ""
    raise ChecksumError(
        f"{os.fspath(path)}: sha256{of} is {actual}, expected {expected}. The file is corrupt, "
        "truncated or not the expected one: delete it and fetch it again (download=True, "
        "config key `dataset.download: true`)."
    )


def download_file(url: str, path: str | os.PathLike, sha256: str, *, timeout: float = 60.0) -> Path:
    """Downloads ``url`` to ``path`` atomically, checking its sha256 before it is used.

    The bytes stream into a temporary file in ``path``'s folder (created if needed); on a digest
    mismatch that file is deleted and `ChecksumError` raised, otherwise ``os.replace`` moves it to
    ``path``. An existing file at ``path`` is replaced only by a verified one.

    Args:
      url: what to fetch (any scheme ``urllib`` opens: http, https, file).
      path: the destination file.
      sha256: the expected hex sha256 of the downloaded bytes.
      timeout: seconds to wait for the server before giving up.

    Returns:
      ``path`` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _log.info("Downloading %s to %s", url, path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as e:  # urllib.error.URLError is an OSError
                raise DataError(f"could not download {url} to {path}: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        check_sha256(f"{path} (downloaded from {url})", digest.hexdigest(), sha256)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def missing_file_message(path: str | os.PathLike, url: str) -> str:
    """Says which file is missing, where it is expected, where to get it and the two fixes."""
    path = Path(path)
    root = path.parent.parent
    return (
        f"dataset file {path.name!r} not found: expected it at {path} (data folder {root}, "
        f"resolved from the data_dir argument, else ${DATA_DIR_ENV}, else the user cache "
        f"folder). Get it from {url}. Fix it either way: (1) point the data folder at a copy "
        f"that has {path.parent.name}/{path.name} in it: set {DATA_DIR_ENV}=/path/to/data or "
        "pass data_dir= (config key `dataset.data_dir`); or (2) let the loader download it: "
        "pass download=True (config key `dataset.download: true`)."
    )


def ensure_file(path: str | os.PathLike, *, url: str, sha256: str, download: bool = False) -> Path:
    """Returns ``path`` if the file exists, else downloads it (``download=True``) or raises.

    An existing file is returned as is: checking it is the loader's job, since what to hash
    differs (Fashion-MNIST checks its decompressed content; hashing a multi-GB file on every
    load would be wasteful).

    Args:
      path: where the file must be, usually ``data_dir(...) / "<dataset>" / "<file>"``.
      url: where to download it from.
      sha256: the expected hex sha256 of the downloaded bytes.
      download: fetch a missing file instead of raising.

    Returns:
      ``path`` as a `Path`.

    Raises:
      FileNotFoundError: the file is missing and ``download`` is False; the message says where
        the file is expected, where to get it and how to fix it.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not download:
        raise MissingFileError(missing_file_message(path, url))
    return download_file(url, path, sha256)


def ensure_archive(
    path: str | os.PathLike, *, url: str, sha256: str, download: bool, missing_message: str
) -> Path:
    """An archive whose sha256 is checked: ``path`` if it is there, else downloaded or refused.

    Unlike `ensure_file`, an existing archive is hashed on every call: it is read only when its
    contents are extracted, which costs more than the hash.

    Raises:
      MissingFileError: ``missing_message``, when the archive is absent and ``download`` is
        False.
      ChecksumError: the archive (present or downloaded) is not the expected one.
    """
    path = Path(path)
    if path.is_file():
        check_sha256(path, sha256_file(path), sha256)
        return path
    if not download:
        raise MissingFileError(missing_message)
    return download_file(url, path, sha256)


@contextlib.contextmanager
def extracted_tar(
    archive: str | os.PathLike,
    destination: str | os.PathLike,
    select: Callable[[tarfile.TarInfo], bool],
) -> Iterator[tuple[Path, list[tarfile.TarInfo]]]:
    """Extracts the members ``select`` picks from a tar archive into a temporary folder, safely.

    `tarfile`'s ``data`` filter refuses absolute paths, ``..``, links pointing outside and
    devices (Python >= 3.10.12 / 3.11.4). The temporary folder is made inside ``destination``,
    so the caller can ``os.replace`` what it wants into place atomically; it is removed when the
    context ends, and a failed extraction leaves nothing behind.

    Yields:
      ``(temporary folder, the extracted members)``.

    Raises:
      DataError (naming the archive): not a readable archive, or an unsafe member.
    """
    archive, destination = Path(archive), Path(destination)
    if not hasattr(tarfile, "data_filter"):
        raise DataError(
            f"{archive}: this Python ({sys.version.split()[0]}) has no safe tar extraction "
            "(tarfile's data filter, Python >= 3.10.12 / 3.11.4); upgrade Python or unpack "
            f"the archive yourself into {destination}"
        )
    destination.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".part", dir=destination))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [member for member in tar.getmembers() if select(member)]
                tar.extractall(temp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(
                f"{archive}: cannot unpack it ({type(error).__name__}: {error}); delete it and "
                "fetch it again"
            ) from error
        yield temp, members
    finally:
        shutil.rmtree(temp, ignore_errors=True)
