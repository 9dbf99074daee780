"""Example-level DP-SGD: the privatized gradient against numpy, its noise, the per-round cost
bound against the real batch stream, participation counts against the round step's own
cohorts, and epsilon against dp-accounting called directly."""

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from dp_accounting import dp_event as events
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from helpers import spy, tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.local import model_loss
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import poisson_sampler, uniform_sampler
from fedjax_sim.privacy import ExampleLedger, dp_sgd_loss, example_epsilon, round_cost
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

D, K = 6, 4


def softmax_regression(params, batch, mask, rng):
    """Masked mean cross-entropy of x @ w + b, with the model's statistics."""
    del rng
    logits = batch["x"] @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    m = mask.astype(jnp.float32)
    count = jnp.sum(m)
    stats = {"loss_sum": jnp.sum(losses * m), "count": count,
             "correct": jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * m)}
    return stats["loss_sum"] / jnp.maximum(count, 1.0), stats


def _problem(batch=7, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(D, K)).astype(np.float32),
              "b": rng.normal(size=K).astype(np.float32)}
    data = {"x": (3 * rng.normal(size=(batch, D))).astype(np.float32),
            "y": rng.integers(0, K, batch).astype(np.int32)}
    mask = np.ones(batch, bool)
    mask[-2:] = False  # padding
    return params, data, mask


def test_noiseless_gradient_is_the_mean_of_clipped_per_example_gradients_numpy():
    params, data, mask = _problem()
    clip = 1.5
    # numpy: d(CE)/dlogits = softmax - onehot; dw = x^T (p - y), db = p - y, per example.
    logits = data["x"] @ params["w"] + params["b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(K)[data["y"]]
    gw = data["x"][:, :, None] * residual[:, None, :]
    gb = residual
    norms = np.sqrt((gw ** 2).sum((1, 2)) + (gb ** 2).sum(1))
    scale = np.minimum(1.0, clip / norms) * mask
    expected_w = (gw * scale[:, None, None]).sum(0) / len(mask)
    expected_b = (gb * scale[:, None]).sum(0) / len(mask)
    assert (norms[mask] > clip).any() and (norms[mask] < clip).any()  # both cases occur

    loss = dp_sgd_loss(softmax_regression, clip, 0.0)
    grads, stats = jax.jit(loss.gradient)(params, data, mask, jax.random.PRNGKey(0))
    np.testing.assert_allclose(grads["w"], expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["b"], expected_b, rtol=1e-5, atol=1e-6)
    _, batch_stats = softmax_regression(params, data, mask, None)
    for key in batch_stats:
        np.testing.assert_allclose(stats[key], batch_stats[key], rtol=1e-5)


class _DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(K)(x)


def test_gradient_equals_optax_differentially_private_aggregate_with_dropout_and_noise():
    """Reference: optax's ``differentially_private_aggregate`` called directly on the
    per-example gradients (``vmap`` of ``grad``, the same per-example dropout keys and noise
    key), which the clipped sum here replaces by one backward pass of the scaled losses."""
    module = _DropoutMLP()
    _, data, mask = _problem(batch=9)
    params = module.init(jax.random.PRNGKey(1), data["x"])

    def loss_fn(params, batch, mask, rng):
        logits = module.apply(params, batch["x"], train=True, rngs={"dropout": rng})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        m = mask.astype(jnp.float32)
        return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0), {"count": jnp.sum(m)}

    clip, z, rng = 0.05, 0.8, jax.random.PRNGKey(7)

    def reference(params):
        def one(example, example_mask, key):
            single = jax.tree.map(lambda a: a[None], example)
            return jax.grad(loss_fn, has_aux=True)(params, single, example_mask[None], key)[0]

        keys = jax.random.split(jax.random.fold_in(rng, 0), len(mask))
        per_example = jax.vmap(one)(data, mask, keys)
        aggregate = optax.contrib.differentially_private_aggregate(
            clip, z, key=jax.random.wrap_key_data(jax.random.fold_in(rng, 1)))
        return aggregate.update(per_example, aggregate.init(params))[0]

    expected = jax.jit(reference)(params)
    got, stats = jax.jit(dp_sgd_loss(loss_fn, clip, z).gradient)(params, data, mask, rng)
    assert int(stats["count"]) == mask.sum()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    clean, _ = dp_sgd_loss(loss_fn, clip, 0.0).gradient(params, data, mask, rng)
    assert any(np.abs(np.asarray(a) - b).max() > 1e-3  # the noise is in both
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(clean), strict=True))


def test_noise_has_std_z_times_clip_over_batch_and_follows_the_key():
    params, data, mask = _problem(batch=5)
    z, clip = 1.3, 0.7
    loss = dp_sgd_loss(softmax_regression, clip, z)
    clean, _ = dp_sgd_loss(softmax_regression, clip, 0.0).gradient(
        params, data, mask, jax.random.PRNGKey(0))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(400))
    grads, _ = jax.jit(jax.vmap(loss.gradient, in_axes=(None, None, None, 0)))(
        params, data, mask, keys)
    noise = np.concatenate([(np.asarray(grads[k]) - clean[k]).reshape(400, -1) * len(mask)
                            for k in ("w", "b")], axis=1)  # 400 x 28 draws
    n = noise.size
    assert abs(noise.mean()) < 4 * z * clip / math.sqrt(n)
    assert noise.std() == pytest.approx(z * clip, rel=4 / math.sqrt(2 * n))
    again, _ = loss.gradient(params, data, mask, jax.random.PRNGKey(3))
    np.testing.assert_allclose(again["w"], grads["w"][3], rtol=1e-6)  # the key decides


@pytest.mark.parametrize("local_epochs, local_steps, batch", [
    (1, None, 4), (3, None, 4), (None, 7, 16),
])
def test_round_cost_bounds_the_real_stream(local_epochs, local_steps, batch):
    """For every example of every client: sum over steps of (copies in the batch)^2, measured
    on the round step's own batches over many rounds, never exceeds `round_cost`."""
    sizes = (5, 17, 40, 3, 11, 1, 9)
    model, data = tiny_model(), tiny_data(sizes)
    schedule = ClientSchedule.from_sizes(
        data.client_sizes, batch, local_epochs=local_epochs or 1, local_steps=local_steps)
    bound = round_cost(data.client_sizes, batch, schedule.num_steps, schedule.local_epochs)
    algorithm = spy(fed_avg(model, optax.sgd(0.1), optax.sgd(1.0)))
    step = build_round_step(algorithm, data, schedule, uniform_sampler(len(sizes), len(sizes)),
                            len(sizes))
    state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 0)
    worst = np.zeros(len(sizes), np.int64)
    for _ in range(12):
        state, metrics = step(state)
        metrics = jax.device_get(metrics)
        for slot, client in enumerate(metrics["ids"]):
            rows, mask = metrics["indices"][slot], metrics["mask"][slot]
            per_step = [np.bincount(r[m], minlength=data.offsets[-1])
                        for r, m in zip(rows, mask, strict=True)]
            cost = (np.stack(per_step) ** 2).sum(0)
            worst[client] = max(worst[client], cost.max())
    assert (worst <= bound).all(), (worst, bound)
    if local_steps is None and local_epochs == 1:
        np.testing.assert_array_equal(worst, 1)  # one epoch: every example exactly once
    assert (worst >= 1).all()


def test_participation_counts_equal_the_round_steps_cohorts():
    sizes = (5, 17, 40, 3, 11, 8, 9, 2)
    model, data = tiny_model(), tiny_data(sizes)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    for sampler, cohort in ((uniform_sampler(len(sizes), 3), 3),
                            (poisson_sampler(len(sizes), 0.4, 4), 4)):
        algorithm = spy(fed_avg(model, optax.sgd(0.1), optax.sgd(1.0)))
        step = build_round_step(algorithm, data, schedule, sampler, cohort)
        state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 5)
        ledger = ExampleLedger.for_run(1.0, 1.0, data.client_sizes, schedule, sampler)
        seen = np.zeros(len(sizes), np.int64)
        for r in range(1, 8):
            state, metrics = step(state)
            metrics = jax.device_get(metrics)
            np.add.at(seen, metrics["ids"][metrics["valid"]], 1)
            if r in (3, 7):  # counted in two pieces, as the loop does at evaluations
                ledger.count(state.key, r)
                np.testing.assert_array_equal(ledger.participation, seen)


@pytest.mark.parametrize("z, cost", [(0.8, 1), (1.1, 30), (3.0, 1000)])
def test_example_epsilon_equals_dp_accounting_composition(z, cost):
    delta = 1e-6
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(events.GaussianDpEvent(z), cost)
    assert example_epsilon(z, cost, delta) == pytest.approx(accountant.get_epsilon(delta),
                                                            rel=1e-6)
    assert example_epsilon(z, 0, delta) == 0.0
    assert example_epsilon(0.0, cost, delta) == math.inf


def test_dp_sgd_without_noise_and_clipping_trains_like_plain_fedavg():
    """z = 0 and a clip no gradient reaches: DP-SGD's sum / B is the batch mean gradient
    (fixed local steps, so every batch is full)."""
    model, data = tiny_model(), tiny_data((9, 17, 40, 12, 11))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=3)
    finals = []
    for loss_fn in (None, dp_sgd_loss(model_loss(model), 1e6, 0.0)):
        algorithm = fed_avg(model, optax.sgd(0.3), optax.sgd(1.0), loss_fn=loss_fn)
        step = build_round_step(algorithm, data, schedule, uniform_sampler(5, 3), 3)
        state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 1)
        for _ in range(3):
            state, _ = step(state)
        finals.append(jax.device_get(state.algorithm.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *finals)


def _log_delta_of_gaussian(sigma: float, eps: float) -> float:
    """log delta(eps) of one Gaussian of multiplier sigma (sensitivity 1), Balle & Wang 2018
    eq. (6): Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), in logs (eps runs to 10^4)."""
    a = scipy.stats.norm.logcdf(1 / (2 * sigma) - eps * sigma)
    b = eps + scipy.stats.norm.logcdf(-1 / (2 * sigma) - eps * sigma)
    return a + math.log1p(-math.exp(b - a))


@pytest.mark.parametrize("z, cost", [(1.5, 3), (1.0, 400), (1.0, 10_000), (0.5, 250_000)])
def test_pld_example_epsilon_is_the_exact_gaussian_epsilon_in_milliseconds(z, cost):
    """The PLD accountant's grid grew as z / sqrt(cost) shrank: z = 1 and cost 400 took 8 s,
    cost 1,600 30 s and 4.6 GB, every evaluation. The equivalent Gaussian's epsilon is exact
    (reference: its delta(eps), written here from the paper); dp-accounting's PLD accountant,
    called directly on the cost unit steps, bounds it from above by its discretization."""
    delta = 1e-6
    start = time.perf_counter()
    eps = example_epsilon(z, cost, delta, "pld")
    assert time.perf_counter() - start < 1.0
    sigma = z / math.sqrt(cost)
    assert _log_delta_of_gaussian(sigma, eps) == pytest.approx(math.log(delta), abs=1e-6)
    assert _log_delta_of_gaussian(sigma, eps * (1 - 1e-6)) > math.log(delta)  # the smallest
    if cost <= 3:
        accountant = pld_privacy_accountant.PLDAccountant()
        accountant.compose(events.GaussianDpEvent(z), cost)
        direct = accountant.get_epsilon(delta)
        assert eps <= direct + 1e-9 and eps == pytest.approx(direct, rel=1e-6)
    assert eps <= example_epsilon(z, cost, delta, "rdp")  # RDP's conversion is looser


def _measured_step_events(sizes, batch, local_epochs, local_steps, z, rounds, sampler, cohort):
    """The round step's own batches, for every example: one ``GaussianDpEvent(z / k)`` per
    step it appears in (k copies: sensitivity k * clip), over the rounds its client trained
    in; and the ledger counted for the same run."""
    model, data = tiny_model(), tiny_data(sizes)
    schedule = ClientSchedule.from_sizes(data.client_sizes, batch, local_epochs=local_epochs,
                                         local_steps=local_steps)
    algorithm = spy(fed_avg(model, optax.sgd(0.1), optax.sgd(1.0)))
    step = build_round_step(algorithm, data, schedule, sampler, cohort)
    state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 4)
    per_example = [[] for _ in range(int(data.offsets[-1]))]
    for _ in range(rounds):
        state, metrics = step(state)
        metrics = jax.device_get(metrics)
        for slot in np.flatnonzero(metrics["valid"]):
            rows, mask = metrics["indices"][slot], metrics["mask"][slot]
            for r, m in zip(rows, mask, strict=True):
                copies = np.bincount(r[m], minlength=len(per_example))
                for example in np.flatnonzero(copies):
                    per_example[example].append(events.GaussianDpEvent(z / copies[example]))
    ledger = ExampleLedger.for_run(z, 1.0, data.client_sizes, schedule, sampler, delta=1e-5)
    ledger.count(state.key, rounds)
    return per_example, ledger


def _direct_epsilon(event_lists, delta, accountant_class):
    """The worst example's epsilon, each distinct list of multipliers composed once."""
    distinct = {tuple(sorted(event.noise_multiplier for event in e)) for e in event_lists if e}
    worst = 0.0
    for multipliers in distinct:
        accountant = accountant_class()
        accountant.compose(events.ComposedDpEvent([events.GaussianDpEvent(m)
                                                   for m in multipliers]))
        worst = max(worst, accountant.get_epsilon(delta))
    return worst


def test_ledger_epsilon_equals_dp_accounting_on_the_real_steps_with_one_epoch():
    """One epoch: each example is one Gaussian of multiplier z per round its client trained
    in, so the ledger's worst client is exactly dp-accounting's composition of those."""
    sizes = (5, 17, 40, 3, 11, 8)
    per_example, ledger = _measured_step_events(
        sizes, 8, 1, None, 1.3, 7, uniform_sampler(len(sizes), 3), 3)
    rdp = _direct_epsilon(per_example, ledger.delta, rdp_privacy_accountant.RdpAccountant)
    assert ledger.epsilon() == pytest.approx(rdp, rel=1e-9)
    assert ledger.worst_cost == max(len(e) for e in per_example)
    pld_ledger = dataclasses.replace(ledger, accountant="pld")  # same counts, PLD
    pld_ledger.participation = ledger.participation
    pld = _direct_epsilon(per_example, ledger.delta, pld_privacy_accountant.PLDAccountant)
    assert pld_ledger.epsilon() <= pld + 1e-9
    assert pld_ledger.epsilon() == pytest.approx(pld, rel=1e-5)


def test_ledger_epsilon_bounds_dp_accounting_on_the_real_steps_with_repeats():
    """Fixed steps, small clients: examples appear several times in one batch; the ledger's
    epsilon (its kmax * a bound) is at least dp-accounting's on the measured copies."""
    sizes = (2, 3, 9, 1, 5)
    per_example, ledger = _measured_step_events(
        sizes, 4, None, 3, 2.0, 5, poisson_sampler(len(sizes), 0.5, 4), 4)
    assert max(len(e) for e in per_example) > 0
    assert any(event.noise_multiplier < 2.0 for e in per_example for event in e)  # k > 1
    rdp = _direct_epsilon(per_example, ledger.delta, rdp_privacy_accountant.RdpAccountant)
    assert rdp <= ledger.epsilon() <= 3 * rdp
