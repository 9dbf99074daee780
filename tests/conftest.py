"""Test-wide set-up: 4 fake CPU devices (sharding tests) before JAX starts, and small helpers."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import fedjax_sim  # noqa: E402,F401  (adds the XLA:CPU conv flag before jax initializes)
