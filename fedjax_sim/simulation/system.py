"""System heterogeneity on a simulated clock: per-client speeds, dropout, stragglers.

`make_system` turns the ``system:`` settings (plain arguments) into a hook
``(key, clients) -> clients`` that the round step applies to the cohort before the algorithm sees
it (see `fedjax_sim.simulation.round_step.build_round_step`). Every algorithm sees the effect
through `ClientInput` alone:

* **speeds**: client k needs ``seconds_per_step_k`` simulated seconds per local step, fixed for
  the whole run: ``seconds_per_step`` times a factor drawn once on the host from a seeded
  ``numpy.random.Generator`` (``constant``: 1; ``lognormal``: ``exp(N(0, speed_sigma^2))``;
  ``uniform``: ``U[1, 1 + speed_sigma]``), or read from a trace file (``.npy`` or ``.csv``, one
  value of seconds per step per client). ``duration = num_steps * seconds_per_step_k``;
* **dropout**: each sampled client fails with probability ``dropout`` (drawn from the round's
  system key) and sends nothing: its mask is all False and ``num_steps``, ``num_examples`` and
  ``duration`` are 0, so its aggregation weight is 0 (``valid`` stays True: it still fills its
  device shard);
* **stragglers with a deadline**: a client runs only ``floor(deadline / seconds_per_step_k)``
  local steps (the later steps are masked, ``num_steps`` is reduced) and its duration is capped
  at the deadline (partial work is kept, as in FedProx's treatment of stragglers: Li et al. 2020,
  "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127; the deadline-based
  straggler model follows Bonawitz et al. 2019, "Towards Federated Learning at Scale: System
  Design", arXiv:1902.01046).

The round step reports ``system/round_seconds`` (the synchronous round's simulated time: the
largest duration in the cohort, which is the deadline whenever a client was cut) and
``system/dropped`` (clients that had work and contribute nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core import ClientInput
from fedjax_sim.data.errors import DataError

SystemHook = Callable[[jax.Array, ClientInput], ClientInput]


def is_active(
    *, dropout: float = 0.0, speed: str = "constant", seconds_per_step: float = 1.0,
    deadline: float | None = None, trace: str | Path | None = None,
) -> bool:
    """False for the defaults: every client finishes every step, 1 s per step."""
    return bool(dropout > 0 or speed != "constant" or seconds_per_step != 1.0
                or deadline is not None or trace is not None)


def read_trace(path: str | Path, num_clients: int) -> np.ndarray:
    """Per-client seconds per step from a ``.npy`` or ``.csv`` file (one value per client).

    Raises:
      DataError: a missing or unreadable file, another suffix, a length other than
        ``num_clients``, or a value that is not a finite number > 0.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"system trace {str(path)!r}: no such file (expected a .npy or .csv of "
                        f"{num_clients} per-client seconds per step)")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            values = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1)
        else:
            raise DataError(f"system trace {str(path)!r}: expected a .npy or .csv file")
        values = np.asarray(values, np.float64).reshape(-1)
    except (ValueError, OSError) as error:
        raise DataError(f"system trace {str(path)!r}: cannot read it as numbers: {error}") from None
    if values.shape != (num_clients,):
        raise DataError(
            f"system trace {str(path)!r}: expected {num_clients} values (one per training "
            f"client), got {values.size}"
        )
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
    if bad.size:
        raise DataError(
            f"system trace {str(path)!r}: seconds per step must be finite and > 0; client "
            f"{int(bad[0])} has {values[bad[0]]!r}"
        )
    return values


def client_speeds(
    num_clients: int, seed: int, *, speed: str = "constant", speed_sigma: float = 0.5,
    seconds_per_step: float = 1.0, trace: str | Path | None = None,
) -> np.ndarray:
    """``[num_clients]`` seconds per local step: drawn once (seeded) or read from a trace.

    Raises:
      ValueError: ``"<argument>: <problem>"`` for an unknown ``speed`` or a trace that
        conflicts with it (the caller names its own key for the argument).
      DataError: an unreadable trace (see `read_trace`).
    """
    if speed == "trace" or trace is not None:
        if trace is None:
            raise ValueError("trace: speed is 'trace' but no trace file is given (a .npy or "
                             ".csv of per-client seconds per step)")
        if speed not in ("trace", "constant"):
            raise ValueError(f"speed: {speed!r} conflicts with a trace file (set speed: trace)")
        return read_trace(trace, num_clients)
    rng = np.random.default_rng(seed)
    if speed == "constant":
        factors = np.ones(num_clients)
    elif speed == "lognormal":
        factors = np.exp(rng.normal(0.0, speed_sigma, num_clients))
    elif speed == "uniform":
        factors = rng.uniform(1.0, 1.0 + speed_sigma, num_clients)
    else:
        raise ValueError(f"speed: unknown speed model {speed!r}; expected constant, lognormal, "
                         "uniform or trace")
    return seconds_per_step * factors


def system_model(
    seconds_per_step: np.ndarray, dropout: float = 0.0, deadline: float | None = None
) -> SystemHook:
    """The hook for given per-client speeds, dropout probability and deadline.

    Args:
      seconds_per_step: ``[num_clients]`` simulated seconds per local step of each client.
      dropout: probability in [0, 1) that a sampled client fails and sends nothing.
      deadline: simulated seconds after which a client's remaining steps are cut (None: none).

    Returns:
      ``(key, clients) -> clients`` (pure, jittable): dropout is
      ``jax.random.uniform(key, [C]) < dropout``.
    """
    exact_speeds = np.asarray(seconds_per_step, np.float64)
    speeds = exact_speeds.astype(np.float32)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline={deadline!r}: expected a number of seconds > 0")
    if deadline is not None:
        # Steps that fit, per client, on the host in float64: k steps fit when k * seconds <=
        # deadline, and a ratio within a relative 1e-9 below a whole number is that number
        # (0.9 s / 0.3 s per step is 2.9999999999999996 in floats, 2.99999... in float32: 3
        # steps fit). Capped before the int32 cast: a very fast client must not overflow.
        ratio = float(deadline) / exact_speeds
        fitting = np.floor(ratio + 1e-9 * np.maximum(ratio, 1.0))
        fitting = np.minimum(fitting, np.iinfo(np.int32).max).astype(np.int32)

    def apply(key: jax.Array, clients: ClientInput) -> ClientInput:
        step_seconds = jnp.asarray(speeds)[clients.client_id]
        num_steps = clients.num_steps
        duration = num_steps.astype(jnp.float32) * step_seconds
        mask = clients.mask
        if deadline is not None:
            allowed = jnp.asarray(fitting)[clients.client_id]
            num_steps = jnp.minimum(num_steps, allowed)
            steps = jnp.arange(mask.shape[1])
            mask = mask & (steps[None, :] < num_steps[:, None])[:, :, None]
            duration = jnp.minimum(duration, jnp.float32(deadline))
        num_examples = clients.num_examples
        if dropout > 0:
            dropped = jax.random.uniform(key, num_steps.shape) < dropout
            mask = mask & ~dropped[:, None, None]
            num_steps = jnp.where(dropped, 0, num_steps)
            num_examples = jnp.where(dropped, 0, num_examples)
            duration = jnp.where(dropped, 0.0, duration)
        return clients.replace(mask=mask, num_steps=num_steps.astype(jnp.int32),
                               num_examples=num_examples, duration=duration)

    return apply


def make_system(
    num_clients: int, seed: int, *, dropout: float = 0.0, speed: str = "constant",
    speed_sigma: float = 0.5, seconds_per_step: float = 1.0, trace: str | Path | None = None,
    deadline: float | None = None,
) -> SystemHook | None:
    """The system model of these settings, or None when they are all defaults.

    Args:
      num_clients: training clients (a trace must have this many values).
      seed: seeds the per-client speed draw (host side, numpy).
      dropout, deadline: see `system_model`.
      speed, speed_sigma, seconds_per_step, trace: see `client_speeds`.
    """
    if not is_active(dropout=dropout, speed=speed, seconds_per_step=seconds_per_step,
                     deadline=deadline, trace=trace):
        return None
    speeds = client_speeds(num_clients, seed, speed=speed, speed_sigma=speed_sigma,
                           seconds_per_step=seconds_per_step, trace=trace)
    return system_model(speeds, dropout, deadline)


def system_metrics(before: ClientInput, after: ClientInput) -> dict[str, jax.Array]:
    """``system/round_seconds`` and ``system/dropped`` of a synchronous round.

    ``round_seconds``: the largest duration over the cohort's (valid) clients: the slowest
    client, or the deadline once a client was cut. ``dropped``: clients that had local steps
    before the system model and none after (dropout, or a deadline shorter than one step).
    """
    round_seconds = jnp.max(jnp.where(after.valid, after.duration, 0.0))
    dropped = before.valid & (before.num_steps > 0) & (after.num_steps == 0)
    return {"system/round_seconds": round_seconds,
            "system/dropped": jnp.sum(dropped.astype(jnp.float32))}
