"""Where the EMNIST CNN round's first call goes: tracing, lowering, XLA's compile, the first run.

The peers workload's CNN round (`round_throughput.py`'s ``emnist-cnn-fedavg``: 10 clients x 100
Fashion-MNIST images, batch 20, one epoch, the sequential client map), each arm a fresh process,
interleaved, ``--repeats`` times:

* ``default``: XLA:CPU as `fedjax-sim run` compiles the round (the MLIR fusion emitters).
* ``legacy emitters``: the same program with ``xla_cpu_use_fusion_emitters=False`` as a
  per-program compiler option: the bits are the same (the check below, and
  ``tests/test_fusion_emitters.py``); the test suite compiles with these.
* ``threefry stubbed`` (diagnostic, wrong random bits): JAX's CPU lowering of ``threefry2x32``
  replaced by one xor per word, to show what the round's threefry call sites cost to compile.

Per arm and repetition: seconds to trace, lower and compile the round (``jit.trace``,
``.lower``, ``.compile``), the first call's run and the median of the later rounds (3 for the
CNN, 10 for the MLP, 50 for logistic regression), the number of fusions and while loops in the
compiled program, and a digest of the parameters after them (equal digests = the same bits).
``--workload`` picks another of `round_throughput.py`'s workloads (the logistic regression, the
MLP of the padding workload); the legacy emitters are what `create_model` gives these three
models (`Model.compiler_options`); the step here is built without them, so that the arms
differ only in the options each compile passes. The wall clock starts after the data and the initial
parameters are made, as `peers/run_peers.py`'s first round does.

  python benchmarks/first_round.py [--data-dir DIR] [--repeats 3] [--workload W] [--out PATH]

Writes ``benchmarks/results/first_round-<date>-<machine>.json`` (the CNN) or
``first_round-<workload>-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import fedjax_sim  # first: sets the XLA:CPU flags before jax starts

# isort: split

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import round_throughput as rt  # noqa: E402

ARMS = {
    "default": {},
    "legacy emitters": {"xla_cpu_use_fusion_emitters": False},
    "threefry stubbed": {},
}
STUB = "threefry stubbed"
PREFIX = "FIRST_ROUND_JSON "
# Rounds timed after the first (their median is "later"): logistic regression's take ms.
LATER_ROUNDS = {rt.CNN: 3, rt.LOGREG: 50, rt.PADDING: 10}


def _stub_threefry() -> None:
    """Diagnostic only: threefry2x32 on CPU lowered to one xor per word (wrong bits)."""
    from jax.extend.random import threefry2x32_p
    from jax.interpreters import mlir

    def stub(k1, k2, x1, x2):
        return [x1 ^ k1, x2 ^ k2]

    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(stub, multiple_results=True),
                           platform="cpu")


def child(arm: str, data_dir: str, workload_name: str) -> None:
    if arm == STUB:
        _stub_threefry()
    workload = rt.SPECS[workload_name]
    images, _ = rt.load_fashion_mnist_arrays(data_dir)
    train, model = rt.build_data(workload, images), rt.build_model(workload)
    params = jax.block_until_ready(model.init(jax.random.PRNGKey(0)))
    start = time.perf_counter()
    algorithm = fedjax_sim.fed_avg(model, optax.sgd(rt.CLIENT_LR), optax.sgd(rt.SERVER_LR))
    schedule = fedjax_sim.ClientSchedule.from_sizes(
        train.client_sizes, workload.batch_size, local_epochs=workload.local_epochs)
    sampler = fedjax_sim.uniform_sampler(train.num_clients, workload.cohort_size)
    step = fedjax_sim.build_round_step(algorithm, train, schedule, sampler,
                                       workload.cohort_size, client_execution="map")
    state = step.place(fedjax_sim.init_simulation_state(algorithm.init(params), 0))
    built = time.perf_counter()
    traced = step.jitted.trace(state, step.data, step.offsets)
    t_traced = time.perf_counter()
    lowered = traced.lower()
    t_lowered = time.perf_counter()
    compiled = lowered.compile(ARMS[arm] or None)
    t_compiled = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, step.data, step.offsets))
    t_first = time.perf_counter()
    runs = []
    for _ in range(LATER_ROUNDS[workload_name]):
        run_start = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, step.data, step.offsets))
        runs.append(time.perf_counter() - run_start)
    text = compiled.as_text()
    digest = hashlib.sha256(b"".join(
        np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(state.algorithm))).hexdigest()
    print(PREFIX + json.dumps({
        "build_s": built - start, "trace_s": t_traced - built, "lower_s": t_lowered - t_traced,
        "compile_s": t_compiled - t_lowered, "first_run_s": t_first - t_compiled,
        "first_round_s": t_first - start, "later_round_median_s": float(np.median(runs)),
        "fusions": text.count(" fusion("), "while_loops": text.count(" while("),
        "params_sha256_after_later_rounds": digest[:16],
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"),
                        help="root data folder holding fashion-mnist/ (default: $FEDJAX_SIM_DATA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", choices=list(LATER_ROUNDS), default=rt.CNN,
                        help="a round_throughput.py workload (default: the CNN)")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give --data-dir (the folder holding fashion-mnist/) or set FEDJAX_SIM_DATA")
    if args.child:
        child(args.child, args.data_dir, args.workload)
        return
    peak_before = rt.matmul_peak()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", arm, "--data-dir", args.data_dir,
                 "--workload", args.workload],
                capture_output=True, text=True, check=False)
            line = next((x for x in done.stdout.splitlines() if x.startswith(PREFIX)), None)
            if line is None:
                raise SystemExit(f"{arm}: rc={done.returncode}\n{done.stderr[-3000:]}")
            result = json.loads(line[len(PREFIX):])
            results[arm].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {arm:<17} trace {result['trace_s']:.2f} "
                  f"lower {result['lower_s']:.2f} compile {result['compile_s']:.2f} "
                  f"first run {result['first_run_s']:.2f} first round "
                  f"{result['first_round_s']:.2f} s, later {result['later_round_median_s']:.3f}"
                  f" s, {result['fusions']} fusions, {result['while_loops']} while loops",
                  flush=True)
    peak_after = rt.matmul_peak()
    keys = ("trace_s", "lower_s", "compile_s", "first_run_s", "first_round_s",
            "later_round_median_s")
    summary = {arm: {f"{k}_median": float(np.median([r[k] for r in rs])) for k in keys}
               for arm, rs in results.items()}
    digests = {arm: sorted({r["params_sha256_after_later_rounds"] for r in rs})
               for arm, rs in results.items()}
    same_bits = digests["default"] == digests["legacy emitters"] and len(digests["default"]) == 1
    report = {
        "benchmark": "first_round",
        "date": datetime.date.today().isoformat(),
        "machine": rt.machine_info(),
        "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after,
        "workload": args.workload,
        "repeats": args.repeats,
        "arms": {arm: {"compiler_options": ARMS[arm], "runs": results[arm],
                       "summary": summary[arm]} for arm in ARMS},
        "legacy_emitters_same_bits_as_default": same_bits,
        "notes": "each arm and repetition a fresh process; first round = build + trace + lower"
                 " + compile + first run; 'threefry stubbed' computes wrong random bits"
                 " (diagnostic of the threefry call sites' compile cost only)",
    }
    prefix = "first_round-" if args.workload == rt.CNN else f"first_round-{args.workload}-"
    out = rt.write_report(report, args.out, prefix)
    print(f"\nmatmul {peak_before['median_gflops']:.0f} / {peak_after['median_gflops']:.0f} "
          f"GFLOP/s before/after; legacy emitters the same bits: {same_bits}")
    for arm in ARMS:
        s = summary[arm]
        print(f"{arm:<17} first round {s['first_round_s_median']:.2f} s = trace "
              f"{s['trace_s_median']:.2f} + lower {s['lower_s_median']:.2f} + compile "
              f"{s['compile_s_median']:.2f} + first run {s['first_run_s_median']:.2f}; later "
              f"{s['later_round_median_s_median']:.3f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
