"""Aggregation stages against independent numpy computations written here.

Clipping is flat L2 clipping of each client's whole pytree (McMahan et al. 2018); the noise's
std is checked empirically over many coordinates; adaptive clipping (Andrew et al. 2021) is
checked against its closed-form geometric step and run on a synthetic norm stream until it sits
at numpy's quantile; ``create_aggregator`` errors are checked by message.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import aggregators as agg
from fedjax_sim.aggregators import (
    chain,
    clip,
    create_aggregator,
    dp_fedavg_aggregator,
    gaussian_noise,
    mean,
    split_noise_multiplier,
)
from fedjax_sim.privacy.accounting import effective_noise_multiplier

NUM_CLIENTS = 7


def _values(seed=0, num_clients=NUM_CLIENTS):
    """A two-leaf pytree of client messages with norms on both sides of the clip norms used."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.05, 3.0, num_clients).astype(np.float32)
    a = rng.normal(size=(num_clients, 3, 2)).astype(np.float32) * scales[:, None, None]
    b = rng.normal(size=(num_clients, 5)).astype(np.float32) * scales[:, None]
    return {"a": a, "b": b}


# clients 2 and 5 are padding / dropped: weight 0 (their values are large, so a leak shows)
WEIGHTS = np.array([3.0, 1.0, 0.0, 7.0, 2.0, 0.0, 5.0], np.float32)


def _flat(values):
    """[C, D] float64: each client's whole message as one vector (leaves in a fixed order)."""
    return np.concatenate([np.asarray(values[k], np.float64).reshape(NUM_CLIENTS, -1)
                           for k in sorted(values)], axis=1)


def _unflat(vector):
    return {"a": vector[:6].reshape(3, 2), "b": vector[6:]}


def _numpy_clip(flat, norm):
    norms = np.linalg.norm(flat, axis=1)
    return flat * np.minimum(1.0, norm / norms)[:, None], norms


def _apply(aggregator, values, weights, key=0):
    state = aggregator.init(jax.tree.map(lambda x: x[0], values))
    return jax.jit(aggregator.apply)(state, values, jnp.asarray(weights), jax.random.key(key))


def _assert_tree_close(tree, expected, atol=1e-6, rtol=1e-5):
    for k in expected:
        np.testing.assert_allclose(np.asarray(tree[k], np.float64), expected[k], atol=atol,
                                   rtol=rtol)


@pytest.mark.parametrize("norm", [0.5, 2.0, 100.0])
def test_clip_uniform_fixed_denominator_mean_matches_numpy(norm):
    values = _values()
    for k in values:  # padding clients carry huge values: zero weight must keep them out
        values[k][[2, 5]] = 1e6
    denominator = 4.5
    aggregator = chain(clip(norm), mean(weighting="uniform", denominator=denominator),
                       gaussian_noise(stddev=0.0))
    aggregate, _, metrics = _apply(aggregator, values, WEIGHTS)

    clipped, norms = _numpy_clip(_flat(values), norm)
    sending = WEIGHTS > 0
    expected = clipped[sending].sum(axis=0) / denominator
    _assert_tree_close(aggregate, _unflat(expected))
    assert float(metrics["aggregator/clip/clip_norm"]) == pytest.approx(norm)
    assert float(metrics["aggregator/clip/clipped_fraction"]) == pytest.approx(
        np.mean(norms[sending] > norm))
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == 0.0
    # every participating client's clipped message has norm <= C
    assert np.all(np.linalg.norm(clipped, axis=1) <= norm * (1 + 1e-9))


@pytest.mark.parametrize("stage", [clip, agg.norm_bound])
@pytest.mark.parametrize("huge", [1e20, 3e38])
def test_clip_of_an_update_whose_norm_overflows_float32_scales_it_to_the_norm(stage, huge):
    """Entries of 1e20 square past float32's max (3e38: even the norm does): the norm was inf,
    C / inf = 0, and the update vanished instead of being clipped to norm C (numpy float64)."""
    values = _values(seed=5)
    values["a"][0] = huge * np.array([[1.0, -0.5], [0.25, 0.75], [-1.0, 0.125]], np.float32)
    values["b"][3] = -huge  # in one leaf only: the norm is over the whole message
    values["b"][6, 1] = huge
    norm = 1.5
    aggregate, _, metrics = _apply(chain(stage(norm), agg.sum(weighting="uniform")), values,
                                   WEIGHTS)
    clipped, norms = _numpy_clip(_flat(values), norm)
    sending = WEIGHTS > 0
    _assert_tree_close(aggregate, _unflat(clipped[sending].sum(axis=0)))
    assert float(metrics[f"aggregator/{stage(norm).name}/clipped_fraction"]) == pytest.approx(
        np.mean(norms[sending] > norm))
    # each huge update alone is clipped to norm C (not 0), in its own direction
    for i in (0, 3, 6):
        alone, _, _ = _apply(chain(stage(norm), agg.sum(weighting="uniform")), values,
                             (np.arange(NUM_CLIENTS) == i).astype(np.float32))
        got = _flat(jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], NUM_CLIENTS, 0),
                                 alone))[0]
        np.testing.assert_allclose(np.linalg.norm(got), norm, rtol=1e-6)
        np.testing.assert_allclose(got, clipped[i], atol=1e-6, rtol=1e-5)


def test_clip_of_a_pytree_is_flat_not_per_leaf():
    """Clipping the whole update as one vector differs from clipping each leaf to C."""
    values = _values(seed=3)
    norm = 0.7
    aggregator = chain(clip(norm), agg.sum(weighting="uniform"))
    aggregate, _, _ = _apply(aggregator, values, np.ones(NUM_CLIENTS, np.float32))
    clipped, _ = _numpy_clip(_flat(values), norm)
    _assert_tree_close(aggregate, _unflat(clipped.sum(axis=0)))
    per_leaf = sum(np.asarray(values["b"][i], np.float64)
                   * min(1.0, norm / np.linalg.norm(values["b"][i])) for i in range(NUM_CLIENTS))
    assert not np.allclose(np.asarray(aggregate["b"]), per_leaf, atol=1e-4)


def test_default_mean_is_the_weighted_mean():
    values = _values(seed=1)
    aggregate, _, metrics = _apply(chain(mean()), values, WEIGHTS)
    flat = _flat(values)
    expected = (WEIGHTS[:, None] * flat).sum(axis=0) / WEIGHTS.sum()
    _assert_tree_close(aggregate, _unflat(expected))
    assert metrics == {}
    # a lone reducer and None are the same aggregator
    for other in (agg.as_aggregator(mean()), agg.as_aggregator(None)):
        again, _, _ = _apply(other, values, WEIGHTS)
        _assert_tree_close(again, _unflat(expected))


def test_mean_of_all_zero_weights_is_zero_not_nan():
    aggregate, _, _ = _apply(chain(mean()), _values(), np.zeros(NUM_CLIENTS, np.float32))
    for leaf in jax.tree.leaves(aggregate):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize("weighting", ["given", "uniform"])
def test_sum_matches_numpy(weighting):
    values = _values(seed=2)
    aggregate, _, _ = _apply(chain(agg.sum(weighting=weighting)), values, WEIGHTS)
    w = WEIGHTS if weighting == "given" else (WEIGHTS > 0).astype(np.float64)
    _assert_tree_close(aggregate, _unflat((w[:, None] * _flat(values)).sum(axis=0)))


def test_weighted_fixed_denominator_mean_matches_numpy():
    values = _values(seed=4)
    aggregate, _, _ = _apply(chain(mean(denominator=10.0)), values, WEIGHTS)
    _assert_tree_close(aggregate, _unflat((WEIGHTS[:, None] * _flat(values)).sum(axis=0) / 10))


# --- noise -----------------------------------------------------------------------------------

COORDS = 20_000


def _noise_case(noise_cohort_size=None):
    """Clients with 20k coordinates each; returns values, weights and the clean numpy mean."""
    rng = np.random.default_rng(5)
    clients = 6
    values = {"w": (rng.normal(size=(clients, COORDS)) * 0.02).astype(np.float32)}
    values["w"][1] *= 1000.0  # one client far above the clip norm
    weights = np.array([1.0, 4.0, 2.0, 0.0, 9.0, 1.0], np.float32)
    return values, weights


@pytest.mark.parametrize("noise_cohort_size", [None, 1000.0])
def test_noise_std_is_z_times_clip_times_scale(noise_cohort_size):
    z, norm, denominator = 1.3, 0.5, 8.0
    values, weights = _noise_case()
    aggregator = chain(clip(norm), mean(weighting="uniform", denominator=denominator),
                       gaussian_noise(noise_multiplier=z, noise_cohort_size=noise_cohort_size))
    clean_aggregator = chain(clip(norm), mean(weighting="uniform", denominator=denominator))
    clean, _, _ = _apply(clean_aggregator, values, weights)

    flat = np.asarray(values["w"], np.float64)
    clipped, norms = _numpy_clip(flat, norm)
    sending = weights > 0
    np.testing.assert_allclose(np.asarray(clean["w"]), clipped[sending].sum(0) / denominator,
                               atol=1e-7, rtol=1e-5)

    expected_std = z * norm / denominator  # z * C on the sum, times the scale 1 / D
    if noise_cohort_size is not None:
        expected_std *= denominator / noise_cohort_size  # = z * C / noise_cohort_size
    for key in (0, 1):
        noised, _, metrics = _apply(aggregator, values, weights, key=key)
        noise = np.asarray(noised["w"], np.float64) - np.asarray(clean["w"], np.float64)
        # the sample std of n normals has relative std 1/sqrt(2n) = 0.5%: 4 sigma is 2%
        assert np.std(noise) == pytest.approx(expected_std, rel=0.02)
        assert abs(np.mean(noise)) < 4 * expected_std / math.sqrt(COORDS)
        assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(
            expected_std, rel=1e-6)
        assert float(metrics["aggregator/clip/clip_norm"]) == pytest.approx(norm)
        assert float(metrics["aggregator/clip/clipped_fraction"]) == pytest.approx(
            np.mean(norms[sending] > norm), abs=1e-6)
    first, _, _ = _apply(aggregator, values, weights, key=0)
    second, _, _ = _apply(aggregator, values, weights, key=1)
    assert not np.allclose(np.asarray(first["w"]), np.asarray(second["w"]))


def test_fixed_stddev_noise_and_its_empirical_std():
    values = {"w": np.zeros((3, COORDS), np.float32)}
    noised, _, metrics = _apply(chain(mean(), gaussian_noise(stddev=0.25)), values,
                                np.ones(3, np.float32))
    assert np.std(np.asarray(noised["w"])) == pytest.approx(0.25, rel=0.02)
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(0.25)


def test_noise_multiplier_without_clip_is_rejected():
    with pytest.raises(ValueError, match="needs a clip stage"):
        _apply(chain(mean(), gaussian_noise(noise_multiplier=1.0)), _values(), WEIGHTS)


def test_dp_fedavg_aggregator_is_clip_uniform_fixed_denominator_and_noise():
    z, norm, expected_clients = 0.9, 0.3, 5.0
    values, weights = _noise_case()
    aggregator = dp_fedavg_aggregator(z, norm, expected_clients)
    noised, _, metrics = _apply(aggregator, values, weights, key=3)
    clipped, _ = _numpy_clip(np.asarray(values["w"], np.float64), norm)
    clean = clipped[weights > 0].sum(0) / expected_clients
    noise = np.asarray(noised["w"], np.float64) - clean
    assert np.std(noise) == pytest.approx(z * norm / expected_clients, rel=0.02)
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(
        z * norm / expected_clients, rel=1e-6)
    state = aggregator.init({"w": jnp.zeros(COORDS)})
    assert {k: float(v) for k, v in aggregator.noise_multipliers(state).items()} == {
        "gaussian_noise/update": pytest.approx(z)}


# --- adaptive clipping -----------------------------------------------------------------------

def _norm_values(norms):
    """Messages [C, 2] with the given L2 norms (random directions)."""
    rng = np.random.default_rng(len(norms))
    directions = rng.normal(size=(len(norms), 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return {"x": (directions * np.asarray(norms)[:, None]).astype(np.float32)}


@pytest.mark.parametrize("expected_clients", [None, 9.0])
def test_adaptive_clip_one_step_is_the_geometric_closed_form(expected_clients):
    norms = np.array([0.2, 0.5, 0.9, 1.1, 1.5, 3.0, 0.4, 2.0], np.float64)
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)  # the last two are padding
    c0, eta, gamma = 1.0, 0.3, 0.7
    stage = clip(c0, target_quantile=gamma, learning_rate=eta, count_stddev=0.0,
                 expected_clients=expected_clients)
    values = _norm_values(norms)
    state = stage.init(None)
    _, _, state, metrics, context = jax.jit(stage.apply)(
        state, values, jnp.asarray(weights), jax.random.key(0), {})

    sending = weights > 0
    unclipped = np.sum(norms[sending] <= c0)
    d = expected_clients if expected_clients is not None else sending.sum()
    b_bar = (unclipped - 0.5 * sending.sum()) / d + 0.5
    expected = c0 * math.exp(-eta * (b_bar - gamma))
    assert float(metrics["unclipped_estimate"]) == pytest.approx(b_bar, rel=1e-6)
    assert float(state["norm"]) == pytest.approx(expected, rel=1e-6)
    # this round clipped at the old norm and told the noise stage so
    assert float(metrics["clip_norm"]) == pytest.approx(c0)
    assert float(context["sensitivity"]) == pytest.approx(c0)
    assert float(metrics["clipped_fraction"]) == pytest.approx(1 - unclipped / sending.sum())


@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
def test_clipped_fraction_counts_only_participating_clients(weights):
    """The fraction of the participating clients whose norm exceeded C: with every client
    dropped nothing was clipped (0, not 1)."""
    norms = np.array([3.0, 0.5, 2.0], np.float64)
    weights = np.asarray(weights, np.float32)
    stage = clip(1.0)
    _, _, _, metrics, _ = jax.jit(stage.apply)(
        stage.init(None), _norm_values(norms), jnp.asarray(weights), jax.random.key(0), {})
    sending = weights > 0
    want = np.sum(norms[sending] > 1.0) / sending.sum() if sending.any() else 0.0
    assert float(metrics["clipped_fraction"]) == pytest.approx(want)


@pytest.mark.parametrize("weighting", ["uniform", "given"])
def test_noise_after_a_realised_mean_of_no_clients_is_finite(weighting):
    """clip -> mean (realised denominator) -> gaussian_noise(z): with every client dropped
    the mean is 0 and there is no sum to noise; with one client the std is z C w / w."""
    d, z, c = 50, 1.5, 2.0
    aggregator = agg.chain(clip(c), agg.mean(weighting=weighting), gaussian_noise(z))
    values = {"a": jnp.ones((3, d))}
    state = aggregator.init({"a": jnp.zeros(d)})
    apply = jax.jit(aggregator.apply)
    out, _, metrics = apply(state, values, jnp.zeros(3), jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(out["a"])))
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == 0.0
    _, _, metrics = apply(state, values, jnp.asarray([0.0, 4.0, 0.0]), jax.random.key(0))
    assert float(metrics["aggregator/gaussian_noise/noise_stddev"]) == pytest.approx(z * c)


@pytest.mark.parametrize("noise_cohort_size", [None, 400.0])
def test_adaptive_clip_count_noise_std(noise_cohort_size):
    """The noised b_bar has std count_stddev / D (count_stddev / noise_cohort_size simulated)."""
    d, sigma_b = 10.0, 3.0
    stage = clip(1.0, target_quantile=0.5, count_stddev=sigma_b, expected_clients=d,
                 noise_cohort_size=noise_cohort_size)
    values = _norm_values(np.full(10, 0.5))  # all unclipped: the clean b_bar is 1
    state = stage.init(None)
    keys = jax.random.split(jax.random.key(1), 20_000)
    estimates = jax.jit(jax.vmap(
        lambda k: stage.apply(state, values, jnp.ones(10), k, {})[3]["unclipped_estimate"]))(keys)
    estimates = np.asarray(estimates, np.float64)
    expected_std = sigma_b / d if noise_cohort_size is None else sigma_b / noise_cohort_size
    assert np.std(estimates) == pytest.approx(expected_std, rel=0.03)
    assert np.mean(estimates) == pytest.approx(1.0, abs=4 * expected_std / math.sqrt(20_000))
    assert {k: float(v) for k, v in stage.noise_multipliers(state).items()} == {
        "count": pytest.approx(2 * sigma_b)}


@pytest.mark.parametrize("target_quantile", [0.5, 0.8])
def test_adaptive_clip_reaches_the_target_quantile(target_quantile):
    rounds, clients = 300, 500
    rng = np.random.default_rng(7)
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=(rounds, clients))
    expected = np.quantile(norms, target_quantile)
    # the population quantile in closed form agrees (lognormal: exp(Phi^-1(q)))
    from statistics import NormalDist
    assert expected == pytest.approx(math.exp(NormalDist().inv_cdf(target_quantile)), rel=0.01)

    stage = clip(0.1, target_quantile=target_quantile, learning_rate=0.2, count_stddev=0.0,
                 expected_clients=float(clients))
    state = stage.init(None)
    values = jnp.asarray(norms[:, :, None], jnp.float32)  # [rounds, clients, 1]: norm = |x|

    def step(state, x):
        _, _, state, metrics, _ = stage.apply(state, {"x": x}, jnp.ones(clients),
                                              jax.random.key(0), {})
        return state, metrics["clip_norm"]

    final, history = jax.jit(lambda s, v: jax.lax.scan(step, s, v))(state, values)
    history = np.asarray(history, np.float64)
    assert history[0] == pytest.approx(0.1)
    assert float(final["norm"]) == pytest.approx(expected, rel=0.05)
    assert math.exp(np.mean(np.log(history[-100:]))) == pytest.approx(expected, rel=0.03)


# --- DP-FedAvg's split of z --------------------------------------------------------------------

@pytest.mark.parametrize("z,sigma_b", [(1.0, 5.0), (0.7, 1.0), (3.0, 50.0)])
def test_split_noise_multiplier_composes_to_exactly_z(z, sigma_b):
    z_update = split_noise_multiplier(z, sigma_b)
    assert z_update > z
    assert (z_update ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    aggregator = dp_fedavg_aggregator(z, 1.0, 20.0, target_quantile=0.5, count_stddev=sigma_b)
    multipliers = aggregator.noise_multipliers(aggregator.init({"w": jnp.zeros(3)}))
    multipliers = {k: float(v) for k, v in multipliers.items()}
    assert multipliers == {"clip/count": pytest.approx(2 * sigma_b),
                           "gaussian_noise/update": pytest.approx(z_update, rel=1e-6)}
    assert effective_noise_multiplier(multipliers) == pytest.approx(z, rel=1e-6)


def test_split_noise_multiplier_rejects_a_count_that_spends_the_budget():
    with pytest.raises(ValueError, match="too small"):
        split_noise_multiplier(1.0, 0.5)  # 2 * sigma_b == z: nothing left for the update
    with pytest.raises(ValueError, match="count_stddev > 0"):
        split_noise_multiplier(1.0, 0.0)


# --- create_aggregator -----------------------------------------------------------------------

def test_create_aggregator_unknown_stage_suggests_a_name():
    with pytest.raises(ValueError, match=r"aggregator\[1\]\.name.*'gausian_noise'.*"
                                         r"did you mean 'gaussian_noise'"):
        create_aggregator([{"name": "clip", "norm": 1.0}, {"name": "gausian_noise"}])


def test_create_aggregator_unknown_option_suggests_an_option():
    with pytest.raises(ValueError, match=r"aggregator\[0\]\.nrom.*'clip' has no option 'nrom'.*"
                                         r"did you mean 'norm'"):
        create_aggregator([{"name": "clip", "nrom": 1.0}])


def test_create_aggregator_rejects_two_reducers_and_wrong_order():
    with pytest.raises(ValueError, match="exactly one reducer"):
        create_aggregator([{"name": "mean"}, {"name": "sum"}])
    with pytest.raises(ValueError, match="go before the reducer"):
        create_aggregator([{"name": "mean"}, {"name": "clip", "norm": 1.0}])
    with pytest.raises(ValueError, match="go before the reducer"):
        create_aggregator([{"name": "gaussian_noise", "stddev": 0.1}, {"name": "mean"}])
    with pytest.raises(ValueError, match=r"aggregator\[0\] \(clip\).*norm must be > 0"):
        create_aggregator([{"name": "clip", "norm": -1.0}])
    with pytest.raises(ValueError, match="'name'"):
        create_aggregator([{"norm": 1.0}])


def test_create_aggregator_inserts_mean_where_no_reducer():
    values = _values(seed=6)
    built = create_aggregator([{"name": "clip", "norm": 0.8},
                               {"name": "gaussian_noise", "stddev": 0.0}])
    by_hand = chain(clip(0.8), mean(), gaussian_noise(stddev=0.0))
    got, _, metrics = _apply(built, values, WEIGHTS)
    want, _, _ = _apply(by_hand, values, WEIGHTS)
    _assert_tree_close(got, {k: np.asarray(v, np.float64) for k, v in want.items()},
                       atol=0, rtol=0)
    assert set(metrics) == {"aggregator/clip/clip_norm", "aggregator/clip/clipped_fraction",
                            "aggregator/gaussian_noise/noise_stddev"}
    # and the numpy weighted mean of the clipped messages
    clipped, _ = _numpy_clip(_flat(values), 0.8)
    _assert_tree_close(got, _unflat((WEIGHTS[:, None] * clipped).sum(0) / WEIGHTS.sum()))
    # only client stages: the mean still goes last
    alone, _, _ = _apply(create_aggregator([{"name": "clip", "norm": 0.8}]), values, WEIGHTS)
    _assert_tree_close(alone, {k: np.asarray(v, np.float64) for k, v in want.items()})
    # the empty list is the default weighted mean
    empty, _, _ = _apply(create_aggregator([]), values, WEIGHTS)
    _assert_tree_close(empty, _unflat((WEIGHTS[:, None] * _flat(values)).sum(0) / WEIGHTS.sum()))


def test_chain_rejects_non_stages():
    with pytest.raises(TypeError, match="expected aggregation stages"):
        chain(chain(mean()))


# --- DP-FedAvg sharded over 4 fake devices ------------------------------------------------------

def _dp_rounds(mesh):
    import optax
    from helpers import tiny_data, tiny_model

    from fedjax_sim.algorithms import create_algorithm
    from fedjax_sim.data.batching import ClientSchedule
    from fedjax_sim.data.sampling import uniform_sampler
    from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11))
    aggregator = dp_fedavg_aggregator(1.0, 0.05, 3.0, target_quantile=0.5, count_stddev=2.0)
    algorithm = create_algorithm("fed_avg", model, optax.sgd(0.1), optax.sgd(1.0),
                                 aggregator=aggregator)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 3), 3,
                            mesh=mesh)  # cohort 3: padded to 4 on the mesh
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 11)
    compiled = jax.jit(step.fn).lower(state, step.data, step.offsets).compile()  # once
    history = []
    for _ in range(3):
        state, metrics = compiled(state, step.data, step.offsets)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.algorithm), history, compiled.as_text()


def test_dp_fedavg_on_four_devices_equals_one_device():
    from fedjax_sim.sharding import client_mesh

    single, single_metrics, _ = _dp_rounds(None)
    sharded, sharded_metrics, hlo = _dp_rounds(client_mesh(4))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    for m1, m4 in zip(single_metrics, sharded_metrics, strict=True):
        for name in ("aggregator/clip/clip_norm", "aggregator/clip/clipped_fraction",
                     "aggregator/gaussian_noise/noise_stddev", "train/clients"):
            assert float(m1[name]) == pytest.approx(float(m4[name]), rel=1e-6)
        assert float(m4["train/clients"]) == 3  # the padding client does not count
    # the noise was there (clip norm 0.05 over 3 clients, z = 1: it dominates the update)
    assert float(single_metrics[0]["aggregator/gaussian_noise/noise_stddev"]) > 0
    # the adaptive clip norm moved, in the state carried across rounds
    assert float(single_metrics[-1]["aggregator/clip/clip_norm"]) != pytest.approx(0.05)
    # the clients' sum crosses devices as an all-reduce, not a gather of every client's update
    assert "all-reduce" in hlo


def test_apply_aggregator_hands_the_cohort_size_only_to_an_apply_that_takes_it():
    """The engine's call passes ``cohort_size`` (a padded cohort's real rows) to `chain`'s
    apply, whose stages see it in the context, and leaves it out for an aggregator written to
    ``apply(state, values, weights, key, client_ids=None)``, which keeps working."""
    from fedjax_sim.aggregators.base import CLIENT, Stage, apply_aggregator
    from fedjax_sim.core import Aggregator

    values = jnp.arange(8.0).reshape(4, 2)
    weights = jnp.array([1.0, 2.0, 1.0, 0.0])
    expected = np.average(np.arange(8.0).reshape(4, 2), axis=0, weights=[1, 2, 1, 0])
    seen = []

    def spy(state, values, weights, key, context):
        seen.append(context.get("cohort_size"))
        return values, weights, state, {}, context

    chained = agg.chain(Stage(CLIENT, lambda example: (), spy, "spy"), agg.mean())
    old_style = Aggregator(lambda example: (),
                           lambda state, values, weights, key, client_ids=None: (
                               agg.weighted_mean(values, weights), state, {}))
    key = jax.random.PRNGKey(0)
    for aggregator in (chained, old_style):
        for size in (3, None):
            aggregate, _, _ = apply_aggregator(aggregator, aggregator.init(values[0]), values,
                                               weights, key, client_ids=jnp.arange(4),
                                               cohort_size=size)
            np.testing.assert_allclose(aggregate, expected, rtol=1e-6)
    assert seen == [3, None]
