"""fedjax_sim: a JAX-native, functional federated-learning simulator.

One jit-compiled step per round: sample a cohort, gather its data, train every client (a
``lax.scan``-style loop of optax steps, mapped over the client axis), aggregate, and apply a
server optax optimizer.
"""

from fedjax_sim import _xla_flags

_xla_flags.configure()  # before anything imports jax

from fedjax_sim import aggregators, federated, learning, privacy  # noqa: E402
from fedjax_sim.aggregators import weighted_mean  # noqa: E402
from fedjax_sim.algorithms import ALGORITHMS, create_algorithm  # noqa: E402
from fedjax_sim.algorithms.fed_avg import ServerState, fed_avg  # noqa: E402
from fedjax_sim.algorithms.local import local_train, model_loss  # noqa: E402
from fedjax_sim.config import Config, ConfigError, load_config  # noqa: E402
from fedjax_sim.core import Aggregator, ClientInput, Cohort, FederatedAlgorithm  # noqa: E402
from fedjax_sim.data.batching import ClientSchedule, cohort_indices  # noqa: E402
from fedjax_sim.data.errors import DataError  # noqa: E402
from fedjax_sim.data.federated_data import (  # noqa: E402
    FederatedData,
    FederatedDataset,
    train_test_split_per_client,
)
from fedjax_sim.data.sampling import (  # noqa: E402
    full_participation,
    poisson_sampler,
    uniform_sampler,
    weighted_sampler,
)
from fedjax_sim.datasets import load_dataset  # noqa: E402
from fedjax_sim.models import create_model  # noqa: E402
from fedjax_sim.sharding import client_mesh  # noqa: E402
from fedjax_sim.simulation.client_map import local_client_map, sharded_client_map  # noqa: E402
from fedjax_sim.simulation.evaluation import make_evaluator  # noqa: E402
from fedjax_sim.simulation.round_step import (  # noqa: E402
    RoundStep,
    SimulationState,
    build_round_step,
    init_simulation_state,
)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Aggregator", "aggregators", "client_mesh", "create_algorithm",
    "create_model", "federated", "learning", "local_train", "model_loss", "poisson_sampler",
    "privacy", "weighted_sampler",
    "ClientInput", "ClientSchedule", "Cohort", "Config", "ConfigError", "DataError",
    "FederatedAlgorithm", "FederatedData", "FederatedDataset", "RoundStep", "ServerState",
    "SimulationState", "build_round_step", "cohort_indices", "fed_avg", "full_participation",
    "init_simulation_state", "load_config", "load_dataset", "local_client_map", "make_evaluator",
    "run", "sharded_client_map", "train_test_split_per_client", "uniform_sampler",
    "weighted_mean",
]


def run(*args, **kwargs):
    """`fedjax_sim.simulation.loop.run` (imported lazily: it pulls in the dataset loaders)."""
    from fedjax_sim.simulation.loop import run as _run

    return _run(*args, **kwargs)
