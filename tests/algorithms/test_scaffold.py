"""SCAFFOLD against a sequential reference written here (with its per-client store); its first
round (zero control variates) against FedAvg and a closed form; and, with equal local step counts
and uniform weights, the cancellation of the corrections in the server average (the paper's
setting) checked round by round. Option I (``control_update="option_i"``: c_i+ is the gradient
at the server model over the client's examples) against a float64 least-squares reference."""

import dataclasses

import chex
import jax
import linear_problem
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.scaffold import ScaffoldSettingWarning, check_setting, scaffold
from fedjax_sim.config import config_from_dict, load_config
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11, 8)
# Weights by examples (scaffold's default, kept by the references below) warn: see
# test_warns_outside_the_papers_setting.
BY_EXAMPLES = "client weights are not uniform"
COHORT = ("client_id", "indices", "mask", "valid", "num_steps")


def mean_loss(model, params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# jitted once per model and batch shape: the references below take hundreds of steps
loss_gradient = jax.jit(jax.grad(mean_loss, argnums=1), static_argnums=0)


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        return state, {**metrics, **{k: getattr(cohort.clients, k) for k in COHORT}}

    return FederatedAlgorithm(algorithm.init, apply)


def drop_second_client(key, clients):
    """A system model: the cohort's second client drops out (no real step)."""
    del key
    keep = np.arange(clients.mask.shape[0]) != 1
    return clients.replace(mask=clients.mask & keep[:, None, None],
                           num_steps=np.where(keep, 1, 0) * clients.num_steps)


def rounds(algorithm, data, n, cohort_size=3, schedule=None, **kwargs):
    schedule = schedule or ClientSchedule.from_sizes(data.client_sizes, 8, local_epochs=2)
    sampler = uniform_sampler(data.num_clients, cohort_size)
    step = build_round_step(spy(algorithm), data, schedule, sampler, cohort_size, **kwargs)
    state = init_simulation_state(algorithm.init(tiny_model().init(jax.random.key(0))), 11)
    cohorts = []
    for _ in range(n):
        state, metrics = step(state)
        cohorts.append(jax.device_get({k: metrics[k] for k in COHORT}))
    return state, cohorts


def tree(f, *trees):
    return jax.tree.map(f, *trees)


def local_path(model, data, start, indices, mask, lr, correction):
    """One client's local SGD ``y <- y - lr (g(y) + correction)``, one step at a time.

    Returns the final y and the raw (uncorrected) gradients g(y_k) of the real steps.
    """
    x, labels = data.arrays["x"], data.arrays["y"]
    y, raw = start, []
    for s in range(indices.shape[0]):
        rows = indices[s][mask[s]]
        if rows.size == 0:
            continue
        g = tree(np.float64, loss_gradient(model, tree(np.float32, y), x[rows], labels[rows]))
        y = tree(lambda v, g, k: v - lr * (g + k), y, g, correction)
        raw.append(g)
    return y, raw


def mean_of(trees, weights=None):
    weights = np.ones(len(trees)) if weights is None else np.asarray(weights, np.float64)
    p = weights / weights.sum()
    return tree(lambda *leaves: sum(pi * leaf for pi, leaf in zip(p, leaves, strict=True)),
                *trees)


def row(store, i):
    return tree(lambda leaf: np.asarray(leaf[i], np.float64), store)


def max_gap(a, b):
    return max(float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max())
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class Reference:
    """SCAFFOLD, Algorithm 1 of the paper with option II, one client at a time."""

    def __init__(self, model, data, params, lr, global_lr):
        self.model, self.data, self.lr, self.global_lr = model, data, lr, global_lr
        self.x = tree(np.float64, params)
        self.c = tree(np.zeros_like, self.x)
        self.c_i = {i: tree(np.zeros_like, self.x) for i in range(data.num_clients)}

    def grad(self, w, rows):
        x, y = self.data.arrays["x"], self.data.arrays["y"]
        return tree(np.float64, loss_gradient(self.model, tree(np.float32, w), x[rows], y[rows]))

    def round(self, cohort):
        dy, dc, weights = [], [], []
        for c, i in enumerate(cohort["client_id"]):
            if not cohort["valid"][c]:
                continue
            y, steps = self.x, 0
            for s in range(cohort["indices"].shape[1]):
                rows = cohort["indices"][c, s][cohort["mask"][c, s]]
                if rows.size == 0:
                    continue
                g = self.grad(y, rows)
                y = tree(lambda v, g, ci, cs: v - self.lr * (g - ci + cs), y, g, self.c_i[i],
                         self.c)
                steps += 1
            if steps == 0:  # dropped out: no update, no new control variate
                continue
            scale = 1.0 / (steps * self.lr)
            new_ci = tree(lambda ci, cs, x, y, scale=scale: ci - cs + scale * (x - y),
                          self.c_i[i], self.c, self.x, y)
            dy.append(tree(np.subtract, y, self.x))
            dc.append(tree(np.subtract, new_ci, self.c_i[i]))
            self.c_i[i] = new_ci
            weights.append(float(self.data.client_sizes[i]))
        p = np.array(weights) / np.sum(weights)
        n = self.data.num_clients
        self.x = tree(lambda x, *d: x + self.global_lr * sum(
            pi * di for pi, di in zip(p, d, strict=True)), self.x, *dy)
        self.c = tree(lambda c, *d: c + sum(d) / n, self.c, *dc)


@pytest.mark.parametrize("execution", ["map", "vmap", "mesh4"])
def test_scaffold_matches_sequential_reference_over_rounds(execution):
    model, data = tiny_model(), tiny_data(SIZES)
    lr, global_lr = 0.1, 0.8
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    with pytest.warns(ScaffoldSettingWarning, match=BY_EXAMPLES):
        algorithm = scaffold(model, client, optax.sgd(global_lr), num_clients=data.num_clients)
    kwargs = ({"mesh": client_mesh(4)} if execution == "mesh4"  # cohort 3 padded to 4
              else {"client_execution": execution})
    state, cohorts = rounds(algorithm, data, 5, system=drop_second_client, **kwargs)
    ref = Reference(model, data, model.init(jax.random.key(0)), lr, global_lr)
    for cohort in cohorts:
        ref.round(cohort)
    s = state.algorithm
    chex.assert_trees_all_close(s.params, tree(np.float32, ref.x), atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(s.control, tree(np.float32, ref.c), atol=2e-5, rtol=1e-5)
    for i in range(data.num_clients):  # every row of the store, trained or not
        row = tree(lambda x, i=i: x[i], s.client_controls)
        chex.assert_trees_all_close(row, tree(np.float32, ref.c_i[i]), atol=2e-5, rtol=1e-5)
    # The store mattered: some client trained twice with a nonzero c_i, one never trained.
    trained = [int(i) for cohort in cohorts for c, i in enumerate(cohort["client_id"])
               if c != 1 and cohort["valid"][c]]
    assert max(trained.count(i) for i in set(trained)) >= 2
    assert sum(float(np.abs(leaf).sum()) for leaf in jax.tree.leaves(s.client_controls)) > 0


def test_first_round_with_zero_control_variates_is_fed_avg():
    """Round 1 (c = c_i = 0) is FedAvg, and leaves c_i = the mean gradient along i's path."""
    model, data = tiny_model(), tiny_data(SIZES)
    lr, global_lr = 0.1, 0.8
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    server = optax.sgd(global_lr)
    with pytest.warns(ScaffoldSettingWarning, match=BY_EXAMPLES):
        algorithm = scaffold(model, client, server, num_clients=data.num_clients)
    ours, [cohort] = rounds(algorithm, data, 1)
    x = tree(np.float64, model.init(jax.random.key(0)))  # what rounds() starts from
    zero = tree(np.zeros_like, x)
    deltas, weights, controls = [], [], {}
    for c, i in enumerate(cohort["client_id"]):  # plain local SGD: no correction yet
        y, raw = local_path(model, data, x, cohort["indices"][c], cohort["mask"][c], lr, zero)
        deltas.append(tree(np.subtract, x, y))
        weights.append(float(data.client_sizes[i]))
        controls[int(i)] = mean_of(raw)  # option II: (x - y) / (K lr) = the mean raw gradient
    s = ours.algorithm
    expected = tree(lambda x, d: x - global_lr * d, x, mean_of(deltas, weights))
    chex.assert_trees_all_close(s.params, tree(np.float32, expected), atol=1e-6, rtol=1e-5)
    for i in range(data.num_clients):  # trained rows hold their new c_i, the others stay zero
        chex.assert_trees_all_close(row(s.client_controls, i),
                                    controls.get(i, zero), atol=1e-5, rtol=1e-5)
    summed = tree(lambda *cs: sum(cs) / data.num_clients, *controls.values())  # c = 1/N sum
    chex.assert_trees_all_close(tree(np.float64, s.control), summed, atol=1e-6, rtol=1e-5)
    assert max_gap(summed, zero) > 1e-2  # the control variates are not trivially zero
    # FedAvg itself agrees in round 1, and only there: round 2's corrections move SCAFFOLD off it.
    avg, _ = rounds(fed_avg(model, client, server), data, 1)
    chex.assert_trees_all_close(s.params, avg.algorithm.params, atol=1e-7, rtol=0)
    ours2, _ = rounds(algorithm, data, 2)
    avg2, _ = rounds(fed_avg(model, client, server), data, 2)
    assert max_gap(ours2.algorithm.params, avg2.algorithm.params) > 1e-3


def test_equal_local_steps_and_uniform_weights_cancel_the_corrections():
    """The paper's setting: every client takes K steps, the server mean is uniform.

    Client i steps ``y <- y - lr (g_i(y) - c_i + c)``, so after K steps
    ``x - y_i = lr sum_k g_i(y_ik) + K lr (c - c_i)``, and option II makes
    ``c_i+ = c_i - c + (x - y_i) / (K lr) = (1/K) sum_k g_i(y_ik)``, the mean raw gradient along
    the client's corrected path. ``c = 1/N sum_i c_i`` holds after every round (both start at
    zero and c moves by 1/N of the cohort's changes), so with the whole population in the
    cohort, equal K and uniform weights the correction terms average to ``K lr (c - mean c_i)
    = 0`` and the server step is plain gradient descent on the path gradients:

      x+ = x - eta_g lr sum_k mean_i g_i(y_ik) = x - eta_g K lr c+.

    Checked round by round against paths recomputed here from the state before the round; with
    weights by examples or unequal K the corrections would not cancel and ``x+`` would differ.
    """
    model, data = tiny_model(), tiny_data(SIZES)
    n, steps, lr, global_lr = data.num_clients, 3, 0.1, 0.8
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    algorithm = scaffold(model, client, optax.sgd(global_lr), client_weighting="uniform",
                         num_clients=n)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=steps)
    step = build_round_step(spy(algorithm), data, schedule, uniform_sampler(n, n), n)
    state = init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 5)
    largest_correction, zero = 0.0, tree(np.zeros_like, model.init(jax.random.key(0)))
    for _ in range(4):
        before = jax.device_get(state.algorithm)
        state, metrics = step(state)
        cohort, after = jax.device_get(metrics), jax.device_get(state.algorithm)
        assert sorted(cohort["client_id"].tolist()) == list(range(n))  # the whole population
        assert (cohort["num_steps"] == steps).all() and cohort["valid"].all()
        x, c = tree(np.float64, before.params), tree(np.float64, before.control)
        path_gradients, new_controls = [], []
        for slot, i in enumerate(cohort["client_id"]):
            c_i = row(before.client_controls, i)
            correction = tree(np.subtract, c, c_i)
            largest_correction = max(largest_correction, max_gap(correction, zero))
            _, raw = local_path(model, data, x, cohort["indices"][slot], cohort["mask"][slot],
                                lr, correction)
            assert len(raw) == steps
            path_gradients.append(tree(lambda *g: sum(g), *raw))
            new_controls.append(mean_of(raw))
            chex.assert_trees_all_close(row(after.client_controls, i), new_controls[-1],
                                        atol=1e-5, rtol=1e-5)
        # The corrections cancel: the server moves along the mean of the raw path gradients ...
        expected = tree(lambda x, g: x - global_lr * lr * g, x, mean_of(path_gradients))
        chex.assert_trees_all_close(tree(np.float64, after.params), expected,
                                    atol=1e-6, rtol=1e-5)
        # ... which is eta_g K lr times the new server control variate, the mean of the c_i+.
        control = tree(np.float64, after.control)
        chex.assert_trees_all_close(control, mean_of(new_controls), atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(
            tree(np.float64, after.params),
            tree(lambda x, c: x - global_lr * steps * lr * c, x, control), atol=1e-6, rtol=1e-5)
    # Not vacuous: each client's correction c - c_i was far from zero; only their mean vanished.
    assert largest_correction > 1e-2, largest_correction


def test_config_and_bad_arguments():
    config = load_config("configs/fashion_mnist_scaffold.yaml")
    assert config.algorithm.name == "scaffold"
    model = tiny_model()
    params = model.init(jax.random.key(0))
    algorithm = create_algorithm("scaffold", model, optax.inject_hyperparams(optax.sgd)(0.1),
                                 optax.sgd(1.0), num_clients=7, client_weighting="uniform",
                                 **config.algorithm.options)
    state = algorithm.init(params)
    assert jax.tree.leaves(state.client_controls)[0].shape[0] == 7
    with pytest.raises(ValueError, match="needs num_clients"):
        scaffold(model, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform")
    with pytest.raises(ValueError, match="client_learning_rate"):  # lr not readable
        scaffold(model, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform",
                 num_clients=3).init(params)
    # ... unless given
    scaffold(model, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform", num_clients=3,
             client_learning_rate=0.1).init(params)


SETTING_WARNINGS = {  # what each departure from the paper's setting must say
    "steps": "local step counts differ",
    "weights": "client weights are not uniform",
    "momentum": "client optimizer has momentum",
}


@pytest.mark.parametrize("departure, kwargs", [
    ("steps", {"equal_local_steps": False}),
    ("weights", {"client_weighting": "num_examples"}),
    ("weights", {"client_weighting": 0.5}),
    ("momentum", {"client_optimizer": optax.sgd(0.1, momentum=0.9)}),
    ("momentum", {"client_optimizer": optax.inject_hyperparams(optax.sgd)(0.1, momentum=0.5)}),
    ("momentum", {"client_optimizer": optax.adam(0.1)}),
])
def test_warns_outside_the_papers_setting(departure, kwargs):
    """Each departure alone warns, naming itself (and only itself) and the fix."""
    settings = {"client_optimizer": optax.sgd(0.1), "client_weighting": "uniform",
                "equal_local_steps": True, **kwargs}
    optimizer = settings.pop("client_optimizer")
    with pytest.warns(ScaffoldSettingWarning, match=SETTING_WARNINGS[departure]) as caught:
        scaffold(tiny_model(), optimizer, optax.sgd(1.0), num_clients=3,
                 client_learning_rate=0.1, **settings)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "paper's setting" in message
    for other, text in SETTING_WARNINGS.items():
        assert (text in message) == (other == departure), (other, message)


@pytest.mark.parametrize("optimizer", [
    optax.sgd(0.1),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    optax.sgd(0.1, momentum=0.0),  # a trace with decay 0 carries nothing over
    optax.adagrad(0.1),  # per-coordinate scaling but no memory of the gradient itself
    optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1)),
])
@pytest.mark.parametrize("equal_local_steps", [True, None])
def test_the_papers_setting_does_not_warn(optimizer, equal_local_steps):
    """Fixed local steps (or unknown), uniform weights, no client momentum: no warning."""
    assert check_setting(optimizer, "uniform", equal_local_steps) == []
    scaffold(tiny_model(), optimizer, optax.sgd(1.0), num_clients=3, client_learning_rate=0.1,
             client_weighting="uniform", equal_local_steps=equal_local_steps)  # errors on one


def _config(tmp_path, algorithm=None, **client):
    rng = np.random.default_rng(0)
    sizes = np.array([3, 9, 5, 12])  # unequal: one epoch is 1 to 3 steps of 4 examples
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(sizes.sum(), 3)).astype(np.float32),
             y=rng.integers(0, 2, sizes.sum()), client_id=np.repeat(np.arange(4), sizes))
    return config_from_dict({
        "dataset": {"name": "arrays", "path": str(tmp_path / "d.npz")},
        "model": {"name": "logistic"}, "algorithm": {"name": "scaffold", **(algorithm or {})},
        "cohort": {"size": 2},
        "client": {"optimizer": {"name": "sgd", "learning_rate": 0.1}, "batch_size": 4,
                   "weighting": "uniform", **client},
    })


def test_the_builder_tells_scaffold_when_step_counts_differ(tmp_path):
    from fedjax_sim.simulation.loop import build_experiment

    with pytest.warns(ScaffoldSettingWarning, match=SETTING_WARNINGS["steps"]):
        build_experiment(_config(tmp_path, local_epochs=1, local_steps=None))
    build_experiment(_config(tmp_path, local_steps=3))  # the paper's setting: errors on a warning
    with pytest.warns(ScaffoldSettingWarning, match=SETTING_WARNINGS["momentum"]):
        build_experiment(_config(tmp_path, local_steps=3,
                                 optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}))


def test_paper_algorithm_on_least_squares_with_a_scheduled_lr_and_server_lr():
    """Algorithm 1 (option II) written from the paper in float64 on least squares, uniform
    weights (the paper's 1/|S|), server lr eta_g = 0.5 on x only (c moves by |S|/N times the
    mean of the cohort's c_i changes, never by eta_g), 3 of 5 clients a round with the first
    dropping out, and a client lr schedule: option II divides by K times *this round's* lr."""
    data = linear_problem.linear_data((5, 17, 40, 3, 11))
    n, steps, global_lr = data.num_clients, 3, 0.5

    def lr_of(r):
        return 0.1 / (1.0 + r)

    client = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # replaced by the schedule
    algorithm = scaffold(None, client, optax.sgd(global_lr), client_weighting="uniform",
                         num_clients=n, loss_fn=linear_problem.squared_loss,
                         client_schedules={"learning_rate": lr_of})
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=steps)
    state, history = linear_problem.run(algorithm, data, schedule, 4, 3,
                                        client_execution="map", system=drop_first_slot)
    x = np.float64(linear_problem.initial_params()["w"])
    c, c_i = np.zeros_like(x), {i: np.zeros_like(x) for i in range(n)}
    for r, cohort in enumerate(history):
        lr, dy, dc = lr_of(r), [], []
        for slot, i in enumerate(cohort["client_id"]):
            batches = linear_problem.batches(cohort, slot)
            if not batches:
                continue  # dropped: not in S
            y = x.copy()
            for rows in batches:
                y = y - lr * (linear_problem.gradient(y, data, rows) - c_i[i] + c)
            new = c_i[i] - c + (x - y) / (len(batches) * lr)  # option II
            dy.append(y - x)
            dc.append(new - c_i[i])
            c_i[i] = new
        x = x + global_lr * np.mean(dy, axis=0)
        c = c + len(dc) / n * np.mean(dc, axis=0)
    np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.control["w"], c, rtol=1e-5, atol=1e-6)
    for i in range(n):
        np.testing.assert_allclose(state.client_controls["w"][i], c_i[i], rtol=1e-5, atol=1e-6)
    assert all(cohort["num_steps"][0] == 0 for cohort in history)  # the dropout happened
    assert np.abs(c).max() > 1e-2  # c moved


def drop_first_slot(key, clients):
    """A system model: the cohort's first client drops out (no real step)."""
    del key
    keep = np.arange(clients.mask.shape[0]) != 0
    return clients.replace(mask=clients.mask & keep[:, None, None],
                           num_steps=np.where(keep, 1, 0) * clients.num_steps)


# --- option I: c_i+ = g_i(x), the gradient at the server model over the local data -------------

OPTION_I_SIZES = (5, 17, 40, 3, 11)
OPTION_I_SCHEDULES = {
    # 2 epochs of batch 4, at most 5 steps (20 slots): clients of 5 and 3 examples run their
    # 2 epochs (the last batch padded), 11 and 17 are cut inside their second epoch (the pass
    # is every example once, not the 20 slots with their repeats), 40 inside its first (the
    # pass is the 20 distinct examples it trains on). Steps 1 to 5: weights by examples.
    "epochs": ({"local_epochs": 2, "max_local_steps": 5}, "num_examples"),
    # 3 steps of 4 (12 slots) for everyone: 3 fits 4 times, 5 and 11 repeat a partial epoch
    # after their first, 17 and 40 train on 12 distinct examples. Uniform weights.
    "steps": ({"local_steps": 3}, "uniform"),
}


def option_i_reference(data, history, lr, global_lr, exponent, slots):
    """Algorithm 1 with option I, written from the paper in float64, one client at a time.

    ``g_i(x)`` is the mean gradient at x over client i's own rows of the data (not read from
    the engine's batches) when its round has ``slots`` >= n example slots; otherwise it can
    only see the ``slots`` examples of its batches, which must then be distinct. Returns
    x, c, every c_i, and which of those two cases the trained clients met.
    """
    n = data.num_clients
    x = np.float64(linear_problem.initial_params()["w"])
    c, c_i = np.zeros_like(x), {i: np.zeros_like(x) for i in range(n)}
    cases = set()
    for cohort in history:
        dy, dc, weights = [], [], []
        for slot, i in enumerate(cohort["client_id"]):
            batches = linear_problem.batches(cohort, slot)
            if not cohort["valid"][slot] or not batches:
                continue  # padding for the devices, or dropped: not in S
            y = x.copy()
            for rows in batches:  # K local steps, corrected by c - c_i
                y = y - lr * (linear_problem.gradient(y, data, rows) - c_i[i] + c)
            own = linear_problem.client_rows(data, i)
            if slots >= len(own):
                seen, cases = own, cases | {"all examples"}
            else:
                seen = np.concatenate(batches)
                assert len(set(seen.tolist())) == len(seen) == slots
                cases |= {"the examples it trains on"}
            new = linear_problem.gradient(x, data, seen)  # option I: c_i+ = g_i(x)
            dy.append(y - x)
            dc.append(new - c_i[i])
            c_i[i] = new
            weights.append(float(data.client_sizes[i]) ** exponent)
        p = np.array(weights) / np.sum(weights)
        x = x + global_lr * sum(pi * d for pi, d in zip(p, dy, strict=True))
        c = c + sum(dc) / n  # 1/N sum over S of (c_i+ - c_i)
    return x, c, c_i, cases


@pytest.mark.parametrize("execution", ["map", "vmap", "mesh4", "host_data"])
@pytest.mark.parametrize("mode", sorted(OPTION_I_SCHEDULES))
def test_option_i_matches_a_float64_reference(mode, execution):
    """3 rounds of 3 of 5 clients of unequal sizes (the first of each cohort drops out), option
    I against `option_i_reference`; map, vmap, ``shard_map`` over 4 devices (the cohort padded
    by one client) and the host data path (only the batches' rows reach the device)."""
    data = linear_problem.linear_data(OPTION_I_SIZES)
    lr, global_lr, batch = 0.1, 0.7, 4
    options, weighting = OPTION_I_SCHEDULES[mode]
    schedule = ClientSchedule.from_sizes(data.client_sizes, batch, **options)
    client = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)

    def build(control_update):
        return scaffold(None, client, optax.sgd(global_lr), client_weighting=weighting,
                        num_clients=data.num_clients, loss_fn=linear_problem.squared_loss,
                        control_update=control_update)

    if weighting == "uniform":
        algorithm = build("option_i")
    else:
        with pytest.warns(ScaffoldSettingWarning, match=BY_EXAMPLES):
            algorithm = build("option_i")
    kwargs = {"map": {"client_execution": "map"}, "vmap": {"client_execution": "vmap"},
              "mesh4": {"mesh": client_mesh(4)},
              "host_data": {"data_placement": "host", "client_execution": "map"}}[execution]
    state, history = linear_problem.run(algorithm, data, schedule, 3, 3,
                                        system=drop_first_slot, **kwargs)
    if execution == "host_data":  # its cohorts hold positions in the gathered batch, not rows:
        _, history = linear_problem.run(algorithm, data, schedule, 3, 3,  # the same plan's rows
                                        system=drop_first_slot, client_execution="map")
    x, c, c_i, cases = option_i_reference(data, history, lr, global_lr,
                                          1.0 if weighting == "num_examples" else 0.0,
                                          schedule.num_steps * batch)
    np.testing.assert_allclose(state.params["w"], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.control["w"], c, rtol=1e-5, atol=1e-6)
    for i in range(data.num_clients):  # every row of the store, trained or not
        np.testing.assert_allclose(state.client_controls["w"][i], c_i[i], rtol=1e-5, atol=1e-6)
    # Not vacuous: both kinds of pass happened, a client trained with a nonzero c_i, one dropped,
    # and option II ends elsewhere from the same cohorts.
    assert cases == {"all examples", "the examples it trains on"}, cases
    assert all(cohort["num_steps"][0] == 0 for cohort in history)
    trained = [int(i) for cohort in history for s, i in enumerate(cohort["client_id"])
               if cohort["num_steps"][s] > 0]
    assert len(trained) > len(set(trained))
    if weighting == "uniform":
        option_ii = build("option_ii")
    else:
        with pytest.warns(ScaffoldSettingWarning, match=BY_EXAMPLES):
            option_ii = build("option_ii")
    other, _ = linear_problem.run(option_ii, data, schedule, 3, 3, system=drop_first_slot,
                                  client_execution="map")
    assert np.abs(np.asarray(other.params["w"]) - x).max() > 1e-3
    assert np.abs(np.asarray(other.control["w"]) - c).max() > 1e-3


def test_option_i_needs_no_learning_rate_and_refuses_one():
    """Option I reads no client learning rate (a plain optax optimizer is enough); one given is
    refused, naming the option. A bad ``control_update`` names the allowed values."""
    params = linear_problem.initial_params()
    scaffold(None, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform", num_clients=3,
             loss_fn=linear_problem.squared_loss, control_update="option_i").init(params)
    with pytest.raises(ValueError, match=r"^client_learning_rate: only option II's"):
        scaffold(None, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform",
                 num_clients=3, client_learning_rate=0.1, control_update="option_i")
    with pytest.raises(ValueError) as caught:
        scaffold(None, optax.sgd(0.1), optax.sgd(1.0), client_weighting="uniform",
                 num_clients=3, client_learning_rate=0.1, control_update="option_1")
    assert str(caught.value) == ("control_update: 'option_1' is not one of ['option_i', "
                                 "'option_ii'] (did you mean 'option_i'?)")


def test_control_update_from_a_config(tmp_path):
    """``algorithm.control_update`` reaches the factory (option I's c_i is the gradient at x
    over the client's data); a bad value, or a client_learning_rate with option I, is a one-line
    ConfigError naming the key."""
    from fedjax_sim.config import ConfigError
    from fedjax_sim.simulation.loop import build_experiment

    config = _config(tmp_path, {"control_update": "option_i"}, local_steps=3)
    assert config.algorithm.options == {"control_update": "option_i"}
    build_experiment(config)  # accepted (the paper's setting: errors on a warning)
    override = config_from_dict({"algorithm": "scaffold"}, ["algorithm.control_update=option_i"])
    assert override.algorithm.options == {"control_update": "option_i"}
    # The options as the config hands them to the factory: one round, every client in it.
    data = linear_problem.linear_data((6, 9))
    algorithm = create_algorithm("scaffold", None, optax.sgd(0.1), optax.sgd(1.0),
                                 num_clients=2, client_weighting="uniform",
                                 loss_fn=linear_problem.squared_loss,
                                 **override.algorithm.options)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=2)  # 8 slots
    state, [cohort] = linear_problem.run(algorithm, data, schedule, 1, 2, client_execution="map")
    x = np.float64(linear_problem.initial_params()["w"])
    for slot, i in enumerate(cohort["client_id"]):
        rows = (linear_problem.client_rows(data, i) if data.client_sizes[i] <= 8
                else np.concatenate(linear_problem.batches(cohort, slot)))
        np.testing.assert_allclose(state.client_controls["w"][i],
                                   linear_problem.gradient(x, data, rows), rtol=1e-5, atol=1e-6)

    cases = {
        "option_iii": ({"control_update": "option_iii"},
                       "config key 'algorithm.control_update': 'option_iii' is not one of "
                       "['option_i', 'option_ii'] (did you mean 'option_ii'?)"),
        "learning rate": ({"control_update": "option_i", "client_learning_rate": 0.1},
                          "config key 'algorithm.client_learning_rate': only option II's "
                          "(x - y) / (K lr) uses it; control_update='option_i' does not (leave "
                          "it unset)"),
    }
    for options, message in cases.values():
        with pytest.raises(ConfigError) as caught:
            build_experiment(_config(tmp_path, options, local_steps=3))
        assert str(caught.value) == message
    # Example-level DP-SGD counts the local steps' passes only: option I's extra pass is refused
    # (option II's messages are functions of the DP-SGD-trained parameters).
    private = _config(tmp_path, {"control_update": "option_i"}, local_steps=3)
    private = dataclasses.replace(private, privacy=dataclasses.replace(
        private.privacy, example_noise_multiplier=1.0, example_clip_norm=1.0))
    with pytest.raises(ConfigError, match=r"^config key 'algorithm.control_update': option_i "
                       r"sends .* example-level accounting .* use option_ii$"):
        build_experiment(private)
    build_experiment(dataclasses.replace(
        private, algorithm=dataclasses.replace(private.algorithm, options={})))
