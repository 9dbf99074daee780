"""Aggregators: composable stages between the clients and the server optimizer.

Every client-to-server message of every algorithm goes through an `Aggregator` (``init``,
``apply``; see `fedjax_sim.core.Aggregator`). Build one from stages with `chain`::

  from fedjax_sim import aggregators as agg
  aggregator = agg.chain(agg.clip(1.0), agg.mean(weighting="uniform", denominator=100.0),
                         agg.gaussian_noise(noise_multiplier=1.0))
  algorithm = fed_avg(model, client_opt, server_opt, aggregator=aggregator)

or from a config's ``aggregator:`` list with `create_aggregator`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedjax_sim.aggregators.base import (
    CLIENT,
    REDUCE,
    SERVER,
    Stage,
    apply_aggregator,
    chain,
    client_norms,
    no_state,
    participating,
    weighted_mean,
    weighted_sum,
)
from fedjax_sim.aggregators.clipping import clip
from fedjax_sim.aggregators.compression import quantize, random_k, top_k
from fedjax_sim.aggregators.dp import dp_fedavg_aggregator, split_noise_multiplier
from fedjax_sim.aggregators.noise import gaussian_noise
from fedjax_sim.aggregators.reducers import as_aggregator, mean
from fedjax_sim.aggregators.reducers import sum as sum  # noqa: A004 - a reducer named like jnp.sum
from fedjax_sim.aggregators.robust import (
    geometric_median,
    krum,
    median,
    norm_bound,
    trimmed_mean,
)
from fedjax_sim.aggregators.secure import masked_modular_sum, secure_mean, secure_sum
from fedjax_sim.core import Aggregator
from fedjax_sim.options import check_number_option

# Stage factories a config's ``aggregator:`` list may name.
STAGES: dict[str, Callable[..., Stage]] = {
    "clip": clip,
    "mean": mean,
    "sum": sum,
    "gaussian_noise": gaussian_noise,
    # compression (compression.py) and secure aggregation (secure.py)
    "quantize": quantize,
    "top_k": top_k,
    "random_k": random_k,
    "secure_sum": secure_sum,
    "secure_mean": secure_mean,
    # robust reducers and norm bounding (robust.py)
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "geometric_median": geometric_median,
    "norm_bound": norm_bound,
}


def register_stage(name: str, factory: Callable[..., Stage]) -> None:
    """Makes ``factory`` available to configs as ``{name: <name>, ...options}``."""
    STAGES[name] = factory


def stage_options(name: str) -> list[str]:
    """The keyword options of stage ``name``."""
    return sorted(inspect.signature(STAGES[name]).parameters)


def create_aggregator(specs: Sequence[Mapping[str, Any]], where: str = "aggregator",
                      num_clients: int | None = None) -> Aggregator:
    """An aggregator from a list of ``{name: stage, option: value, ...}`` mappings.

    A list without a reducer gets the default ``mean`` after its client stages. Errors name the
    list position, the stage and the option, with a did-you-mean. ``num_clients`` (the
    population size) is passed to every stage that takes a ``num_clients`` option and was not
    given one (per-client stores: error feedback).
    """
    stages = []
    for position, spec in enumerate(specs):
        key = f"{where}[{position}]"
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"{key}: expected a mapping with a 'name' (one of "
                             f"{sorted(STAGES)}), got {spec!r}")
        name = spec["name"]
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), STAGES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}.name: unknown aggregation stage {name!r}: expected one of "
                             f"{sorted(STAGES)}{hint}")
        options = {k: v for k, v in spec.items() if k != "name"}
        allowed = stage_options(name)
        for option in options:
            if option not in allowed:
                close = difflib.get_close_matches(option, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{key}.{option}: stage {name!r} has no option {option!r} "
                                 f"(options: {allowed}){hint}")
        parameters = inspect.signature(STAGES[name]).parameters
        for option, value in options.items():  # 'abc' for a number: named, not float()'s error
            check_number_option(f"{key}.{option}", value, parameters.get(option))
        if num_clients is not None and "num_clients" in allowed and "num_clients" not in options:
            options["num_clients"] = int(num_clients)
        try:
            stages.append(STAGES[name](**options))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{key} ({name}): {error}") from None
    if not any(stage.kind == REDUCE for stage in stages):
        position = next((i for i, s in enumerate(stages) if s.kind == SERVER), len(stages))
        stages.insert(position, mean())
    try:
        return chain(*stages)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


__all__ = [
    "CLIENT", "REDUCE", "SERVER", "STAGES", "Aggregator", "Stage", "apply_aggregator",
    "as_aggregator", "chain",
    "client_norms", "clip", "create_aggregator", "dp_fedavg_aggregator", "gaussian_noise",
    "masked_modular_sum", "mean", "no_state", "participating", "quantize", "random_k",
    "register_stage", "secure_mean", "secure_sum", "split_noise_multiplier", "stage_options",
    "sum", "top_k", "weighted_mean", "weighted_sum",
    # robust.py
    "geometric_median", "krum", "median", "norm_bound", "trimmed_mean",
]
