"""``fedjax-sim analytics CONFIG``: a private statistic of a real federated dataset.

  1. build: the config (every key checked, did-you-mean), the dataset's per-client values;
  2. compute: the statistic round by round (TrieHH's trie levels; one round for one-shot
     statistics) with a progress bar; each round's facts go to ``metrics.jsonl``;
  3. write ``summary.json`` (the released result, epsilon and delta, the exact non-private
     answer for comparison) and ``result.png`` into the workdir.

Config keys (``configs/analytics/*.yaml``)::

  name, seed, workdir
  dataset: {name: shakespeare | fashion_mnist, ...loader options (data_dir, partition, ...)}
  statistic: mean | sum | histogram | quantiles | heavy_hitters
  value: shakespeare: line_length (per line), mean_line_length, lines, words (per role);
         fashion_mnist: label (per image), examples (per client)
  privacy: {epsilon (.inf: no noise), noise_multiplier (instead of epsilon), delta,
            clip_norm, accountant}
  histogram: {low, high, bins, normalize, mean}
  quantiles: {levels: "0.1,0.5,0.9", method: binary_search | adaptive_clipping, low, high,
              resolution, rounds, learning_rate, initial}
  heavy_hitters: {method: triehh | count_sketch, k, max_word_length, theta,
                  clients_per_round, max_prefixes, words_per_client, depth, width, beam,
                  threshold}
  log: {progress, plot}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from fedjax_sim.analytics import heavy_hitters as hh
from fedjax_sim.analytics import mechanisms
from fedjax_sim.analytics.sources import shakespeare_roles
from fedjax_sim.config import (
    Config,
    ConfigError,
    DatasetConfig,
    _build,
    _merge_user,
    apply_overrides,
    check_folder,
    read_yaml_mapping,
)

STATISTICS = ("mean", "sum", "histogram", "quantiles", "heavy_hitters")
VALUES = {
    "shakespeare": {"line_length": "example", "mean_line_length": "client",
                    "lines": "client", "words": "words"},
    "fashion_mnist": {"label": "example", "examples": "client"},
}
NEEDS = {"mean": "client", "sum": "client", "quantiles": "client", "histogram": "example",
         "heavy_hitters": "words"}


@dataclasses.dataclass(frozen=True)
class PrivacySection:
    """``epsilon`` (a target; ``.inf``: no noise) or ``noise_multiplier`` (z), at ``delta``.
    ``clip_norm``: the L2 bound on one client's value (sums, means, histograms)."""

    epsilon: float | None = math.inf
    noise_multiplier: float | None = None
    delta: float = 1e-6
    clip_norm: float = 1.0
    accountant: str = "rdp"


@dataclasses.dataclass(frozen=True)
class HistogramSection:
    """``bins`` equal bins over ``[low, high]``; ``normalize``: each client sends its
    distribution (sums to 1) instead of its counts; ``mean``: release the mean over clients."""

    low: float = 0.0
    high: float = 100.0
    bins: int = 20
    normalize: bool = False
    mean: bool = False


@dataclasses.dataclass(frozen=True)
class QuantilesSection:
    """Quantile ``levels`` (comma-separated). ``binary_search`` on the grid
    ``low:resolution:high``, or ``adaptive_clipping`` (Andrew et al. 2021's estimator: ``rounds``
    geometric steps of ``learning_rate`` from ``initial``)."""

    levels: str | float = "0.1,0.25,0.5,0.75,0.9"
    method: str = "binary_search"
    low: float = 0.0
    high: float = 100.0
    resolution: float = 1.0
    rounds: int = 200
    learning_rate: float = 0.2
    initial: float = 1.0


@dataclasses.dataclass(frozen=True)
class HeavyHittersSection:
    """TrieHH or the one-shot ``count_sketch``; ``k`` words are reported. TrieHH at a finite
    epsilon: ``theta`` None: Corollary 1's smallest, else at least that; ``clients_per_round``
    None: the most that the target epsilon allows at that theta, else at most that. At
    epsilon inf: ``theta`` None: 1, ``clients_per_round`` None: every client."""

    method: str = "triehh"
    k: int = 20
    max_word_length: int = 10
    theta: int | None = None
    clients_per_round: int | None = None
    max_prefixes: int = 1024
    words_per_client: int = 8
    depth: int = 3
    width: int = 32768
    beam: int = 256
    threshold: float | None = None


@dataclasses.dataclass(frozen=True)
class LogSection:
    progress: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class AnalyticsConfig:
    """A federated analytics query (see the module docstring for the keys)."""

    name: str = "shakespeare_heavy_hitters"
    seed: int = 0
    workdir: str | None = None
    dataset: DatasetConfig = dataclasses.field(
        default_factory=lambda: DatasetConfig(name="shakespeare", options={}))
    statistic: str = "heavy_hitters"
    value: str = "words"
    privacy: PrivacySection = dataclasses.field(default_factory=PrivacySection)
    histogram: HistogramSection = dataclasses.field(default_factory=HistogramSection)
    quantiles: QuantilesSection = dataclasses.field(default_factory=QuantilesSection)
    heavy_hitters: HeavyHittersSection = dataclasses.field(default_factory=HeavyHittersSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)


def _choice(path: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key {path!r}: {value!r} is not one of {list(choices)}{hint}")


def _positive(path: str, value: Any, integer: bool = False) -> None:
    if value is not None and not (0 < value < math.inf):
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise ConfigError(f"config key {path!r}: expected {kind}, got {value!r}")


def quantile_levels(config: AnalyticsConfig) -> list[float]:
    raw = config.quantiles.levels
    try:
        levels = [float(raw)] if isinstance(raw, float) else [
            float(x) for x in str(raw).replace(" ", "").split(",") if x]
    except ValueError:
        levels = []
    if not levels or any(not 0 < q <= 1 for q in levels):
        raise ConfigError(f"config key 'quantiles.levels': expected comma-separated numbers "
                          f"in (0, 1], e.g. \"0.1,0.5,0.9\", got {raw!r}")
    return levels


def validate(config: AnalyticsConfig) -> AnalyticsConfig:
    """Checks values that the types alone do not (raises ConfigError naming the key)."""
    _choice("statistic", config.statistic, STATISTICS)
    _choice("dataset.name", config.dataset.name, tuple(VALUES))
    values = VALUES[config.dataset.name]
    _choice("value", config.value, tuple(values))
    if values[config.value] != NEEDS[config.statistic]:
        fitting = [v for v, kind in values.items() if kind == NEEDS[config.statistic]]
        raise ConfigError(
            f"config key 'value': {config.value!r} does not fit statistic "
            f"{config.statistic!r}, which needs a {NEEDS[config.statistic]}-level value; on "
            f"{config.dataset.name} use one of {fitting}")
    privacy = config.privacy
    if privacy.noise_multiplier is not None:
        if not 0 <= privacy.noise_multiplier < math.inf:
            raise ConfigError(f"config key 'privacy.noise_multiplier': expected a finite number "
                              f">= 0, got {privacy.noise_multiplier!r}")
    elif privacy.epsilon is None or not privacy.epsilon > 0:
        raise ConfigError(f"config key 'privacy.epsilon': expected a number > 0 (.inf: no "
                          f"noise) or set privacy.noise_multiplier, got {privacy.epsilon!r}")
    if not 0 < privacy.delta < 1:
        raise ConfigError(f"config key 'privacy.delta': expected a number in (0, 1), got "
                          f"{privacy.delta!r}")
    if not privacy.clip_norm > 0:
        raise ConfigError(f"config key 'privacy.clip_norm': expected a number > 0, got "
                          f"{privacy.clip_norm!r}")
    _choice("privacy.accountant", privacy.accountant, ("rdp", "pld"))
    for key in ("histogram.low", "histogram.high", "quantiles.low", "quantiles.high"):
        section, field = key.split(".")
        value = getattr(getattr(config, section), field)
        if not math.isfinite(value):  # NaN passes every comparison below unnoticed
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
    if config.histogram.high <= config.histogram.low:
        raise ConfigError(f"config key 'histogram.high': must exceed histogram.low "
                          f"({config.histogram.low}), got {config.histogram.high}")
    _positive("histogram.bins", config.histogram.bins, True)
    if config.statistic == "quantiles":
        quantile_levels(config)
        if config.quantiles.high <= config.quantiles.low:
            raise ConfigError(f"config key 'quantiles.high': must exceed quantiles.low "
                              f"({config.quantiles.low}), got {config.quantiles.high}")
        _positive("quantiles.resolution", config.quantiles.resolution)
        _choice("quantiles.method", config.quantiles.method,
                ("binary_search", "adaptive_clipping"))
        _positive("quantiles.rounds", config.quantiles.rounds, True)
        _positive("quantiles.initial", config.quantiles.initial)
        if config.quantiles.method == "adaptive_clipping" and any(
                q >= 1 for q in quantile_levels(config)):
            raise ConfigError("config key 'quantiles.levels': adaptive_clipping estimates "
                              "levels in (0, 1), not 1 (use binary_search for the maximum)")
    section = config.heavy_hitters
    _choice("heavy_hitters.method", section.method, ("triehh", "count_sketch"))
    if (config.statistic == "heavy_hitters" and section.method == "triehh"
            and privacy.noise_multiplier is not None):
        raise ConfigError("config key 'privacy.noise_multiplier': TrieHH adds no noise (its "
                          "privacy is sampling and a threshold); set privacy.epsilon instead")
    for key in ("k", "max_word_length", "theta", "clients_per_round", "max_prefixes",
                "words_per_client", "depth", "width", "beam"):
        _positive(f"heavy_hitters.{key}", getattr(section, key), True)
    return config


ANALYTICS_FIELDS = {field.name for field in dataclasses.fields(AnalyticsConfig)}
RUN_FIELDS = {field.name for field in dataclasses.fields(Config)} | {"sweep"}


def load_analytics_config(path: str | os.PathLike | None = None,
                          overrides: Sequence[str] = ()) -> AnalyticsConfig:
    """Reads a YAML analytics config and applies dotted overrides (errors: ConfigError)."""
    data: Any = {}
    if path is not None:
        data = read_yaml_mapping(path)
        run_keys = [key for key in data if key not in ANALYTICS_FIELDS and key in RUN_FIELDS]
        if run_keys:  # a run or sweep config: say so, not "unknown key" for each of its keys
            command = "sweep" if "sweep" in data else "run"
            raise ConfigError(f"config file {str(path)!r}: config key {run_keys[0]!r}: this is "
                              f"a {command} config, not an analytics config; run it with "
                              f"`fedjax-sim {command} {path}`")
    merged = dataclasses.asdict(AnalyticsConfig())
    _merge_user(merged, data)
    apply_overrides(merged, overrides)
    return validate(_build(AnalyticsConfig, merged, ""))


def config_yaml(config: AnalyticsConfig) -> str:
    data = dataclasses.asdict(config)
    data["dataset"].update(data["dataset"].pop("options"))
    return yaml.safe_dump(data, sort_keys=False)


# --- the query -------------------------------------------------------------------------------


def _noise(config: AnalyticsConfig, queries: int) -> float:
    privacy = config.privacy
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    try:
        return mechanisms.noise_for_epsilon(float(privacy.epsilon), queries, privacy.delta,
                                            privacy.accountant)
    except ValueError as error:
        raise ConfigError(f"config key 'privacy.epsilon': {error}") from None


def _dataset_options(config: AnalyticsConfig, allowed: Sequence[str]) -> dict:
    from fedjax_sim.config import check_options

    check_options("dataset", f"dataset {config.dataset.name!r}", config.dataset.options,
                  allowed)
    return dict(config.dataset.options)


def load_values(config: AnalyticsConfig) -> dict[str, Any]:
    """The per-client data the statistic reads: ``{"kind", "num_clients", ...}``."""
    if config.dataset.name == "shakespeare":
        options = _dataset_options(config, ["data_dir"])
        roles = shakespeare_roles(options.get("data_dir"))
        lengths, offsets = roles.line_lengths()
        sizes = np.diff(offsets)
        per_client = {
            "lines": sizes.astype(np.float32),
            "mean_line_length": np.asarray(
                [np.mean([len(x) for x in lines]) if lines else 0.0 for lines in roles.lines],
                np.float32),
        }
        out = {"num_clients": roles.num_clients, "client_ids": roles.client_ids}
        if config.value == "line_length":
            return {**out, "examples": lengths, "offsets": offsets}
        if config.value == "words":
            words = [[w for line in lines for w in hh.tokenize(line)] for lines in roles.lines]
            return {**out, "words": hh.words_per_client_data(
                words, roles.client_ids, config.heavy_hitters.max_word_length)}
        return {**out, "client_values": per_client[config.value]}
    from fedjax_sim.simulation.loop import build_dataset

    dataset = build_dataset(config)  # the loader's options are checked there
    train = dataset.train
    out = {"num_clients": train.num_clients, "client_ids": list(map(str, train.client_ids))}
    if config.value == "label":
        return {**out, "examples": train.arrays["y"].astype(np.float32),
                "offsets": train.offsets}
    return {**out, "client_values": train.client_sizes.astype(np.float32)}


def compute(config: AnalyticsConfig, values: Mapping[str, Any], on_round=None
            ) -> tuple[dict[str, Any], list[dict]]:
    """Runs the statistic; returns ``(result for summary.json, per-round rows)``."""
    key = jax.random.PRNGKey(config.seed)
    privacy = config.privacy
    statistic = config.statistic
    if statistic in ("mean", "sum"):
        x = values["client_values"]
        z = _noise(config, 1)
        function = mechanisms.dp_mean if statistic == "mean" else mechanisms.dp_sum
        release = function(x, clip_norm=privacy.clip_norm, noise_multiplier=z, key=key,
                           delta=privacy.delta, accountant=privacy.accountant)
        clipped = np.minimum(np.abs(x), privacy.clip_norm) * np.sign(x)
        exact = float(x.mean() if statistic == "mean" else x.sum())
        exact_clipped = float(clipped.mean() if statistic == "mean" else clipped.sum())
        result = {"value": float(release.value), "exact": exact, "exact_clipped": exact_clipped}
        rows = [{"round": 1, "value": float(release.value)}]
    elif statistic == "histogram":
        section = config.histogram
        edges = np.linspace(section.low, section.high, section.bins + 1)
        counts = mechanisms.client_histograms(values["examples"], values["offsets"], edges,
                                              normalize=section.normalize)
        z = _noise(config, 1)
        release = mechanisms.dp_histogram(counts, clip_norm=privacy.clip_norm,
                                          noise_multiplier=z, key=key, mean=section.mean,
                                          delta=privacy.delta, accountant=privacy.accountant)
        exact = counts.mean(axis=0) if section.mean else counts.sum(axis=0)
        result = {"edges": edges.tolist(), "value": release.value.tolist(),
                  "exact": exact.tolist(), "clients_clipped": int(np.sum(
                      np.linalg.norm(counts, axis=1) > privacy.clip_norm))}
        rows = [{"round": 1, "total": float(np.sum(release.value))}]
    elif statistic == "quantiles":
        section = config.quantiles
        levels = quantile_levels(config)
        x = values["client_values"]
        if section.method == "adaptive_clipping":
            steps = section.rounds
            z = _noise(config, len(levels) * steps)
            release = mechanisms.adaptive_quantiles(
                x, levels, rounds=section.rounds, initial=section.initial,
                learning_rate=section.learning_rate, count_stddev=z / 2, key=key,
                delta=privacy.delta, accountant=privacy.accountant)
        else:
            _, steps = mechanisms.quantile_grid(section.low, section.high, section.resolution)
            z = _noise(config, len(levels) * steps)
            release = mechanisms.dp_quantiles(x, levels, low=section.low, high=section.high,
                                              resolution=section.resolution,
                                              noise_multiplier=z, key=key,
                                              delta=privacy.delta,
                                              accountant=privacy.accountant)
        exact = mechanisms.exact_quantiles(np.clip(x, section.low, section.high), levels)
        # the search answers on the grid: the exact quantile rounded up to a grid point
        on_grid = section.low + section.resolution * np.ceil(
            np.round((exact - section.low) / section.resolution, 6))
        result = {"levels": levels, "value": release.value.tolist(), "exact": exact.tolist(),
                  "method": section.method, "steps": steps}
        if section.method == "binary_search":
            result["exact_on_grid"] = on_grid.tolist()
        rows = [{"round": 1, **{f"q{q:g}": float(v) for q, v in zip(
            levels, release.value, strict=True)}}]
    else:
        return _heavy_hitters(config, values, key, on_round)
    if on_round is not None:
        on_round(rows[-1])
    result.update(epsilon=release.epsilon, delta=release.delta,
                  noise_multiplier=release.noise_multiplier, queries=release.queries,
                  noise_stddev=release.noise_stddev)
    return result, rows


def triehh_setting(config: AnalyticsConfig, n: int) -> tuple[int, int]:
    """TrieHH's ``(theta, clients_per_round)`` for ``n`` clients (`HeavyHittersSection`);
    ConfigError naming the key when they do not fit."""
    section, privacy = config.heavy_hitters, config.privacy
    levels = section.max_word_length + 1
    m = section.clients_per_round
    if m is not None and m > n:
        raise ConfigError(f"config key 'heavy_hitters.clients_per_round': {m} is more than "
                          f"the {n} clients")
    if math.isfinite(privacy.epsilon):  # Corollary 1 at the target: theta, then m
        theta = section.theta
        try:
            theta, largest = hh.triehh_parameters(privacy.epsilon, privacy.delta, n, levels,
                                                  theta=theta)
        except ValueError as error:
            key = "privacy.epsilon" if theta is None or theta >= hh.triehh_smallest_theta(
                privacy.epsilon, privacy.delta, levels) else "heavy_hitters.theta"
            hint = " (heavy_hitters.theta=null: Corollary 1's)" if key.endswith(
                "theta") else ""
            raise ConfigError(f"config key {key!r}: {error}{hint}") from None
        if m is not None and m > largest:
            raise ConfigError(
                f"config key 'heavy_hitters.clients_per_round': {m} clients a round at "
                f"theta {theta} spend epsilon "
                f"{hh.triehh_epsilon(theta, m, n, levels):.3g}, over privacy.epsilon "
                f"{privacy.epsilon:g}; at most {largest} fit")
        m = largest if m is None else m
    else:  # no privacy: every client votes every round unless told otherwise
        theta = section.theta or 1
        m = m or n
    return theta, m


def _heavy_hitters(config, values, key, on_round):
    section, privacy = config.heavy_hitters, config.privacy
    data = values["words"]
    n = data.num_clients
    exact = hh.exact_counts(data)
    if section.method == "triehh":
        theta, m = triehh_setting(config, n)
        found = hh.triehh(data, theta=theta, clients_per_round=m,
                          max_prefixes=section.max_prefixes, key=key, delta=privacy.delta,
                          on_round=on_round)
    else:
        z = _noise(config, 1)
        found = hh.count_sketch_heavy_hitters(
            data, words_per_client=section.words_per_client, depth=section.depth,
            width=section.width, noise_multiplier=z, threshold=section.threshold,
            beam=section.beam, key=key, delta=privacy.delta, accountant=privacy.accountant)
        if on_round is not None:
            on_round(found.history[-1])
    k = section.k
    truth = [w for w, _ in exact.most_common(k)]
    top = found.words[:k]
    hits = len(set(top) & set(truth))
    result = {
        "words": top, "counts": [round(c, 2) for c in found.counts[:k]],
        "exact_counts": [exact.get(w, 0) for w in top],
        "exact_top": truth, "exact_top_counts": [exact[w] for w in truth],
        "precision": hits / len(top) if top else 0.0, "recall": hits / len(truth),
        "discovered": len(found.words), "epsilon": found.epsilon, "delta": found.delta,
        "rounds": found.rounds, **found.extra,
    }
    return result, found.history


# --- the command -------------------------------------------------------------------------------


def _prepare_workdir(workdir: Path, config: AnalyticsConfig, overwrite: bool) -> None:
    check_folder(workdir)
    saved = workdir / "config.yaml"
    text = config_yaml(dataclasses.replace(config, workdir=None))
    if saved.exists() and saved.read_text() != text and not overwrite:
        raise ConfigError(f"workdir {str(workdir)!r} holds a query of a different config; pass "
                          "--overwrite to replace it, or choose another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)


def run_analytics(config: AnalyticsConfig | str | os.PathLike | None = None, *,
                  overrides: Sequence[str] = (), workdir: str | os.PathLike | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Runs an analytics config; writes ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and
    ``result.png`` into the workdir and returns the summary."""
    if not isinstance(config, AnalyticsConfig):
        config = load_analytics_config(config, overrides)
    start = time.perf_counter()
    values = load_values(config)  # every config or data error comes before any write
    if config.statistic == "heavy_hitters" and config.heavy_hitters.method == "triehh":
        triehh_setting(config, values["num_clients"])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(workdir or config.workdir or Path("runs") / f"{config.name}-{stamp}")
    _prepare_workdir(workdir, config, overwrite)
    print(f"fedjax_sim: {config.name}: workdir {workdir}")
    print(f"fedjax_sim: {config.dataset.name}: {values['num_clients']} clients; "
          f"{config.statistic} of {config.value}")
    total = (config.heavy_hitters.max_word_length + 1
             if config.statistic == "heavy_hitters" and config.heavy_hitters.method == "triehh"
             else 1)
    progress = None
    if config.log.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, unit="round", desc=config.name, dynamic_ncols=True)
    rows: list[dict] = []
    with open(workdir / "metrics.jsonl", "w") as log_file:
        def on_round(row):
            row = {**row, "wall_time": round(time.perf_counter() - start, 3)}
            rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: v for k, v in row.items()
                                      if k in ("prefixes", "words")})
        try:
            result, _ = compute(config, values, on_round)
            if progress is not None and progress.n < total:  # TrieHH's trie stopped growing
                progress.total = progress.n
                progress.refresh()
        finally:
            if progress is not None:
                progress.close()
    summary = {"name": config.name, "dataset": config.dataset.name,
               "statistic": config.statistic, "value": config.value,
               "clients": values["num_clients"], "result": result,
               "seconds": round(time.perf_counter() - start, 2),
               "backend": jax.default_backend(), "workdir": str(workdir)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.log.plot:
        plot_result(config, result, workdir / "result.png")
    _print_result(config, result)
    print(f"fedjax_sim: wrote {workdir}/metrics.jsonl, summary.json"
          + (", result.png" if config.log.plot else ""))
    return summary


def _epsilon_text(result) -> str:
    eps = result["epsilon"]
    return "not private (epsilon = inf)" if math.isinf(eps) else (
        f"epsilon {eps:.3g} at delta {result['delta']:g}")


def values_note(result) -> str:
    return f"{round(result['clients_per_round'] / result['sampling_rate'])}"


def _print_result(config, result) -> None:
    print(f"fedjax_sim: {config.statistic} of {config.value}: {_epsilon_text(result)}")
    if config.statistic == "heavy_hitters":
        if result["method"] == "triehh":
            print(f"  TrieHH, theta {result['theta']}, {result['clients_per_round']} of "
                  f"{values_note(result)} clients a round; estimate = votes x n / m (each "
                  "sampled client votes for one of its words), exact = occurrences")
        else:
            print(f"  count sketch, noise std {result['noise_stddev']:.3g}, threshold "
                  f"{result['threshold']:.3g}; estimate = clients with the word among their "
                  f"{result['words_per_client']} most frequent, exact = occurrences")
        if result["method"] == "triehh" and result["sampling_rate"] < 1 and (
                not result["delta_condition"] or not result["sampling_condition"]):
            print(f"  warning: theta {result['theta']} with {result['clients_per_round']} "
                  f"clients a round is outside Corollary 1 at delta {result['delta']:g} "
                  "((theta-3)/(theta-2) theta! >= 1/delta, m (theta + 1) <= n): no guarantee, "
                  "epsilon inf")
        print(f"  {'word':12s} {'estimate':>10s} {'exact':>8s}")
        for word, count, exact in zip(result["words"], result["counts"],
                                      result["exact_counts"], strict=True):
            print(f"  {word:12s} {count:10.1f} {exact:8d}")
        print(f"  top-{config.heavy_hitters.k}: precision {result['precision']:.2f}, recall "
              f"{result['recall']:.2f} against the exact counts")
    elif config.statistic in ("mean", "sum"):
        print(f"  released {result['value']:.4f}; exact {result['exact']:.4f} (clipped "
              f"{result['exact_clipped']:.4f})")
    elif config.statistic == "quantiles":
        grid = result.get("exact_on_grid", [None] * len(result["levels"]))
        for q, v, e, g in zip(result["levels"], result["value"], result["exact"], grid,
                              strict=True):
            print(f"  q{q:g}: released {v:.4g}, exact {e:.4g}"
                  + ("" if g is None else f" (on the grid {g:g})"))
    else:
        print(f"  {len(result['value'])} bins, released total {sum(result['value']):.4g}, "
              f"exact total {sum(result['exact']):.4g}")


def plot_result(config: AnalyticsConfig, result: Mapping[str, Any], path: Path) -> None:
    """The released statistic next to the exact one, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    title = f"{config.name}: {config.statistic} of {config.value}, {_epsilon_text(result)}"
    if config.statistic == "heavy_hitters":
        words = result["words"][::-1]
        y = np.arange(len(words))
        ax.barh(y - 0.2, result["counts"][::-1], height=0.4, label="estimate")
        ax.barh(y + 0.2, result["exact_counts"][::-1], height=0.4, label="exact")
        ax.set_yticks(y, words)
        ax.set_xlabel("count")
    elif config.statistic == "histogram":
        edges = np.asarray(result["edges"])
        centers, widths = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
        ax.bar(centers, result["value"], width=widths * 0.9, label="released", alpha=0.7)
        ax.step(edges, np.r_[result["exact"], result["exact"][-1]], where="post",
                color="k", label="exact")
        ax.set_xlabel(config.value)
    elif config.statistic == "quantiles":
        ax.plot(result["levels"], result["value"], "o-", label="released")
        ax.plot(result["levels"], result["exact"], "x--", label="exact")
        ax.set_xlabel("quantile level")
        ax.set_ylabel(config.value)
    else:
        ax.bar(["released", "exact", "exact (clipped)"],
               [result["value"], result["exact"], result["exact_clipped"]])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if config.statistic != "mean" and config.statistic != "sum":
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
