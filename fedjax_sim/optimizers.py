"""Optimizers named by string and looked up on optax (big_vision's habit).

Every optimizer is wrapped in ``optax.inject_hyperparams`` so its numeric hyperparameters live
in the optimizer state as arrays: they can be read, scheduled and swept (vmapped) without
rebuilding the program.
"""

from __future__ import annotations

import difflib
import inspect

import optax

from fedjax_sim.config import ConfigError, OptimizerConfig

# Common optax optimizers, for did-you-mean hints (any optax optimizer function is accepted).
KNOWN = ("sgd", "adam", "adamw", "adagrad", "yogi", "rmsprop", "lamb", "lion", "nadam", "adafactor")


def make_optimizer(
    config: OptimizerConfig, path: str = "optimizer"
) -> optax.GradientTransformation:
    """``optax.<name>(learning_rate, **options)`` with injected (traceable) hyperparameters."""
    factory = getattr(optax, config.name, None)
    if not callable(factory) or config.name.startswith("_") or inspect.isclass(factory):
        close = difflib.get_close_matches(config.name, KNOWN, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. one of {list(KNOWN)}"
        raise ConfigError(
            f"config key '{path}.name': unknown optax optimizer {config.name!r}{hint}"
        )
    parameters = inspect.signature(factory).parameters
    if "learning_rate" not in parameters:
        raise ConfigError(
            f"config key '{path}.name': optax.{config.name} is not an optimizer taking a "
            "learning_rate"
        )
    for key in config.options:
        if key not in parameters or key == "learning_rate":
            valid = sorted(p for p in parameters if p != "learning_rate")
            raise ConfigError(
                f"config key '{path}.options.{key}': optax.{config.name} has no option {key!r}; "
                f"valid options: {valid}"
            )
    try:
        return optax.inject_hyperparams(factory)(
            learning_rate=config.learning_rate, **config.options
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"config key '{path}': optax.{config.name} rejected it: {error}"
        ) from None
