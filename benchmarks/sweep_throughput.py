"""A 16-configuration sweep in one program vs the same 16 configurations run one by one.

The sweep is ``configs/sweeps/fashion_mnist_fedavg_lr.yaml`` (FedAvg on Fashion-MNIST, 100
clients by Dirichlet(0.5), the MLP, 10 clients a round; client lr {0.01, 0.03, 0.1, 0.3} x server
lr {0.5, 1.0} x 2 seeds) cut to ``--rounds`` rounds. Measured in one process, wall clock
including data loading and compilation:

* ``sequential``: ``fedjax_sim.run`` of each of the 16 configurations in this process
  (16 ``fedjax-sim run`` commands minus 16 Python and JAX start-ups, and without the
  commands' persistent compilation cache);
* ``cli``: 16 ``fedjax-sim run CONFIG key=value ...`` commands, one after another, each its
  own process, with the commands' persistent compilation cache in a fresh folder (the first
  command compiles, the others read its programs): what a user without sweeps runs;
* ``map`` / ``vmap`` / ``by_seed``: ``fedjax_sim.sweeps.sweep`` with that
  ``sweep.execution``: configurations one after another inside one jitted step, one batched
  program, or each seed's configurations batched over their shared cohort and batches.

* ``sequential_per_core`` / ``map_per_core``: ``sequential`` with each run's cohort split over
  one XLA:CPU device per core (``execution.num_devices=auto``), and ``map`` with the sweep axis
  split over them (``sweep.devices=auto``): each device trains its share on a thread of its own.

``--set key=value`` changes the sweep config for every mode (e.g. ``model.name=logistic``).
``--round-times SETTING ...`` also measures the seconds per round (compilation excluded) of
``map`` and ``by_seed`` for each setting (``;``-separated overrides, e.g.
``"model.hidden=[64,64]"``; ``""`` for the config itself).

It also checks that the sweep reproduced every run: the largest difference of the final test
accuracy and train loss between a sweep's configuration and the same configuration run alone.

  FEDJAX_SIM_DATA=../shared/data python benchmarks/sweep_throughput.py [--rounds 30]
      [--modes sequential cli map vmap by_seed] [--set key=value ...] [--sensitivity 001 ...]
      [--round-times SETTING ...] [--out FILE]

``--sensitivity`` measures how chaotic a configuration's training is: the largest parameter
difference after one round between two runs whose initial parameters differ by a relative 1e-7
(the size of difference any change of float rounding, such as vmap's, can grow into).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

from fedjax_sim.config import config_to_yaml  # noqa: E402
from fedjax_sim.simulation.loop import run  # noqa: E402
from fedjax_sim.sweeps import expand, load_sweep, sweep  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sweeps" / "fashion_mnist_fedavg_lr.yaml"


def _finals(rows: list[dict]) -> dict[str, float]:
    last = rows[-1]
    return {k: last[k] for k in ("test/accuracy", "train/loss") if k in last}


def _run_commands(points, overrides: list[str], tmp: pathlib.Path) -> dict[str, dict]:
    """Each configuration as its own ``fedjax-sim run`` command (the sweep config's run part
    plus the point's values as overrides), the compilation cache in a fresh folder."""
    env = {**os.environ, "FEDJAX_SIM_COMPILATION_CACHE": str(tmp / "jax_cache")}
    finals = {}
    for point in points:
        config_path = tmp / f"cli_{point.label}.yaml"
        config_path.write_text(config_to_yaml(dataclasses.replace(point.config, workdir=None)))
        workdir = tmp / f"cli_run_{point.label}"
        subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "run", str(config_path),
                        "--workdir", str(workdir)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finals[point.label] = _finals([json.loads(line) for line in (
            workdir / "metrics.jsonl").read_text().splitlines()])
    return finals


def round_times(overrides: list[str], repeats: int = 2, rounds: int = 5) -> dict:
    """Seconds per round of the stacked step under ``map`` and ``by_seed`` for the sweep with
    ``overrides`` (data loading, building and compilation excluded): median of ``rounds``
    rounds after one untimed round, the executions interleaved ``repeats`` times."""
    import jax
    import numpy as np

    from fedjax_sim.sweeps import build_groups, seed_layout, stack_states, stacked_step

    data, spec = load_sweep(CONFIG, overrides)
    group = build_groups(expand(data, spec, overrides))[0]
    step_fns = {"map": group.experiment.round_step.fn,
                "by_seed": group.experiment.round_step.shared_fn}
    params = sum(int(np.size(x)) for x in jax.tree.leaves(group.members[0].init_state()
                                                          .algorithm.params))
    times: dict[str, list[float]] = {mode: [] for mode in step_fns}
    for _ in range(repeats):
        for mode, fn in step_fns.items():
            states = [m.init_state() for m in group.members]
            seeds, slots = 1, list(range(len(states)))
            if mode == "by_seed":
                slots, _, seeds = seed_layout([np.asarray(s.key) for s in states])
            stacked = stack_states([states[i] for i in slots])
            step = stacked_step(fn, mode, None, None, seeds,
                                group.experiment.round_step.compiler_options)
            alive = jax.numpy.ones(len(slots), bool)
            rs = group.experiment.round_step
            stacked, _ = step(stacked, alive, rs.data, rs.offsets)
            jax.block_until_ready(stacked)
            for _ in range(rounds):
                start = time.perf_counter()
                stacked, _ = step(stacked, alive, rs.data, rs.offsets)
                jax.block_until_ready(stacked)
                times[mode].append(time.perf_counter() - start)
    medians = {mode: float(np.median(t)) for mode, t in times.items()}
    return {"overrides": overrides, "configurations": len(group.members),
            "parameters_per_configuration": params,
            "seconds_per_round": medians,
            "by_seed_speedup_vs_map": round(medians["map"] / medians["by_seed"], 2)}


def sensitivity(point, relative: float = 1e-7) -> dict:
    """How far one round moves apart two copies of ``point`` whose initial parameters differ by
    a relative ``relative``: the scale of differences any change of float rounding (such as a
    vmap's batched matmuls) can produce in this configuration."""
    import jax
    import numpy as np

    from fedjax_sim.simulation.loop import build_experiment

    experiment = build_experiment(point.config)
    step = experiment.round_step

    def one_round(scale):
        state = experiment.init_state()
        params = jax.tree.map(lambda p: p * scale, state.algorithm.params)
        state = step.place(state.replace(algorithm=state.algorithm.replace(params=params)))
        state, _ = step(state)
        return [np.asarray(x) for x in jax.tree.leaves(state.algorithm.params)]

    a, b = one_round(1.0), one_round(1.0 + relative)
    return {"config": point.label, "values": point.values, "relative_perturbation": relative,
            "max_abs_param_difference_after_one_round": float(
                max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--modes", nargs="*", default=["sequential", "cli", "map", "by_seed"],
                        choices=["sequential", "cli", "map", "vmap", "by_seed",
                                 "sequential_per_core", "map_per_core"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every mode, e.g. model.name=logistic")
    parser.add_argument("--sensitivity", nargs="*", default=[], metavar="NNN",
                        help="configurations (e.g. 001) whose chaos to measure: the parameter "
                             "difference after one round from a 1e-7 relative perturbation")
    parser.add_argument("--round-times", nargs="*", default=[], metavar="KEY=VALUE;...",
                        help="per-round seconds of map and by_seed (no compile) for each of "
                             "these settings: ';'-separated overrides, '' for the config")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if "FEDJAX_SIM_DATA" not in os.environ:
        shared = ROOT.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["FEDJAX_SIM_DATA"] = str(shared)
    if any(mode.endswith("_per_core") for mode in args.modes):
        from fedjax_sim.sharding import request_cpu_devices, usable_cores

        request_cpu_devices(usable_cores())  # before JAX starts (matmul_peak starts it)
    overrides = [f"rounds={args.rounds}", "eval.every=10", "log.progress=false",
                 "log.plot=false", "checkpoint.every=null", *args.set]
    data, spec = load_sweep(CONFIG, overrides)
    points = expand(data, spec, overrides)
    report = {
        "benchmark": "sweep_throughput",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/sweep_throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul_before": matmul_peak(),
        "setting": {"config": str(CONFIG.relative_to(ROOT)), "overrides": overrides,
                    "configurations": len(points)},
        "results": {},
    }
    print(f"machine: {report['machine']['cpu']}, f32 matmul "
          f"{report['matmul_before']['median_gflops']:.1f} GFLOP/s; {len(points)} "
          f"configurations x {args.rounds} rounds", flush=True)
    finals: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                if mode in ("sequential", "sequential_per_core"):
                    finals[mode] = {}
                    for point in points:
                        config = point.config
                        if mode == "sequential_per_core":
                            config = dataclasses.replace(config, execution=dataclasses.replace(
                                config.execution, num_devices="auto"))
                        result = run(config, workdir=pathlib.Path(tmp) / mode / point.label)
                        finals[mode][point.label] = _finals(result.history)
                elif mode == "cli":
                    finals[mode] = _run_commands(points, overrides, pathlib.Path(tmp))
                else:
                    extra = (["sweep.execution=map", "sweep.devices=auto"]
                             if mode == "map_per_core"
                             else [f"sweep.execution={mode}", "sweep.devices=1"])
                    result = sweep(CONFIG, [*overrides, *extra],
                                   workdir=pathlib.Path(tmp) / f"sweep_{mode}")
                    finals[mode] = {
                        p.label: _finals([json.loads(line) for line in (
                            result.workdir / "configs" / p.label / "metrics.jsonl"
                        ).read_text().splitlines()]) for p in points}
            seconds = time.perf_counter() - start
            report["results"][mode] = {"seconds": round(seconds, 2)}
            if mode not in ("sequential", "cli", "sequential_per_core"):
                report["results"][mode]["programs"] = result.summary["programs"]
            print(f"{mode}: {seconds:.1f} s", flush=True)
    if "sequential" in finals:
        base = report["results"]["sequential"]["seconds"]
        for mode in args.modes:
            if mode == "sequential":
                continue
            entry = report["results"][mode]
            entry["speedup_vs_sequential"] = round(base / entry["seconds"], 2)
            if "cli" in report["results"] and mode != "cli":
                entry["speedup_vs_cli"] = round(
                    report["results"]["cli"]["seconds"] / entry["seconds"], 2)
            entry["max_abs_difference_vs_sequential"] = {
                key: max(abs(finals[mode][label][key] - finals["sequential"][label][key])
                         for label in finals["sequential"])
                for key in ("test/accuracy", "train/loss")}
            print(f"{mode}: {entry['speedup_vs_sequential']}x the sequential runs; largest "
                  f"difference {entry['max_abs_difference_vs_sequential']}", flush=True)
    if args.sensitivity:
        with contextlib.redirect_stdout(io.StringIO()):
            report["sensitivity"] = [sensitivity(p) for p in points
                                     if p.label in args.sensitivity]
        print(f"sensitivity: {report['sensitivity']}", flush=True)
    if args.round_times:
        report["round_times"] = []
        for setting in args.round_times:
            extra = [o for o in setting.split(";") if o]
            with contextlib.redirect_stdout(io.StringIO()):
                entry = round_times([*overrides, *extra])
            report["round_times"].append(entry)
            print(f"round times {extra or ['(the config)']}: {entry['seconds_per_round']} "
                  f"({entry['parameters_per_configuration']} parameters; by_seed "
                  f"{entry['by_seed_speedup_vs_map']}x map)", flush=True)
    report["matmul_after"] = matmul_peak()
    path = write_report(report, args.out, "sweep_throughput-")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
