"""Gradient convolutions inside a `lax.scan` on XLA:CPU: `lax.conv` vs `canonical_conv`.

Times 5 SGD steps of the EMNIST CNN (batch 20, 28x28x1, 62 classes) run as one jitted
`lax.scan`, with the plain `lax.conv_general_dilated` and with `fedjax_sim.models.canonical_conv`
(jax issue #12868), and, as the reference speed, the plain conv with the scan unrolled; prints
the ratio and writes
``benchmarks/results/conv_in_scan-<date>-<hostname>.json``.

Usage: python benchmarks/conv_in_scan.py [--repeats 10]
"""

from __future__ import annotations

import os

# Set before jax is imported: XLA:CPU's YNN fusion of single convolutions is slower here.
_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from round_throughput import cpu_model, matmul_peak  # noqa: E402  (a sibling script)

from fedjax_sim.models import EmnistCNN, canonical_conv  # noqa: E402

STEPS, BATCH = 5, 20


def time_sgd_scan(conv, repeats: int, unroll: bool = False) -> dict[str, float]:
    """Compile time and per-call wall times (ms) of 5 scanned SGD steps with ``conv``.

    ``unroll=True`` unrolls the scan into the entry computation, where XLA canonicalizes every
    convolution: the reference speed.
    """
    module = EmnistCNN(num_classes=62, dropout=False, conv_general_dilated=conv)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(STEPS, BATCH, 28, 28, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 62, size=(STEPS, BATCH)), jnp.int32)
    params = module.init(jax.random.key(0), xs[0])["params"]

    def loss(p, x, y):
        logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(p, batch):
        grads = jax.grad(loss)(p, *batch)
        return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads), None

    run = jax.jit(lambda p: lax.scan(step, p, (xs, ys), unroll=unroll)[0])
    start = time.perf_counter()
    compiled = run.lower(params).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(1000 * (time.perf_counter() - start))
    return {
        "compile_s": compile_s,
        "median_ms": float(np.median(times)),
        "min_ms": float(np.min(times)),
        "times_ms": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    timings = {
        "lax_conv": time_sgd_scan(lax.conv_general_dilated, args.repeats),
        "canonical_conv": time_sgd_scan(canonical_conv, args.repeats),
        "lax_conv_unrolled": time_sgd_scan(lax.conv_general_dilated, args.repeats, unroll=True),
    }
    ratio = timings["lax_conv"]["median_ms"] / timings["canonical_conv"]["median_ms"]
    for name, t in timings.items():
        print(f"{name:>17}: {t['median_ms']:9.1f} ms median ({t['compile_s']:.1f} s compile)")
    print(f"lax.conv / canonical_conv = {ratio:.1f}x  ({STEPS} SGD steps, batch {BATCH}, in scan)")

    host = socket.gethostname()
    result = {
        "benchmark": "conv_in_scan",
        "setup": {"model": "EmnistCNN(62, dropout=False)", "steps": STEPS, "batch": BATCH},
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "hostname": host,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
        },
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "timings": timings,
        "ratio_lax_over_canonical": ratio,
    }
    date = datetime.date.today().isoformat()
    path = pathlib.Path(__file__).parent / "results" / f"conv_in_scan-{date}-{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
