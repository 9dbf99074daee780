"""The algorithm zoo on real data: SCAFFOLD (and friends) against FedAvg at equal rounds.

Fashion-MNIST (60,000 training images) split over 100 clients by Dirichlet(0.1) label skew
(strongly non-IID: most clients hold one or two classes), the 2NN MLP (2 x 200), 10 clients a
round sampled uniformly without replacement, 1 local epoch of batch 20 (each client runs its own
number of steps), client SGD, server SGD with learning rate 1 (the papers' server step). Every
variant starts from the same initial params and sees the same cohorts and batches (same seed).

The algorithms named by ``--tune`` (FedAvg and SCAFFOLD) run at every client learning rate of a
small grid (the same grid, so each gets a fair tuning) and are reported with their best rate (by
the mean test accuracy of the last two evaluations); to keep the run to minutes, the others run
only at FedAvg's best rate. For Mime/MimeLite (base optimizer SGD with momentum 0.9) the rate is
scaled by (1 - 0.9), the same effective step. Test accuracy on the 10,000 central test images
every ``--eval-every`` rounds; seconds per round (each round blocked on; median over the run,
evaluation excluded).

Usage::

  FEDJAX_SIM_DATA=/work/shared/data python benchmarks/algorithms_fmnist.py \\
      [--rounds 300] [--eval-every 25] [--learning-rates 0.03 0.1 0.3] \\
      [--algorithms fed_avg scaffold fed_prox fed_nova fed_dyn mime_lite] [--out PATH]
      [--client-weighting num_examples|uniform] [--tune fed_avg scaffold]
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
from typing import Any

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import numpy as np
import optax

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.datasets import load_dataset
from fedjax_sim.models import create_model
from fedjax_sim.simulation.evaluation import make_evaluator
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, write_report  # noqa: E402  (a sibling script)

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


def run_variant(name: str, learning_rate: float, dataset, model, args) -> dict[str, Any]:
    """Trains one (algorithm, client learning rate) and returns its curve and timings."""
    train = dataset.train
    momentum = MOMENTUM.get(name)
    # With heavy-ball momentum rho the steady step is lr / (1 - rho): scale lr by (1 - rho) so
    # the grid means the same effective step for every algorithm.
    effective = learning_rate * (1.0 - momentum) if momentum else learning_rate
    client_optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=effective,
                                                          momentum=momentum)
    algorithm = create_algorithm(name, model, client_optimizer, optax.sgd(1.0),
                                 num_clients=train.num_clients,
                                 client_weighting=args.client_weighting, **ALGORITHMS[name])
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size, local_epochs=1)
    sampler = uniform_sampler(train.num_clients, args.cohort_size)
    round_step = build_round_step(algorithm, train, schedule, sampler, args.cohort_size,
                                  client_execution="map")
    evaluate = jax.jit(make_evaluator(model, dataset.central_test, batch_size=1000))
    params = model.init(jax.random.PRNGKey(args.seed))
    state = init_simulation_state(algorithm.init(params), args.seed + 1)
    curve, times, first_round_s = [], [], None
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
            train_metrics = jax.device_get(metrics)
            curve.append({
                "round": r,
                "test_accuracy": round(float(result["accuracy"]), 4),
                "test_loss": round(float(result["loss"]), 4),
                "train_loss": round(float(train_metrics["train/loss"]), 4),
            })
            if not np.isfinite(float(result["loss"])):
                break  # diverged: the rest of the curve would be NaN
    final = curve[-1]
    last_two = [c["test_accuracy"] for c in curve[-2:]]
    return {
        "algorithm": name,
        "options": ALGORITHMS[name],
        "client_learning_rate": learning_rate,
        "client_momentum": momentum,
        "client_sgd_learning_rate": effective,
        "curve": curve,
        "final_test_accuracy": final["test_accuracy"],
        "last_two_mean_accuracy": round(float(np.mean(last_two)), 4)
        if np.all(np.isfinite(last_two)) else float("nan"),
        "first_round_s": round(first_round_s, 3),
        "median_round_s": round(float(np.median(times)), 4) if times else None,
        "mean_round_s": round(float(np.mean(times)), 4) if times else None,
    }


def interleaved_timing(names: list[str], dataset, model, args) -> dict[str, Any]:
    """Seconds per round of each algorithm, rounds alternating between them (fair under load).

    Every algorithm runs the same cohorts (same seed) at client lr 0.03 (x (1 - 0.9) for the
    momentum ones); the first round (compile) is left out.
    """
    train = dataset.train
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size, local_epochs=1)
    sampler = uniform_sampler(train.num_clients, args.cohort_size)
    steps, states, times = {}, {}, {}
    for name in names:
        momentum = MOMENTUM.get(name)
        client = optax.inject_hyperparams(optax.sgd)(
            learning_rate=0.03 * (1.0 - momentum) if momentum else 0.03, momentum=momentum)
        algorithm = create_algorithm(name, model, client, optax.sgd(1.0),
                                     num_clients=train.num_clients, **ALGORITHMS[name])
        steps[name] = build_round_step(algorithm, train, schedule, sampler, args.cohort_size,
                                       client_execution="map")
        state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 1)
        states[name], metrics = steps[name](state)
        jax.block_until_ready(metrics)
        times[name] = []
    for _ in range(args.interleaved_timing):
        for name in names:
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name])
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_round_s": round(float(np.median(t)), 4),
                   "min_round_s": round(float(np.min(t)), 4), "rounds": len(t)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS)[:6],
                        choices=list(ALGORITHMS))
    parser.add_argument("--tune", nargs="+", default=["fed_avg", "scaffold"],
                        help="algorithms run at every learning rate; the others run at "
                             "FedAvg's best (saves time)")
    parser.add_argument("--client-weighting", default="num_examples",
                        choices=["num_examples", "uniform"],
                        help="aggregation weights of every algorithm (SCAFFOLD's paper: uniform)")
    parser.add_argument("--interleaved-timing", type=int, default=0, metavar="ROUNDS",
                        help="only time ROUNDS rounds of each algorithm, alternating")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--cohort-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = load_dataset("fashion_mnist", data_dir=args.data_dir, partition="dirichlet",
                           alpha=args.alpha, num_clients=100, seed=args.seed)
    info = dataset.info
    model = create_model("mlp", num_classes=info["num_classes"],
                         input_shape=tuple(info["input_shape"]))
    sizes = dataset.train.client_sizes

    if args.interleaved_timing:
        timing = interleaved_timing(args.algorithms, dataset, model, args)
        for name, row in timing.items():
            print(f"{name:10s} {row['median_round_s']} s/round (median, interleaved)")
        report = {"benchmark": "algorithms_fmnist_timing",
                  "date": datetime.date.today().isoformat(), "machine": machine_info(),
                  "load_average_end": [round(x, 2) for x in os.getloadavg()],
                  "settings": {"rounds_each": args.interleaved_timing,
                               "alpha": args.alpha, "cohort_size": args.cohort_size,
                               "batch_size": args.batch_size, "client_execution": "map"},
                  "timing": timing}
        print(f"wrote {write_report(report, args.out, 'algorithms_fmnist-timing-')}")
        return

    def score(run):
        value = run["last_two_mean_accuracy"]
        return value if np.isfinite(value) else -1.0

    runs = []
    tuned_fed_avg = None
    for name in args.algorithms:
        grid = args.learning_rates
        if name not in args.tune:  # untuned: FedAvg's best rate (when it ran first)
            grid = [tuned_fed_avg] if tuned_fed_avg is not None else args.learning_rates[:1]
        for learning_rate in grid:
            result = run_variant(name, learning_rate, dataset, model, args)
            runs.append(result)
            print(f"{name:10s} lr {learning_rate:<6g} final acc {result['final_test_accuracy']:.4f}"
                  f"  {result['median_round_s']} s/round", flush=True)
        if name == "fed_avg":
            done = [r for r in runs if r["algorithm"] == "fed_avg"]
            tuned_fed_avg = max(done, key=score)["client_learning_rate"]

    best = {}
    for name in args.algorithms:
        candidates = [r for r in runs if r["algorithm"] == name]
        winner = max(candidates, key=score)
        best[name] = {
            "client_learning_rate": winner["client_learning_rate"],
            "accuracy_by_round": {c["round"]: c["test_accuracy"] for c in winner["curve"]},
            "final_test_accuracy": winner["final_test_accuracy"],
            "last_two_mean_accuracy": winner["last_two_mean_accuracy"],
            "median_round_s": winner["median_round_s"],
        }
    comparison = None
    if "fed_avg" in best and "scaffold" in best:
        fed_avg, scaffold = best["fed_avg"], best["scaffold"]
        rounds = sorted(set(fed_avg["accuracy_by_round"]) & set(scaffold["accuracy_by_round"]))
        gaps = {r: round(scaffold["accuracy_by_round"][r] - fed_avg["accuracy_by_round"][r], 4)
                for r in rounds}
        comparison = {
            "scaffold_minus_fed_avg_by_round": gaps,
            "scaffold_ahead_at_rounds": sum(g > 0 for g in gaps.values()),
            "of_rounds": len(gaps),
            "final_gap": gaps[rounds[-1]] if rounds else None,
            "scaffold_beats_fed_avg": bool(scaffold["last_two_mean_accuracy"]
                                           > fed_avg["last_two_mean_accuracy"]),
        }
    report = {
        "benchmark": "algorithms_fmnist",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "dataset": f"fashion_mnist, dirichlet alpha={args.alpha}, 100 clients, seed "
                       f"{args.seed}",
            "client_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                             "max": int(sizes.max())},
            "model": "mlp (2 x 200, ReLU)",
            "rounds": args.rounds, "eval_every": args.eval_every,
            "cohort_size": args.cohort_size, "batch_size": args.batch_size, "local_epochs": 1,
            "client_execution": "map (sequential; each client runs its own steps)",
            "client_optimizer": "sgd (momentum 0.9 for mime/mime_lite, their base optimizer)",
            "server_optimizer": "sgd, learning rate 1",
            "client_weighting": args.client_weighting,
            "learning_rates": args.learning_rates,
            "tuned_over_the_grid": args.tune,
            "untuned": "run at FedAvg's best client learning rate only",
            "selection": "best client lr per algorithm by the mean test accuracy of the last two "
                         "evaluations",
            "evaluation": "central test set, 10,000 images",
        },
        "best": best,
        "scaffold_vs_fed_avg": comparison,
        "runs": runs,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    path = write_report(report, args.out, "algorithms_fmnist-")
    print(f"wrote {path}")
    if comparison is not None:
        print("scaffold - fed_avg by round:", comparison["scaffold_minus_fed_avg_by_round"])


if __name__ == "__main__":
    main()
