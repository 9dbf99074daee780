"""Attacks against closed forms and numpy references written here.

An update attack must replace exactly the participating malicious clients' messages (padding,
dropped and benign ones bit for bit unchanged); data attacks must touch exactly the malicious
clients' rows; the malicious set is drawn once from the seed and is the same every round; a
short run of the round step with an attack and a robust reducer aggregates what the references
say; the ``attack:`` config section builds the attack and rejects bad keys by name.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import spy, tiny_data, tiny_model

from fedjax_sim import aggregators as agg
from fedjax_sim.algorithms import create_algorithm
from fedjax_sim.attacks import (
    add_trigger,
    boosted_update,
    choose_malicious,
    create_attack,
    flip_labels,
    gaussian_update,
    little_is_enough,
    poison_backdoor,
    prepend,
    scaled_update,
    sign_flip,
    trigger_set,
)
from fedjax_sim.config import ConfigError, config_from_dict
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

NUM_CLIENTS = 12
MALICIOUS = np.zeros(NUM_CLIENTS, bool)
MALICIOUS[[1, 4, 7, 10]] = True
# a cohort of 10 slots: clients 7 (malicious) and 3 dropped, slot 7 padding (id 0)
IDS = np.array([1, 2, 7, 4, 3, 10, 5, 0, 6, 8], np.int32)
WEIGHTS = np.array([2.0, 1.0, 0.0, 3.0, 0.0, 1.0, 4.0, 0.0, 2.0, 1.0], np.float32)
ATTACKERS = MALICIOUS[IDS] & (WEIGHTS > 0)  # slots 0, 3, 5: 3 of the 7 participating


def _values(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(len(IDS), 4, 3)).astype(np.float32),
            "b": rng.normal(size=(len(IDS), 3)).astype(np.float32)}


def _attack(stage, values, key=0):
    state = stage.init(jax.tree.map(lambda x: x[0], values))

    @jax.jit
    def run(state, values, weights, key, ids):
        return stage.apply(state, values, weights, key, {"client_ids": ids})

    out, weights, _, metrics, _ = run(state, values, jnp.asarray(WEIGHTS), jax.random.key(key),
                                      jnp.asarray(IDS))
    np.testing.assert_array_equal(np.asarray(weights), WEIGHTS)
    assert float(metrics["malicious_clients"]) == ATTACKERS.sum()
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_only_attackers_changed(out, values):
    for k in values:
        np.testing.assert_array_equal(out[k][~ATTACKERS], values[k][~ATTACKERS])
        assert not np.any(np.all(out[k][ATTACKERS] == values[k][ATTACKERS],
                                 axis=tuple(range(1, values[k].ndim))))


def test_choose_malicious_is_a_fixed_fraction_fixed_by_the_seed():
    chosen = choose_malicious(100, 0.2, seed=3)
    assert chosen.dtype == bool and chosen.sum() == 20
    np.testing.assert_array_equal(chosen, choose_malicious(100, 0.2, seed=3))
    assert not np.array_equal(chosen, choose_malicious(100, 0.2, seed=4))
    assert choose_malicious(50, 0.1, seed=0).sum() == 5
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        choose_malicious(10, 1.0, seed=0)


@pytest.mark.parametrize("stage,factor", [(sign_flip(MALICIOUS), -1.0),
                                          (sign_flip(MALICIOUS, 4.0), -4.0),
                                          (scaled_update(MALICIOUS, 10.0), 10.0)])
def test_sign_flip_and_scaling_touch_exactly_the_attackers(stage, factor):
    values = _values()
    out = _attack(stage, values)
    _assert_only_attackers_changed(out, values)
    for k in values:
        np.testing.assert_allclose(out[k][ATTACKERS], factor * values[k][ATTACKERS], rtol=1e-6)


def test_gaussian_updates_have_the_given_std_and_only_for_attackers():
    values = {"w": np.zeros((len(IDS), 200, 50), np.float32)}
    out = _attack(gaussian_update(MALICIOUS, stddev=0.3), values, key=1)
    np.testing.assert_array_equal(out["w"][~ATTACKERS], 0.0)
    forged = out["w"][ATTACKERS]
    assert np.std(forged) == pytest.approx(0.3, rel=0.02)
    assert abs(np.mean(forged)) < 0.01
    assert not np.array_equal(forged[0], forged[1])  # independent per client


@pytest.mark.parametrize("z", [None, 1.5])
def test_little_is_enough_is_benign_mean_minus_z_std(z):
    from scipy.stats import norm

    values = _values(1)
    out = _attack(little_is_enough(MALICIOUS, z), values)
    _assert_only_attackers_changed(out, values)
    benign = (WEIGHTS > 0) & ~ATTACKERS
    n, m = int((WEIGHTS > 0).sum()), int(ATTACKERS.sum())  # 7 and 3
    if z is None:  # Baruch et al.: s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n)
        s = math.floor(n / 2 + 1) - m
        z = max(norm.ppf((n - s) / n), 0.0)
        assert z > 0
    for k in values:
        rows = values[k][benign].astype(np.float64)
        want = rows.mean(0) - z * rows.std(0)
        for slot in np.flatnonzero(ATTACKERS):
            np.testing.assert_allclose(out[k][slot], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("boost", [None, 5.0])
def test_boosted_update_is_model_replacement_scaling(boost):
    values = _values(2)
    out = _attack(boosted_update(MALICIOUS, boost), values)
    _assert_only_attackers_changed(out, values)
    factor = boost or (WEIGHTS > 0).sum() / ATTACKERS.sum()  # n / m = 7 / 3
    for k in values:
        np.testing.assert_allclose(out[k][ATTACKERS], factor * values[k][ATTACKERS], rtol=1e-6)


def test_attack_without_client_ids_is_an_error():
    aggregator = agg.chain(sign_flip(MALICIOUS), agg.mean())
    values = _values()
    with pytest.raises(ValueError, match="client ids"):
        aggregator.apply(aggregator.init(jax.tree.map(lambda x: x[0], values)), values,
                         jnp.asarray(WEIGHTS), jax.random.key(0))


# --- Data attacks -------------------------------------------------------------------------------

def _image_data():
    data = tiny_data((5, 9, 12, 3, 8, 7), features=1, num_classes=3)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.5, size=(data.num_examples, 8, 8, 1)).astype(np.float32)
    return type(data)({"x": x, "y": data.arrays["y"]}, data.offsets, data.client_ids)


def test_label_flip_changes_exactly_the_malicious_clients_rows():
    data = _image_data()
    malicious = np.array([False, True, False, False, True, False])
    flipped = flip_labels(data, malicious, num_classes=3)
    for client in range(data.num_clients):
        y, y_new = data.client(client)["y"], flipped.client(client)["y"]
        np.testing.assert_array_equal(y_new, 2 - y if malicious[client] else y)
    np.testing.assert_array_equal(flipped.arrays["x"], data.arrays["x"])


def test_backdoor_poisons_a_fraction_of_the_malicious_rows_only():
    data = _image_data()
    malicious = np.array([False, True, True, False, False, False])
    poisoned = poison_backdoor(data, malicious, target=2, fraction=0.5, trigger_size=2)
    for client in range(data.num_clients):
        old, new = data.client(client), poisoned.client(client)
        changed = np.any(old["x"] != new["x"], axis=(1, 2, 3))
        if not malicious[client]:
            assert not changed.any()
            np.testing.assert_array_equal(old["y"], new["y"])
            continue
        assert changed.sum() == round(0.5 * len(old["y"]))
        np.testing.assert_array_equal(new["y"][changed], 2)
        np.testing.assert_array_equal(new["y"][~changed], old["y"][~changed])
        np.testing.assert_array_equal(new["x"][changed][:, -3:-1, -3:-1], 1.0)  # the trigger
    assert not np.shares_memory(poisoned.arrays["x"], data.arrays["x"])


def test_trigger_set_is_the_non_target_examples_with_the_trigger():
    x = np.zeros((6, 8, 8), np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    triggered = trigger_set({"x": x, "y": y}, target=1, trigger_size=3)
    np.testing.assert_array_equal(triggered["y"], [1, 1, 1, 1])
    np.testing.assert_array_equal(triggered["x"], add_trigger(x[y != 1], 3))
    assert triggered["x"][:, 4:7, 4:7].min() == 1.0 and triggered["x"][:, :4].max() == 0.0


# --- Through the round step ---------------------------------------------------------------------

def _recorder():
    """A client stage that hands the messages it sees back as metrics (for the test only)."""

    def apply(state, values, weights, key, context):
        return values, weights, state, {"values": values, "weights": weights}, context

    return agg.Stage(agg.CLIENT, agg.no_state, apply, "record")


def _rounds(aggregator, rounds=3):
    model, data = tiny_model(), tiny_data((5, 17, 40, 3, 11, 9, 14, 6))
    algorithm = spy(create_algorithm("fed_avg", model, optax.sgd(0.1), optax.sgd(1.0),
                                     aggregator=aggregator))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 8, local_steps=2)
    step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 5), 5,
                            client_execution="vmap")
    state = step.place(init_simulation_state(algorithm.init(model.init(jax.random.key(0))), 7))
    history = []
    for _ in range(rounds):
        before = jax.device_get(state.algorithm.params)
        state, metrics = step(state)
        history.append((before, jax.device_get(state.algorithm.params), jax.device_get(metrics)))
    return history


def test_round_with_sign_flip_and_median_aggregates_the_attacked_messages():
    malicious = choose_malicious(8, 0.25, seed=0)  # 2 of 8 clients, the same every round
    honest = _rounds(agg.chain(_recorder(), agg.median()))
    attacked = _rounds(prepend(sign_flip(malicious, 3.0), agg.chain(_recorder(), agg.median())))
    seen = 0
    for index, ((_, _, clean), (before, after, metrics)) in enumerate(
            zip(honest, attacked, strict=True)):
        # the same cohorts (same seed); the malicious set is the same every round
        np.testing.assert_array_equal(metrics["ids"], clean["ids"])
        sending = np.asarray(metrics["aggregator/record/weights"]) > 0
        bad = malicious[np.asarray(metrics["ids"])] & sending
        assert float(metrics["aggregator/sign_flip/malicious_clients"]) == bad.sum()
        seen += bad.sum()
        got = metrics["aggregator/record/values"]
        if index == 0:  # same params, same local training: only the attackers' messages differ
            want = jax.tree.map(
                lambda x, bad=bad: np.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), -3.0 * x,
                                            x),
                clean["aggregator/record/values"])
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         got, want)
        # the server step (SGD, lr 1): params - the median of the participating messages
        jax.tree.map(lambda p0, p1, v, sending=sending: np.testing.assert_allclose(
            p1, p0 - np.median(np.asarray(v, np.float64)[sending], axis=0),
            rtol=1e-5, atol=1e-6), before, after, got)
    assert seen > 0  # the attack was exercised


# --- The attack: config section -----------------------------------------------------------------

def _config(tmp_path, attack, aggregator=None):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    if not path.exists():
        np.savez(path, x=rng.uniform(0, 0.5, (120, 8, 8, 1)).astype(np.float32),
                 y=rng.integers(0, 3, 120), client_id=np.repeat(np.arange(10), 12),
                 x_test=rng.uniform(0, 0.5, (30, 8, 8, 1)).astype(np.float32),
                 y_test=np.arange(30) % 3)
    return config_from_dict({
        "seed": 3,
        "dataset": {"name": "arrays", "path": str(path), "num_classes": 3},
        "model": {"name": "logistic"},
        "client": {"optimizer": {"name": "sgd", "learning_rate": 0.1}, "batch_size": 6,
                   "local_steps": 2},
        "cohort": {"size": 5},
        "attack": attack,
        **({"aggregator": aggregator} if aggregator is not None else {}),
    })


def test_config_backdoor_poisons_the_chosen_clients_and_reports_backdoor_accuracy(tmp_path):
    from fedjax_sim.simulation.loop import build_dataset, build_experiment

    config = _config(tmp_path, {"name": "backdoor", "fraction": 0.2, "target": 1,
                                "trigger_size": 2}, [{"name": "norm_bound", "max_norm": 0.5}])
    experiment = build_experiment(config)
    malicious = create_attack("backdoor", 10, 3, 0.2, 3, target=1).malicious
    np.testing.assert_array_equal(malicious, choose_malicious(10, 0.2, seed=3))
    clean, poisoned = build_dataset(config).train, experiment.dataset.train
    for client in range(10):
        changed = np.any(clean.client(client)["x"] != poisoned.client(client)["x"], axis=(1, 2, 3))
        assert changed.sum() == (6 if malicious[client] else 0)
    state = experiment.init_state()
    for _ in range(2):
        state, metrics = experiment.round_step(state)
        assert "aggregator/boosted_update/malicious_clients" in metrics
        assert "aggregator/norm_bound/clipped_fraction" in metrics
    result = experiment.evaluate(state.algorithm)
    assert result["backdoor/examples"] == 20  # the 30 test images less the 10 of class 1
    assert 0.0 <= result["backdoor/accuracy"] <= 1.0


@pytest.mark.parametrize("attack,match", [
    ({"name": "sign_flp"}, r"'attack.name'.*did you mean 'sign_flip'"),
    ({"name": "sign_flip", "scal": 2.0}, r"'attack.scal'.*did you mean 'attack.scale'"),
    ({"name": "sign_flip", "fraction": 1.5}, r"'attack.fraction': expected a number in \[0, 1\)"),
    ({"scale": 2.0}, r"'attack'.*without an attack; set attack.name"),
    ({"name": "backdoor", "target": 7}, r"'attack.target': expected a class in \[0, 3\)"),
    ({"name": "gaussian", "stddev": -1.0}, r"'attack' \(gaussian\).*stddev must be > 0"),
])
def test_config_attack_errors_name_the_key(tmp_path, attack, match):
    from fedjax_sim.simulation.loop import build_experiment

    with pytest.raises(ConfigError, match=match):
        build_experiment(_config(tmp_path, attack))


@pytest.mark.parametrize("scale,low", [(3e19, -1.0), (1e38, 0.5)])
def test_little_is_enough_does_not_overflow_on_huge_benign_updates(scale, low):
    """Benign updates of ~3e19 square past float32 (the std was inf: the attackers sent -inf);
    seven benign values near 1e38 sum past it (the mean was inf). Both are finite in float64."""
    rng = np.random.default_rng(5)
    values = {k: (scale * rng.uniform(low, 1.0, size=v.shape)).astype(np.float32)
              for k, v in _values().items()}
    out = _attack(little_is_enough(MALICIOUS, 1.5), values)
    benign = (WEIGHTS > 0) & ~ATTACKERS
    for k in values:
        rows = values[k][benign].astype(np.float64)
        want = rows.mean(0) - 1.5 * rows.std(0)
        assert np.all(np.isfinite(want)) and np.all(np.abs(want) < 3e38)
        for slot in np.flatnonzero(ATTACKERS):
            np.testing.assert_allclose(out[k][slot], want, rtol=1e-5)
        np.testing.assert_array_equal(out[k][~ATTACKERS], values[k][~ATTACKERS])
