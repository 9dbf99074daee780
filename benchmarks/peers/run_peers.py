"""Peers: the round_throughput workloads run by FedJAX 0.0.17, by the project and by a naive loop.

Workloads (`benchmarks/round_throughput.py`'s: the first 10,000 Fashion-MNIST training images as
100 clients of 100, a uniform cohort of 10 clients a round, 1 local epoch of batch 20 = 5 client
SGD steps at lr 0.1, FedAvg with server SGD at lr 1.0):

* ``emnist-cnn-fedavg``: the EMNIST CNN, 62 outputs (1.2 M parameters);
* ``emnist-logreg-fedavg``: logistic regression, 62 outputs.

Arms, each a fresh child process (so every repetition pays its own first round: building the
round, trace + compile + run; the model's initial parameters are made before the clock starts
in every arm, FedJAX's included), run **interleaved**: repetition r runs every arm of a
workload once in turn, so a change of load on the machine hits them alike:

* ``fedjax``: FedJAX 0.0.17's ``fed_avg`` (`fedjax_workload.py` in ``.venv-fedjax``, made by
  `setup_fedjax_venv.sh`; its own jax 0.5.3);
* ``project map`` (the CPU default: clients in a sequential ``lax.map``), ``project vmap``,
  and for logistic regression ``project vmap, 10 rounds/call`` (``rounds_per_call=10``,
  ``run_rounds``; seconds per round = seconds per call / 10): fedjax_sim's jitted round step;
* ``project map, compilation cache`` (CNN): ``project map`` with JAX's persistent compilation
  cache on, as the ``fedjax-sim`` commands run, in a folder an untimed run of the arm filled
  first: what a user's second run of a config pays for its first round. Every other arm of
  the project compiles from scratch (``FEDJAX_SIM_COMPILATION_CACHE=off``), and so does
  FedJAX (its default);
* ``project ..., a device per core``: the same with the cohort split over one XLA:CPU device
  per core (``execution.num_devices: auto``; each device trains its clients on a thread of its
  own);
* ``project map, oneDNN convolutions`` (CNN): ``project map`` with the model's
  ``conv="onednn"`` (`fedjax_sim.models.onednn`: Intel oneDNN's convolution kernels as XLA:CPU
  custom calls; the arm is left out, and the JSON's ``onednn`` says why, where they cannot run);
* ``naive loop``: round_throughput's naive JAX loop (one jitted SGD step called from a Python
  loop over clients and batches), in the project's jax.

Per arm: the median over repetitions of each repetition's median seconds per round, the first
round (median over repetitions), examples/s, MFU (XLA's FLOPs of one SGD step / B x 1,000
examples a round, over the f32 2048^2 matmul peak measured in this process at the start and
end, the better of the two) and the ratio FedJAX / arm (> 1: the arm is faster than FedJAX).

Usage::

  bash benchmarks/peers/setup_fedjax_venv.sh      # once
  python benchmarks/peers/run_peers.py --data-dir ../shared/data [--repeats 3] [--out PATH]

Writes ``benchmarks/results/peers-<YYYY-MM-DD>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import fedjax_sim  # first: sets the XLA:CPU flags before jax starts

# isort: split

import jax
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
FEDJAX_PYTHON = HERE / ".venv-fedjax" / "bin" / "python"
CHILD_PREFIX = "PEER_JSON "
FEDJAX_PREFIX = "FEDJAX_JSON "


def _load_round_throughput():
    """`benchmarks/round_throughput.py` by path (adding benchmarks/ to sys.path would let its
    compression.py shadow the `compression` package jax imports)."""
    path = HERE.parent / "round_throughput.py"
    spec = importlib.util.spec_from_file_location("round_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["round_throughput"] = module
    spec.loader.exec_module(module)
    return module


rt = _load_round_throughput()

CNN, LOGREG = rt.CNN, rt.LOGREG
FEDJAX_NAME = {CNN: "cnn", LOGREG: "logreg"}
# Arms: name -> (kind, strategy, rounds per call)
ARMS = {
    CNN: {
        "fedjax": ("fedjax", None, 1),
        "project map": ("project", "map", 1),
        "project map, compilation cache": ("project", "map", 1),
        "project vmap": ("project", "vmap", 1),
        "project map, a device per core": ("project", "map", 1),
        "project map, oneDNN convolutions": ("project", "map", 1),
        "naive loop": ("naive", None, 1),
    },
    LOGREG: {
        "fedjax": ("fedjax", None, 1),
        "project map": ("project", "map", 1),
        "project vmap": ("project", "vmap", 1),
        "project vmap, 10 rounds/call": ("project", "vmap", 10),
        "project vmap, a device per core": ("project", "vmap", 1),
        "project vmap, a device per core, 10 rounds/call": ("project", "vmap", 10),
        "naive loop": ("naive", None, 1),
    },
}
PER_CORE = "a device per core"  # arms whose names hold this: execution.num_devices=auto
# (timed rounds, untimed rounds after the first); logistic regression times 100 rounds (10 calls
# of 10 in the rounds-per-call arms): with 30, those arms had 3 samples and their median moved
# 30% between runs.
ROUNDS = {CNN: (8, 1), LOGREG: (100, 20)}
CACHED = "compilation cache"  # arms whose names hold this read a warm persistent cache
ONEDNN = "oneDNN convolutions"  # arms whose names hold this: the model's conv="onednn"


# ----------------------------------------------------------------------------- child mode


def child(args: argparse.Namespace) -> None:
    """Times one arm (``--child WORKLOAD ARM``) in this process; prints one JSON line."""
    name, arm = args.child
    kind, strategy, per_call = ARMS[name][arm]
    if PER_CORE in arm:  # before JAX starts
        from fedjax_sim.sharding import request_cpu_devices, usable_cores

        request_cpu_devices(usable_cores())
    if CACHED in arm:  # what `fedjax-sim run` does; the parent warmed the folder it names
        from fedjax_sim.compilation_cache import enable_compilation_cache

        enable_compilation_cache()
    timed, warmup = ROUNDS[name]
    workload = rt.SPECS[name]
    images, _ = rt.load_fashion_mnist_arrays(args.data_dir)
    train = rt.build_data(workload, images)
    model = rt.build_model(workload, **({"conv": "onednn"} if ONEDNN in arm else {}))
    # The model's initial parameters are made before the clock starts, as fedjax_workload.py
    # makes FedJAX's; the first round includes building the round step (data placement,
    # tracing), its compilation and one round.
    params = jax.block_until_ready(model.init(jax.random.PRNGKey(0)))
    start = time.perf_counter()
    if kind == "naive":
        run_call = rt.naive_variant(workload, model, train, params=params).run_round
    else:
        run_call = project_call(workload, model, train, strategy, per_call, params,
                                per_core=PER_CORE in arm)
    run_call()
    first = time.perf_counter() - start
    for _ in range(max(1, warmup // per_call)):
        run_call()
    times = []
    for _ in range(max(1, timed // per_call)):
        start = time.perf_counter()
        run_call()
        times.append((time.perf_counter() - start) / per_call)
    print(CHILD_PREFIX + json.dumps({
        "first_round_s": first,  # for k rounds per call: the first call (k rounds)
        "times_s": times,
        "median_s": float(np.median(times)),
        "examples_per_round": 1000.0,
        "rounds_per_call": per_call,
    }), flush=True)


def project_call(workload, model, train, strategy: str, k: int, params, per_core: bool = False):
    """One round of the engine's round step (k = 1), or k rounds in one compiled call
    (``run_rounds(state, k)``); blocked on. ``per_core``: the cohort split over one XLA:CPU
    device per core (``execution.num_devices: auto``)."""
    from fedjax_sim.sharding import client_mesh, resolve_num_devices

    devices = resolve_num_devices("auto", workload.cohort_size) if per_core else 1
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(rt.CLIENT_LR), optax.sgd(rt.SERVER_LR))
    schedule = fedjax_sim.ClientSchedule.from_sizes(
        train.client_sizes, workload.batch_size, local_epochs=workload.local_epochs
    )
    sampler = fedjax_sim.uniform_sampler(train.num_clients, workload.cohort_size)
    round_step = fedjax_sim.build_round_step(
        algorithm, train, schedule, sampler, workload.cohort_size,
        client_execution=strategy, rounds_per_call=k,
        mesh=client_mesh(devices) if devices > 1 else None,
        compiler_options=model.compiler_options,  # what `fedjax-sim run` compiles with
    )
    holder = {"state": round_step.place(fedjax_sim.init_simulation_state(
        algorithm.init(params), 0))}

    def run_call() -> None:
        if k == 1:
            holder["state"], _ = round_step(holder["state"])
        else:
            holder["state"], _ = round_step.run_rounds(holder["state"], k)
        jax.block_until_ready(holder["state"])

    return run_call


# ----------------------------------------------------------------------------- parent


def run_arm(name: str, arm: str, data_dir: str, cache_dir: str | None = None) -> dict[str, Any]:
    kind = ARMS[name][arm][0]
    if kind == "fedjax":
        timed, warmup = ROUNDS[name]
        command = [str(FEDJAX_PYTHON), str(HERE / "fedjax_workload.py"), "--workload",
                   FEDJAX_NAME[name], "--data-dir", data_dir, "--rounds", str(timed),
                   "--warmup", str(warmup)]
        prefix = FEDJAX_PREFIX
        # FedJAX runs with stock XLA flags (what its users get), not the project's.
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    else:
        command = [sys.executable, __file__, "--child", name, arm, "--data-dir", data_dir]
        prefix, env = CHILD_PREFIX, dict(os.environ)
        env["FEDJAX_SIM_COMPILATION_CACHE"] = cache_dir if CACHED in arm else "off"
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith(prefix):
            return {**json.loads(line[len(prefix):]), "process_wall_s": wall}
    return {"error": f"rc={done.returncode}: {done.stderr[-1500:]}", "process_wall_s": wall}


def fedjax_status() -> dict[str, Any]:
    if not FEDJAX_PYTHON.exists():
        return {"available": False,
                "why": f"{FEDJAX_PYTHON} missing: run benchmarks/peers/setup_fedjax_venv.sh"}
    done = subprocess.run(
        [str(FEDJAX_PYTHON), "-c", "from importlib.metadata import version as v; import fedjax; "
         "import json; print(json.dumps({p: v(p) for p in ('fedjax', 'jax', 'jaxlib', "
         "'dm-haiku', 'optax', 'numpy')}))"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode:
        return {"available": False, "why": done.stderr[-1500:]}
    return {"available": True, "versions": json.loads(done.stdout.strip().splitlines()[-1]),
            "python": str(FEDJAX_PYTHON)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"),
                        help="root data folder holding fashion-mnist/ (default: $FEDJAX_SIM_DATA)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every arm")
    parser.add_argument("--workloads", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: results/...)")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("--data-dir (or $FEDJAX_SIM_DATA) is required")
    if args.child:
        child(args)
        return

    start = time.perf_counter()
    load_start = os.getloadavg()
    peak_start = rt.matmul_peak()
    print(f"matmul peak: {peak_start['median_gflops']:.1f} GFLOP/s (f32 2048^2)", flush=True)
    fedjax = fedjax_status()
    print(f"fedjax: {fedjax}", flush=True)
    from fedjax_sim.models import onednn  # builds the custom calls once, before any clock

    onednn_status = {"available": onednn.available(), "why_not": onednn.unavailable_reason()}
    print(f"oneDNN convolutions: {onednn_status}", flush=True)
    flops_per_example = {
        name: rt.step_flops_per_example(rt.build_model(rt.SPECS[name]), rt.SPECS[name].batch_size)
        for name in args.workloads
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    cache_root = tempfile.mkdtemp(prefix="peers-jax-cache-")
    for name in args.workloads:
        arms = [a for a in ARMS[name] if (a != "fedjax" or fedjax["available"])
                and (ONEDNN not in a or onednn_status["available"])]
        runs[name] = {arm: [] for arm in arms}
        cache_dir = os.path.join(cache_root, name)
        for arm in arms:  # an untimed run fills the cache the cached arms read
            if CACHED in arm:
                run_arm(name, arm, str(args.data_dir), cache_dir)
        for repeat in range(args.repeats):
            for arm in arms if repeat % 2 == 0 else arms[::-1]:  # alternate the order too
                result = run_arm(name, arm, str(args.data_dir), cache_dir)
                runs[name][arm].append(result)
                shown = (f"first {result['first_round_s']:6.2f} s, median "
                         f"{result['median_s']:.4f} s/round" if "error" not in result
                         else result["error"][-300:])
                print(f"  {name} rep {repeat + 1} {arm:<30} {shown}", flush=True)
    peak_end = rt.matmul_peak()
    peak = max(peak_start["median_gflops"], peak_end["median_gflops"])

    workloads: dict[str, Any] = {}
    for name, arms in runs.items():
        summary: dict[str, Any] = {"flops_per_example_xla_step": flops_per_example[name],
                                   "arms": {}}
        for arm, results in arms.items():
            good = [r for r in results if "error" not in r]
            entry: dict[str, Any] = {"repetitions": results}
            if good:
                median = float(np.median([r["median_s"] for r in good]))
                flops = flops_per_example[name] * good[0]["examples_per_round"]
                entry.update({
                    "median_s_per_round": median,
                    "per_repetition_median_s": [r["median_s"] for r in good],
                    "first_round_s_median": float(np.median([r["first_round_s"] for r in good])),
                    "examples_per_s": good[0]["examples_per_round"] / median,
                    "flops_per_round": flops,
                    "achieved_gflops": flops / median / 1e9,
                    "mfu": flops / median / 1e9 / peak,
                })
            summary["arms"][arm] = entry
        fj = summary["arms"].get("fedjax", {}).get("median_s_per_round")
        if fj:
            for entry in summary["arms"].values():
                if "median_s_per_round" in entry:
                    entry["speedup_vs_fedjax"] = fj / entry["median_s_per_round"]
                    entry["first_round_vs_fedjax"] = (
                        entry["first_round_s_median"]
                        / summary["arms"]["fedjax"]["first_round_s_median"])
        workloads[name] = summary

    report = {
        "benchmark": "peers",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/peers/run_peers.py " + " ".join(sys.argv[1:]),
        "machine": rt.machine_info(),
        "fedjax": fedjax,
        "onednn": onednn_status,
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {
            "repeats": args.repeats,
            "rounds": {n: {"timed": t, "untimed_after_first": w} for n, (t, w) in ROUNDS.items()},
            "client_lr": rt.CLIENT_LR, "server_lr": rt.SERVER_LR,
            "timing": "every arm a fresh child process per repetition; repetitions interleave "
                      "the arms (order reversed every other repetition); each round blocked "
                      "on; first round = trace + compile + run; per arm: median over "
                      "repetitions of the repetition's median s/round",
            "fedjax_xla_flags": "stock (XLA_FLAGS unset); project and naive loop: the "
                                "project's XLA:CPU flags",
        },
        "matmul_peak": {"size": 2048, "gflops": peak, "start": peak_start, "end": peak_end},
        "workloads": workloads,
        "wall_s": time.perf_counter() - start,
    }
    print(f"\n{'workload':<22} {'arm':<30} {'first s':>8} {'s/round':>9} {'MFU':>6} "
          f"{'FedJAX/arm':>10}")
    for name, summary in workloads.items():
        for arm, e in summary["arms"].items():
            if "median_s_per_round" not in e:
                print(f"{name:<22} {arm:<30} failed")
                continue
            print(f"{name:<22} {arm:<30} {e['first_round_s_median']:8.2f} "
                  f"{e['median_s_per_round']:9.4f} {100 * e['mfu']:5.1f}% "
                  f"{e.get('speedup_vs_fedjax', float('nan')):9.2f}x")
    print(f"matmul peak {peak:.1f} GFLOP/s; {rt.cpu_model()}")
    out = rt.write_report(report, args.out, prefix="peers-")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
