"""Per-client, fine-tuned and personalized evaluation against plain loops over clients."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.config import ConfigError, config_from_dict
from fedjax_sim.data.batching import ClientSchedule, client_stream
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.simulation.evaluation import (
    PERCENTILES,
    build_evaluators,
    client_distribution,
    make_evaluator,
    make_fine_tune_evaluator,
    make_per_client_evaluator,
    make_personal_evaluator,
)

TRAIN_SIZES = (6, 17, 30, 3, 11, 9)
TEST_SIZES = (4, 0, 13, 2, 5, 8)  # client 1 has no held-out examples


def reference_statistics(model, params, x, y):
    """Loss sum, correct and count of one client, straight from the model's logits."""
    if len(y) == 0:
        return 0.0, 0.0, 0.0
    logits = np.asarray(model.apply(params, x), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(y)), y].sum()
    return loss, float(np.sum(logits.argmax(-1) == y)), float(len(y))


def reference_distribution(loss_sum, correct, count):
    has = count > 0
    accuracy = correct[has] / count[has]
    worst = np.sort(accuracy)[: max(1, math.ceil(0.1 * has.sum()))]
    out = {f"accuracy_p{p}": np.percentile(accuracy, p) for p in PERCENTILES}
    out.update(accuracy_mean=accuracy.mean(), accuracy_worst10pct=worst.mean(),
               accuracy_min=accuracy.min(), accuracy_var=accuracy.var(),
               loss_mean=np.mean(loss_sum[has] / count[has]),
               accuracy=correct.sum() / count.sum(), clients=has.sum())
    return out


def assert_stats_close(stats, expected, atol=1e-4):
    loss_sum, correct, count = (np.array(v) for v in zip(*expected, strict=True))
    np.testing.assert_allclose(stats["count"], count)
    np.testing.assert_allclose(stats["correct"], correct)
    np.testing.assert_allclose(stats["loss_sum"], loss_sum, rtol=1e-5, atol=atol)


def test_client_distribution_matches_numpy():
    rng = np.random.default_rng(0)
    for num_clients in (1, 7, 40, 101):
        count = rng.integers(0, 30, num_clients).astype(np.float32)
        count[0] = max(count[0], 1.0)
        correct = np.floor(rng.uniform(size=num_clients) * (count + 1)).clip(0, count)
        loss_sum = rng.uniform(0, 3, num_clients).astype(np.float32) * count
        metrics = jax.jit(client_distribution)(
            {"loss_sum": loss_sum, "correct": correct.astype(np.float32), "count": count})
        expected = reference_distribution(loss_sum, correct, count)
        assert set(metrics) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
            assert np.shape(metrics[key]) == ()


def test_client_distribution_without_any_held_out_label_is_zero_not_nan():
    zeros = jnp.zeros(4)
    metrics = client_distribution({"loss_sum": zeros, "correct": zeros, "count": zeros})
    assert all(np.isfinite(v) for v in jax.device_get(metrics).values())
    assert float(metrics["clients"]) == 0


def test_client_distribution_leaves_out_clients_with_no_scored_label():
    """A client whose held-out labels all carry a loss but no accuracy (every next word OOV or
    EOS under ignore_labels, or no tag among a multi-label model's classes) has no accuracy:
    it is left out of the accuracy metrics (not counted as 0% accurate), kept in loss_mean."""
    loss_sum = np.array([4.0, 5.0, 2.0, 0.0, 6.0], np.float32)
    correct = np.array([3.0, 0.0, 1.0, 0.0, 2.0], np.float32)
    count = np.array([4.0, 5.0, 2.0, 0.0, 3.0], np.float32)
    scored = np.array([4.0, 0.0, 2.0, 0.0, 3.0], np.float32)  # client 1: nothing scored
    metrics = jax.device_get(jax.jit(client_distribution)(
        {"loss_sum": loss_sum, "correct": correct, "count": count, "accuracy_count": scored}))
    accuracy = np.array([3 / 4, 1 / 2, 2 / 3])  # clients 0, 2, 4
    expected = {f"accuracy_p{p}": np.percentile(accuracy, p) for p in PERCENTILES}
    expected.update(accuracy_mean=accuracy.mean(), accuracy_worst10pct=accuracy.min(),
                    accuracy_min=accuracy.min(), accuracy_var=accuracy.var(),
                    loss_mean=np.mean([4 / 4, 5 / 5, 2 / 2, 6 / 3]), accuracy=6 / 9, clients=4)
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
    nothing_scored = jax.device_get(client_distribution(
        {"loss_sum": loss_sum, "correct": 0 * correct, "count": count,
         "accuracy_count": 0 * scored}))
    assert all(np.isfinite(v) for v in nothing_scored.values())
    assert nothing_scored["accuracy_mean"] == 0 and nothing_scored["loss_mean"] > 0


@pytest.mark.parametrize("batch_size", [1, 7, 512])
def test_per_client_evaluation_matches_a_loop_over_clients(batch_size):
    model, test = tiny_model(), tiny_data(TEST_SIZES, seed=1)
    params = model.init(jax.random.key(0))
    stats = make_per_client_evaluator(model, test, batch_size)(params)
    expected = [reference_statistics(model, params, **test.client(k))
                for k in range(test.num_clients)]
    assert_stats_close(stats, expected)


@pytest.mark.parametrize("devices,batch_size", [(1, 7), (2, 7), (3, 5), (3, 64)])
def test_pooled_evaluation_split_over_devices_matches_numpy(devices, batch_size):
    """Each batch split over the mesh's devices (the batch rounded up to a multiple of them,
    and 64 > the 32 examples: one batch, padded to 33) gives the pooled numpy statistics."""
    from fedjax_sim.sharding import client_mesh

    model, test = tiny_model(), tiny_data(TEST_SIZES, seed=1)
    params = model.init(jax.random.key(0))
    mesh = client_mesh(devices) if devices > 1 else None
    out = jax.device_get(make_evaluator(model, test.arrays, batch_size, mesh=mesh)(params))
    loss, correct, count = reference_statistics(model, params, test.arrays["x"],
                                                test.arrays["y"])
    assert out["examples"] == count == sum(TEST_SIZES)
    np.testing.assert_allclose(out["accuracy"], correct / count, rtol=1e-6)
    np.testing.assert_allclose(out["loss"], loss / count, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
def test_personal_evaluation_uses_each_clients_own_model(chunk):
    model, test = tiny_model(), tiny_data(TEST_SIZES, seed=1)
    rows = [model.init(jax.random.key(k)) for k in range(test.num_clients)]
    store = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)
    stats = make_personal_evaluator(model, test, batch_size=3, chunk=chunk)(store)
    expected = [reference_statistics(model, rows[k], **test.client(k))
                for k in range(test.num_clients)]
    assert_stats_close(stats, expected)


@pytest.mark.parametrize("chunk", [1, 4])
def test_fine_tuning_matches_a_loop_of_sgd_steps_per_client(chunk):
    """Each client: `steps` SGD steps on its own training batches, then its own test split.

    The batches are the engine's documented stream (`client_stream` with the client's key); the
    SGD steps and the evaluation are redone here in plain Python.
    """
    model = tiny_model()
    train, test = tiny_data(TRAIN_SIZES, seed=2), tiny_data(TEST_SIZES, seed=3)
    params = model.init(jax.random.key(0))
    steps, batch_size, lr, seed = 3, 4, 0.5, 11
    stats = make_fine_tune_evaluator(model, train, test, steps=steps, batch_size=batch_size,
                                     learning_rate=lr, test_batch_size=3, chunk=chunk,
                                     seed=seed)(params)

    schedule = ClientSchedule(steps, batch_size, None, max(TRAIN_SIZES))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels
    loss_gradient = jax.jit(jax.grad(lambda p, x, y: cross_entropy(model.apply(p, x), y).mean()))
    expected = []
    for k in range(train.num_clients):
        shuffle_key, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), k))
        positions, mask = jax.device_get(client_stream(shuffle_key, jnp.int32(TRAIN_SIZES[k]),
                                                       schedule))
        own = train.client(k)
        p = params
        for s in range(steps):
            rows = positions[s][mask[s]]
            grads = loss_gradient(p, own["x"][rows], own["y"][rows])
            p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
        expected.append(reference_statistics(model, p, **test.client(k)))
    assert_stats_close(stats, expected)
    before = make_per_client_evaluator(model, test)(params)
    assert not np.allclose(before["loss_sum"], stats["loss_sum"])  # fine-tuning did something


class _State:
    def __init__(self, params, personal_params=None):
        self.params = params
        if personal_params is not None:
            self.personal_params = personal_params


def _dataset(with_test=True):
    train = tiny_data(TRAIN_SIZES, seed=2)
    test = tiny_data(TEST_SIZES, seed=3) if with_test else None
    return FederatedDataset("tiny", train, test, None, {"num_classes": 3})


def _settings(**eval_section):
    """`build_evaluators`'s arguments for an ``eval:`` section, as the loop passes them."""
    return {"fine_tune_learning_rate": 0.1, "fine_tune_batch_size": 4, **eval_section}


def test_build_evaluators_adds_per_client_personal_and_fine_tuned_entries():
    model, dataset = tiny_model(), _dataset()
    evaluators = build_evaluators(model, dataset, **_settings(per_client=True, fine_tune_steps=2))
    assert set(evaluators) == {"test", "per_client", "fine_tuned"}
    params = model.init(jax.random.key(0))
    store = jax.tree.map(lambda x: jnp.stack([x] * dataset.train.num_clients), params)
    global_only = jax.device_get(evaluators["per_client"](_State(params)))
    both = jax.device_get(evaluators["per_client"](_State(params, store)))
    assert "personal/accuracy_p50" not in global_only
    for name, value in global_only.items():  # personal = global here: the same numbers
        assert both[name] == value and both[f"personal/{name}"] == pytest.approx(value)
    tuned = jax.device_get(evaluators["fine_tuned"](_State(params)))
    assert set(tuned) == set(global_only) and tuned["clients"] == 5
    expected = reference_distribution(*(np.array(v) for v in zip(*[
        reference_statistics(model, params, **dataset.test.client(k))
        for k in range(dataset.test.num_clients)], strict=True)))
    for name, value in expected.items():
        assert global_only[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_build_evaluators_fine_tuning_alone_reports_before_and_after():
    evaluators = build_evaluators(tiny_model(), _dataset(), **_settings(fine_tune_steps=1))
    assert {"per_client", "fine_tuned"} <= set(evaluators)


@pytest.mark.parametrize("section", [{"per_client": True}, {"fine_tune_steps": 3}])
def test_per_client_evaluation_without_held_out_split_names_the_key(tmp_path, section):
    with pytest.raises(ValueError, match="dataset 'tiny' has none.*test_fraction"):
        build_evaluators(tiny_model(), _dataset(with_test=False), **_settings(**section))
    from fedjax_sim.simulation.loop import build_experiment

    data = tiny_data((6, 8, 5), features=3, seed=1)
    np.savez(tmp_path / "d.npz", x=data.arrays["x"], y=data.arrays["y"],
             client_id=np.repeat(np.arange(3), data.client_sizes))
    config = config_from_dict({"dataset": {"name": "arrays", "path": str(tmp_path / "d.npz")},
                               "model": {"name": "logistic"}, "cohort": {"size": 2},
                               "eval": section})
    key = next(iter(section))
    with pytest.raises(ConfigError, match=f"config key .eval.{key}.*test_fraction"):
        build_experiment(config)


def test_run_logs_personal_and_fine_tuned_distributions(tmp_path):
    """Ditto through `run()` on an .npz dataset: the distributions land in metrics.jsonl."""
    from fedjax_sim.simulation.loop import run

    data = tiny_data((30, 40, 25, 35), features=6, seed=4)
    client_id = np.repeat(np.arange(4), data.client_sizes)
    np.savez(tmp_path / "d.npz", x=data.arrays["x"], y=data.arrays["y"], client_id=client_id)
    config = {
        "name": "ditto_tiny", "rounds": 2, "algorithm": {"name": "ditto", "lam": 0.1},
        "dataset": {"name": "arrays", "path": str(tmp_path / "d.npz"), "test_fraction": 0.3},
        "model": {"name": "logistic"},
        "client": {"batch_size": 5, "local_steps": 2,
                   "optimizer": {"name": "sgd", "learning_rate": 0.1}},
        "cohort": {"size": 2},
        "eval": {"every": 2, "per_client": True, "fine_tune_steps": 2},
        "log": {"every": 1, "progress": False, "plot": False},
    }
    result = run(config, workdir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    last = rows[-1]
    for key in ("per_client/accuracy_p10", "per_client/accuracy_worst10pct",
                "per_client/accuracy_var", "per_client/personal/accuracy_p50",
                "fine_tuned/accuracy_p90", "fine_tuned/clients"):
        assert key in last and np.isfinite(last[key]), key
    assert last["per_client/clients"] == 4
    assert result.summary["final"]["fine_tuned/clients"] == 4
