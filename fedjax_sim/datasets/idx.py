"""IDX files: the format of MNIST, EMNIST and Fashion-MNIST (LeCun et al. 1998).

Format (yann.lecun.com/exdb/mnist, "THE IDX FILE FORMAT"): a big-endian magic ``0x0000TTNN``
(``TT`` the element type, ``0x08`` = uint8 ...; ``NN`` the number of dimensions), ``NN``
big-endian uint32 sizes, then the values in row-major order. Labels are ``0x00000801`` (uint8,
1-D), images ``0x00000803`` (uint8, 3-D: ``[N, rows, columns]``).

The files are distributed gzip'd; every reader here accepts them gzip'd or plain (gzip is
detected from the first bytes, not the name) and names the file in every error.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from fedjax_sim.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class IdxFile:
    """One distributed IDX file: its name and the sha256 of its ``.gz``.

    ``shape`` (the parsed array's) and ``content_sha256`` (of the decompressed bytes) are what a
    loader checks on every load, when it knows them.
    """

    name: str
    gz_sha256: str
    shape: tuple[int, ...] | None = None
    content_sha256: str | None = None

    def url(self, base: str) -> str:
        """The ``.gz``'s address under ``base`` (the loader's mirror, read when it downloads)."""
        return f"{base}{self.name}.gz"


# IDX type byte -> big-endian dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def gunzip_if_gzipped(raw: bytes, path: str | os.PathLike) -> bytes:
    """``raw`` gunzipped when it starts with the gzip magic ``1f 8b``, else ``raw`` itself.

    Raises:
      DataError (naming ``path``): a truncated or corrupt gzip stream (the CRC is checked).
    """
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream / bad header / bad deflate
        raise DataError(
            f"{os.fspath(path)}: truncated or corrupt gzip stream ({e}); delete the file and "
            "fetch it again"
        ) from e


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic ``1f 8b``."""
    return gunzip_if_gzipped(Path(path).read_bytes(), path)


def parse_idx(data: bytes, path: str | os.PathLike) -> np.ndarray:
    """A read-only big-endian view of the IDX payload in ``data``, shaped by its header.

    Args:
      data: the decompressed bytes of one IDX file.
      path: the file they came from (named in errors only).

    Raises:
      DataError: a wrong magic number, a truncated header, or a payload whose size does not
        match the header.
    """
    path = os.fspath(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES or data[3] == 0:
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{data[:4].hex() or 'empty'}, expected "
            "0x0000TTNN with type byte TT in {08, 09, 0b, 0c, 0d, 0e} and NN >= 1 dimensions "
            "(e.g. 0x00000801 for labels, 0x00000803 for images)"
        )
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise DataError(
            f"{path}: truncated IDX header: {len(data)} bytes, {header_bytes} needed for "
            f"{ndim} dimensions"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    # Python ints: an int64 product of a damaged header's sizes can wrap (to 0, to negatives).
    expected = header_bytes + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated IDX data" if len(data) < expected else "trailing bytes after IDX data"
        raise DataError(
            f"{path}: {problem}: {len(data)} bytes, expected {expected} (a {header_bytes}-byte "
            f"header + {dims} {dtype.name} values); the file is damaged, fetch it again"
        )
    return np.frombuffer(data, dtype, offset=header_bytes).reshape(dims)


def to_native(array: np.ndarray) -> np.ndarray:
    """A writable native-endian copy of a parsed IDX array (uint8 stays uint8)."""
    return array.astype(array.dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip'd or plain, into a native-endian numpy array.

    Args:
      path: the file; gzip is detected from its first bytes, not its name.

    Returns:
      An array shaped by the header (e.g. ``[60000, 28, 28]`` uint8).

    Raises:
      DataError (a ValueError, naming the file): a wrong magic number, a truncated or corrupt
        gzip stream, or a payload whose size does not match the header.

    Example:
      >>> images = read_idx("train-images-idx3-ubyte.gz")  # doctest: +SKIP
      >>> images.shape, images.dtype  # doctest: +SKIP
      ((60000, 28, 28), dtype('uint8'))
    """
    return to_native(parse_idx(read_bytes(path), path))


def check_shape(
    array: np.ndarray, expected: tuple[int | None, ...], path: str | os.PathLike, what: str
) -> None:
    """Raises `DataError` naming ``path`` unless ``array.shape`` matches ``expected``.

    ``None`` in ``expected`` matches any size (e.g. ``(None, 28, 28)``).
    """
    shape = array.shape
    if len(shape) != len(expected) or any(
        want is not None and have != want for have, want in zip(shape, expected, strict=True)
    ):
        shown = tuple("N" if want is None else want for want in expected)
        raise DataError(
            f"{os.fspath(path)}: {what} have shape {shape}, expected {shown}; the file is not "
            "the expected one (a different split or dataset?)"
        )
