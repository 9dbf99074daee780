"""`configs/fashion_mnist_dp_fedavg.yaml` runs through `fs.run` on the real data and reports an
epsilon that equals dp-accounting's own, called directly here, in metrics.jsonl and summary.json."""

import json

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
from helpers import FASHION_MNIST_FILES, REPO, SHARED_DATA, needs_shared_data

from fedjax_sim.simulation.loop import run


@needs_shared_data(*FASHION_MNIST_FILES)
def test_dp_fedavg_config_reports_the_accountants_epsilon(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))
    rounds = 4
    result = run(REPO / "configs" / "fashion_mnist_dp_fedavg.yaml", workdir=tmp_path,
                 overrides=[f"rounds={rounds}", "eval.every=2", "log.every=1",
                            "log.progress=false", "log.plot=false", "eval.max_examples=500",
                            "privacy.adaptive_clipping=false"])
    privacy = result.summary["privacy"]
    z = privacy["noise_multipliers"]["gaussian_noise/update"]
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        100 / 1000, dp_accounting.GaussianDpEvent(z)), rounds)
    expected = accountant.get_epsilon(1e-5)
    assert abs(privacy["epsilon"] - expected) < 1e-9
    assert abs(expected - 4.0) < 0.04  # calibrated to the target for the planned rounds
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # RDP: epsilon spent so far in every logged round, matching dp-accounting's at each.
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            100 / 1000, dp_accounting.GaussianDpEvent(z)), row["round"])
        assert abs(row["privacy/epsilon"] - accountant.get_epsilon(1e-5)) < 1e-9
    assert rows[-1]["privacy/epsilon"] == privacy["epsilon"]
    # Poisson cohorts vary; each round clipped to 0.5 and noised with z * 0.5 / 100 on the mean.
    assert len({row["cohort/drawn"] for row in rows}) > 1
    for row in rows:
        assert row["aggregator/clip/clip_norm"] == 0.5
        assert abs(row["aggregator/gaussian_noise/noise_stddev"] - z * 0.5 / 100) < 1e-7
        assert row["train/clients"] == row["cohort/drawn"]


@needs_shared_data(*FASHION_MNIST_FILES)
def test_dp_sgd_config_reports_the_example_level_epsilon(tmp_path, monkeypatch):
    """60 examples a client, batch 20, one epoch: each example is used once in every round its
    client trains in, so epsilon is that of (rounds of the busiest client) Gaussians of z."""
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(SHARED_DATA))
    rounds = 3
    result = run(REPO / "configs" / "fashion_mnist_dp_sgd.yaml", workdir=tmp_path,
                 overrides=[f"rounds={rounds}", "eval.every=3", "log.every=1", "cohort.size=100",
                            "log.progress=false", "log.plot=false", "eval.max_examples=500"])
    privacy = result.summary["example_privacy"]
    assert privacy["worst_client_round_cost"] == 1 and privacy["rounds"] == rounds
    busiest = privacy["worst_client_rounds"]
    assert 2 <= busiest <= rounds  # 100 of 1,000 clients a round: some client trains twice
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5), busiest)
    delta = 1 / 60000 ** 1.1
    assert abs(privacy["delta"] - delta) < 1e-15
    assert abs(privacy["epsilon"] - accountant.get_epsilon(delta)) < 1e-9
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["privacy/example_epsilon"] == privacy["epsilon"]
    assert "privacy" not in result.summary  # no user-level DP in this run


def test_user_level_privacy_refuses_algorithms_with_unprivatized_messages():
    """SCAFFOLD's server adds the plain mean of the control-variate deltas to its state, which
    it broadcasts; the privacy: aggregator only clips and noises the model deltas. Checked
    from Python first (a clip of 1e-9 and noise 0 leave the model where it was, while the
    control variate moves by the clients' unclipped mean), then refused from a config."""
    import jax
    import numpy as np
    import optax
    import pytest
    from helpers import tiny_data, tiny_model

    import fedjax_sim as fs
    from fedjax_sim.aggregators import dp_fedavg_aggregator
    from fedjax_sim.algorithms import create_algorithm
    from fedjax_sim.config import ConfigError, load_config
    from fedjax_sim.simulation.loop import build_experiment

    data, model = tiny_data(), tiny_model()
    algorithm = create_algorithm(
        "scaffold", model, optax.sgd(0.5), optax.sgd(1.0), client_learning_rate=0.5,
        client_weighting="uniform", num_clients=5,
        aggregator=dp_fedavg_aggregator(0.0, 1e-9, 5.0))
    schedule = fs.ClientSchedule.from_sizes(data.client_sizes, batch_size=4, local_steps=2)
    step = fs.build_round_step(algorithm, data, schedule, fs.full_participation(5), 5)
    params = model.init(jax.random.key(0))
    state, _ = step(fs.init_simulation_state(algorithm.init(params), seed=0))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(state.algorithm.params), jax.tree.leaves(params), strict=True))
    control = max(float(np.max(np.abs(np.asarray(c))))
                  for c in jax.tree.leaves(state.algorithm.control))
    assert moved < 1e-8 and control > 1e-3  # the second message bypasses the clip

    quick = ["rounds=1", "model.hidden=8", "cohort.size=3", "privacy.noise_multiplier=1.0",
             "log.progress=false"]
    for name in ("scaffold", "mime", "mime_lite", "fed_dyn", "q_ffl", "afl"):
        with pytest.raises(ConfigError, match=f"'algorithm.name': '{name}' also sends"):
            uniform = ["client.weighting=uniform"] if name == "scaffold" else []  # no warning
            build_experiment(load_config(None, [*quick, *uniform, f"algorithm.name={name}"]))
    experiment = build_experiment(load_config(None, [*quick, "algorithm.name=fed_prox"]))
    assert experiment.privacy is not None
