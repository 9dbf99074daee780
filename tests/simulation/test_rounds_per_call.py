"""Several rounds per compiled call against one round per call (the independent reference).

`RoundStep.run_rounds` (a loop over rounds on the device) must give the states and the metrics
that one `round_step(state)` per round gives, bit for bit, and compile once for every count of
rounds; the host loop with ``execution.rounds_per_call`` must write the same ``metrics.jsonl``
rows, evaluations and checkpoints as with one round per call.
"""

import json

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_data, tiny_model

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import poisson_sampler, uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

SIZES = (5, 17, 40, 3, 11, 8)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def counting(algorithm: FederatedAlgorithm, traces: list) -> FederatedAlgorithm:
    """The algorithm, counting how often its round is traced (a compilation each)."""

    def apply(state, cohort, map_clients):
        traces.append(1)
        return algorithm.apply(state, cohort, map_clients)

    return FederatedAlgorithm(algorithm.init, apply)


@pytest.mark.parametrize("name", ["fed_avg", "scaffold_poisson", "fed_avg_mesh4"])
def test_run_rounds_equals_one_round_per_call(name):
    model, data = tiny_model(), tiny_data(SIZES)
    mesh = client_mesh(4) if name.endswith("mesh4") else None  # clients over 4 CPU devices
    if name.startswith("fed_avg"):
        algorithm = fed_avg(model, optax.sgd(0.1), optax.adam(0.05))
        sampler, cohort_size = uniform_sampler(data.num_clients, 3), 3
        schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    else:  # stateful (per-client control variates); a variable cohort: Poisson, capped at 4
        algorithm = scaffold(model, optax.sgd(0.1), optax.adam(0.05), client_weighting="uniform",
                             client_learning_rate=0.1,
                             num_clients=data.num_clients, equal_local_steps=True)
        sampler, cohort_size = poisson_sampler(data.num_clients, 0.5, 4), 4
        schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_steps=3)
    params = model.init(jax.random.PRNGKey(0))

    def build(k, traces):
        return build_round_step(counting(algorithm, traces), data, schedule, sampler,
                                cohort_size, rounds_per_call=k, mesh=mesh)

    one_traces, multi_traces = [], []
    one, multi = build(1, one_traces), build(4, multi_traces)
    state = one.place(init_simulation_state(algorithm.init(params), 7))
    reference = []
    for _ in range(9):
        state, metrics = one(state)
        reference.append(jax.device_get(metrics))
    reference_state = jax.device_get(state)

    state = multi.place(init_simulation_state(algorithm.init(params), 7))
    rows = []
    for count in (4, 1, 3, 1):  # every count up to k, one compiled program
        state, stacked = multi.run_rounds(state, count)
        stacked = jax.device_get(stacked)
        assert all(v.shape[0] == 4 for v in jax.tree.leaves(stacked))
        rows += [jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(count)]
        padding = jax.tree.leaves(jax.tree.map(lambda v, c=count: v[c:], stacked))
        assert all(not np.any(v) for v in padding)  # rows past the count are zeros
    assert int(state.round) == 9
    assert_trees_equal(jax.device_get(state), reference_state)
    assert len(rows) == len(reference)
    for row, expected in zip(rows, reference, strict=True):
        assert row.keys() == expected.keys()
        assert_trees_equal(row, expected)
    if name == "scaffold_poisson":
        drawn = [float(r["cohort/drawn"]) for r in rows]
        assert len(set(drawn)) > 1, "the Poisson cohort should vary between rounds"
    assert len(one_traces) == 1  # `place` keeps round 2 from compiling again
    assert len(multi_traces) == 2  # the loop body once and its eval_shape once: one program
    assert multi.multi_round._cache_size() == 1


def test_run_rounds_rejects_counts_and_host_data():
    model, data = tiny_model(), tiny_data(SIZES)
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    sampler = uniform_sampler(data.num_clients, 2)
    step = build_round_step(algorithm, data, schedule, sampler, 2, rounds_per_call=3)
    state = step.place(init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))),
                                             0))
    for count in (0, 4):
        with pytest.raises(ValueError, match="expected 1 to rounds_per_call=3"):
            step.run_rounds(state, count)
    single = build_round_step(algorithm, data, schedule, sampler, 2)
    with pytest.raises(ValueError, match="rounds_per_call=k"):
        single.run_rounds(state, 1)
    with pytest.raises(ValueError, match="needs the training data on the device.*"
                                         "data_placement='device'"):
        build_round_step(algorithm, data, schedule, sampler, 2, rounds_per_call=3,
                         data_placement="host")


# --- the host loop ----------------------------------------------------------------------------


def write_arrays(path, seed=0):
    """A tiny .npz dataset: 8 clients of 6 to 20 examples, 4 features, 3 classes, a test set."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(6, 21, 8)
    x = rng.normal(size=(int(sizes.sum()), 4)).astype(np.float32)
    y = rng.integers(0, 3, len(x)).astype(np.int32)
    np.savez(path, x=x, y=y, client_id=np.repeat(np.arange(8), sizes),
             x_test=x[:30], y_test=y[:30])
    return path


def loop_overrides(path):
    # Cadences that k = 4 does not divide (see CALLS): full calls and calls cut short.
    return ["dataset.name=arrays", f"dataset.path={path}", "model.name=logistic", "rounds=17",
            "cohort.size=3", "client.batch_size=4", "client.local_steps=2", "log.every=6",
            "eval.every=8", "checkpoint.every=13", "log.progress=false", "log.plot=false"]


# Rounds per call for k = 4: the first call runs 1 round (its time is the compilation's), then
# up to 4, each call ending on the log (6, 12), evaluation (8, 16), checkpoint (13) and last round.
CALLS = [1, 4, 1, 2, 4, 1, 3, 1]
LOGGED = [6, 8, 12, 13, 16, 17]


def test_calls_end_on_every_log_evaluation_and_checkpoint_round():
    from fedjax_sim.config import load_config
    from fedjax_sim.simulation.loop import _rounds_in_call

    config = load_config(None, [*loop_overrides("data.npz"), "execution.rounds_per_call=4"])
    calls, done = [1], 1
    while done < config.rounds:
        calls.append(_rounds_in_call(config, done))
        done += calls[-1]
    assert calls == CALLS and done == 17
    assert [sum(CALLS[:i + 1]) for i in range(len(CALLS))] == [1, 5, 6, 8, 12, 13, 16, 17]


def rows_without_wall_time(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def test_loop_rows_and_state_equal_one_round_per_call(tmp_path):
    """SCAFFOLD (per-client state) on a Poisson cohort; FedAvg: the resume test below."""
    from fedjax_sim.simulation.loop import run

    overrides = [*loop_overrides(write_arrays(tmp_path / "data.npz")), "algorithm.name=scaffold",
                 "client.weighting=uniform", "cohort.sampler=poisson"]
    seen = {}
    results = {}
    for k in (1, 4):
        seen[k] = []
        results[k] = run(None, overrides=[*overrides, f"execution.rounds_per_call={k}"],
                         workdir=tmp_path / f"k{k}",
                         callbacks=[lambda row, state, k=k: seen[k].append(
                             (row["round"], int(state.round)))])
    rows = {k: rows_without_wall_time(tmp_path / f"k{k}") for k in (1, 4)}
    assert [r["round"] for r in rows[4]] == list(range(1, 18))
    assert rows[4] == rows[1]  # every metric and evaluation, row by row
    assert [r["round"] for r in rows[4] if "test/accuracy" in r] == [8, 16, 17]
    # The callbacks saw the same logged rounds, each with the state of that round.
    assert seen[4] == seen[1] == [(r, r) for r in LOGGED]
    assert_trees_equal(jax.device_get(results[4].state), jax.device_get(results[1].state))
    assert sorted(p.name for p in (tmp_path / "k4" / "checkpoints").iterdir()
                  if p.name.isdigit()) == sorted(
        p.name for p in (tmp_path / "k1" / "checkpoints").iterdir() if p.name.isdigit())


def test_loop_stop_and_resume_with_rounds_per_call(tmp_path):
    """FedAvg: a callback stops the run at round 8 (an evaluation round, where a call ends);
    the resumed run writes the rows and ends in the state of an uninterrupted run with one
    round per call."""
    from fedjax_sim.simulation.loop import run

    overrides = [*loop_overrides(write_arrays(tmp_path / "data.npz")),
                 "execution.rounds_per_call=4"]
    stopped = run(None, overrides=overrides, workdir=tmp_path / "a",
                  callbacks=[lambda row, state: row["round"] >= 7])
    assert stopped.history[-1]["round"] == 8 and int(stopped.state.round) == 8
    resumed = run(None, overrides=overrides, workdir=tmp_path / "a")
    reference = run(None, overrides=[*overrides[:-1], "execution.rounds_per_call=1"],
                    workdir=tmp_path / "b")
    assert_trees_equal(jax.device_get(resumed.state), jax.device_get(reference.state))
    assert rows_without_wall_time(tmp_path / "a") == rows_without_wall_time(tmp_path / "b")


def test_loop_rounds_per_call_with_host_data_is_a_config_error(tmp_path):
    from fedjax_sim.config import ConfigError
    from fedjax_sim.simulation.loop import run

    overrides = [*loop_overrides(write_arrays(tmp_path / "data.npz")),
                 "execution.rounds_per_call=4", "execution.data_placement=host"]
    with pytest.raises(ConfigError, match="'execution.rounds_per_call'.*on the device.*"
                                          "execution.data_placement: device"):
        run(None, overrides=overrides, workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_divergence_names_the_same_round_as_one_round_per_call(tmp_path):
    """The loss overflows in round 2, inside the call of rounds 2-5 for k = 4."""
    from fedjax_sim.simulation.loop import DivergenceError, run

    overrides = [*loop_overrides(write_arrays(tmp_path / "data.npz")),
                 "client.optimizer.learning_rate=1e19", "server.optimizer.learning_rate=1e19"]
    messages = []
    for k in (1, 4):
        with pytest.raises(DivergenceError) as error:
            run(None, overrides=[*overrides, f"execution.rounds_per_call={k}"],
                workdir=tmp_path / f"k{k}")
        messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[0].startswith("round 2: ")
