"""Data at StackOverflow's scale: h5 conversion, cache open, cohort gather, peak memory.

1. Writes a synthetic file with StackOverflow's shape in TFF's h5 layout
   (``examples/<client>/{tokens,title,tags}`` variable-length byte strings): 342,477 clients
   whose sizes are drawn from a log-normal distribution with median 20 (sigma 1, capped at
   5,000: heavy-tailed, mean ~33), sentences of Zipf-distributed words over a 12,000-word
   list of which the ``stackoverflow.word_count`` file written beside it lists 10,000.
2. ``h5_read``: reads every client's ``tokens`` and nothing else (the floor for conversion).
3. ``convert``: ``load_tff_stackoverflow(task="word")`` converts train + a small test file into
   the flat memory-mapped cache (vectorized tokenization, outputs written straight to
   ``.npy``); reports wall time, the h5-read share and peak resident memory vs. the flat
   arrays' bytes.
4. ``open_gather``: in a fresh process, `open_cache` (median of 5 opens; goal < 1 s), then
   gathers the examples of C = 1,000 uniformly drawn clients into one contiguous batch per
   feature (what the host-side data path does before a transfer; goal < 50 ms; first gather
   and median of 20 fresh cohorts), and peak resident memory.
5. A 1,000,000-client cache with the same client-size distribution, written directly as flat
   arrays (`CacheWriter`), through the same open and gather: their cost must not grow with the
   number of clients.

Each phase runs in its own child process so its peak RSS (``resource.getrusage``) is its own.
Files go to a temporary folder under /tmp (deleted at the end unless ``--keep``); the
StackOverflow-shaped files are deleted before the 1M-client cache is written (peak disk
~6 GB at full size).

Usage::

  python benchmarks/data_scale.py            # full size (several minutes)
  python benchmarks/data_scale.py --small    # 10,000 / 30,000 clients, under a minute

Writes ``benchmarks/results/data_scale-<date>-<machine>.json`` (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

PHASE_PREFIX = "PHASE_JSON "
FULL = {"clients": 342_477, "million_clients": 1_000_000, "test_clients": 20_000}
SMALL = {"clients": 10_000, "million_clients": 30_000, "test_clients": 1_000}
COHORT = 1_000
VOCAB_WORDS, LIST_WORDS = 10_000, 12_000
SEQUENCE = 20
GOALS = {"open_s": 1.0, "gather_s": 0.050}


def client_sizes(count: int, seed: int) -> np.ndarray:
    """Heavy-tailed examples per client: ceil(log-normal(median 20, sigma 1)), in [1, 5000]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.ceil(rng.lognormal(np.log(20.0), 1.0, count)), 1, 5000).astype(np.int64)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def memory_status() -> dict[str, int]:
    """Resident bytes split as the kernel counts them (Linux ``/proc/self/status``).

    ``RssAnon`` is the process's private memory; ``RssFile`` counts page-cache pages mapped
    into it, e.g. touched pages of a memory-mapped ``.npy``: shared and reclaimable, and on
    kernels with large page-cache folios a single touched row maps a whole folio (up to MBs).
    """
    try:
        text = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class MemoryMonitor:
    """Polls `memory_status` every 20 ms in a thread: the peak private (anon) memory."""

    def __init__(self):
        import threading

        self.peak_anon = memory_status().get("RssAnon", 0)
        self.peak_file = memory_status().get("RssFile", 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            status = memory_status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_anon_bytes": self.peak_anon, "peak_rss_file_bytes": self.peak_file}


def folder_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- phases (each in a child process) ------------------------------------------------------


def phase_write(workdir: pathlib.Path, clients: int, test_clients: int) -> dict[str, Any]:
    """The synthetic StackOverflow-shaped train/test h5 files and the word-count file."""
    import h5py

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(LIST_WORDS)])
    (workdir / "stackoverflow.word_count").write_text(
        "".join(f"{w} {10**7 - i}\n" for i, w in enumerate(words[:VOCAB_WORDS])))

    def sentences(count: int, mean_words: float) -> np.ndarray:
        lengths = 1 + rng.poisson(mean_words - 1, count)
        ids = np.minimum(rng.zipf(1.2, lengths.sum()) - 1, LIST_WORDS - 1)
        pieces = np.split(words[ids], np.cumsum(lengths)[:-1])
        return np.array([" ".join(p).encode() for p in pieces], dtype=object)

    tokens, titles = sentences(50_000, 14), sentences(20_000, 8)
    tag_names = [f"tag{i}" for i in range(1_000)]
    tags = np.array(["|".join(rng.choice(tag_names, rng.integers(1, 6), replace=False))
                     .encode() for _ in range(10_000)], dtype=object)
    text = h5py.string_dtype(encoding="ascii")
    out: dict[str, Any] = {}
    for split, count, scale in (("train", clients, 1.0), ("test", test_clients, 0.25)):
        sizes = np.maximum(1, (client_sizes(count, seed=1) * scale).astype(np.int64))
        start = time.perf_counter()
        path = workdir / f"stackoverflow_{split}.h5"
        with h5py.File(path, "w") as file:
            group = file.create_group("examples")
            for index, n in enumerate(sizes.tolist()):
                entry = group.create_group(f"{index:08d}")
                for name, pool in (("tokens", tokens), ("title", titles), ("tags", tags)):
                    entry.create_dataset(name, data=pool[rng.integers(0, pool.size, n)],
                                         dtype=text)
        out[split] = {"clients": count, "examples": int(sizes.sum()),
                      "median_client": float(np.median(sizes)),
                      "mean_client": float(sizes.mean()), "max_client": int(sizes.max()),
                      "h5_bytes": path.stat().st_size,
                      "write_s": round(time.perf_counter() - start, 2)}
    return out


def phase_h5_read(workdir: pathlib.Path) -> dict[str, Any]:
    """Reads every train client's ``tokens`` the way the converter does, and nothing else."""
    import h5py

    start = time.perf_counter()
    examples = 0
    with h5py.File(workdir / "stackoverflow_train.h5", "r") as file:
        group = file["examples"]
        for client in sorted(group.keys()):
            examples += len(group[f"{client}/tokens"][()])
    return {"read_s": round(time.perf_counter() - start, 2), "examples": examples}


def phase_convert(workdir: pathlib.Path) -> dict[str, Any]:
    from fedjax_sim.datasets.tff_h5 import load_tff_stackoverflow

    baseline = rss_bytes()  # the interpreter, numpy, h5py, jax: not the conversion's
    baseline_anon = memory_status().get("RssAnon")
    monitor = MemoryMonitor()
    start = time.perf_counter()
    dataset = load_tff_stackoverflow(
        task="word", train_file=workdir / "stackoverflow_train.h5",
        test_file=workdir / "stackoverflow_test.h5",
        word_count_file=workdir / "stackoverflow.word_count", cache_dir=workdir / "cache")
    seconds = time.perf_counter() - start
    path = pathlib.Path(dataset.info["cache"])
    flat = sum(a.nbytes for split in (dataset.train, dataset.test)
               for a in split.arrays.values())
    return {"convert_s": round(seconds, 2), "cache": str(path),
            "train_examples": dataset.train.num_examples,
            "test_examples": dataset.test.num_examples, "flat_array_bytes": int(flat),
            "cache_bytes": folder_bytes(path), "baseline_rss_bytes": baseline,
            "baseline_rss_anon_bytes": baseline_anon, "peak_rss_bytes": peak_rss_bytes(),
            **monitor.stop()}


def gather(data, clients: np.ndarray) -> dict[str, np.ndarray]:
    """The cohort's examples as one contiguous array per feature (rows client by client)."""
    sizes = data.offsets[clients + 1] - data.offsets[clients]
    starts = data.offsets[clients]
    rows = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    return {name: np.ascontiguousarray(array[rows]) for name, array in data.arrays.items()}


def phase_open_gather(path: pathlib.Path) -> dict[str, Any]:
    from fedjax_sim.datasets.cache import open_cache

    baseline = rss_bytes()
    baseline_anon = memory_status().get("RssAnon")
    monitor = MemoryMonitor()
    opens = []
    for _ in range(5):
        start = time.perf_counter()
        dataset = open_cache(path)
        opens.append(time.perf_counter() - start)
    train = dataset.train
    rng = np.random.default_rng(0)
    times, rows = [], []
    for _ in range(21):
        clients = np.sort(rng.choice(train.num_clients, COHORT, replace=False))
        start = time.perf_counter()
        batch = gather(train, clients)
        times.append(time.perf_counter() - start)
        rows.append(len(batch["x"]))
        assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in batch.values())
    return {
        "clients": train.num_clients, "examples": train.num_examples,
        "open_s_first": round(opens[0], 4), "open_s_median": round(float(np.median(opens)), 4),
        "gather_s_first": round(times[0], 4),
        "gather_s_median": round(float(np.median(times[1:])), 4),
        "gather_s_max": round(float(np.max(times[1:])), 4),
        "cohort": COHORT, "cohort_examples_median": int(np.median(rows)),
        "cohort_bytes_median": int(np.median(rows)) * sum(
            a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in train.arrays.values()),
        "baseline_rss_bytes": baseline, "baseline_rss_anon_bytes": baseline_anon,
        "peak_rss_bytes": peak_rss_bytes(), **monitor.stop(), "end": memory_status(),
    }


def phase_million(workdir: pathlib.Path, clients: int) -> dict[str, Any]:
    """A cache of ``clients`` clients written directly as flat arrays, chunk by chunk."""
    from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
    from fedjax_sim.datasets.cache import CacheWriter

    start = time.perf_counter()
    sizes = client_sizes(clients, seed=2)
    total = int(sizes.sum())
    writer = CacheWriter(workdir / "million", source={"synthetic": clients})
    x = writer.allocate("train", "x", (total, SEQUENCE), np.int32)
    y = writer.allocate("train", "y", (total, SEQUENCE), np.int32)
    rng = np.random.default_rng(3)
    chunk = 1 << 20
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk)
        tokens = rng.integers(1, VOCAB_WORDS + 4, (hi - lo, SEQUENCE + 1), dtype=np.int32)
        x[lo:hi], y[lo:hi] = tokens[:, :-1], tokens[:, 1:]
        x.flush()
        y.flush()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    data = FederatedData({"x": x, "y": y}, offsets, np.arange(clients))
    path = writer.finish(FederatedDataset(
        "synthetic_million", data, info={"num_classes": VOCAB_WORDS + 4,
                                         "input_shape": (SEQUENCE,), "pad_label": 0}))
    return {"write_s": round(time.perf_counter() - start, 2), "cache": str(path),
            "clients": clients, "examples": total, "cache_bytes": folder_bytes(path)}


PHASES = {"write": phase_write, "h5_read": phase_h5_read, "convert": phase_convert,
          "open_gather": phase_open_gather, "million": phase_million}


def run_phase(name: str, *args: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--phase", name, *args]
    print(f"[data_scale] {name} ...", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"phase {name} failed with exit code {result.returncode}")
    line = next(li for li in result.stdout.splitlines() if li.startswith(PHASE_PREFIX))
    report = json.loads(line[len(PHASE_PREFIX):])
    print(f"[data_scale] {name}: {json.dumps(report)} ({time.perf_counter() - start:.1f} s)",
          flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="10k / 30k clients (< 1 minute)")
    parser.add_argument("--workdir", help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=pathlib.Path, help="JSON report path")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("phase_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        values = args.phase_args
        if args.phase == "write":
            report = phase_write(pathlib.Path(values[0]), int(values[1]), int(values[2]))
        elif args.phase == "million":
            report = phase_million(pathlib.Path(values[0]), int(values[1]))
        else:
            report = PHASES[args.phase](pathlib.Path(values[0]))
        print(PHASE_PREFIX + json.dumps(report), flush=True)
        return

    sizes = SMALL if args.small else FULL
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="data_scale-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        written = run_phase("write", str(workdir), str(sizes["clients"]),
                            str(sizes["test_clients"]))
        read = run_phase("h5_read", str(workdir))
        converted = run_phase("convert", str(workdir))
        opened = run_phase("open_gather", converted["cache"])
        for name in ("stackoverflow_train.h5", "stackoverflow_test.h5"):
            (workdir / name).unlink()
        shutil.rmtree(converted["cache"])
        million = run_phase("million", str(workdir), str(sizes["million_clients"]))
        million_opened = run_phase("open_gather", million["cache"])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from round_throughput import machine_info, matmul_peak, write_report

    flat = converted["flat_array_bytes"]
    report = {
        "benchmark": "data_scale",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/data_scale.py" + (" --small" if args.small else ""),
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "load_average_1min": os.getloadavg()[0],
        "synthetic_stackoverflow": {
            "files": written,
            "h5_read_tokens_only_s": read["read_s"],
            "convert": converted,
            "convert_over_h5_read": round(converted["convert_s"] / max(read["read_s"], 1e-9),
                                          2),
            "convert_peak_rss_above_baseline_over_flat_arrays": round(
                (converted["peak_rss_bytes"] - (converted["baseline_rss_bytes"] or 0)) / flat, 2),
            "open_gather": opened,
            "note": "RSS counts touched pages of the memory-mapped cache (RssFile: page cache, "
                    "shared and reclaimable; with large page-cache folios one touched row maps "
                    "up to MBs); private memory is RssAnon",
        },
        "million_clients": {"write": million, "open_gather": million_opened},
        "goals": {
            "open_under_1s": opened["open_s_median"] < GOALS["open_s"]
            and million_opened["open_s_median"] < GOALS["open_s"],
            "gather_under_50ms": opened["gather_s_median"] < GOALS["gather_s"]
            and million_opened["gather_s_median"] < GOALS["gather_s"],
            "convert_peak_rss_above_baseline_at_most_1.3x_flat_arrays":
                converted["peak_rss_bytes"] - (converted["baseline_rss_bytes"] or 0)
                <= 1.3 * flat,
        },
    }
    path = write_report(report, args.out, "data_scale-small-" if args.small else "data_scale-")
    print(json.dumps(report["goals"]), f"-> {path}")


if __name__ == "__main__":
    main()
