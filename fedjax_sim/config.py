"""Typed experiment configs: YAML (a ``yaml.SafeLoader``) + dotted overrides -> dataclasses.

Every key is checked: an unknown key gets a did-you-mean, a wrong type or a bad value names the
key, the value and what was expected. The defaults are the default demo (FedAvg on Shakespeare
by role); `demo_config` adds the demo's one setting that is not a default, one device per CPU
core (``execution.num_devices: auto``), and ``configs/shakespeare_fedavg.yaml`` spells it out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import shutil
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects, ever) that also reads ``1e-3`` as a float.

    YAML 1.1 wants a dot in exponent floats, so plain ``safe_load`` turns ``1e-3`` into a string.
    """


SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def safe_load(text: str) -> Any:
    """Parses YAML with `SafeLoader`."""
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 - SafeLoader subclass


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and what was expected."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """``name`` picks the loader; ``options`` are its keyword arguments (checked by the loader)."""

    name: str = "shakespeare"
    options: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"sequence_length": 80, "test_fraction": 0.2}
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``name`` picks the model (see `fedjax_sim.models.create_model`); ``options`` its kwargs."""

    name: str = "char_lstm"
    options: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"hidden": 128, "num_layers": 1}
    )


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """``name`` picks the algorithm (see `fedjax_sim.algorithms.ALGORITHMS`); ``options`` are
    the factory's keyword arguments, e.g. ``algorithm: {name: fed_prox, mu: 0.01}``.
    ``algorithm: fed_prox`` is short for ``algorithm: {name: fed_prox}``."""

    name: str = "fed_avg"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer by name (``optax.<name>``) and its keyword arguments.

    ``schedule`` (optional) makes the learning rate a function of the round: an optax schedule
    by name and its arguments, e.g. ``{name: cosine_decay_schedule, decay_steps: 1000}``; its
    initial value is ``learning_rate``.
    """

    name: str = "sgd"
    learning_rate: float = 1.0
    schedule: dict[str, Any] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Local training. ``local_steps`` (fixed steps) wins over ``local_epochs`` when set."""

    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=2.0)
    )
    batch_size: int = 8
    local_epochs: int = 1
    local_steps: int | None = 10
    max_local_steps: int | None = None
    weighting: str | float = "num_examples"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """``sampler``: ``uniform`` (each client equally likely), ``weighted`` (probability
    proportional to the client's number of training examples) or ``full`` (every client, every
    round) or ``poisson`` (each client joins independently with probability size / N, so
    ``size`` is the expected cohort; at most ``max_size`` train, default the mean plus six
    standard deviations; what DP accounting assumes). ``replace``: draw with replacement (a
    client can appear twice in a cohort)."""

    size: int = 10
    sampler: str = "uniform"
    replace: bool = False
    max_size: int | None = None


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP-FedAvg, the short form (McMahan et al. 2018; Andrew et al. 2021).

    Off unless ``noise_multiplier`` or ``target_epsilon`` is set. Then each client's whole
    update is clipped to L2 norm ``clip_norm`` (adaptively towards the ``target_quantile`` of
    the norms when ``adaptive_clipping``), the updates are summed with uniform weights and
    divided by the expected cohort size, and Gaussian noise of std ``z * clip_norm`` is added
    to the sum. ``target_epsilon`` calibrates z for ``rounds`` rounds at ``delta`` (None:
    ``1 / num_clients ** 1.1``) with the ``accountant`` of dp-accounting (``rdp`` or ``pld``).
    Use ``cohort.sampler: poisson`` (what the accountant's amplification assumes; a fixed-size
    cohort is accounted as sampling without replacement under replace-one, RDP only).
    ``noise_cohort_size``: calibrate the noise as if every cohort had this many clients
    (a simulated production cohort; the accounting then uses its sampling rate).

    Example-level DP-SGD inside the clients (independent of the above, reported separately):
    ``example_noise_multiplier`` turns it on; every local step clips each example's gradient
    to ``example_clip_norm`` and adds noise of std ``example_noise_multiplier *
    example_clip_norm`` to their sum (`fedjax_sim.privacy.dp_sgd`); ``example_delta`` (None:
    ``1 / num_training_examples ** 1.1``) is its delta.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip_norm: float = 1.0
    delta: float | None = None
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float | None = None
    noise_cohort_size: int | None = None
    accountant: str = "rdp"
    example_noise_multiplier: float | None = None
    example_clip_norm: float = 1.0
    example_delta: float | None = None

    @property
    def enabled(self) -> bool:
        """User-level DP (the aggregator's clipping and noise) is on."""
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def example_level(self) -> bool:
        """Example-level DP-SGD inside the clients is on."""
        return self.example_noise_multiplier is not None


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """System heterogeneity on a simulated clock (all off by default).

    ``dropout``: probability that a sampled client fails and sends nothing. Each client has a
    fixed speed: ``seconds_per_step`` times a factor drawn once per client from ``speed``
    (``constant``: 1; ``lognormal``: exp(N(0, speed_sigma)); ``uniform``: U[1, 1 + speed_sigma])
    or read from ``trace`` (a ``.npy`` or ``.csv`` file of per-client seconds per step).
    ``deadline`` (simulated seconds): a straggler runs only the local steps that fit.
    """

    dropout: float = 0.0
    speed: str = "constant"
    speed_sigma: float = 0.5
    seconds_per_step: float = 1.0
    trace: str | None = None
    deadline: float | None = None


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """An attack by malicious clients (off unless ``name`` is set; `fedjax_sim.attacks`).

    ``fraction`` of all clients (rounded) are malicious, chosen once from the run's ``seed``.
    ``name``: ``sign_flip`` (scale), ``scaled`` (scale), ``gaussian`` (stddev),
    ``little_is_enough`` (z; default the paper's formula), ``label_flip``, or ``backdoor``
    (target, poison_fraction, boost, trigger_size, trigger_value); the other keys are the
    attack's options, e.g. ``attack: {name: sign_flip, fraction: 0.2, scale: 1.0}``.
    """

    name: str | None = None
    fraction: float = 0.1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How clients run: ``auto`` (sequential map on CPU, vmap on GPU/TPU), ``vmap`` or ``map``.

    ``client_batch_size``: clients per chunk under ``map``. ``num_devices``: shard the cohort
    over this many devices (None: 1, or every device of every process in a multi-process run;
    ``auto``: one XLA:CPU device per core on CPU, every device on a GPU or TPU, at most the
    cohort size; `fedjax_sim.sharding.resolve_num_devices`).
    ``data_placement``: ``device`` (the training arrays live on every device), ``host`` (they
    stay in host memory; each round's rows are gathered and transferred while the previous round
    computes, ``prefetch`` rounds ahead; None: 2, on CPU too, where it hid three quarters of
    the gather's time in `benchmarks/host_prefetch.py`), ``sharded`` (split by clients over the
    devices: each holds one block of clients and trains cohort size / devices clients drawn from
    it, a stratified sample; `fedjax_sim.data.sampling.blocked_uniform_sampler`) or ``auto``
    (host for memory-mapped caches or more than 4 GiB). ``client_state``: ``replicated`` (default),
    ``sharded`` (per-client state: SCAFFOLD's control variates, FedDyn, Ditto, error feedback,
    split over the devices (and processes) by client, 1 / devices of it on each) or ``host``
    (kept in host memory, memory-mapped to sparse files in the workdir's ``client_state/``;
    each round reads and writes only its cohort's rows; one process).
    ``rounds_per_call``: rounds run by one compiled call (a loop over rounds on the device,
    metrics stacked), so tiny models are not bound by the per-round dispatch; the log,
    evaluation and checkpoint rounds still end a call, so the results and ``metrics.jsonl`` are
    those of one round per call. Needs the data on the device.
    """

    client_execution: str = "auto"
    client_batch_size: int | None = None
    num_devices: int | str | None = None
    data_placement: str = "auto"
    prefetch: int | None = None
    rounds_per_call: int = 1
    client_state: str = "replicated"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation cadence. ``max_examples`` caps each evaluated split (None: all).

    ``per_client``: also evaluate every client on its own held-out split and report the
    distribution (percentiles, worst 10%, variance). ``fine_tune_steps`` > 0: personalization
    evaluation, each client fine-tunes the global model for that many local steps first
    (``fine_tune_learning_rate``, default the client learning rate).
    """

    every: int = 50
    batch_size: int = 512
    max_examples: int | None = None
    per_client: bool = False
    fine_tune_steps: int = 0
    fine_tune_learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics are fetched from the device every ``every`` rounds."""

    every: int = 5
    progress: bool = True
    tensorboard: bool = False
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every ``every`` rounds (None: only at the end) and at the end; the last
    ``keep`` are kept. A run started again in the same workdir resumes from the newest."""

    every: int | None = 100
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment."""

    name: str = "shakespeare_fedavg"
    seed: int = 0
    rounds: int = 60
    workdir: str | None = None
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    cohort: CohortConfig = dataclasses.field(default_factory=CohortConfig)
    system: SystemConfig = dataclasses.field(default_factory=SystemConfig)
    aggregator: list | None = None
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    execution: ExecutionConfig = dataclasses.field(default_factory=ExecutionConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


# Values that must be >= 1 (key paths), and > 0.
POSITIVE_INTS = {
    "rounds", "client.batch_size", "client.local_epochs", "client.local_steps",
    "client.max_local_steps", "cohort.size", "execution.client_batch_size",
    "execution.num_devices", "execution.rounds_per_call", "cohort.max_size",
    "privacy.noise_cohort_size", "eval.every", "eval.batch_size", "eval.max_examples", "log.every",
    "checkpoint.every", "checkpoint.keep",
}
CHOICES = {
    "cohort.sampler": ("uniform", "weighted", "full", "poisson"),
    "privacy.accountant": ("rdp", "pld"),
    "execution.client_execution": ("auto", "vmap", "map"),
    "execution.data_placement": ("auto", "device", "host", "sharded"),
    "execution.client_state": ("replicated", "sharded", "host"),
    "system.speed": ("constant", "lognormal", "uniform", "trace"),
}
# Values that must lie in [0, 1), and values that must be > 0.
FRACTIONS = {"system.dropout", "attack.fraction"}
POSITIVE_FLOATS = {"system.seconds_per_step", "system.deadline", "system.speed_sigma",
                   "eval.fine_tune_learning_rate", "privacy.target_epsilon", "privacy.clip_norm",
                   "privacy.delta", "privacy.count_stddev", "privacy.example_clip_norm",
                   "privacy.example_delta"}
OPEN_FRACTIONS = {"privacy.target_quantile", "privacy.delta", "privacy.example_delta"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check_scalar(value: Any, tp: Any, path: str) -> Any:
    """Checks one leaf against its annotation (int, float, str, bool, dict, X | None, unions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_scalar(value, option, path)
            except ConfigError as error:
                errors.append(error)
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"config key {path!r}: expected {expected}, got {value!r}")
    if origin is list or tp is list:
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"config key {path!r}: expected a list of mappings (e.g. "
                              f"[{{name: clip, norm: 1.0}}]), got {value!r}")
        return [dict(v) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {path!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {path!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {path!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {path!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {path!r}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        where = f"config key {prefix!r}" if prefix else "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close \
                else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _validate_value(path, _check_scalar(value, tp, path))
    return cls(**kwargs)


def _validate_value(path: str, value: Any) -> Any:
    if value is None:
        return value
    if path == "execution.num_devices" and isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"config key {path!r}: expected an integer >= 1 or 'auto', "
                              f"got {value!r}")
        return value
    if path in POSITIVE_INTS and value < 1:
        raise ConfigError(f"config key {path!r}: expected an integer >= 1, got {value!r}")
    if path in FRACTIONS and not 0 <= value < 1:
        raise ConfigError(f"config key {path!r}: expected a number in [0, 1), got {value!r}")
    if path in POSITIVE_FLOATS and not 0 < value < math.inf:
        raise ConfigError(f"config key {path!r}: expected a finite number > 0, got {value!r}")
    if path in OPEN_FRACTIONS and not 0 < value < 1:
        raise ConfigError(f"config key {path!r}: expected a number in (0, 1), got {value!r}")
    if path in ("eval.fine_tune_steps", "execution.prefetch", "seed") and value < 0:
        raise ConfigError(f"config key {path!r}: expected an integer >= 0, got {value!r}")
    if path in ("privacy.noise_multiplier", "privacy.example_noise_multiplier") and not (
            0 <= value < math.inf):
        raise ConfigError(f"config key {path!r}: expected a finite number >= 0, got {value!r}")
    if path.endswith("learning_rate") and not (0 < value < math.inf):
        raise ConfigError(
            f"config key {path!r}: expected a finite learning rate > 0, got {value!r}"
        )
    if path in CHOICES and value not in CHOICES[path]:
        close = difflib.get_close_matches(value, CHOICES[path], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"config key {path!r}: {value!r} is not one of {list(CHOICES[path])}{hint}"
        )
    return value


def check_options(section: str, owner: str, options: Mapping[str, Any], valid) -> None:
    """Rejects an option that ``owner`` (a loader, model or optimizer) does not take."""
    valid = sorted(valid)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{section}.{close[0]}'?" if close else ""
            takes = f"valid: {valid}" if valid else f"{owner.split()[-1]} takes no options"
            raise ConfigError(f"unknown config key '{section}.{key}' for {owner}{hint} ({takes})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"client.optimizer.learning_rate=0.1"`` -> (["client", "optimizer", ...], 0.1)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p or not p.isidentifier() for p in parts):
        raise ConfigError(
            f"malformed override {text!r}: expected dotted.key=value, e.g. rounds=50 or "
            "client.optimizer.learning_rate=0.1"
        )
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(error)})") \
            from None
    return parts, value


# Sections whose extra keys are options of the named thing (loader, model, optax function):
# ``dataset: {name: fashion_mnist, alpha: 0.1}`` -> DatasetConfig(name, options={"alpha": 0.1}).
OPEN_SECTIONS = {
    ("algorithm",): AlgorithmConfig,
    ("dataset",): DatasetConfig,
    ("model",): ModelConfig,
    ("client", "optimizer"): OptimizerConfig,
    ("server", "optimizer"): OptimizerConfig,
    ("attack",): AttackConfig,
}


def _declared(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"options"}


def _to_dict(config: Any) -> dict:
    """The nested-dict form, with ``options`` kept apart (the internal form)."""
    return dataclasses.asdict(config)


def _flat_dict(config: Any) -> dict:
    """The YAML form: options flattened into their sections."""
    data = _to_dict(config)
    for path in OPEN_SECTIONS:
        node = data
        for part in path:
            node = node[part]
        node.update(node.pop("options"))
    return data


def _set(data: dict, parts: Sequence[str], value: Any, text: str) -> None:
    """Sets a dotted key in the internal form; keys of open sections go into ``options``."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {part!r} is not a section of keys")
        node = child
        cls = OPEN_SECTIONS.get(tuple(parts[: i + 1]))
        if cls is not None and parts[i + 1] not in _declared(cls) and i + 1 == len(parts) - 1:
            node = node.setdefault("options", {})
    key = parts[-1]
    cls = OPEN_SECTIONS.get(tuple(parts[:-1]))
    if cls is not None and key == "name" and node.get("name") != value:
        node["options"] = {}  # another loader/model/optimizer: the old options do not apply
    node[key] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies dotted overrides to the internal nested dict (in place) and returns it."""
    for text in overrides:
        parts, value = parse_override(text)
        if isinstance(value, str) and OPEN_SECTIONS.get(tuple(parts)) is not None:
            parts = [*parts, "name"]  # `algorithm=fed_prox` sets algorithm.name
        _set(data, parts, value, text)
    return data


def _merge_user(base: dict, user: Mapping, prefix: tuple[str, ...] = ()) -> None:
    """Merges a user's YAML dict (open sections flat) into the internal form."""
    if not isinstance(user, Mapping):
        raise ConfigError(f"config key {'.'.join(prefix)!r}: expected a mapping, got {user!r}")
    cls = OPEN_SECTIONS.get(prefix)
    if cls is not None and "name" in user and user["name"] != base.get("name"):
        base["options"] = {}
    for key, value in user.items():
        path = prefix + (str(key),)
        if isinstance(value, str) and OPEN_SECTIONS.get(path) is not None:
            value = {"name": value}  # `algorithm: fed_prox` is short for {name: fed_prox}
        if cls is not None and key == "options":
            raise ConfigError(
                f"config key {'.'.join(path)!r}: write the options directly under "
                f"{'.'.join(prefix)!r} (e.g. {'.'.join(prefix)}.alpha: 0.1)"
            )
        if cls is not None and key not in _declared(cls):
            base.setdefault("options", {})[key] = _deep_copy(value)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge_user(base[key], value, path)
        else:
            base[key] = _deep_copy(value)


def config_from_dict(data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """Builds a validated `Config` from a YAML-form dict (missing keys take their defaults)."""
    merged = _to_dict(Config())
    if data:
        _merge_user(merged, data)
    apply_overrides(merged, overrides)
    return _build(Config, merged, "")


def check_folder(path: str | Path, what: str = "workdir") -> None:
    """ConfigError when ``path`` cannot become a folder because it, or the nearest of its
    parents that exists, is a file (``what`` names the flag or key, e.g. '--out'). Writes
    nothing."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (its parent {str(candidate)!r} is a file)"
                raise ConfigError(f"{what} {str(path)!r}: expected a folder, but it is not "
                                  f"one{where}; choose another {what}")
            return



def remove_outputs(workdir: Path, names: Sequence[str]) -> None:
    """Deletes the files and folders ``names`` of ``workdir`` (what a command writes there, for
    ``--overwrite``); anything else in it stays."""
    for name in names:
        path = Path(workdir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (ConfigError: missing, not YAML, not a mapping)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; expected a YAML file, e.g. "
                          f"{str(path / 'fashion_mnist_fedavg.yaml')!r}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {error.start}: "
                          f"{error.object[error.start:error.start + 1]!r}); expected a YAML "
                          "file") from None
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: "
                          f"{error.strerror or error}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}"
        ) from None
    if data is None:  # an empty file (or only comments) is a mistake, not "all defaults"
        raise ConfigError(f"config file {str(path)!r} is empty (or holds only comments); expected "
                          "a mapping of config keys, e.g. the files in configs/ (write {} for "
                          "the defaults)")
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return dict(data)


DEMO_OVERRIDES = ("execution.num_devices=auto",)
"""What the default demo sets beyond the defaults: its char-LSTM's rounds run 1.6x faster with
the cohort split over one XLA:CPU device per core (`benchmarks/lstm_recurrence.py`), while the
default stays one device (the same bits on every machine)."""


def demo_config(overrides: Sequence[str] = ()) -> Config:
    """The default demo's config (`fedjax-sim demo`): the defaults plus `DEMO_OVERRIDES`, then
    ``overrides``."""
    return load_config(None, [*DEMO_OVERRIDES, *overrides])


ANALYTICS_KEYS = ("statistic", "heavy_hitters", "histogram", "quantiles")
"""Top-level keys only an analytics config has (`fedjax_sim.analytics.runner`)."""


def refuse_analytics_config(path: str | Path, data: Mapping[str, Any], command: str) -> None:
    """ConfigError naming the file when a run or sweep command is given an analytics config
    (its keys would otherwise be reported one by one as unknown run keys)."""
    found = [key for key in ANALYTICS_KEYS if key in data]
    if found:
        raise ConfigError(f"config file {str(path)!r}: config key {found[0]!r}: this is an "
                          f"analytics config, not a {command} config; run it with "
                          f"`fedjax-sim analytics {path}`")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file (or the defaults when None) and applies overrides."""
    data: Any = {}
    if path is not None:
        data = read_yaml_mapping(path)
        refuse_analytics_config(path, data, "run")
        if "sweep" in data:
            raise ConfigError(f"config file {str(path)!r}: config key 'sweep': this is a sweep "
                              f"config; run it with `fedjax-sim sweep {path}` (or remove the "
                              f"sweep section to run one configuration)")
    return config_from_dict(data, overrides)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_to_yaml(config: Config) -> str:
    """The config in the YAML form ``load_config`` reads back."""
    return yaml.safe_dump(_flat_dict(config), sort_keys=False)
