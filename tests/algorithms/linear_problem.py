"""A federated least-squares problem for the algorithms' update-rule references.

Client k holds ``(X_k, y_k)``; its loss on a batch is ``1/2 mean (x . w - y)^2``, whose gradient
``X^T (X w - y) / n`` the references compute in numpy float64 (no JAX on their side), so a
reference written from a paper is independent of the code it checks. The engine side runs the
algorithm with `squared_loss` as its ``loss_fn`` (no flax model).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core import FederatedAlgorithm
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sampling import uniform_sampler
from fedjax_sim.simulation.round_step import build_round_step, init_simulation_state

FEATURES = 3
COHORT_KEYS = ("client_id", "indices", "mask", "valid", "num_steps", "num_examples")


def linear_data(sizes, seed=0, features=FEATURES) -> FederatedData:
    """Clients of the given sizes, each with its own true weights (heterogeneous optima)."""
    rng = np.random.default_rng(seed)
    clients = {}
    for k, n in enumerate(sizes):
        x = rng.normal(size=(n, features)).astype(np.float32)
        w = rng.normal(size=features) + k  # client k's own optimum: the clients disagree
        y = (x @ w + 0.1 * rng.normal(size=n)).astype(np.float32)
        clients[k] = {"x": x, "y": y}
    return FederatedData.from_client_lists(clients)


def squared_loss(params, batch, mask, rng):
    """``1/2`` the masked mean squared error, with the engine's statistics."""
    del rng
    residual = batch["x"] @ params["w"] - batch["y"]
    m = mask.astype(jnp.float32)
    loss_sum = 0.5 * jnp.sum(m * residual**2)
    count = jnp.sum(m)
    zero = jnp.zeros((), jnp.float32)
    stats = {"loss_sum": loss_sum, "count": count, "correct": zero, "accuracy_count": zero}
    return loss_sum / jnp.maximum(count, 1.0), stats


def initial_params(features=FEATURES):
    return {"w": jnp.asarray(np.linspace(-0.5, 0.5, features), jnp.float32)}


def gradient(w, data, rows):
    """``X^T (X w - y) / n`` over ``rows`` in float64."""
    x = np.asarray(data.arrays["x"], np.float64)[rows]
    y = np.asarray(data.arrays["y"], np.float64)[rows]
    return x.T @ (x @ w - y) / len(rows)


def loss(w, data, rows):
    """``1/2 mean (x . w - y)^2`` over ``rows`` in float64."""
    x = np.asarray(data.arrays["x"], np.float64)[rows]
    y = np.asarray(data.arrays["y"], np.float64)[rows]
    return 0.5 * float(np.mean((x @ w - y) ** 2))


def client_rows(data, k):
    return np.arange(data.offsets[k], data.offsets[k + 1])


def batches(cohort, c):
    """Client slot ``c``'s real batches (rows of the flat arrays), one list entry per step."""
    indices, mask = cohort["indices"][c], cohort["mask"][c]
    return [indices[s][mask[s]] for s in range(indices.shape[0]) if mask[s].any()]


def spy(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    """The algorithm, its round metrics extended by the cohort it trained on."""

    def apply(state, cohort, map_clients):
        state, metrics = algorithm.apply(state, cohort, map_clients)
        return state, {**metrics, **{k: getattr(cohort.clients, k) for k in COHORT_KEYS}}

    return FederatedAlgorithm(algorithm.init, apply)


def run(algorithm, data, schedule, rounds, cohort_size, seed=0, **kwargs):
    """``rounds`` rounds from `initial_params`: the final state and each round's cohort and
    metrics (numpy)."""
    step = build_round_step(spy(algorithm), data, schedule,
                            uniform_sampler(data.num_clients, cohort_size), cohort_size,
                            **kwargs)
    state = init_simulation_state(algorithm.init(initial_params()), seed)
    history = []
    for _ in range(rounds):
        state, metrics = step(state)
        history.append(jax.device_get(metrics))
    return state.algorithm, history


def weights_of(data, ids, exponent):
    return np.array([float(data.client_sizes[k]) ** exponent for k in ids])
