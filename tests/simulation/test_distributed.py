"""Many processes on ``jax.distributed`` (localhost, CPU collectives through gloo), data split
by clients over devices, and a lost process: against runs in one process and one device."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from helpers import (
    FASHION_MNIST_FILES,
    REPO,
    SHARED_DATA,
    needs_shared_data,
    tiny_data,
    tiny_model,
)

from fedjax_sim.algorithms.fed_avg import fed_avg
from fedjax_sim.core import ShardedData
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import blocked_uniform_sampler, client_blocks, uniform_sampler
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.backend import Backend
from fedjax_sim.simulation.loop import run
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

WORKER = Path(__file__).with_name("distributed_worker.py")
# Small, fast versions of the shipped configs (the numbers do not matter, only equality).
FAST = ["rounds=4", "eval.every=2", "log.every=1", "log.progress=false", "log.plot=false",
        "client.local_steps=4", "checkpoint.every=2", f"dataset.data_dir={SHARED_DATA}"]
CONFIGS = {
    "fed_avg": ("configs/fashion_mnist_fedavg.yaml", []),
    "dp_fed_avg": ("configs/fashion_mnist_dp_fedavg.yaml", ["dataset.num_clients=200",
                                                            "cohort.size=20"]),
    # SCAFFOLD with its control variates split over the 4 devices of the 2 processes (25
    # clients each); replicated per-client state is FedAvg's and DP-FedAvg's layout, and
    # SCAFFOLD's replicated store against one device is tested with 4 devices in one process
    "scaffold_sharded_state": ("configs/fashion_mnist_scaffold.yaml",
                               ["client.weighting=uniform", "execution.client_state=sharded"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(spec: list[dict], num_processes: int, devices_per_process: int = 2,
           heartbeat: int = 30) -> list[subprocess.Popen]:
    port = _free_port()
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "device_count" not in f)
    processes = []
    for process_id in range(num_processes):
        env = {**os.environ,
               "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count="
                            f"{devices_per_process}",
               "FEDJAX_SIM_COORDINATOR": f"localhost:{port}",
               "FEDJAX_SIM_NUM_PROCESSES": str(num_processes),
               "FEDJAX_SIM_PROCESS_ID": str(process_id),
               "FEDJAX_SIM_HEARTBEAT_TIMEOUT": str(heartbeat)}
        processes.append(subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def _kill(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _wait(processes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outputs = []
    try:
        for p in processes:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        _kill(processes)
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _params(path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _reference(config: str, overrides: list[str], workdir: Path) -> list[np.ndarray]:
    """The same run in this process, on one device."""
    result = run(REPO / config, overrides=overrides, workdir=workdir)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(result.state.algorithm.params)]


@needs_shared_data(*FASHION_MNIST_FILES)
def test_two_processes_equal_one(tmp_path):
    """2 processes x 2 CPU devices (a 4-device global mesh, the cohort split over both
    processes, all-reduces through gloo) give the parameters of 1 process on 1 device, for
    FedAvg, SCAFFOLD (per-client control variates, replicated or split over the processes'
    devices) and DP-FedAvg (Poisson cohorts, clipping, server noise); and process 0 alone
    writes the metrics."""
    spec = [{"config": str(REPO / config), "overrides": FAST + extra,
             "workdir": str(tmp_path / f"{name}-2p"), "out": str(tmp_path / f"{name}.npz")}
            for name, (config, extra) in CONFIGS.items()]
    processes = _start(spec, num_processes=2)
    try:  # the references run here while the two processes train
        references = {name: _reference(config, FAST + extra, tmp_path / f"{name}-1p")
                      for name, (config, extra) in CONFIGS.items()}
    except BaseException:
        _kill(processes)
        raise
    outputs = _wait(processes)
    assert "done: 4 rounds" in outputs[0] and "done:" not in outputs[1]  # process 0 reports
    for name in CONFIGS:
        got = _params(tmp_path / f"{name}.npz")
        assert len(got) == len(references[name])
        for a, b in zip(got, references[name], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=name)
        one = (tmp_path / f"{name}-1p" / "metrics.jsonl").read_text().splitlines()
        two = (tmp_path / f"{name}-2p" / "metrics.jsonl").read_text().splitlines()
        assert len(two) == len(one) == 4
        for row_one, row_two in zip(one, two, strict=True):
            row_one, row_two = json.loads(row_one), json.loads(row_two)
            assert row_one.keys() == row_two.keys()
            for key in row_one.keys() - {"wall_time"}:
                assert row_two[key] == pytest.approx(row_one[key], abs=1e-5), (name, key)
        summary = json.loads((tmp_path / f"{name}-2p" / "summary.json").read_text())
        assert summary["placement"]["processes"] == 2 and summary["devices"] == 4


@needs_shared_data(*FASHION_MNIST_FILES)
def test_lost_process_stops_the_others_and_all_resume(tmp_path):
    """Killing one of two processes ends the other with an error within the heartbeat
    timeout (no hang); after all were killed, starting both again resumes from the last
    checkpoint: the rounds after it come out as they did before the kill, bit for bit."""
    config, extra = CONFIGS["fed_avg"]
    overrides = [o for o in FAST if not o.startswith(("rounds", "checkpoint"))] + extra + [
        "rounds=24", "checkpoint.every=5"]
    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    spec = [{"config": str(REPO / config), "overrides": overrides, "workdir": str(workdir),
             "out": str(tmp_path / "resumed.npz")}]
    processes = _start(spec, num_processes=2, heartbeat=5)
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8):
            assert time.monotonic() < deadline, "no 8 rounds after 300 s"
            assert all(p.poll() is None for p in processes), (
                processes[0].communicate()[0][-3000:])
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, _ = processes[0].communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        _kill(processes)
    assert processes[0].returncode != 0, out[-2000:]
    assert waited < 60, f"the surviving process took {waited:.0f} s to stop"
    # The coordination service reports the missing heartbeat; a kill in the middle of an
    # all-reduce can instead end the survivor with gloo's transport error first.
    assert any(sign in out for sign in ("heartbeat", "another task died", "[enforce fail at",
                                        "Connection closed by peer", "Connection reset")), (
        out[-2000:])
    before = {}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        before[row["round"]] = row
    checkpoints = workdir / "checkpoints"
    last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 5 <= last < max(before) < 24

    _wait(_start(spec, num_processes=2))  # the same command again: resumes
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(1, 25))  # cut back, then continued
    for row in rows:
        if last < row["round"] <= max(before):  # computed twice: before the kill and after
            old = before[row["round"]]
            assert {k: v for k, v in row.items() if k != "wall_time"} == {
                k: v for k, v in old.items() if k != "wall_time"}, row["round"]
    assert _params(tmp_path / "resumed.npz")  # process 0 saved the final params


# --- Data split by clients over devices (one process, 4 CPU devices) -------------------------

def _rounds(backend: Backend, sampler, data, num_rounds=3):
    model = tiny_model()
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    step = build_round_step(algorithm, data, schedule, sampler, 4, backend=backend)
    state = step.place(init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))),
                                             1))
    for _ in range(num_rounds):
        state, _ = step(state)
    return jax.device_get(state.algorithm.params), step


def test_sharded_data_equals_replicated_data():
    """``data_placement="sharded"`` on 4 devices (each holding its block of clients only)
    trains what the same blocked sampler trains from replicated data on one device."""
    data = tiny_data(sizes=(5, 17, 40, 3, 11, 9, 2, 30, 8, 6, 12, 21))
    sampler = blocked_uniform_sampler(client_blocks(data.num_clients, 4), 4)
    reference, _ = _rounds(Backend(), sampler, data)
    sharded, step = _rounds(Backend(client_mesh(4), "vmap", data_placement="sharded"),
                            sampler, data)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # Device d holds exactly the rows of block d (padded to the largest block).
    assert isinstance(step.data, ShardedData)
    boundaries, offsets = client_blocks(data.num_clients, 4), data.offsets
    x = step.data["x"]
    rows = step.data.rows_per_shard
    assert rows == max(offsets[boundaries[d + 1]] - offsets[boundaries[d]] for d in range(4))
    for shard in x.addressable_shards:
        d = shard.index[0].start // rows
        block = data.arrays["x"][offsets[boundaries[d]]:offsets[boundaries[d + 1]]]
        np.testing.assert_array_equal(np.asarray(shard.data)[:len(block)], block)
        assert shard.data.shape[0] == rows


def test_blocked_sampler_draws_every_block_evenly():
    """k = C / blocks distinct clients from each block, in block order; every client of a
    block equally often (chi-square against the uniform count over 3,000 draws)."""
    boundaries = client_blocks(10, 3)
    assert boundaries.tolist() == [0, 3, 6, 10]
    sample = jax.jit(blocked_uniform_sampler(boundaries, 6))
    draws = np.stack([np.asarray(sample(jax.random.PRNGKey(i))) for i in range(3000)])
    for d in range(3):
        block = draws[:, 2 * d:2 * d + 2]
        assert ((block >= boundaries[d]) & (block < boundaries[d + 1])).all()
        assert (block[:, 0] != block[:, 1]).all()
        counts = np.bincount(block.ravel() - boundaries[d])
        expected = block.size / len(counts)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


def test_sharded_placement_errors():
    data = tiny_data(sizes=(5, 17, 40, 3, 11, 9, 2, 30))
    model = tiny_model()
    algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    with pytest.raises(ValueError, match="blocked_uniform_sampler"):
        build_round_step(algorithm, data, schedule, uniform_sampler(8, 4), 4,
                         backend=Backend(client_mesh(4), data_placement="sharded"))
    with pytest.raises(ValueError, match="multiple of the 4 devices"):
        blocked_uniform_sampler(client_blocks(8, 4), 6)
    with pytest.raises(ValueError, match="splits the clients over the devices of a mesh"):
        Backend(data_placement="sharded")
    with pytest.raises(ValueError, match="not both"):
        build_round_step(algorithm, data, schedule, uniform_sampler(8, 4), 4,
                         backend=Backend(), mesh=client_mesh(4))


@pytest.mark.parametrize("argv, message", [
    (["run", "configs/fashion_mnist_fedavg.yaml", "--coordinator", "localhost:1"],
     "missing: --num-processes, --process-id"),
    (["run", "configs/fashion_mnist_fedavg.yaml", "--coordinator", "localhost",
      "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["run", "configs/fashion_mnist_fedavg.yaml", "--coordinator", "localhost:1",
      "--num-processes", "2", "--process-id", "2"], "0 <= process id < number of processes"),
    (["launch", "-n", "2", "--", "sweep", "x.yaml"], "launch runs 'run CONFIG ...'"),
    (["launch", "-n", "0", "--", "run", "x.yaml"], "--num-processes 0: expected >= 1"),
])
def test_multi_process_flags_are_checked(argv, message, capsys, monkeypatch):
    """Bad multi-process flags: one line naming the flag, exit code 2, nothing started."""
    from fedjax_sim.cli import main

    for name in ("FEDJAX_SIM_COORDINATOR", "FEDJAX_SIM_NUM_PROCESSES", "FEDJAX_SIM_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_single_process_commands_refuse_a_multi_process_environment(capsys, monkeypatch):
    """A sweep started with FEDJAX_SIM_COORDINATOR set would run whole in every process."""
    from fedjax_sim.cli import main

    monkeypatch.setenv("FEDJAX_SIM_COORDINATOR", "localhost:1")
    assert main(["sweep", "configs/sweeps/fashion_mnist_fedavg_lr.yaml"]) == 2
    assert "runs in one process" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")
def test_sharded_client_state_trains_what_replicated_state_trains():
    """SCAFFOLD with its control variates split over 4 devices (12 clients: 3 rows each) ends
    with the one-device state within 1e-6, and the store is still split after the rounds."""
    from fedjax_sim.algorithms.scaffold import scaffold

    data = tiny_data(sizes=(5, 17, 40, 3, 11, 9, 2, 30, 8, 6, 12, 21))
    model = tiny_model()
    algorithm = scaffold(model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                         optax.sgd(1.0), num_clients=data.num_clients)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)

    def train(backend, created_split=False):
        step = build_round_step(algorithm, data, schedule, uniform_sampler(12, 4), 4,
                                backend=backend)
        params = model.init(jax.random.PRNGKey(0))
        if created_split:  # no device ever holds the whole store
            state = step.init_state(algorithm.init, params, jax.random.PRNGKey(1))
            controls = jax.tree.leaves(state.algorithm.client_controls)[0]
            assert {s.data.shape[0] for s in controls.addressable_shards} == {3}
        else:
            state = step.place(init_simulation_state(algorithm.init(params), 1))
        for _ in range(3):
            state, _ = step(state)
        return state.algorithm

    reference = train(Backend())
    sharded = train(Backend(client_mesh(4), "vmap", client_state="sharded"))
    created = train(Backend(client_mesh(4), "vmap", client_state="sharded"), created_split=True)
    for a, b, c in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference),
                       jax.tree.leaves(created), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    controls = jax.tree.leaves(sharded.client_controls)[0]
    assert controls.shape[0] == 12
    assert {shard.data.shape[0] for shard in controls.addressable_shards} == {3}
    assert not jax.tree.leaves(sharded.params)[0].sharding.spec  # the rest stays replicated


def test_blocked_sampler_pairs_match_stratified_sampling():
    """12 clients in 3 blocks of 4, k = 2 per block: two clients of one block are together with
    probability k (k - 1) / (n (n - 1)) = 1/6, of two blocks (k / n)^2 = 1/4 (blocks drawn
    independently; uniform sampling of 6 of 12 would give 5/22 = 0.227 to both); binomial
    bounds at 4.5 standard deviations over 4,000 draws."""
    draws = np.asarray(jax.jit(jax.vmap(blocked_uniform_sampler(client_blocks(12, 3), 6)))(
        jax.random.split(jax.random.key(0), 4000)))
    member = np.zeros((4000, 12), bool)
    np.put_along_axis(member, draws, True, axis=1)
    for (a, b), p in [((0, 1), 1 / 6), ((5, 7), 1 / 6), ((0, 4), 1 / 4), ((3, 11), 1 / 4)]:
        together = np.sum(member[:, a] & member[:, b])
        assert abs(together - 4000 * p) < 4.5 * np.sqrt(4000 * p * (1 - p)), (a, b, together)
