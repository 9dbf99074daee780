"""``fedjax-sim data stats|convert`` and `fedjax_sim.data.stats`, on small TFF-layout files.

Also runs ``configs/emnist_cnn_fedavg.yaml`` for 2 rounds on a small h5 file in TFF's layout.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedjax_sim.cli import main
from fedjax_sim.data import stats
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.datasets.cache import open_cache

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "emnist_cnn_fedavg.yaml")


@pytest.fixture(scope="module")
def emnist_h5(tmp_path_factory):
    """12 writers in TFF's digits-only layout; returns (train, test) paths and the arrays."""
    folder = tmp_path_factory.mktemp("tff")
    rng = np.random.default_rng(0)
    sizes = {f"f{i:04d}_{i % 7:02d}": int(n) for i, n in enumerate(rng.integers(2, 9, 12))}
    written = {}
    for split, scale in (("train", 1), ("test", 0.5)):
        path = folder / f"fed_emnist_digitsonly_{split}.h5"
        labels = {}
        with h5py.File(path, "w") as file:
            group = file.create_group("examples")
            for client, n in sizes.items():
                n = max(1, int(n * scale))
                label = rng.integers(0, 10, n).astype(np.int32)
                entry = group.create_group(client)
                entry.create_dataset("label", data=label)
                # Digits as TFF stores them: background 1.0, strokes darker, class-dependent.
                pixels = np.ones((n, 28, 28), np.float32)
                for k, c in enumerate(label):
                    pixels[k, 4 + 2 * c:8 + 2 * c, 6:22] = 0.0
                entry.create_dataset("pixels", data=pixels)
                labels[client] = label
        written[split] = (path, labels)
    return written


def data_args(emnist_h5, *extra):
    return [f"dataset.train_file={emnist_h5['train'][0]}",
            f"dataset.test_file={emnist_h5['test'][0]}", *extra]


def test_data_stats_prints_sizes_and_classes_and_writes_plots(emnist_h5, tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["data", "stats", CONFIG, *data_args(emnist_h5, "dataset.cache=false"),
                 "--out", str(out), "--sample", "5"]) == 0
    printed = capsys.readouterr().out
    labels = emnist_h5["train"][1]
    sizes = np.array([len(labels[c]) for c in sorted(labels)])
    assert "dataset tff_emnist: 12 clients" in printed
    assert (f"train: {sizes.sum()} examples; per client min {sizes.min()} / median "
            f"{np.median(sizes):g} / mean {sizes.mean():.1f} / max {sizes.max()}") in printed
    seen = len(np.unique(np.concatenate(list(labels.values()))))
    assert f"classes: 10 ({seen} occur in the train labels)" in printed
    for name in ("client_sizes.png", "label_distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 2000


def test_data_convert_builds_a_cache_the_loader_then_opens(emnist_h5, tmp_path, capsys):
    out = tmp_path / "caches"
    assert main(["data", "convert", CONFIG, *data_args(emnist_h5), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    folders = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and str(folders[0]) in printed
    dataset = open_cache(folders[0])
    labels = emnist_h5["train"][1]
    np.testing.assert_array_equal(dataset.train.arrays["y"],
                                  np.concatenate([labels[c] for c in sorted(labels)]))
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["source"]["loader"] == "tff_emnist"


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "stats", CONFIG, "dataset.only_digts=true"],
         "did you mean 'dataset.only_digits'"),
        (["data", "convert", CONFIG, "dataset.data_dir=/nonexistent/data"],
         "fed_emnist_digitsonly_train.h5' not found"),
        (["data", "stats", CONFIG, "dataset.train_file=/nonexistent.h5"], "/nonexistent.h5 not"),
        (["data", "convert"], "the following arguments are required: config"),
        (["data", "summary", CONFIG], "invalid choice: 'summary'"),
        (["data", "stats", CONFIG, "--sample", "-3"], "--sample: expected an integer >= 1, got -3"),
        (["data", "stats", CONFIG, "--sample", "0"], "--sample: expected an integer >= 1, got 0"),
    ],
)
def test_bad_data_commands_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no plots folder either


@pytest.mark.slow  # ~50 s on a loaded 2-core CPU: compiling the CNN's 5-epoch local scan
def test_emnist_config_runs_two_rounds_on_a_tff_layout_file(emnist_h5, tmp_path):
    workdir = tmp_path / "run"
    args = ["run", CONFIG, *data_args(emnist_h5, f"dataset.cache_dir={tmp_path / 'cache'}"),
            "rounds=2", "eval.every=2", "log.every=1", "log.progress=false",
            "--workdir", str(workdir)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    summary = json.loads((workdir / "summary.json").read_text())
    assert np.isfinite(summary["final"]["train/loss"])
    assert 0.0 <= summary["final"]["test/accuracy"] <= 1.0


# --- stats functions against plain loops ---------------------------------------------------


def loop_counts(y, offsets, clients, num_classes, pad):
    counts = np.zeros((len(clients), num_classes), np.int64)
    for row, c in enumerate(clients):
        for example in y[offsets[c]:offsets[c + 1]]:
            for label in np.atleast_1d(example):
                if 0 <= label < num_classes and label != pad:
                    counts[row, label] += 1
    return counts


@pytest.mark.parametrize("shape, low, pad", [((), 0, None), ((6,), 0, 0), ((5,), -1, -1)])
def test_label_counts_match_a_loop(shape, low, pad):
    rng = np.random.default_rng(4)
    sizes = np.array([4, 0, 7, 1, 9])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    y = rng.integers(low, 8, (sizes.sum(), *shape)).astype(np.int32)
    data = FederatedData({"x": np.zeros(sizes.sum()), "y": y}, offsets, np.arange(5))
    clients = np.array([4, 0, 1, 2])
    np.testing.assert_array_equal(stats.client_label_counts(data, clients, 8, pad),
                                  loop_counts(y, offsets, clients, 8, pad))
    np.testing.assert_array_equal(stats.class_counts(y, 8, pad),
                                  loop_counts(y, offsets, [0, 1, 2, 3, 4], 8, pad).sum(0))


def test_size_summary_and_sampling():
    sizes = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    assert stats.size_summary(sizes) == {"clients": 8, "examples": 31, "min": 1, "median": 3.5,
                                         "mean": 31 / 8, "max": 9}
    sample = stats.sample_clients(100, 10, seed=1)
    assert sample.tolist() == sorted(set(sample.tolist())) and len(sample) == 10
    assert sample.tolist() == stats.sample_clients(100, 10, seed=1).tolist()
    assert stats.sample_clients(3, 10).tolist() == [0, 1, 2]
