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
from collections.abc import Mapping
from typing import Any

import dp_accounting
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
    """

    noise_multipliers: Mapping[str, float]
    num_clients: int
    cohort_size: float
    sampling: str = "poisson"
    delta: float = 1e-5
    accountant: str = "rdp"

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

    @functools.cached_property
    def _round_rdp(self):
        """``(orders, rdp)`` of one round (RDP accountant)."""
        account = _accountant(self.accountant, self.sampling)
        with _quiet_absl():
            account.compose(self.round_event(), 1)
        return account._orders, account._rdp  # noqa: SLF001 (one round's RDP curve)

    def description(self) -> str:
        relation = "add/remove one client" if self.sampling == "poisson" else "replace one client"
        return (f"{self.accountant.upper()} accountant (dp-accounting), {self.sampling} sampling "
                f"q={self.sampling_probability:.6g}, user-level ({relation}), delta={self.delta:g}")


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
