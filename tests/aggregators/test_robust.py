"""Robust reducers against independent numpy references written here, with padding.

Every case has clients of weight 0 (padding, dropped) holding huge values, so a reducer that
lets them in fails: the references use only the participating rows (numpy's median and sort,
Krum from its definition with explicit loops, Weiszfeld in float64, clipping's closed form).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.aggregators import (
    Stage,
    chain,
    create_aggregator,
    geometric_median,
    krum,
    mean,
    median,
    norm_bound,
    trimmed_mean,
)

NUM_CLIENTS = 9
# clients 2, 5 and 8 are padding / dropped (weight 0)
WEIGHTS = np.array([3.0, 1.0, 0.0, 7.0, 2.0, 0.0, 5.0, 1.5, 0.0], np.float32)
SENDING = WEIGHTS > 0


def _values(seed=0, num_clients=NUM_CLIENTS):
    """Two leaves; the non-participating clients hold values far outside the others."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(num_clients, 3, 2)).astype(np.float32)
    b = rng.normal(size=(num_clients, 5)).astype(np.float32)
    a[~SENDING[:num_clients]] = 1e4
    b[~SENDING[:num_clients]] = -1e4
    return {"a": a, "b": b}


def _flat(values):
    """[C, D] float64: each client's message as one vector (leaves in sorted-key order)."""
    return np.concatenate([np.asarray(values[k], np.float64).reshape(len(values[k]), -1)
                           for k in sorted(values)], axis=1)


def _unflat(vector):
    return {"a": vector[:6].reshape(3, 2), "b": vector[6:]}


def _apply(stage_or_aggregator, values, weights, key=0):
    aggregator = (chain(stage_or_aggregator) if isinstance(stage_or_aggregator, Stage)
                  else stage_or_aggregator)
    state = aggregator.init(jax.tree.map(lambda x: x[0], values))
    return jax.jit(aggregator.apply)(state, values, jnp.asarray(weights), jax.random.key(key))


def _assert_close(tree, flat_expected, atol=1e-5, rtol=1e-5):
    expected = _unflat(flat_expected)
    for k in expected:
        np.testing.assert_allclose(np.asarray(tree[k], np.float64), expected[k], atol=atol,
                                   rtol=rtol)


@pytest.mark.parametrize("weights", [WEIGHTS, np.where(np.arange(NUM_CLIENTS) == 7, 0.0, WEIGHTS)
                                     .astype(np.float32)], ids=["odd", "even"])
def test_median_matches_numpy_over_participating_rows(weights):
    values = _values()
    got, _, _ = _apply(median(), values, weights)
    _assert_close(got, np.median(_flat(values)[weights > 0], axis=0))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.34])
def test_trimmed_mean_matches_numpy(beta):
    values = _values(1)
    rows = _flat(values)[SENDING]
    n = len(rows)
    k = int(np.floor(beta * n))
    want = np.sort(rows, axis=0)[k:n - k].mean(axis=0)
    got, _, metrics = _apply(trimmed_mean(beta), values, WEIGHTS)
    _assert_close(got, want)
    assert float(metrics["aggregator/trimmed_mean/trimmed_per_side"]) == k


def test_trimmed_mean_beta_zero_is_the_unweighted_mean():
    values = _values(2)
    got, _, _ = _apply(trimmed_mean(0.0), values, WEIGHTS)
    _assert_close(got, _flat(values)[SENDING].mean(axis=0))


def _huge(seed):
    """Participating clients with coordinates near float32's max (2e38..3e38, both signs), so
    that sums (and the two middle values of a median) overflow float32; means cannot."""
    values = _values(seed)
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(SENDING)
    values["a"][ids, 0, 0] = rng.uniform(2e38, 3e38, len(ids)).astype(np.float32)
    values["b"][ids, 2] = -rng.uniform(2e38, 3e38, len(ids)).astype(np.float32)
    values["b"][ids, 4] = 3e38 - 1e37 * np.arange(len(ids))  # all past half of float32's max
    return values


@pytest.mark.parametrize("participating", [6, 5])
def test_mean_median_and_trimmed_mean_of_values_near_float32_max_are_finite(participating):
    """Sums of values ~3e38 overflowed to inf (the mean, the trimmed mean, the median's two
    middle values): the statistics are finite and equal numpy's in float64."""
    values = _huge(9)
    weights = WEIGHTS.copy()
    if participating == 5:  # an odd count: the median is one value
        weights[7] = 0.0
    sending = weights > 0
    assert sending.sum() == participating
    rows = _flat(values)[sending]
    n = len(rows)
    wants = {
        "median": (median(), np.median(rows, axis=0)),
        "trimmed": (trimmed_mean(0.2), np.sort(rows, axis=0)[int(0.2 * n):n - int(0.2 * n)]
                    .mean(axis=0)),
        "mean": (mean(), np.average(rows, axis=0, weights=weights[sending].astype(np.float64))),
        "uniform": (mean(weighting="uniform"), rows.mean(axis=0)),
        "multi_krum": (krum(0, multi=len(rows)), rows.mean(axis=0)),
    }
    for name, (stage, want) in wants.items():
        got, _, _ = _apply(stage, values, weights)
        for leaf in jax.tree.leaves(got):
            assert np.all(np.isfinite(np.asarray(leaf))), name
        _assert_close(got, want, atol=1e-5, rtol=1e-5)


def _numpy_krum(flat, sending, f, m):
    """Blanchard et al.'s definition, with loops: indices of the m best clients, and the mean."""
    ids = [i for i in range(len(flat)) if sending[i]]
    n = len(ids)
    k = min(max(n - f - 2, 1), max(n - 1, 1))
    scores = {}
    for i in ids:
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in ids if j != i)
        scores[i] = sum(d[:k])
    best = sorted(ids, key=lambda i: scores[i])[:m]
    return best, flat[best].mean(axis=0)


@pytest.mark.parametrize("f,m", [(1, 1), (2, 1), (1, 3), (0, 6)])
def test_krum_and_multi_krum_match_the_definition(f, m):
    values = _values(3)
    # one participating client far away: Krum must not pick it
    values["a"][4] += 30.0
    flat_outlier = _flat(values)
    best, want = _numpy_krum(flat_outlier, SENDING, f, m)
    assert 4 not in best or m == 6
    got, _, metrics = _apply(krum(f, multi=m), values, WEIGHTS)
    _assert_close(got, want, atol=1e-4)
    assert float(metrics["aggregator/krum/selected"]) == min(m, SENDING.sum())


@pytest.mark.parametrize("f,m", [(1, 1), (2, 2), (0, 1)])
def test_krum_never_picks_an_update_whose_squared_distances_overflow(f, m):
    """Attackers sending 1e20 (squared norm past float32's max): their distances to everyone
    overflow to inf (inf - inf = nan between two of them); they must score worst, not 0."""
    values = _values(4)
    attackers = [4] if m == 1 else [1, 4]
    for sign, i in zip([1.0, -1.0], attackers, strict=False):
        values["a"][i] = sign * 1e20
        values["b"][i] = sign * 1e20
    honest = [i for i in np.flatnonzero(SENDING) if i not in attackers]
    flat = _flat(values)
    # the reference in float64 (no overflow): the attackers are the farthest there too
    best, want = _numpy_krum(flat, SENDING, f, m)
    assert not set(best) & set(attackers)
    got, _, metrics = _apply(krum(f, multi=m), values, WEIGHTS)
    _assert_close(got, want, atol=1e-4)
    assert set(best) <= set(honest)
    assert float(metrics["aggregator/krum/selected"]) == m


def test_krum_with_every_score_infinite_still_averages_participating_clients():
    """All participating clients huge: all scores inf; the m selected are participating ones
    (never a weight-0 row), so the mean is finite and made of sent updates."""
    values = _values(5)
    for i in np.flatnonzero(SENDING):
        values["a"][i] = 1e20 * (1 + i)
        values["b"][i] = 1e20 * (1 + i)
    got, _, metrics = _apply(krum(0, multi=2), values, WEIGHTS)
    assert float(metrics["aggregator/krum/selected"]) == 2
    first_two = np.flatnonzero(SENDING)[:2]
    _assert_close(got, _flat(values)[first_two].mean(axis=0), rtol=1e-5)


def _numpy_weiszfeld(flat, alphas, iterations, nu):
    v = (alphas[:, None] * flat).sum(0) / alphas.sum()
    for _ in range(iterations):
        betas = alphas / np.maximum(nu, np.linalg.norm(flat - v, axis=1))
        v = (betas[:, None] * flat).sum(0) / betas.sum()
    return v


@pytest.mark.parametrize("weighting", ["given", "uniform"])
def test_geometric_median_matches_numpy_weiszfeld(weighting):
    values = _values(4)
    flat = _flat(values)[SENDING]
    alphas = WEIGHTS[SENDING].astype(np.float64)
    if weighting == "uniform":
        alphas = np.ones_like(alphas)
    want = _numpy_weiszfeld(flat, alphas, 8, 1e-6)
    got, _, metrics = _apply(geometric_median(8, 1e-6, weighting), values, WEIGHTS)
    _assert_close(got, want, atol=1e-4)
    objective = (alphas * np.linalg.norm(flat - want, axis=1)).sum() / alphas.sum()
    assert float(metrics["aggregator/geometric_median/objective"]) == pytest.approx(objective,
                                                                                    rel=1e-4)


@pytest.mark.parametrize("magnitude", [1e20, 1e38, 3e38])
@pytest.mark.parametrize("weighting", ["given", "uniform"])
def test_geometric_median_of_huge_values_matches_numpy_weiszfeld(magnitude, weighting):
    """Participating values up to 1e20 (squared distances past float32's max) or 3e38 (the
    distances themselves past it): every distance was inf, every beta 0, the result 0 and the
    objective inf. Reference: Weiszfeld in float64, which does not overflow."""
    values = _values(4)
    for k in values:  # the padding rows keep their +-1e4
        rows = values[k][SENDING].astype(np.float64)
        values[k][SENDING] = (rows * (magnitude / np.abs(rows).max())).astype(np.float32)
    flat = _flat(values)[SENDING]
    alphas = (WEIGHTS[SENDING] if weighting == "given" else np.ones(SENDING.sum())
              ).astype(np.float64)
    want = _numpy_weiszfeld(flat, alphas, 8, 1e-6)
    got, _, metrics = _apply(geometric_median(8, 1e-6, weighting), values, WEIGHTS)
    _assert_close(got, want, atol=1e-5 * magnitude)
    objective = (alphas * np.linalg.norm(flat - want, axis=1)).sum() / alphas.sum()
    got_objective = float(metrics["aggregator/geometric_median/objective"])
    if objective < np.finfo(np.float32).max:
        assert got_objective == pytest.approx(objective, rel=1e-4)
    else:  # a mean distance past float32's max: the metric is inf, the median above is not
        assert got_objective == np.inf


def test_geometric_median_of_three_collinear_huge_points_is_the_middle_one():
    """The closed form: the geometric median of three points on a line is the middle one;
    here 3e38 apart, where the distances overflow float32."""
    line = np.array([3e38, -3e38, -2e38], np.float32)
    values = {"a": np.zeros((3, 3, 2), np.float32), "b": np.zeros((3, 5), np.float32)}
    values["a"][:, 1, 0] = line
    values["b"][:, 2] = -line
    middle = _flat(values)[2]
    got, _, _ = _apply(geometric_median(100, 1e-6, "uniform"), values, np.ones(3, np.float32))
    v = np.concatenate([np.asarray(got[k], np.float64).reshape(-1) for k in sorted(got)])
    np.testing.assert_allclose(v, middle, atol=1e-3 * 3e38)


def test_geometric_median_converges_to_the_minimiser_and_resists_an_outlier():
    values = _values(5)
    values["b"][0] += 1e3  # a participating outlier moves the mean far, the median little
    flat = _flat(values)[SENDING]
    alphas = WEIGHTS[SENDING].astype(np.float64)
    got, _, _ = _apply(geometric_median(200, 1e-8), values, WEIGHTS)
    v = np.concatenate([np.asarray(got[k], np.float64).reshape(-1) for k in sorted(got)])

    def objective(point):
        return (alphas * np.linalg.norm(flat - point, axis=1)).sum()

    rng = np.random.default_rng(0)
    for _ in range(20):  # no nearby point is better: a minimiser
        assert objective(v) <= objective(v + 1e-2 * rng.normal(size=v.shape)) + 1e-6
    assert np.abs(v).max() < 10.0


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_norm_bound_then_mean_is_the_closed_form(max_norm):
    values = _values(6)
    flat = _flat(values)
    norms = np.linalg.norm(flat, axis=1)
    clipped = flat * np.minimum(1.0, max_norm / norms)[:, None]
    want = (WEIGHTS[:, None] * clipped).sum(0) / WEIGHTS.sum()
    got, _, metrics = _apply(create_aggregator([{"name": "norm_bound", "max_norm": max_norm}]),
                             values, WEIGHTS)
    _assert_close(got, want, atol=1e-4)
    assert float(metrics["aggregator/norm_bound/clip_norm"]) == pytest.approx(max_norm)
    from_python, _, _ = _apply(chain(norm_bound(max_norm), mean()), values, WEIGHTS)
    _assert_close(from_python, want, atol=1e-4)


def test_all_clients_dropped_gives_zeros_not_nan():
    values = _values(7)
    zeros = np.zeros(NUM_CLIENTS, np.float32)
    for stage in (median(), trimmed_mean(0.2), krum(1, multi=2), geometric_median(3)):
        got, _, _ = _apply(stage, values, zeros)
        for leaf in jax.tree.leaves(got):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_config_names_and_errors():
    values = _values(8)
    got, _, _ = _apply(create_aggregator([{"name": "median"}]), values, WEIGHTS)
    _assert_close(got, np.median(_flat(values)[SENDING], axis=0))
    with pytest.raises(ValueError, match=r"aggregator\[0\].*did you mean 'trimmed_mean'"):
        create_aggregator([{"name": "trimed_mean", "beta": 0.1}])
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\)"):
        create_aggregator([{"name": "trimmed_mean", "beta": 0.5}])
    with pytest.raises(ValueError, match="did you mean 'num_byzantine'"):
        create_aggregator([{"name": "krum", "num_byzantin": 1}])
    with pytest.raises(ValueError, match="two|exactly one reducer"):
        create_aggregator([{"name": "median"}, {"name": "krum", "num_byzantine": 1}])


def test_reducers_on_four_devices_equal_one_device():
    """The cohort axis sharded over 4 fake CPU devices (as under a `clients` mesh)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from fedjax_sim.sharding import client_mesh

    mesh = client_mesh(4)
    values = jax.tree.map(lambda x: x[:8], _values(9))
    weights = jnp.asarray(WEIGHTS[:8])
    sharded = jax.device_put((values, weights), NamedSharding(mesh, PartitionSpec("clients")))
    for stage in (median(), trimmed_mean(0.2), krum(1, multi=3), geometric_median(5),
                  chain(norm_bound(1.0), mean())):
        aggregator = stage if not isinstance(stage, Stage) else chain(stage)
        single, _, _ = _apply(aggregator, values, weights)
        state = aggregator.init(jax.tree.map(lambda x: x[0], values))
        four, _, _ = jax.jit(aggregator.apply)(state, *sharded, jax.random.key(0))
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(four), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
