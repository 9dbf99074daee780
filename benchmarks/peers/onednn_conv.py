"""The EMNIST CNN's convolutions and training step in PyTorch (oneDNN), for `cnn_step.py`.

Run by ``benchmarks/cnn_step.py --onednn-python PATH`` with the Python of a virtual environment
that has PyTorch (`setup_torch_venv.sh` makes ``benchmarks/peers/.venv-torch``: PyTorch 2.13.0's
CPU build, whose convolutions are oneDNN's). It prints one line ``ONEDNN_JSON {...}``:

* ``second_conv``: the CNN's second convolution (``[20, 32, 26, 26] -> [20, 64, 24, 24]``, 3x3,
  channels-last memory, the batch of the peers workload): forward, weight gradient and input
  gradient each alone (``aten.convolution_backward`` with one output mask), median ms over
  ``--repeats`` x 20 calls, the same shapes and FLOPs as `cnn_step.py`'s XLA arm;
* ``local_training``: 50 SGD steps (batch 20, lr 0.1) of the same CNN (conv 32, conv 64,
  max-pool 2, dropout 0.25, dense 128, dropout 0.5, dense 62; channels-last), median ms per step
  over ``--repeats`` runs of 50 steps: what a PyTorch user's client loop runs.

PyTorch is not a dependency of fedjax_sim; this script only measures what another library's
convolution kernels do on the same machine, in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH, STEPS = 20, 50


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def second_conv(repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    last = torch.channels_last
    x = torch.randn(BATCH, 32, 26, 26, generator=generator).contiguous(memory_format=last)
    w = torch.randn(64, 32, 3, 3, generator=generator).contiguous(memory_format=last)
    g = torch.randn(BATCH, 64, 24, 24, generator=generator).contiguous(memory_format=last)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, mask)

    ops = {
        "forward": lambda: F.conv2d(x, w),
        "weight_gradient": backward((False, True, False)),
        "input_gradient": backward((True, False, False)),
    }
    flops = 2.0 * BATCH * 24 * 24 * 64 * 3 * 3 * 32
    out = {}
    with torch.no_grad():
        for name, fn in ops.items():
            ms = _median_ms(fn, 20 * repeats)
            out[name] = {"ms": ms, "gflops_per_s": flops / ms / 1e6}
    out["gflop_each"] = flops / 1e9
    return out


class EmnistCNN(nn.Module):
    def __init__(self, num_classes: int = 62):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dense1 = nn.Linear(12 * 12 * 64, 128)
        self.dense2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.dropout(x, 0.25, self.training)
        x = F.dropout(F.relu(self.dense1(torch.flatten(x, 1))), 0.5, self.training)
        return self.dense2(x)


def local_training(repeats: int) -> dict:
    torch.manual_seed(0)
    model = EmnistCNN().to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(STEPS, BATCH, 1, 28, 28)
    y = torch.randint(0, 62, (STEPS, BATCH))
    batches = [(x[i].contiguous(memory_format=torch.channels_last), y[i]) for i in range(STEPS)]

    def run():
        for xb, yb in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    times = []
    run()  # warm: oneDNN builds its primitives on first use
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3 / STEPS)
    return {"ms_per_step": float(np.median(times)), "ms_per_step_all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "second_conv": second_conv(args.repeats),
        "local_training": local_training(args.repeats),
    }
    print("ONEDNN_JSON " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
