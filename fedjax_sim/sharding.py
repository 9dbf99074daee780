"""Meshes for sharding the cohort's client axis over devices, and how many devices to use."""

from __future__ import annotations

import os
import re

import jax
from jax._src import distributed, xla_bridge
from jax.sharding import AxisType, Mesh

from fedjax_sim.simulation.client_map import CLIENT_AXIS

AUTO = "auto"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def client_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all) with a ``clients`` axis.

    The axis is of type ``Auto``: the round's arrays need no explicit sharding annotations, and
    the all-reduce after the per-device client maps is inserted by the compiler.
    """
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if not 1 <= num_devices <= len(devices):
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f" (JAX started with {len(devices)} CPU devices: ask for more before it "
                    f"starts, with fedjax_sim.sharding.request_cpu_devices({num_devices}) or "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices})")
        raise ValueError(f"num_devices={num_devices}: {len(devices)} devices are available{hint}")
    return jax.make_mesh((num_devices,), (CLIENT_AXIS,), (AxisType.Auto,),
                         devices=devices[:num_devices])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def request_cpu_devices(count: int) -> bool:
    """Asks JAX for ``count`` XLA:CPU devices (at least one per usable core), if it can still
    be asked: before JAX starts its backends, and when neither ``jax_num_cpu_devices`` nor
    ``XLA_FLAGS=--xla_force_host_platform_device_count`` already says how many. True if it
    asked. Affects only the CPU backend: on a GPU or TPU machine the extra devices sit unused.

    XLA:CPU runs each device's program on a thread of its own, so a cohort sharded over one
    device per core runs its clients' small sequential kernels (an LSTM's time steps, a small
    model's SGD steps) on every core at once; one device runs them one after another, each
    kernel too small to be split over the cores.
    """
    if (xla_bridge.backends_are_initialized() or xla_bridge.num_cpu_devices.value >= 0
            or _DEVICE_COUNT_FLAG.search(os.environ.get("XLA_FLAGS", ""))
            or distributed.global_state.num_processes > 1):  # processes share the cores
        return False
    jax.config.update("jax_num_cpu_devices", max(count, usable_cores()))
    return True


def resolve_num_devices(num_devices: int | str | None, cohort_size: int) -> int | None:
    """``execution.num_devices`` as a device count for `client_mesh` (None: one device, or
    every device of every process in a multi-process run).

    ``"auto"``: one device per usable core on CPU (`request_cpu_devices`; where JAX had started
    already with fewer CPU devices, those it has), every local device on a GPU or TPU, every
    device of every process in a multi-process run; never more than ``cohort_size`` (the
    cohort is padded to a multiple of the devices, so more would train only padding). An int
    > 1 creates that many CPU devices first, where JAX has not started yet.
    """
    if num_devices == AUTO:
        request_cpu_devices(usable_cores())
        if jax.process_count() > 1:
            return jax.device_count()
        available = len(jax.local_devices())
        if jax.default_backend() == "cpu":
            available = min(available, usable_cores())
        return max(1, min(available, cohort_size))
    if isinstance(num_devices, int) and num_devices > 1:
        request_cpu_devices(num_devices)
    return num_devices
