"""How long the test suite takes cold, with the suite's LLVM settings and with XLA's defaults.

The suite (`tests/conftest.py`) compiles with LLVM at -O1 and one LLVM module a program
(``--xla_backend_optimization_level=1 --xla_cpu_parallel_codegen_split_count=1``);
``FEDJAX_SIM_TEST_BACKEND_OPT=default`` keeps XLA's defaults (level 3, split modules). Each arm
runs the README's test command, ``python -m pytest -n 2 tests``, in a subprocess with an empty
JAX compilation cache of its own (a fresh clone's first run), one arm after the other; the
matmul peak is measured before and after. A failed run is reported as such, with its time.

  python benchmarks/suite_time.py [--arms suite,xla-defaults] [--out PATH]

Writes ``benchmarks/results/suite_time-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

# The environment the suite would get from a shell: before importing jax here adds XLA flags.
_SHELL_ENV = dict(os.environ)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ARMS = {"suite": {}, "xla-defaults": {"FEDJAX_SIM_TEST_BACKEND_OPT": "default"}}
COMMAND = [sys.executable, "-m", "pytest", "-n", "2", "tests", "-q"]


def run_arm(name: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**_SHELL_ENV, **ARMS[name], "FEDJAX_SIM_TEST_JAX_CACHE": cache}
        start = time.perf_counter()
        done = subprocess.run(COMMAND, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?)", tail)}
    reported = re.search(r" in ([\d.]+)s", tail)
    return {"env": ARMS[name], "returncode": done.returncode, "wall_s": wall,
            "pytest_s": float(reported.group(1)) if reported else None, "counts": counts,
            "summary": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated, in order (of {', '.join(ARMS)})")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; expected some of {list(ARMS)}")
    before = matmul_peak()
    print(f"{machine_info()['cpu']}: f32 matmul {before['median_gflops']:.1f} GFLOP/s",
          flush=True)
    results = {}
    for arm in arms:
        results[arm] = run_arm(arm)
        print(f"{arm}: {results[arm]['summary']} ({results[arm]['wall_s']:.0f} s wall)",
              flush=True)
    after = matmul_peak()
    print(f"f32 matmul after: {after['median_gflops']:.1f} GFLOP/s", flush=True)
    report = {
        "benchmark": "suite_time",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/suite_time.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul": before,
        "matmul_after": after,
        "test_command": " ".join(COMMAND[1:]),
        "arms": results,
    }
    if "suite" in results and "xla-defaults" in results:
        report["xla_defaults_over_suite"] = (results["xla-defaults"]["wall_s"]
                                             / results["suite"]["wall_s"])
    print(f"wrote {write_report(report, args.out, 'suite_time-')}", flush=True)


if __name__ == "__main__":
    main()
