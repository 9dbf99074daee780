"""Fairness (q-FFL, AFL) and personalization (Ditto, fine-tuning) against FedAvg on real data.

Fashion-MNIST's 60,000 training images split over 100 clients by Dirichlet(alpha) label skew
(default alpha 0.3), each client's examples split 80/20 into its training and held-out part
(``test_fraction`` 0.2), the 2NN MLP (or ``--model logistic``), 10 clients a round (uniform,
without replacement), ``--local-steps`` local steps of batch 20 with client SGD (lr
``--client-lr``), server SGD with learning rate 1. Every variant starts from the same params and
sees the same cohorts and batches (same seed). After ``--rounds`` rounds every variant is
evaluated on every client's held-out split (``eval.per_client``): the distribution of per-client
accuracy (p10 ... p90, mean over clients, mean of the worst 10% of clients, variance across
clients) plus the central test set, each averaged over ``--eval-points`` evaluations spread over
the last 10% of the rounds (a single final model moves by a few points from round to round).

Variants:

* q-FFL (q-FedAvg, Li et al. 2020) at each ``--q`` (q = 0 is FedAvg, tested equal to `fed_avg`);
  the paper's claim: a larger q lowers the variance across clients and raises the worst clients
  at a small cost in mean accuracy;
* AFL (Mohri et al. 2019) at ``--afl-lambda-lr``: the same fairness metrics;
* FedAvg + fine-tuning: the q = 0 run's global model, fine-tuned by each client for
  ``--fine-tune-steps`` SGD steps (batch 20, the client learning rate) before its evaluation;
* Ditto (Li et al. 2021) at each ``--ditto-lam``: its personal models (and its global model).

Usage::

  FEDJAX_SIM_DATA=/work/shared/data python benchmarks/fairness_personalization.py \\
      [--rounds 300] [--alpha 0.3] [--model mlp|logistic] [--local-steps 10] [--q 0 1 5]
      [--afl-lambda-lr 0.001] [--ditto-lam 0.1 1.0] [--fine-tune-steps 10 50] [--quick]
      [--out PATH]

Writes ``benchmarks/results/fairness_personalization-<YYYY-MM-DD>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import sys
import time
from typing import Any

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax

from fedjax_sim.config import config_from_dict
from fedjax_sim.simulation import loop
from fedjax_sim.simulation.evaluation import client_distribution, make_fine_tune_evaluator

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402  (a sibling script)

DISTRIBUTION = ("accuracy_mean", "accuracy_p10", "accuracy_p25", "accuracy_p50", "accuracy_p75",
                "accuracy_p90", "accuracy_worst10pct", "accuracy_min", "accuracy_var",
                "loss_mean")


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "fairness_personalization",
        "seed": args.seed,
        "rounds": args.rounds,
        "dataset": {"name": "fashion_mnist", "partition": "dirichlet", "alpha": args.alpha,
                    "num_clients": 100, "test_fraction": 0.2, "data_dir": args.data_dir},
        "model": {"name": args.model},
        "client": {"optimizer": {"name": "sgd", "learning_rate": args.client_lr},
                   "batch_size": 20, "local_steps": args.local_steps},
        "server": {"optimizer": {"name": "sgd", "learning_rate": 1.0}},
        "cohort": {"size": 10},
        "eval": {"per_client": True, "batch_size": 1000},
    }


def evaluation_rounds(rounds: int, points: int) -> list[int]:
    """``points`` rounds spread evenly over the last 10% of training, the last one included."""
    span = max(rounds // 10, 1)
    steps = max(points - 1, 1)
    return sorted({max(rounds - round(i * span / steps), 1) for i in range(points)})


def train(config: dict[str, Any], fine_tune_steps=(), eval_points: int = 5) -> dict[str, Any]:
    """Builds the experiment, runs the rounds (each blocked on) and evaluates near the end.

    The model is evaluated after each of `evaluation_rounds` and every metric is averaged over
    those evaluations (one final model alone moves by a few points from round to round: the last
    cohorts pull it around). ``fine_tune_steps``: also evaluate the global model after each
    client fine-tunes it for that many SGD steps (batch and learning rate of local training).
    """
    experiment = loop.build_experiment(config_from_dict(config))
    dataset = experiment.dataset
    fine_tuners = {
        steps: make_fine_tune_evaluator(
            experiment.model, dataset.train, dataset.test, steps=steps,
            batch_size=config["client"]["batch_size"],
            learning_rate=config["client"]["optimizer"]["learning_rate"], seed=config["seed"])
        for steps in fine_tune_steps
    }

    def evaluate(state) -> dict[str, float]:
        out = experiment.evaluate(state.algorithm)
        for steps, fine_tune in fine_tuners.items():
            tuned = jax.device_get(client_distribution(fine_tune(state.algorithm.params)))
            out.update({f"fine_tuned_{steps}/{k}": float(v) for k, v in tuned.items()})
        return out

    at = evaluation_rounds(config["rounds"], eval_points)
    state = experiment.init_state()
    times, evaluations, evaluation_seconds = [], [], 0.0
    for round_index in range(1, config["rounds"] + 1):
        tick = time.perf_counter()
        state, metrics = experiment.round_step(state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
        if round_index in at:
            tick = time.perf_counter()
            evaluations.append(evaluate(state))
            evaluation_seconds += time.perf_counter() - tick
    mean = {k: sum(e[k] for e in evaluations) / len(evaluations) for k in evaluations[-1]}
    steady = sorted(times[1:] or times)
    return {
        "last_round": {k: round(float(v), 5) for k, v in jax.device_get(metrics).items()},
        "evaluated_after_rounds": at,
        "evaluation": {k: round(v, 5) for k, v in mean.items()},
        "evaluation_final_round": {k: round(v, 5) for k, v in evaluations[-1].items()},
        "first_round_s": round(times[0], 3),
        "median_round_s": round(steady[len(steady) // 2], 4),
        "train_s": round(sum(times), 1),
        "evaluation_s": round(evaluation_seconds, 1),
    }


def distribution(evaluation: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: evaluation[f"{prefix}/{k}"] for k in DISTRIBUTION if f"{prefix}/{k}" in evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="mlp", choices=["mlp", "logistic"])
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--q", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--afl-lambda-lr", type=float, nargs="*", default=[0.001])
    parser.add_argument("--ditto-lam", type=float, nargs="*", default=[0.1, 1.0])
    parser.add_argument("--fine-tune-steps", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"),
                        help="root holding fashion-mnist/ (default: $FEDJAX_SIM_DATA)")
    parser.add_argument("--eval-points", type=int, default=5,
                        help="evaluations over the last 10%% of rounds, averaged")
    parser.add_argument("--quick", action="store_true", help="5 rounds: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: results/...)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 5
    if 0.0 not in args.q:
        parser.error("--q must include 0 (FedAvg, the baseline)")

    # Every variant trains on the same partition: load Fashion-MNIST once.
    load = functools.lru_cache(maxsize=1)(loop.dataset_loader("fashion_mnist"))
    loop.dataset_loader = lambda name: load

    wall = time.perf_counter()
    base = base_config(args)
    runs: dict[str, dict[str, Any]] = {}
    for q in args.q:
        name = "fed_avg (q_ffl q=0)" if q == 0 else f"q_ffl q={q:g}"
        config = {**base, "algorithm": {"name": "q_ffl", "q": q}}
        # The FedAvg global model is also fine-tuned per client (personalization baseline).
        steps = args.fine_tune_steps if q == 0 else ()
        runs[name] = {"algorithm": config["algorithm"], **train(config, steps, args.eval_points)}
        print(f"{name}: {runs[name]['train_s']} s", flush=True)
    for lambda_lr in args.afl_lambda_lr:
        name = f"afl lambda_lr={lambda_lr:g}"
        config = {**base, "algorithm": {"name": "afl", "lambda_learning_rate": lambda_lr}}
        runs[name] = {"algorithm": config["algorithm"], **train(config, (), args.eval_points)}
        print(f"{name}: {runs[name]['train_s']} s", flush=True)
    for lam in args.ditto_lam:
        name = f"ditto lam={lam:g}"
        config = {**base, "algorithm": {"name": "ditto", "lam": lam}}
        runs[name] = {"algorithm": config["algorithm"], **train(config, (), args.eval_points)}
        print(f"{name}: {runs[name]['train_s']} s", flush=True)

    fairness = {name: {"test_accuracy": run["evaluation"].get("test/accuracy"),
                       **distribution(run["evaluation"], "per_client")}
                for name, run in runs.items() if not name.startswith("ditto")}
    fed_avg = runs["fed_avg (q_ffl q=0)"]["evaluation"]
    personalization = {"fed_avg (global model)": distribution(fed_avg, "per_client")}
    for steps in args.fine_tune_steps:
        personalization[f"fed_avg + fine-tuning ({steps} steps)"] = distribution(
            fed_avg, f"fine_tuned_{steps}")
    for name, run in runs.items():
        if name.startswith("ditto"):
            personalization[f"{name} (global model)"] = distribution(run["evaluation"],
                                                                     "per_client")
            personalization[f"{name} (personal models)"] = distribution(
                run["evaluation"], "per_client/personal")

    report = {
        "benchmark": "fairness_personalization",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["FEDJAX_SIM_DATA=/work/shared/data python",
                             "benchmarks/fairness_personalization.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "rounds": args.rounds, "alpha": args.alpha, "seed": args.seed,
            "workload": "Fashion-MNIST, 100 clients by Dirichlet(alpha), test_fraction 0.2 per "
            f"client, model {args.model}, 10 clients a round, {args.local_steps} local steps of "
            f"batch 20, client SGD lr {args.client_lr}, server SGD lr 1; per-client metrics on "
            "each client's held-out split, averaged over evaluations in the last 10% of rounds",
            "q": args.q, "afl_lambda_learning_rate": args.afl_lambda_lr,
            "ditto_lam": args.ditto_lam, "fine_tune_steps": args.fine_tune_steps,
            "evaluated_after_rounds": evaluation_rounds(args.rounds, args.eval_points),
        },
        "fairness": fairness,
        "personalization": personalization,
        "runs": runs,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    columns = ("accuracy_mean", "accuracy_worst10pct", "accuracy_var", "accuracy_p10",
               "accuracy_p50", "accuracy_p90")
    header = f"{'':38}" + "".join(f"{c.replace('accuracy_', ''):>12}" for c in columns)
    print("\nfairness (global model, per-client held-out accuracy)\n" + header
          + f"{'test':>12}")
    for name, row in fairness.items():
        print(f"{name:38}" + "".join(f"{row[c]:>12.4f}" for c in columns)
              + f"{row['test_accuracy'] or 0:>12.4f}")
    print("\npersonalization (per-client held-out accuracy)\n" + header)
    for name, row in personalization.items():
        print(f"{name:38}" + "".join(f"{row[c]:>12.4f}" for c in columns))
    print(f"\nwall {report['wall_s']} s; wrote "
          f"{write_report(report, args.out, prefix='fairness_personalization-')}")


if __name__ == "__main__":
    main()
