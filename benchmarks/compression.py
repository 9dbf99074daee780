# ruff: noqa: E402  (the path fix below must run before jax is imported)
"""Accuracy against bits per client per round: compressed FedAvg on Fashion-MNIST.

Fashion-MNIST's 60,000 training images split over 100 clients by Dirichlet(0.5) label skew, 10
clients a round (uniform, without replacement), FedAvg weighted by examples, client SGD (20
local steps of batch 20), server SGD 1.0, logistic regression (d = 7,850 parameters: the message).
Arms, all with the same initial params and cohorts for a seed:

* ``none``: 32-bit floats (the reference);
* ``quantize`` b = 8, 4, 2, 1 bits per coordinate, without and with the randomized Hadamard
  rotation (Suresh et al. 2017; d padded to 8,192 when rotated);
* ``top_k`` at k = 10%, 5%, 1% of d, with and without error feedback (Stich et al. 2018), and
  ``random_k`` at 10% with error feedback.

Bits per client per round are what the stage reports (`aggregator/<stage>/bits_per_client`:
values, the two float32 ends of the quantization range, top-k's positions as indices or a
bitmap, random-k's 32-bit seed). Accuracy: the 10,000 central test images, the mean of the last
three evaluations.

Usage::

  FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python benchmarks/compression.py \\
      [--rounds 300] [--seeds 0] [--only none top_k_1pct_ef] [--out PATH]

Writes ``benchmarks/results/compression-<YYYY-MM-DD>-<machine>.json`` and the ``.png`` plot.
"""

from __future__ import annotations

if __name__ != "__main__":  # noqa: SIM102
    # Another benchmark runs with this folder first on sys.path, and jax's compilation cache
    # tries ``from compression import zstd`` (the Python 3.14 package): this script is not it,
    # and an ImportError makes jax fall back to zlib as it would without that package.
    raise ImportError("benchmarks/compression.py is a script, not the compression package")

import argparse
import datetime
import os
import pathlib
import sys
import time
from typing import Any

# This file's name shadows the ``compression`` package (zstd) that jax's compilation cache
# imports: take the script's folder off the front of the path (it goes back at the end below).
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE]

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import numpy as np
import optax

from fedjax_sim import aggregators as agg
from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.datasets import load_dataset
from fedjax_sim.models import create_model
from fedjax_sim.simulation.evaluation import make_evaluator
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

sys.path.append(str(_HERE))
from round_throughput import machine_info, matmul_peak, write_report

FLOAT_BITS = 32


def build_arms(num_clients: int) -> list[dict[str, Any]]:
    arms: list[dict[str, Any]] = [{"name": "none", "family": "none", "stage": None}]
    for bits in (8, 4, 2, 1):
        for rotation in ("none", "hadamard"):
            suffix = "_rot" if rotation == "hadamard" else ""
            arms.append({"name": f"quantize_{bits}bit{suffix}", "family": "quantize",
                         "bits": bits, "rotation": rotation,
                         "stage": lambda b=bits, r=rotation: agg.quantize(b, r)})
    for fraction in (0.1, 0.05, 0.01):
        for feedback in (True, False):
            suffix = "_ef" if feedback else ""
            arms.append({"name": f"top_k_{fraction * 100:g}pct{suffix}", "family": "top_k",
                         "fraction": fraction, "error_feedback": feedback,
                         "stage": lambda f=fraction, e=feedback: agg.top_k(
                             fraction=f, error_feedback=e, num_clients=num_clients)})
    arms.append({"name": "random_k_10pct_ef", "family": "random_k", "fraction": 0.1,
                 "error_feedback": True,
                 "stage": lambda: agg.random_k(fraction=0.1, num_clients=num_clients)})
    return arms


def run_arm(arm: dict[str, Any], dataset, model, args, seed: int) -> dict[str, Any]:
    train = dataset.train
    stage = arm["stage"]() if arm["stage"] is not None else None
    aggregator = agg.chain(stage, agg.mean()) if stage is not None else agg.chain(agg.mean())
    algorithm = create_algorithm("fed_avg", model, optax.sgd(args.client_lr),
                                 optax.sgd(args.server_lr), num_clients=train.num_clients,
                                 aggregator=aggregator)
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size,
                                         local_steps=args.local_steps)
    sampler = uniform_sampler(train.num_clients, args.cohort)
    round_step = build_round_step(algorithm, train, schedule, sampler, args.cohort)
    evaluate = jax.jit(make_evaluator(model, dataset.central_test, batch_size=2000))
    params = model.init(jax.random.PRNGKey(seed))
    state = init_simulation_state(algorithm.init(params), seed + 1)
    curve, start, metrics = [], time.perf_counter(), {}
    for r in range(1, args.rounds + 1):
        state, metrics = round_step(state)
        if r % args.eval_every == 0 or r == args.rounds:
            result = jax.device_get(evaluate(state.algorithm.params))
            curve.append({"round": r, "test_accuracy": round(float(result["accuracy"]), 4)})
    seconds = time.perf_counter() - start
    last = {k.split("/")[-1]: round(float(v), 5) for k, v in jax.device_get(metrics).items()
            if k.startswith("aggregator/")}
    d = sum(x.size for x in jax.tree.leaves(params))
    bits = last.get("bits_per_client", float(FLOAT_BITS * d))
    return {
        "seed": seed,
        "accuracy": round(float(np.mean([c["test_accuracy"] for c in curve[-3:]])), 4),
        "final_accuracy": curve[-1]["test_accuracy"],
        "bits_per_client": bits,
        "compression_ratio": round(FLOAT_BITS * d / bits, 3),
        "last_round_metrics": last,
        "curve": curve,
        "seconds": round(seconds, 1),
    }


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {("quantize", "none"): ("o", "tab:blue", "quantize"),
              ("quantize", "hadamard"): ("s", "tab:orange", "quantize + rotation"),
              ("top_k", True): ("^", "tab:green", "top-k + error feedback"),
              ("top_k", False): ("v", "tab:red", "top-k, no error feedback"),
              ("random_k", True): ("D", "tab:purple", "random-k + error feedback")}
    for (family, variant), (marker, color, label) in styles.items():
        rows = [a for a in report["arms"] if a["family"] == family
                and a.get("rotation", a.get("error_feedback")) == variant]
        rows.sort(key=lambda a: a["bits_per_client"])
        if rows:
            ax.plot([a["bits_per_client"] for a in rows], [a["accuracy_mean"] for a in rows],
                    marker=marker, color=color, label=label)
    base = next(a for a in report["arms"] if a["name"] == "none")
    ax.axhline(base["accuracy_mean"], color="k", linestyle="--", label="32-bit floats")
    ax.axhline(base["accuracy_mean"] - 0.01, color="gray", linestyle=":", label="-1 point")
    ax.axvline(base["bits_per_client"] / 8, color="gray", linestyle="-.", alpha=0.6,
               label="8x fewer bits")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per client per round")
    ax.set_ylabel("test accuracy (10k central test)")
    s = report["settings"]
    ax.set_title(f"Fashion-MNIST, {s['num_clients']} Dirichlet({s['alpha']}) clients, "
                 f"cohort {s['cohort']}, {s['model']}, {s['rounds']} rounds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="logistic", choices=["logistic", "mlp"])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these arm names")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    peak = matmul_peak()
    print(f"matmul peak {peak['median_gflops']:.1f} GFLOP/s (f32 2048^2, median)", flush=True)
    dataset = load_dataset("fashion_mnist", data_dir=args.data_dir, partition="dirichlet",
                           alpha=args.alpha, num_clients=args.num_clients, seed=0)
    info = dataset.info
    model = create_model(args.model, num_classes=info["num_classes"],
                         input_shape=tuple(info["input_shape"]))
    arms = build_arms(dataset.train.num_clients)
    if args.only:
        arms = [a for a in arms if a["name"] in args.only]
    results = []
    for arm in arms:
        runs = [run_arm(arm, dataset, model, args, seed) for seed in args.seeds]
        accuracies = [r["accuracy"] for r in runs]
        row = {**{k: v for k, v in arm.items() if k != "stage"},
               "accuracy_mean": round(float(np.mean(accuracies)), 4),
               "accuracy_std": round(float(np.std(accuracies)), 4),
               "bits_per_client": runs[0]["bits_per_client"],
               "compression_ratio": runs[0]["compression_ratio"],
               "seconds_total": round(sum(r["seconds"] for r in runs), 1),
               "runs": runs}
        results.append(row)
        print(f"{arm['name']:22s} acc {row['accuracy_mean']:.4f} "
              f"bits {row['bits_per_client']:>9.0f} ({row['compression_ratio']:6.2f}x) "
              f"{row['seconds_total']} s", flush=True)
    base = next((a for a in results if a["name"] == "none"), None)
    if base is not None:
        for row in results:
            row["accuracy_drop"] = round(base["accuracy_mean"] - row["accuracy_mean"], 4)
            row["meets_8x_within_1pt"] = bool(row["compression_ratio"] >= 8
                                              and row["accuracy_drop"] <= 0.01)
    sizes = np.asarray(dataset.train.client_sizes)
    report = {
        "benchmark": "compression",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": peak,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "dataset": "fashion_mnist", "partition": "dirichlet", "alpha": args.alpha,
            "num_clients": int(dataset.train.num_clients),
            "examples_per_client": [int(sizes.min()), int(sizes.max())],
            "sampler": "uniform", "cohort": args.cohort, "model": args.model,
            "message_coordinates": int(sum(x.size for x in jax.tree.leaves(
                model.init(jax.random.PRNGKey(0))))),
            "rounds": args.rounds, "eval_every": args.eval_every,
            "batch_size": args.batch_size, "local_steps": args.local_steps,
            "client_optimizer": f"sgd(lr={args.client_lr})",
            "server_optimizer": f"sgd(lr={args.server_lr})",
            "client_weighting": "num_examples", "seeds": args.seeds,
            "accuracy": "mean of the last three evaluations on the 10k central test set",
            "command": "FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python "
                       + " ".join(sys.argv),
        },
        "arms": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_report(report, args.out, "compression-")
    plot(report, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
