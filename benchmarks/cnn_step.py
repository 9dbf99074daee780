"""Where the EMNIST CNN's training step goes on CPU, and what the dropout and max-pool change did.

1. The second convolution (``[20, 26, 26, 32] -> [20, 24, 24, 64]``, 3x3, the batch of the
   peers workload), each of its three convolutions jitted alone: the forward, the weight
   gradient and the input gradient as `fedjax_sim.models.conv.canonical_conv` computes them
   (its custom VJP, one gradient kept so XLA drops the other), median ms and GFLOP/s.
2. The CNN's local training as a round runs it: 50 SGD steps (batch 20) of the 62-class EMNIST
   CNN in one jitted ``lax.scan`` with dropout on, for the model as it is and for the previous
   formulation (flax's ``jax.random.bernoulli`` mask of 32-bit words, drawn flat, and the
   autodiff gradient of the reshape + max pool), interleaved; median ms per step of each.

  python benchmarks/cnn_step.py [--repeats 7] [--out PATH]

Writes ``benchmarks/results/cnn_step-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
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
from round_throughput import machine_info, matmul_peak, median_ms, write_report  # noqa: E402

from fedjax_sim.models import classifiers  # noqa: E402
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


def local_training(module: nn.Module):
    key = jax.random.PRNGKey(0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
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
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # interleaved
        for arm, (run, inputs) in arms.items():
            times[arm].append(median_ms(run, *inputs, repeats=1) / STEPS)
    steps = {arm: {"ms_per_step": float(np.median(t)), "ms_per_step_all": t}
             for arm, t in times.items()}
    ratio = steps["previous"]["ms_per_step"] / steps["current"]["ms_per_step"]
    print(f"local training, ms per step: current {steps['current']['ms_per_step']:.2f}, "
          f"previous {steps['previous']['ms_per_step']:.2f} ({ratio:.2f}x)", flush=True)
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
        "second_conv_share_of_step": conv_ms / steps["current"]["ms_per_step"],
    }
    print(f"second conv: {conv_ms:.2f} ms of the {steps['current']['ms_per_step']:.2f} ms step")
    print(f"wrote {write_report(report, args.out, 'cnn_step-')}")


if __name__ == "__main__":
    main()
