"""Heavy hitters on Shakespeare's words: precision and recall of the top-k at epsilon 1, 4, 8, inf.

Clients are the 1,390 speaking roles (one per role per play) of the 37 plays; a role's words are
the lower-case letter runs of its lines, truncated to ``--max-word-length`` letters. The exact
answer is the k most frequent words over all lines (total occurrences). Two methods
(`fedjax_sim.analytics`):

* TrieHH (Zhu et al. 2020): for finite epsilon, theta and the roles sampled per round follow the
  paper's Corollary 1 at delta (`triehh_parameters`; L = max word length + 1 rounds); for
  epsilon = inf every role votes every round with threshold ``--inf-theta``.
* the one-shot prefix count sketch: each role's ``--words-per-client`` most frequent distinct
  words, Gaussian noise calibrated with dp-accounting to epsilon at delta (one query); inf: no
  noise.

With ``--synthetic-clients N`` (default 1,000,000) TrieHH also runs in the paper's setting: N
clients holding one word each, drawn from Shakespeare's word frequencies (the exact answer: the
draws' own top-k).

precision@k = |found top-k & exact top-k| / |found top-k| (0 when nothing is found), recall@k =
|found top-k & exact top-k| / k; the mean over ``--seeds``.

Usage::

  FEDJAX_SIM_DATA=../shared/data python benchmarks/heavy_hitters.py [--seeds 0 1 2] [--k 10 20]

Writes ``benchmarks/results/heavy_hitters-<YYYY-MM-DD>-<machine>.json`` with the CPU name and the
f32 matmul GFLOP/s, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import pathlib
import sys
import time

import fedjax_sim  # noqa: F401  (first: sets the XLA:CPU flags before jax starts)

# isort: split

import jax
import numpy as np

from fedjax_sim.analytics import (
    count_sketch_heavy_hitters,
    exact_counts,
    noise_for_epsilon,
    tokenize,
    triehh,
    triehh_parameters,
    words_per_client_data,
)
from fedjax_sim.analytics.sources import shakespeare_roles

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from round_throughput import machine_info, matmul_peak, write_report  # noqa: E402


def score(found: list[str], truth: list[str], k: int) -> tuple[float, float]:
    top = found[:k]
    hits = len(set(top) & set(truth[:k]))
    return (hits / len(top) if top else 0.0), hits / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 4, 8, math.inf])
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-word-length", type=int, default=10)
    parser.add_argument("--inf-theta", type=int, default=5)
    parser.add_argument("--max-prefixes", type=int, default=1024)
    parser.add_argument("--words-per-client", type=int, default=8)
    parser.add_argument("--width", type=int, default=32768)
    parser.add_argument("--synthetic-clients", type=int, default=1_000_000,
                        help="also TrieHH on this many synthetic clients holding one word each, "
                             "drawn from Shakespeare's word frequencies (0: skip)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    logging.getLogger("absl").setLevel(logging.ERROR)
    started = time.perf_counter()
    peak = matmul_peak()
    print(f"matmul peak {peak['median_gflops']:.1f} GFLOP/s (f32 2048^2, median)", flush=True)
    roles = shakespeare_roles(args.data_dir)
    words = [[w for line in lines for w in tokenize(line)] for lines in roles.lines]
    data = words_per_client_data(words, roles.client_ids, args.max_word_length)
    exact = exact_counts(data)
    truth = [w for w, _ in exact.most_common(max(args.k))]
    n = data.num_clients
    levels = args.max_word_length + 1
    print(f"{n} roles, {data.num_examples:,} words, {len(exact):,} distinct; exact top-10: "
          f"{truth[:10]}", flush=True)
    results = []
    for epsilon in args.epsilons:
        for method in ("triehh", "count_sketch"):
            runs = []
            for seed in args.seeds:
                key = jax.random.PRNGKey(seed)
                start = time.perf_counter()
                if method == "triehh":
                    if math.isinf(epsilon):
                        theta, m = args.inf_theta, n
                    else:
                        theta, m = triehh_parameters(epsilon, args.delta, n, levels)
                    found = triehh(data, theta=theta, clients_per_round=m, key=key,
                                   max_prefixes=args.max_prefixes, delta=args.delta)
                    setting = {"theta": theta, "clients_per_round": m}
                else:
                    z = noise_for_epsilon(epsilon, 1, args.delta)
                    found = count_sketch_heavy_hitters(
                        data, words_per_client=args.words_per_client, width=args.width,
                        noise_multiplier=z, key=key, delta=args.delta)
                    setting = {"noise_multiplier": round(z, 4),
                               "noise_stddev": round(found.extra["noise_stddev"], 2),
                               "threshold": round(found.extra["threshold"], 2)}
                seconds = time.perf_counter() - start
                scores = {f"top{k}": dict(zip(("precision", "recall"),
                                              score(found.words, truth, k), strict=True))
                          for k in args.k}
                runs.append({"seed": seed, "seconds": round(seconds, 2),
                             "epsilon": found.epsilon, "discovered": len(found.words),
                             "top": found.words[:max(args.k)], **scores})
            row = {"method": method, "target_epsilon": epsilon,
                   "epsilon": runs[0]["epsilon"], "delta": args.delta, **setting,
                   "discovered_mean": float(np.mean([r["discovered"] for r in runs])),
                   "seconds_mean": round(float(np.mean([r["seconds"] for r in runs])), 2)}
            for k in args.k:
                for name in ("precision", "recall"):
                    row[f"{name}@{k}"] = round(float(np.mean(
                        [r[f"top{k}"][name] for r in runs])), 3)
            row["runs"] = runs
            results.append(row)
            print(f"{method:12s} eps {epsilon:>4} -> {row['epsilon']:.3g}  "
                  + "  ".join(f"P@{k} {row[f'precision@{k}']:.2f} R@{k} "
                              f"{row[f'recall@{k}']:.2f}" for k in args.k)
                  + f"  found {row['discovered_mean']:.0f}  {row['seconds_mean']} s  {setting}",
                  flush=True)
    if args.synthetic_clients:
        # The paper's setting: many clients, one word each (here drawn from Shakespeare's word
        # frequencies); the exact answer is the same top-k (the draws' own counts).
        rng = np.random.default_rng(0)
        vocabulary = list(exact)
        p = np.asarray([exact[w] for w in vocabulary], np.float64)
        draws = rng.choice(len(vocabulary), size=args.synthetic_clients, p=p / p.sum())
        synthetic = words_per_client_data([[vocabulary[i]] for i in draws],
                                          np.arange(args.synthetic_clients),
                                          args.max_word_length)
        synthetic_exact = exact_counts(synthetic)
        synthetic_truth = [w for w, _ in synthetic_exact.most_common(max(args.k))]
        for epsilon in [e for e in args.epsilons if math.isfinite(e)]:
            theta, m = triehh_parameters(epsilon, args.delta, args.synthetic_clients, levels)
            runs = []
            for seed in args.seeds:
                start = time.perf_counter()
                found = triehh(synthetic, theta=theta, clients_per_round=m,
                               key=jax.random.PRNGKey(seed), max_prefixes=256,
                               delta=args.delta)
                scores = {f"top{k}": dict(zip(("precision", "recall"),
                                              score(found.words, synthetic_truth, k),
                                              strict=True)) for k in args.k}
                runs.append({"seed": seed, "seconds": round(time.perf_counter() - start, 2),
                             "epsilon": found.epsilon, "discovered": len(found.words),
                             "top": found.words[:max(args.k)], **scores})
            row = {"method": "triehh_synthetic", "clients": args.synthetic_clients,
                   "target_epsilon": epsilon, "epsilon": runs[0]["epsilon"],
                   "delta": args.delta, "theta": theta, "clients_per_round": m,
                   "discovered_mean": float(np.mean([r["discovered"] for r in runs])),
                   "seconds_mean": round(float(np.mean([r["seconds"] for r in runs])), 2)}
            for k in args.k:
                for name in ("precision", "recall"):
                    row[f"{name}@{k}"] = round(float(np.mean(
                        [r[f"top{k}"][name] for r in runs])), 3)
            row["runs"] = runs
            results.append(row)
            print(f"triehh {args.synthetic_clients:,} synthetic clients eps {epsilon:>4} -> "
                  f"{row['epsilon']:.3g}  " + "  ".join(
                      f"P@{k} {row[f'precision@{k}']:.2f} R@{k} {row[f'recall@{k}']:.2f}"
                      for k in args.k)
                  + f"  found {row['discovered_mean']:.0f}  {row['seconds_mean']} s  "
                  f"theta {theta}, {m} clients/round", flush=True)
    report = {
        "benchmark": "heavy_hitters",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "matmul_peak": peak,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {"dataset": "shakespeare roles (../shared/data/shakespeare)", "clients": n,
                     "words": int(data.num_examples), "distinct_words": len(exact),
                     "max_word_length": args.max_word_length, "delta": args.delta,
                     "seeds": args.seeds, "k": args.k, "inf_theta": args.inf_theta,
                     "max_prefixes": args.max_prefixes,
                     "words_per_client": args.words_per_client, "sketch_width": args.width,
                     "sketch_depth": 3, "truth": "total occurrences over all lines",
                     "exact_top": truth,
                     "exact_top_counts": [exact[w] for w in truth]},
        "results": results,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    path = write_report(report, args.out, "heavy_hitters-")
    print()
    header = "| method | epsilon (target -> spent) | setting | " + " | ".join(
        f"P@{k} | R@{k}" for k in args.k) + " | found |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in results:
        setting = (f"theta {row['theta']}, {row['clients_per_round']} clients/round"
                   if row["method"].startswith("triehh") else f"z {row['noise_multiplier']}")
        print(f"| {row['method']} | {row['target_epsilon']:g} -> {row['epsilon']:.3g} | "
              f"{setting} | " + " | ".join(f"{row[f'precision@{k}']:.2f} | "
                                            f"{row[f'recall@{k}']:.2f}" for k in args.k)
              + f" | {row['discovered_mean']:.0f} |")
    print(f"\nwrote {path} ({report['seconds_total']} s)")


if __name__ == "__main__":
    main()
