"""Per-client stores kept on the host (``execution.client_state: host``): the rows read and
written through callbacks against a numpy reference, every stateful algorithm against its
on-device store, and checkpoint + resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms.client_state import (
    HostClientStore,
    client_state_arrays,
    gather_client_state,
    host_client_state,
    host_stores,
    init_client_state,
    scatter_client_state,
)
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.backend import Backend
from fedjax_sim.simulation.round_step import build_round_step
from tests.helpers import (
    FASHION_MNIST_FILES,
    SHARED_DATA,
    require_shared_data,
    tiny_data,
    tiny_model,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("piece_bytes", [None, 20])
def test_host_store_reads_and_writes_rows_as_numpy_does(tmp_path, piece_bytes):
    """Random cohorts (padding rows that must not write included), several rounds inside one
    compiled loop and across calls; a non-zero initial row (Ditto's personal models start at the
    global model) reads back for clients never written; the file is sparse. With pieces of 20
    bytes the cohort's 144 bytes of ``w`` rows and 24 of ids reach the callbacks in pieces (the
    last one padded), as a large store's do."""
    rng = np.random.default_rng(0)
    initial = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.float32(0.5)}
    num_clients, cohort = 1000, 6
    with host_client_state(tmp_path, piece_bytes):
        store = init_client_state(jax.tree.map(jnp.asarray, initial), num_clients)
    assert isinstance(store["w"], HostClientStore) and store["w"].shape == (1000, 3, 2)
    expected = {k: np.broadcast_to(v, (num_clients, *np.shape(v))).copy()
                for k, v in initial.items()}

    def one_round(store, ids, write):
        rows = gather_client_state(store, ids)
        rows = {"w": rows["w"] * 2.0 + ids[:, None, None], "b": rows["b"] - 1.0}
        return scatter_client_state(store, ids, rows, write), rows

    @jax.jit
    def rounds(store, ids, write):  # [R, C] ids: R rounds in one call
        def body(store, x):
            return one_round(store, *x)
        return jax.lax.scan(body, store, (ids, write))

    for _ in range(3):
        ids = np.stack([rng.choice(num_clients, cohort, replace=False) for _ in range(4)])
        write = rng.random((4, cohort)) < 0.7
        store, seen = rounds(store, jnp.asarray(ids, jnp.int32), jnp.asarray(write))
        for r in range(4):  # the numpy reference, round by round
            np.testing.assert_allclose(seen["b"][r], expected["b"][ids[r]] - 1.0)
            rows_w = expected["w"][ids[r]] * 2.0 + ids[r][:, None, None]
            np.testing.assert_allclose(seen["w"][r], rows_w, rtol=1e-6)
            expected["w"][ids[r][write[r]]] = rows_w[write[r]]
            expected["b"][ids[r][write[r]]] = expected["b"][ids[r][write[r]]] - 1.0
    got = client_state_arrays(store)
    np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)
    np.testing.assert_allclose(got["b"], expected["b"], rtol=1e-6)
    # sparse: 1000 clients x 24 bytes is allocated, but only the pages written hold blocks
    files = sorted(tmp_path.glob("store-*.bin"))
    assert len(files) == 2 and files[0].stat().st_size in (1000 * 4, 1000 * 24)

    stores = host_stores({"state": store})
    assert sorted(stores) == ["state_b", "state_w"]  # file names: no leading dot
    for name, rows in stores.items():  # a checkpoint's rows load back into a fresh store
        rows.save(tmp_path / name)
    with host_client_state():
        fresh = init_client_state(jax.tree.map(jnp.asarray, initial), num_clients)
    for name, rows in host_stores({"state": fresh}).items():
        rows.load(tmp_path / name)
    for key in ("w", "b"):
        np.testing.assert_array_equal(client_state_arrays(fresh)[key], got[key])


def test_pieces_of_no_bytes_are_refused():
    with pytest.raises(ValueError, match="piece_bytes must be >= 1.*got 0"):
        with host_client_state(piece_bytes=0):
            pass


def test_a_host_store_is_made_from_concrete_values():
    with host_client_state(), pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda x: init_client_state(x, 4)["w"].version)({"w": jnp.zeros(2)})


def _stateful(name, model, data):
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    n = data.num_clients
    if name == "scaffold":
        from fedjax_sim.algorithms.scaffold import scaffold
        return scaffold(model, sgd, optax.sgd(1.0), num_clients=n)
    if name == "fed_dyn":
        from fedjax_sim.algorithms.fed_dyn import fed_dyn
        return fed_dyn(model, sgd, optax.sgd(1.0), num_clients=n, alpha=0.1)
    if name == "ditto":
        from fedjax_sim.algorithms.ditto import ditto
        return ditto(model, sgd, optax.sgd(1.0), num_clients=n, lam=0.5)
    from fedjax_sim.aggregators import create_aggregator
    from fedjax_sim.algorithms.fed_avg import fed_avg
    return fed_avg(model, sgd, optax.sgd(1.0),
                   aggregator=create_aggregator([{"name": "top_k", "fraction": 0.3}],
                                                num_clients=n))


@pytest.mark.filterwarnings("ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")
@pytest.mark.parametrize("name", ["scaffold", "fed_dyn", "ditto", "top_k_error_feedback"])
def test_stateful_algorithms_train_the_same_with_their_store_on_the_host(name):
    """3 rounds with the store on the host end with the state of the on-device store within
    1e-6, store included; Ditto runs 2 of its rounds in one ``rounds_per_call`` call (the
    reads and writes inside a compiled loop)."""
    data = tiny_data(sizes=(5, 17, 40, 3, 11, 9, 2, 30))
    model = tiny_model()
    algorithm = _stateful(name, model, data)
    schedule = ClientSchedule.from_sizes(data.client_sizes, 4, local_epochs=1)
    params = model.init(jax.random.PRNGKey(0))
    per_call = 2 if name == "ditto" else 1

    def train(backend):
        step = build_round_step(algorithm, data, schedule, uniform_sampler(8, 4), 4,
                                backend=backend, rounds_per_call=per_call)
        state = step.init_state(algorithm.init, params, jax.random.PRNGKey(1))
        state, _ = step(state)
        if per_call > 1:
            state, _ = step.run_rounds(state, 2)
        else:
            for _ in range(2):
                state, _ = step(state)
        return jax.device_get(jax.tree.map(np.asarray, client_state_arrays(state.algorithm)))

    reference = train(Backend())
    hosted = train(Backend(client_state="host"))
    leaves, leaves_ref = jax.tree.leaves(hosted), jax.tree.leaves(reference)
    assert len(leaves) == len(leaves_ref)
    for a, b in zip(leaves, leaves_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


# A fresh interpreter with exactly 2 XLA:CPU devices on at most 2 cores: XLA:CPU's client thread
# pool has max(cores, devices) threads, so only there does a round on both devices leave no
# thread spare (this suite's own 8 devices would). SCAFFOLD's control variates of the logistic
# model are 10 clients x 7,850 floats = 314 KB a round, above XLA:CPU's 100 KiB synchronous-copy
# limit (see `client_state._host_call`).
_TWO_DEVICE_RUN = """
import os, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
import jax, numpy as np
from fedjax_sim.algorithms.client_state import client_state_arrays
from fedjax_sim.simulation.loop import run
config, data, out = sys.argv[1:4]
fast = ["rounds=3", "eval.every=3", "log.every=1", "log.progress=false", "log.plot=false",
        "client.local_steps=3", "model.name=logistic",
        f"dataset.data_dir={data}", "execution.num_devices=2"]
arrays = {}
for placement in ("host", "sharded"):
    result = run(config, overrides=[*fast, f"execution.client_state={placement}"],
                 workdir=os.path.join(out, placement))
    assert len(jax.devices()) == 2 and result.summary["placement"]["devices"] == 2
    state = client_state_arrays(result.state.algorithm)
    for i, leaf in enumerate(jax.tree.leaves(state)):
        arrays[f"{placement}_{i}"] = np.asarray(leaf)
    arrays[f"{placement}_loss"] = np.array([row["train/loss"] for row in result.history])
np.savez(os.path.join(out, "states.npz"), **arrays)
"""


@pytest.mark.filterwarnings("ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")
def test_host_state_on_two_devices_equals_the_sharded_store(tmp_path):
    """SCAFFOLD on Fashion-MNIST on 2 devices (2 cores) with its control variates on the host
    ends with the state of the same run with them split over the devices, within 1e-6. Before
    the stores' callbacks sent their rows in pieces, the first round's write hung the devices
    until XLA's rendezvous timeout aborted the process."""
    require_shared_data(*FASHION_MNIST_FILES)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "device_count" not in f)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2"}
    config = REPO / "configs" / "fashion_mnist_scaffold.yaml"
    try:
        done = subprocess.run([sys.executable, "-c", _TWO_DEVICE_RUN, str(config),
                               str(SHARED_DATA), str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-device runs hung: {(error.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    states = np.load(tmp_path / "states.npz")
    leaves = sorted(k.split("_", 1)[1] for k in states.files if k.startswith("host_"))
    assert len(leaves) >= 4  # the controls' kernel and bias, the model's, the losses
    for name in leaves:
        np.testing.assert_allclose(states[f"host_{name}"], states[f"sharded_{name}"],
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    assert states["host_loss"].shape == (3,)


@pytest.mark.filterwarnings("ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")
def test_a_run_with_host_state_resumes_and_equals_the_device_run(tmp_path):
    """SCAFFOLD on Fashion-MNIST (the shipped config, shortened) with its control variates in
    memory-mapped files: stopped after round 3 (checkpoint every 2: the rows of rounds 2 and 3
    are saved, the older pruned), resumed to round 6, it ends with the state of the same run
    with the store on the device; metrics rows too."""
    from fedjax_sim.simulation.loop import run

    config = REPO / "configs" / "fashion_mnist_scaffold.yaml"
    fast = ["rounds=6", "eval.every=3", "log.every=1", "log.progress=false", "log.plot=false",
            "client.local_steps=3", "checkpoint.every=2",
            "checkpoint.keep=2", "model.name=logistic", f"dataset.data_dir={SHARED_DATA}"]
    host = [*fast, "execution.client_state=host"]
    stopped = run(config, overrides=host, workdir=tmp_path / "host",
                  callbacks=[lambda row, state: row["round"] >= 3])
    assert stopped.history[-1]["round"] == 3
    saved = sorted(p.name for p in (tmp_path / "host" / "checkpoints" / "client_state").iterdir())
    assert saved == ["2", "3"]
    rows_files = sorted(p.name for p in (tmp_path / "host" / "checkpoints" / "client_state" / "3")
                        .iterdir())
    assert len(rows_files) == 4 and not any(name.startswith(".") for name in rows_files)
    assert all(name.startswith("algorithm.client_controls") for name in rows_files), rows_files
    assert sorted(p.name for p in (tmp_path / "host" / "client_state").iterdir()) == [
        f"store-{i}.bin" for i in range(2)]  # the logistic model's kernel and bias
    resumed = run(config, overrides=host, workdir=tmp_path / "host")
    reference = run(config, overrides=fast, workdir=tmp_path / "device")
    got = jax.tree.leaves(client_state_arrays(resumed.state.algorithm))
    want = jax.tree.leaves(reference.state.algorithm)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    rows, rows_ref = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl")
                       .read_text().splitlines()] for name in ("host", "device"))
    assert [r["round"] for r in rows] == list(range(1, 7))
    np.testing.assert_allclose([r["train/loss"] for r in rows],
                               [r["train/loss"] for r in rows_ref], rtol=1e-5)
    assert resumed.summary["placement"]["client_state"] == "host"


def test_nan_written_to_a_host_store_counts_as_divergence():
    """The round's divergence check counts the NaN/inf values a write stored on the host, as it
    counts a device store's written rows; rows that were not written do not count."""
    from fedjax_sim.simulation.round_step import count_nonfinite

    with host_client_state():
        store = init_client_state({"w": jnp.zeros(3)}, 10)

    @jax.jit
    def write(store, rows, mask):
        store = scatter_client_state(store, jnp.array([1, 2]), {"w": rows}, mask)
        return store, count_nonfinite({"store": store, "params": jnp.ones(2)})

    rows = jnp.array([[0.0, jnp.nan, jnp.inf], [1.0, 2.0, jnp.nan]])
    store, bad = write(store, rows, jnp.array([True, False]))
    assert float(bad) == 2.0  # the second row was not written
    store, bad = write(store, jnp.ones((2, 3)), jnp.array([True, True]))
    assert float(bad) == 0.0
