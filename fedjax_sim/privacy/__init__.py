"""Differential privacy: accounting with ``dp-accounting`` over a run's privacy ledger, and
example-level DP-SGD inside the clients (`dp_sgd_loss`, `ExampleLedger`).

The mechanisms themselves (clipping, Gaussian noise, the fixed-denominator mean) are
aggregation stages (`fedjax_sim.aggregators`); Poisson client sampling is
`fedjax_sim.data.sampling.poisson_sampler`.
"""

from fedjax_sim.privacy.accounting import (
    ACCOUNTANTS,
    CohortCapWarning,
    PrivacyLedger,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    epsilon_of,
    round_event,
    warn_cap_overflow,
)
from fedjax_sim.privacy.dp_sgd import (
    EXAMPLE_DP_ALGORITHMS,
    DPSGDLoss,
    ExampleLedger,
    dp_sgd_loss,
    example_epsilon,
    round_cost,
)

__all__ = ["ACCOUNTANTS", "CohortCapWarning", "DPSGDLoss", "EXAMPLE_DP_ALGORITHMS", "ExampleLedger",
           "PrivacyLedger", "calibrate_noise_multiplier", "dp_sgd_loss",
           "effective_noise_multiplier", "epsilon_of", "example_epsilon", "round_cost",
           "round_event", "warn_cap_overflow"]
