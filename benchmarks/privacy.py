"""Privacy-utility: user-level DP-FedAvg on Fashion-MNIST at target epsilon 1, 2, 4, 8.

Fashion-MNIST's 60,000 training images split IID over 1,000 clients (60 each), Poisson cohorts
(each client joins a round with probability q = expected_cohort / 1,000; static cap from
`poisson_cap`, padding masked), FedAvg with the DP-FedAvg aggregator
(`dp_fedavg_aggregator`: flat L2 clipping of each client's whole update, uniform weights, the
fixed denominator q * N, Gaussian noise z * C on the sum), client SGD (1 local epoch of batch
20 = 3 steps), server SGD. For each target epsilon (delta 1e-5) the noise multiplier is
calibrated for the planned rounds with `calibrate_noise_multiplier` (RDP, Poisson sampled
Gaussian) and the run's epsilon is recomputed afterwards from the aggregator's own per-round
mechanisms with `PrivacyLedger` (with adaptive clipping this includes the clip count's noise,
which `dp_fedavg_aggregator` splits from the same budget). Reference arms: the same run with no
privacy (plain uniform mean, no clip, no noise) and clip-only (clipping and the fixed
denominator, z = 0). Clipping: fixed at ``--clip-norm`` or adaptive (target quantile 0.5,
count stddev expected_cohort / 20, initial norm ``--clip-norm``).

Optional arm (``--noise-cohort 5000``): noise calibrated as if the cohort had 5,000 clients
while training the real cohort; accounting then uses q = 5000 / ``--noise-population`` (an
explicitly assumed production population, default 50,000; 1,000 clients cannot hold a
5,000-client cohort).

Every arm of a seed starts from the same initial params and sees the same Poisson cohorts.
Test accuracy on the 10,000 central test images: the mean of the last two evaluations.

Usage::

  FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python benchmarks/privacy.py \\
      [--model logistic] [--rounds 200] [--seeds 0 1] [--epsilons 1 2 4 8] [--out PATH]

Writes ``benchmarks/results/privacy-<YYYY-MM-DD>-<machine>.json`` and the ``.png`` plot.
"""

from __future__ import annotations

import argparse
import datetime
import logging
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

from fedjax_sim.aggregators import dp_fedavg_aggregator
from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import poisson_cap, poisson_sampler
from fedjax_sim.datasets import load_dataset
from fedjax_sim.models import create_model
from fedjax_sim.privacy import PrivacyLedger, calibrate_noise_multiplier
from fedjax_sim.simulation.evaluation import make_evaluator
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402


def server_optimizer(args):
    if args.server_momentum:
        return optax.sgd(args.server_lr, momentum=args.server_momentum)
    return optax.sgd(args.server_lr)


def run_arm(arm: dict[str, Any], dataset, model, args, seed: int) -> dict[str, Any]:
    """Trains one arm; returns accuracies, the last round's aggregator metrics and timings."""
    train = dataset.train
    population = train.num_clients
    q = args.expected_cohort / population
    cap = poisson_cap(population, q)
    client_optimizer = optax.sgd(args.client_lr)
    aggregator = arm.get("aggregator")
    options = {} if aggregator is None else {"aggregator": aggregator}
    algorithm = create_algorithm("fed_avg", model, client_optimizer, server_optimizer(args),
                                 num_clients=population, client_weighting="uniform", **options)
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size, local_epochs=1)
    sampler = poisson_sampler(population, q, cap)
    round_step = build_round_step(algorithm, train, schedule, sampler, cap,
                                  client_execution=args.client_execution)
    evaluate = jax.jit(make_evaluator(model, dataset.central_test, batch_size=2000))
    params = model.init(jax.random.PRNGKey(seed))
    state = init_simulation_state(algorithm.init(params), seed + 1)
    curve, start = [], time.perf_counter()
    metrics, first_round_s = {}, None
    for r in range(1, args.rounds + 1):
        state, metrics = round_step(state)
        if r == 1:
            jax.block_until_ready(metrics)
            first_round_s = time.perf_counter() - start
        if r % args.eval_every == 0 or r == args.rounds:
            result = jax.device_get(evaluate(state.algorithm.params))
            curve.append({"round": r, "test_accuracy": round(float(result["accuracy"]), 4)})
            if not np.isfinite(float(result["loss"])):
                break
    seconds = time.perf_counter() - start
    last = {k: round(float(v), 5) for k, v in jax.device_get(metrics).items()
            if any(s in k for s in ("clip", "noise", "cohort", "unclipped"))}
    epsilon = None
    if aggregator is not None and aggregator.noise_multipliers is not None:
        multipliers = {k: float(v) for k, v in jax.device_get(
            aggregator.noise_multipliers(state.algorithm.aggregator)).items()}
        accounting_population = arm.get("accounting_population", population)
        accounting_cohort = arm.get("noise_cohort") or args.expected_cohort
        simulated = accounting_population != population or arm.get("noise_cohort")
        ledger = PrivacyLedger(multipliers, accounting_population, accounting_cohort,
                               "poisson", args.delta, "rdp",
                               max_cohort_size=None if simulated else cap)
        epsilon = ledger.epsilon(curve[-1]["round"])  # inf for z = 0
        arm = {**arm, "cap_overflow_delta": ledger.cap_overflow_delta(curve[-1]["round"])}
        arm = {**arm, "mechanisms": multipliers, "accounting": ledger.description()}
    accuracies = [c["test_accuracy"] for c in curve[-2:]]
    return {
        "seed": seed,
        "accuracy": round(float(np.mean(accuracies)), 4),
        "final_accuracy": curve[-1]["test_accuracy"],
        "epsilon": None if epsilon is None else (
            round(float(epsilon), 4) if np.isfinite(epsilon) else "inf"),
        "mechanisms": arm.get("mechanisms"),
        "accounting": arm.get("accounting"),
        "last_round_metrics": last,
        "curve": curve,
        "seconds": round(seconds, 1),
        "first_round_s": round(first_round_s, 2),
    }


def build_arms(args, population: int) -> list[dict[str, Any]]:
    cohort = args.expected_cohort
    arms = [{"name": "non_private", "clipping": None, "target_epsilon": None,
             "noise_multiplier": None, "aggregator": None}]
    arms.append({"name": "clip_only", "clipping": "fixed", "target_epsilon": None,
                 "noise_multiplier": 0.0,
                 "aggregator": dp_fedavg_aggregator(0.0, args.clip_norm, cohort)})
    for clipping in args.clippings:
        adaptive = clipping == "adaptive"
        if adaptive:
            arms.append({"name": "clip_only_adaptive", "clipping": "adaptive",
                         "target_epsilon": None, "noise_multiplier": 0.0,
                         "aggregator": dp_fedavg_aggregator(
                             0.0, args.clip_norm, cohort, target_quantile=0.5,
                             count_stddev=cohort / 20)})
        for target in args.epsilons:
            z = calibrate_noise_multiplier(target, args.rounds, population, cohort, args.delta)
            aggregator = dp_fedavg_aggregator(
                z, args.clip_norm, cohort,
                **({"target_quantile": 0.5, "count_stddev": cohort / 20} if adaptive else {}))
            arms.append({"name": f"dp_{clipping}_eps{target:g}", "clipping": clipping,
                         "target_epsilon": target, "noise_multiplier": round(z, 5),
                         "aggregator": aggregator})
    if args.noise_cohort:
        accounting_population = args.noise_population
        target = args.noise_cohort_epsilon
        z = calibrate_noise_multiplier(target, args.rounds, accounting_population,
                                       args.noise_cohort, args.delta)
        arms.append({"name": f"dp_fixed_eps{target:g}_noise_cohort{args.noise_cohort}",
                     "clipping": "fixed", "target_epsilon": target,
                     "noise_multiplier": round(z, 5), "noise_cohort": args.noise_cohort,
                     "accounting_population": accounting_population,
                     "aggregator": dp_fedavg_aggregator(z, args.clip_norm, cohort,
                                                        noise_cohort_size=args.noise_cohort)})
    if args.only:
        arms = [a for a in arms if a["name"] in args.only]
    return arms


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    arms = report["arms"]
    for clipping, marker in (("fixed", "o"), ("adaptive", "s")):
        rows = sorted((a for a in arms if a["clipping"] == clipping and a["target_epsilon"]
                       and not a.get("noise_cohort")), key=lambda a: a["target_epsilon"])
        if rows:
            ax.errorbar([a["epsilon_mean"] for a in rows], [a["accuracy_mean"] for a in rows],
                        yerr=[a["accuracy_std"] for a in rows], marker=marker, capsize=3,
                        label=f"DP-FedAvg, {clipping} clipping")
    for a in arms:
        if a.get("noise_cohort"):
            ax.errorbar([a["epsilon_mean"]], [a["accuracy_mean"]], yerr=[a["accuracy_std"]],
                        marker="*", markersize=10, linestyle="none", capsize=3,
                        label=f"noise as if cohort {a['noise_cohort']} "
                              f"(N={a['accounting_population']})")
    styles = {"non_private": ("k", "--", "non-private"),
              "clip_only": ("gray", ":", "clip only (fixed)"),
              "clip_only_adaptive": ("tab:olive", ":", "clip only (adaptive)")}
    for a in arms:
        if a["name"] in styles:
            color, style, label = styles[a["name"]]
            ax.axhline(a["accuracy_mean"], color=color, linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta = 1e-5, RDP accountant)")
    ax.set_ylabel("test accuracy (10k central test)")
    s = report["settings"]
    ax.set_title(f"Fashion-MNIST, {s['num_clients']} IID clients, Poisson q={s['q']:g}, "
                 f"{s['model']}, {s['rounds']} rounds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="logistic", choices=["logistic", "mlp"])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--num-clients", type=int, default=1000)
    parser.add_argument("--expected-cohort", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--client-execution", default="vmap", choices=["vmap", "map", "auto"])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--clippings", nargs="+", default=["fixed", "adaptive"],
                        choices=["fixed", "adaptive"])
    parser.add_argument("--noise-cohort", type=int, default=0)
    parser.add_argument("--noise-cohort-epsilon", type=float, default=2.0)
    parser.add_argument("--noise-population", type=int, default=50000,
                        help="assumed production population for the noise-cohort arm's "
                             "accounting (q = noise_cohort / this)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="*", default=None, help="run only these arm names")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP-order warnings
    started = time.perf_counter()
    peak = matmul_peak()
    print(f"matmul peak {peak['median_gflops']:.1f} GFLOP/s (f32 2048^2, median)", flush=True)
    dataset = load_dataset("fashion_mnist", data_dir=args.data_dir, partition="iid",
                           num_clients=args.num_clients, seed=0)
    info = dataset.info
    model = create_model(args.model, num_classes=info["num_classes"],
                         input_shape=tuple(info["input_shape"]))
    population = dataset.train.num_clients
    sizes = np.asarray(dataset.train.client_sizes)
    arms = build_arms(args, population)
    results: list[dict[str, Any]] = []
    for arm in arms:
        runs = []
        for seed in args.seeds:
            run = run_arm(arm, dataset, model, args, seed)
            runs.append(run)
            print(f"{arm['name']:34s} seed {seed} acc {run['accuracy']:.4f} "
                  f"eps {run['epsilon']} z {arm['noise_multiplier']} {run['seconds']} s "
                  f"(first round {run['first_round_s']} s) "
                  f"{run['last_round_metrics']}", flush=True)
        accuracies = [r["accuracy"] for r in runs]
        epsilons = [r["epsilon"] for r in runs if isinstance(r["epsilon"], float)]
        results.append({
            **{k: v for k, v in arm.items() if k != "aggregator"},
            "accuracy_mean": round(float(np.mean(accuracies)), 4),
            "accuracy_std": round(float(np.std(accuracies)), 4),
            "epsilon_mean": round(float(np.mean(epsilons)), 4) if epsilons else None,
            "mechanisms": runs[0]["mechanisms"],
            "accounting": runs[0]["accounting"],
            "seconds_total": round(sum(r["seconds"] for r in runs), 1),
            "runs": runs,
        })
    report = {
        "benchmark": "privacy",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": peak,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "dataset": "fashion_mnist", "partition": "iid", "num_clients": population,
            "examples_per_client": [int(sizes.min()), int(sizes.max())],
            "sampler": "poisson", "expected_cohort": args.expected_cohort,
            "q": args.expected_cohort / population,
            "cohort_cap": poisson_cap(population, args.expected_cohort / population),
            "model": args.model, "rounds": args.rounds, "eval_every": args.eval_every,
            "batch_size": args.batch_size, "client_execution": args.client_execution,
            "local_epochs": 1,
            "local_steps": int(np.ceil(sizes.max() / args.batch_size)),
            "client_optimizer": f"sgd(lr={args.client_lr})",
            "server_optimizer": f"sgd(lr={args.server_lr}, momentum={args.server_momentum})",
            "clip_norm": args.clip_norm, "adaptive": {"target_quantile": 0.5,
                                                      "count_stddev": args.expected_cohort / 20,
                                                      "clip_learning_rate": 0.2,
                                                      "initial_clip_norm": args.clip_norm},
            "delta": args.delta, "accountant": "rdp", "seeds": args.seeds,
            "accuracy": "mean of the last two evaluations on the 10k central test set",
            "command": "FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python "
                       + " ".join(sys.argv),
        },
        "arms": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_report(report, args.out, "privacy-")
    plot(report, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
