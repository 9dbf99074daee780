"""``fedjax-sim analytics`` end to end on the real Shakespeare plays (and Fashion-MNIST), and its
one-line errors."""

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA, needs_shared_data

from fedjax_sim.analytics import tokenize
from fedjax_sim.analytics.sources import shakespeare_roles
from fedjax_sim.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "analytics"
PLAYS = "shakespeare/SOURCES.tsv"


@pytest.fixture
def shared_data(monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))


def role_lines():
    """The roles' lines (parsed by the dataset's parser, once per process)."""
    return shakespeare_roles(str(SHARED_DATA)).lines


def exact_word_counts():
    """Word counts of every line, counted here independently of the analytics code."""
    counts = collections.Counter()
    for lines in role_lines():
        for line in lines:
            counts.update(w[:6] for w in tokenize(line))
    return counts


@needs_shared_data(PLAYS)
def test_heavy_hitters_config_runs_on_real_shakespeare(tmp_path, capsys, shared_data):
    workdir = tmp_path / "hh"
    args = ["analytics", str(CONFIGS / "shakespeare_heavy_hitters.yaml"), "log.progress=false",
            "heavy_hitters.max_word_length=6", "heavy_hitters.k=10",
            "heavy_hitters.max_prefixes=256", "--workdir", str(workdir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    result = summary["result"]
    assert summary["clients"] == 1390 and result["epsilon"] == float("inf")
    exact = exact_word_counts()
    assert result["exact_top"] == [w for w, _ in exact.most_common(10)]
    assert result["exact_counts"] == [exact[w] for w in result["words"]]
    assert {"the", "and", "i"} <= set(result["words"])
    for word, count in zip(result["words"], result["counts"], strict=True):
        assert f"{word:12s} {count:10.1f}" in out  # printed with its estimated count
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 1 and rows[0]["votes"] == 1390  # every role votes a letter
    assert (workdir / "result.png").stat().st_size > 1000
    assert (workdir / "config.yaml").exists()


@needs_shared_data(PLAYS)
def test_line_length_histogram_matches_numpy(tmp_path, shared_data):
    workdir = tmp_path / "lines"
    args = ["analytics", str(CONFIGS / "shakespeare_line_lengths.yaml"), "log.progress=false",
            "privacy.epsilon=.inf", "log.plot=false", "--workdir", str(workdir)]
    assert main(args) == 0
    edges = np.linspace(0, 80, 17)
    shares = [np.histogram([len(x) for x in lines], edges)[0] / len(lines)
              for lines in role_lines()]
    assert len(shares) == 1390
    result = json.loads((workdir / "summary.json").read_text())["result"]
    np.testing.assert_allclose(result["value"], np.mean(shares, axis=0), atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("statistic=histogramm", "did you mean 'histogram'"),
    ("heavy_hitters.methd=triehh", "did you mean 'heavy_hitters.method'"),
    ("value=label", "'value': 'label' is not one of"),
    ("statistic=mean", "does not fit statistic 'mean'"),
    ("privacy.delta=2", "'privacy.delta'"),
    ("quantiles.levels=0,1.5", "'quantiles.levels'"),
    ("dataset.data_dir=/nonexistent", "SOURCES.tsv"),
    ("privacy.noise_multiplier=1.0", "TrieHH adds no noise"),
])
def test_bad_input_exits_2_with_one_line(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / ("shakespeare_line_length_quantiles.yaml" if "levels" in override
                        else "shakespeare_heavy_hitters.yaml")
    assert main(["analytics", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_analytics_config_loads(path):
    from fedjax_sim.analytics.runner import load_analytics_config

    config = load_analytics_config(path)
    assert config.name == path.stem


@pytest.mark.parametrize("override", ["histogram.low=.nan", "histogram.high=.inf",
                                      "quantiles.low=.nan", "quantiles.high=.nan"])
def test_a_bound_that_is_not_finite_names_the_key(override):
    """A NaN bound passed `high <= low` (NaN compares False) and released a histogram of
    nothing (exact total 0)."""
    from fedjax_sim.analytics.runner import load_analytics_config
    from fedjax_sim.config import ConfigError

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}': expected a finite number"):
        load_analytics_config(CONFIGS / "shakespeare_line_lengths.yaml", [override])


@pytest.mark.parametrize("command, config, says", [
    ("analytics", "configs/fashion_mnist_fedavg.yaml", "this is a run config"),
    ("analytics", "configs/sweeps/fashion_mnist_fedavg_lr.yaml", "this is a sweep config"),
    ("sweep", "configs/analytics/shakespeare_heavy_hitters.yaml", "this is an analytics config"),
])
def test_a_config_of_another_command_is_named_as_such(command, config, says, capsys, tmp_path,
                                                      monkeypatch):
    """A run config given to `analytics` said "unknown config key 'log.every'; valid keys:
    plot, progress", an analytics config given to `run` or `sweep` "unknown config key
    'privacy.epsilon'; did you mean 'privacy.target_epsilon'?"."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main([command, config, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file {config!r}" in err and says in err
    assert not (tmp_path / "w").exists()


def corollary_1_epsilon(theta, m, n=1390, levels=7):
    return levels * math.log(1.0 / (1.0 - theta * m / n))


@needs_shared_data(PLAYS)
@pytest.mark.parametrize("theta, expected", [("null", (10, 70)), ("12", (12, 59))])
def test_private_triehh_on_real_shakespeare_stays_within_the_target(theta, expected, tmp_path,
                                                                     shared_data):
    """TrieHH at epsilon 5 on the 1,390 roles (L = 7 rounds): Corollary 1's theta is 10 at
    delta 1e-6. A theta of 12 was used with the clients per round computed for theta 10 (70),
    which spends epsilon 6.49 > 5; the clients per round now follow the theta used (59)."""
    workdir = tmp_path / "private"
    args = ["analytics", str(CONFIGS / "shakespeare_heavy_hitters.yaml"), "log.progress=false",
            "log.plot=false", "heavy_hitters.max_word_length=6", "heavy_hitters.max_prefixes=256",
            "privacy.epsilon=5", f"heavy_hitters.theta={theta}", "--workdir", str(workdir)]
    assert main(args) == 0
    result = json.loads((workdir / "summary.json").read_text())["result"]
    theta_used, m = expected
    assert (result["theta"], result["clients_per_round"]) == (theta_used, m)
    assert corollary_1_epsilon(theta_used, m) <= 5 < corollary_1_epsilon(theta_used, m + 1)
    assert result["epsilon"] == pytest.approx(corollary_1_epsilon(theta_used, m), rel=1e-12)
    assert result["delta_condition"] is True
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["votes"] <= m for row in rows)  # one vote per sampled role and round


@needs_shared_data(PLAYS)
@pytest.mark.parametrize("overrides, message", [
    # the config's theta 5 (for epsilon .inf) was used with Corollary 1's 71 roles a round
    # for theta 10: "epsilon 3.24 at delta 1e-06", a bound that does not hold at that delta
    ([], "config key 'heavy_hitters.theta': theta 5 is below the 10 that Corollary 1 needs"),
    (["heavy_hitters.theta=null", "heavy_hitters.clients_per_round=72"],
     "'heavy_hitters.clients_per_round': 72 clients a round at theta 10 spend epsilon 8.03, "
     "over privacy.epsilon 8; at most 71 fit"),
    (["heavy_hitters.theta=null", "privacy.epsilon=0.05"],
     "config key 'privacy.epsilon': epsilon 0.05 is too small for 1390 clients"),
])
def test_private_triehh_refuses_parameters_beyond_the_target(overrides, message, capsys,
                                                             tmp_path, shared_data):
    assert 11 * math.log(1 / (1 - 10 * 72 / 1390)) > 8 >= 11 * math.log(1 / (1 - 10 * 71 / 1390))
    args = ["analytics", str(CONFIGS / "shakespeare_heavy_hitters.yaml"), "privacy.epsilon=8",
            *overrides, "--workdir", str(tmp_path / "w")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "w").exists()
