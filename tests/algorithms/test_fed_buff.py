"""FedBuff against an independent event-driven reference: a heap of float64 finish times in
Python."""

import heapq

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.fed_buff import fed_buff
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state
from fedjax_sim.simulation.system import system_model

SIZES = (5, 17, 40, 3, 11, 8, 23)
CLIENT_LR, SERVER_LR = 0.2, 0.8


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        c = cohort.clients
        return state, {**metrics, "ids": c.client_id, "indices": c.indices, "mask": c.mask,
                       "duration": c.duration}

    return FederatedAlgorithm(algorithm.init, apply)


_GRADS = {}


def batch_grad(model):
    """The mean cross-entropy gradient of one batch (jitted once per model and batch shape)."""
    if id(model) not in _GRADS:
        _GRADS[id(model)] = jax.jit(jax.grad(
            lambda q, x, y: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(q, x), y).mean()))
    return _GRADS[id(model)]


def local_sgd(model, params, data, indices, mask):
    """One client's local SGD as a plain loop over its real batches; returns its delta."""
    x, y = data.arrays["x"], data.arrays["y"]
    p = params
    for s in range(indices.shape[0]):
        rows = indices[s][mask[s]]
        if rows.size == 0:
            continue
        grads = batch_grad(model)(p, x[rows], y[rows])
        p = jax.tree.map(lambda a, g: a - CLIENT_LR * g, p, grads)
    return jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), params, p)


class EventDrivenFedBuff:
    """The paper's server loop on a simulated clock: a heap of (finish time, dispatch order),
    times in float64 from ``start`` seconds."""

    def __init__(self, model, params, data, concurrency, buffer_size, exponent=0.5,
                 weight_exponent=1.0, start=0.0):
        self.model, self.data, self.weight_exponent = model, data, weight_exponent
        self.params = jax.tree.map(np.float64, params)
        self.concurrency, self.buffer_size, self.exponent = concurrency, buffer_size, exponent
        self.heap, self.clock, self.version, self.sequence = [], float(start), 0, 0

    def in_flight(self) -> set[int]:
        """The dispatch numbers of the clients in flight."""
        return {entry[1] for entry in self.heap}

    def round(self, ids, indices, mask, duration):
        staleness = []
        if len(self.heap) == self.concurrency:  # every slot busy: K updates arrive
            arrived = [heapq.heappop(self.heap) for _ in range(self.buffer_size)]
            total = sum(a[4] for a in arrived)
            step = None
            for _, _, delta, version, weight in arrived:
                tau = self.version - version
                staleness.append(tau)
                scale = weight * (1.0 + tau) ** -self.exponent / total
                term = jax.tree.map(lambda d, scale=scale: scale * d, delta)
                step = term if step is None else jax.tree.map(np.add, step, term)
            self.params = jax.tree.map(lambda p, d: p - SERVER_LR * d, self.params, step)
            self.version += 1
            self.clock = max(a[0] for a in arrived)
        start = jax.tree.map(np.float32, self.params)
        for c in range(len(ids)):
            delta = local_sgd(self.model, start, self.data, indices[c], mask[c])
            finish = self.clock + float(duration[c])  # float64
            weight = float(self.data.client_sizes[ids[c]]) ** self.weight_exponent
            heapq.heappush(self.heap, (finish, self.sequence, delta, self.version, weight))
            self.sequence += 1
        return staleness


def _spied_round_step(model, data, speeds, k, m):
    """FedBuff (concurrency m, k a round, spied cohorts) on ``data`` with these client speeds:
    (algorithm, round step), batches of 8, one epoch, the sequential client map."""
    algorithm = spy(fed_buff(model, optax.sgd(CLIENT_LR), optax.sgd(SERVER_LR),
                             concurrency=m))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(len(SIZES), k), k,
                                  client_execution="map", system=system_model(speeds))
    return algorithm, round_step


@pytest.mark.parametrize("speed", ["lognormal", "constant"])
def test_fed_buff_matches_event_driven_reference(speed):
    model, data = tiny_model(), tiny_data(SIZES)
    k, m = 2, 4
    if speed == "lognormal":
        speeds = np.exp(np.random.default_rng(0).normal(0, 1.0, len(SIZES)))
    else:  # equal speeds: many equal finish times, ties broken by dispatch order
        speeds = np.full(len(SIZES), 0.5)
    algorithm, round_step = _spied_round_step(model, data, speeds, k, m)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 5)
    reference = EventDrivenFedBuff(model, params, data, m, k)
    saw_stale = False
    for r in range(6):
        state, metrics = round_step(state)
        got = jax.device_get(metrics)
        staleness = reference.round(got["ids"], got["indices"], got["mask"], got["duration"])
        chex.assert_trees_all_close(state.algorithm.params,
                                    jax.tree.map(np.float32, reference.params),
                                    atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(got["system/clock"], reference.clock, rtol=1e-6)
        assert got["system/updates"] == reference.version == max(r + 1 - m // k, 0)
        np.testing.assert_allclose(got["system/staleness"],
                                   np.mean(staleness) if staleness else 0.0, rtol=1e-6)
        saw_stale |= any(s > 0 for s in staleness)
        if r < m // k:  # the pipeline fills: nothing arrives, the model stays put
            chex.assert_trees_all_close(state.algorithm.params, params)
            assert got["system/clock"] == 0.0
    assert saw_stale and bool(state.algorithm.slot_filled.all())


def test_staleness_exponent_buffer_size_and_uniform_weights():
    """s(tau) = (1 + tau)^-1 (exponent 1, not the paper's default 1/2), the paper's uniform 1/K
    average, K = 3 of M = 6 in flight: against the event-driven reference every round."""
    model, data = tiny_model(), tiny_data(SIZES)
    k, m = 3, 6
    speeds = np.exp(np.random.default_rng(1).normal(0, 1.0, len(SIZES)))
    algorithm = spy(fed_buff(model, optax.sgd(CLIENT_LR), optax.sgd(SERVER_LR), concurrency=m,
                             staleness_exponent=1.0, client_weighting="uniform"))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(len(SIZES), k), k,
                                  client_execution="map", system=system_model(speeds))
    params = model.init(jax.random.key(0))
    state = init_simulation_state(algorithm.init(params), 3)
    reference = EventDrivenFedBuff(model, params, data, m, k, exponent=1.0, weight_exponent=0.0)
    stale = []
    for _ in range(6):
        state, metrics = round_step(state)
        got = jax.device_get(metrics)
        stale += reference.round(got["ids"], got["indices"], got["mask"], got["duration"])
        chex.assert_trees_all_close(state.algorithm.params,
                                    jax.tree.map(np.float32, reference.params),
                                    atol=2e-6, rtol=1e-5)
    assert reference.version == 4 and max(stale) >= 1  # stale updates were scaled


def test_registry_and_bad_options():
    model = tiny_model()
    algorithm = create_algorithm("fed_buff", model, optax.sgd(0.1), optax.sgd(1.0),
                                 concurrency=4, client_weighting="uniform")
    state = algorithm.init(model.init(jax.random.key(0)))
    assert state.slot_remaining.shape == (4,)
    assert jax.tree.leaves(state.slot_deltas)[0].shape[0] == 4  # memory: M x the model
    with pytest.raises(ValueError, match="concurrency"):
        fed_buff(model, optax.sgd(0.1), optax.sgd(1.0), concurrency=0)
    data = tiny_data(SIZES)
    algorithm = fed_buff(model, optax.sgd(0.1), optax.sgd(1.0), concurrency=5)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=1)
    round_step = build_round_step(algorithm, data, schedule, uniform_sampler(len(SIZES), 2), 2)
    with pytest.raises(ValueError, match="multiple of the cohort size"):
        round_step(init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 0))


def test_filling_pipeline_leaves_the_state_finite(tmp_path):
    """While the buffer fills (concurrency > cohort size) empty slots must not read as a
    diverged run: `run` checks the state for NaN/inf after every round."""
    from fedjax_sim.simulation.loop import run

    tiny = ["cohort.size=2", "client.local_steps=2", "model.hidden=8", "eval.every=1000",
            "eval.max_examples=50", "log.every=1", "log.progress=false", "log.plot=false"]
    result = run(None, overrides=[*tiny, "rounds=4", "algorithm=fed_buff",
                                  "algorithm.concurrency=6"], workdir=tmp_path / "run")
    assert [row["round"] for row in result.history] == [1, 2, 3, 4]
    # M / K = 3 rounds fill the buffer, the 4th applies the first update
    assert [row["system/updates"] for row in result.history] == [0.0, 0.0, 0.0, 1.0]
    for leaf in jax.tree.leaves(jax.device_get(result.state.algorithm)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating):
            assert np.isfinite(leaf).all()


@pytest.mark.parametrize("speed", ["lognormal", "halves"])
def test_a_long_runs_clock_keeps_the_arrivals_of_a_float64_event_queue(speed):
    """A long run: the clock starts at 2^24 s (194 days; ~780,000 server updates of
    configs/fashion_mnist_fedbuff.yaml, ~21 s each), where float32's spacing is 2 s. Absolute
    float32 finish times ``clock + duration`` rounded the 0.03-3.6 s durations to 0, 2 or 4 s
    (wrong arrivals and staleness, false ties broken by dispatch order). Every round must keep
    the in-flight set, staleness, round seconds, clock and model of the float64 event queue."""
    model, data = tiny_model(), tiny_data(SIZES)
    k, m, start = 2, 6, 2.0**24
    if speed == "lognormal":  # durations 0.03-3.6 s, fractional
        speeds = 0.3 * np.exp(np.random.default_rng(2).normal(0, 1.0, len(SIZES)))
    else:  # multiples of 0.5 s: exact in float32 near 0, rounded to 2 s near 2^24 (ties, reorders)
        speeds = np.full(len(SIZES), 0.5)
    algorithm, round_step = _spied_round_step(model, data, speeds, k, m)
    params = model.init(jax.random.key(0))
    state = init_simulation_state(
        algorithm.init(params).replace(clock=jnp.asarray(start, jnp.float32)), 11)
    reference = EventDrivenFedBuff(model, params, data, m, k, start=start)
    stale = []
    for r in range(14):
        before = reference.clock
        state, metrics = round_step(state)
        got = jax.device_get(metrics)
        staleness = reference.round(got["ids"], got["indices"], got["mask"], got["duration"])
        stale += staleness
        fb = jax.device_get(state.algorithm)
        assert set(fb.slot_sequence[fb.slot_filled].tolist()) == reference.in_flight(), r
        np.testing.assert_allclose(got["system/staleness"],
                                   np.mean(staleness) if staleness else 0.0, rtol=1e-6)
        # the advance to float32 precision of a duration, not of the clock (2 s)
        np.testing.assert_allclose(got["system/round_seconds"], reference.clock - before,
                                   rtol=1e-6, atol=1e-6)
        clock = np.float64(fb.clock) + np.float64(getattr(fb, "clock_error", 0.0))
        assert abs(clock - reference.clock) <= 1e-5, (r, clock - reference.clock)
        assert got["system/clock"] == np.float32(reference.clock)  # the nearest float32
        chex.assert_trees_all_close(fb.params, jax.tree.map(np.float32, reference.params),
                                    atol=2e-6, rtol=1e-5)
    assert reference.version == 14 - m // k and max(stale) >= 1
