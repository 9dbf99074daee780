"""Sweeps: every configuration of a sweep equals the same configuration run alone with `run`
(the independent reference: its own process of building, compiling and stepping), a diverging
configuration is masked and reported without stopping the others, a killed sweep resumes, and
the outputs (sweep.csv, sweep.json, best.yaml, the plot) say what was run."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import yaml
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.cli import main
from fedjax_sim.config import ConfigError, load_config
from fedjax_sim.simulation.loop import run
from fedjax_sim.sweeps import build_groups, expand, load_sweep, seed_layout, sweep, sweep_spec

# The demo (Shakespeare by role, shipped in the repo) made tiny.
TINY = {"name": "tiny_sweep", "rounds": 4, "cohort": {"size": 3},
        "client": {"local_steps": 2},
        "model": {"name": "char_lstm", "hidden": 16},
        "eval": {"every": 2, "max_examples": 300}, "log": {"every": 1, "progress": False,
                                                           "plot": False},
        "checkpoint": {"every": 2}}


def _write(tmp_path, sweep_section, **changes):
    data = {**TINY, **changes, "sweep": sweep_section}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_rows(got, expected, rtol=1e-5, atol=1e-6):
    assert [r["round"] for r in got] == [r["round"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert set(a) == set(b), set(a) ^ set(b)
        for key in a:
            if key != "wall_time":
                np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


def test_expand_grid_random_and_seeds():
    spec = sweep_spec({"grid": {"client.optimizer.learning_rate": [0.1, 1.0],
                                "cohort.size": [2, 3]},
                       "random": {"num": 3, "keys": {"algorithm.mu": {"log_uniform": [1e-3, 1]},
                                                     "client.batch_size": {"choice": [4, 8]}}},
                       "seeds": 2})
    points = expand({**TINY, "seed": 5, "algorithm": {"name": "fed_prox"}}, spec)
    assert len(points) == 2 * 2 * 3 * 2
    assert [p.index for p in points] == list(range(24))
    assert {p.config.seed for p in points} == {5, 6}  # offsets from the config's seed
    combos = {(p.config.client.optimizer.learning_rate, p.config.cohort.size) for p in points}
    assert combos == {(0.1, 2), (0.1, 3), (1.0, 2), (1.0, 3)}
    mus = [p.config.algorithm.options["mu"] for p in points]
    assert all(1e-3 <= mu <= 1 for mu in mus) and len(set(mus)) == 3
    assert {p.config.client.batch_size for p in points} <= {4, 8}



def test_a_swept_seed_sets_each_configurations_seed():
    # grid: {seed: [3, 7]} must train seeds 3 and 7 (it silently trained the config's seed twice,
    # reporting both as seed 5); sweep.seeds' offsets are added to the swept seed.
    points = expand({**TINY, "seed": 5}, sweep_spec({"grid": {"seed": [3, 7]}}))
    assert [(p.values["seed"], p.config.seed) for p in points] == [(3, 3), (7, 7)]
    points = expand({**TINY, "seed": 5}, sweep_spec({"grid": {"seed": [3, 7]}, "seeds": 2}))
    assert [p.config.seed for p in points] == [3, 4, 7, 8]
    points = expand({**TINY, "seed": 5},
                    sweep_spec({"random": {"num": 2, "keys": {"seed": {"choice": [11]}}}}))
    assert [p.config.seed for p in points] == [11, 11]
    with pytest.raises(ConfigError, match="'seed': expected an integer"):
        expand(TINY, sweep_spec({"grid": {"seed": [1.5]}}))


@pytest.mark.parametrize("section, message", [
    ({"gird": {}}, "did you mean 'grid'"),
    ({"grid": {"rounds": 3}}, "non-empty list"),
    ({"seeds": 0}, "expected >= 1"),
    ({"mode": "maximum"}, "'sweep.mode'"),
    ({"random": {"num": 2, "keys": {"rounds": {"normal": [0, 1]}}}}, "log_uniform"),
    ({"random": {"num": 2, "keys": {"x": {"log_uniform": [0, 1]}}}}, "low > 0"),
    ({"devices": "all"}, "'sweep.devices': expected an integer >= 1 or 'auto'"),
    ({"devices": 0}, "'sweep.devices': expected an integer >= 1 or 'auto'"),
])
def test_bad_sweep_sections_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        sweep_spec(section)


def test_a_sweep_config_given_to_run_says_to_use_sweep(tmp_path):
    path = _write(tmp_path, {"seeds": 2})
    with pytest.raises(ConfigError, match="fedjax-sim sweep"):
        load_config(path)


def test_sweep_equals_separate_runs_and_masks_a_diverging_configuration(tmp_path):
    # Three learning rates x 2 seeds: one program (the rates and seeds are arrays of the state);
    # the rate 3e38 diverges in round 1 and is frozen and reported, the others go on.
    # vmap here (a batched program), its 6 configurations sharded over 4 (fake CPU) devices,
    # padded to 8; the resume test below runs auto: lax.map on CPU, one device.
    path = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5, 2.0, 3.0e38]},
                             "seeds": 2, "execution": "vmap", "devices": 4})
    result = sweep(path, workdir=tmp_path / "sweep")
    assert result.summary["programs"] == 1 and result.summary["configurations"] == 6
    status = {row["config"]: row["status"] for row in result.rows}
    assert status == {"000": "ok", "001": "ok", "002": "ok", "003": "ok",
                      "004": "diverged at round 1", "005": "diverged at round 1"}
    assert _rows(tmp_path / "sweep" / "configs" / "004" / "metrics.jsonl") == []
    # Two of the configurations, run alone (other learning rate and seed), agree row by row.
    data, spec = load_sweep(path)
    points = expand(data, spec)
    # The same with lax.map, its configurations split over 4 devices (each maps over its own,
    # padded to 8): the same rows.
    mapped = sweep(path, ["sweep.execution=map"], workdir=tmp_path / "mapped")
    assert mapped.summary["execution"] == "map" and mapped.summary["devices"] == 4
    assert {row["config"]: row["status"] for row in mapped.rows} == status
    for label in ("001", "002"):
        point = next(p for p in points if p.label == label)
        alone = run(point.config, workdir=tmp_path / f"alone_{label}")
        for folder in ("sweep", "mapped"):
            _assert_same_rows(_rows(tmp_path / folder / "configs" / label / "metrics.jsonl"),
                              alone.history)
    # sweep.csv: one row per configuration with its values; best.yaml runs the best combination.
    with open(tmp_path / "sweep" / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["client.optimizer.learning_rate"] for r in table] == \
        ["0.5", "0.5", "2.0", "2.0", "3e+38", "3e+38"]
    finals = {}
    for row in result.rows[:4]:
        finals.setdefault(row["client.optimizer.learning_rate"], []).append(
            row["final test/accuracy"])
    best_lr = max(finals, key=lambda lr: np.mean(finals[lr]))
    assert result.best["values"] == {"client.optimizer.learning_rate": best_lr}
    assert math.isclose(result.best["mean"], float(np.mean(finals[best_lr])))
    best = load_config(tmp_path / "sweep" / "best.yaml")
    assert best.client.optimizer.learning_rate == best_lr and best.seed == 0
    combos = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["combinations"]
    assert [c["diverged"] for c in combos] == [False, False, True]


def test_a_killed_sweep_resumes_from_its_checkpoint(tmp_path):
    # lax.map in chunks of 2 configurations (each chunk vmapped)
    path = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5, 2.0, 1.0]},
                             "batch_size": 2},
                  model={"name": "char_lstm", "hidden": 8})
    workdir = tmp_path / "sweep"
    sweep(path, workdir=workdir)
    labels = ("000", "001", "002")
    full = {label: _rows(workdir / "configs" / label / "metrics.jsonl") for label in labels}
    # As if killed after the checkpoint of round 2: the round-4 checkpoint never got written.
    shutil.rmtree(workdir / "checkpoints" / "group_00" / "4")
    for label in labels:  # and round 3 was logged before the kill
        log = workdir / "configs" / label / "metrics.jsonl"
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:3]))
    result = sweep(path, workdir=workdir)
    for label in labels:
        _assert_same_rows(_rows(workdir / "configs" / label / "metrics.jsonl"), full[label],
                          rtol=0, atol=0)
    assert [r["status"] for r in result.rows] == ["ok", "ok", "ok"]


def test_shape_changing_keys_split_the_sweep_into_programs_through_the_cli(tmp_path, capsys):
    path = _write(tmp_path, {"grid": {"model.hidden": [8, 16]}}, rounds=2)
    code = main(["sweep", str(path), "log.plot=true", "--grid",
                 "client.optimizer.learning_rate=0.5,1.0", "--workdir", str(tmp_path / "cli")])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 configurations in 2 program(s)" in out
    assert (tmp_path / "cli" / "sweep.png").stat().st_size > 1000
    with open(tmp_path / "cli" / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["model.hidden"], r["client.optimizer.learning_rate"], r["group"]) for r in table] \
        == [("8", "0.5", "0"), ("8", "1.0", "0"), ("16", "0.5", "1"), ("16", "1.0", "1")]


def test_sweep_bad_input_exits_2(tmp_path, capsys):
    path = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5]}})
    assert main(["sweep", str(path), "--grid", "client.optimizer.learning_rate=0.5,",
                 "--workdir", str(tmp_path / "x")]) == 2
    assert "empty value" in capsys.readouterr().err
    assert main(["sweep", str(path), "--seeds", "0", "--workdir", str(tmp_path / "y")]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_grouping_follows_what_the_program_holds_as_arrays():
    # FedProx's mu, FedDyn's alpha and q-FFL's Lipschitz constant live in their states (one
    # program for two values); the client batch size is a shape (two programs): the grouping
    # is checked from the programs.
    def programs(algorithm, key, values=(0.01, 0.1)):
        spec = sweep_spec({"grid": {key: list(values)}})
        points = expand({**TINY, "algorithm": {"name": algorithm}}, spec)
        return len(build_groups(points))

    assert programs("fed_prox", "algorithm.mu") == 1
    assert programs("fed_dyn", "algorithm.alpha") == 1
    assert programs("q_ffl", "algorithm.lipschitz", (5.0, 20.0)) == 1
    assert programs("fed_avg", "client.batch_size", (4, 8)) == 2


def test_seed_layout_puts_each_keys_configurations_in_one_padded_row():
    a, b, c = (np.array([0, k], np.uint32) for k in (1, 2, 3))
    slots, real, seeds = seed_layout([a, b, a, c, c, a])
    assert seeds == 3
    assert slots == [0, 2, 5, 1, 1, 1, 3, 4, 4]
    assert real == [True, True, True, True, False, False, True, True, False]


def test_by_seed_equals_separate_runs_and_masks_a_diverging_configuration(tmp_path):
    # by_seed: each seed's three learning rates share one cohort and batch plan a round; the
    # rate 3e38 diverges in round 1 and is frozen, the others go on and equal their runs alone.
    path = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5, 2.0, 3.0e38]},
                             "seeds": 2, "execution": "by_seed"})
    result = sweep(path, workdir=tmp_path / "sweep")
    assert result.summary["execution"] == "by_seed"
    status = {row["config"]: row["status"] for row in result.rows}
    assert status == {"000": "ok", "001": "ok", "002": "ok", "003": "ok",
                      "004": "diverged at round 1", "005": "diverged at round 1"}
    data, spec = load_sweep(path)
    points = expand(data, spec)
    for label in ("000", "003"):  # seed 0 and seed 1, other learning rates
        point = next(p for p in points if p.label == label)
        alone = run(point.config, workdir=tmp_path / f"alone_{label}")
        _assert_same_rows(_rows(tmp_path / "sweep" / "configs" / label / "metrics.jsonl"),
                          alone.history)
    with pytest.raises(ConfigError, match="sweep.execution"):
        sweep(path, ["sweep.devices=2"], workdir=tmp_path / "two_devices")


@needs_shared_data(*FASHION_MNIST_FILES)
def test_configurations_with_other_training_data_of_equal_shapes_train_apart(tmp_path):
    # A label-flipping attack poisons each configuration's data by its own fraction: equal
    # shapes, so one program, but other data; each must train on its own (two groups) and
    # equal its run alone.
    path = _write(tmp_path, {"grid": {"attack.fraction": [0.2, 0.6]}}, rounds=2,
                  dataset={"name": "fashion_mnist", "partition": "iid", "num_clients": 20,
                           "data_dir": str(SHARED_DATA)},
                  model={"name": "logistic"}, attack={"name": "label_flip"},
                  cohort={"size": 4}, eval={"every": 2, "max_examples": 500})
    data, spec = load_sweep(path)
    points = expand(data, spec)
    assert len(build_groups(points)) == 2
    sweep(path, workdir=tmp_path / "sweep")
    alone = run(points[1].config, workdir=tmp_path / "alone")
    _assert_same_rows(_rows(tmp_path / "sweep" / "configs" / "001" / "metrics.jsonl"),
                      alone.history)


def test_a_misspelt_metric_is_an_error_and_no_best_yaml_is_claimed(tmp_path, capsys):
    """No configuration reports 'test/acc' (the metrics are 'test/accuracy', ...): the sweep
    trains, keeps sweep.csv and sweep.json, writes no best.yaml and must not say it did, and
    exits 2 with one line naming the key and the metric it meant."""
    path = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5]},
                             "metric": "test/acc"}, rounds=2)
    code = main(["sweep", str(path), "--workdir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and "config key 'sweep.metric'" in err
    assert "did you mean 'test/accuracy'?" in err
    assert (tmp_path / "w" / "sweep.csv").exists() and (tmp_path / "w" / "sweep.json").exists()
    assert not (tmp_path / "w" / "best.yaml").exists()
    assert "best.yaml" not in out


@pytest.mark.parametrize("value", ["abc", 1.5, -1, True])
def test_a_bad_random_seed_names_the_key(value):
    with pytest.raises(ConfigError, match="'sweep.random_seed': expected an integer >= 0"):
        sweep_spec({"random_seed": value})


def test_overwrite_replaces_the_sweep_and_keeps_the_users_files(tmp_path, capsys):
    """--overwrite replaces another sweep's outputs, as `run --overwrite` replaces a run's, and
    leaves the user's own files in the workdir alone (it deleted the whole folder)."""
    workdir = tmp_path / "w"
    first = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.5, 1.0]}}, rounds=1)
    assert main(["sweep", str(first), "--workdir", str(workdir)]) == 0
    (workdir / "notes.txt").write_text("mine")
    (workdir / "analysis").mkdir()
    (workdir / "analysis" / "table.csv").write_text("1,2\n")
    second = _write(tmp_path, {"grid": {"client.optimizer.learning_rate": [0.25]}}, rounds=1)
    assert main(["sweep", str(second), "--workdir", str(workdir)]) == 2  # refused without it
    assert main(["sweep", str(second), "--workdir", str(workdir), "--overwrite"]) == 0
    capsys.readouterr()
    assert (workdir / "notes.txt").read_text() == "mine"
    assert (workdir / "analysis" / "table.csv").read_text() == "1,2\n"
    assert sorted(p.name for p in (workdir / "configs").iterdir()) == ["000"]  # 001 is gone
    with open(workdir / "sweep.csv") as handle:
        assert [row["client.optimizer.learning_rate"] for row in csv.DictReader(handle)] == [
            "0.25"]


def test_grid_values_may_be_lists_and_bad_yaml_is_a_config_error():
    """--grid split on every comma: 'model.hidden=[32,32],[64]' became '[32', '32]', '[64]'
    and YAML's traceback (exit 1)."""
    from fedjax_sim.sweeps import parse_grid_option

    assert parse_grid_option("model.hidden=[32,32],[64]") == ("model.hidden", [[32, 32], [64]])
    assert parse_grid_option("algorithm=fed_avg,fed_prox") == ("algorithm",
                                                              ["fed_avg", "fed_prox"])
    assert parse_grid_option("x.y={a: 1, b: 2},3") == ("x.y", [{"a": 1, "b": 2}, 3])
    with pytest.raises(ConfigError, match=r"--grid 'a=0.1,\[0.2': value '\[0.2' is not valid"):
        parse_grid_option("a=0.1,[0.2")
    with pytest.raises(ConfigError, match="malformed override 'foo'"):
        parse_grid_option("foo")
