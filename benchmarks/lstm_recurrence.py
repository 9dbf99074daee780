"""The char-LSTM round with flax's LSTM against `FusedLSTM`, interleaved in one run.

The demo's workload (`configs/shakespeare_fedavg.yaml`: Shakespeare by role, 10 clients x 10
local steps x 8 sequences of 80 characters, FedAvg, the CPU's sequential client map) and TFF's
model size (2 layers of 256), each with ``model.cell=flax`` (``nn.RNN(nn.OptimizedLSTMCell)``)
and ``model.cell=fused`` (the same parameters and function; every step's input projection in
one matmul, a hand-written VJP whose recurrent-kernel gradient is one matmul over all steps).
A third arm, ``fused_devices``, is the fused cell with ``execution.num_devices=auto`` (the
demo's setting: the cohort split over one XLA:CPU device per core, each device running its
clients' recurrences on a thread of its own); the other two arms run on one device. Round times
are medians over ``--rounds`` rounds after two warm-up rounds, the arms alternating
``--repeats`` times. MFU = analytical FLOPs (3 x the forward's matmuls over every
position of the [C, S, B, T] batch, padding included) / time / the f32 matmul peak measured in
the same run.

  python benchmarks/lstm_recurrence.py [--rounds 5] [--repeats 2]

Writes ``benchmarks/results/lstm_recurrence-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import numpy as np

from fedjax_sim.sharding import request_cpu_devices, usable_cores

request_cpu_devices(usable_cores())  # before JAX starts: the fused_devices arm's devices

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

from fedjax_sim.config import load_config  # noqa: E402
from fedjax_sim.simulation.loop import build_experiment  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARMS = {"flax": ("flax", 1), "fused": ("fused", 1), "fused_devices": ("fused", "auto")}
SIZES = {"demo_128x1": ["model.hidden=128", "model.num_layers=1"],
         "tff_256x2": ["model.hidden=256", "model.num_layers=2"]}


def round_flops(config) -> float:
    """3 x forward matmul FLOPs over every position a round computes."""
    model = config.model.options
    hidden, layers = model.get("hidden", 256), model.get("num_layers", 2)
    vocab, embed = 90, model.get("embed_dim", 8)
    per_token = 2 * embed * 4 * hidden + 2 * hidden * 4 * hidden  # first layer
    per_token += (layers - 1) * (2 * hidden * 4 * hidden * 2) + 2 * hidden * vocab
    tokens = (config.cohort.size * config.client.local_steps * config.client.batch_size
              * config.dataset.options.get("sequence_length", 80))
    return 3.0 * per_token * tokens


def time_rounds(experiment, rounds: int) -> list[float]:
    state = experiment.init_state()
    for _ in range(2):
        state, metrics = experiment.round_step(state)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        state, metrics = experiment.round_step(state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"{machine_info()['cpu']}: f32 matmul {peak['median_gflops']:.1f} GFLOP/s", flush=True)
    experiments = {}
    for size, overrides in SIZES.items():
        for arm, (cell, devices) in ARMS.items():
            config = load_config(ROOT / "configs" / "shakespeare_fedavg.yaml",
                                 [*overrides, f"model.cell={cell}", "log.progress=false",
                                  f"execution.num_devices={devices}"])
            experiments[size, arm] = (config, build_experiment(config))
    times: dict = {key: [] for key in experiments}
    for _ in range(args.repeats):
        for key, (_, experiment) in experiments.items():
            times[key] += time_rounds(experiment, args.rounds)
            print(f"{key}: median {np.median(times[key]):.3f} s/round", flush=True)
    results = {}
    for size in SIZES:
        results[size] = {}
        for arm in ARMS:
            config, experiment = experiments[size, arm]
            median = float(np.median(times[size, arm]))
            flops = round_flops(config)
            results[size][arm] = {
                "median_s_per_round": median, "times_s": times[size, arm],
                "round_gflop": flops / 1e9,
                "mfu": flops / median / (peak["median_gflops"] * 1e9),
                "devices": experiment.round_step.backend.num_shards,
            }
        flax = results[size]["flax"]["median_s_per_round"]
        for arm in ("fused", "fused_devices"):
            results[size][f"speedup_{arm}_over_flax"] = (
                flax / results[size][arm]["median_s_per_round"])
        print(f"{size}: " + ", ".join(
            f"{arm} {results[size][arm]['median_s_per_round']:.3f} s "
            f"(MFU {results[size][arm]['mfu']:.1%}, {results[size][arm]['devices']} devices)"
            for arm in ARMS) + f"; fused {results[size]['speedup_fused_over_flax']:.2f}x, "
              f"fused_devices {results[size]['speedup_fused_devices_over_flax']:.2f}x the flax "
              "cell", flush=True)
    report = {
        "benchmark": "lstm_recurrence",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/lstm_recurrence.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul": peak,
        "matmul_after": matmul_peak(),
        "workload": "configs/shakespeare_fedavg.yaml (10 clients x 10 steps x 8 x 80 chars)",
        "results": results,
    }
    print(f"wrote {write_report(report, args.out, 'lstm_recurrence-')}")


if __name__ == "__main__":
    main()
