"""Optimizers named by string and looked up on optax (big_vision's habit).

Every optimizer is wrapped in ``optax.inject_hyperparams`` so its numeric hyperparameters live
in the optimizer state as arrays: they can be read, scheduled and swept (vmapped) without
rebuilding the program.

A learning-rate schedule (``schedule: {name: <optax schedule>, ...}``) makes the learning rate a
function of the **round**, for the server and the clients alike:

* server: the schedule goes into ``optax.inject_hyperparams``, whose update count is the number
  of server updates, i.e. the round (one update per round);
* clients: their optimizer state starts fresh every round, so an injected schedule would follow
  the local step instead. `make_optimizer(..., inject_schedule=False)` builds the optimizer at
  the schedule's initial value and returns ``{"learning_rate": schedule}``; the algorithm sets
  the client learning rate to ``schedule(round)`` each round (``client_schedules``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.config import ConfigError

# Common optax optimizers, for did-you-mean hints (any optax optimizer function is accepted).
KNOWN = ("sgd", "adam", "adamw", "adagrad", "yogi", "rmsprop", "lamb", "lion", "nadam", "adafactor")
# Common optax schedules that start from ``init_value`` (any such optax schedule is accepted).
KNOWN_SCHEDULES = (
    "constant_schedule", "cosine_decay_schedule", "exponential_decay", "linear_schedule",
    "piecewise_constant_schedule", "polynomial_schedule", "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
)

Schedule = Callable[[Any], Any]


def make_schedule(spec: Mapping[str, Any], init_value: float,
                  path: str = "optimizer.schedule") -> Schedule:
    """``optax.<spec["name"]>(init_value, **options)``: a schedule ``count -> value``.

    Args:
      spec: ``{"name": <optax schedule function>, <its keyword arguments>...}``, e.g.
        ``{"name": "cosine_decay_schedule", "decay_steps": 1000}``. ``init_value`` is not an
        option: it is the optimizer's ``learning_rate``. ``constant_schedule`` takes no options.
      init_value: the schedule's value at count 0.
      path: the config key, for error messages.

    Raises:
      ConfigError: unknown schedule, unknown or missing option, or a value optax rejects.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(
            f"config key '{path}': expected a mapping with a 'name' (an optax schedule, e.g. "
            f"{{name: cosine_decay_schedule, decay_steps: 1000}}), got {spec!r}"
        )
    name = spec["name"]
    options = {k: v for k, v in spec.items() if k != "name"}
    factory = getattr(optax, name, None)
    parameters = inspect.signature(factory).parameters if callable(factory) else {}
    first = "value" if name == "constant_schedule" else "init_value"
    if name.startswith("_") or inspect.isclass(factory) or first not in parameters:
        close = difflib.get_close_matches(name, KNOWN_SCHEDULES, n=1)
        hint = (f"; did you mean {close[0]!r}?" if close
                else f"; e.g. one of {list(KNOWN_SCHEDULES)}")
        raise ConfigError(
            f"config key '{path}.name': {name!r} is not an optax schedule starting from an "
            f"init_value{hint}"
        )
    for key in options:
        if key not in parameters or key == first:
            valid = sorted(p for p in parameters if p != first)
            why = " (it is the optimizer's learning_rate)" if key in (first, "init_value") else ""
            raise ConfigError(
                f"config key '{path}.{key}': optax.{name} has no option {key!r}{why}; valid "
                f"options: {valid}"
            )
    if "boundaries_and_scales" in options and isinstance(options["boundaries_and_scales"],
                                                         Mapping):
        # YAML (and dotted overrides) may give the boundaries as strings.
        try:
            options["boundaries_and_scales"] = {
                int(k): float(v) for k, v in options["boundaries_and_scales"].items()
            }
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key '{path}.boundaries_and_scales': expected a mapping of integer "
                f"rounds to numbers, got {options['boundaries_and_scales']!r}"
            ) from None
    missing = [
        p.name for p in parameters.values()
        if p.default is inspect.Parameter.empty and p.name != first and p.name not in options
    ]
    if missing:
        raise ConfigError(f"config key '{path}': optax.{name} needs option(s) {missing}")
    try:
        schedule = factory(init_value, **options)
        float(schedule(0))  # reject bad values now, not at the first round
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise ConfigError(f"config key '{path}': optax.{name} rejected it: {error}") from None
    return schedule


def make_optimizer(
    name: str,
    learning_rate: float,
    options: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    *,
    path: str = "optimizer",
    inject_schedule: bool = True,
) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """``optax.<name>(learning_rate, **options)`` with injected (traceable) hyperparameters.

    Args:
      name: an optax optimizer function, e.g. ``"sgd"``, ``"adam"``.
      learning_rate: its learning rate (the schedule's initial value when ``schedule`` is set).
      options: its other keyword arguments, e.g. ``{"momentum": 0.9}``.
      schedule: ``{"name": <optax schedule>, <its options>}`` (see `make_schedule`), or None.
      path: the config key, for error messages.
      inject_schedule: where a schedule goes. True (server optimizers): into
        ``optax.inject_hyperparams``, following the optimizer's update count (the round, for a
        server). False (client optimizers, whose state is fresh each round): the optimizer
        starts at ``learning_rate`` and the schedule is returned for the algorithm to apply
        per round.

    Returns:
      ``(optimizer, schedules)``: ``schedules`` is ``{"learning_rate": round -> value}`` for a
      schedule that is not injected, else ``{}``.
    """
    options = dict(options or {})
    factory = getattr(optax, name, None)
    if not callable(factory) or name.startswith("_") or inspect.isclass(factory):
        close = difflib.get_close_matches(name, KNOWN, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. one of {list(KNOWN)}"
        raise ConfigError(
            f"config key '{path}.name': unknown optax optimizer {name!r}{hint}"
        )
    parameters = inspect.signature(factory).parameters
    if "learning_rate" not in parameters:
        raise ConfigError(
            f"config key '{path}.name': optax.{name} is not an optimizer taking a "
            "learning_rate"
        )
    for key in options:
        if key not in parameters or key == "learning_rate":
            valid = sorted(p for p in parameters if p != "learning_rate")
            # the config's own keys (learning_rate, schedule) are options' neighbours there
            close = difflib.get_close_matches(str(key), [*valid, "learning_rate", "schedule"], n=1)
            hint = f"; did you mean '{path}.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{path}.{key}': optax.{name} has no option {key!r}{hint} "
                f"(valid options: {valid})"
            )
    rate: float | Schedule = learning_rate
    schedules: dict[str, Schedule] = {}
    if schedule is not None:
        scheduled = make_schedule(schedule, learning_rate, f"{path}.schedule")
        if inject_schedule:
            rate = scheduled
        else:
            schedules["learning_rate"] = scheduled
    try:
        optimizer = optax.inject_hyperparams(factory)(
            learning_rate=rate, **options
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"config key '{path}': optax.{name} rejected it: {error}"
        ) from None
    if options:  # a bad option value (momentum: abc) fails now, not inside the first round
        try:
            jax.eval_shape(_init_and_update(optimizer),
                           {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        except (TypeError, ValueError, ZeroDivisionError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigError(
                f"config key '{path}': optax.{name} rejected its options {options}: {first}"
            ) from None
    return optimizer, schedules


def _init_and_update(optimizer: optax.GradientTransformation):
    """One ``init`` and ``update`` of ``optimizer`` (traced by `make_optimizer`'s check)."""
    def step(params):
        return optimizer.update(params, optimizer.init(params), params)

    return step
