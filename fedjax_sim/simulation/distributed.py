"""Many processes on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program (``fedjax-sim run CONFIG ...``) and `initialize` connects it
to the others through a coordinator: process 0 at ``HOST:PORT``. Afterwards ``jax.devices()``
lists every process's devices, the round step's mesh spans all of them (each process trains
its devices' share of the cohort; the aggregate is an all-reduce across processes), and only
process 0 writes logs, metrics, plots and summaries; every process takes part in orbax's
checkpoints. On CPU the cross-process collectives are gloo's.

A process is started the usual way: a cluster's launcher (``srun``, ``mpirun``: JAX detects
SLURM and Open MPI by itself), a loop of the user's own that sets the three values, or
`launch_local` (``fedjax-sim launch -n N -- run CONFIG``) for the processes of one machine.

The three values come from arguments (``--coordinator``, ``--num-processes``,
``--process-id``) or the environment (`ENV`). A process that dies stops the others within the
heartbeat timeout (JAX's coordination service reports the missing peer and ends them with an
error), so a run never hangs on a lost peer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import jax

ENV = {
    "coordinator": "FEDJAX_SIM_COORDINATOR",
    "num_processes": "FEDJAX_SIM_NUM_PROCESSES",
    "process_id": "FEDJAX_SIM_PROCESS_ID",
    "heartbeat_timeout": "FEDJAX_SIM_HEARTBEAT_TIMEOUT",
}
DEFAULT_HEARTBEAT_TIMEOUT = 30
"""Seconds after which the coordination service gives up on a silent process (JAX's own
default is 100); every other process then ends with an error."""


def _from_env(name: str, value, cast=str):
    if value is not None:
        return value
    raw = os.environ.get(ENV[name])
    if raw is None or raw == "":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV[name]}={raw!r}: expected "
                         f"{'an integer' if cast is int else 'a value'}") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Connects this process to the others (``jax.distributed.initialize``) when a
    multi-process run is asked for; returns True if so, False for a single process.

    Must run before JAX computes anything. Missing arguments are read from `ENV`; none at all
    (and no ``FEDJAX_SIM_*`` variables) means one process.
    """
    coordinator = _from_env("coordinator", coordinator)
    num_processes = _from_env("num_processes", num_processes, int)
    process_id = _from_env("process_id", process_id, int)
    heartbeat_timeout = _from_env("heartbeat_timeout", heartbeat_timeout, int)
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(value is None for value in given.values()):
        return False
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ValueError(f"a multi-process run needs --coordinator HOST:PORT, --num-processes "
                         f"N and --process-id I (or {ENV['coordinator']}, "
                         f"{ENV['num_processes']}, {ENV['process_id']}); missing: "
                         f"{', '.join(missing)}")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. "
                         "localhost:12355")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} with --num-processes {num_processes}: "
                         "expected 0 <= process id < number of processes")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU all-reduces
    jax.distributed.initialize(
        coordinator, num_processes, process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT,
    )
    return True


def is_main_process() -> bool:
    """True in process 0 (the one that writes), and in a single-process run."""
    return jax.process_index() == 0


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    port: int = 12355,
    *,
    grace_seconds: float = 10.0,
    env: dict[str, str] | None = None,
) -> int:
    """Starts ``fedjax-sim <argv>`` as ``num_processes`` processes of this machine, connected
    through ``localhost:port``; returns the first non-zero exit status (0 when all succeed).

    When one process fails, the others get ``grace_seconds`` to end by themselves (they do,
    with an error, once the heartbeat times out) and are then terminated.
    """
    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: expected >= 1")
    base = {**os.environ, **(env or {})}
    processes = []
    for process_id in range(num_processes):
        process_env = {**base, ENV["coordinator"]: f"localhost:{port}",
                       ENV["num_processes"]: str(num_processes),
                       ENV["process_id"]: str(process_id)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "fedjax_sim.cli", *argv], env=process_env))
    status, failed_at = 0, None
    try:
        while any(p.poll() is None for p in processes):
            for p in processes:
                code = p.poll()
                if code not in (None, 0) and status == 0:
                    status, failed_at = code, time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                for p in processes:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        for p in processes:
            code = p.wait()
            if status == 0 and code != 0:
                status = code
    except KeyboardInterrupt:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in processes:
            p.wait()
        return 130
    return status
