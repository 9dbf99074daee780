"""One workload of `benchmarks/round_throughput.py` run by FedJAX 0.0.17's own FedAvg.

Runs INSIDE ``benchmarks/peers/.venv-fedjax`` (``setup_fedjax_venv.sh``); it imports nothing of
fedjax_sim. The data and round are round_throughput's: the first 10,000 Fashion-MNIST training
images (read from the IDX files with numpy, scaled to [0, 1]) as 100 clients of 100 examples,
a uniform cohort of 10 clients per round (without replacement), 1 local epoch of batch 20 (5
client SGD steps, lr 0.1), FedAvg with server SGD (lr 1.0), weights = examples. Models: FedJAX's
``fedjax.models.emnist.create_conv_model`` (the EMNIST CNN, 62 outputs, dropout on in training)
and ``create_logistic_model`` (62 outputs). The algorithm is ``fedjax.algorithms.fed_avg``
over ``fedjax.InMemoryFederatedData``: FedJAX's Python loop over clients and batches around its
jitted client step.

Prints one JSON line prefixed ``FEDJAX_JSON``: first-round time (trace + compile + run), the
steady per-round times (each round blocked on), versions. Usage::

  .venv-fedjax/bin/python fedjax_workload.py --workload cnn|logreg --data-dir DIR
      [--rounds 10] [--warmup 1]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import pathlib
import time

import fedjax
import jax
import numpy as np

PREFIX = "FEDJAX_JSON "
CLIENT_LR, SERVER_LR = 0.1, 1.0


def read_idx(path: pathlib.Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_clients(data_dir: pathlib.Path) -> fedjax.FederatedData:
    folder = data_dir / "fashion-mnist"
    images = read_idx(folder / "train-images-idx3-ubyte.gz")[:10_000]
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")[:10_000]
    x = images.reshape(-1, 28, 28, 1).astype(np.float32) / np.float32(255.0)
    y = labels.astype(np.int32)
    clients = {
        f"{c:03d}".encode(): {"x": x[100 * c : 100 * (c + 1)], "y": y[100 * c : 100 * (c + 1)]}
        for c in range(100)
    }
    return fedjax.InMemoryFederatedData(clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("cnn", "logreg"), required=True)
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_clients(args.data_dir)
    if args.workload == "cnn":
        model = fedjax.models.emnist.create_conv_model(only_digits=False)
    else:
        model = fedjax.models.emnist.create_logistic_model(only_digits=False)
    grad_fn = fedjax.model_grad(model)
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        grad_fn,
        fedjax.optimizers.sgd(CLIENT_LR),
        fedjax.optimizers.sgd(SERVER_LR),
        fedjax.ShuffleRepeatBatchHParams(batch_size=20, num_epochs=1, drop_remainder=False),
    )
    state = algorithm.init(model.init(jax.random.PRNGKey(args.seed)))
    sampler = fedjax.client_samplers.UniformGetClientSampler(data, 10, seed=args.seed)

    def run_round(state):
        clients = sampler.sample()
        state, _ = algorithm.apply(state, clients)
        jax.block_until_ready(state.params)
        return state

    start = time.perf_counter()
    state = run_round(state)
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        state = run_round(state)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        state = run_round(state)
        times.append(time.perf_counter() - start)
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    print(PREFIX + json.dumps({
        "first_round_s": first,
        "times_s": times,
        "median_s": float(np.median(times)),
        "examples_per_round": 1000.0,
        "model_params": int(params),
        "versions": {
            p: importlib.metadata.version(p)
            for p in ("fedjax", "jax", "jaxlib", "dm-haiku", "optax")
        },
        "backend": jax.default_backend(),
    }), flush=True)


if __name__ == "__main__":
    main()
