"""Privacy accounting against ``dp-accounting`` called directly here, and closed forms."""

import dataclasses
import math

import dp_accounting
import pytest
from dp_accounting import dp_event as events
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim.aggregators import split_noise_multiplier
from fedjax_sim.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    epsilon_of,
    round_event,
)

NUM_CLIENTS = 1000

# (q, sigma, rounds, delta)
TABLE = [
    (0.01, 1.0, 100, 1e-5),
    (0.05, 0.8, 50, 1e-5),
    (0.1, 2.0, 300, 1e-6),
    (0.002, 0.6, 1000, 1e-3),
    (1.0, 5.0, 10, 1e-5),
]


def _direct(q, sigma, rounds, delta, accountant):
    account = (rdp_privacy_accountant.RdpAccountant() if accountant == "rdp"
               else pld_privacy_accountant.PLDAccountant())
    account.compose(events.PoissonSampledDpEvent(q, events.GaussianDpEvent(sigma)), rounds)
    return account.get_epsilon(delta)


# PLD is slower (seconds per case): a sub-table
CASES = ([(*row, "rdp") for row in TABLE]
         + [(*TABLE[i], "pld") for i in (0, 2, 4)])


@pytest.mark.parametrize("q,sigma,rounds,delta,accountant", CASES)
def test_epsilon_equals_dp_accounting_called_directly(q, sigma, rounds, delta, accountant):
    ledger = PrivacyLedger({"gaussian_noise/update": sigma}, NUM_CLIENTS, q * NUM_CLIENTS,
                           delta=delta, accountant=accountant)
    assert ledger.sampling_probability == pytest.approx(q, rel=1e-12)
    expected = _direct(q, sigma, rounds, delta, accountant)
    assert ledger.epsilon(rounds) == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.inf


def test_epsilon_grows_with_rounds_and_is_zero_before_any():
    ledger = PrivacyLedger({"update": 1.0}, NUM_CLIENTS, 10)
    values = [ledger.epsilon(r) for r in (0, 1, 10, 100)]
    assert values[0] == 0.0
    assert values == sorted(values) and values[1] < values[3]


@pytest.mark.parametrize("z1,z2,accountant", [(1.2, 3.0, "rdp"), (0.9, 0.9, "rdp"),
                                               (2.0, 10.0, "rdp"), (2.0, 10.0, "pld")])
def test_two_mechanisms_compose_to_one_gaussian(z1, z2, accountant):
    """Update noise and the clip count on the same clients: one Gaussian of
    (z1^-2 + z2^-2)^-1/2, sampled with q, composed over the rounds."""
    z = (z1 ** -2 + z2 ** -2) ** -0.5
    assert effective_noise_multiplier({"update": z1, "count": z2}) == pytest.approx(z, rel=1e-12)
    q, rounds, delta = 0.02, 200, 1e-5
    ledger = PrivacyLedger({"update": z1, "count": z2}, NUM_CLIENTS, q * NUM_CLIENTS,
                           delta=delta, accountant=accountant)
    assert ledger.epsilon(rounds) == pytest.approx(_direct(q, z, rounds, delta, accountant),
                                                   rel=1e-6)
    # and more noise of any kind only helps
    alone = PrivacyLedger({"update": z1}, NUM_CLIENTS, q * NUM_CLIENTS, delta=delta,
                          accountant=accountant)
    assert ledger.epsilon(rounds) > alone.epsilon(rounds)


def test_effective_noise_multiplier_edge_cases():
    assert effective_noise_multiplier({}) == math.inf
    assert effective_noise_multiplier({"a": 1.0, "b": 0.0}) == 0.0
    assert effective_noise_multiplier({"a": 2.5}) == 2.5
    assert isinstance(round_event({}, 100, 10), events.PoissonSampledDpEvent)
    assert isinstance(round_event({}, 100, 10).event, events.NoOpDpEvent)
    assert isinstance(round_event({"a": 0.0}, 100, 10).event, events.NonPrivateDpEvent)
    assert PrivacyLedger({"a": 0.0}, 100, 10).epsilon(5) == math.inf
    assert PrivacyLedger({"a": 0.0}, 100, 10, sampling="fixed").epsilon(5) == math.inf
    assert PrivacyLedger({}, 100, 10).epsilon(5) == 0.0
    assert PrivacyLedger({}, 100, 10, accountant="pld").epsilon(5) == 0.0


@pytest.mark.parametrize("sigma,cohort,rounds", [(1.0, 20, 100), (0.8, 100, 30)])
def test_fixed_size_cohort_uses_sampling_without_replacement_and_replace_one(sigma, cohort,
                                                                             rounds):
    delta = 1e-5
    ledger = PrivacyLedger({"update": sigma}, NUM_CLIENTS, cohort, sampling="fixed",
                           delta=delta)
    event = ledger.round_event()
    assert isinstance(event, events.SampledWithoutReplacementDpEvent)
    assert (event.source_dataset_size, event.sample_size) == (NUM_CLIENTS, cohort)
    # replace-one: one client out and another in moves the clipped sum by 2C, so noise z*C
    # is a Gaussian of multiplier z/2 for dp-accounting (std over the L2 sensitivity)
    assert event.event == events.GaussianDpEvent(sigma / 2)
    account = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    account.compose(events.SampledWithoutReplacementDpEvent(
        NUM_CLIENTS, cohort, events.GaussianDpEvent(sigma / 2)), rounds)
    expected = account.get_epsilon(delta)
    assert ledger.epsilon(rounds) == pytest.approx(expected, rel=1e-9)
    assert "replace one client" in ledger.description()
    assert "fixed" in ledger.description()
    with pytest.raises(ValueError, match="PLD accountant supports Poisson"):
        PrivacyLedger({"update": sigma}, NUM_CLIENTS, cohort, sampling="fixed",
                      accountant="pld").epsilon(rounds)


def test_fixed_size_cohort_counts_replace_one_sensitivity_twice_the_clip():
    """Replacing one client of a fixed-size cohort moves the sum of C-clipped messages by up to
    2C: with noise std z*C the guarantee is the replace-one sampled Gaussian of multiplier z/2
    (the adaptive count's centred indicator likewise moves by 1, not 1/2)."""
    z, z_count, cohort, rounds, delta = 2.0, 5.0, 50, 200, 1e-5
    ledger = PrivacyLedger({"update": z, "count": z_count}, NUM_CLIENTS, cohort,
                           sampling="fixed", delta=delta)
    account = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    account.compose(events.SampledWithoutReplacementDpEvent(NUM_CLIENTS, cohort,
                                                            events.ComposedDpEvent([
                                                                events.GaussianDpEvent(z / 2),
                                                                events.GaussianDpEvent(
                                                                    z_count / 2)])), rounds)
    assert ledger.epsilon(rounds) == pytest.approx(account.get_epsilon(delta), rel=1e-9)
    # calibration: the run of the returned z spends the target under the same accounting
    calibrated = calibrate_noise_multiplier(4.0, rounds, NUM_CLIENTS, cohort, delta, "fixed")
    assert PrivacyLedger({"update": calibrated}, NUM_CLIENTS, cohort, sampling="fixed",
                         delta=delta).epsilon(rounds) == pytest.approx(4.0, rel=0.01)


def test_poisson_round_event_is_the_sampled_gaussian():
    event = round_event({"update": 1.5}, 500, 25)
    assert event == events.PoissonSampledDpEvent(0.05, events.GaussianDpEvent(1.5))
    composed = round_event({"update": 1.5, "count": 4.0}, 500, 25)
    assert isinstance(composed.event, events.ComposedDpEvent)
    single = round_event({"update": 1.5, "count": 4.0}, 500, 25, accountant="pld")
    assert single.event == events.GaussianDpEvent((1.5 ** -2 + 4.0 ** -2) ** -0.5)


@pytest.mark.parametrize("target,rounds,cohort,sampling,accountant", [
    (1.0, 100, 10, "poisson", "rdp"),
    (4.0, 300, 50, "poisson", "rdp"),
    (8.0, 50, 100, "fixed", "rdp"),
])
def test_calibrated_noise_multiplier_gives_the_target_epsilon(target, rounds, cohort, sampling,
                                                               accountant):
    delta = 1e-5
    z = calibrate_noise_multiplier(target, rounds, NUM_CLIENTS, cohort, delta, sampling,
                                   accountant)
    q = cohort / NUM_CLIENTS
    if sampling == "poisson":
        epsilon = _direct(q, z, rounds, delta, accountant)
    else:
        account = rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        account.compose(events.SampledWithoutReplacementDpEvent(
            NUM_CLIENTS, cohort, events.GaussianDpEvent(z / 2)), rounds)
        epsilon = account.get_epsilon(delta)
    assert epsilon == pytest.approx(target, rel=0.01)
    assert epsilon <= target * (1 + 1e-6)


def test_calibration_then_split_keeps_the_whole_run_at_the_target():
    """target_epsilon -> z, split between the update and the clip count: the run's epsilon
    (both mechanisms in one ledger) is the target's."""
    target, rounds, cohort, delta = 3.0, 200, 40, 1e-5
    z = calibrate_noise_multiplier(target, rounds, NUM_CLIENTS, cohort, delta)
    sigma_b = cohort / 20.0
    z_update = split_noise_multiplier(z, sigma_b)
    ledger = PrivacyLedger({"update": z_update, "count": 2 * sigma_b}, NUM_CLIENTS, cohort,
                           delta=delta)
    assert ledger.epsilon(rounds) == pytest.approx(target, rel=0.01)


def test_bad_ledgers_are_rejected():
    with pytest.raises(ValueError, match="sampling"):
        PrivacyLedger({"a": 1.0}, 100, 10, sampling="uniform")
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger({"a": 1.0}, 100, 10, accountant="moments")
    with pytest.raises(ValueError, match="cohort_size"):
        PrivacyLedger({"a": 1.0}, 100, 200)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger({"a": 1.0}, 100, 10, delta=0.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, 10, 100, 10, 1e-5)
    assert epsilon_of(events.GaussianDpEvent(1.0), 0, 1e-5) == 0.0


def _binomial_tail(cap: int, n: int, q: float) -> float:
    """P(Binomial(n, q) > cap) as an exact sum of rationals (an independent reference)."""
    from fractions import Fraction
    p = Fraction(q).limit_denominator(10 ** 12)
    return float(sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(cap + 1, n + 1)))


def test_poisson_cap_overflow_adds_to_delta_and_warns():
    """A draw above Poisson's cap trains a random subset, outside the accounting: the ledger
    reports rounds * P(Binomial(N, q) > cap) as delta's extra term (the default cap of 1,000
    clients at q = 0.1 over 200 rounds: 1.55e-6, 16% of delta 1e-5), warns above 10% of delta,
    and names the least cap under it; no cap, N itself or fixed-size sampling add nothing."""
    import warnings

    from fedjax_sim.data.sampling import poisson_cap
    from fedjax_sim.privacy import CohortCapWarning, warn_cap_overflow

    cap = poisson_cap(1000, 0.1)
    ledger = PrivacyLedger({"update": 1.0}, 1000, 100.0, "poisson", 1e-5, max_cohort_size=cap)
    expected = 200 * _binomial_tail(cap, 1000, 0.1)
    assert ledger.cap_overflow_delta(200) == pytest.approx(expected, rel=1e-9)
    assert 1e-6 < expected < 2e-6
    suggested = ledger.cap_for_overflow(200)
    assert 200 * _binomial_tail(suggested, 1000, 0.1) <= 1e-6 < 200 * _binomial_tail(
        suggested - 1, 1000, 0.1)
    with pytest.warns(CohortCapWarning, match=f"cohort.max_size={suggested} keeps"):
        warn_cap_overflow(ledger, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_cap_overflow(dataclasses.replace(ledger, max_cohort_size=suggested), 200)
    for quiet in (dataclasses.replace(ledger, max_cohort_size=None),
                  dataclasses.replace(ledger, max_cohort_size=1000),
                  dataclasses.replace(ledger, sampling="fixed")):
        assert quiet.cap_overflow_delta(200) == 0.0
    assert "cap_overflow_delta" in ledger.description()
