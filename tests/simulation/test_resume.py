"""Checkpoints, resume and divergence, checked against uninterrupted runs of the same config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from fedjax_sim.cli import main
from fedjax_sim.config import load_config
from fedjax_sim.simulation.checkpoint import Checkpointer
from fedjax_sim.simulation.loop import build_experiment

TINY = ["cohort.size=3", "client.local_steps=3", "model.hidden=16", "eval.every=1000",
        "eval.max_examples=200", "log.every=1", "log.progress=false", "log.plot=false"]


def final_state(workdir: Path, overrides):
    experiment = build_experiment(load_config(None, overrides))
    checkpointer = Checkpointer(workdir / "checkpoints")
    state, host = checkpointer.restore(experiment.init_state())
    checkpointer.close()
    return jax.device_get(state), host


def metric_rows(workdir: Path):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    overrides = [*TINY, "rounds=90", "checkpoint.every=7"]
    command = [sys.executable, "-m", "fedjax_sim.cli", "demo", *overrides]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--workdir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:  # kill once some checkpoints exist, mid-round
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 25:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    rows_at_kill = len(metric_rows(killed))
    assert 25 <= rows_at_kill < 90, "the run must be killed in the middle"

    resumed = subprocess.run([*command, "--workdir", str(killed)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round" in resumed.stdout
    reference = tmp_path / "reference"
    assert main(["demo", *overrides, "--workdir", str(reference)]) == 0

    state, host = final_state(killed, overrides)
    state_ref, _ = final_state(reference, overrides)
    assert int(state.round) == 90
    assert_bitwise_equal(state, state_ref)
    rows, rows_ref = metric_rows(killed), metric_rows(reference)
    assert [r["round"] for r in rows] == list(range(1, 91))  # each round exactly once
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in rows_ref]
    assert host["metrics_offset"] == (killed / "metrics.jsonl").stat().st_size


def test_resume_in_process_matches_an_uninterrupted_run(tmp_path):
    """A run stopped by a callback and run again ends where an uninterrupted run ends."""
    from fedjax_sim.simulation.loop import run

    overrides = [*TINY, "rounds=12", "checkpoint.every=5"]
    stopped = run(None, overrides=overrides, workdir=tmp_path / "a",
                  callbacks=[lambda row, state: row["round"] >= 8])
    assert stopped.history[-1]["round"] == 8
    resumed = run(None, overrides=overrides, workdir=tmp_path / "a")
    reference = run(None, overrides=overrides, workdir=tmp_path / "b")
    assert_bitwise_equal(resumed.state, reference.state)
    assert [r["round"] for r in metric_rows(tmp_path / "a")] == list(range(1, 13))


# orbax's background writer threads may still report the aborted save (e.g. "Event loop is
# closed") after the test body returns; what matters is what is left on disk.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path):
    experiment = build_experiment(load_config(None, TINY))
    state = experiment.init_state()
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
    checkpointer.save(4, state, {"metrics_offset": 10})
    # The JSON item fails after the arrays were written (under load, orbax's array writer may
    # report its own failure first, once the tmp dir it wrote into has been cleaned up).
    with pytest.raises((TypeError, ValueError)):
        checkpointer.save(8, state, {"metrics_offset": object()})
    checkpointer.close()
    reopened = Checkpointer(tmp_path / "checkpoints", keep=3)
    assert reopened.latest_round() == 4
    restored, host = reopened.restore(state)
    assert host == {"metrics_offset": 10}
    assert_bitwise_equal(restored, state)
    reopened.close()


def test_another_config_in_a_used_workdir_is_refused_unless_overwrite(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    assert main(["demo", *TINY, "rounds=2", "--workdir", workdir]) == 0
    before = metric_rows(tmp_path / "w")
    assert main(["demo", *TINY, "rounds=2", "seed=7", "--workdir", workdir]) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config" in err and "seed: 7" in err
    assert metric_rows(tmp_path / "w") == before  # the old run is untouched
    assert main(["demo", *TINY, "rounds=2", "seed=7", "--workdir", workdir, "--overwrite"]) == 0
    assert metric_rows(tmp_path / "w") != before


def test_divergence_stops_with_the_round_and_metric_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys):
    workdir = tmp_path / "w"
    overrides = [*TINY, "rounds=40", "checkpoint.every=1", "log.every=1",
                 "server.optimizer.learning_rate=1e36"]
    assert main(["demo", *overrides, "--workdir", str(workdir)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round" in err
    assert "train/loss" in err or "NaN/inf values" in err
    bad_round = int(err.split("round ")[1].split(":")[0])
    state, host = final_state(workdir, overrides)
    assert int(state.round) == bad_round - 1  # the newest checkpoint is the last good round
    for leaf in jax.tree.leaves(state.algorithm.params):
        assert np.isfinite(leaf).all()
    assert not (workdir / "summary.json").exists()
    assert os.path.getsize(workdir / "metrics.jsonl") == host["metrics_offset"]


def test_nonfinite_state_is_divergence_even_when_the_loss_is_finite():
    from fedjax_sim.simulation.loop import DivergenceError, _check_finite
    from fedjax_sim.simulation.round_step import count_nonfinite

    tree = {"w": np.array([1.0, np.inf, np.nan], np.float32), "count": np.array([3], np.int32)}
    assert float(count_nonfinite(tree)) == 2.0
    # a large per-client store is checked at the cohort's rows (the only rows a round writes)
    store = np.zeros((1024, 4096), np.float32)
    store[5, 7] = np.nan
    store[9, 0] = np.inf
    assert float(count_nonfinite({"store": store})) == 2.0
    assert float(count_nonfinite({"store": store}, 1024, np.array([5, 3]))) == 1.0
    assert float(count_nonfinite({"store": store}, 1024, np.array([1, 3]))) == 0.0
    small = np.full((1024, 2), np.nan, np.float32)  # small leaves are always checked whole
    assert float(count_nonfinite({"w": small}, 1024, np.array([1]))) == 2048.0
    with pytest.raises(DivergenceError, match="round 7: the state .* holds 2 NaN/inf values"):
        _check_finite(7, {"train/loss": 0.5, "state/nonfinite": 2.0})


def test_running_a_finished_run_again_keeps_its_timings(tmp_path, capsys):
    """The same command after the last round resumes with nothing to train: summary.json keeps
    the timings of the process that trained (it had first_round_seconds 0 and a seconds per
    round of train_seconds / (rounds - 1), 15x the measured one, in a trial)."""
    args = ["demo", *TINY, "rounds=3", "--workdir", str(tmp_path / "w")]
    assert main(args) == 0
    trained = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert trained["first_round_seconds"] > 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming after round 3" in out
    again = json.loads((tmp_path / "w" / "summary.json").read_text())
    for key in ("first_round_seconds", "train_seconds", "seconds_per_round",
                "rounds_per_second"):
        assert again[key] == trained[key], key
    assert f"first round {trained['first_round_seconds']:.1f} s" in out
    assert again["final"] == trained["final"]


def test_a_run_started_again_with_only_display_keys_changed_resumes(tmp_path, capsys):
    """log.progress and log.plot change no result: the same workdir resumes (here: nothing
    left to train) instead of refusing the run as a different config."""
    workdir = tmp_path / "w"
    shown = [*TINY, "rounds=2", "log.progress=false", "log.plot=false"]
    assert main(["demo", *shown, "--workdir", str(workdir)]) == 0
    before = metric_rows(workdir)
    assert main(["demo", *TINY, "rounds=2", "log.progress=true", "log.plot=true",
                 "--workdir", str(workdir)]) == 0
    assert "different config" not in capsys.readouterr().err
    assert metric_rows(workdir) == before  # no round trained again
    saved = yaml.safe_load((workdir / "config.yaml").read_text())
    assert saved["log"]["progress"] is True and saved["log"]["plot"] is True


def test_a_one_round_run_reports_no_steady_round_time(tmp_path, capsys):
    """One round is the compiling first round only: summary.json has no seconds per round
    (null) rather than 0, and the last line says "1 round" without a pace."""
    workdir = tmp_path / "w"
    assert main(["demo", *TINY, "rounds=1", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["seconds_per_round"] is None and summary["rounds_per_second"] is None
    assert summary["first_round_seconds"] > 0
    out = capsys.readouterr().out
    assert "done: 1 round in" in out and "s/round" not in out


def test_more_rounds_of_a_finished_run_resume_and_equal_the_longer_run(tmp_path, capsys):
    """rounds=2, then rounds=4 in the same workdir: the run resumes after round 2 and its
    metrics equal those of one uninterrupted 4-round run (wall times aside; round 2 also keeps
    the evaluation that ended the first run); fewer rounds are still refused."""
    extended, reference = tmp_path / "extended", tmp_path / "reference"
    assert main(["demo", *TINY, "rounds=2", "--workdir", str(extended)]) == 0
    assert main(["demo", *TINY, "rounds=4", "--workdir", str(extended)]) == 0
    assert main(["demo", *TINY, "rounds=4", "--workdir", str(reference)]) == 0

    rows, reference_rows = metric_rows(extended), metric_rows(reference)
    assert len(rows) == len(reference_rows) == 4
    for row, expected in zip(rows, reference_rows, strict=True):
        assert {k: row[k] for k in expected if k != "wall_time"} == {
            k: v for k, v in expected.items() if k != "wall_time"}
    assert "test/accuracy" in rows[1]  # the first run's final evaluation
    capsys.readouterr()
    assert main(["demo", *TINY, "rounds=3", "--workdir", str(extended)]) == 2
    assert "different config" in capsys.readouterr().err


def test_only_more_rounds_without_a_calibrated_epsilon_extend_a_run():
    from fedjax_sim.simulation.loop import _continues

    old = "rounds: 2\nseed: 0\nlog: {every: 1, progress: false}\n"
    assert _continues(old, "rounds: 4\nseed: 0\nlog: {every: 1, progress: true}\n")
    assert not _continues(old, "rounds: 1\nseed: 0\nlog: {every: 1, progress: false}\n")
    assert not _continues(old, "rounds: 4\nseed: 1\nlog: {every: 1, progress: false}\n")
    calibrated = "rounds: {}\nprivacy: {{target_epsilon: 4.0}}\n"
    assert not _continues(calibrated.format(2), calibrated.format(4))
    fixed_noise = "rounds: {}\nprivacy: {{noise_multiplier: 1.0}}\n"
    assert _continues(fixed_noise.format(2), fixed_noise.format(4))
