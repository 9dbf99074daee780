"""Host data path: does prefetching hide the host-side gather behind the round's compute?

Fashion-MNIST (real data, ``FEDJAX_SIM_DATA`` or ``--data-dir``) split over 100 Dirichlet(0.5)
clients; the training arrays are written as ``.npy`` files and opened memory-mapped (what a
converted cache gives), then the same FedAvg round runs three ways in one process:

* ``device``: the arrays live on the device; the step gathers rows in-graph (the reference);
* ``host_prefetch``: arrays stay on the host; a thread plans, gathers and transfers the next
  ``--prefetch`` rounds while the current one computes;
* ``host_sync``: the same host path with ``prefetch=0`` (gather, then compute).

Also timed alone: one round's host preparation (plan + gather + transfer). The share hidden is
``(host_sync - host_prefetch) / (host_sync - device)``: 1 means prefetching removes all the time
the host path adds. Each variant runs ``--repeats`` blocks of ``--rounds`` rounds (median).
All three give the same parameters (checked). Usage::

  python benchmarks/host_prefetch.py [--model mlp|emnist_cnn] [--rounds 30] [--repeats 5]
      [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import optax

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

from fedjax_sim.algorithms.fed_avg import fed_avg  # noqa: E402
from fedjax_sim.data.batching import ClientSchedule  # noqa: E402
from fedjax_sim.data.federated_data import FederatedData  # noqa: E402
from fedjax_sim.data.sampling import uniform_sampler  # noqa: E402
from fedjax_sim.datasets import load_dataset  # noqa: E402
from fedjax_sim.models import create_model  # noqa: E402
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state  # noqa: E402


def time_variant(model, data, schedule, rounds, warmup, repeats, **kwargs):
    algorithm = fed_avg(model, optax.sgd(0.05), optax.sgd(1.0))
    step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 10), 10,
                            **kwargs)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 1)
    for _ in range(warmup):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    blocks = []
    for _ in range(repeats):  # the median block: robust to other jobs on a shared machine
        start = time.perf_counter()
        for _ in range(rounds):
            state, metrics = step(state)
        jax.block_until_ready((state, metrics))
        blocks.append((time.perf_counter() - start) / rounds)
    seconds = float(np.median(blocks))
    prepare = None
    if step.feeder is not None:
        times = []
        for r in range(5):
            t = time.perf_counter()
            jax.block_until_ready(step.feeder.prepare(r))
            times.append(time.perf_counter() - t)
        prepare = float(np.median(times))
    step.reset()
    return seconds, prepare, jax.device_get(state.algorithm.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=("emnist_cnn", "mlp"))
    parser.add_argument("--rounds", type=int, default=30, help="rounds per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    dataset = load_dataset("fashion_mnist", partition="dirichlet", alpha=0.5, num_clients=100,
                           data_dir=args.data_dir)
    train = dataset.train
    arrays = dict(train.arrays)
    if args.model == "emnist_cnn":
        arrays["x"] = arrays["x"].reshape(-1, 28, 28, 1)
    model = create_model(args.model, num_classes=10, input_shape=arrays["x"].shape[1:])
    schedule = ClientSchedule.from_sizes(train.client_sizes, 20, local_epochs=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        mapped = {}
        for name, array in arrays.items():
            np.save(pathlib.Path(tmp) / f"{name}.npy", array)
            mapped[name] = np.load(pathlib.Path(tmp) / f"{name}.npy", mmap_mode="r")
        device_data = FederatedData(arrays, train.offsets, train.client_ids)
        host_data = FederatedData(mapped, train.offsets, train.client_ids)
        variants = {
            "device": (device_data, {"data_placement": "device"}),
            "host_prefetch": (host_data, {"data_placement": "host", "prefetch": args.prefetch}),
            "host_sync": (host_data, {"data_placement": "host", "prefetch": 0}),
        }
        params = {}
        for name, (data, kwargs) in variants.items():
            seconds, prepare, params[name] = time_variant(
                model, data, schedule, args.rounds, args.warmup, args.repeats, **kwargs)
            results[name] = {"seconds_per_round": round(seconds, 5)}
            if prepare is not None:
                results[name]["host_prepare_seconds"] = round(prepare, 5)
            print(f"{name:>14}: {seconds * 1e3:8.2f} ms/round"
                  + (f"  (host prepare alone {prepare * 1e3:.2f} ms)" if prepare else ""))
    same = all(
        np.array_equal(a, b)
        for name in ("host_prefetch", "host_sync")
        for a, b in zip(jax.tree.leaves(params["device"]), jax.tree.leaves(params[name]),
                        strict=True)
    )
    # Of the time the synchronous host path adds over the device path, how much prefetching
    # removes (1: all of it; noisy when that added time is small).
    added = (results["host_sync"]["seconds_per_round"]
             - results["device"]["seconds_per_round"])
    hidden = (results["host_sync"]["seconds_per_round"]
              - results["host_prefetch"]["seconds_per_round"]) / added
    report = {
        "benchmark": "host_prefetch",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "workload": {"dataset": "fashion_mnist dirichlet(0.5) x 100 clients, memory-mapped",
                     "model": args.model, "cohort": 10, "batch": 20, "local_epochs": 1,
                     "rounds_per_block": args.rounds, "blocks": args.repeats,
                     "prefetch": args.prefetch,
                     "rows_per_round": int(10 * schedule.num_steps * schedule.batch_size)},
        "results": results,
        "host_vs_device": round(results["host_prefetch"]["seconds_per_round"]
                                / results["device"]["seconds_per_round"], 3),
        "fraction_of_added_time_hidden": round(hidden, 3),
        "bitwise_equal_params": bool(same),
    }
    print(f"host prefetch / device: {report['host_vs_device']:.3f}x; prefetch hides "
          f"{hidden:.0%} of the time the synchronous host path adds; identical params: {same}")
    print(f"wrote {write_report(report, args.out, 'host_prefetch-')}")


if __name__ == "__main__":
    main()
