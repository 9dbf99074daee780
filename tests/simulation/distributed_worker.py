"""One process of a multi-process test run (started by test_distributed.py, not collected).

``python distributed_worker.py SPEC_JSON``: connects to the others (``FEDJAX_SIM_*`` variables),
then runs each ``{"config", "overrides", "workdir", "out"}`` of the spec in turn; process 0 saves
each run's final params to ``out`` (``.npz``, leaves in tree order).
"""

import json
import sys

import fedjax_sim  # noqa: F401  (XLA flags before jax starts)

# isort: split

import jax
import numpy as np

from fedjax_sim.simulation.distributed import initialize
from fedjax_sim.simulation.loop import run

if __name__ == "__main__":
    initialize()
    for item in json.loads(sys.argv[1]):
        result = run(item["config"], overrides=item["overrides"], workdir=item["workdir"])
        if jax.process_index() == 0:
            leaves = jax.tree.leaves(jax.device_get(result.state.algorithm.params))
            np.savez(item["out"], *leaves)
