"""FedBuff vs synchronous FedAvg: test accuracy against simulated wall-clock time.

Fashion-MNIST over 100 Dirichlet(0.5) clients, the 2NN MLP, 10 clients per round, 1 local epoch
of batch 20, client SGD lr 0.05; every client has a fixed log-normal speed (sigma 1: it needs
``exp(N(0, 1))`` simulated seconds per local step; the same draw for every variant). Variants:

* ``fedavg``: synchronous FedAvg (``configs/fashion_mnist_fedavg.yaml`` plus the speeds): a
  round lasts as long as its slowest client (``system/round_seconds``);
* ``fedavg_deadline``: FedAvg with a 60 s round deadline (``configs/fashion_mnist_stragglers
  .yaml`` without its dropout): stragglers send the local steps they finished in time;
* ``fedbuff``: FedBuff (``configs/fashion_mnist_fedbuff.yaml``): 30 clients in flight, a server
  update per buffer of K = 10 arrivals, staleness scaling 1/sqrt(1 + tau) (Nguyen et al. 2022,
  "Federated Learning with Buffered Asynchronous Aggregation", arXiv:2106.06639).

FedAvg runs ``--fedavg-rounds`` rounds; its simulated time is the budget the other variants run
for (capped at ``--max-rounds``). Test accuracy (the 10,000 central test images) is measured
each time the simulated clock passes one of ``--points`` evenly spaced times. Simulated time is
the system model's clock, not this machine's time (which is reported separately).

Usage::

  FEDJAX_SIM_DATA=/work/shared/data python benchmarks/fedbuff_vs_fedavg.py \\
      [--fedavg-rounds 40] [--max-rounds 600] [--points 16] [--out PATH]

Writes ``benchmarks/results/fedbuff_vs_fedavg-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import fedjax_sim  # noqa: F401  (sets the XLA:CPU flags before jax starts)

# isort: split

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

from fedjax_sim.config import load_config  # noqa: E402
from fedjax_sim.simulation.loop import build_experiment  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEEDS = ["system.speed=lognormal", "system.speed_sigma=1.0", "system.seconds_per_step=1.0"]
VARIANTS = {
    "fedavg": ("configs/fashion_mnist_fedavg.yaml", SPEEDS),
    "fedavg_deadline": ("configs/fashion_mnist_stragglers.yaml",
                        SPEEDS + ["system.deadline=60.0", "system.dropout=0.0"]),
    "fedbuff": ("configs/fashion_mnist_fedbuff.yaml", SPEEDS),
}
TARGETS = (0.75, 0.80, 0.85)


def test_accuracy(experiment, state) -> float:
    results = experiment.evaluate(state.algorithm)
    keys = [k for k in results if k.endswith("/accuracy")]
    key = "test/accuracy" if "test/accuracy" in results else sorted(keys)[0]
    return results[key]


def run_variant(name: str, budget: float | None, rounds: int, points: int) -> dict:
    """Runs one variant until its simulated time reaches ``budget`` (or ``rounds`` rounds)."""
    path, overrides = VARIANTS[name]
    config = load_config(ROOT / path, overrides + [f"rounds={rounds}", "log.progress=false"])
    experiment = build_experiment(config)
    state = experiment.init_state()
    clock, curve, staleness = 0.0, [], []
    checkpoints = [budget * (i + 1) / points for i in range(points)] if budget else []
    start = time.perf_counter()
    updates = 0
    for round_index in range(1, rounds + 1):
        state, metrics = experiment.round_step(state)
        metrics = jax.device_get(metrics)
        if "system/clock" in metrics:  # asynchronous: the algorithm keeps the clock
            clock = float(metrics["system/clock"])
            updates = int(metrics["system/updates"])
            if metrics["system/updates"] > 0 and round_index > 1:
                staleness.append(float(metrics["system/staleness"]))
        else:
            clock += float(metrics["system/round_seconds"])
            updates = round_index
        crossed = checkpoints and clock >= checkpoints[0]
        last = round_index == rounds or (budget is not None and clock >= budget)
        if crossed or last or (budget is None and round_index % max(rounds // points, 1) == 0):
            while checkpoints and clock >= checkpoints[0]:
                checkpoints.pop(0)
            curve.append({"round": round_index, "updates": updates,
                          "simulated_seconds": round(clock, 1),
                          "test_accuracy": round(test_accuracy(experiment, state), 4),
                          "machine_seconds": round(time.perf_counter() - start, 1)})
            print(f"  {name}: round {round_index}, simulated {clock:,.0f} s, test accuracy "
                  f"{curve[-1]['test_accuracy']:.4f}", flush=True)
        if last:
            break
    out = {"config": path, "overrides": overrides, "rounds": round_index,
           "server_updates": updates, "simulated_seconds": round(clock, 1),
           "machine_seconds": round(time.perf_counter() - start, 1), "curve": curve}
    if staleness:
        out["mean_staleness"] = round(sum(staleness) / len(staleness), 3)
    return out


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    """Test accuracy at the first evaluation once the clock passed ``seconds`` (None when the
    run ended before). Rounds are evaluated as they cross each point, so the model may be up to
    one round past it: longer rounds (synchronous FedAvg) overshoot more, in their favour."""
    after = [p["test_accuracy"] for p in curve if p["simulated_seconds"] >= seconds * 0.9999]
    return after[0] if after else None


def time_to(curve: list[dict], target: float) -> float | None:
    hits = [p["simulated_seconds"] for p in curve if p["test_accuracy"] >= target]
    return hits[0] if hits else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fedavg-rounds", type=int, default=40)
    parser.add_argument("--max-rounds", type=int, default=600)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)

    results = {"fedavg": run_variant("fedavg", None, args.fedavg_rounds, args.points)}
    budget = results["fedavg"]["simulated_seconds"]
    for name in ("fedavg_deadline", "fedbuff"):
        results[name] = run_variant(name, budget, args.max_rounds, args.points)
    grid = [round(budget * (i + 1) / args.points, 1) for i in range(args.points)]
    comparison = {
        "simulated_seconds": grid,
        "test_accuracy": {n: [accuracy_at(r["curve"], t) for t in grid]
                          for n, r in results.items()},
        "simulated_seconds_to_accuracy": {
            f"{t:.2f}": {n: time_to(r["curve"], t) for n, r in results.items()} for t in TARGETS
        },
    }
    report = {
        "benchmark": "fedbuff_vs_fedavg",
        "date": datetime.date.today().isoformat(),
        "command": "FEDJAX_SIM_DATA=/work/shared/data python benchmarks/fedbuff_vs_fedavg.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": "Fashion-MNIST, 100 Dirichlet(0.5) clients, MLP 200-200, 10 clients/round, "
                 "1 epoch of batch 20, client SGD 0.05, server SGD 1.0; log-normal client speeds "
                 "(exp(N(0,1)) simulated s per local step, seed 0); FedBuff concurrency 30, "
                 "buffer K=10; FedAvg deadline 60 s",
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "comparison": comparison,
        "variants": results,
    }
    out = write_report(report, args.out, "fedbuff_vs_fedavg-")
    print(f"wrote {out}")
    for n, r in results.items():
        print(f"{n:16s} rounds {r['rounds']:4d}  simulated {r['simulated_seconds']:>9,.0f} s  "
              f"accuracy by time {comparison['test_accuracy'][n]}")


if __name__ == "__main__":
    main()
