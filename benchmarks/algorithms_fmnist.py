"""The algorithm zoo on real data: every algorithm tuned over one grid, over seeds, in two arms.

Fashion-MNIST (60,000 training images) split over 100 clients by Dirichlet(0.1) label skew
(strongly non-IID: most clients hold one or two classes; sizes 4 to 2,205, median 451), the 2NN
MLP (2 x 200), 10 clients a round sampled uniformly without replacement, batch 20, client SGD,
server SGD with learning rate 1 (the papers' server step). The partition is fixed
(``--partition-seed``, default 0) for every run.

Two arms (``--arms``):

* ``one_epoch``: 1 local epoch (each client runs its own ``ceil(n_i / 20)`` steps, 1 to 111) and
  aggregation weights by examples: the usual FedAvg setting. SCAFFOLD is outside its paper's
  setting here and raises `ScaffoldSettingWarning` at build time; the warning is caught and kept
  in the JSON (``warnings`` of each run), not printed.
* ``fixed_steps``: every client runs exactly ``--local-steps`` K steps (default 10; a client with
  fewer than 20 K examples cycles over its data) and the weights are uniform: SCAFFOLD's paper's
  setting, where its control-variate corrections cancel in the server average. K = 10 is 200
  examples a round: under one epoch for 71% of the clients (median epoch 23 steps, mean 30), and
  a third of the one-epoch arm's expected local work, which keeps the full run affordable.

Every algorithm of ``--algorithms`` runs at every client learning rate of ``--learning-rates``
(the same grid for all) and every seed of ``--seeds``. A seed sets the initial params
(``PRNGKey(seed)``) and the simulation's key (``seed + 1``: cohorts and batch order), so all
algorithms of one seed start from the same model and see the same cohorts. For Mime/MimeLite
(base optimizer SGD with momentum 0.9) the grid's rate is scaled by (1 - 0.9): with heavy-ball
momentum rho the steady step is lr / (1 - rho), so the scaled rate is the same effective step.

Score of a run: the mean test accuracy of its last two evaluations (10,000 central test images,
every ``--eval-every`` rounds and at the last round). Each (arm, algorithm) keeps the learning
rate with the best mean score over seeds (a rate at which any seed diverged is not eligible)
and reports, for that rate, the mean and the sample standard deviation (ddof 1) over seeds.
Every (arm, algorithm, learning rate, seed) run is in the JSON with its curve and round times.

Order: algorithm, then arm, then learning rate, then seed, so a run stopped early holds both
arms of the first algorithms (FedAvg and SCAFFOLD by default). The JSON is rewritten after every
completed run (``status``: ``running`` until the end). The round step of an (arm, algorithm,
learning rate) is compiled once and reused for its seeds.

Usage::

  FEDJAX_SIM_DATA=/work/shared/data python benchmarks/algorithms_fmnist.py \\
      [--rounds 300] [--eval-every 25] [--learning-rates 0.01 0.03 0.1 0.3] [--seeds 0 1 2] \\
      [--algorithms fed_avg scaffold fed_prox fed_nova fed_dyn mime_lite] \\
      [--arms one_epoch fixed_steps] [--local-steps 10] [--out PATH]
  python benchmarks/algorithms_fmnist.py --interleaved-timing 20   # round times only

Writes ``benchmarks/results/algorithms_fmnist-<YYYY-MM-DD>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import numpy as np
import optax

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.scaffold import ScaffoldSettingWarning
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.datasets import load_dataset
from fedjax_sim.models import create_model
from fedjax_sim.simulation.evaluation import make_evaluator
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402  (a sibling)

# Options of each algorithm (the papers' usual values) and its client optimizer's momentum.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "fed_avg": {},
    "scaffold": {},
    "fed_prox": {"mu": 0.01},
    "fed_nova": {},
    "fed_dyn": {"alpha": 0.01},
    "mime_lite": {},
    "mime": {},
}
MOMENTUM = {"mime_lite": 0.9, "mime": 0.9}  # Mime's base optimizer: SGD with momentum
ARMS = ("one_epoch", "fixed_steps")
# Relative seconds per one-epoch round (interleaved medians, results/algorithms_fmnist-timing-
# 2026-11-26-...): only to weight the run-time estimate.
RELATIVE_ROUND_COST = {"fed_avg": 0.087, "fed_nova": 0.089, "fed_prox": 0.110,
                       "scaffold": 0.173, "fed_dyn": 0.176, "mime_lite": 0.177, "mime": 0.260}


def arm_settings(arm: str, args) -> dict[str, Any]:
    """Local work and aggregation weights of an arm."""
    if arm == "one_epoch":
        return {"local_epochs": 1, "local_steps": None, "client_weighting": "num_examples"}
    return {"local_epochs": None, "local_steps": args.local_steps, "client_weighting": "uniform"}


def build_round(arm: str, name: str, learning_rate: float, dataset, model, args):
    """The jitted round step of one (arm, algorithm, client lr) and the warnings it raised."""
    train = dataset.train
    settings = arm_settings(arm, args)
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size,
                                         local_epochs=settings["local_epochs"] or 1,
                                         local_steps=settings["local_steps"])
    sizes = np.asarray(train.client_sizes)
    steps = np.asarray(schedule.steps_for(sizes[sizes > 0]))
    momentum = MOMENTUM.get(name)
    effective = learning_rate * (1.0 - momentum) if momentum else learning_rate
    client_optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=effective,
                                                          momentum=momentum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScaffoldSettingWarning)
        algorithm = create_algorithm(name, model, client_optimizer, optax.sgd(1.0),
                                     num_clients=train.num_clients,
                                     client_weighting=settings["client_weighting"],
                                     equal_local_steps=bool((steps == steps[0]).all()),
                                     **ALGORITHMS[name])
    recorded = []
    for warning in caught:
        if issubclass(warning.category, ScaffoldSettingWarning):
            recorded.append(f"{warning.category.__name__}: {warning.message}")
        else:  # not expected here: let it through
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    sampler = uniform_sampler(train.num_clients, args.cohort_size)
    round_step = build_round_step(algorithm, train, schedule, sampler, args.cohort_size,
                                  client_execution="map")
    return algorithm, round_step, effective, momentum, recorded


def train_seed(algorithm, round_step, evaluate, model, seed: int, args) -> dict[str, Any]:
    """Trains one seed with a built round step; returns its curve, score and timings."""
    params = model.init(jax.random.PRNGKey(seed))
    state = init_simulation_state(algorithm.init(params), seed + 1)
    # Committed like the round step's outputs: uncommitted inputs make round 2 compile again.
    state = jax.device_put(state, jax.devices()[0])
    curve, times, first_round_s, diverged = [], [], None, False
    started = time.perf_counter()
    for r in range(1, args.rounds + 1):
        start = time.perf_counter()
        state, metrics = round_step(state)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        if r == 1:
            first_round_s = elapsed
        else:
            times.append(elapsed)
        if r % args.eval_every == 0 or r == args.rounds:
            result = jax.device_get(evaluate(state.algorithm.params))
            train_loss = float(jax.device_get(metrics["train/loss"]))
            loss = float(result["loss"])
            curve.append({
                "round": r,
                "test_accuracy": round(float(result["accuracy"]), 4),
                "test_loss": round(loss, 4) if np.isfinite(loss) else None,
                "train_loss": round(train_loss, 4) if np.isfinite(train_loss) else None,
            })
            if not np.isfinite(loss):
                diverged = True
                break  # the rest of the curve would be NaN
    last_two = [c["test_accuracy"] for c in curve[-2:]]
    return {
        "seed": seed,
        "curve": curve,
        "diverged": diverged,
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "last_two_mean_accuracy": None if diverged else round(float(np.mean(last_two)), 4),
        "seconds": round(time.perf_counter() - started, 2),
        "first_round_s": round(first_round_s, 3),
        "median_round_s": round(float(np.median(times)), 4) if times else None,
        "mean_round_s": round(float(np.mean(times)), 4) if times else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return round(float(np.mean(values)), 4), round(std, 4)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and algorithm: every rate's mean ± std over seeds and the best rate's."""
    summary: dict[str, Any] = {}
    for run in runs:
        summary.setdefault(run["arm"], {}).setdefault(run["algorithm"], {})
    for arm, algorithms in summary.items():
        for name in algorithms:
            mine = [r for r in runs if r["arm"] == arm and r["algorithm"] == name]
            by_rate = {}
            for rate in sorted({r["client_learning_rate"] for r in mine}):
                seeds = [r for r in mine if r["client_learning_rate"] == rate]
                scores = [r["last_two_mean_accuracy"] for r in seeds]
                row = {"seeds": [r["seed"] for r in seeds],
                       "per_seed": scores,
                       "diverged_seeds": [r["seed"] for r in seeds if r["diverged"]]}
                if row["diverged_seeds"]:
                    row["mean"], row["std"] = None, None
                else:
                    row["mean"], row["std"] = mean_std(scores)
                by_rate[str(rate)] = row
            eligible = {k: v for k, v in by_rate.items() if v["mean"] is not None}
            best = max(eligible, key=lambda k: eligible[k]["mean"]) if eligible else None
            warned = sorted({w for r in mine for w in r["warnings"]})
            algorithms[name] = {
                "best_client_learning_rate": float(best) if best is not None else None,
                "best_mean": eligible[best]["mean"] if best else None,
                "best_std": eligible[best]["std"] if best else None,
                "best_per_seed": dict(zip(eligible[best]["seeds"], eligible[best]["per_seed"],
                                          strict=True)) if best else None,
                "by_learning_rate": by_rate,
                "setting_warnings": warned,
            }
        if "fed_avg" in algorithms and "scaffold" in algorithms:
            algorithms["scaffold_minus_fed_avg"] = paired_gap(algorithms["scaffold"],
                                                              algorithms["fed_avg"])
    return summary


def paired_gap(scaffold: dict[str, Any], fed_avg: dict[str, Any]) -> dict[str, Any] | None:
    """SCAFFOLD minus FedAvg at their best rates, paired by seed (same model, same cohorts)."""
    if not scaffold["best_per_seed"] or not fed_avg["best_per_seed"]:
        return None
    seeds = sorted(set(scaffold["best_per_seed"]) & set(fed_avg["best_per_seed"]))
    gaps = [scaffold["best_per_seed"][s] - fed_avg["best_per_seed"][s] for s in seeds]
    if not gaps:
        return None
    mean, std = mean_std(gaps)
    return {"seeds": seeds, "per_seed": [round(g, 4) for g in gaps], "mean": mean, "std": std,
            "scaffold_ahead_in_seeds": sum(g > 0 for g in gaps)}


def print_table(summary: dict[str, Any]) -> None:
    for arm, algorithms in summary.items():
        print(f"\n{arm}: best client lr, mean ± std over seeds of the last-two-evaluation "
              "test accuracy")
        for name, row in algorithms.items():
            if name == "scaffold_minus_fed_avg":
                if row:
                    print(f"  scaffold - fed_avg (paired by seed): {row['mean']:+.4f} ± "
                          f"{row['std']:.4f}, ahead in {row['scaffold_ahead_in_seeds']} of "
                          f"{len(row['seeds'])} seeds")
                continue
            if row["best_client_learning_rate"] is None:
                print(f"  {name:10s} diverged at every rate")
                continue
            seeds = len(row["best_per_seed"])
            print(f"  {name:10s} lr {row['best_client_learning_rate']:<6g} "
                  f"{row['best_mean']:.4f} ± {row['best_std']:.4f}  ({seeds} seeds)")


def interleaved_timing(names: list[str], dataset, model, args) -> dict[str, Any]:
    """Seconds per round of each (arm, algorithm), rounds alternating between them (fair under
    load).

    Every variant runs the same cohorts (seed 0) at client lr 0.03 (x (1 - 0.9) for the
    momentum ones); the first round (compile) is left out.
    """
    steps, states, times = {}, {}, {}
    for arm in args.arms:
        for name in names:
            algorithm, steps[arm, name], *_ = build_round(arm, name, 0.03, dataset, model, args)
            state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 1)
            state = jax.device_put(state, jax.devices()[0])  # see train_seed
            states[arm, name], metrics = steps[arm, name](state)
            jax.block_until_ready(metrics)
            times[arm, name] = []
    for _ in range(args.interleaved_timing):
        for key in steps:
            start = time.perf_counter()
            states[key], metrics = steps[key](states[key])
            jax.block_until_ready(metrics)
            times[key].append(time.perf_counter() - start)
    return {f"{arm}/{name}": {"median_round_s": round(float(np.median(t)), 4),
                              "min_round_s": round(float(np.min(t)), 4), "rounds": len(t)}
            for (arm, name), t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        default=[0.01, 0.03, 0.1, 0.3],
                        help="client lr grid, the same for every algorithm (x (1 - 0.9) for "
                             "mime/mime_lite)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="initial params, cohorts and batches; the partition stays fixed")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS)[:6],
                        choices=list(ALGORITHMS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--local-steps", type=int, default=10,
                        help="K of the fixed_steps arm (every client, every round)")
    parser.add_argument("--interleaved-timing", type=int, default=0, metavar="ROUNDS",
                        help="only time ROUNDS rounds of each (arm, algorithm), alternating")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--partition-seed", type=int, default=0)
    parser.add_argument("--cohort-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    peak_start = matmul_peak()
    print(f"matmul peak {peak_start['median_gflops']:.1f} GFLOP/s (f32 2048^2, median)",
          flush=True)
    dataset = load_dataset("fashion_mnist", data_dir=args.data_dir, partition="dirichlet",
                           alpha=args.alpha, num_clients=100, seed=args.partition_seed)
    info = dataset.info
    model = create_model("mlp", num_classes=info["num_classes"],
                         input_shape=tuple(info["input_shape"]))
    sizes = np.asarray(dataset.train.client_sizes)
    epoch_steps = -(-sizes // args.batch_size)

    if args.interleaved_timing:
        timing = interleaved_timing(args.algorithms, dataset, model, args)
        for key, row in timing.items():
            print(f"{key:24s} {row['median_round_s']} s/round (median, interleaved)")
        report = {"benchmark": "algorithms_fmnist_timing",
                  "date": datetime.date.today().isoformat(), "machine": machine_info(),
                  "matmul_peak": peak_start,
                  "load_average_end": [round(x, 2) for x in os.getloadavg()],
                  "settings": {"rounds_each": args.interleaved_timing, "arms": args.arms,
                               "local_steps": args.local_steps, "alpha": args.alpha,
                               "cohort_size": args.cohort_size,
                               "batch_size": args.batch_size, "client_execution": "map"},
                  "timing": timing}
        print(f"wrote {write_report(report, args.out, 'algorithms_fmnist-timing-')}")
        return

    plan = [(name, arm, rate, seed) for name in args.algorithms for arm in args.arms
            for rate in args.learning_rates for seed in args.seeds]
    # Rough relative cost of each run: the algorithm's round cost times its arm's local steps.
    arm_work = {"one_epoch": 1.0, "fixed_steps": args.local_steps / float(epoch_steps.mean())}
    weight = [RELATIVE_ROUND_COST[name] * arm_work[arm] for name, arm, _, _ in plan]
    print(f"{len(plan)} runs ({len(args.algorithms)} algorithms x {len(args.arms)} arms x "
          f"{len(args.learning_rates)} learning rates x {len(args.seeds)} seeds) of "
          f"{args.rounds} rounds", flush=True)

    report = {
        "benchmark": "algorithms_fmnist",
        "status": "running",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": {"start": peak_start},
        "command": "FEDJAX_SIM_DATA=/work/shared/data python " + " ".join(sys.argv),
        "settings": {
            "dataset": f"fashion_mnist, dirichlet alpha={args.alpha}, 100 clients, partition "
                       f"seed {args.partition_seed} (fixed for every run)",
            "client_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                             "max": int(sizes.max())},
            "one_epoch_steps": {"min": int(epoch_steps.min()),
                                "median": float(np.median(epoch_steps)),
                                "mean": round(float(epoch_steps.mean()), 2),
                                "max": int(epoch_steps.max())},
            "model": "mlp (2 x 200, ReLU)",
            "rounds": args.rounds, "eval_every": args.eval_every,
            "cohort_size": args.cohort_size, "batch_size": args.batch_size,
            "arms": {arm: arm_settings(arm, args) for arm in args.arms},
            "client_execution": "map (sequential; each client runs its own steps)",
            "client_optimizer": "sgd; mime/mime_lite: sgd with momentum 0.9 (their base "
                                "optimizer) at the grid's rate x (1 - 0.9)",
            "server_optimizer": "sgd, learning rate 1",
            "algorithm_options": {name: ALGORITHMS[name] for name in args.algorithms},
            "learning_rates": args.learning_rates,
            "seeds": args.seeds,
            "seed_sets": "initial params PRNGKey(seed); simulation key seed + 1 (cohorts, "
                         "batch order); the partition does not change",
            "score": "mean test accuracy of the last two evaluations (central test set, "
                     "10,000 images)",
            "selection": "per arm and algorithm, the learning rate with the best mean score "
                         "over seeds (rates where a seed diverged are not eligible); reported: "
                         "its mean and sample std (ddof 1) over seeds",
        },
        "planned_runs": len(plan),
        "runs": [],
    }
    path = write_report(report, args.out, "algorithms_fmnist-")
    runs = report["runs"]
    evaluate = jax.jit(make_evaluator(model, dataset.central_test, batch_size=1000))
    built = None  # (name, arm, rate) of the round step in hand: its seeds reuse it
    for index, (name, arm, rate, seed) in enumerate(plan):
        if built != (name, arm, rate):
            algorithm, round_step, effective, momentum, caught = build_round(
                arm, name, rate, dataset, model, args)
            built = (name, arm, rate)
        result = train_seed(algorithm, round_step, evaluate, model, seed, args)
        runs.append({"arm": arm, "algorithm": name, "client_learning_rate": rate,
                     "client_momentum": momentum, "client_sgd_learning_rate": effective,
                     "options": ALGORITHMS[name], "warnings": caught, **result})
        report["summary"] = summarize(runs)
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        write_report(report, path, "")
        done = sum(r["seconds"] for r in runs)
        remaining = done / sum(weight[: index + 1]) * sum(weight[index + 1:])
        score = result["last_two_mean_accuracy"]
        print(f"[{index + 1}/{len(plan)}] {arm:11s} {name:10s} lr {rate:<6g} seed {seed}  "
              f"acc {'diverged' if score is None else f'{score:.4f}'}  {result['seconds']} s  "
              f"({result['median_round_s']} s/round)  ~{remaining / 60:.0f} min left"
              + ("  [ScaffoldSettingWarning recorded]" if caught else ""), flush=True)
        if index == 0:
            print(f"estimated total: ~{(done + remaining) / 60:.0f} min (from this run's time, "
                  "weighted by each algorithm's round cost and each arm's local steps)",
                  flush=True)

    report["matmul_peak"]["end"] = matmul_peak()
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["status"] = "complete"
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, path, "")
    print_table(report["summary"])
    print(f"\nwrote {path} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
