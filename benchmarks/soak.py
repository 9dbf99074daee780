"""Soak test: 10,000 rounds through the host loop, watching resident memory for leaks.

Workload: logistic regression on Fashion-MNIST split over 100 Dirichlet(0.5) clients, 10
clients per round, 1 local epoch of batch 20, client SGD lr 0.05, server SGD lr 1 (FedAvg), run
by `fedjax_sim.simulation.loop.run` exactly as ``fedjax-sim run`` would, with metrics fetched
every 100 rounds, evaluation and a checkpoint every 2,500 rounds, no progress bar, in a
temporary workdir.

A callback (the loop's ``callback(row, state)`` hook, called at every metrics fetch) records at
every 500th round: the resident set size (``/proc/self/statm``, else psutil), the wall time, the
length of the loop's ``history`` list and the bytes its row dicts hold, the number of live JAX
arrays and of objects the garbage collector tracks. Reported: RSS at each mark, its growth after
warm-up (the mark at round 1,000 to the end; target < 5%), how much of that growth the history
list explains (it grows by one small dict per round by design: O(rounds)), and rounds per second.

Usage::

  python benchmarks/soak.py [--rounds 10000] [--data-dir DIR] [--out PATH]
      [--eval-every 2500] [--checkpoint-every 2500] [--tracemalloc]

Writes ``benchmarks/results/soak-<YYYY-MM-DD>-<machine>.json`` (``--out`` overrides).
``--tracemalloc`` also lists the Python allocation sites that grew most after warm-up (slower,
and its own bookkeeping inflates RSS); ``--checkpoint-every 100`` isolates per-save growth.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import pathlib
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax

from fedjax_sim.simulation.loop import run

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402  (a sibling script)

TARGET_GROWTH_PERCENT = 5.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def resident_bytes() -> int:
    """Current resident set size of this process."""
    try:
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * PAGE_BYTES
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def dict_bytes(rows: list[dict]) -> int:
    """Bytes held by a list of flat dicts of str -> float/int (shared key strings not counted)."""
    return sys.getsizeof(rows) + sum(
        sys.getsizeof(row) + sum(sys.getsizeof(value) for value in row.values()) for row in rows
    )


def soak_config(
    rounds: int, data_dir: str | None, eval_every: int = 2500, checkpoint_every: int = 2500
) -> dict[str, Any]:
    dataset = {"name": "fashion_mnist", "partition": "dirichlet", "alpha": 0.5,
               "num_clients": 100}
    if data_dir:
        dataset["data_dir"] = data_dir
    return {
        "name": "soak_fashion_mnist_logistic",
        "seed": 0,
        "rounds": rounds,
        "dataset": dataset,
        "model": {"name": "logistic"},
        "client": {"optimizer": {"name": "sgd", "learning_rate": 0.05}, "batch_size": 20,
                   "local_epochs": 1, "local_steps": None},
        "server": {"optimizer": {"name": "sgd", "learning_rate": 1.0}},
        "cohort": {"size": 10},
        "eval": {"every": eval_every, "batch_size": 1000},
        "log": {"every": 100, "progress": False, "plot": False},
        "checkpoint": {"every": checkpoint_every},
    }


class MemoryProbe:
    """The loop callback: a memory sample at every ``every``-th round; never stops the run."""

    def __init__(self, every: int):
        self.every = every
        self.marks: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def __call__(self, row: dict, state) -> None:
        round_index = int(row["round"])
        if round_index % self.every:
            return None
        gc.collect()  # count what is reachable, not what is waiting for a collection
        self.marks.append({
            "round": round_index,
            "seconds": round(time.perf_counter() - self.start, 3),
            "rss_mib": round(resident_bytes() / MIB, 2),
            "live_jax_arrays": len(jax.live_arrays()),
            "gc_objects": len(gc.get_objects()),
            "train_loss": round(row["train/loss"], 4),
        })
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"),
                        help="root holding fashion-mnist/ (default: $FEDJAX_SIM_DATA)")
    parser.add_argument("--mark-every", type=int, default=500,
                        help="rounds between memory samples (a multiple of 100)")
    parser.add_argument("--warmup", type=int, default=1000,
                        help="the mark growth is measured from")
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--checkpoint-every", type=int, default=2500)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also diff Python allocations between warm-up and the end")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: results/...)")
    args = parser.parse_args()
    if args.mark_every % 100 or args.warmup % args.mark_every or args.warmup >= args.rounds:
        parser.error("--mark-every must be a multiple of 100, --warmup a multiple of it and "
                     "below --rounds")

    if args.tracemalloc:
        tracemalloc.start(5)
    rss_before = resident_bytes()
    probe = MemoryProbe(args.mark_every)
    snapshots = {}

    def snapshot(row, state):  # inside the run, so both see the same live objects
        if args.tracemalloc and int(row["round"]) in (args.warmup, args.rounds):
            snapshots[int(row["round"])] = tracemalloc.take_snapshot()

    with tempfile.TemporaryDirectory(prefix="fedjax-soak-") as workdir:
        config = soak_config(args.rounds, args.data_dir, args.eval_every, args.checkpoint_every)
        result = run(config, workdir=workdir, callbacks=[probe, snapshot])
        checkpoints = sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())
        metrics_bytes = (pathlib.Path(workdir) / "metrics.jsonl").stat().st_size
    top_growth = []
    if args.tracemalloc:
        end, warmup = snapshots[args.rounds], snapshots[args.warmup]
        for stat in end.compare_to(warmup, "traceback")[:10]:
            top_growth.append({"kib": round(stat.size_diff / 1024, 1), "count": stat.count_diff,
                               "where": [str(frame) for frame in stat.traceback][-3:]})
        tracemalloc.stop()

    marks = probe.marks
    warm = next(m for m in marks if m["round"] == args.warmup)
    last = marks[-1]
    growth_mib = last["rss_mib"] - warm["rss_mib"]
    growth_percent = 100.0 * growth_mib / warm["rss_mib"]
    # The first evaluation and checkpoint start up once (evaluator compile, orbax/tensorstore):
    # growth measured from the mark after them shows what keeps growing.
    settled_round = max(args.eval_every, args.checkpoint_every) + args.mark_every
    settled = next((m for m in marks if m["round"] >= settled_round and m is not last), None)
    history = result.history
    per_row = dict_bytes(history) / len(history)
    history_growth_mib = per_row * (last["round"] - warm["round"]) / MIB
    steady = (last["round"] - warm["round"]) / (last["seconds"] - warm["seconds"])
    report = {
        "benchmark": "soak",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "rounds": args.rounds,
            "workload": "FedAvg, logistic regression, Fashion-MNIST over 100 Dirichlet(0.5) "
            "clients, 10 per round, 1 local epoch of batch 20, client SGD lr 0.05, server SGD "
            "lr 1",
            "log_every": 100, "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every,
            "mark_every": args.mark_every, "warmup_round": args.warmup,
            "rss": "/proc/self/statm resident pages x page size, after gc.collect()",
            "tracemalloc": args.tracemalloc,
        },
        "rss_before_run_mib": round(rss_before / MIB, 2),
        "marks": marks,
        "rss_growth_after_warmup": {
            "from_round": warm["round"], "to_round": last["round"],
            "mib": round(growth_mib, 2), "percent": round(growth_percent, 2),
            "target_percent": TARGET_GROWTH_PERCENT,
            "met": growth_percent < TARGET_GROWTH_PERCENT,
        },
        "rss_growth_after_first_eval_and_checkpoint": None if settled is None else {
            "from_round": settled["round"], "to_round": last["round"],
            "mib": round(last["rss_mib"] - settled["rss_mib"], 2),
            "percent": round(100.0 * (last["rss_mib"] - settled["rss_mib"]) / settled["rss_mib"],
                             2),
            "history_rows_explain_mib": round(
                per_row * (last["round"] - settled["round"]) / MIB, 3),
        },
        "history": {
            "rows": len(history),
            "bytes_per_row": round(per_row, 1),
            "total_mib": round(dict_bytes(history) / MIB, 3),
            "expected_growth_after_warmup_mib": round(history_growth_mib, 3),
            "note": "the loop keeps one dict per round in memory (history, returned by run): "
            "O(rounds) by design",
        },
        "rounds_per_second": {
            "after_warmup": round(steady, 1),
            "loop_summary": result.summary["rounds_per_second"],
            "first_round_seconds": result.summary["first_round_seconds"],
            "train_seconds": result.summary["train_seconds"],
        },
        "final": result.summary["final"],
        "checkpoints_kept": checkpoints,
        "metrics_jsonl_bytes": metrics_bytes,
        "python_allocation_growth_top10": top_growth,
    }
    print(f"{'round':>7} {'RSS MiB':>9} {'s':>8} {'jax arrays':>10} {'gc objects':>10}")
    for mark in marks:
        print(f"{mark['round']:>7} {mark['rss_mib']:>9.1f} {mark['seconds']:>8.1f} "
              f"{mark['live_jax_arrays']:>10} {mark['gc_objects']:>10}")
    print(f"RSS growth round {warm['round']} -> {last['round']}: {growth_mib:+.1f} MiB "
          f"({growth_percent:+.2f}%, target < {TARGET_GROWTH_PERCENT}%); history rows explain "
          f"{history_growth_mib:.2f} MiB ({per_row:.0f} B/row); {steady:.0f} rounds/s after "
          f"warm-up; final test accuracy {result.summary['final'].get('test/accuracy', 0):.4f}")
    print(f"wrote {write_report(report, args.out, prefix='soak-')}")


if __name__ == "__main__":
    main()
