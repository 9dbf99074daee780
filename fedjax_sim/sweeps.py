"""Sweeps: many configurations of one experiment trained in one compiled program.

  fedjax-sim sweep configs/sweeps/fashion_mnist_fedavg_lr.yaml [--grid key=v1,v2 ...]
                   [--seeds N] [key=value ...]

A sweep config is a run config plus a ``sweep:`` section::

  sweep:
    grid:                                   # every combination (a Cartesian product)
      client.optimizer.learning_rate: [0.01, 0.03, 0.1, 0.3]
      server.optimizer.learning_rate: [0.5, 1.0]
    random:                                 # and/or samples (seeded by sweep.random_seed)
      num: 8
      keys: {algorithm.mu: {log_uniform: [0.001, 1.0]}, client.batch_size: {choice: [10, 20]}}
    seeds: 2                                # or a list of seeds, e.g. [0, 1]
    metric: test/accuracy                   # what "best" means (default: test/accuracy)
    mode: max                               # max or min
    execution: auto                         # by_seed, vmap, map or auto (see below)
    batch_size: null                        # map: configurations vmapped per step of the map
    devices: 1                              # shard the sweep axis over this many devices
                                            # (auto: one XLA:CPU device per core on CPU)

How it runs: every configuration is built exactly as `run` would build it, and configurations
whose round step is the same program (the same jaxpr with the same constants, so they differ
only in arrays of the state: learning rates and other injected hyperparameters, weight
exponents, noise multipliers, ... and the seed, which sets the initial parameters and the root
key of cohorts, batches and client randomness) and that train on the same data form a
*group*: their states are stacked along
a leading sweep axis and one jitted step trains them all. ``sweep.execution``: ``vmap``
(the round vmapped over the configurations), ``map`` (``lax.map``: one after another), or
``by_seed`` (the configurations of one seed share its cohort, batches and client keys, so the
round draws them once and vmaps only the algorithm states: each client step reads one batch
for all of them; the seeds one after another); ``auto`` picks ``map`` on CPU, ``vmap`` on
GPU/TPU (see `resolve_execution`). Keys that change shapes or code
(model, cohort size, algorithm, a hyperparameter the algorithm keeps as a Python constant)
split the sweep into groups, each its own program. The grouping is checked, not assumed: a key
that a user believes is an array but is a constant only costs another group.

Each configuration's ``metrics.jsonl`` has the rows `run` writes for it (same seed, same
numbers within float tolerance); a configuration that diverges (NaN/inf) is frozen and reported
in ``sweep.csv`` without stopping the others. Outputs: ``configs/NNN/{config.yaml,metrics.jsonl}``,
``sweep.csv`` (one row per configuration), ``sweep.json`` (the mean and std over seeds of
every combination), ``sweep.png`` (the final metric against each swept key) and ``best.yaml``
(the best combination, runnable with ``fedjax-sim run``). Checkpoints of the stacked states make
a sweep resumable like a run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import difflib
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from fedjax_sim.config import (
    Config,
    ConfigError,
    _yaml_problem,
    check_folder,
    config_from_dict,
    config_to_yaml,
    parse_override,
    read_yaml_mapping,
    refuse_analytics_config,
    remove_outputs,
    safe_load,
)
from fedjax_sim.simulation.round_step import SWEEP_AXIS

EXECUTIONS = ("auto", "by_seed", "vmap", "map")
MODES = ("max", "min")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
SWEEP_KEYS = ("grid", "random", "random_seed", "seeds", "metric", "mode", "execution",
              "batch_size", "devices")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """The ``sweep:`` section. See the module docstring for the meaning of each field."""

    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    random: dict[str, Any] | None = None
    random_seed: int = 0
    seeds: list[int] | None = None
    metric: str = "test/accuracy"
    mode: str = "max"
    execution: str = "auto"
    batch_size: int | None = None
    devices: int | str = 1


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep: its position, the swept values and the full config."""

    index: int
    values: dict[str, Any]
    config: Config

    @property
    def label(self) -> str:
        return f"{self.index:03d}"


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``"client.optimizer.learning_rate=0.01,0.1"`` -> (key, [0.01, 0.1])."""
    key, sep, _ = text.partition("=")
    parts, _ = parse_override(key + sep)  # checks the key's form (and that there is a '=')
    raw = text.partition("=")[2]
    values = []
    for item in _split_top_level(raw):
        if not item.strip():
            raise ConfigError(f"--grid {text!r}: empty value in the comma-separated list")
        try:
            values.append(safe_load(item))
        except yaml.YAMLError as error:
            raise ConfigError(f"--grid {text!r}: value {item!r} is not valid YAML "
                              f"({_yaml_problem(error)})") from None
    return ".".join(parts), values


def _split_top_level(raw: str) -> list[str]:
    """``"[32,32],[64,64],0.1"`` -> ``["[32,32]", "[64,64]", "0.1"]``: the commas outside
    brackets and braces separate the values (a list value keeps its own commas)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(raw):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(raw[start:i])
            start = i + 1
    items.append(raw[start:])
    return items


def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = (),
               grid: Sequence[str] = (), seeds: int | None = None
               ) -> tuple[dict[str, Any], SweepSpec]:
    """Reads a sweep config: ``(the run config's YAML dict, its sweep spec)``.

    ``grid`` (``key=v1,v2`` strings) adds or replaces grid keys; ``seeds`` replaces the seeds
    by ``0 .. seeds-1`` offsets from the config's seed.
    """
    data = read_yaml_mapping(path)
    refuse_analytics_config(path, data, "sweep")
    section = dict(data.pop("sweep", None) or {})
    for text in overrides:  # sweep.<key>=value overrides set the sweep section
        parts, value = parse_override(text)
        if parts[0] == "sweep":
            if len(parts) != 2:
                raise ConfigError(f"override {text!r}: set a whole sweep key, e.g. "
                                  f"sweep.seeds=2 or sweep.execution=map")
            section[parts[1]] = value
    spec = sweep_spec(section, where=f"config file {str(path)!r}: ")
    if grid:
        extra = dict(parse_grid_option(text) for text in grid)
        spec = dataclasses.replace(spec, grid={**spec.grid, **extra})
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds: expected a positive number of seeds, got {seeds}")
        spec = dataclasses.replace(spec, seeds=list(range(seeds)))
    return data, spec


def run_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of the run config (those of the ``sweep:`` section, ``sweep.<key>=...``,
    are read by `load_sweep`)."""
    return [text for text in overrides if not text.strip().startswith("sweep.")]


def sweep_spec(section: Mapping[str, Any], where: str = "") -> SweepSpec:
    """A `SweepSpec` from the ``sweep:`` mapping, each key checked (ConfigError)."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}config key 'sweep': expected a mapping, got {section!r}")
    for key in section:
        if key not in SWEEP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}config key 'sweep.{key}': unknown; expected one of "
                              f"{list(SWEEP_KEYS)}{hint}")
    grid = section.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{where}config key 'sweep.grid': expected a mapping of dotted keys "
                          f"to lists of values, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}config key 'sweep.grid.{key}': expected a non-empty "
                              f"list of values, got {values!r}")
    random = section.get("random")
    if random is not None:
        if (not isinstance(random, Mapping) or not isinstance(random.get("num"), int)
                or random["num"] < 1 or not isinstance(random.get("keys"), Mapping)):
            raise ConfigError(f"{where}config key 'sweep.random': expected {{num: N >= 1, keys: "
                              f"{{key: {{uniform|log_uniform: [low, high]}} or {{choice: "
                              f"[...]}}}}}}, got {random!r}")
        for key, dist in random["keys"].items():
            if (not isinstance(dist, Mapping) or len(dist) != 1
                    or next(iter(dist)) not in DISTRIBUTIONS):
                raise ConfigError(f"{where}config key 'sweep.random.keys.{key}': expected one "
                                  f"of {list(DISTRIBUTIONS)}, e.g. {{log_uniform: [0.001, 1]}},"
                                  f" got {dist!r}")
            name, arg = next(iter(dist.items()))
            if name == "choice" and not (isinstance(arg, list) and arg):
                raise ConfigError(f"{where}config key 'sweep.random.keys.{key}.choice': "
                                  f"expected a non-empty list, got {arg!r}")
            if name != "choice" and not (isinstance(arg, list) and len(arg) == 2
                                         and all(isinstance(v, int | float) for v in arg)
                                         and arg[0] <= arg[1]):
                raise ConfigError(f"{where}config key 'sweep.random.keys.{key}.{name}': "
                                  f"expected [low, high] with low <= high, got {arg!r}")
            if name == "log_uniform" and not arg[0] > 0:
                raise ConfigError(f"{where}config key 'sweep.random.keys.{key}.log_uniform': "
                                  f"expected low > 0, got {arg!r}")
    seeds = section.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"{where}config key 'sweep.seeds': expected >= 1, got {seeds}")
        seeds = list(range(seeds))
    elif seeds is not None and not (isinstance(seeds, list) and seeds
                                    and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{where}config key 'sweep.seeds': expected a count or a list of "
                          f"integer seeds, got {seeds!r}")
    for key, allowed in (("mode", MODES), ("execution", EXECUTIONS)):
        if key in section and section[key] not in allowed:
            raise ConfigError(f"{where}config key 'sweep.{key}': {section[key]!r}: expected "
                              f"one of {list(allowed)}")
    batch_size = section.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ConfigError(f"{where}config key 'sweep.batch_size': expected an integer >= 1 "
                          f"(configurations per chunk of the map) or null, got {batch_size!r}")
    random_seed = section.get("random_seed", 0)
    if isinstance(random_seed, bool) or not isinstance(random_seed, int) or random_seed < 0:
        raise ConfigError(f"{where}config key 'sweep.random_seed': expected an integer >= 0, "
                          f"got {random_seed!r}")
    devices = section.get("devices", 1)
    if devices != "auto" and (not isinstance(devices, int) or isinstance(devices, bool)
                              or devices < 1):
        raise ConfigError(f"{where}config key 'sweep.devices': expected an integer >= 1 or "
                          f"'auto', got {devices!r}")
    return SweepSpec(grid=dict(grid), random=dict(random) if random else None,
                     random_seed=random_seed, seeds=seeds,
                     metric=str(section.get("metric", "test/accuracy")),
                     mode=section.get("mode", "max"),
                     execution=section.get("execution", "auto"), batch_size=batch_size,
                     devices=devices)


def expand(data: Mapping[str, Any], spec: SweepSpec, overrides: Sequence[str] = ()
           ) -> list[SweepPoint]:
    """Every configuration of the sweep: grid x random samples x seeds, in that order.

    Seeds are offsets added to the config's ``seed`` (``seeds: 2`` with ``seed: 0`` runs seeds
    0 and 1), or to a swept ``seed`` (``grid: {seed: [3, 7]}`` runs seeds 3 and 7). Each
    configuration is the base config with the overrides, then its values.
    """
    overrides = run_overrides(overrides)
    base = config_from_dict(data, overrides)
    combos: list[dict[str, Any]] = [dict(zip(spec.grid, values, strict=True))
                                    for values in itertools.product(*spec.grid.values())]
    if spec.random:
        rng = np.random.default_rng(spec.random_seed)
        samples = []
        for _ in range(spec.random["num"]):
            sample = {}
            for key, dist in spec.random["keys"].items():
                name, arg = next(iter(dist.items()))
                if name == "choice":
                    sample[key] = arg[int(rng.integers(len(arg)))]
                elif name == "uniform":
                    sample[key] = float(rng.uniform(arg[0], arg[1]))
                else:
                    sample[key] = float(math.exp(rng.uniform(math.log(arg[0]),
                                                             math.log(arg[1]))))
            samples.append(sample)
        combos = [{**c, **s} for c in combos for s in samples]
    seeds = spec.seeds or [0]
    points = []
    for combo in combos:
        for offset in seeds:
            # A swept ``seed`` (grid or random key) replaces the config's seed; the offsets of
            # ``sweep.seeds`` are added to whichever seed the configuration has.
            seed = combo.get("seed", base.seed)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ConfigError(f"sweep configuration {combo}: config key 'seed': expected an "
                                  f"integer, got {seed!r}")
            values = {**combo, "seed": seed + offset}
            texts = [f"{key}={json.dumps(value)}" for key, value in values.items()]
            try:
                config = config_from_dict(data, [*overrides, *texts])
            except ConfigError as error:
                raise ConfigError(f"sweep configuration {values}: {error}") from None
            points.append(SweepPoint(len(points), values, config))
    return points


# --------------------------------------------------------------------------------------------
# Grouping and the stacked step


def program_fingerprint(experiment) -> tuple[str, list[np.ndarray]]:
    """The round step's jaxpr text and constants: equal for two configurations exactly when one
    compiled program can run both (their differences are arrays of the state)."""
    step = experiment.round_step
    state = jax.eval_shape(experiment.init_state)  # shapes only: nothing to compute
    closed = jax.make_jaxpr(step.fn)(state, step.data, step.offsets)
    jaxpr = closed.jaxpr
    try:  # dead code (e.g. a client optimizer's init value, replaced by the state's) is no
        # difference; JAX's DCE is internal API, so without it configurations only group less
        from jax._src.interpreters import partial_eval as pe

        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    except Exception:  # noqa: BLE001 - an optimisation of the grouping, never needed
        pass
    consts = [np.asarray(c) for c in closed.consts]
    config = experiment.config  # the host loop's cadences must agree too
    loop = (config.rounds, config.eval.every, config.log.every, config.checkpoint.every,
            config.checkpoint.keep)
    return f"{loop}\n{jaxpr}", consts


def _same_training_data(a, b) -> bool:
    """Whether two configurations train on the same data (`FederatedData`). The round step
    takes its data as an argument, so two programs can be equal while their data differ (another
    partition or data attack of equal shapes): a group trains on its first member's data."""
    if a is b:
        return True
    if a.arrays.keys() != b.arrays.keys() or not np.array_equal(a.offsets, b.offsets):
        return False
    return all(np.shape(a.arrays[k]) == np.shape(b.arrays[k])
               and np.array_equal(np.asarray(a.arrays[k]), np.asarray(b.arrays[k]))
               for k in a.arrays)


def _same_program(a: tuple[str, list[np.ndarray]], b: tuple[str, list[np.ndarray]]) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
               for x, y in zip(a[1], b[1], strict=True))


@dataclasses.dataclass
class _Member:
    """What the loop keeps of one configuration's experiment (not its copy of the data)."""

    point: SweepPoint
    evaluate: Any
    privacy: Any
    example_privacy: Any
    init_state: Any


@dataclasses.dataclass
class _Group:
    experiment: Any  # the first member's experiment: its round step runs the whole group
    members: list[_Member]
    fingerprint: tuple[str, list[np.ndarray]]


def build_groups(points: Sequence[SweepPoint]) -> list[_Group]:
    """Builds every configuration (loading each distinct dataset and building each distinct
    model once) and groups those that share one program and the same training data."""
    from fedjax_sim.data.validation import validate_dataset
    from fedjax_sim.simulation.loop import build_dataset, build_experiment, build_model

    datasets: dict[str, Any] = {}
    models: dict[str, Any] = {}  # one Model per dataset and model section: compiled once
    groups: list[_Group] = []
    for point in points:
        config = point.config
        if config.execution.data_placement == "host":
            raise ConfigError("config key 'execution.data_placement': a sweep trains from data "
                              "on the device; use device or auto")
        if config.execution.client_state == "host":
            raise ConfigError("config key 'execution.client_state': 'host' keeps one run's "
                              "per-client stores in host files; a sweep stacks every "
                              "configuration's state on the device: use replicated")
        if config.execution.num_devices == "auto":  # a sweep spreads configurations instead
            config = dataclasses.replace(config, execution=dataclasses.replace(
                config.execution, num_devices=None))
        if isinstance(config.execution.num_devices, int) and config.execution.num_devices > 1:
            raise ConfigError("config key 'execution.num_devices': a sweep shards "
                              "configurations, not clients, over devices; set sweep.devices")
        data_key = json.dumps(dataclasses.asdict(config.dataset), sort_keys=True, default=str)
        if data_key not in datasets:
            dataset = build_dataset(config)
            validate_dataset(dataset)
            datasets[data_key] = dataset
        model_key = data_key + json.dumps(dataclasses.asdict(config.model), sort_keys=True,
                                          default=str)
        if model_key not in models:
            models[model_key] = build_model(config, datasets[data_key].info)
        experiment = build_experiment(config, dataset=datasets[data_key],
                                      model=models[model_key])
        if experiment.round_step.feeder is not None:
            raise ConfigError("config key 'execution.data_placement': the dataset is kept on "
                              "the host (memory-mapped or large); a sweep needs it on the "
                              "device: set execution.data_placement=device")
        fingerprint = program_fingerprint(experiment)
        member = _Member(point, experiment.evaluate, experiment.privacy,
                         experiment.example_privacy, experiment.init_state)
        for group in groups:
            if (_same_program(group.fingerprint, fingerprint) and _same_training_data(
                    group.experiment.dataset.train, experiment.dataset.train)):
                group.members.append(member)
                break
        else:
            groups.append(_Group(experiment, [member], fingerprint))
    return groups


def resolve_execution(execution: str) -> str:
    """``auto``: ``vmap`` on GPU/TPU (one wide program); ``map`` on XLA:CPU, which reproduces
    each configuration's run bit for bit. The vmapped round stops every client's local loop at
    the longest client's step count (a while loop that vmap turns into every step under a
    select) and measured slower than ``map``; ``by_seed``, which shares each seed's cohort and
    batches, ran rounds 1.9x faster than ``map`` for logistic regression and 1.07x for the 2NN
    MLP, and no faster for the char-LSTM, but agrees with the runs only to float rounding
    (`benchmarks/sweep_throughput.py`; the README's Sweeps section)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution={execution!r}: expected one of {EXECUTIONS}")
    if execution == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return execution


def seed_layout(keys: Sequence[np.ndarray]) -> tuple[list[int], list[bool], int]:
    """The sweep axis of ``by_seed``: the configurations of each root key side by side.

    Returns ``(slots, real, seeds)``: slot j holds configuration ``slots[j]``; the slots form
    ``seeds`` rows of equal width, one per distinct key (in order of first appearance), a row
    with fewer configurations padded with copies of its last one (``real`` False: trained and
    thrown away, never reported)."""
    rows: dict[bytes, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(np.asarray(key).tobytes(), []).append(i)
    width = max(len(row) for row in rows.values())
    slots, real = [], []
    for row in rows.values():
        slots += row + [row[-1]] * (width - len(row))
        real += [True] * len(row) + [False] * (width - len(row))
    return slots, real, len(rows)


def stacked_step(round_fn, execution: str = "vmap", mesh=None, batch_size: int | None = None,
                 seeds: int = 1, compiler_options=None):
    """``(states, alive, data, offsets) -> (states, metrics)`` over a leading sweep axis, jitted
    with the states donated. A configuration whose ``alive`` is False keeps its state.

    ``round_fn``: `RoundStep.fn` for ``map``, `RoundStep.sweep_fn` for ``vmap`` (vmapped with
    the axis name `SWEEP_AXIS`), `RoundStep.shared_fn` for ``by_seed`` (the sweep axis is
    ``seeds`` equal rows, one per root key: `seed_layout`; a ``lax.map`` over the rows).
    ``batch_size`` (``map``): configurations vmapped together in each step of the map
    (``lax.map(batch_size=...)``): a vmap in chunks, bounding memory. ``compiler_options``:
    the XLA options of the round step (`RoundStep.compiler_options`)."""

    def step(states, alive, data, offsets):
        if execution == "map":
            new, metrics = jax.lax.map(lambda s: round_fn(s, data, offsets), states,
                                       batch_size=batch_size)
        elif execution == "by_seed":
            rows = jax.tree.map(lambda x: x.reshape((seeds, -1) + x.shape[1:]), states)
            new, metrics = jax.lax.map(lambda s: round_fn(s, data, offsets), rows)
            new, metrics = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                                        (new, metrics))
        else:
            new, metrics = jax.vmap(round_fn, in_axes=(0, None, None),
                                    axis_name=SWEEP_AXIS)(states, data, offsets)

        def keep(n, o):
            return jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

        return jax.tree.map(keep, new, states), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=compiler_options)
    from jax.sharding import NamedSharding, PartitionSpec

    sweep = NamedSharding(mesh, PartitionSpec("sweep"))
    replicated = NamedSharding(mesh, PartitionSpec())
    if execution == "map":
        # Each device maps over its own configurations. Left to the partitioner, a lax.map over
        # the sharded axis gathers every state and runs the whole map on every device.
        step = jax.shard_map(step, mesh=mesh, check_vma=False,
                             in_specs=(PartitionSpec("sweep"),) * 2 + (PartitionSpec(),) * 2,
                             out_specs=(PartitionSpec("sweep"),) * 2)
    return jax.jit(step, donate_argnums=0, in_shardings=(sweep, sweep, replicated, replicated),
                   out_shardings=(sweep, sweep), compiler_options=compiler_options)


def stack_states(states: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states: Any, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], states)


# --------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class SweepResult:
    workdir: Path
    rows: list[dict[str, Any]]  # one per configuration, as in sweep.csv
    best: dict[str, Any]
    summary: dict[str, Any]


def default_workdir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-sweep-{stamp}"


def sweep(path: str | os.PathLike, overrides: Sequence[str] = (), *, grid: Sequence[str] = (),
          seeds: int | None = None, workdir: str | os.PathLike | None = None,
          overwrite: bool = False, progress: bool | None = None) -> SweepResult:
    """Runs the sweep config at ``path``; see the module docstring."""
    data, spec = load_sweep(path, overrides, grid, seeds)
    return run_sweep(data, spec, overrides, workdir=workdir, overwrite=overwrite,
                     progress=progress)


def run_sweep(data: Mapping[str, Any], spec: SweepSpec, overrides: Sequence[str] = (), *,
              workdir: str | os.PathLike | None = None, overwrite: bool = False,
              progress: bool | None = None) -> SweepResult:
    """Runs every configuration of ``spec`` over the run config ``data`` (YAML form)."""
    from fedjax_sim.sharding import resolve_num_devices

    start = time.perf_counter()
    points = expand(data, spec, overrides)
    base = points[0].config
    workdir = Path(workdir or base.workdir or default_workdir(base.name))
    if spec.devices != 1:  # before JAX starts: CPU devices are created only then
        if spec.devices == "auto" and spec.execution == "by_seed":
            spec = dataclasses.replace(spec, devices=1)  # by_seed runs on one device
        else:
            spec = dataclasses.replace(spec, devices=resolve_num_devices(spec.devices,
                                                                         len(points)))
    groups = build_groups(points)  # every config or data error comes before any write
    if spec.execution == "by_seed" and spec.devices > 1:
        raise ConfigError("config key 'sweep.execution': by_seed runs on one device; with "
                          f"sweep.devices={spec.devices} use vmap or map")
    resume = _prepare_workdir(workdir, data, spec, overrides, overwrite)
    execution = resolve_execution(spec.execution)
    print(f"fedjax_sim: sweep {base.name}: {len(points)} configurations in {len(groups)} "
          f"program(s) ({', '.join(str(len(g.members)) for g in groups)} configurations each; "
          f"{execution}); workdir {workdir}")
    show = base.log.progress if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=base.rounds * len(groups), unit="round", desc=f"{base.name} sweep",
                   dynamic_ncols=True)
    status: dict[int, dict[str, Any]] = {}
    setup_seconds = time.perf_counter() - start
    try:
        for number, group in enumerate(groups):
            status.update(_train_group(group, number, workdir, spec, execution, resume, bar))
    finally:
        if bar is not None:
            bar.close()
    rows, best, aggregated = _collect(points, status, workdir, spec)
    summary = {
        "name": base.name,
        "configurations": len(points),
        "programs": len(groups),
        "execution": execution,
        "devices": spec.devices,
        "setup_seconds": round(setup_seconds, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "metric": spec.metric,
        "mode": spec.mode,
        "best": best,
        "combinations": aggregated,
        "backend": jax.default_backend(),
    }
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if base.log.plot:
        plot_sweep(rows, list(spec.grid) + list((spec.random or {}).get("keys", {})),
                   spec.metric, workdir / "sweep.png", title=f"{base.name} sweep")
    diverged = [r for r in rows if r["status"] != "ok"]
    line = (f"fedjax_sim: sweep done: {len(points)} configurations in "
            f"{summary['total_seconds']:.1f} s")
    if best:
        line += f"; best {spec.metric} {best['mean']:.4f} with {best['values']}"
    if diverged:
        line += f"; {len(diverged)} diverged ({', '.join(r['config'] for r in diverged)})"
    print(line)
    written = ["sweep.csv", "sweep.json", *(["best.yaml"] if best else []),
               *(["sweep.png"] if base.log.plot else []), "configs/NNN/metrics.jsonl"]
    print(f"fedjax_sim: wrote {workdir}/{', '.join(written)}")
    _check_metric_reported(spec, [status[point.index] for point in points])
    return SweepResult(workdir, rows, best, summary)


def _check_metric_reported(spec: SweepSpec, statuses: Sequence[Mapping[str, Any]]) -> None:
    """ConfigError when no configuration reported ``sweep.metric`` although one trained to
    the end (whose last round is evaluated): a misspelt name ranks nothing and writes no
    best.yaml. The sweep's other outputs are written by then."""
    histories = [info["history"] for info in statuses]
    if (any(_metric_values(history, spec.metric) for history in histories)
            or all(info["diverged_at"] is not None for info in statuses)):
        return
    reported = sorted({key for history in histories for row in history for key in row}
                      - {"round", "wall_time"})
    close = difflib.get_close_matches(spec.metric, reported, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config key 'sweep.metric': no configuration reported {spec.metric!r}"
                      f"{hint} (the metrics: {reported}); nothing was ranked and no best.yaml "
                      "written (sweep.csv and sweep.json were)")


SWEEP_OUTPUTS = ("sweep_spec.json", "sweep.csv", "sweep.json", "sweep.png", "best.yaml",
                 "configs", "checkpoints")
"""What a sweep writes into its workdir (``--overwrite`` replaces these, nothing else)."""


def _prepare_workdir(workdir: Path, data, spec: SweepSpec, overrides, overwrite: bool) -> bool:
    """Creates the workdir; True when it holds this very sweep (to resume)."""
    check_folder(workdir)
    text = json.dumps({"config": data, "sweep": dataclasses.asdict(spec),
                       "overrides": list(overrides)}, sort_keys=True, default=str, indent=1)
    saved = workdir / "sweep_spec.json"
    if saved.exists():
        if saved.read_text() == text:
            return True
        if not overwrite:
            raise ConfigError(f"workdir {str(workdir)!r} holds another sweep; pass --overwrite "
                              "to replace it, or choose another --workdir")
        remove_outputs(workdir, SWEEP_OUTPUTS)  # other files in it stay
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)
    return False


def _train_group(group: _Group, number: int, workdir: Path, spec: SweepSpec, execution: str,
                 resume: bool, bar) -> dict[int, dict[str, Any]]:
    """Trains one group's configurations together; returns each one's status."""
    from fedjax_sim.simulation.checkpoint import Checkpointer

    experiment = group.experiment
    config = experiment.config  # cadences and rounds: equal within a group (same program)
    members = group.members
    count = len(members)
    devices = spec.devices
    mesh = None
    if devices > 1:
        from jax.sharding import Mesh

        if devices > jax.device_count():
            raise ConfigError(f"config key 'sweep.devices': {devices} devices requested, "
                              f"{jax.device_count()} available")
        mesh = Mesh(np.array(jax.devices()[:devices]), ("sweep",))
    states = [m.init_state() for m in members]
    # The sweep axis: slot j trains configuration slots[j]; padding slots (copies, never
    # reported) fill the devices' shares, or by_seed's rows of one root key each.
    seeds = 1
    if execution == "by_seed":
        slots, real, seeds = seed_layout([np.asarray(state.key) for state in states])
    else:
        padded = -(-count // devices) * devices  # pad the sweep axis to the devices
        slots = list(range(count)) + [count - 1] * (padded - count)
        real = [True] * count + [False] * (padded - count)
    slot_of = {member: slot for slot, member in reversed(list(enumerate(slots)))}
    states = stack_states([states[member] for member in slots])
    alive = np.array(real)
    round_step = experiment.round_step
    round_fn = {"vmap": round_step.sweep_fn, "by_seed": round_step.shared_fn}.get(
        execution, round_step.fn)
    step = stacked_step(round_fn, execution, mesh,
                        spec.batch_size if execution == "map" else None, seeds,
                        round_step.compiler_options)
    folders = [workdir / "configs" / m.point.label for m in members]
    checkpointer = Checkpointer(workdir / "checkpoints" / f"group_{number:02d}",
                                keep=config.checkpoint.keep)
    diverged: dict[int, int] = {}
    histories: list[list[dict]] = [[] for _ in members]
    done = 0
    if resume and checkpointer.latest_round() is not None:
        states, host = checkpointer.restore(states)
        if host.get("slots", slots) != slots:
            raise ConfigError(f"sweep group {number}: its checkpoint lays the configurations "
                              f"out as {host['slots']}, this run as {slots} (another "
                              "config key 'sweep.execution' or backend); resume with the "
                              "execution that wrote it, or pass --overwrite")
        done = int(host["round"])
        diverged = {int(k): v for k, v in host["diverged"].items()}
        for i, folder in enumerate(folders):
            path = folder / "metrics.jsonl"
            with open(path, "a+b") as log_file:
                log_file.truncate(int(host["offsets"][i]))
            histories[i] = [json.loads(line) for line in path.read_text().splitlines()]
        alive[[slot_of[i] for i in diverged]] = False
        print(f"fedjax_sim: sweep group {number}: resuming after round {done}")
    else:
        for member, folder in zip(members, folders, strict=True):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.yaml").write_text(
                config_to_yaml(dataclasses.replace(member.point.config, workdir=None)))
            (folder / "metrics.jsonl").write_text("")
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        states = jax.device_put(states, NamedSharding(mesh, PartitionSpec("sweep")))
    if bar is not None and done:
        bar.update(done)
    data, offsets = experiment.round_step.data, experiment.round_step.offsets
    logs = [open(folder / "metrics.jsonl", "a") for folder in folders]  # noqa: SIM115
    clock_offset = max((h[-1]["wall_time"] for h in histories if h), default=0.0)
    start = time.perf_counter()
    pending = []
    alive_device = None  # alive on the device, sent again when a configuration diverges
    every = config.checkpoint.every
    try:
        for round_index in range(done + 1, config.rounds + 1):
            if alive_device is None:
                alive_device = jnp.asarray(alive)
            states, metrics = step(states, alive_device, data, offsets)
            pending.append(metrics)
            last = round_index == config.rounds
            evaluate_now = round_index % config.eval.every == 0 or last
            checkpoint_now = last or (every is not None and round_index % every == 0)
            if round_index % config.log.every and not (evaluate_now or checkpoint_now):
                continue
            fetched = jax.device_get(pending)
            # Evaluation reads each configuration's state: from the device it lives on, or,
            # when the sweep axis is sharded, from one host copy (eager indexing of an array
            # sharded over devices aborted XLA:CPU once in a test run).
            evaluated = (states if mesh is None or not evaluate_now
                         else jax.tree.map(np.asarray, jax.device_get(states)))
            first = round_index - len(pending) + 1
            pending = []
            now = clock_offset + time.perf_counter() - start
            for i, member in enumerate(members):
                slot = slot_of[i]
                if not alive[slot]:
                    continue
                new_rows = []
                for offset, m in enumerate(fetched):
                    row = {"round": first + offset, "wall_time": round(now, 3),
                           **{k: float(v[slot]) for k, v in m.items()}}
                    if _diverged(row):
                        diverged[i] = row["round"]
                        break
                    if member.privacy is not None and member.privacy.accountant == "rdp":
                        row["privacy/epsilon"] = member.privacy.epsilon(row["round"])
                    new_rows.append(row)
                if i in diverged:
                    alive[slot], alive_device = False, None
                    _write_rows(logs[i], new_rows)
                    histories[i].extend(new_rows)
                    continue
                if evaluate_now:
                    state_i = unstack_state(evaluated, slot)
                    new_rows[-1].update(member.evaluate(state_i.algorithm))
                    if member.privacy is not None and "privacy/epsilon" not in new_rows[-1]:
                        new_rows[-1]["privacy/epsilon"] = member.privacy.epsilon(round_index)
                    if member.example_privacy is not None:
                        member.example_privacy.count(state_i.key, round_index)
                        new_rows[-1]["privacy/example_epsilon"] = (
                            member.example_privacy.epsilon())
                    if _diverged(new_rows[-1]):
                        diverged[i] = round_index
                        alive[slot], alive_device = False, None
                        new_rows.pop()
                _write_rows(logs[i], new_rows)
                histories[i].extend(new_rows)
            if checkpoint_now:
                checkpointer.save(round_index, states, {
                    "round": round_index, "diverged": {str(k): v for k, v in diverged.items()},
                    "offsets": [log.tell() for log in logs], "slots": slots})
            if bar is not None:
                bar.update(len(fetched))
                bar.set_postfix(_best_so_far(histories, spec))
            if not alive.any():
                break
    finally:
        for log in logs:
            log.close()
        checkpointer.close()
    return {m.point.index: {"diverged_at": diverged.get(i), "group": number,
                            "history": histories[i]}
            for i, m in enumerate(members)}


def _diverged(row: Mapping[str, float]) -> bool:
    return row.get("state/nonfinite", 0.0) > 0 or any(
        not math.isfinite(v) for v in row.values())


def _write_rows(log_file, rows: list[dict]) -> None:
    for row in rows:
        log_file.write(json.dumps(row) + "\n")
    log_file.flush()


def _metric_values(history: list[dict], metric: str) -> list[float]:
    return [row[metric] for row in history if metric in row]


def _best_so_far(histories: list[list[dict]], spec: SweepSpec) -> dict[str, str]:
    values = [v for h in histories for v in _metric_values(h, spec.metric)]
    if not values:
        return {}
    best = max(values) if spec.mode == "max" else min(values)
    return {f"best {spec.metric}": f"{best:.4f}"}


def _collect(points: Sequence[SweepPoint], status: Mapping[int, Mapping[str, Any]],
             workdir: Path, spec: SweepSpec):
    """Writes sweep.csv and best.yaml; returns (rows, best, per-combination statistics)."""
    swept = [k for k in points[0].values if k != "seed"]
    rows = []
    for point in points:
        info = status[point.index]
        history = info["history"]
        values = _metric_values(history, spec.metric)
        final = history[-1] if history else {}
        row = {
            "config": point.label,
            "group": info["group"],
            **{key: point.values[key] for key in swept},
            "seed": point.values["seed"],
            "status": ("ok" if info["diverged_at"] is None
                       else f"diverged at round {info['diverged_at']}"),
            "rounds": int(final.get("round", 0)),
            f"final {spec.metric}": values[-1] if values and info["diverged_at"] is None
            else None,
            f"best {spec.metric}": ((max(values) if spec.mode == "max" else min(values))
                                    if values else None),
            "final train/loss": final.get("train/loss"),
        }
        rows.append(row)
    with open(workdir / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # Combinations over seeds: a diverged seed makes the combination diverged.
    combos: dict[str, dict[str, Any]] = {}
    for point, row in zip(points, rows, strict=True):
        key = json.dumps({k: point.values[k] for k in swept}, sort_keys=True)
        entry = combos.setdefault(key, {"values": {k: point.values[k] for k in swept},
                                        "finals": [], "configs": [], "diverged": False})
        entry["configs"].append(row["config"])
        entry["diverged"] |= row["status"] != "ok"
        if row[f"final {spec.metric}"] is not None:
            entry["finals"].append(row[f"final {spec.metric}"])
    aggregated = []
    for entry in combos.values():
        finals = entry.pop("finals")
        entry["seeds"] = len(entry["configs"])
        entry["mean"] = float(np.mean(finals)) if finals and not entry["diverged"] else None
        entry["std"] = float(np.std(finals)) if finals and not entry["diverged"] else None
        aggregated.append(entry)
    ranked = [e for e in aggregated if e["mean"] is not None]
    best: dict[str, Any] = {}
    if ranked:
        best = (max if spec.mode == "max" else min)(ranked, key=lambda e: e["mean"])
        point = next(p for p in points if p.label == best["configs"][0])
        config = dataclasses.replace(point.config, workdir=None, seed=points[0].config.seed)
        (workdir / "best.yaml").write_text(
            f"# best of the sweep {points[0].config.name} by {spec.metric} ({spec.mode}, mean "
            f"over {best['seeds']} seed(s)): {best['mean']:.4f}\n" + config_to_yaml(config))
    return rows, best, aggregated


def plot_sweep(rows: list[dict], keys: Sequence[str], metric: str, path: Path,
               title: str = "") -> None:
    """The final metric against each swept key (one panel per key), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k != "seed"] or ["seed"]
    column = f"final {metric}"
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r.get(key), r[column]) for r in rows if r[column] is not None]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in points)
        if numeric and points:
            xs = np.array([x for x, _ in points], float)
            ax.scatter(xs, [y for _, y in points], s=18, alpha=0.7)
            if (xs > 0).all() and xs.max() / xs.min() >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points], s=18)
            ax.set_xticks(range(len(labels)), labels)
        diverged = [r.get(key) for r in rows if r[column] is None]
        if diverged:
            ax.set_title(f"{len(diverged)} diverged", fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
