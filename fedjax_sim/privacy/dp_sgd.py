"""Example-level DP inside the clients: DP-SGD (Abadi et al. 2016, arXiv:1607.00133).

Every local step computes one gradient per example (``jax.vmap`` of ``jax.grad``), clips
each to L2 norm ``clip_norm``, sums them, adds Gaussian noise of std ``noise_multiplier *
clip_norm`` and divides by the batch size B: what
``optax.contrib.differentially_private_aggregate`` computes (``tests/privacy/test_dp_sgd.py``
compares the two), but with the clipped sum taken as one backward pass of the per-example
losses scaled by their clipping factors, so the per-example gradients are read once, for their
norms, not again to be scaled and summed. The noise key is the client's step key, so every
client, step and round draws fresh noise.
Dividing by the static B rather than the number of real examples keeps the count private.

`dp_sgd_loss` wraps a loss function: it still evaluates the loss, and its ``gradient`` is
what `fedjax_sim.algorithms.local.local_train` steps with, so every algorithm that trains
through ``local_train`` and sends only functions of its trained parameters gets DP-SGD
without a change. A proximal term or control variate (FedProx, SCAFFOLD, FedDyn) is added
after the noise: it depends on parameters only, so it is post-processing.

Accounting (`ExampleLedger`): the unit of privacy is one training example (add/remove one
example of one client). No amplification is claimed, neither from the shuffled local batches
(a shuffle is not Poisson sampling) nor from client sampling (the rest of the round does not
hide a client's whole update, which example-level DP leaves unbounded). A step in which an
example appears k times (small clients repeat their data) is a Gaussian mechanism of
sensitivity ``k * clip_norm``; steps compose as Gaussians, so a round of a client of n
examples costs at most ``kmax(n) * a(n)`` in units of ``noise_multiplier ** -2``, where a(n)
is the appearances of one example in the round's stream of S*B positions (or n*E in epoch
mode) and kmax(n) the most copies in one batch. A run composes that over the rounds the
client trained in, counted by replaying the sampler (cohorts are independent of the data),
and reports the worst client.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import dp_event as events
from dp_accounting import gaussian_mechanism

from fedjax_sim.privacy.accounting import ACCOUNTANTS, epsilon_of

LossFn = Callable[..., tuple[jax.Array, dict]]


class DPSGDLoss:
    """A loss function whose ``gradient`` is DP-SGD's clipped, summed and noised one.

    Call it like the loss it wraps; ``gradient(params, batch, mask, rng) -> (grads, stats)``
    is the privatized gradient of the batch (stats: the batch's masked sums, as ``jax.grad``
    with ``has_aux`` of the wrapped loss would give).
    """

    def __init__(self, loss_fn: LossFn, clip_norm: float, noise_multiplier: float):
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        self.loss_fn = loss_fn
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)

    def __call__(self, params, batch, mask, rng):
        return self.loss_fn(params, batch, mask, rng)

    def gradient(self, params, batch, mask, rng):
        def one(params, example, example_mask, key):
            single = jax.tree.map(lambda a: a[None], example)
            return self.loss_fn(params, single, example_mask[None], key)

        size = mask.shape[0]
        keys = jax.random.split(jax.random.fold_in(rng, 0), size)  # dropout, per example
        # Per-example gradients only for their norms (padding: a zero gradient, norm 0)...
        grads, stats = jax.vmap(jax.grad(one, has_aux=True), in_axes=(None, 0, 0, 0))(
            params, batch, mask, keys)
        # The plain norm, on purpose (this is the hot loop): a per-example gradient past ~1e19,
        # whose squares overflow float32, gets norm inf and scale 0, so it is dropped rather
        # than clipped to clip_norm; the sensitivity bound holds either way. (The aggregation
        # stages' `client_norms` is overflow-safe at the cost of a second sum of squares.)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(g).reshape(size, -1), axis=1)
                             for g in jax.tree.leaves(grads)))
        scale = jax.lax.stop_gradient(1.0 / jnp.maximum(norms / self.clip_norm, 1.0))
        # ...and the clipped sum as one backward pass of the scaled losses (the same examples
        # and dropout keys): optax's `differentially_private_aggregate` sums the scaled
        # per-example gradients instead, reading them from memory again.
        clipped = jax.grad(lambda p: jnp.sum(
            scale * jax.vmap(one, in_axes=(None, 0, 0, 0))(p, batch, mask, keys)[0]))(params)
        return self._noise(clipped, size, jax.random.fold_in(rng, 1)), {
            k: jnp.sum(v, axis=0) for k, v in stats.items()}

    def _noise(self, clipped, size: int, noise_key):
        """`optax.contrib.differentially_private_aggregate`'s noise and division, on the summed
        clipped gradient: a normal draw per leaf from ``split(key, leaves + 1)[1:]``, of std
        ``noise_multiplier * clip_norm``, then ``/ size``."""
        if not jnp.issubdtype(noise_key.dtype, jax.dtypes.prng_key):  # raw uint32[2] key data
            noise_key = jax.random.wrap_key_data(noise_key)
        leaves, treedef = jax.tree.flatten(clipped)
        _, *keys = jax.random.split(noise_key, len(leaves) + 1)
        std = self.clip_norm * self.noise_multiplier
        return jax.tree.unflatten(treedef, [
            (g + std * jax.random.normal(k, g.shape, g.dtype)) / size
            for g, k in zip(leaves, keys, strict=True)])


def dp_sgd_loss(loss_fn: LossFn, clip_norm: float, noise_multiplier: float) -> DPSGDLoss:
    """``loss_fn`` trained with DP-SGD: pass it as an algorithm's ``loss_fn=``."""
    return DPSGDLoss(loss_fn, clip_norm, noise_multiplier)


def round_cost(client_sizes: np.ndarray, batch_size: int, num_steps: int,
               local_epochs: int | None) -> np.ndarray:
    """``[num_clients]`` bound on sum over a round's steps of k_s^2 for one example.

    k_s is how often the example appears in step s's batch. The client's stream has
    ``L = S * B`` positions (fixed steps) or ``min(n * E, S * B)`` (epochs); each epoch is one
    permutation, so one example appears ``a = ceil(L / n)`` times, at most
    ``kmax = min(a, ceil(B / n) + 1)`` times in one batch (1 when a = 1), and
    ``sum k_s^2 <= kmax * a``. 0 for an empty client.
    """
    n = np.asarray(client_sizes, np.int64)
    safe = np.maximum(n, 1)
    positions = num_steps * batch_size
    length = (np.full_like(n, positions) if local_epochs is None
              else np.minimum(n * local_epochs, positions))
    appearances = -(-length // safe)
    per_batch = np.where(appearances > 1,
                         np.minimum(appearances, -(-batch_size // safe) + 1), 1)
    return np.where(n > 0, per_batch * appearances, 0)


_CHUNK = 256


def _counter(sampler: Callable, num_clients: int) -> Callable:
    """Jitted ``(key, first, stop) -> [num_clients]``: participations in rounds
    ``[first, min(first + 256, stop))``."""

    @jax.jit
    def count(key, first, stop):
        def ids(r):
            sampled = sampler(jax.random.split(jax.random.fold_in(key, r), 4)[0])
            cohort, valid = (sampled[0], sampled[1]) if isinstance(sampled, tuple) else (
                sampled, jnp.ones(sampled.shape, bool))
            return cohort, valid & (r < stop)

        cohorts, valid = jax.vmap(ids)(first + jnp.arange(_CHUNK, dtype=jnp.int32))
        return jnp.zeros(num_clients, jnp.int32).at[cohorts.ravel()].add(
            valid.ravel().astype(jnp.int32))

    return count


# Algorithms whose clients send only functions of their DP-SGD-trained parameters (and of
# public counts), so the example-level accounting covers them. Mime/MimeLite also send a
# full-batch gradient, Ditto trains a second (personal) model, q-FFL and AFL send loss values.
EXAMPLE_DP_ALGORITHMS = ("fed_avg", "fed_prox", "fed_nova", "scaffold", "fed_dyn", "fed_buff")


@dataclasses.dataclass
class ExampleLedger:
    """Example-level DP-SGD accounting for a run (see the module docstring).

    Attributes:
      noise_multiplier: z of every local step.
      clip_norm: the per-example clip norm (reported only: epsilon does not depend on it).
      costs: ``[num_clients]`` per-round cost of each client (`round_cost`).
      sampler: the run's cohort sampler (replayed to count participations).
      delta: the target delta.
      accountant: ``"rdp"`` or ``"pld"``.
    """

    noise_multiplier: float
    clip_norm: float
    costs: np.ndarray
    sampler: Callable
    delta: float
    accountant: str = "rdp"
    participation: np.ndarray = dataclasses.field(init=False)
    rounds_counted: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant={self.accountant!r}: expected one of {ACCOUNTANTS}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")
        self.costs = np.asarray(self.costs, np.int64)
        self.participation = np.zeros(len(self.costs), np.int64)
        self._count = _counter(self.sampler, len(self.costs))

    @classmethod
    def for_run(cls, noise_multiplier: float, clip_norm: float, client_sizes: np.ndarray,
                schedule: Any, sampler: Callable, delta: float | None = None,
                accountant: str = "rdp") -> ExampleLedger:
        """The ledger of a run with ``schedule`` (a `ClientSchedule`) and ``sampler``.

        ``delta`` None: ``1 / total_examples ** 1.1``.
        """
        total = int(np.sum(client_sizes))
        costs = round_cost(client_sizes, schedule.batch_size, schedule.num_steps,
                           schedule.local_epochs)
        return cls(float(noise_multiplier), float(clip_norm), costs, sampler,
                   float(delta) if delta is not None else 1.0 / max(total, 2) ** 1.1,
                   accountant)

    def count(self, key: jax.Array, rounds: int) -> None:
        """Adds the participations of rounds ``[rounds_counted, rounds)`` (root ``key``).

        Replays the round step's sampling key (``split(fold_in(key, round), 4)[0]``); a
        Poisson sampler's padding slots are not counted. Dropped clients (system model) are
        counted: an upper bound.
        """
        for first in range(self.rounds_counted, rounds, _CHUNK):
            self.participation += np.asarray(self._count(key, jnp.int32(first),
                                                         jnp.int32(rounds)))
        self.rounds_counted = max(self.rounds_counted, rounds)

    @property
    def worst_cost(self) -> int:
        """max over clients of participations * per-round cost (units of z^-2)."""
        return int(np.max(self.participation * self.costs, initial=0))

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of the worst client's examples over the rounds counted."""
        return example_epsilon(self.noise_multiplier, self.worst_cost, self.delta,
                               self.accountant)

    def description(self) -> str:
        how = ("RDP accountant (dp-accounting)" if self.accountant == "rdp" else
               "PLD: the equivalent Gaussian's exact epsilon (dp-accounting)")
        return (f"{how}, example-level "
                "(add/remove one example), no amplification by batch or client sampling, "
                f"worst client over the rounds it trained in, delta={self.delta:g}")

    def summary(self) -> dict[str, Any]:
        worst = int(np.argmax(self.participation * self.costs)) if len(self.costs) else 0
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "rounds": self.rounds_counted,
            "worst_client": worst,
            "worst_client_rounds": int(self.participation[worst]) if len(self.costs) else 0,
            "worst_client_round_cost": int(self.costs[worst]) if len(self.costs) else 0,
            "accounting": self.description(),
        }


def example_epsilon(noise_multiplier: float, cost: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Epsilon of ``cost`` unit Gaussian steps of multiplier z: one Gaussian of z/sqrt(cost).

    ``"pld"``: that one Gaussian's exact epsilon (Balle & Wang 2018, dp-accounting's
    `gaussian_mechanism.get_epsilon_gaussian`), which the PLD accountant approximates from
    above by discretizing: its privacy-loss grid grows as z/sqrt(cost) shrinks, and a run
    whose worst client has trained its examples a few thousand times (z = 1, cost 1,600:
    30 s and 4.6 GB per evaluation) would stall or run out of memory.
    """
    if cost <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    z = noise_multiplier / math.sqrt(cost)
    if accountant == "pld":
        return float(gaussian_mechanism.get_epsilon_gaussian(z, delta))
    return epsilon_of(events.GaussianDpEvent(z), 1, delta, accountant)

