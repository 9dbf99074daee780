"""Per-client values for analytics from real federated data.

* Shakespeare by role (`shakespeare_roles`): the 37 plays under ``<data>/shakespeare/`` (the
  shared data folder's layout: ``plays/*_gut.txt`` and ``SOURCES.tsv``, each file checked
  against its sha256), parsed by `fedjax_sim.datasets.shakespeare.lines_by_role`; one client
  per role per play, with its speech lines. Without a data folder, the copy shipped with the
  package (the same bytes).
* Any dataset with labels (Fashion-MNIST): the clients' labels, as a `FederatedData`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.datasets import shakespeare
from fedjax_sim.datasets.download import DATA_DIR_ENV, data_dir


@dataclasses.dataclass(frozen=True)
class Roles:
    """Shakespeare's speaking roles: ``client_ids[c]`` spoke ``lines[c]`` (in play order)."""

    client_ids: list[str]
    lines: list[list[str]]

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def line_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths [N], offsets [C + 1])``: every line's length in characters, by client."""
        lengths = np.asarray([len(line) for lines in self.lines for line in lines], np.float32)
        sizes = [len(lines) for lines in self.lines]
        return lengths, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def shakespeare_folder(data_dir_option: str | os.PathLike | None = None) -> Path | None:
    """``<data>/shakespeare`` when a data folder is set (option > ``FEDJAX_SIM_DATA``), else
    None (the packaged copy)."""
    if data_dir_option is None and not os.environ.get(DATA_DIR_ENV):
        return None
    return data_dir(data_dir_option) / "shakespeare"


def shakespeare_roles(data_dir_option: str | os.PathLike | None = None) -> Roles:
    """Every role's lines, from the data folder (or the packaged plays when none is set).

    Parsed once per folder and process (the plays are checked and parsed in about a second).
    """
    return _roles(shakespeare_folder(data_dir_option))


@functools.lru_cache(maxsize=4)
def _roles(folder: Path | None) -> Roles:
    texts: dict[str, str] = {}
    try:
        if folder is None:
            texts = shakespeare.read_plays()
        else:
            sources = shakespeare.read_sources(folder)
            for row in sources:
                path = folder / "plays" / row["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"play file {path} listed in {folder}/SOURCES.tsv "
                                            "is missing")
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest != row["sha256"]:
                    raise DataError(f"checksum mismatch for {path}: expected sha256 "
                                    f"{row['sha256']}, got {digest}")
                texts[path.stem] = data.decode("utf-8")
    except FileNotFoundError as error:
        raise DataError(f"{error} (the Shakespeare folder is <data>/shakespeare with plays/ and "
                        f"SOURCES.tsv; set dataset.data_dir or {DATA_DIR_ENV})") from None
    ids, lines = [], []
    for stem, text in texts.items():
        for role, role_lines in shakespeare.lines_by_role(text).items():
            ids.append(f"{stem}:{role}")
            lines.append(role_lines)
    return Roles(ids, lines)
