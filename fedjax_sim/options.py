"""Checks of the options a config hands to a factory by name (algorithms, aggregation stages).

Shared by the config builder (`fedjax_sim.simulation.loop`) and the aggregator registry
(`fedjax_sim.aggregators.create_aggregator`); it sits below both, so the registry need not
import the config layer.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any


def check_number_option(where: str, value: Any, parameter: inspect.Parameter | None) -> None:
    """A factory option annotated ``int`` or ``float`` (optionally ``| None``) must be given a
    number (or null where None is its default or in its annotation): the factories' own checks
    compare it with numbers and would report 'abc' as a Python comparison error. ``where``
    names the option in the error, e.g. "config key 'algorithm.mu'". Raises ValueError.
    """
    if parameter is None:
        return
    annotation = str(parameter.annotation)
    integer = re.search(r"\bint\b", annotation) is not None
    number = integer or re.search(r"\bfloat\b", annotation) is not None
    if not number or re.search(r"\b(str|bool|Any)\b", annotation):
        return
    nullable = parameter.default is None or re.search(r"\bNone\b", annotation) is not None
    if value is None and nullable:
        return
    floats_too = re.search(r"\bfloat\b", annotation) is not None
    # What YAML gives that is no number (arrays and numpy scalars from Python pass)
    wrong = isinstance(value, bool | str | bytes | Mapping | list | tuple) or value is None
    if wrong or (not floats_too and isinstance(value, float)):
        kind = "a number" if floats_too else "an integer"
        raise ValueError(f"{where}: expected {kind}{' or null' if nullable else ''}, got "
                         f"{value!r}")
