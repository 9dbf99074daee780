"""Client-level DP sums, means, histograms and quantiles, on the aggregator stages.

Every statistic is a federated computation over one value per client: the clients' values are
clipped (`fedjax_sim.aggregators.clip`, flat L2), summed with uniform weights (the ``sum`` or
the fixed-denominator ``mean`` reducer) and noised (`gaussian_noise`, std ``z * clip_norm`` on
the sum): the Gaussian mechanism with L2 sensitivity ``clip_norm`` under add/remove one client
(Dwork and Roth 2014, Sec. 3.5; McMahan et al. 2018 for the fixed denominator). Epsilon comes
from ``dp-accounting`` (`fedjax_sim.privacy.epsilon_of`) for the number of such queries on the
same clients: one for a sum, mean or histogram; one per step and level for a quantile.

Quantiles are a DP binary search (as in Andrew et al. 2021's count of unclipped clients, and
Smith's noisy binary search): each step asks the noised number of clients whose value is at
most a threshold (sensitivity 1) and halves the interval of a grid.

The number of clients n is treated as public (the simulation's population), as the fixed
denominator of DP-FedAvg is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import dp_event as events
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim import aggregators as agg
from fedjax_sim.federated import CLIENTS, SERVER, FederatedValue, at_clients, federated_map
from fedjax_sim.privacy import epsilon_of

PyTree = Any

__all__ = [
    "Release", "adaptive_quantiles", "client_histograms", "dp_histogram", "dp_mean",
    "dp_quantiles", "dp_sum", "exact_quantiles", "quantile_ranks",
    "gaussian_epsilon", "noise_for_epsilon", "private_mean", "private_sum",
]


@dataclasses.dataclass(frozen=True)
class Release:
    """A released statistic and its privacy.

    Attributes:
      value: the (noised) statistic, a numpy array.
      epsilon: epsilon at ``delta`` (inf without noise, 0 if nothing was asked).
      delta: the delta of the guarantee.
      noise_multiplier: z of each Gaussian query (0: no noise).
      queries: how many Gaussian queries of multiplier z the release composes.
      noise_stddev: the std of the noise on each released coordinate.
      extra: statistic-specific facts (the clip norm, the grid of a quantile search, ...).
    """

    value: np.ndarray
    epsilon: float
    delta: float
    noise_multiplier: float
    queries: int
    noise_stddev: float
    extra: dict = dataclasses.field(default_factory=dict)


def gaussian_epsilon(noise_multiplier: float, queries: int = 1, delta: float = 1e-6,
                     sampling_probability: float = 1.0, accountant: str = "rdp") -> float:
    """Epsilon of ``queries`` Gaussian mechanisms of multiplier z on the same clients.

    ``dp-accounting``'s ``GaussianDpEvent(z)`` (Poisson-subsampled when the probability is below
    1) composed ``queries`` times; inf for z = 0, 0 for no query.
    """
    if queries <= 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    event: events.DpEvent = events.GaussianDpEvent(float(noise_multiplier))
    if sampling_probability < 1.0:
        event = events.PoissonSampledDpEvent(float(sampling_probability), event)
    return epsilon_of(event, int(queries), delta, accountant)


def noise_for_epsilon(epsilon: float, queries: int, delta: float,
                      accountant: str = "rdp") -> float:
    """The smallest z whose ``queries`` Gaussian queries on all clients spend ``epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` over ``GaussianDpEvent(z)`` composed ``queries``
    times (every client in every query: no sampling); 0 (no noise) for epsilon = inf.
    """
    if math.isinf(epsilon):
        return 0.0
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")

    def make_event(z: float) -> events.DpEvent:
        return events.SelfComposedDpEvent(events.GaussianDpEvent(z), int(queries))

    def make_accountant():
        if accountant == "pld":
            return pld_privacy_accountant.PLDAccountant()
        return rdp_privacy_accountant.RdpAccountant()

    return float(dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4))


def _check_clients(value: Any) -> None:
    if not isinstance(value, FederatedValue) or value.placement is not CLIENTS:
        raise TypeError(f"expected a CLIENTS value (at_clients(...)), got {value!r}")


def _aggregate(value: FederatedValue, clip_norm, noise_multiplier, reducer: agg.Stage,
               key: jax.Array, denominator: jax.Array | None = None) -> FederatedValue:
    """``chain(clip, reducer, gaussian_noise)`` with the clip norm and z put into the stages'
    states as arrays (so one compilation serves every value of them; z = 0: no noise), and
    ``denominator`` into the ``mean`` reducer's state when given."""
    _check_clients(value)
    num_clients = value.num_clients
    weights = (jnp.ones((num_clients,), jnp.float32) if value.mask is None
               else value.mask.astype(jnp.float32))  # padding clients send nothing
    members = jax.tree.map(lambda x: x.astype(jnp.float32), value.value)
    aggregator = agg.chain(agg.clip(1.0), reducer, agg.gaussian_noise(1.0))
    clip_state, reduce_state, noise_state = aggregator.init(jax.tree.map(lambda x: x[0],
                                                                         members))
    # inf (no clipping) as the largest float: the noise std z * C stays 0 when z = 0
    norm = jnp.minimum(jnp.asarray(clip_norm, jnp.float32), jnp.finfo(jnp.float32).max)
    if denominator is not None:
        reduce_state = {**reduce_state, "denominator": jnp.asarray(denominator, jnp.float32)}
    state = ({**clip_state, "norm": norm}, reduce_state,
             {**noise_state, "noise_multiplier": jnp.asarray(noise_multiplier, jnp.float32)})
    total, _, _ = aggregator.apply(state, members, weights, key)
    return FederatedValue(total, SERVER, True)


def private_sum(value: FederatedValue, *, clip_norm: float | jax.Array,
                noise_multiplier: float | jax.Array, key: jax.Array) -> FederatedValue:
    """CLIENTS -> SERVER: ``sum_c clip(x_c) + N(0, (z * clip_norm)^2)`` per coordinate.

    ``chain(clip(clip_norm), sum(uniform), gaussian_noise(z))`` over the clients' members (any
    pytree; the clip is over the whole member). z = 0 adds no noise; ``clip_norm = inf`` does
    not clip (then there is no privacy). Traceable (the clip norm and z may be traced arrays):
    use it inside a `federated_computation`.
    """
    return _aggregate(value, clip_norm, noise_multiplier, agg.sum(weighting="uniform"), key)


def private_mean(value: FederatedValue, *, clip_norm: float | jax.Array,
                 noise_multiplier: float | jax.Array, key: jax.Array,
                 denominator: float | None = None) -> FederatedValue:
    """CLIENTS -> SERVER: the private sum divided by a fixed ``denominator`` (default: the
    number of clients, C, less the padding clients of the value's ``mask``).

    The fixed-denominator estimator of DP-FedAvg (``mean(uniform, denominator)``): unbiased for
    the mean of the clipped values, noise std ``z * clip_norm / denominator``.
    """
    _check_clients(value)
    count = None
    if denominator is None and value.mask is not None:  # padding clients are not clients
        count = jnp.maximum(jnp.sum(jnp.asarray(value.mask, jnp.float32)), 1.0)
    reducer = agg.mean(weighting="uniform",
                       denominator=float(denominator or value.num_clients))
    return _aggregate(value, clip_norm, noise_multiplier, reducer, key, count)


def _release(value, epsilon_args, z, stddev, extra) -> Release:
    queries, delta, accountant = epsilon_args
    return Release(np.asarray(jax.device_get(value)),
                   gaussian_epsilon(z, queries, delta, accountant=accountant), delta, float(z),
                   int(queries), float(stddev), extra)


def _check(values: Any, clip_norm: float, noise_multiplier: float) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if values.ndim < 1 or values.shape[0] < 1:
        raise ValueError(f"expected one value per client [C, ...], got shape {values.shape}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (inf: no clipping), got {clip_norm!r}")
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return values


@functools.partial(jax.jit, static_argnames=("mean",))
def _released(values, key, clip_norm, noise_multiplier, *, mean):
    release = private_mean if mean else private_sum
    return release(at_clients(values), clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                   key=key).value


def dp_sum(values: Any, *, clip_norm: float, noise_multiplier: float, key: jax.Array,
           delta: float = 1e-6, accountant: str = "rdp") -> Release:
    """The client-level DP sum of ``values [C, ...]`` (one value per client): `private_sum`."""
    values = _check(values, clip_norm, noise_multiplier)
    total = _released(values, key, clip_norm, noise_multiplier, mean=False)
    return _release(total, (1, delta, accountant), noise_multiplier,
                    noise_multiplier * clip_norm, {"clip_norm": clip_norm})


def dp_mean(values: Any, *, clip_norm: float, noise_multiplier: float, key: jax.Array,
            delta: float = 1e-6, accountant: str = "rdp") -> Release:
    """The client-level DP mean of ``values [C, ...]`` over the C clients: `private_mean`."""
    values = _check(values, clip_norm, noise_multiplier)
    n = values.shape[0]
    mean = _released(values, key, clip_norm, noise_multiplier, mean=True)
    return _release(mean, (1, delta, accountant), noise_multiplier,
                    noise_multiplier * clip_norm / n, {"clip_norm": clip_norm,
                                                       "denominator": n})


def client_histograms(values: Any, offsets: Any, edges: Any, *, normalize: bool = False
                      ) -> np.ndarray:
    """``[C, B]`` each client's histogram of its examples' ``values`` over ``edges [B + 1]``.

    Each client's local computation (on the host: a ``bincount`` over the flat CSR examples, client
    ``c`` owning ``values[offsets[c]:offsets[c + 1]]``): bins are ``[e_b, e_{b+1})``, the last
    one closed, values outside all bins are not counted (numpy's ``histogram`` rule).
    ``normalize``: each row divided by the client's number of examples (its distribution).
    """
    values = np.asarray(values, np.float64)
    offsets = np.asarray(offsets, np.int64)
    edges = np.asarray(edges, np.float64)
    num_clients, bins = offsets.size - 1, edges.size - 1
    client_of = np.repeat(np.arange(num_clients), np.diff(offsets))
    index = np.searchsorted(edges, values, side="right") - 1
    index = np.where(values == edges[-1], bins - 1, index)  # the last bin is closed
    inside = (index >= 0) & (index < bins)
    counts = np.bincount(client_of[inside] * bins + index[inside],
                         minlength=num_clients * bins).reshape(num_clients, bins)
    counts = counts.astype(np.float32)
    if normalize:
        counts /= np.maximum(np.diff(offsets), 1).astype(np.float32)[:, None]
    return counts


def dp_histogram(histograms: Any, *, clip_norm: float, noise_multiplier: float,
                 key: jax.Array, mean: bool = False, delta: float = 1e-6,
                 accountant: str = "rdp") -> Release:
    """The DP sum (or mean over clients) of per-client histograms ``[C, B]`` over a known domain.

    Each client's histogram is clipped to L2 norm ``clip_norm`` (a distribution, L1 = 1, has
    L2 <= 1: ``clip_norm = 1`` never binds), summed and noised once (`dp_sum` / `dp_mean`).
    """
    release = (dp_mean if mean else dp_sum)(histograms, clip_norm=clip_norm,
                                            noise_multiplier=noise_multiplier, key=key,
                                            delta=delta, accountant=accountant)
    return dataclasses.replace(release, extra={**release.extra, "mean": mean})


def quantile_grid(low: float, high: float, resolution: float) -> tuple[np.ndarray, int]:
    """The thresholds ``low + k * resolution`` (k = 0..K, the last >= high) and the number of
    binary-search steps ``ceil(log2(K + 1))``."""
    if not high > low or not resolution > 0:
        raise ValueError(f"quantile search needs low < high and resolution > 0, got low={low}, "
                         f"high={high}, resolution={resolution}")
    count = int(math.ceil((high - low) / resolution - 1e-9)) + 1
    return low + resolution * np.arange(count, dtype=np.float64), max(
        1, int(math.ceil(math.log2(count))))


def quantile_ranks(levels: Any, count: int) -> np.ndarray:
    """``ceil(q * C)`` for each level q: the rank (1-based) of the q-th quantile's value among
    C sorted values, by the rule ``count(x <= t) >= q * C`` (numpy's ``inverted_cdf``). q * C
    is rounded to 9 decimals first: 0.28 * 25 is 7, not float64's 7.000000000000001 (rank 8,
    which numpy's ``inverted_cdf`` returns)."""
    targets = np.round(np.asarray(levels, np.float64) * count, 9)
    return np.maximum(np.ceil(targets), 1).astype(np.int64)


def exact_quantiles(values: Any, levels: Any) -> np.ndarray:
    """The non-private quantiles by `quantile_ranks`: the value of rank ``ceil(q * C)``."""
    ordered = np.sort(np.asarray(values, np.float64).ravel())
    return ordered[quantile_ranks(levels, ordered.size) - 1]


def private_count_at_most(values: FederatedValue, threshold: jax.Array, *,
                          noise_multiplier: float, key: jax.Array) -> jax.Array:
    """The noised number of clients whose value is <= ``threshold`` (sensitivity 1)."""
    below = federated_map(lambda v: (v <= threshold).astype(jnp.float32), values)
    return private_sum(below, clip_norm=1.0, noise_multiplier=noise_multiplier, key=key).value


@functools.partial(jax.jit, static_argnames=("steps",))
def _quantile_search(values, targets, keys, grid, *, steps, noise_multiplier):
    clients = at_clients(values)

    def search(level_target, level_key):
        def step(bounds, step_key):
            lo, hi = bounds
            mid = (lo + hi) // 2
            count = private_count_at_most(clients, grid[mid], noise_multiplier=noise_multiplier,
                                          key=step_key)
            enough = count >= level_target
            return (jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)), count

        (lo, _), counts = jax.lax.scan(step, (jnp.int32(0), jnp.int32(grid.size - 1)),
                                       jax.random.split(level_key, steps))
        return grid[lo], counts

    return jax.vmap(search)(targets, keys)


def dp_quantiles(values: Any, levels: Any, *, low: float, high: float,
                 resolution: float = 1.0, noise_multiplier: float, key: jax.Array,
                 delta: float = 1e-6, accountant: str = "rdp") -> Release:
    """DP quantiles of one scalar per client by a noisy binary search over a grid.

    For each level q the search finds the smallest grid threshold t with ``count(x <= t) >= q
    * C`` (`exact_quantiles` when the values lie on the grid; q * C to 9 decimals): each of its
    ``ceil(log2(K + 1))`` steps halves the candidate interval on a noised count (`private_sum`
    of the clients' indicators, noise std z). Values outside ``[low, high]`` land on the ends.

    Returns a `Release` whose value is ``[len(levels)]``; epsilon composes ``len(levels) *
    steps`` Gaussian queries of multiplier z.
    """
    values = _check(values, 1.0, noise_multiplier)
    if values.ndim != 1:
        raise ValueError(f"quantiles take one scalar per client [C], got shape {values.shape}")
    levels = np.atleast_1d(np.asarray(levels, np.float64))
    if np.any((levels <= 0) | (levels > 1)):
        raise ValueError(f"quantile levels must be in (0, 1], got {levels.tolist()}")
    grid, steps = quantile_grid(low, high, resolution)
    keys = jax.random.split(key, levels.size)
    # q * C in float64 to 9 decimals (`quantile_ranks`): 0.6 * 25 is 15, not float32's
    # 15.000001, which needed a 16th value
    targets = np.round(levels * values.shape[0], 9)
    result, counts = _quantile_search(jnp.asarray(values), jnp.asarray(targets, jnp.float32),
                                      keys, jnp.asarray(grid, jnp.float32), steps=steps,
                                      noise_multiplier=jnp.float32(noise_multiplier))
    return _release(result, (levels.size * steps, delta, accountant), noise_multiplier,
                    noise_multiplier, {"levels": levels.tolist(), "steps": steps,
                                       "grid": [float(low), float(high), float(resolution)],
                                       "counts": np.asarray(counts).tolist()})


@functools.partial(jax.jit, static_argnames=("rounds",))
def _adaptive_search(values, levels, keys, initial, learning_rate, count_stddev, *, rounds):
    clients = at_clients(values[:, None])  # each client's value as a 1-d message: its norm

    def estimate(level, level_key):
        stage = agg.clip(1.0, target_quantile=0.5, count_stddev=0.0)
        state = {**stage.init(None), "norm": jnp.float32(initial),
                 "target_quantile": level, "learning_rate": jnp.float32(learning_rate),
                 "count_stddev": jnp.float32(count_stddev)}
        weights = jnp.ones((values.shape[0],), jnp.float32)

        def one_round(state, round_key):
            _, _, state, metrics, _ = stage.apply(state, clients.value, weights, round_key, {})
            return state, state["norm"]

        state, norms = jax.lax.scan(one_round, state, jax.random.split(level_key, rounds))
        return state["norm"], norms

    return jax.vmap(estimate)(levels, keys)


def adaptive_quantiles(values: Any, levels: Any, *, rounds: int, initial: float,
                       learning_rate: float = 0.2, count_stddev: float, key: jax.Array,
                       delta: float = 1e-6, accountant: str = "rdp") -> Release:
    """Quantiles of |one scalar per client| by adaptive clipping's estimator.

    Andrew, Thakkar, McMahan and Ramaswamy 2021 (arXiv:1905.03871), run as an analytics query:
    the `fedjax_sim.aggregators.clip` stage with ``target_quantile = q`` sees each client's
    value as its message, and every round moves its norm C geometrically,
    ``C <- C exp(-eta (b - q))``, with b the noised fraction of clients at most C (noise std
    ``count_stddev`` on the count, centred so that its sensitivity is 1/2). After ``rounds``
    rounds C estimates the q-th quantile (up to the step's oscillation, a factor
    ``exp(eta / C)`` at worst without noise). Epsilon: ``len(levels) * rounds`` Gaussian queries
    of multiplier ``2 * count_stddev`` (every client every round).
    """
    values = np.abs(_check(values, 1.0, 0.0))
    if values.ndim != 1:
        raise ValueError(f"quantiles take one scalar per client [C], got shape {values.shape}")
    levels = np.atleast_1d(np.asarray(levels, np.float64))
    if np.any((levels <= 0) | (levels >= 1)):
        raise ValueError(f"adaptive clipping estimates levels in (0, 1), got {levels.tolist()}")
    if rounds < 1 or not initial > 0 or not learning_rate > 0 or not count_stddev >= 0:
        raise ValueError("adaptive quantiles need rounds >= 1, initial > 0, learning_rate > 0 "
                         f"and count_stddev >= 0, got {rounds}, {initial}, {learning_rate}, "
                         f"{count_stddev}")
    result, norms = _adaptive_search(
        jnp.asarray(values), jnp.asarray(levels, jnp.float32),
        jax.random.split(key, levels.size), initial, learning_rate, count_stddev,
        rounds=int(rounds))
    z = 2.0 * float(count_stddev)
    return _release(result, (levels.size * int(rounds), delta, accountant), z,
                    float(count_stddev), {"levels": levels.tolist(), "rounds": int(rounds),
                                          "trajectory": np.asarray(norms).tolist()})
