"""Robustness: every attack x every defence on Fashion-MNIST, 10% and 20% malicious clients.

Fashion-MNIST's 60,000 training images split over ``--num-clients`` (100) clients by Dirichlet
(0.5) label skew; FedAvg (client SGD, ``--local-steps`` steps of batch ``--batch-size``, server
SGD lr 1) of ``--model`` (logistic regression by default, to fit the 2-core budget) with a
uniform cohort of ``--cohort`` (20) clients a round for ``--rounds`` rounds. Every arm of a
fraction sees the same malicious clients (`choose_malicious` from seed 0), the same cohorts and
the same initial parameters.

Attacks (`fedjax_sim.attacks`): none, label flipping, sign flipping (``-4 x``: at 20% the
flipped updates cancel the honest ones in a mean), scaled updates (``10 x``), Gaussian updates
(std 1 per coordinate), "A Little Is Enough" (z from the paper's formula), and the backdoor by
model replacement (half of each attacker's images carry a 4x4 trigger relabelled class 0;
updates boosted by n / m).

Defences (`fedjax_sim.aggregators`): mean (the weighted mean), median, trimmed mean (beta
0.2), Multi-Krum (f = the expected attackers per cohort, m = cohort - 2f), geometric median
(RFA, 10 smoothed Weiszfeld steps) and norm bounding (``--max-norm`` 0.5, about the honest
updates' norm here, then the weighted mean).

Reported: test accuracy on the 10,000 central test images at the last round (and the mean of
the last three evaluations), and for the backdoor the backdoor accuracy (triggered test images
of classes other than 0 classified as 0).

Usage::

  FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python benchmarks/robustness.py [--rounds 100]

Writes ``benchmarks/results/robustness-<YYYY-MM-DD>-<machine>.json`` and prints a table.
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

from fedjax_sim import aggregators as agg
from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.attacks import create_attack, prepend
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.datasets import load_dataset
from fedjax_sim.models import create_model
from fedjax_sim.simulation.evaluation import make_evaluator
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

ATTACKS = {
    "none": None,
    "label_flip": {},
    "sign_flip": {"scale": 4.0},
    "scaled": {"scale": 10.0},
    "gaussian": {"stddev": 1.0},
    "little_is_enough": {},
    "backdoor": {"target": 0, "poison_fraction": 0.5},
}
DEFENCES = ("mean", "median", "trimmed_mean", "krum", "geometric_median", "norm_bound")


def defence_stages(name: str, fraction: float, args) -> tuple[list, dict[str, Any]]:
    """The aggregator stages of a defence and its settings (for the JSON)."""
    if name == "mean":
        return [agg.mean()], {}
    if name == "median":
        return [agg.median()], {}
    if name == "trimmed_mean":
        return [agg.trimmed_mean(args.beta)], {"beta": args.beta}
    if name == "krum":
        f = max(int(round(fraction * args.cohort)), 1)
        m = max(args.cohort - 2 * f, 1)
        return [agg.krum(f, multi=m)], {"num_byzantine": f, "multi": m}
    if name == "geometric_median":
        return [agg.geometric_median(10)], {"iterations": 10, "smoothing": 1e-6}
    if name == "norm_bound":
        return [agg.norm_bound(args.max_norm), agg.mean()], {"max_norm": args.max_norm}
    raise ValueError(name)


def run_arm(dataset, model, attack_name: str, fraction: float, defence: str, args,
            test_set, trigger) -> dict[str, Any]:
    train = dataset.train
    num_clients = train.num_clients
    attack = None
    if ATTACKS[attack_name] is not None:
        attack = create_attack(attack_name, num_clients, dataset.info["num_classes"], fraction,
                               args.seed, **ATTACKS[attack_name])
        if attack.poison is not None:
            train = attack.poison(train)
    stages, settings = defence_stages(defence, fraction, args)
    aggregator = agg.chain(*stages)
    if attack is not None and attack.update is not None:
        aggregator = prepend(attack.update, aggregator)
    algorithm = create_algorithm("fed_avg", model, optax.sgd(args.client_lr), optax.sgd(1.0),
                                 num_clients=num_clients, aggregator=aggregator)
    schedule = ClientSchedule.from_sizes(train.client_sizes, args.batch_size,
                                         local_steps=args.local_steps)
    round_step = build_round_step(algorithm, train, schedule,
                                  uniform_sampler(num_clients, args.cohort), args.cohort,
                                  client_execution=args.client_execution)
    params = model.init(jax.random.PRNGKey(args.seed))
    # placed where the step runs, so round 2 does not compile the step again
    state = round_step.place(init_simulation_state(algorithm.init(params), args.seed + 1))
    curve, start = [], time.perf_counter()
    metrics = {}
    for r in range(1, args.rounds + 1):
        state, metrics = round_step(state)
        if r % args.eval_every == 0 or r == args.rounds:
            point = {"round": r,
                     "accuracy": float(jax.device_get(
                         test_set(state.algorithm.params)["accuracy"]))}
            if attack_name == "backdoor":
                point["backdoor_accuracy"] = float(jax.device_get(
                    trigger(state.algorithm.params)["accuracy"]))
            curve.append(point)
    round_step.reset()
    last = {k: round(float(v), 4) for k, v in jax.device_get(metrics).items()
            if k.startswith("aggregator/")}
    accuracy = curve[-1]["accuracy"]
    result = {
        "attack": attack_name, "fraction": 0.0 if attack is None else fraction,
        "malicious_clients": 0 if attack is None else int(attack.malicious.sum()),
        "defence": defence, "defence_settings": settings,
        "accuracy": round(accuracy if np.isfinite(accuracy) else float("nan"), 4),
        "accuracy_last3": round(float(np.mean([c["accuracy"] for c in curve[-3:]])), 4),
        "last_round_aggregator_metrics": last,
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if attack_name == "backdoor":
        result["backdoor_accuracy"] = round(curve[-1]["backdoor_accuracy"], 4)
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Rows: attack and fraction; columns: defences; cells: accuracy (backdoor accuracy)."""
    lines = ["| attack | malicious | " + " | ".join(DEFENCES) + " |",
             "| --- | --- |" + " --- |" * len(DEFENCES)]
    keys = []
    for r in results:
        if (r["attack"], r["fraction"]) not in keys:
            keys.append((r["attack"], r["fraction"]))
    for attack, fraction in keys:
        cells = []
        for defence in DEFENCES:
            match = [r for r in results if (r["attack"], r["fraction"], r["defence"])
                     == (attack, fraction, defence)]
            if not match:
                cells.append("")
                continue
            r = match[0]
            cell = f"{100 * r['accuracy']:.1f}"
            if "backdoor_accuracy" in r:
                cell += f" (bd {100 * r['backdoor_accuracy']:.1f})"
            cells.append(cell)
        lines.append(f"| {attack} | {100 * fraction:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="logistic", choices=["logistic", "mlp"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.2)
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    parser.add_argument("--client-execution", default="vmap", choices=["vmap", "map", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    peak = matmul_peak()
    print(f"{machine_info()['cpu']}: f32 matmul {peak['median_gflops']:.1f} GFLOP/s "
          "(2048^2, median)", flush=True)
    dataset = load_dataset("fashion_mnist", data_dir=args.data_dir, partition="dirichlet",
                           alpha=args.alpha, num_clients=args.num_clients, seed=args.seed)
    info = dataset.info
    model = create_model(args.model, num_classes=info["num_classes"],
                         input_shape=tuple(info["input_shape"]))
    test_set = jax.jit(make_evaluator(model, dataset.central_test, batch_size=2000))
    from fedjax_sim.attacks import trigger_set

    trigger = jax.jit(make_evaluator(model, trigger_set(dataset.central_test, 0),
                                     batch_size=2000))
    results: list[dict[str, Any]] = []
    for attack in args.attacks:
        for fraction in ([0.0] if attack == "none" else args.fractions):
            for defence in args.defences:
                result = run_arm(dataset, model, attack, fraction, defence, args, test_set,
                                 trigger)
                results.append(result)
                extra = (f" backdoor {result['backdoor_accuracy']:.4f}"
                         if "backdoor_accuracy" in result else "")
                print(f"{attack:17s} {100 * fraction:3.0f}% {defence:17s} acc "
                      f"{result['accuracy']:.4f} (last3 {result['accuracy_last3']:.4f})"
                      f"{extra} {result['seconds']} s", flush=True)
    sizes = np.asarray(dataset.train.client_sizes)
    report = {
        "benchmark": "robustness",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": peak,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "dataset": "fashion_mnist", "partition": f"dirichlet(alpha={args.alpha})",
            "num_clients": dataset.train.num_clients,
            "examples_per_client": [int(sizes.min()), int(sizes.max())],
            "model": args.model, "algorithm": "fed_avg (weights: num_examples)",
            "rounds": args.rounds, "eval_every": args.eval_every,
            "cohort": f"{args.cohort} clients, uniform without replacement",
            "local_steps": args.local_steps, "batch_size": args.batch_size,
            "client_optimizer": f"sgd(lr={args.client_lr})", "server_optimizer": "sgd(lr=1.0)",
            "client_execution": args.client_execution, "seed": args.seed,
            "fractions": args.fractions,
            "attacks": {k: v for k, v in ATTACKS.items() if k in args.attacks},
            "accuracy": "10k central test set at the last round (accuracy_last3: mean of the "
                        "last three evaluations)",
            "backdoor_accuracy": "fraction of the 9,000 triggered test images of classes 1-9 "
                                 "classified as class 0",
            "command": "FEDJAX_SIM_DATA=/work/shared/data nice -n 5 python "
                       + " ".join(sys.argv),
        },
        "results": results,
        "table": table(results),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_report(report, args.out, "robustness-")
    print(report["table"])
    print(f"wrote {path} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
