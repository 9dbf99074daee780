"""The aggregator seam changes nothing by default: every algorithm, after 3 rounds on tiny data,
holds exactly the state it held before the seam existed (`golden/default_aggregator.npz`, written
by `golden/make_golden.py` at the commit before it), and an explicit ``aggregator=mean()`` or
``chain(mean())`` equals the default bit for bit.

The golden file was written on one machine; XLA:CPU compiles for the CPU it runs on (AVX-512 or
AVX2 kernels, other fusions and reduction orders), so on another machine the same program rounds
differently in the last bits. Against the golden the states agree to float32 rounding (relative
1e-5, absolute 1e-7); the bit-for-bit claims are checked between programs compiled on the same
machine."""

from pathlib import Path

import numpy as np
import pytest
from golden.make_golden import final_states

from fedjax_sim import aggregators
from fedjax_sim.algorithms import ALGORITHMS
from fedjax_sim.sharding import client_mesh

GOLDEN = Path(__file__).parent / "golden" / "default_aggregator.npz"
# The golden states keep SCAFFOLD's default weights by examples, which it warns about.
pytestmark = pytest.mark.filterwarnings(
    "ignore::fedjax_sim.algorithms.scaffold.ScaffoldSettingWarning")


def golden_state(name: str) -> dict[str, np.ndarray]:
    """The golden state leaves of ``name``, in today's layout.

    FedBuff kept absolute float32 finish times (``slot_finish``), which lose precision in long
    runs; it now keeps them relative to the clock (``slot_remaining = slot_finish - clock``)
    with the clock's rounding remainder ``clock_error``. The golden run's times are whole
    seconds (1 s per local step), exact either way: the same state, translated exactly
    (``[14, 16, 15, 18] - 13``; remainder 0)."""
    golden = np.load(GOLDEN)
    expected = {key.split("|", 1)[1]: golden[key] for key in golden.files
                if key.split("|", 1)[0] == name}
    if name == "fed_buff" and ".slot_finish" in expected:
        expected[".slot_remaining"] = expected.pop(".slot_finish") - expected[".clock"]
        expected[".clock_error"] = np.zeros_like(expected[".clock"])
    return expected


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_default_aggregator_reproduces_the_state_before_the_seam(name):
    """The default against the golden state; an explicit ``chain(mean())`` against the default,
    bit for bit."""
    expected = golden_state(name)
    assert expected, f"no golden arrays for {name}"
    got = final_states(names=[name])[name]  # one algorithm a test: spread over the workers
    for key, value in expected.items():
        assert key in got, f"{name}: state leaf {key} disappeared"
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7,
                                   err_msg=f"{name}: {key}")
    # The only new leaves belong to the aggregator (empty for the default mean), are the ids
    # of FedBuff's in-flight clients, which its aggregator receives, or hyperparameters moved
    # from constants into the state for sweeps (FedProx's mu).
    assert all("aggregator" in key or key.endswith("slot_client")
               or "algorithm_hyperparams" in key
               for key in set(got) - set(expected)), set(got) - set(expected)
    explicit = final_states(aggregator=aggregators.chain(aggregators.mean()),
                            names=[name])[name]
    assert set(explicit) == set(got)
    for key, value in got.items():
        np.testing.assert_array_equal(explicit[key], value, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_eight_devices_train_what_one_device_trains(name):
    """The cohort of 4 split over 8 CPU devices (4 of them holding only zero-weight padding
    clients; aggregation an all-reduce) ends with the one-device state, within 1e-6 (FedBuff's
    buffer takes the 4 drawn clients, never the padding)."""
    expected = golden_state(name)
    got = final_states(execution="vmap", names=[name], mesh=client_mesh(8))[name]
    assert expected
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, rtol=0, err_msg=f"{name}: {key}")
