"""The demo's held-out evaluation with the char-LSTM's forward before and after.

Evaluated without a gradient, `fedjax_sim.models.lstm.fused_lstm` now computes each step's input
projection inside the recurrence's loop; before, it computed every step's projection first, as
one ``[T, B, 4H]`` array (84 MB at the demo's evaluation batch), then ran the recurrence over it,
as it still does under a gradient. The two give the same results here (``same_results``). The
workload is `fedjax-sim demo`'s evaluation (`configs/shakespeare_fedavg.yaml`:
the char-LSTM of 128 units, the Shakespeare test split that ships in the repository, batches of
512 sequences of 80 characters), both arms alternating ``--repeats`` times in one process, each
timed as the median of ``--calls`` evaluations after a warm-up call. GFLOP/s = the forward's
analytical matmul FLOPs over every position (padding included) / time; the f32 matmul peak is
measured in the same run.

  python benchmarks/lstm_eval.py [--repeats 3] [--calls 3]

Writes ``benchmarks/results/lstm_eval-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim.config import load_config  # noqa: E402
from fedjax_sim.models import create_model, lstm  # noqa: E402
from fedjax_sim.models.char_lstm import CharLSTM  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "shakespeare_fedavg.yaml"


def previous_fused_lstm(x, wi, bias, wh):
    """The forward as it was: every step's projection first, then the recurrence."""
    return jnp.swapaxes(lstm.lstm_recurrence(lstm._projection(x, wi) + bias, wh), 0, 1)


def build_evaluator(model, arrays, batch_size: int, previous: bool):
    """The evaluator, compiled with the previous forward when ``previous`` (patched for its
    trace only: the compiled program keeps it)."""
    evaluate = fs.make_evaluator(model, arrays, batch_size=batch_size)
    current = lstm.fused_lstm
    if previous:
        lstm.fused_lstm = previous_fused_lstm
    try:
        params = model.init(jax.random.key(0))
        result = jax.device_get(evaluate(params))
    finally:
        lstm.fused_lstm = current
    return evaluate, params, result


def forward_gflop(arrays, hidden: int, embed: int, vocab: int, batch_size: int) -> float:
    sequences = -(-len(arrays["x"]) // batch_size) * batch_size
    positions = sequences * arrays["x"].shape[1]
    per_position = 2 * (embed * 4 * hidden + hidden * 4 * hidden + hidden * vocab)
    return positions * per_position / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    config = load_config(CONFIG)
    peak = matmul_peak()
    print(f"f32 matmul peak: {peak['median_gflops']:.0f} GFLOP/s")
    dataset = fs.load_dataset(config.dataset.name, **config.dataset.options)
    info = dataset.info
    hidden = config.model.options["hidden"]
    batch_size = config.eval.batch_size
    # A model object per arm: the evaluator's jit caches its program per model object.
    arms = {name: build_evaluator(
        create_model(config.model.name, num_classes=info["num_classes"],
                     input_shape=info["input_shape"], input_dtype="int32",
                     pad_label=info["pad_label"], **config.model.options),
        dataset.test.arrays, batch_size, name == "previous") for name in ("previous", "current")}
    same = all(np.array_equal(arms["previous"][2][k], arms["current"][2][k])
               for k in arms["current"][2])
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (evaluate, params, _) in arms.items():
            for _ in range(args.calls):
                start = time.perf_counter()
                jax.block_until_ready(evaluate(params))
                times[name].append(time.perf_counter() - start)
    gflop = forward_gflop(dataset.test.arrays, hidden, CharLSTM.embed_dim, info["num_classes"],
                          batch_size)
    report = {
        "benchmark": "lstm_eval",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/lstm_eval.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul": peak,
        "workload": {"config": str(CONFIG.name), "sequences": int(len(dataset.test.arrays["x"])),
                     "sequence_length": int(dataset.test.arrays["x"].shape[1]),
                     "batch_size": batch_size, "model": dict(config.model.options),
                     "forward_gflop": gflop},
        "same_results": bool(same),
        "results": {k: float(v) for k, v in arms["current"][2].items()},
        "arms": {},
    }
    for name, ts in times.items():
        median = float(np.median(ts))
        report["arms"][name] = {"seconds": ts, "median_s": median,
                                "gflops_per_s": gflop / median,
                                "matmul_peak_fraction": gflop / median / peak["median_gflops"]}
        print(f"{name:9s} {median:6.3f} s  {gflop / median:6.1f} GFLOP/s")
    report["previous_over_current"] = (report["arms"]["previous"]["median_s"]
                                       / report["arms"]["current"]["median_s"])
    print(f"previous / current: {report['previous_over_current']:.2f}x; same results: {same}")
    print(f"wrote {write_report(report, args.out, 'lstm_eval-')}")


if __name__ == "__main__":
    main()
