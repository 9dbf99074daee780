"""The host loop: ``run(config)`` builds an experiment and trains it round by round.

  1. build: dataset -> model -> optimizers -> algorithm -> jitted round step -> evaluators;
  2. loop: dispatch rounds (no host sync; ``execution.rounds_per_call`` rounds per compiled
     call, each call ending at the latest on the next log, evaluation or checkpoint round);
     every ``log.every`` rounds fetch the metrics, check them for NaN/inf, write them to
     ``metrics.jsonl`` and the progress bar;
  3. every ``eval.every`` rounds (and at the end) evaluate on the central test set and the
     clients' held-out splits;
  4. at the end write ``summary.json`` and ``learning_curve.png`` into the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fedjax_sim.aggregators import as_aggregator, create_aggregator, dp_fedavg_aggregator
from fedjax_sim.algorithms import (
    ALGORITHMS,
    algorithm_factory,
    algorithm_options,
    create_algorithm,
)
from fedjax_sim.algorithms.local import model_loss
from fedjax_sim.attacks import ATTACKS, Attack, attack_options, create_attack, prepend
from fedjax_sim.config import (
    Config,
    ConfigError,
    check_folder,
    check_options,
    config_to_yaml,
    load_config,
    remove_outputs,
)
from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.batching import ClientSchedule
from fedjax_sim.data.errors import DataError
from fedjax_sim.data.federated_data import FederatedDataset
from fedjax_sim.data.sampling import (
    blocked_uniform_sampler,
    client_blocks,
    full_participation,
    poisson_cap,
    poisson_sampler,
    uniform_sampler,
    weighted_sampler,
)
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import DatasetLoader, convert_dataset, dataset_loader
from fedjax_sim.models import MODELS, Model, create_model
from fedjax_sim.optimizers import make_optimizer
from fedjax_sim.options import check_number_option
from fedjax_sim.privacy import PrivacyLedger, calibrate_noise_multiplier, warn_cap_overflow
from fedjax_sim.privacy.dp_sgd import EXAMPLE_DP_ALGORITHMS, ExampleLedger, dp_sgd_loss
from fedjax_sim.sharding import resolve_num_devices
from fedjax_sim.simulation.backend import Backend, default_mesh
from fedjax_sim.simulation.checkpoint import Checkpointer
from fedjax_sim.simulation.client_map import resolve_strategy
from fedjax_sim.simulation.evaluation import build_evaluators, make_evaluator
from fedjax_sim.simulation.round_step import (
    RoundStep,
    SimulationState,
    build_round_step,
)
from fedjax_sim.simulation.system import make_system

METRICS_CONTRACT = """What the loop reads from an algorithm's round metrics: nothing is required.

An algorithm's ``apply`` returns ``(state, metrics)`` with any dict of scalar arrays; the loop
logs all of them to ``metrics.jsonl`` and checks each for NaN/inf. When present, these have a
meaning the loop uses: ``train/loss`` and ``train/accuracy`` (the progress bar, the plot and the
final line), ``train/clients`` and ``train/examples`` (logged). The state must have a
``params`` attribute (evaluated on the test splits) unless the evaluators are personalised.
"""


class DivergenceError(RuntimeError):
    """A metric became NaN or infinite; the message names the round and the metric."""


@dataclasses.dataclass
class Experiment:
    """Everything `run` builds from a config (also useful on its own in scripts and tests)."""

    config: Config
    dataset: FederatedDataset
    model: Model
    algorithm: FederatedAlgorithm
    schedule: ClientSchedule
    round_step: RoundStep
    # split -> (algorithm state -> metrics)
    evaluators: dict[str, Callable[[Any], dict[str, jax.Array]]]
    # every noised quantity of the run (None: not private); epsilon after n rounds
    privacy: PrivacyLedger | None = None
    # example-level DP-SGD inside the clients (None: off); its epsilon after n rounds
    example_privacy: ExampleLedger | None = None

    def init_state(self) -> SimulationState:
        params = self.model.init(jax.random.PRNGKey(self.config.seed))
        # The model init and the rounds draw from different keys of the same seed.
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1)
        # Committed where the step runs, so round 2 does not compile the step again.
        return self.round_step.init_state(self.algorithm.init, params, key)

    def evaluate(self, algorithm_state) -> dict[str, float]:
        """Every evaluator on the algorithm state (its ``params`` unless it personalizes)."""
        out = {}
        algorithm_state = self.round_step.backend.local(algorithm_state)  # a local copy
        for split, evaluator in self.evaluators.items():
            for name, value in jax.device_get(evaluator(algorithm_state)).items():
                out[f"{split}/{name}"] = float(value)
        return out


@dataclasses.dataclass
class RunResult:
    workdir: Path
    state: SimulationState
    history: list[dict[str, float]]
    summary: dict[str, Any]


def configured_loader(config: Config) -> DatasetLoader:
    """The config's dataset loader, its options checked (a ConfigError names the bad key)."""
    try:
        loader = dataset_loader(config.dataset.name)
    except ValueError as error:
        raise ConfigError(f"config key 'dataset.name': {error}") from None
    check_options("dataset", f"dataset {config.dataset.name!r}", config.dataset.options,
                  inspect.signature(loader).parameters)
    return loader


@contextlib.contextmanager
def _dataset_errors(config: Config):
    """A value the loader rejects becomes a ConfigError naming 'dataset' (DataError stays)."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, TypeError) as error:  # the loader rejected an option's value
        raise ConfigError(f"config key 'dataset' ({config.dataset.name}): {error}") from None


def build_dataset(config: Config) -> FederatedDataset:
    """The ``dataset:`` section loaded (not validated: `build_experiment` does that)."""
    loader = configured_loader(config)
    with _dataset_errors(config):
        return loader(**config.dataset.options)


def build_dataset_cache(config: Config, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``dataset:`` section converted into a memory-mapped cache; returns its folder."""
    configured_loader(config)
    with _dataset_errors(config):
        return convert_dataset(config.dataset.name, config.dataset.options, cache_dir)


def build_model(config: Config, info: Mapping[str, Any]) -> Model:
    """The ``model:`` section's model for a dataset's ``info`` (ConfigError names the key)."""
    if config.model.name in MODELS:
        module, classes_field = MODELS[config.model.name]
        fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name", classes_field}
        check_options("model", f"model {config.model.name!r}", config.model.options, fields)
    try:
        model = create_model(
            config.model.name,
            num_classes=info["num_classes"],
            input_shape=tuple(info["input_shape"]),
            input_dtype=info.get("input_dtype", "float32"),
            pad_label=info.get("pad_label"),
            **config.model.options,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config key 'model': {error}") from None
    try:  # shapes only: a bad option value (hidden: -5, [0]) fails now, before the workdir
        jax.eval_shape(model.init, jax.random.PRNGKey(0))
    except (ValueError, TypeError, ZeroDivisionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"config key 'model' ({config.model.name}): the model cannot be built "
                          f"with options {config.model.options}: {first}") from None
    return model


def build_experiment(config: Config, dataset: FederatedDataset | None = None, *,
                     workdir: str | os.PathLike | None = None,
                     model: Model | None = None) -> Experiment:
    """Loads the data and builds the model, algorithm, round step and evaluators.

    ``dataset``: the config's dataset when already loaded (a sweep loads it once for all its
    configurations); None loads it from the ``dataset:`` section. ``model``: the model this
    config's ``model:`` section and dataset build, when already built (a sweep shares one, so
    its initialisation and evaluation compile once). ``workdir``: the run's
    folder, where ``execution.client_state: host`` keeps its stores (``client_state/``; None:
    temporary files).
    """
    # First: CPU devices exist only if asked for before JAX starts (building the data starts it).
    num_devices = resolve_num_devices(config.execution.num_devices, _cohort_cap(config))
    if dataset is None:
        dataset = build_dataset(config)
        validate_dataset(dataset)
    attack = _build_attack(config, dataset)
    if attack is not None and attack.poison is not None:  # data attacks: once, before training
        try:
            dataset = dataclasses.replace(dataset, train=attack.poison(dataset.train))
        except ValueError as error:
            raise ConfigError(f"config key 'attack' ({attack.name}): {error}") from None
    info = dataset.info
    if model is None:
        model = build_model(config, info)
    # A client schedule follows the round (client optimizer state is fresh every round); a
    # server schedule is injected into the server optimizer, whose update count is the round.
    client_optimizer, client_schedules = make_optimizer(
        **dataclasses.asdict(config.client.optimizer), path="client.optimizer",
        inject_schedule=False)
    server_optimizer, _ = make_optimizer(**dataclasses.asdict(config.server.optimizer),
                                         path="server.optimizer")
    train = dataset.train
    aggregator, privacy = _build_aggregator(config, train.num_clients, model)
    _check_user_level_privacy(config, privacy)
    if privacy is not None:
        warn_cap_overflow(privacy, config.rounds)
    if attack is not None and attack.update is not None:  # update attacks: the first stage
        aggregator = prepend(attack.update, as_aggregator(aggregator))
    schedule = ClientSchedule.from_sizes(
        train.client_sizes, config.client.batch_size,
        local_epochs=config.client.local_epochs, local_steps=config.client.local_steps,
        max_local_steps=config.client.max_local_steps,
    )
    equal_steps = _equal_local_steps(config, schedule, train.client_sizes)
    algorithm = _build_algorithm(config, model, client_optimizer, server_optimizer,
                                 dataset.train.num_clients, client_schedules, aggregator,
                                 _example_dp_loss(config, model),
                                 equal_local_steps=equal_steps)

    if config.cohort.size > train.num_clients and not config.cohort.replace:
        raise ConfigError(
            f"config key 'cohort.size': {config.cohort.size} is larger than the number of "
            f"clients ({train.num_clients}) in dataset {config.dataset.name!r}"
        )
    cohort_size = config.cohort.size
    backend = _build_backend(config, num_devices, workdir)
    try:
        if backend.data_placement == "sharded":
            if config.cohort.sampler != "uniform":
                raise ValueError(f"sampler {config.cohort.sampler!r} with execution."
                                 "data_placement: sharded: each device draws its clients from "
                                 "the block it holds, so only sampler: uniform is possible")
            sampler = blocked_uniform_sampler(
                client_blocks(train.num_clients, backend.num_shards), cohort_size,
                config.cohort.replace)
        elif config.cohort.sampler == "full":
            if config.cohort.replace:
                raise ValueError("replace: true needs sampler uniform or weighted (full "
                                 "participation takes every client once)")
            sampler, cohort_size = full_participation(train.num_clients), train.num_clients
        elif config.cohort.sampler == "poisson":
            q = cohort_size / train.num_clients
            cohort_size = config.cohort.max_size or poisson_cap(train.num_clients, q)
            sampler = poisson_sampler(train.num_clients, q, min(cohort_size, train.num_clients))
        elif config.cohort.sampler == "weighted":
            sampler = weighted_sampler(train.client_sizes, cohort_size, config.cohort.replace)
        else:
            sampler = uniform_sampler(train.num_clients, cohort_size, config.cohort.replace)
    except ValueError as error:
        raise ConfigError(f"config key 'cohort': {error}") from None
    system = _build_system(config, train.num_clients)
    try:
        round_step = build_round_step(
            algorithm, train, schedule, sampler, cohort_size, backend=backend, system=system,
            rounds_per_call=config.execution.rounds_per_call,
            compiler_options=model.compiler_options,
        )
    except ValueError as error:
        if "rounds_per_call" not in str(error):
            raise
        raise ConfigError(f"config key 'execution.rounds_per_call': {error} (in the config: "
                          "execution.data_placement: device)") from None
    # One process's devices split the pooled evaluations; several processes each evaluate on
    # their first device (`Backend.local`).
    eval_mesh = round_step.backend.mesh if not round_step.backend.multi_process else None
    evaluators = _build_evaluators(config, model, dataset, eval_mesh)
    if attack is not None and attack.trigger is not None:
        evaluators["backdoor"] = _backdoor_evaluator(config, model, dataset, attack)
    example_privacy = None
    if config.privacy.example_level:
        try:
            example_privacy = ExampleLedger.for_run(
                config.privacy.example_noise_multiplier, config.privacy.example_clip_norm,
                train.client_sizes, schedule, sampler, config.privacy.example_delta,
                config.privacy.accountant)
        except ValueError as error:
            raise ConfigError(f"config key 'privacy': {error}") from None
    return Experiment(config, dataset, model, algorithm, schedule, round_step, evaluators,
                      privacy, example_privacy)


def _cohort_cap(config: Config) -> int:
    """The cohort size that caps ``execution.num_devices: auto`` (Poisson: ``max_size`` when
    given, else the expected size)."""
    return config.cohort.max_size or config.cohort.size


def _build_backend(config: Config, num_devices: int | None,
                   workdir: str | os.PathLike | None = None) -> Backend:
    """The placement of the ``execution:`` section (``num_devices``: its `resolve_num_devices`):
    devices (every process's, when there are several), client execution, where the data and the
    per-client state live."""
    execution = config.execution
    try:
        mesh = default_mesh(num_devices)
    except ValueError as error:
        raise ConfigError(f"config key 'execution.num_devices': {error}") from None
    try:
        return Backend(mesh, execution.client_execution, execution.client_batch_size,
                       execution.data_placement, execution.prefetch, execution.client_state,
                       None if workdir is None else os.fspath(Path(workdir) / "client_state"))
    except ValueError as error:
        raise ConfigError(f"config key 'execution': {error}") from None


# --- The attack: section ------------------------------------------------------------------------

def _build_attack(config: Config, dataset: FederatedDataset) -> Attack | None:
    """The ``attack:`` section's `Attack` (None when ``attack.name`` is not set)."""
    section = config.attack
    if section.name is None:
        if section.options:
            raise ConfigError(f"config key 'attack': options {sorted(section.options)} without "
                              f"an attack; set attack.name (one of {sorted(ATTACKS)})")
        return None
    if section.name not in ATTACKS:
        close = difflib.get_close_matches(section.name, ATTACKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key 'attack.name': {section.name!r} is not one of "
                          f"{sorted(ATTACKS)}{hint}")
    check_options("attack", f"attack {section.name!r}", section.options,
                  attack_options(section.name))
    try:
        return create_attack(section.name, dataset.train.num_clients,
                             int(dataset.info["num_classes"]), section.fraction, config.seed,
                             **section.options)
    except (ValueError, TypeError) as error:  # "option: problem" names the key when it can
        option, _, problem = str(error).partition(": ")
        if option in section.options or option == "fraction":
            raise ConfigError(f"config key 'attack.{option}': {problem}") from None
        raise ConfigError(f"config key 'attack' ({section.name}): {error}") from None


def _backdoor_evaluator(config: Config, model: Model, dataset: FederatedDataset, attack: Attack):
    """``backdoor/accuracy``: the fraction of triggered held-out non-target examples that the
    model classifies as the target (central test set, else the clients' held-out splits)."""
    held_out = (dataset.central_test if dataset.central_test is not None
                else None if dataset.test is None else dataset.test.arrays)
    if held_out is None:
        raise ConfigError("config key 'attack.name': backdoor needs held-out examples for its "
                          "trigger set (a central test set or the clients' test splits)")
    try:
        triggered = attack.trigger(held_out)
    except ValueError as error:
        raise ConfigError(f"config key 'attack' (backdoor): {error}") from None
    evaluate = make_evaluator(model, triggered, batch_size=config.eval.batch_size,
                              max_examples=config.eval.max_examples, seed=config.seed)
    return lambda state: evaluate(state.params)


def _example_dp_loss(config: Config, model: Model):
    """DP-SGD's loss (``privacy.example_noise_multiplier`` set) or None (the model's loss)."""
    privacy, name = config.privacy, config.algorithm.name
    if not privacy.example_level:
        return None
    if name not in EXAMPLE_DP_ALGORITHMS:
        raise ConfigError(
            f"config key 'privacy.example_noise_multiplier': algorithm {name!r} has no "
            f"example-level accounting (it sends more than functions of DP-SGD-trained "
            f"parameters); use one of {list(EXAMPLE_DP_ALGORITHMS)}")
    if name == "scaffold" and config.algorithm.options.get("control_update") == "option_i":
        raise ConfigError(
            "config key 'algorithm.control_update': option_i sends each client's gradient at "
            "the server model over its examples, an extra pass that the example-level "
            "accounting (privacy.example_noise_multiplier) does not count; use option_ii")
    return dp_sgd_loss(model_loss(model), privacy.example_clip_norm,
                       privacy.example_noise_multiplier)


def _build_aggregator(config: Config, num_clients: int, model: Model):
    """The ``aggregator:`` list or the ``privacy:`` short form, and the run's privacy ledger.

    Returns ``(aggregator or None, ledger or None)``. The ledger holds every Gaussian mechanism
    of the aggregator with its noise multiplier (the update noise, adaptive clipping's count).
    """
    privacy, cohort = config.privacy, config.cohort
    if privacy.enabled and config.aggregator:
        raise ConfigError("config keys 'privacy' and 'aggregator': set one (privacy: is the "
                          "short form of a clip / mean / gaussian_noise aggregator list)")
    expected = float(cohort.size)
    population = num_clients
    if privacy.noise_cohort_size is not None:
        if privacy.noise_cohort_size > num_clients:
            raise ConfigError(
                f"config key 'privacy.noise_cohort_size': {privacy.noise_cohort_size} is more "
                f"than the {num_clients} clients to sample from")
    sampling = "poisson" if cohort.sampler == "poisson" else "fixed"
    if privacy.enabled:
        if cohort.sampler in ("weighted", "full") or cohort.replace:
            raise ConfigError(
                f"config key 'cohort.sampler': {cohort.sampler!r}"
                f"{' with replace' if cohort.replace else ''} has no DP accounting; use poisson "
                "(or uniform without replacement)")
        noise_cohort = privacy.noise_cohort_size or expected
        delta = privacy.delta or 1.0 / population ** 1.1
        z = privacy.noise_multiplier
        try:
            if z is None:
                z = calibrate_noise_multiplier(privacy.target_epsilon, config.rounds,
                                               population, noise_cohort, delta, sampling,
                                               privacy.accountant)
            aggregator = dp_fedavg_aggregator(
                z, privacy.clip_norm, expected,
                target_quantile=privacy.target_quantile if privacy.adaptive_clipping else None,
                clip_learning_rate=privacy.clip_learning_rate,
                count_stddev=privacy.count_stddev,
                noise_cohort_size=privacy.noise_cohort_size)
        except ValueError as error:
            raise ConfigError(f"config key 'privacy': {error}") from None
    elif config.aggregator:
        try:
            aggregator = create_aggregator(config.aggregator, num_clients=num_clients)
        except ValueError as error:  # "aggregator[i].option: what is wrong"
            key, _, problem = str(error).partition(": ")
            raise ConfigError(f"config key {key.split(' ')[0]!r}: {problem}") from None
        for index, spec in enumerate(config.aggregator):
            if isinstance(spec, dict) and spec.get("noise_cohort_size") is not None:
                # The stage scales its noise for another cohort, but this ledger would account
                # the run's own cohort at the unscaled multiplier, unlabelled.
                raise ConfigError(
                    f"config key 'aggregator[{index}].noise_cohort_size': the run's privacy "
                    "accounting would not match noise calibrated for a simulated cohort; set "
                    "privacy.noise_cohort_size instead (it accounts that cohort and labels the "
                    "epsilon as a simulation)")
        noise_cohort, delta = expected, privacy.delta or 1.0 / population ** 1.1
    else:
        return None, None
    if aggregator.noise_multipliers is None:
        return aggregator, None
    state = aggregator.init(model.init(jax.random.PRNGKey(0)))
    multipliers = {k: float(v) for k, v in jax.device_get(
        aggregator.noise_multipliers(state)).items()}
    try:
        # Poisson's cap (the sampler's, `_build_sampler`), for the overflow term of delta; a
        # simulated noise cohort accounts another population, where the run's cap means nothing
        cap = (cohort.max_size or poisson_cap(num_clients, expected / num_clients)
               if sampling == "poisson" and privacy.noise_cohort_size is None else None)
        ledger = PrivacyLedger(multipliers, population, noise_cohort, sampling, delta,
                               privacy.accountant, max_cohort_size=cap)
    except ValueError as error:
        raise ConfigError(f"config key 'privacy': {error}") from None
    return aggregator, ledger


# Algorithms whose server reads more from the clients than the message of ``aggregator=``
# (the only one a config's privacy: or aggregator: list privatizes): what else it reads.
UNPRIVATIZED_MESSAGES = {
    "scaffold": "the control-variate deltas (control_aggregator)",
    "mime": "the full-batch gradients (gradient_aggregator)",
    "mime_lite": "the full-batch gradients (gradient_aggregator)",
    "fed_dyn": "the drifts' mean for h (drift_aggregator)",
    "q_ffl": "the clients' losses and update norms, which scale the step",
    "afl": "the clients' losses, which set the mixture weights",
}


def _check_user_level_privacy(config: Config, privacy: PrivacyLedger | None) -> None:
    """ConfigError when a user-level privacy ledger would report an epsilon for an algorithm
    whose server also reads client data that the noised aggregator never sees."""
    name = config.algorithm.name
    if privacy is None or name not in UNPRIVATIZED_MESSAGES:
        return
    covered = sorted(set(ALGORITHMS) - set(UNPRIVATIZED_MESSAGES))
    raise ConfigError(
        f"config key 'algorithm.name': {name!r} also sends the server "
        f"{UNPRIVATIZED_MESSAGES[name]}, which the noised aggregator does not see (neither "
        f"clipped nor noised), so the reported epsilon would not hold; user-level DP from a "
        f"config covers {covered} (from Python, privatize every message with the algorithm's "
        "own aggregators)")


def _equal_local_steps(config: Config, schedule: ClientSchedule, client_sizes) -> bool:
    """Whether every client with data takes the same number of local steps each round."""
    system = config.system
    if system.deadline is not None and (system.speed != "constant" or system.trace is not None):
        return False  # a straggler runs only the steps that fit before the deadline
    sizes = np.asarray(client_sizes)
    steps = np.asarray(schedule.steps_for(sizes[sizes > 0]))
    return bool(steps.size == 0 or (steps == steps[0]).all())


def _build_algorithm(config: Config, model: Model, client_optimizer, server_optimizer,
                     num_clients: int, client_schedules=None,
                     aggregator=None, loss_fn=None, *,
                     equal_local_steps: bool | None = None) -> FederatedAlgorithm:
    """The configured algorithm (``algorithm.name`` and its options) from the registry."""
    name = config.algorithm.name
    try:
        factory = algorithm_factory(name)
    except ValueError as error:
        raise ConfigError(f"config key 'algorithm.name': {error}") from None
    check_options("algorithm", f"algorithm {name!r}", config.algorithm.options,
                  algorithm_options(name))
    accepted = inspect.signature(factory).parameters
    for key, value in config.algorithm.options.items():
        try:
            check_number_option(f"config key 'algorithm.{key}'", value, accepted.get(key))
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if "client_weighting" not in accepted and config.client.weighting != "num_examples":
        raise ConfigError(f"config key 'client.weighting': algorithm {name!r} does not take a "
                          "client weighting")
    if client_schedules and "client_schedules" not in accepted:
        raise ConfigError(f"config key 'client.optimizer.schedule': algorithm {name!r} does not "
                          "take client schedules")
    try:
        return create_algorithm(name, model, client_optimizer, server_optimizer,
                                client_weighting=config.client.weighting,
                                num_clients=num_clients, client_schedules=client_schedules,
                                equal_local_steps=equal_local_steps,
                                **({"aggregator": aggregator} if aggregator is not None else {}),
                                **({"loss_fn": loss_fn} if loss_fn is not None else {}),
                                **config.algorithm.options)
    except (ValueError, TypeError) as error:
        if str(error).startswith("client_weighting="):  # the engine passes client.weighting
            raise ConfigError(f"config key 'client.weighting': {error}") from None
        option, _, problem = str(error).partition(": ")  # "option: problem" names the key
        if option in config.algorithm.options:
            raise ConfigError(f"config key 'algorithm.{option}': {problem}") from None
        raise ConfigError(f"config key 'algorithm' ({name}): {error}") from None


def _build_system(config: Config, num_clients: int):
    """The ``system:`` section's model (None when it is all defaults)."""
    settings = dataclasses.asdict(config.system)
    try:
        return make_system(num_clients, config.seed, **settings)
    except DataError:  # an unreadable trace names its file
        raise
    except ValueError as error:  # "argument: problem" names the key when it can
        argument, _, problem = str(error).partition(": ")
        if argument in settings:
            raise ConfigError(f"config key 'system.{argument}': {problem}") from None
        raise ConfigError(f"config key 'system': {error}") from None


def _build_evaluators(config: Config, model: Model, dataset: FederatedDataset,
                      mesh: Mesh | None = None):
    """The ``eval:`` section's evaluators (see `build_evaluators`)."""
    section = config.eval
    if config.execution.client_batch_size:  # clients per chunk, as the round trains them
        chunk = config.execution.client_batch_size
    elif resolve_strategy(config.execution.client_execution) == "map":
        chunk = 1  # sequential, on CPU
    else:
        chunk = config.cohort.size  # vmap: as many clients at once as a round trains
    try:
        return build_evaluators(
            model, dataset, batch_size=section.batch_size, max_examples=section.max_examples,
            seed=config.seed, per_client=section.per_client,
            fine_tune_steps=section.fine_tune_steps,
            fine_tune_learning_rate=(section.fine_tune_learning_rate
                                     or config.client.optimizer.learning_rate),
            fine_tune_batch_size=config.client.batch_size, client_chunk=chunk, mesh=mesh)
    except ValueError as error:
        key = "eval.per_client" if section.per_client else "eval.fine_tune_steps"
        raise ConfigError(f"config key {key!r}: {error}") from None


def default_workdir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def _host_metrics(
    pending: Sequence[tuple[Mapping[str, jax.Array], int | None]],
) -> list[dict[str, float]]:
    """One row per round from the calls' metrics, fetched in one transfer.

    Each call left ``(metrics, None)`` (one round) or ``(metrics [k, ...], count)`` (its first
    ``count`` rows are rounds; see `RoundStep.run_rounds`).
    """
    rows = []
    for metrics, count in jax.device_get(list(pending)):
        if count is None:
            rows.append({k: float(v) for k, v in metrics.items()})
        else:
            rows += [{k: float(v[i]) for k, v in metrics.items()} for i in range(count)]
    return rows


def _rounds_in_call(config: Config, done: int) -> int:
    """How many rounds the next call runs after ``done``: ``execution.rounds_per_call``, cut
    short to end on the next log, evaluation or checkpoint round (or the last round), so those
    see the state of that round as with one round per call."""
    cadences = [config.log.every, config.eval.every]
    if config.checkpoint.every is not None:
        cadences.append(config.checkpoint.every)
    boundary = min([config.rounds, *((done // every + 1) * every for every in cadences)])
    return min(config.execution.rounds_per_call, boundary - done)


def _check_finite(round_index: int, metrics: Mapping[str, float]) -> None:
    if metrics.get("state/nonfinite", 0.0) > 0:
        raise DivergenceError(
            f"round {round_index}: the state (parameters or optimizer state) holds "
            f"{int(metrics['state/nonfinite'])} NaN/inf values; the run diverged (lower the "
            "learning rates, or clip updates)"
        )
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise DivergenceError(
                f"round {round_index}: metric {name!r} is {value}; the run diverged (lower the "
                "learning rates, or clip updates)"
            )


OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "learning_curve.png",
           "checkpoints", "tensorboard")

# A callback sees each logged round's metrics (and the state after the newest of them) and
# returns True to stop the run there (pfl-research's `after_round -> stop?`).
Callback = Callable[[dict[str, float], SimulationState], "bool | None"]


def run(
    config: Config | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    overrides: Sequence[str] = (),
    workdir: str | os.PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Trains ``config`` (a `Config`, a dict, a YAML path, or None for the default demo).

    Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and
    ``learning_curve.png`` into the workdir. A workdir that already holds a run of the same
    config is resumed from its newest checkpoint; one that holds another config is refused
    unless ``overwrite``. Returns the final state, the per-round metrics and a summary.
    """
    if not isinstance(config, Config):
        from fedjax_sim.config import config_from_dict, demo_config

        if isinstance(config, Mapping):
            config = config_from_dict(config, overrides)
        elif config is None:
            config = demo_config(overrides)
        else:
            config = load_config(config, overrides)
    start = time.perf_counter()
    workdir = Path(workdir or config.workdir or default_workdir(config.name))
    # every config or data error comes before any write
    experiment = build_experiment(config, workdir=workdir)
    resume = _prepare_workdir_once(workdir, config, overwrite)
    summary_line = experiment.dataset.train.summary()
    _say(f"fedjax_sim: {config.name}: workdir {workdir}")
    if jax.process_count() > 1:
        _say(f"fedjax_sim: process 0 of {jax.process_count()} writes; "
             f"{experiment.round_step.backend.num_shards} devices share each cohort")
    _say(
        f"fedjax_sim: {config.dataset.name}: {summary_line['clients']} clients, "
        f"{summary_line['examples']} train examples (per client min {summary_line['min']}, "
        f"median {summary_line['median']:g}, max {summary_line['max']}); model "
        f"{config.model.name}; {experiment.round_step.cohort_size} clients x "
        f"{experiment.schedule.num_steps} steps x batch {experiment.schedule.batch_size} per round"
    )
    setup_seconds = time.perf_counter() - start
    state, history, first_round = _train(experiment, workdir, resume, callbacks)
    summary = _finish(experiment, workdir, history, setup_seconds, first_round,
                      time.perf_counter() - start)
    return RunResult(workdir, state, history, summary)


def _say(message: str) -> None:
    """Prints in process 0 only (every process of a multi-process run says the same)."""
    if jax.process_index() == 0:
        print(message)


def _prepare_workdir_once(workdir: Path, config: Config, overwrite: bool) -> bool:
    """`_prepare_workdir` in process 0; every process learns whether to resume (or that the
    workdir was refused, then each raises the same error)."""
    if jax.process_count() == 1:
        return _prepare_workdir(workdir, config, overwrite)
    error, resume = None, False
    if jax.process_index() == 0:
        try:
            resume = _prepare_workdir(workdir, config, overwrite)
        except ConfigError as raised:
            error = raised
    status = int(multihost_utils.broadcast_one_to_all(
        np.int32(2 if error is not None else int(resume))))
    if error is not None:
        raise error
    if status == 2:
        raise ConfigError(f"workdir {str(workdir)!r}: process 0 refused it (see its error)")
    return status == 1


def _prepare_workdir(workdir: Path, config: Config, overwrite: bool) -> bool:
    """Creates the workdir; returns True when it holds this config's run (to resume)."""
    check_folder(workdir)
    saved = workdir / "config.yaml"
    text = config_to_yaml(dataclasses.replace(config, workdir=None))
    if saved.exists():
        old = saved.read_text()
        if old == text:
            return True
        if _continues(old, text):  # display keys or more rounds: the same run, resume
            _write_atomically(saved, text)
            return True
        if not overwrite:
            new_lines, old_lines = set(text.splitlines()), set(old.splitlines())
            changed = sorted(line.strip() for line in new_lines - old_lines)[:3]
            raise ConfigError(
                f"workdir {str(workdir)!r} holds a run of a different config (now: "
                f"{'; '.join(changed)}); pass --overwrite (run(..., overwrite=True)) to replace "
                "it, or choose another --workdir"
            )
        remove_outputs(workdir, OUTPUTS)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomically(saved, text)
    return False


DISPLAY_KEYS = (("log", "progress"), ("log", "plot"))
"""Config keys that change what a run shows (the progress bar, the learning-curve PNG) but no
result: a run started again with only these changed resumes."""


def _results_keys(text: str) -> Any:
    """A saved config's YAML without the `DISPLAY_KEYS` (None when it is not readable)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    for section, key in DISPLAY_KEYS:
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return data


def _continues(old: str, new: str) -> bool:
    """Whether the config ``new`` continues the run ``old``: the same but for `DISPLAY_KEYS`
    and more ``rounds`` (the rounds done are the same, so the run resumes and trains the rest;
    not with a ``privacy.target_epsilon``, whose noise was calibrated for the old count)."""
    before, after = _results_keys(old), _results_keys(new)
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return False
    rounds_before, rounds_after = before.pop("rounds", None), after.pop("rounds", None)
    if before != after or not (isinstance(rounds_before, int) and isinstance(rounds_after, int)):
        return False
    calibrated = (after.get("privacy") or {}).get("target_epsilon") is not None
    return rounds_after == rounds_before or (rounds_after > rounds_before and not calibrated)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)  # atomic: the file is always whole


def _resume(checkpointer: Checkpointer, metrics_path: Path, state: SimulationState):
    """Restores the newest checkpoint and cuts metrics.jsonl back to the rounds it covers."""
    if checkpointer.latest_round() is None:
        return state, []
    state, host = checkpointer.restore(state)
    if jax.process_index() == 0:
        with open(metrics_path, "a+b") as log_file:  # drop rows logged after the checkpoint
            log_file.truncate(int(host["metrics_offset"]))
    if jax.process_count() > 1:  # the others read the log once process 0 has cut it
        multihost_utils.sync_global_devices("fedjax_sim: metrics.jsonl cut to the checkpoint")
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    _say(f"fedjax_sim: resuming after round {int(state.round)} "
          f"(checkpoint {checkpointer.directory / str(int(state.round))})")
    return state, history


def _train(
    experiment: Experiment, workdir: Path, resume: bool, callbacks: Sequence[Callback]
) -> tuple[SimulationState, list[dict], float]:
    config = experiment.config
    metrics_path = workdir / "metrics.jsonl"
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    state = experiment.init_state()
    history: list[dict[str, float]] = []
    if resume:
        state, history = _resume(checkpointer, metrics_path, state)
    main = jax.process_index() == 0  # the only process that writes (all of them compute)
    if not history and main:
        metrics_path.write_text("")
    done = int(state.round)
    writer = _tensorboard_writer(workdir) if config.log.tensorboard and main else None
    progress = _progress_bar(config, initial=done) if main else None
    pending: list[tuple[Mapping[str, jax.Array], int | None]] = []  # (metrics, rounds or None)
    clock_offset = history[-1]["wall_time"] if history else 0.0
    start = time.perf_counter()
    first_round_seconds = None
    every = config.checkpoint.every
    round_step = experiment.round_step
    round_index = done
    try:
        with open(metrics_path if main else os.devnull, "a") as log_file:
            while round_index < config.rounds:
                if round_step.rounds_per_call == 1:
                    state, metrics = round_step(state)
                    pending.append((metrics, None))
                    round_index += 1
                else:
                    # The first call runs one round, so first_round_seconds stays compile + 1.
                    count = 1 if first_round_seconds is None else _rounds_in_call(config,
                                                                                  round_index)
                    state, metrics = round_step.run_rounds(state, count)
                    pending.append((metrics, count))
                    round_index += count
                if first_round_seconds is None:
                    jax.block_until_ready(metrics)
                    first_round_seconds = time.perf_counter() - start
                last = round_index == config.rounds
                evaluate_now = round_index % config.eval.every == 0 or last
                checkpoint_now = last or (every is not None and round_index % every == 0)
                if round_index % config.log.every and not (evaluate_now or checkpoint_now):
                    continue
                rows = _host_metrics(pending)
                first = round_index - len(rows) + 1
                pending = []
                now = clock_offset + time.perf_counter() - start
                for offset, row in enumerate(rows):
                    row = {"round": first + offset, "wall_time": round(now, 3), **row}
                    _check_finite(row["round"], row)  # before anything is written or saved
                    if experiment.privacy is not None and experiment.privacy.accountant == "rdp":
                        row["privacy/epsilon"] = experiment.privacy.epsilon(row["round"])
                    history.append(row)
                if evaluate_now:
                    history[-1].update(experiment.evaluate(state.algorithm))
                    if experiment.privacy is not None and "privacy/epsilon" not in history[-1]:
                        # PLD: epsilon spent so far only at evaluations (RDP has it every row)
                        history[-1]["privacy/epsilon"] = experiment.privacy.epsilon(round_index)
                    if experiment.example_privacy is not None:  # DP-SGD's, worst client
                        experiment.example_privacy.count(state.key, round_index)
                        history[-1]["privacy/example_epsilon"] = (
                            experiment.example_privacy.epsilon())
                    _check_finite(round_index, history[-1])
                for row in history[-len(rows):]:
                    log_file.write(json.dumps(row) + "\n")
                    if writer is not None:
                        for key, value in row.items():
                            if key not in ("round", "wall_time"):
                                writer.add_scalar(key, value, row["round"])
                log_file.flush()
                stop = any([bool(callback(history[-1], state)) for callback in callbacks])
                if checkpoint_now or stop:
                    checkpointer.save(round_index, state, {"metrics_offset": log_file.tell()})
                if progress is not None:
                    progress.update(len(rows))
                    progress.set_postfix(_postfix(history))
                if stop:
                    _say(f"fedjax_sim: a callback stopped the run after round {round_index}")
                    break
    finally:
        experiment.round_step.reset()  # stops a host-data feeder thread
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
    return state, history, first_round_seconds  # None: every round was done before


def _postfix(history: list[dict[str, float]]) -> dict[str, str]:
    last = history[-1]
    # The loop needs no metric of an algorithm (see `METRICS_CONTRACT`); it shows what exists.
    postfix = {short: f"{last[key]:.3f}" for short, key in
               (("loss", "train/loss"), ("acc", "train/accuracy")) if key in last}
    tests = [row for row in history if "test/accuracy" in row]
    if tests:
        postfix["test_acc"] = f"{tests[-1]['test/accuracy']:.3f}"
    return postfix


def _progress_bar(config: Config, initial: int = 0):
    if not config.log.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.rounds, initial=initial, unit="round", desc=config.name,
                dynamic_ncols=True)


def _tensorboard_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "config key 'log.tensorboard': tensorboardX is not installed; "
            "pip install 'fedjax_sim[tensorboard]'"
        ) from None
    return SummaryWriter(str(workdir / "tensorboard"))


TIMINGS = ("first_round_seconds", "train_seconds", "seconds_per_round", "rounds_per_second")
"""summary.json's timings of the training; a run started again after its last round keeps
those its earlier process measured."""


def _finish(experiment, workdir, history, setup_seconds, first, total_seconds) -> dict:
    config = experiment.config
    train_seconds = history[-1]["wall_time"]
    rounds = int(history[-1]["round"])  # fewer than config.rounds when a callback stopped it
    earlier = None
    if first is None:  # resumed after the last round: nothing trained, nothing timed now
        path = workdir / "summary.json"
        try:
            earlier = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            earlier = None
        first = (earlier or {}).get("first_round_seconds") or 0.0
    # The rounds after the first (which compiles); None for a one-round run: nothing measured.
    steady = (train_seconds - first) / (rounds - 1) if rounds > 1 else None
    final = {k: v for k, v in history[-1].items() if k not in ("wall_time",)}
    summary = {
        "name": config.name,
        "rounds": rounds,
        "final": final,
        "setup_seconds": round(setup_seconds, 2),
        "first_round_seconds": round(first, 3),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_round": None if steady is None else round(steady, 4),
        "rounds_per_second": round(1.0 / steady, 2) if steady else None,
        "total_seconds": round(total_seconds, 2),
        "backend": jax.default_backend(),
        "devices": experiment.round_step.backend.num_shards,
        "placement": experiment.round_step.backend.describe(),
        "workdir": str(workdir),
    }
    if earlier is not None and all(key in earlier for key in TIMINGS):
        summary.update({key: earlier[key] for key in TIMINGS})
    if experiment.privacy is not None:
        ledger = experiment.privacy
        summary["privacy"] = {
            "epsilon": ledger.epsilon(rounds),
            "delta": ledger.delta,
            # P(some round's Poisson draw exceeded the cap): the guarantee is (epsilon, delta +
            # this); see PrivacyLedger.cap_overflow_delta
            "cap_overflow_delta": ledger.cap_overflow_delta(rounds),
            "noise_multipliers": dict(ledger.noise_multipliers),
            "accounting": ledger.description(),
            "simulated_cohort": (None if config.privacy.noise_cohort_size is None else
                                 f"noise calibrated for a cohort of "
                                 f"{config.privacy.noise_cohort_size} clients while training "
                                 f"{config.cohort.size}: the accuracy such a cohort would reach "
                                 "at this epsilon, not this run's own guarantee"),
        }
    if experiment.example_privacy is not None:
        summary["example_privacy"] = experiment.example_privacy.summary()
    if jax.process_index() != 0:  # process 0 writes and reports
        return summary
    _write_atomically(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if config.log.plot:
        plot_learning_curve(history, workdir / "learning_curve.png", title=config.name)
    tests = {k: v for k, v in final.items() if k.endswith("/accuracy") and "train" not in k}
    per_round = summary["seconds_per_round"]
    pace = "" if per_round is None else f"{per_round:.3f} s/round, "
    print(
        f"fedjax_sim: done: {rounds} round{'s' if rounds != 1 else ''} in "
        f"{summary['train_seconds']:.1f} s ({pace}first round {first:.1f} s), total "
        f"{summary['total_seconds']:.1f} s; "
        + (f"final train loss {final['train/loss']:.3f}, " if "train/loss" in final else "")
        + ", ".join(f"{k} {v:.4f}" for k, v in tests.items())
    )
    print(f"fedjax_sim: wrote {workdir}/metrics.jsonl, summary.json, checkpoints/"
          + (", learning_curve.png" if config.log.plot else ""))
    return summary


def plot_learning_curve(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Train loss and train/test accuracy against rounds, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((ax_loss, "train/loss"), (ax_acc, "train/accuracy")):
        points = [(row["round"], row[key]) for row in history if key in row]
        if points:
            ax.plot(*zip(*points, strict=False), label=key.replace("/", " "), lw=1)
    for key in sorted({k for row in history for k in row}):
        if key.endswith("/accuracy") and not key.startswith("train"):
            points = [(row["round"], row[key]) for row in history if key in row]
            ax_acc.plot(*zip(*points, strict=False), marker="o", label=key)
        if key.endswith("/loss") and not key.startswith("train"):
            points = [(row["round"], row[key]) for row in history if key in row]
            ax_loss.plot(*zip(*points, strict=False), marker="o", label=key)
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
