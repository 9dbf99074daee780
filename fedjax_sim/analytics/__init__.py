"""Federated analytics: private statistics over clients' data that never leaves them.

Built from the federated vocabulary (`fedjax_sim.federated`) and the aggregation stages
(`fedjax_sim.aggregators`: clip, sum/mean, Gaussian noise), with epsilon from ``dp-accounting``
(`fedjax_sim.privacy`):

* `dp_sum`, `dp_mean`, `dp_histogram`, `dp_quantiles`, `adaptive_quantiles` (and the
  traceable `private_sum`, `private_mean` to use inside a `federated_computation`);
* heavy hitters: `triehh` (Zhu et al. 2020) and the one-shot `count_sketch_heavy_hitters`;
* `run_analytics`: the ``fedjax-sim analytics CONFIG`` command.
"""

from fedjax_sim.analytics.heavy_hitters import (
    HeavyHitters,
    count_sketch_heavy_hitters,
    exact_counts,
    tokenize,
    triehh,
    triehh_epsilon,
    triehh_parameters,
    words_per_client_data,
)
from fedjax_sim.analytics.mechanisms import (
    Release,
    adaptive_quantiles,
    client_histograms,
    dp_histogram,
    dp_mean,
    dp_quantiles,
    dp_sum,
    exact_quantiles,
    gaussian_epsilon,
    noise_for_epsilon,
    private_mean,
    private_sum,
)

__all__ = [
    "HeavyHitters", "Release", "adaptive_quantiles", "client_histograms",
    "count_sketch_heavy_hitters", "dp_histogram",
    "dp_mean", "dp_quantiles", "dp_sum", "exact_counts", "exact_quantiles", "gaussian_epsilon",
    "noise_for_epsilon", "private_mean", "private_sum", "tokenize", "triehh", "triehh_epsilon",
    "triehh_parameters", "words_per_client_data",
]
