"""Configs: YAML + dotted overrides -> validated dataclasses; every bad input names its key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedjax_sim.config import Config, ConfigError, config_to_yaml, demo_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_demo_config_file_equals_the_defaults_plus_the_demos_devices():
    from_file = load_config(CONFIGS / "shakespeare_fedavg.yaml")
    assert from_file == demo_config()
    assert from_file == dataclasses.replace(Config(), execution=dataclasses.replace(
        Config().execution, num_devices="auto"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    (tmp_path / "c.yaml").write_text(config_to_yaml(config))
    assert load_config(tmp_path / "c.yaml") == config


def test_overrides_reach_nested_keys_and_options():
    config = load_config(None, ["rounds=7", "client.optimizer.learning_rate=0.1",
                                "client.optimizer.momentum=0.9", "dataset.test_fraction=0.3",
                                "cohort.size=4", "client.local_steps=null"])
    assert config.rounds == 7
    assert config.client.optimizer.learning_rate == 0.1
    assert config.client.optimizer.options == {"momentum": 0.9}
    assert config.dataset.options["test_fraction"] == 0.3
    assert config.client.local_steps is None


def test_changing_a_name_drops_the_old_options():
    config = load_config(None, ["model.name=mlp"])
    assert config.model == dataclasses.replace(config.model, name="mlp", options={})
    config = load_config(None, ["model.name=mlp", "model.hidden=[64]"])
    assert config.model.options == {"hidden": [64]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["client.batchsize=3"], "did you mean 'client.batch_size'"),
        (["client.batch_size=0"], "'client.batch_size': expected an integer >= 1, got 0"),
        (["rounds=ten"], "'rounds': expected an integer, got 'ten'"),
        (["rounds=2.5"], "'rounds': expected an integer"),
        (["client.optimizer.learning_rate=0"], "expected a finite learning rate > 0"),
        (["server.optimizer.learning_rate=-1"], "expected a finite learning rate > 0"),
        (["server.optimizer.learning_rate=.nan"], "expected a finite learning rate > 0"),
        (["cohort.sampler=uniformm"], "did you mean 'uniform'"),
        (["execution.client_execution=gpu"], "'execution.client_execution'"),
        (["log.progress=maybe"], "expected true or false"),
        (["rounds"], "malformed override 'rounds'"),
        (["client..batch_size=3"], "malformed override"),
        (["=3"], "malformed override"),
        (["rounds.x=3"], "'rounds' is not a section"),
        (["sed=1"], "did you mean 'seed'"),
        (["execution.num_devices=cores"], "'execution.num_devices': expected an integer >= 1 "
                                          "or 'auto', got 'cores'"),
        (["execution.num_devices=0"], "'execution.num_devices': expected an integer >= 1"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "opts.yaml").write_text(yaml.safe_dump({"dataset": {"options": {"a": 1}}}))
    with pytest.raises(ConfigError, match="write the options directly"):
        load_config(tmp_path / "opts.yaml")
    # safe_load only: a python object tag is refused, never constructed
    (tmp_path / "evil.yaml").write_text("rounds: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")


def test_exponent_notation_reads_as_a_number():
    config = load_config(None, ["client.optimizer.learning_rate=1e-3", "client.optimizer.eps=1e-8"])
    assert config.client.optimizer.learning_rate == 1e-3
    assert config.client.optimizer.options == {"eps": 1e-8}


def test_algorithm_section_shorthand_options_and_errors():
    from fedjax_sim.config import ConfigError, config_from_dict

    assert config_from_dict({"algorithm": "fed_prox"}).algorithm.name == "fed_prox"
    config = config_from_dict({"algorithm": {"name": "fed_prox", "mu": 0.1}})
    assert config.algorithm.options == {"mu": 0.1}
    config = config_from_dict({}, ["algorithm=scaffold"])
    assert config.algorithm.name == "scaffold" and config.algorithm.options == {}
    config = config_from_dict({}, ["algorithm.name=fed_prox", "algorithm.mu=0.5"])
    assert config.algorithm.options == {"mu": 0.5}
    with pytest.raises(ConfigError, match="system.dropout"):
        config_from_dict({"system": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match="cohort.sampler"):
        config_from_dict({"cohort": {"sampler": "weigthed"}})


def test_unknown_algorithm_and_option_are_config_errors():
    from fedjax_sim.config import ConfigError, config_from_dict
    from fedjax_sim.simulation.loop import _build_algorithm

    with pytest.raises(ConfigError, match="did you mean 'fed_avg'"):
        _build_algorithm(config_from_dict({"algorithm": "fed_agv"}), None, None, None, 10)
    with pytest.raises(ConfigError, match="algorithm.mu"):
        _build_algorithm(config_from_dict({"algorithm": {"name": "fed_avg", "mu": 1.0}}),
                         None, None, None, 10)
