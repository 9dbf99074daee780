"""Differential privacy: accounting with ``dp-accounting`` over a run's privacy ledger.

The mechanisms themselves (clipping, Gaussian noise, the fixed-denominator mean) are
aggregation stages (`fedjax_sim.aggregators`); Poisson client sampling is
`fedjax_sim.data.sampling.poisson_sampler`.
"""

from fedjax_sim.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    epsilon_of,
    round_event,
)

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "calibrate_noise_multiplier",
           "effective_noise_multiplier", "epsilon_of", "round_event"]
