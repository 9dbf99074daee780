"""Privacy accounting with Google's ``dp-accounting`` (no hand-written accountant).

A run's privacy is a *ledger*: every Gaussian mechanism the pipeline applies to the clients
(the update noise, adaptive clipping's noised count, later DP analytics queries) with its noise
multiplier, each applied once per round to the round's sampled clients. One round is then the
sampled Gaussian mechanism

  PoissonSampledDpEvent(q, ComposedDpEvent([GaussianDpEvent(z_1), GaussianDpEvent(z_2), ...]))

(or ``SampledWithoutReplacementDpEvent`` for a fixed-size cohort), self-composed over the
rounds, and epsilon at delta comes from the RDP or PLD accountant. Gaussian mechanisms on the
same clients compose exactly into one of multiplier ``(sum_j z_j^-2)^-1/2``; the PLD
accountant, which takes a single Gaussian under Poisson sampling, gets that one.

User-level DP: the unit of privacy is a client (add/remove one client for Poisson sampling,
replace one client for a fixed-size cohort drawn without replacement). Under replace-one a
mechanism's L2 sensitivity doubles (one client's message out, another's in), so a fixed-size
cohort's Gaussians are accounted with half their multipliers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import dp_accounting
import scipy.stats
from dp_accounting import dp_event as events
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


def effective_noise_multiplier(noise_multipliers: Mapping[str, float]) -> float:
    """The multiplier of the one Gaussian mechanism equal to all of ``noise_multipliers``.

    ``(sum_j z_j^-2)^-1/2``; inf when there are none; 0 when one of them is 0 (no privacy).
    """
    values = [float(z) for z in noise_multipliers.values()]
    if not values:
        return math.inf
    if any(z <= 0 for z in values):
        return 0.0
    return sum(z ** -2 for z in values) ** -0.5


class CohortCapWarning(UserWarning):
    """Poisson sampling's cohort cap is exceeded often enough to matter for delta."""


def warn_cap_overflow(ledger: PrivacyLedger, rounds: int, fraction: float = 0.1) -> None:
    """`CohortCapWarning` when the cap's overflow term exceeds ``fraction`` of delta."""
    extra = ledger.cap_overflow_delta(rounds)
    if extra > fraction * ledger.delta:
        warnings.warn(
            f"cohort.max_size {ledger.max_cohort_size}: a Poisson draw of the "
            f"{ledger.num_clients} clients (q = {ledger.sampling_probability:.4g}) exceeds it "
            f"in some of the {rounds} rounds with probability {extra:.3g}, "
            f"{extra / ledger.delta:.3g}x delta {ledger.delta:g}; the guarantee is (epsilon, "
            f"delta + {extra:.3g}). cohort.max_size={ledger.cap_for_overflow(rounds, fraction)} "
            f"keeps it under {fraction:g} delta", CohortCapWarning, stacklevel=2)


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
    """Every noised quantity of a run, and how clients are sampled.

    Attributes:
      noise_multipliers: ``{mechanism: z}`` applied every round to the sampled clients.
      num_clients: the population N (the clients that can be sampled).
      cohort_size: expected clients per round (q * N for Poisson sampling; the fixed size
        otherwise).
      sampling: ``"poisson"`` (each client joins independently with q) or ``"fixed"``
        (cohort_size clients drawn uniformly without replacement).
      delta: the target delta.
      accountant: ``"rdp"`` or ``"pld"``.
      max_cohort_size: Poisson sampling's cap (None: none). A round whose draw exceeds it
        trains a random subset of that many clients, an event outside the Poisson accounting:
        its probability over the rounds (`cap_overflow_delta`) adds to delta.
    """

    noise_multipliers: Mapping[str, float]
    num_clients: int
    cohort_size: float
    sampling: str = "poisson"
    delta: float = 1e-5
    accountant: str = "rdp"
    max_cohort_size: int | None = None

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r}: expected one of {SAMPLINGS}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant={self.accountant!r}: expected one of {ACCOUNTANTS}")
        if not 0 < self.cohort_size <= self.num_clients:
            raise ValueError(f"cohort_size={self.cohort_size} must be in (0, num_clients="
                             f"{self.num_clients}]")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")

    @property
    def sampling_probability(self) -> float:
        return float(self.cohort_size) / float(self.num_clients)

    def round_event(self) -> events.DpEvent:
        """The DP event of one round."""
        return round_event(self.noise_multipliers, self.num_clients, self.cohort_size,
                           self.sampling, self.accountant)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (inf without noise, 0 for 0 rounds).

        With the RDP accountant one round's RDP curve is computed once and scaled by
        ``rounds`` (RDP composes additively), so asking every round costs microseconds.
        """
        event = self.round_event()
        inner = getattr(event, "event", event)
        if (self.accountant != "rdp" or rounds <= 0
                or isinstance(inner, (events.NonPrivateDpEvent, events.NoOpDpEvent))):
            return epsilon_of(event, rounds, self.delta, self.accountant, self.sampling)
        orders, rdp = self._round_rdp
        return float(rdp_privacy_accountant.compute_epsilon(orders, rdp * rounds,
                                                            self.delta)[0])

    def cap_overflow_delta(self, rounds: int) -> float:
        """The probability that some round's Poisson draw exceeds ``max_cohort_size`` (union
        bound: ``rounds * P(Binomial(N, q) > cap)``, at most 1; 0 without a cap below N).

        Outside that event the run is the Poisson-sampled mechanism the epsilon accounts, so the
        guarantee is (epsilon, delta + this) (the two runs differ only on the event).
        """
        cap = self.max_cohort_size
        if self.sampling != "poisson" or cap is None or cap >= self.num_clients or rounds <= 0:
            return 0.0
        tail = float(scipy.stats.binom.sf(cap, self.num_clients, self.sampling_probability))
        return min(1.0, rounds * tail)

    def cap_for_overflow(self, rounds: int, fraction: float = 0.1) -> int:
        """The least cap whose `cap_overflow_delta` over ``rounds`` is at most ``fraction``
        of delta."""
        target = fraction * self.delta / max(rounds, 1)
        cap = int(scipy.stats.binom.isf(target, self.num_clients, self.sampling_probability))
        while cap < self.num_clients and scipy.stats.binom.sf(
                cap, self.num_clients, self.sampling_probability) > target:
            cap += 1
        return min(cap, self.num_clients)

    @functools.cached_property
    def _round_rdp(self):
        """``(orders, rdp)`` of one round (RDP accountant)."""
        account = _accountant(self.accountant, self.sampling)
        with _quiet_absl():
            account.compose(self.round_event(), 1)
        return account._orders, account._rdp  # noqa: SLF001 (one round's RDP curve)

    def description(self) -> str:
        relation = "add/remove one client" if self.sampling == "poisson" else "replace one client"
        capped = ""
        if (self.sampling == "poisson" and self.max_cohort_size is not None
                and self.max_cohort_size < self.num_clients):
            capped = (f"; a draw above the cap of {self.max_cohort_size} clients (a random "
                      "subset of them trains) is outside this accounting, and its probability "
                      "over the rounds (cap_overflow_delta) adds to delta")
        return (f"{self.accountant.upper()} accountant (dp-accounting), {self.sampling} sampling "
                f"q={self.sampling_probability:.6g}, user-level ({relation}), delta={self.delta:g}"
                + capped)


def round_event(noise_multipliers: Mapping[str, float], num_clients: int, cohort_size: float,
                sampling: str = "poisson", accountant: str = "rdp") -> events.DpEvent:
    """One round's DP event for the mechanisms ``noise_multipliers``.

    A fixed-size cohort is accounted under replace-one, where one client's replacement moves
    a clipped sum by up to twice the clip norm (its old message out, the new one in), so each
    Gaussian of multiplier z (noise std z times the add/remove sensitivity) enters
    ``SampledWithoutReplacementDpEvent`` as ``GaussianDpEvent(z / 2)``: dp-accounting's
    multiplier is the noise std over the L2 sensitivity under the accountant's relation.
    """
    if sampling == "fixed":
        noise_multipliers = {k: float(v) / 2.0 for k, v in noise_multipliers.items()}
    z = effective_noise_multiplier(noise_multipliers)
    if z == 0.0:
        inner: events.DpEvent = events.NonPrivateDpEvent()
    elif math.isinf(z):
        inner = events.NoOpDpEvent()
    elif accountant == "rdp" and len(noise_multipliers) > 1:
        inner = events.ComposedDpEvent(
            [events.GaussianDpEvent(float(v)) for v in noise_multipliers.values()])
    else:  # the PLD accountant takes one Gaussian under sampling: the exact equivalent
        inner = events.GaussianDpEvent(z)
    if sampling == "poisson":
        return events.PoissonSampledDpEvent(float(cohort_size) / num_clients, inner)
    return events.SampledWithoutReplacementDpEvent(int(num_clients), int(round(cohort_size)),
                                                   inner)


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning through absl for every fractional RDP order it drops
    (harmless: that order is excluded from the minimum); hide those while it computes."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        if sampling != "poisson":
            raise ValueError("the PLD accountant supports Poisson sampling only; use the RDP "
                             "accountant for a fixed-size cohort")
        return pld_privacy_accountant.PLDAccountant()
    relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                else dp_accounting.NeighboringRelation.REPLACE_ONE)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)


def epsilon_of(event: events.DpEvent, rounds: int, delta: float, accountant: str = "rdp",
               sampling: str = "poisson") -> float:
    """Epsilon at ``delta`` of ``event`` composed ``rounds`` times."""
    if rounds <= 0:
        return 0.0
    # The accountants reject a sampled non-private or no-op event: answer those here.
    inner = event.event if isinstance(event, (events.PoissonSampledDpEvent,
                                              events.SampledWithoutReplacementDpEvent)) else event
    if isinstance(inner, events.NonPrivateDpEvent):
        return math.inf
    if isinstance(inner, events.NoOpDpEvent):
        return 0.0
    account = _accountant(accountant, sampling)
    with _quiet_absl():
        account.compose(event, int(rounds))
        return float(account.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, rounds: int, num_clients: int,
                               cohort_size: float, delta: float, sampling: str = "poisson",
                               accountant: str = "rdp") -> float:
    """The smallest noise multiplier z whose run of ``rounds`` rounds has epsilon <= target.

    A bisection by `dp_accounting.calibrate_dp_mechanism` over one Gaussian mechanism per
    round (with adaptive clipping, `aggregators.split_noise_multiplier` then splits z between
    the update and the clip count so that together they are exactly z).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")

    def make_event(z: float) -> events.DpEvent:
        one = round_event({"update": z}, num_clients, cohort_size, sampling, accountant)
        return events.SelfComposedDpEvent(one, int(rounds))

    bracket: Any = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    if accountant == "pld":
        # The PLD of a tiny multiplier takes minutes and tens of GiB (z = 1e-3: 38 GiB), and
        # the bisection evaluates its lower end first: bracket by RDP's z instead, an upper
        # bound (RDP's epsilon bounds PLD's from above), halving the lower end as needed.
        upper = calibrate_noise_multiplier(target_epsilon, rounds, num_clients, cohort_size,
                                           delta, sampling, "rdp")
        lower = upper / 2
        while lower > 1e-2 and epsilon_of(make_event(lower), 1, delta, accountant,
                                          sampling) <= target_epsilon:
            lower /= 2
        bracket = dp_accounting.ExplicitBracketInterval(lower, upper)
    with _quiet_absl():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant, sampling), make_event, target_epsilon, delta,
            bracket, tol=1e-4))
