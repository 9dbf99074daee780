"""TFF's federated Shakespeare [1, 2]: 715 speaking roles, next-character prediction.

References:
  [1] Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018, arXiv:1812.01097.
  [2] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017, arXiv:1602.05629.
"""

from __future__ import annotations

import os

import numpy as np

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.datasets.tff_h5.files import cached_load, split_files
from fedjax_sim.datasets.tff_h5.reader import (
    EXAMPLES_GROUP,
    Feature,
    H5Clients,
    offsets,
    open_h5,
    read_feature,
    test_clients,
    train_clients,
)
from fedjax_sim.datasets.vocab import char_info, char_windows


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
    """Federated Shakespeare from TFF's h5 files [1, 2]: 715 roles, next-character prediction.

    Each client's ``snippets`` become TFF's character ids (``[BOS] + chars + [EOS]`` per
    snippet, `fedjax_sim.datasets.vocab`) cut into windows of ``sequence_length + 1``
    (`char_windows`) exactly as `fedjax_sim.datasets.shakespeare` does for the play texts.

    Args: as `load_tff_emnist` (files ``shakespeare_{train,test}.h5``), plus
      sequence_length: characters per example.

    Returns:
      ``train`` and ``test``: ``x``, ``y`` int32 ``[n, sequence_length]``, pad 0.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be a positive integer, got {sequence_length}")
    train_path, test_path = split_files("shakespeare", data_dir, train_file, test_file, download)
    feature = Feature("snippets", (), "OS")

    def windows(split: H5Clients) -> tuple[np.ndarray, np.ndarray]:
        clients: list[list[str]] = [[] for _ in split.clients]
        file = open_h5(split.path)
        try:
            group = file[EXAMPLES_GROUP]
            for index, client in enumerate(split.clients):
                if split.present[index]:
                    snippets = read_feature(split.path, group, client, feature,
                                            int(split.sizes[index]))
                    clients[index] = [s.decode("utf-8", "replace") for s in snippets]
        finally:
            file.close()
        try:
            return char_windows(clients, sequence_length)
        except ValueError as error:
            raise DataError(f"{split.path}: {error}") from None

    def build(allocate):
        train = train_clients(train_path, feature)
        test, extra = test_clients(test_path, train.clients, feature)
        parts = {}
        for name, split in (("train", train), ("test", test)):
            tokens, counts = windows(split)
            x = allocate(name, "x", (tokens.shape[0], sequence_length), np.int32)
            y = allocate(name, "y", (tokens.shape[0], sequence_length), np.int32)
            x[:], y[:] = tokens[:, :-1], tokens[:, 1:]
            parts[name] = FederatedData({"x": x, "y": y}, offsets(counts),
                                        np.asarray(train.clients))
        info = {**char_info(sequence_length), "test_only_clients": extra,
                "source_files": [str(train_path), str(test_path)]}
        return FederatedDataset("tff_shakespeare", parts["train"], parts["test"], None, info)

    return cached_load("tff_shakespeare", {"sequence_length": sequence_length},
                       [train_path, test_path], cache, cache_dir, build)
