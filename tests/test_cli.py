"""The command line end to end: a tiny real-data config runs; bad input exits 2 in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.cli import main

TINY = ["rounds=4", "cohort.size=3", "client.local_steps=2", "model.hidden=16",
        "eval.every=2", "eval.max_examples=300", "log.every=2", "log.progress=false"]


def test_tiny_shakespeare_run_through_the_cli(tmp_path, capsys):
    assert main(["demo", *TINY, "--workdir", str(tmp_path / "run")]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert {"train/loss", "train/accuracy", "wall_time"} <= set(rows[0])
    assert "test/accuracy" in rows[1] and "test/accuracy" in rows[3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 4 and 0.0 <= summary["final"]["test/accuracy"] <= 1.0
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").exists()
    assert "workdir" in capsys.readouterr().out


@needs_shared_data(*FASHION_MNIST_FILES)
def test_fashion_mnist_config_finds_data_through_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))
    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_fedavg.yaml"
    args = ["run", str(config), "rounds=2", "log.progress=false", "eval.every=2",
            "eval.max_examples=500", "--workdir", str(tmp_path / "fm")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "fm" / "summary.json").read_text())
    assert summary["final"]["test/accuracy"] > 0.3  # 2 rounds of FedAvg beat chance (0.1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "dataset.name=shakespear"], "did you mean 'shakespeare'"),
        (["demo", "dataset.sequence_lenght=5"], "did you mean 'dataset.sequence_length'"),
        (["demo", "model.name=resnet"], "unknown model"),
        (["demo", "model.hiden=3"], "did you mean 'model.hidden'"),
        (["demo", "client.optimizer.name=adamm"], "did you mean 'adam'"),
        (["demo", "client.optimizer.momentun=0.9"],  # the key as the user writes it
         "unknown config key 'client.optimizer.momentun': optax.sgd has no option 'momentun'; "
         "did you mean 'client.optimizer.momentum'?"),
        (["demo", "cohort.size=100000"], "'cohort.size': 100000 is larger than the number"),
        (["demo", "dataset.test_fraction=1.5"], "test_fraction"),
        (["run", "no/such/config.yaml"], "does not exist"),
        (["bogus"], "invalid choice"),
        (["run"], "the following arguments are required"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing left that looks like output


def test_missing_data_file_says_where_to_put_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(Path(__file__).resolve().parents[1] / "configs" /
                            "fashion_mnist_fedavg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "FEDJAX_SIM_DATA" in err
    assert "Traceback" not in err


def test_console_script_entry_point(tmp_path):
    """The installed `fedjax-sim` command (a real subprocess) runs and reports errors."""
    exe = Path(sys.executable).with_name("fedjax-sim")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedjax_sim.cli"]
    result = subprocess.run([*command, "run", str(tmp_path / "x.yaml")], capture_output=True,
                            text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_tensorboard_events_are_written_when_asked(tmp_path):
    assert main(["demo", *TINY, "log.tensorboard=true", "log.plot=false",
                 "--workdir", str(tmp_path / "tb")]) == 0
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert not (tmp_path / "tb" / "learning_curve.png").exists()


@pytest.mark.parametrize("args, flag", [
    (["demo", "rounds=1"], "--workdir"),
    (["sweep", "configs/sweeps/fashion_mnist_fedavg_lr.yaml"], "--workdir"),
    (["analytics", "configs/analytics/shakespeare_line_lengths.yaml"], "--workdir"),
    (["data", "stats", "configs/shakespeare_fedavg.yaml"], "--out"),
    (["data", "convert", "configs/shakespeare_fedavg.yaml"], "--out"),
])
@pytest.mark.parametrize("below", [False, True], ids=["the-file", "below-the-file"])
def test_a_file_where_the_output_folder_goes_is_a_one_line_error(args, flag, below, tmp_path,
                                                                 capsys, monkeypatch):
    """--workdir / --out naming an existing file (or a path below one) was FileExistsError's
    traceback from mkdir; the file is left as it was."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    target = blocker / "run" if below else blocker
    assert main([*args, flag, str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{flag} {str(target)!r}: expected a folder" in err
    assert blocker.read_text() == "mine"


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    """`run CONFIG --workdir DIR rounds=1` (overrides after a flag) said 'unrecognized
    arguments: rounds=1'; the overrides after the flags apply after those before them."""
    import yaml

    workdir = tmp_path / "w"
    args = ["demo", "rounds=5", "--workdir", str(workdir), "rounds=1", "cohort.size=2",
            "client.local_steps=1", "model.hidden=8", "eval.max_examples=50",
            "log.progress=false", "log.plot=false"]
    assert main(args) == 0, capsys.readouterr().err
    saved = yaml.safe_load((workdir / "config.yaml").read_text())
    assert (saved["rounds"], saved["cohort"]["size"], saved["model"]["hidden"]) == (1, 2, 8)
    assert main(["demo", "--workdir", str(tmp_path / "x"), "rounds=1", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "shakespeare_fedavg.yaml")
    assert main(["run", demo, "--workdir", str(tmp_path / "x"), "rounds=1", "stray"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
