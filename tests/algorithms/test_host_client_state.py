"""Per-client stores kept on the host (``execution.client_state: host``): the rows read and
written through callbacks against a numpy reference, every stateful algorithm against its
on-device store, and checkpoint + resume."""

import json
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
from fedjax_sim.sharding import client_mesh
from fedjax_sim.simulation.backend import Backend
from fedjax_sim.simulation.round_step import build_round_step
from tests.helpers import SHARED_DATA, tiny_data, tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_host_store_reads_and_writes_rows_as_numpy_does(tmp_path):
    """Random cohorts (padding rows that must not write included), several rounds inside one
    compiled loop and across calls; a non-zero initial row (Ditto's personal models start at the
    global model) reads back for clients never written; the file is sparse."""
    rng = np.random.default_rng(0)
    initial = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.float32(0.5)}
    num_clients, cohort = 1000, 6
    with host_client_state(tmp_path):
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


def test_host_state_on_several_devices_is_refused():
    """Host stores' callbacks deadlocked XLA:CPU's all-reduce on 2 and 4 devices (a Fashion-MNIST
    SCAFFOLD round): a mesh of more than one device is refused up front, one device is not."""
    with pytest.raises(ValueError, match="client_state='host' runs on one device, got a mesh "
                                         "of 2.*client_state='sharded'"):
        Backend(client_mesh(2), client_state="host")
    Backend(client_mesh(1), client_state="host")


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
