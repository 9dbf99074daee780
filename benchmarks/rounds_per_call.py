"""Rounds per compiled call: logistic-regression rounds run 1, 10 and 50 rounds per call.

The data of ``emnist-logreg-fedavg`` in `round_throughput` (the first 10,000 Fashion-MNIST
training images as 100 clients of 100; logistic regression; FedAvg with client and server SGD),
three rounds from long to short (`WORKLOADS`):

* ``emnist-logreg-fedavg``: round_throughput's (62 outputs, 10 clients a round, 1 local epoch of
  batch 20 = 5 steps);
* ``emnist-logreg-fedsgd``: the same with 1 local step;
* ``fmnist-logreg-2clients``: 10 outputs, 2 clients a round, 1 local step of batch 10: a round
  so short that dispatching a call is a large part of it.

Each under each client execution (``map``, the CPU default, and ``vmap``). Two measurements,
interleaved (one repetition of every variant in turn, so a change of load on a shared machine
hits them alike), medians of ``--repeats``:

* ``step``: ``--rounds`` rounds of the round step, dispatched back to back and blocked on once
  at the end (the host loop's pattern between log rounds): ``round_step(state)`` per round for
  k = 1, ``round_step.run_rounds(state, k)`` for k = 10 and 50, and, to check the choice of a
  ``fori_loop`` with a traced count over a ``lax.scan`` of fixed length, a scan of 10 rounds;
* ``loop``: ``fedjax_sim.run`` of the same rounds (an ``.npz`` of the same arrays,
  ``dataset.name=arrays``) with ``execution.rounds_per_call`` 1, 10 and 50: the whole host
  loop, with ``log.every=50`` (calls end on log rounds, so a smaller cadence caps k), timed by
  a callback from round 50 to round ``--rounds`` - 50 (no compilation, no final evaluation).

Also the first call's time of each step variant (trace + compile + run). Usage::

  FEDJAX_SIM_DATA=../shared/data python benchmarks/rounds_per_call.py [--rounds 300]
      [--repeats 3] [--out PATH]

Writes ``benchmarks/results/rounds_per_call-<YYYY-MM-DD>-<machine>.json``.
"""

# ruff: noqa: E402  (imports after the sys.path fix below)

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
# Run as a script, this folder comes first on sys.path, and its compression.py would shadow the
# `compression` package jax tries to import (compression.zstd): add the folder after jax.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]

import fedjax_sim  # first: sets the XLA:CPU flags before jax starts

# isort: split

import jax
import numpy as np
import optax

sys.path.append(str(HERE))
from round_throughput import (
    CLIENT_LR,
    LOGREG,
    SERVER_LR,
    SPECS,
    build_data,
    machine_info,
    matmul_peak,
    write_report,
)

from fedjax_sim.datasets.fashion_mnist import load_fashion_mnist_arrays
from fedjax_sim.models import create_model
from fedjax_sim.simulation.loop import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
COUNTS = (1, 10, 50)
STRATEGIES = ("map", "vmap")


@dataclasses.dataclass(frozen=True)
class Round:
    """A logistic-regression FedAvg round on round_throughput's 100 clients of 100 images."""

    num_classes: int = 62
    cohort_size: int = 10
    batch_size: int = 20
    local_steps: int | None = None  # None: 1 epoch (5 steps of batch 20)


WORKLOADS = {
    LOGREG: Round(),  # round_throughput's
    "emnist-logreg-fedsgd": Round(local_steps=1),
    "fmnist-logreg-2clients": Round(num_classes=10, cohort_size=2, batch_size=10, local_steps=1),
}


def step_variant(spec: Round, train, strategy: str, k: int, scan: bool = False):
    """``run(rounds) -> None``: ``rounds`` rounds, k per call, blocked on at the end."""
    model = create_model("logistic", num_classes=spec.num_classes, input_shape=(28, 28, 1))
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(CLIENT_LR), optax.sgd(SERVER_LR))
    sampler = fedjax_sim.uniform_sampler(train.num_clients, spec.cohort_size)
    schedule = fedjax_sim.ClientSchedule.from_sizes(
        train.client_sizes, spec.batch_size, local_epochs=1, local_steps=spec.local_steps)
    step = fedjax_sim.build_round_step(algorithm, train, schedule, sampler, spec.cohort_size,
                                       client_execution=strategy,
                                       rounds_per_call=1 if scan else k)
    holder = {"state": step.place(fedjax_sim.init_simulation_state(
        algorithm.init(model.init(jax.random.PRNGKey(0))), 0))}
    if scan:  # the alternative: a scan of fixed length (one compilation per length)
        def scanned(state, data, offsets):
            return jax.lax.scan(lambda s, _: step.fn(s, data, offsets), state, None, length=k)

        scan_jitted = jax.jit(scanned, donate_argnums=0)
        call = lambda state: scan_jitted(state, step.data, step.offsets)  # noqa: E731
    elif k == 1:
        call = step
    else:
        call = lambda state: step.run_rounds(state, k)  # noqa: E731

    def run_rounds(rounds: int) -> None:
        state = holder["state"]
        for _ in range(rounds // k):
            state, metrics = call(state)
        holder["state"] = jax.block_until_ready(state)

    return run_rounds


def write_npz(path: pathlib.Path, train, test) -> pathlib.Path:
    """The workload's 100 x 100 clients as an ``.npz`` for ``dataset.name=arrays``."""
    n = 100 * 100
    np.savez(path, x=train["x"][:n], y=train["y"][:n], client_id=np.repeat(np.arange(100), 100),
             x_test=test["x"][:1000], y_test=test["y"][:1000])
    return path


def loop_overrides(npz: pathlib.Path, rounds: int, spec: Round, strategy: str,
                   k: int) -> list[str]:
    return [
        "name=rounds_per_call", "dataset.name=arrays", f"dataset.path={npz}",
        f"dataset.num_classes={spec.num_classes}", "model.name=logistic",
        f"rounds={rounds}", f"cohort.size={spec.cohort_size}",
        f"client.batch_size={spec.batch_size}",
        f"client.local_steps={'null' if spec.local_steps is None else spec.local_steps}",
        "client.local_epochs=1",
        f"client.optimizer.learning_rate={CLIENT_LR}",
        f"server.optimizer.learning_rate={SERVER_LR}", "log.every=50", f"eval.every={rounds}",
        "checkpoint.every=null", "log.progress=false", "log.plot=false",
        f"execution.client_execution={strategy}", f"execution.rounds_per_call={k}",
        "execution.data_placement=device",
    ]


def loop_seconds_per_round(npz, rounds, spec: Round, strategy, k, workdir) -> float:
    """Seconds per round of ``fedjax_sim.run`` between its first and its last-but-one log round
    (no compilation, no final evaluation), timed by a callback."""
    seen: dict[int, float] = {}

    def clock(row, state) -> None:
        seen[int(row["round"])] = time.perf_counter()

    with contextlib.redirect_stdout(io.StringIO()):
        run(None, overrides=loop_overrides(npz, rounds, spec, strategy, k),
            workdir=workdir, callbacks=[clock])
    first, last = 50, rounds - 50
    return (seen[last] - seen[first]) / (last - first)


def table(times: dict[str, list[float]]) -> dict[str, dict]:
    out = {}
    for name, values in times.items():
        strategy = name.split()[0]
        base = float(np.median(times[f"{strategy} k=1"]))
        median = float(np.median(values))
        out[name] = {"median_ms_per_round": round(1e3 * median, 4),
                     "ms_per_round": [round(1e3 * v, 4) for v in values],
                     "speedup_vs_k1": round(base / median, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"))
    parser.add_argument("--rounds", type=int, default=300, help="rounds per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.rounds % max(COUNTS) or args.rounds < 3 * max(COUNTS):
        parser.error(f"--rounds must be a multiple of {max(COUNTS)}, at least {3 * max(COUNTS)}")
    start = time.perf_counter()
    train_arrays, test_arrays = load_fashion_mnist_arrays(args.data_dir)
    train = build_data(SPECS[LOGREG], train_arrays)
    peak_before = matmul_peak()
    print(f"machine: {machine_info()['cpu']}, f32 matmul {peak_before['median_gflops']:.1f} "
          f"GFLOP/s", flush=True)

    steps, first_call = {}, {}
    for workload, spec in WORKLOADS.items():
        for strategy in STRATEGIES:
            for k, scan in [(k, False) for k in COUNTS] + [(10, True)]:
                name = (workload, f"{strategy} {'scan' if scan else 'k'}={k}")
                steps[name] = step_variant(spec, train, strategy, k, scan)
                begin = time.perf_counter()
                steps[name](k)  # the first call: trace + compile + k rounds
                first_call[name] = time.perf_counter() - begin
                steps[name](max(COUNTS))  # warm-up
                print(f"  {workload:<22} {name[1]:<12} first call {first_call[name]:6.2f} s",
                      flush=True)

    step_times = {name: [] for name in steps}
    loop_times = {(w, f"{s} k={k}"): [] for w in WORKLOADS for s in STRATEGIES for k in COUNTS}
    with tempfile.TemporaryDirectory() as tmp:
        npz = write_npz(pathlib.Path(tmp) / "logreg.npz", train_arrays, test_arrays)
        for repeat in range(args.repeats):  # every variant once per repetition, in turn
            for name, run_rounds in steps.items():
                begin = time.perf_counter()
                run_rounds(args.rounds)
                step_times[name].append((time.perf_counter() - begin) / args.rounds)
            for workload, name in loop_times:
                strategy, k = name.split()[0], int(name.split("=")[1])
                loop_times[workload, name].append(loop_seconds_per_round(
                    npz, args.rounds, WORKLOADS[workload], strategy, k,
                    pathlib.Path(tmp) / f"{workload}-{strategy}-{k}-{repeat}"))
            print(f"repetition {repeat + 1}/{args.repeats} done "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    def by_workload(times):
        return {w: table({n: v for (w2, n), v in times.items() if w2 == w}) for w in WORKLOADS}

    report = {
        "benchmark": "rounds_per_call",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/rounds_per_call.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "workloads": {name: dataclasses.asdict(spec) for name, spec in WORKLOADS.items()},
            "data": "round_throughput's: the first 10,000 Fashion-MNIST training images as 100 "
                    "clients of 100; logistic regression; FedAvg with client and server SGD",
            "rounds_per_repetition": args.rounds, "repetitions": args.repeats,
            "client_lr": CLIENT_LR, "server_lr": SERVER_LR,
            "step": "rounds dispatched back to back, blocked on at the end",
            "loop": "fedjax_sim.run with log.every=50, timed by a callback from round 50 to "
                    "round rounds-50 (no compilation, no final evaluation)"},
        "matmul_peak_before": peak_before,
        "step": by_workload(step_times),
        "step_first_call_s": {w: {n: round(v, 3) for (w2, n), v in first_call.items() if w2 == w}
                              for w in WORKLOADS},
        "loop": by_workload(loop_times),
    }
    report["matmul_peak_after"] = matmul_peak()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    for part in ("step", "loop"):
        for workload, entries in report[part].items():
            for name, entry in entries.items():
                print(f"{part:<5} {workload:<22} {name:<12} "
                      f"{entry['median_ms_per_round']:8.3f} ms/round  x{entry['speedup_vs_k1']}")
    out = write_report(report, args.out, "rounds_per_call-")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
