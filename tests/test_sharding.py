"""How many devices ``execution.num_devices`` resolves to, and when CPU devices are created."""

import os
import subprocess
import sys

import jax
import pytest

from fedjax_sim.sharding import client_mesh, request_cpu_devices, resolve_num_devices, usable_cores


def test_auto_is_one_device_per_core_at_most_the_cohort():
    # The suite runs with 8 CPU devices (conftest): auto takes one per usable core.
    cores = usable_cores()
    assert len(jax.devices()) == 8
    assert resolve_num_devices("auto", 1000) == min(cores, 8)
    assert resolve_num_devices("auto", 1) == 1
    assert resolve_num_devices(None, 10) is None
    assert resolve_num_devices(3, 10) == 3


def test_no_devices_are_requested_once_jax_has_started():
    jax.devices()
    assert not request_cpu_devices(4)


def test_too_many_devices_say_how_to_get_more():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=9"):
        client_mesh(9)


@pytest.mark.parametrize("setting, expected", [("auto", None), ("3", 3)])
def test_a_fresh_process_gets_its_cpu_devices(setting, expected):
    """Before JAX starts, ``auto`` creates one CPU device per usable core (at most the cohort)
    and an int that many; a fresh interpreter, since this one's JAX has started."""
    code = ("import fedjax_sim, jax; from fedjax_sim.sharding import resolve_num_devices as r; "
            f"n = r({setting!r} if {setting!r} == 'auto' else int({setting!r}), 64); "
            "print(n, len(jax.devices()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert int(out[0]) == (expected or cores)
    assert int(out[1]) == max(expected or cores, cores)


def test_backend_local_copies_replicated_arrays_and_keeps_split_ones_whole():
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from fedjax_sim.simulation.backend import Backend

    mesh = client_mesh(2)
    replicated = jax.device_put(np.arange(6.0), NamedSharding(mesh, PartitionSpec()))
    split = jax.device_put(np.arange(8.0).reshape(4, 2),
                           NamedSharding(mesh, PartitionSpec("clients")))
    out = Backend(mesh=mesh).local({"r": replicated, "s": split, "n": 3})
    assert out["r"].devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(out["r"], np.arange(6.0))
    np.testing.assert_array_equal(out["s"], np.arange(8.0).reshape(4, 2))
    assert out["n"] == 3
