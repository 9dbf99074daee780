"""Meshes for sharding the cohort's client axis over devices."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from fedjax_sim.simulation.client_map import CLIENT_AXIS


def client_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all) with a ``clients`` axis.

    The axis is of type ``Auto``: the round's arrays need no explicit sharding annotations, and
    the all-reduce after the per-device client maps is inserted by the compiler.
    """
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices}: {len(devices)} devices are available")
    return jax.make_mesh((num_devices,), (CLIENT_AXIS,), (AxisType.Auto,),
                         devices=devices[:num_devices])
