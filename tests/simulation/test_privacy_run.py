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
