"""The shipped demo and Fashion-MNIST configs, run in full on real data, with their acceptance bars.

What the README's "Measured" table quotes comes from the JSON this writes: accuracy, rounds,
seconds per round and total time of

* ``fedjax-sim demo`` (FedAvg, Shakespeare by role, char-LSTM; data ships in the repo), bar: 40%
  held-out next-character accuracy;
* ``configs/fashion_mnist_fedavg.yaml``, bar: 88% test accuracy;
* ``configs/fashion_mnist_fedadam.yaml`` (no bar; reported),

next to the machine's CPU name and its f32 matmul GFLOP/s measured before and after the runs
(the machines here differ up to 3x, and a loaded machine shows in the two peaks), and the time
to each bar: at most the command's time outside its training loop plus the loop's clock at the
first evaluation at or above the bar.

  FEDJAX_SIM_DATA=../shared/data python benchmarks/demos.py [--only demo fashion_mnist_fedavg]

Every run compiles from scratch, as a new user's first run does: JAX's persistent compilation
cache, which the ``fedjax-sim`` commands turn on, is off here unless
``FEDJAX_SIM_COMPILATION_CACHE`` names a folder. Exits 1 when a run misses its bar. These were
end-to-end tests (about 16 minutes of the suite on 2 cores); they are a benchmark because the
suite must stay short.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("FEDJAX_SIM_COMPILATION_CACHE", "off")  # cold: a first run's compile

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

from fedjax_sim.sharding import request_cpu_devices, usable_cores  # noqa: E402

# The CPU devices a fresh `fedjax-sim demo` process creates (execution.num_devices: auto), asked
# for before the matmul peak starts JAX in this process; runs with one device use the first.
request_cpu_devices(usable_cores())

from fedjax_sim.cli import main as cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {
    # name: (command line, accuracy key, bar or None)
    "demo": (["demo"], "test/accuracy", 0.40),
    "fashion_mnist_fedavg": (["run", str(ROOT / "configs" / "fashion_mnist_fedavg.yaml")],
                             "test/accuracy", 0.88),
    "fashion_mnist_fedadam": (["run", str(ROOT / "configs" / "fashion_mnist_fedadam.yaml")],
                              "test/accuracy", None),
}


def run_one(name: str, workdir: pathlib.Path) -> dict:
    command, key, bar = RUNS[name]
    start = time.perf_counter()
    code = cli([*command, "log.progress=false", "log.plot=false", "--workdir", str(workdir)])
    wall = time.perf_counter() - start
    if code != 0:
        return {"command": " ".join(command), "exit_code": code, "passed": False}
    summary = json.loads((workdir / "summary.json").read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    curve = [(row["round"], row[key]) for row in rows if key in row]
    accuracy = summary["final"][key]
    reached = [row for row in rows if key in row and bar is not None and row[key] >= bar]
    # An upper bound: everything outside the training loop (start-up, data, building, the
    # final writes) plus the loop's clock at the first evaluation at or above the bar.
    to_bar = (round(wall - summary["train_seconds"] + reached[0]["wall_time"], 2)
              if reached else None)
    return {
        "command": "fedjax-sim " + " ".join(c.replace(str(ROOT) + "/", "") for c in command),
        "rounds": summary["rounds"],
        key: accuracy,
        "bar": bar,
        "passed": bar is None or accuracy >= bar,
        "first_round_seconds": summary.get("first_round_seconds"),
        "seconds_per_round": summary.get("seconds_per_round"),
        "train_seconds": summary.get("train_seconds"),
        "total_seconds": round(wall, 2),
        "seconds_to_bar_at_most": to_bar,
        "round_reaching_bar": reached[0]["round"] if reached else None,
        "devices": summary.get("devices"),
        "learning_curve": curve,
        "config": (workdir / "config.yaml").read_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if "FEDJAX_SIM_DATA" not in os.environ and any(n != "demo" for n in args.only):
        shared = ROOT.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["FEDJAX_SIM_DATA"] = str(shared)
    report = {
        "benchmark": "demos",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/demos.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul_before": matmul_peak(),
        "runs": {},
    }
    print(f"machine: {report['machine']['cpu']}, f32 matmul "
          f"{report['matmul_before']['median_gflops']:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result = run_one(name, pathlib.Path(tmp) / name)
            report["runs"][name] = result
            shown = {k: v for k, v in result.items() if k not in ("learning_curve", "config")}
            print(f"{name}: {shown}", flush=True)
    report["matmul_after"] = matmul_peak()
    path = write_report(report, args.out, "demos-")
    print(f"wrote {path}")
    failed = [name for name, result in report["runs"].items() if not result["passed"]]
    if failed:
        print(f"below the bar: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
