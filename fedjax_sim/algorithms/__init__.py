"""Federated algorithms, each a factory returning a pure ``(init, apply)`` pair.

``create_algorithm("fed_prox", model, client_optimizer, server_optimizer, mu=0.01)`` builds one
by registry name (what a config's ``algorithm:`` section does). Every factory takes the model,
the client and the server optax optimizers positionally, then keyword options; the engine also
passes, when the factory's signature accepts them:

* ``client_weighting``: ``"num_examples"``, ``"uniform"`` or an exponent (``client.weighting``);
* ``num_clients``: the number of training clients (for per-client state stores);
* ``client_schedules``: ``{hyperparameter: round -> value}`` for the client optimizer
  (``client.optimizer.schedule``);
* ``equal_local_steps``: whether every client takes the same number of local steps each round
  (False under ``client.local_epochs`` with clients of different sizes, or a deadline with
  per-client speeds).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fedjax_sim.core import FederatedAlgorithm

# name -> (module, factory); modules are imported on first use.
ALGORITHMS: dict[str, tuple[str, str]] = {
    "fed_avg": ("fedjax_sim.algorithms.fed_avg", "fed_avg"),
    "fed_prox": ("fedjax_sim.algorithms.fed_prox", "fed_prox"),
    "scaffold": ("fedjax_sim.algorithms.scaffold", "scaffold"),
    "fed_nova": ("fedjax_sim.algorithms.fed_nova", "fed_nova"),
    "fed_dyn": ("fedjax_sim.algorithms.fed_dyn", "fed_dyn"),
    "mime": ("fedjax_sim.algorithms.mime", "mime"),
    "mime_lite": ("fedjax_sim.algorithms.mime", "mime_lite"),
    "q_ffl": ("fedjax_sim.algorithms.q_ffl", "q_ffl"),
    "afl": ("fedjax_sim.algorithms.afl", "afl"),
    "ditto": ("fedjax_sim.algorithms.ditto", "ditto"),
    "fed_buff": ("fedjax_sim.algorithms.fed_buff", "fed_buff"),
}

# Keyword arguments the engine fills in from other config sections (never algorithm options).
ENGINE_ARGUMENTS = ("client_weighting", "num_clients", "client_schedules", "loss_fn",
                    "aggregator", "equal_local_steps")
# Per-message aggregators (SCAFFOLD's control variates, ...): objects, set from Python.
MESSAGE_AGGREGATOR_SUFFIX = "_aggregator"


def algorithm_factory(name: str) -> Callable[..., FederatedAlgorithm]:
    """The factory registered under ``name`` (ValueError with a did-you-mean)."""
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(str(name), ALGORITHMS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}: expected one of {sorted(ALGORITHMS)}{hint}")
    module, function = ALGORITHMS[name]
    return getattr(importlib.import_module(module), function)


def algorithm_options(name: str) -> list[str]:
    """The keyword options a config may set for algorithm ``name``."""
    parameters = inspect.signature(algorithm_factory(name)).parameters
    return sorted(
        p.name for p in parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ENGINE_ARGUMENTS
        and not p.name.endswith(MESSAGE_AGGREGATOR_SUFFIX)
    )


def create_algorithm(name: str, model, client_optimizer, server_optimizer,
                     **kwargs: Any) -> FederatedAlgorithm:
    """Builds algorithm ``name``; engine arguments its factory does not take are dropped."""
    factory = algorithm_factory(name)
    parameters = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in parameters or k not in ENGINE_ARGUMENTS}
    return factory(model, client_optimizer, server_optimizer, **kwargs)
