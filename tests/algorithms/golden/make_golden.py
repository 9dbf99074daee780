"""Writes the state of every algorithm after 3 rounds on tiny data (run at the commit *before*
the aggregator seam: `tests/algorithms/test_default_aggregator.py` checks that the default
aggregator still gives these exact numbers).

  python tests/algorithms/golden/make_golden.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ for helpers

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from helpers import tiny_data, tiny_model  # noqa: E402

from fedjax_sim.algorithms import ALGORITHMS, create_algorithm  # noqa: E402
from fedjax_sim.data.batching import ClientSchedule  # noqa: E402
from fedjax_sim.data.sampling import uniform_sampler  # noqa: E402
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state  # noqa: E402

SIZES = (5, 17, 40, 3, 11, 8)
ROUNDS = 3
OPTIONS = {"fed_buff": {"concurrency": 4}, "ditto": {"personal_steps": 2}}


def final_states(execution: str = "map", aggregator=None, names=None, mesh=None
                 ) -> dict[str, dict[str, np.ndarray]]:
    model, data = tiny_model(), tiny_data(SIZES)
    schedule = ClientSchedule.from_sizes(data.client_sizes, batch_size=4, local_epochs=1)
    out = {}
    extra = {} if aggregator is None else {"aggregator": aggregator}
    for name in names or sorted(ALGORITHMS):
        algorithm = create_algorithm(
            name, model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            optax.sgd(1.0), num_clients=data.num_clients, **OPTIONS.get(name, {}), **extra)
        step = build_round_step(algorithm, data, schedule, uniform_sampler(data.num_clients, 4),
                                4, client_execution=execution, mesh=mesh)
        state = init_simulation_state(algorithm.init(model.init(jax.random.PRNGKey(0))), 7)
        for _ in range(ROUNDS):
            state, _ = step(state)
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.algorithm))
        out[name] = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    return out


if __name__ == "__main__":
    states = final_states()
    flat = {f"{name}|{key}": value
            for name, leaves in states.items() for key, value in leaves.items()}
    np.savez(Path(__file__).with_name("default_aggregator.npz"), **flat)
    print(f"wrote {len(flat)} arrays for {len(states)} algorithms")
