"""Where the EMNIST CNN's training step goes on CPU, and what the dropout and max-pool change did.

1. The second convolution (``[20, 26, 26, 32] -> [20, 24, 24, 64]``, 3x3, the batch of the
   peers workload), each of its three convolutions jitted alone: the forward, the weight
   gradient and the input gradient as `fedjax_sim.models.conv.canonical_conv` computes them
   (its custom VJP, one gradient kept so XLA drops the other), median ms and GFLOP/s.
2. The CNN's local training as a round runs it: 50 SGD steps (batch 20) of the 62-class EMNIST
   CNN in one jitted ``lax.scan`` with dropout on, for the model as it is and for the previous
   formulation (flax's ``jax.random.bernoulli`` mask of 32-bit words, drawn flat, and the
   autodiff gradient of the reshape + max pool), interleaved; median ms per step of each.
3. With real data (``--data-dir``, default ``$FEDJAX_SIM_DATA``; skipped without it): the
   engine's round of the peers workload (`round_throughput.py`'s ``emnist-cnn-fedavg``: 10
   clients x 5 steps of 20 Fashion-MNIST images, the sequential client map, compiled with the
   model's compiler options as `fedjax-sim run` does) against the same 50 steps as one bare
   ``lax.scan`` over those clients' batches (item 2's current arm), interleaved: what the round
   adds around the model's steps (sampling, gathers, aggregation, server update).
4. With ``--onednn-python PATH`` (a Python with PyTorch: ``bash
   benchmarks/peers/setup_torch_venv.sh`` makes ``benchmarks/peers/.venv-torch``): items 1 and 2
   run by PyTorch's CPU build, whose convolutions are oneDNN's (`peers/onednn_conv.py`, a child
   process after the XLA arms, channels-last memory, the same shapes): how far XLA:CPU's
   convolution kernels (Eigen's) are from another library's on this machine, and a PyTorch
   user's 50-step client loop on the same CNN.
5. Where oneDNN can run here (`fedjax_sim.models.onednn.available`), items 2 and 3 add the
   model with ``conv="onednn"`` (fedjax_sim calling oneDNN's kernels from its own scan).

  python benchmarks/cnn_step.py [--repeats 7] [--data-dir DIR] [--onednn-python PATH] [--out PATH]

Writes ``benchmarks/results/cnn_step-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import round_throughput as rt  # noqa: E402
from round_throughput import machine_info, matmul_peak, median_ms, write_report  # noqa: E402

from fedjax_sim.models import classifiers, onednn  # noqa: E402
from fedjax_sim.models.conv import _conv_nhwc_bwd, canonical_conv  # noqa: E402
from fedjax_sim.models.dropout import Dropout  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
STEPS, BATCH = 50, 20


def conv_ops(repeats: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (BATCH, 26, 26, 32))
    w = jax.random.normal(keys[1], (3, 3, 32, 64))
    g = jax.random.normal(keys[2], (BATCH, 24, 24, 64))
    pads = ((0, 0), (0, 0))
    ops = {
        "forward": jax.jit(lambda x, w: canonical_conv(x, w, (1, 1), "VALID",
                                                       dimension_numbers=NHWC)),
        "weight_gradient": jax.jit(
            lambda x, w, g: _conv_nhwc_bwd((1, 1), pads, None, (x, w), g)[1]),
        "input_gradient": jax.jit(
            lambda x, w, g: _conv_nhwc_bwd((1, 1), pads, None, (x, w), g)[0]),
    }
    flops = 2.0 * BATCH * 24 * 24 * 64 * 3 * 3 * 32
    out = {}
    for name, fn in ops.items():
        args = (x, w) if name == "forward" else (x, w, g)
        ms = median_ms(fn, *args, repeats=20 * repeats)
        out[name] = {"ms": ms, "gflops_per_s": flops / ms / 1e6}
    out["gflop_each"] = flops / 1e9
    return out


class _FlatBernoulliDropout(Dropout):
    """The previous dropout: flax's mask (``jax.random.bernoulli`` of 32-bit words), flat."""

    @nn.compact
    def __call__(self, inputs, deterministic=None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic:
            return inputs
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng(self.rng_collection), keep, (inputs.size,))
        return lax.select(mask.reshape(inputs.shape), inputs / keep, jnp.zeros_like(inputs))


def _autodiff_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class _PreviousCNN(nn.Module):
    """`EmnistCNN` with the previous dropout and max-pool gradient (same parameters)."""

    @nn.compact
    def __call__(self, x, train=False):
        conv = canonical_conv
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", conv_general_dilated=conv)(x))
        x = _autodiff_pool(x)
        x = _FlatBernoulliDropout(0.25)(x, deterministic=not train)
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        x = _FlatBernoulliDropout(0.5)(x, deterministic=not train)
        return nn.Dense(62)(x)


def local_training(module: nn.Module, x=None, y=None):
    """50 SGD steps in one jitted scan over ``x [STEPS, BATCH, 28, 28, 1]``, ``y [STEPS, BATCH]``
    (uniform noise and random labels when not given: the speed does not depend on the values)."""
    key = jax.random.PRNGKey(0)
    if x is None:
        x = jax.random.uniform(key, (STEPS, BATCH, 28, 28, 1))
        y = jax.random.randint(key, (STEPS, BATCH), 0, 62)
    params = module.init(key, x[0])

    def loss(params, xb, yb, rng):
        logits = module.apply(params, xb, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grad = jax.grad(loss)

    def step(carry, batch):
        params, rng = carry
        rng, sub = jax.random.split(rng)
        grads = grad(params, *batch, sub)
        return (jax.tree.map(lambda p, d: p - 0.1 * d, params, grads), rng), None

    run = jax.jit(lambda params, x, y: lax.scan(step, (params, key), (x, y))[0])
    return run, (params, x, y)


def round_against_bare_steps(data_dir: str, repeats: int) -> dict:
    """The engine's peers-workload round vs its 50 steps as a bare scan (same images), ms."""
    workload = rt.SPECS[rt.CNN]
    images, _ = rt.load_fashion_mnist_arrays(data_dir)
    train, model = rt.build_data(workload, images), rt.build_model(workload)
    engine = rt.engine_variant(workload, model, train, "map", None)
    # 10 clients x 5 batches of 20: the first 1,000 images in the round's batch shape.
    n = STEPS * BATCH
    x = jnp.asarray(train.arrays["x"][:n]).reshape(STEPS, BATCH, 28, 28, 1)
    y = jnp.asarray(train.arrays["y"][:n]).reshape(STEPS, BATCH)
    bare, inputs = local_training(classifiers.EmnistCNN(), x, y)
    arms = {"engine round": engine.run_round,
            "bare 50-step scan": lambda: jax.block_until_ready(bare(*inputs))}
    if onednn.available():  # the same two with the model's conv="onednn"
        engine_dnn = rt.engine_variant(workload, rt.build_model(workload, conv="onednn"), train,
                                       "map", None)
        bare_dnn, inputs_dnn = local_training(classifiers.EmnistCNN(conv="onednn"), x, y)
        arms["engine round, oneDNN convolutions"] = engine_dnn.run_round
        arms["bare 50-step scan, oneDNN convolutions"] = (
            lambda: jax.block_until_ready(bare_dnn(*inputs_dnn)))
    for _ in range(2):  # compile and warm every arm
        for fn in arms.values():
            fn()
    assert engine.examples() == n, engine.examples()  # every client ran its 5 full steps
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(repeats):  # interleaved: each arm's median of 3 calls
        for arm, fn in arms.items():
            times[arm].append(median_ms(fn, repeats=3))
    medians = {arm: float(np.median(t)) for arm, t in times.items()}
    return {"ms": medians, "ms_all": times,
            "round_over_bare": medians["engine round"] / medians["bare 50-step scan"]}


def onednn_arms(python: str, repeats: int) -> dict:
    """`peers/onednn_conv.py` run by ``python`` (one with PyTorch): its parsed report."""
    script = pathlib.Path(__file__).parent / "peers" / "onednn_conv.py"
    done = subprocess.run([python, str(script), "--repeats", str(repeats)], check=True,
                          capture_output=True, text=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("ONEDNN_JSON "))
    return json.loads(line[len("ONEDNN_JSON "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir", default=os.environ.get("FEDJAX_SIM_DATA"),
                        help="root data folder holding fashion-mnist/ for the round arm "
                             "(default: $FEDJAX_SIM_DATA; the arm is skipped without it)")
    parser.add_argument("--onednn-python", default=None,
                        help="a Python with PyTorch (benchmarks/peers/setup_torch_venv.sh): also "
                             "time the same convolutions and CNN step with oneDNN's kernels")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"{machine_info()['cpu']}: f32 matmul {peak['median_gflops']:.1f} GFLOP/s", flush=True)
    ops = conv_ops(args.repeats)
    for name in ("forward", "weight_gradient", "input_gradient"):
        print(f"second conv {name}: {ops[name]['ms']:.2f} ms, "
              f"{ops[name]['gflops_per_s']:.0f} GFLOP/s", flush=True)
    arms = {"current": local_training(classifiers.EmnistCNN()),
            "previous": local_training(_PreviousCNN())}
    if onednn.available():  # the model's conv="onednn": oneDNN's kernels in the same scan
        arms["current, oneDNN convolutions"] = local_training(
            classifiers.EmnistCNN(conv="onednn"))
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # interleaved
        for arm, (run, inputs) in arms.items():
            times[arm].append(median_ms(run, *inputs, repeats=1) / STEPS)
    steps = {arm: {"ms_per_step": float(np.median(t)), "ms_per_step_all": t}
             for arm, t in times.items()}
    ratio = steps["previous"]["ms_per_step"] / steps["current"]["ms_per_step"]
    print(f"local training, ms per step: current {steps['current']['ms_per_step']:.2f}, "
          f"previous {steps['previous']['ms_per_step']:.2f} ({ratio:.2f}x)", flush=True)
    if "current, oneDNN convolutions" in steps:
        print(f"local training with oneDNN convolutions: "
              f"{steps['current, oneDNN convolutions']['ms_per_step']:.2f} ms per step",
              flush=True)
    if args.data_dir:
        rounds = round_against_bare_steps(args.data_dir, args.repeats)
        for arm, ms in rounds["ms"].items():
            print(f"{arm}: {ms:.0f} ms", flush=True)
        print(f"engine round / bare scan: {rounds['round_over_bare']:.3f}x", flush=True)
    else:
        rounds = None
        print("no --data-dir / $FEDJAX_SIM_DATA: the engine-round arm is skipped", flush=True)
    torch_report = None
    if args.onednn_python:
        torch_report = onednn_arms(args.onednn_python, args.repeats)
        for name in ("forward", "weight_gradient", "input_gradient"):
            mine, theirs = ops[name]["ms"], torch_report["second_conv"][name]["ms"]
            torch_report["second_conv"][name]["xla_over_onednn"] = mine / theirs
            print(f"oneDNN (torch {torch_report['torch']}) second conv {name}: {theirs:.2f} ms, "
                  f"{torch_report['second_conv'][name]['gflops_per_s']:.0f} GFLOP/s "
                  f"(XLA / oneDNN time {mine / theirs:.2f})", flush=True)
        torch_report["local_training"]["xla_over_torch"] = (
            steps["current"]["ms_per_step"] / torch_report["local_training"]["ms_per_step"])
        torch_step = torch_report["local_training"]
        print(f"PyTorch CNN step {torch_step['ms_per_step']:.2f} ms (fedjax_sim's scan / "
              f"PyTorch's loop {torch_step['xla_over_torch']:.2f})", flush=True)
    conv_ms = sum(ops[name]["ms"] for name in ("forward", "weight_gradient", "input_gradient"))
    report = {
        "benchmark": "cnn_step",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/cnn_step.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "matmul": peak,
        "matmul_after": matmul_peak(),
        "second_conv": ops,
        "second_conv_ms": conv_ms,
        "local_training": steps,
        "previous_over_current": ratio,
        "round_against_bare_steps": rounds,
        "second_conv_share_of_step": conv_ms / steps["current"]["ms_per_step"],
        "onednn": torch_report,
    }
    print(f"second conv: {conv_ms:.2f} ms of the {steps['current']['ms_per_step']:.2f} ms step")
    print(f"wrote {write_report(report, args.out, 'cnn_step-')}")


if __name__ == "__main__":
    main()
