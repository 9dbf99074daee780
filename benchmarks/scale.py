"""Scale: large cohorts, chunked client maps, data split over devices, and 2 processes vs 1.

Real data: Fashion-MNIST's 60,000 training images split IID over 6,000 clients (10 each), the
MLP (2 x 200, 199,210 parameters), FedAvg, one local step of batch 10 per client. Every arm runs
in a fresh process (``fedjax-sim run``; peak RSS is per process), 6 rounds, and reports the
median seconds per round after the first (from its ``metrics.jsonl`` wall times), the
process's peak resident memory (set-up included: the initial state is built whole in every
process before it is placed) and the largest resident memory at the logged rounds after the
first (what training holds).

Arms:

* cohorts of 100, 1,000 and 5,000 clients, ``client_execution`` ``vmap`` (every client at once)
  vs ``map`` with ``client_batch_size`` 100 (chunks of 100 clients in a ``lax.map``);
* a cohort of 1,000 on 2 devices of one process with ``data_placement`` ``device`` (each
  device holds all the data) vs ``sharded`` (each holds its half of the clients);
* 1 process vs 2 processes (``fedjax-sim launch -n 2``, one CPU device each; the cohort split
  over them, the aggregate an all-reduce through gloo), cohort 1,000. On one machine the two
  processes share its cores; the peak RSS is process 0's.
* SCAFFOLD with a control variate per client on 60,000 clients (one image each, the logistic
  model: a 1.9 GB store), cohort 1,000: 1 process, 2 processes with the store replicated, and 2
  processes with it split between them (``execution.client_state: sharded``), and 1 process
  with the store on the host (``execution.client_state: host``: memory-mapped files, the
  cohort's rows read and written each round).
* SCAFFOLD on a StackOverflow-sized population: 342,477 clients (StackOverflow's training
  writers), each holding one real Fashion-MNIST training image (image i mod 60,000: the images
  repeat, the client count and the per-client state are StackOverflow's scale), written as an
  ``.npz`` for the ``arrays`` loader; the logistic model's control variates would be a 10.75 GB
  store (not run on the device: it does not fit beside the data in this machine's memory);
  with ``execution.client_state: host`` it is a sparse file of which only the rows of the
  clients that trained take disk and memory (reported: ``store_disk_mib``).

Usage::

  FEDJAX_SIM_DATA=../shared/data python benchmarks/scale.py [--rounds 6] [--out PATH]

Writes ``benchmarks/results/scale-<YYYY-MM-DD>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax

from fedjax_sim.simulation.distributed import initialize
from fedjax_sim.simulation.loop import run

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402  (a sibling)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion_mnist_fedavg.yaml"
BASE = ["dataset.partition=iid", "dataset.num_clients=6000", "client.batch_size=10",
        "client.local_steps=1", "log.every=1", "log.progress=false", "log.plot=false",
        "eval.every=1000", "eval.max_examples=1000"]


def _arms() -> list[dict]:
    arms = []
    for cohort in (100, 1000, 5000):
        arms.append({"name": f"cohort{cohort}-vmap", "cohort": cohort, "processes": 1,
                     "overrides": ["execution.client_execution=vmap"]})
        arms.append({"name": f"cohort{cohort}-map-chunks100", "cohort": cohort, "processes": 1,
                     "overrides": ["execution.client_execution=map",
                                   "execution.client_batch_size=100"]})
    for placement in ("device", "sharded"):
        arms.append({"name": f"cohort1000-2devices-{placement}", "cohort": 1000,
                     "processes": 1, "devices": 2,
                     "overrides": ["execution.num_devices=2", "execution.client_execution=map",
                                   "execution.client_batch_size=100",
                                   f"execution.data_placement={placement}"]})
    for processes in (1, 2):
        arms.append({"name": f"cohort1000-{processes}process", "cohort": 1000,
                     "processes": processes,
                     "overrides": ["execution.client_execution=map",
                                   "execution.client_batch_size=100"]})
    # SCAFFOLD with one control variate per client: 60,000 clients (one image each), the
    # logistic model (7,850 parameters): a 1.9 GB store, replicated or split over 2 processes.
    scaffold = ["algorithm.name=scaffold", "model.name=logistic", "dataset.num_clients=60000",
                "client.batch_size=1", "client.weighting=uniform",
                "execution.client_execution=map", "execution.client_batch_size=100"]
    for processes, state in ((1, "replicated"), (2, "replicated"), (2, "sharded"), (1, "host")):
        arms.append({"name": f"scaffold-60000clients-{processes}process-{state}",
                     "cohort": 1000, "processes": processes,
                     "overrides": [*scaffold, f"execution.client_state={state}"]})
    arms.append({"name": f"scaffold-{STACKOVERFLOW_CLIENTS}clients-1process-host",
                 "cohort": 1000, "processes": 1, "stackoverflow_sized": True,
                 "overrides": [*scaffold, "execution.client_state=host", "dataset.name=arrays",
                               "dataset.partition=natural", "dataset.num_clients=10"]})
    return arms


STACKOVERFLOW_CLIENTS = 342_477  # TFF's StackOverflow training split


def _stackoverflow_sized_npz(path: pathlib.Path) -> pathlib.Path:
    """342,477 clients, client i holding Fashion-MNIST training image i mod 60,000 (real
    images, StackOverflow's client count); the real test set as ``x_test``/``y_test``."""
    from fedjax_sim.datasets.fashion_mnist import load_fashion_mnist_arrays

    if not path.exists():
        train, test = load_fashion_mnist_arrays()
        index = np.arange(STACKOVERFLOW_CLIENTS) % len(train["y"])
        np.savez(path, x=train["x"][index], y=train["y"][index],
                 client_id=np.arange(STACKOVERFLOW_CLIENTS), x_test=test["x"],
                 y_test=test["y"])
        os.sync()  # its 1 GB written back now, not during the arm's first rounds
    return path


def _disk_mib(folder: pathlib.Path) -> float | None:
    """Disk blocks actually used by the files under ``folder`` (sparse files count only what
    was written), MiB."""
    if not folder.exists():
        return None
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file()) / 2**20


def _run_arm(arm: dict, rounds: int, workdir: pathlib.Path) -> dict:
    overrides = [*BASE, f"rounds={rounds}", f"cohort.size={arm['cohort']}", *arm["overrides"]]
    if arm.get("stackoverflow_sized"):
        npz = _stackoverflow_sized_npz(workdir.parent / "stackoverflow_sized.npz")
        overrides.append(f"dataset.path={npz}")
    command = ["run", str(CONFIG), *overrides, "--workdir", str(workdir)]
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={arm.get('devices', 1)}"
    env["FEDJAX_SIM_SCALE_RSS"] = str(workdir / "rss.json")
    argv = [sys.executable, __file__, "--worker", *command]
    start = time.perf_counter()
    processes = []
    for process_id in range(arm["processes"]):  # as `fedjax-sim launch -n N` starts them
        process_env = env if arm["processes"] == 1 else {
            **env, "FEDJAX_SIM_COORDINATOR": "localhost:12499",
            "FEDJAX_SIM_NUM_PROCESSES": str(arm["processes"]),
            "FEDJAX_SIM_PROCESS_ID": str(process_id)}
        processes.append(subprocess.Popen(argv, env=process_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{arm['name']} failed:\n{out[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:], strict=False)]
    rss = json.loads((workdir / "rss.json").read_text()) if (workdir / "rss.json").exists() \
        else {}
    return {**arm, "rounds": rounds, "seconds_per_round": statistics.median(times),
            "round_times": times, "peak_rss_mib": rss.get("peak"),
            "training_rss_mib": rss.get("training"),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": rows[-1].get("train/loss"),
            "store_disk_mib": _disk_mib(workdir / "client_state")}


def _resident_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(argv: list[str]) -> int:
    """``run CONFIG overrides... --workdir DIR`` in this process (one of several when the
    ``FEDJAX_SIM_*`` variables say so), then the peak RSS and the largest RSS seen at the
    logged rounds after the first (MiB, process 0) written where the parent reads them."""
    _, config, *rest = argv
    workdir = rest[rest.index("--workdir") + 1]
    overrides = rest[:rest.index("--workdir")]
    initialize()
    during = []

    def record(row, state):  # the state of this round is alive: what training holds
        if row["round"] > 1:
            during.append(_resident_mib())

    run(config, overrides=overrides, workdir=workdir, callbacks=[record])
    path = os.environ.get("FEDJAX_SIM_SCALE_RSS")
    if path and jax.process_index() == 0:
        pathlib.Path(path).write_text(json.dumps({
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "training": max(during) if during else None}))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="arm names to run (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    report = {"benchmark": "scale", "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "matmul_peak": matmul_peak(), "config": str(CONFIG),
              "base_overrides": BASE, "arms": []}
    print(f"{report['machine']['cpu']}: matmul peak "
          f"{report['matmul_peak']['median_gflops']:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arm in _arms():
            if args.only and arm["name"] not in args.only:
                continue
            result = _run_arm(arm, args.rounds, pathlib.Path(tmp) / arm["name"])
            report["arms"].append(result)
            print(f"{arm['name']:32s} {result['seconds_per_round']:.3f} s/round  peak RSS "
                  f"{result['peak_rss_mib'] or float('nan'):.0f} MiB, while training "
                  f"{result['training_rss_mib'] or float('nan'):.0f} MiB", flush=True)
            path = write_report(report, args.out, "scale-")
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    main()
