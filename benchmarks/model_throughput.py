"""Per-step training time of the benchmark models: one client's local SGD as one jitted scan.

Times ``--steps`` SGD steps (optax.sgd, the masked model loss local training uses) run as one
jitted `lax.scan`, on random data of each benchmark's shape, and reports the median time per
step over ``--repeats`` calls (after one warm-up call), plus compile time:

* ``resnet18_gn``: TFF's GroupNorm ResNet-18, 24x24x3 CIFAR-100 crops, 100 classes, batch 20;
* ``stackoverflow_lstm``: the next-word LSTM, 20 tokens, 10,004 ids, batch 16;
* ``tag_logistic``: the tag-prediction logistic regression, 20 tokens, 500 tags, batch 20 and
  100 (TFF's tag-prediction clients use 100).

``--compare-onednn`` adds the ResNet with ``conv="onednn"`` (oneDNN's convolution kernels as
XLA:CPU custom calls, `fedjax_sim.models.onednn`). ``--compare-lax-conv`` adds the ResNet with
plain `lax.conv_general_dilated` (one step: on
XLA:CPU its gradient convolutions inside a scan compile to naive loops, jax issue #12868).
The load average is recorded: on a shared machine it explains noisy numbers.

Usage: python benchmarks/model_throughput.py [--steps 5] [--repeats 5] [--only NAME ...]
    [--compare-lax-conv] [--compare-onednn] [--out PATH]

Writes ``benchmarks/results/model_throughput-<date>-<machine>.json`` (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time
from typing import Any

import fedjax_sim  # noqa: F401  first: sets the XLA:CPU convolution flag before jax starts

# isort: split

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from round_throughput import machine_info, matmul_peak, write_report  # a sibling script

from fedjax_sim.algorithms.local import model_loss
from fedjax_sim.models import Model, create_model

# name -> (create_model kwargs, batch sizes)
WORKLOADS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "resnet18_gn": ({"num_classes": 100, "input_shape": (24, 24, 3)}, (20,)),
    "stackoverflow_lstm": (
        {"num_classes": 10_004, "input_shape": (20,), "input_dtype": "int32", "pad_label": 0},
        (16,),
    ),
    "tag_logistic": (
        {"num_classes": 500, "input_shape": (20,), "input_dtype": "int32"},
        (20, 100),
    ),
}


def random_batches(model: Model, steps: int, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    """``{"x": [S, B, ...], "y": [S, B, ...]}`` shaped like the model's benchmark data."""
    rng = np.random.default_rng(seed)
    shape = (steps, batch, *model.sample_input.shape[1:])
    if np.issubdtype(model.sample_input.dtype, np.integer):
        x = rng.integers(1, 10_001, size=shape).astype(np.int32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    if model.task == "multilabel":
        y = rng.integers(0, model.num_classes, size=(steps, batch, 5)).astype(np.int32)
        y[..., 3:] = -1  # up to 5 tags; 3 here
    elif model.name == "stackoverflow_lstm":
        y = rng.integers(1, model.num_classes, size=x.shape).astype(np.int32)
    else:
        y = rng.integers(0, model.num_classes, size=(steps, batch)).astype(np.int32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def time_local_sgd(model: Model, steps: int, batch: int, repeats: int) -> dict[str, Any]:
    """Compile time and per-step wall time of ``steps`` scanned SGD steps."""
    loss_fn = model_loss(model)
    optimizer = optax.sgd(0.01)
    data = random_batches(model, steps, batch)
    mask = jnp.ones((batch,), bool)

    def step(carry, batch_and_key):
        params, opt_state = carry
        batch_data, key = batch_and_key
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, batch_data, mask, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), stats["loss_sum"]

    def train(params):
        keys = jax.random.split(jax.random.key(1), steps)
        (params, _), losses = lax.scan(step, (params, optimizer.init(params)), (data, keys))
        return params, losses

    params = jax.jit(model.init)(jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(train).lower(params).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - start)
    step_ms = [1000 * t / steps for t in times]
    median = float(np.median(step_ms))
    return {
        "batch": batch,
        "steps_per_call": steps,
        "compile_s": round(compile_s, 3),
        "step_ms_median": round(median, 3),
        "step_ms_min": round(float(np.min(step_ms)), 3),
        "step_ms": [round(t, 3) for t in step_ms],
        "examples_per_s": round(1000 * batch / median, 1),
        "params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--compare-lax-conv", action="store_true")
    parser.add_argument("--compare-onednn", action="store_true",
                        help="add the ResNet with conv='onednn' (oneDNN's convolution kernels)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    results = []
    for name in args.only or WORKLOADS:
        kwargs, batches = WORKLOADS[name]
        model = create_model(name, **kwargs)
        for batch in batches:
            row = {"model": name, **time_local_sgd(model, args.steps, batch, args.repeats)}
            results.append(row)
            print(
                f"{name:>20} batch {batch:>3}: {row['step_ms_median']:9.1f} ms/step "
                f"({row['examples_per_s']:.0f} examples/s, compile {row['compile_s']:.1f} s, "
                f"load {row['load_average_1m']})",
                flush=True,
            )
    if args.compare_lax_conv:
        kwargs, (batch, *_) = WORKLOADS["resnet18_gn"]
        model = create_model("resnet18_gn", **kwargs, conv_general_dilated=lax.conv_general_dilated)
        row = {"model": "resnet18_gn (lax.conv)", **time_local_sgd(model, 1, batch, 1)}
        results.append(row)
        print(f"resnet18_gn, lax.conv, batch {batch}: {row['step_ms_median']:9.1f} ms/step")

    if args.compare_onednn:
        from fedjax_sim.models import onednn

        kwargs, (batch, *_) = WORKLOADS["resnet18_gn"]
        if onednn.available():
            model = create_model("resnet18_gn", **kwargs, conv="onednn")
            row = {"model": "resnet18_gn (oneDNN)",
                   **time_local_sgd(model, args.steps, batch, args.repeats)}
            results.append(row)
            print(f"resnet18_gn, oneDNN, batch {batch}: {row['step_ms_median']:9.1f} ms/step")
        else:
            print(f"no oneDNN row: {onednn.unavailable_reason()}")

    report = {
        "benchmark": "model_throughput",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/model_throughput.py " + " ".join(sys.argv[1:]),
        "setup": {"steps_per_call": args.steps, "repeats": args.repeats, "optimizer": "sgd"},
        "machine": machine_info(),
        "matmul_peak": matmul_peak(),  # f32 GFLOP/s of this machine, measured in this run
        "results": results,
    }
    path = write_report(report, args.out, "model_throughput-")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
