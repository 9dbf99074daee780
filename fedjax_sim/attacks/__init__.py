"""Attacks by a fixed fraction of malicious clients: on their updates or on their data.

The threat model, like the system model, is set apart from the algorithm, which sees it only
through the clients' messages or training rows:

1. `choose_malicious`: ``round(fraction * N)`` of the N clients, drawn once per run from the
   run's seed; the set never changes across rounds (each round's cohort holds however many of
   them were sampled).
2. An *update* attack is a client stage (`updates`) put before the aggregator's stages
   (`prepend`): the participating malicious clients' messages are replaced.
3. A *data* attack (`data`) changes the malicious clients' training rows once, before training.
4. The backdoor is both (Bagdasaryan et al. 2020): poisoned rows, then boosted updates; its
   success is measured on `data.trigger_set`.

From Python::

  malicious = choose_malicious(num_clients, 0.2, seed=0)
  aggregator = chain(sign_flip(malicious), median())

From a config, ``attack: {name: sign_flip, fraction: 0.2, scale: 1.0}`` (`create_attack`
builds an `Attack` from the name and options; the loop applies it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from fedjax_sim.aggregators.base import Stage, apply_aggregator, initial_context
from fedjax_sim.attacks.data import add_trigger, flip_labels, poison_backdoor, trigger_set
from fedjax_sim.attacks.updates import (
    boosted_update,
    gaussian_update,
    little_is_enough,
    little_is_enough_z,
    scaled_update,
    sign_flip,
    update_attack,
)
from fedjax_sim.core import Aggregator
from fedjax_sim.data.federated_data import FederatedData


def choose_malicious(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """``[num_clients]`` bool: ``round(fraction * num_clients)`` clients drawn without
    replacement from ``seed`` (its own stream: sampling and partitioning are unaffected)."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng([int(seed), 0xA77AC])
    chosen = rng.choice(num_clients, int(round(fraction * num_clients)), replace=False)
    malicious = np.zeros(num_clients, bool)
    malicious[chosen] = True
    return malicious


class Attack(NamedTuple):
    """A built attack: what the experiment builder applies.

    Attributes:
      name: the attack's name.
      malicious: ``[num_clients]`` bool, the malicious clients.
      update: a client stage replacing their messages (None: the updates are honest).
      poison: ``FederatedData -> FederatedData`` on the training split (None: clean data).
      trigger: ``held-out arrays -> trigger set`` for the backdoor accuracy (None: no backdoor).
    """

    name: str
    malicious: np.ndarray
    update: Stage | None = None
    poison: Callable[[FederatedData], FederatedData] | None = None
    trigger: Callable[[dict], dict] | None = None


# Each config-level attack: (malicious, num_classes, seed, **options) -> Attack.
def _label_flip(malicious, num_classes, seed):
    return Attack("label_flip", malicious,
                  poison=lambda data: flip_labels(data, malicious, num_classes))


def _sign_flip(malicious, num_classes, seed, scale: float = 1.0):
    return Attack("sign_flip", malicious, sign_flip(malicious, scale))


def _scaled(malicious, num_classes, seed, scale: float = 10.0):
    return Attack("scaled", malicious, scaled_update(malicious, scale))


def _gaussian(malicious, num_classes, seed, stddev: float = 1.0):
    return Attack("gaussian", malicious, gaussian_update(malicious, stddev))


def _little_is_enough(malicious, num_classes, seed, z: float | None = None):
    return Attack("little_is_enough", malicious, little_is_enough(malicious, z))


def _backdoor(malicious, num_classes, seed, target: int = 0, poison_fraction: float = 0.5,
              boost: float | None = None, trigger_size: int = 4, trigger_value: float = 1.0):
    if not (isinstance(target, int) and 0 <= target < num_classes):
        raise ValueError(f"target: expected a class in [0, {num_classes}), got {target!r}")
    if not 0.0 < float(poison_fraction) <= 1.0:
        raise ValueError(f"poison_fraction: expected a number in (0, 1], got "
                         f"{poison_fraction!r}")
    if not (isinstance(trigger_size, int) and trigger_size >= 1):
        raise ValueError(f"trigger_size: expected an integer >= 1, got {trigger_size!r}")
    return Attack(
        "backdoor", malicious, boosted_update(malicious, boost),
        poison=lambda data: poison_backdoor(data, malicious, target, poison_fraction,
                                            trigger_size, trigger_value, seed),
        trigger=lambda arrays: trigger_set(arrays, target, trigger_size, trigger_value))


ATTACKS: dict[str, Callable[..., Attack]] = {
    "label_flip": _label_flip,
    "sign_flip": _sign_flip,
    "scaled": _scaled,
    "gaussian": _gaussian,
    "little_is_enough": _little_is_enough,
    "backdoor": _backdoor,
}


def attack_options(name: str) -> list[str]:
    """The keyword options of attack ``name`` (besides ``fraction``)."""
    parameters = inspect.signature(ATTACKS[name]).parameters
    return sorted(p for p in parameters if p not in ("malicious", "num_classes", "seed"))


def create_attack(name: str, num_clients: int, num_classes: int, fraction: float, seed: int,
                  **options) -> Attack:
    """The attack ``name`` by ``round(fraction * num_clients)`` clients chosen with ``seed``.

    Raises ValueError (naming the option) for an unknown name, option or bad value.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: expected one of {sorted(ATTACKS)}")
    malicious = choose_malicious(num_clients, fraction, seed)
    return ATTACKS[name](malicious, num_classes, seed, **options)


def prepend(stage: Stage, aggregator: Aggregator) -> Aggregator:
    """``aggregator`` with the client ``stage`` applied to the messages first.

    The stage sees ``context = {"client_ids": ...}`` as the first stage of a `chain` does; its
    metrics appear as ``aggregator/<stage name>/...``; the aggregator's noise multipliers (DP
    accounting) are kept.
    """

    def init(example):
        return (stage.init(example), aggregator.init(example))

    def apply(state, values, weights, key, client_ids=None, cohort_size=None):
        stage_key, key = jax.random.split(key)
        context = initial_context(client_ids, cohort_size)
        values, weights, stage_state, metrics, _ = stage.apply(state[0], values, weights,
                                                               stage_key, context)
        aggregate, inner_state, inner_metrics = apply_aggregator(
            aggregator, state[1], values, weights, key, client_ids=client_ids,
            cohort_size=cohort_size)
        metrics = {**{f"aggregator/{stage.name}/{k}": v for k, v in metrics.items()},
                   **inner_metrics}
        return aggregate, (stage_state, inner_state), metrics

    noise = aggregator.noise_multipliers
    return Aggregator(init, apply, None if noise is None else (lambda state: noise(state[1])))


__all__ = [
    "ATTACKS", "Attack", "add_trigger", "attack_options", "boosted_update", "choose_malicious",
    "create_attack", "flip_labels", "gaussian_update", "little_is_enough", "little_is_enough_z",
    "poison_backdoor", "prepend", "scaled_update", "sign_flip", "trigger_set", "update_attack",
]
