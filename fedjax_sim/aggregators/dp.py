"""User-level DP-FedAvg as one aggregator: clip, fixed-denominator uniform mean, Gaussian noise.

McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent Language
Models", arXiv:1710.06963 (flat clipping, the fixed-denominator estimator, noise ``z * C`` on
the sum), with optional adaptive clipping (Andrew et al. 2021, arXiv:1905.03871). Client
sampling must be Poisson with rate q for the accountant's guarantee (`privacy.accounting`).
"""

from __future__ import annotations

import math

from fedjax_sim.aggregators.base import chain
from fedjax_sim.aggregators.clipping import clip
from fedjax_sim.aggregators.noise import gaussian_noise
from fedjax_sim.aggregators.reducers import mean
from fedjax_sim.core import Aggregator


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier z_u such that updates and the clip count together are z.

    Two Gaussian mechanisms on the same clients with multipliers z_u and z_b = 2 sigma_b
    compose to one of multiplier ``(z_u^-2 + z_b^-2)^-1/2`` (Andrew et al. 2021, Sec. 3.2), so
    ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2``. ValueError when the count alone spends more.
    """
    if noise_multiplier <= 0:
        return 0.0
    if count_stddev <= 0:
        raise ValueError("adaptive clipping under DP needs count_stddev > 0 (the clipped count "
                         "is a query on the clients' data)")
    rest = noise_multiplier ** -2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_stddev={count_stddev} is too small for noise_multiplier={noise_multiplier}: "
            f"the count query alone would spend the budget (need 2 * count_stddev > "
            f"{noise_multiplier})")
    return rest ** -0.5


def dp_fedavg_aggregator(
    noise_multiplier: float,
    clip_norm: float,
    expected_clients: float,
    *,
    target_quantile: float | None = None,
    clip_learning_rate: float = 0.2,
    count_stddev: float | None = None,
    noise_cohort_size: float | None = None,
) -> Aggregator:
    """``chain(clip, mean(uniform, denominator=expected_clients), gaussian_noise)``.

    Args:
      noise_multiplier: z of the whole round (updates and, when adaptive, the clip count).
      clip_norm: the clip norm C (the initial one when adaptive).
      expected_clients: the expected cohort size (q * N for Poisson sampling), the
        fixed denominator; with ``noise_cohort_size`` it is the simulated run's own cohort.
      target_quantile: None: fixed clipping; else adaptive clipping to this quantile.
      clip_learning_rate: eta_C of adaptive clipping.
      count_stddev: sigma_b of adaptive clipping's count (default: the cohort / 20, the paper's
        choice; the production cohort's when ``noise_cohort_size`` is set).
      noise_cohort_size: calibrate the noise as if the cohort had this many clients.

    Returns:
      An `Aggregator` whose ``noise_multipliers`` give the per-round Gaussian mechanisms.
    """
    cohort = float(noise_cohort_size or expected_clients)
    update_multiplier = float(noise_multiplier)
    stages = []
    if target_quantile is not None:
        sigma_b = float(count_stddev) if count_stddev is not None else cohort / 20.0
        if noise_multiplier > 0:
            update_multiplier = split_noise_multiplier(float(noise_multiplier), sigma_b)
        stages.append(clip(clip_norm, target_quantile=target_quantile,
                           learning_rate=clip_learning_rate,
                           count_stddev=sigma_b if noise_multiplier > 0 else 0.0,
                           expected_clients=expected_clients,
                           noise_cohort_size=noise_cohort_size))
    else:
        stages.append(clip(clip_norm))
    stages.append(mean(weighting="uniform", denominator=expected_clients))
    if math.isfinite(update_multiplier):
        stages.append(gaussian_noise(update_multiplier, noise_cohort_size=noise_cohort_size))
    return chain(*stages)
