"""Ditto: a FedAvg global model plus a regularized personal model per client.

Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization" (ICML 2021, arXiv:2012.04221). Each client k keeps a personal model v_k that
solves ``min_v F_k(v) + lam / 2 * ||v - w*||^2`` around the global model w*, which is trained by
FedAvg. Per round (the paper's Algorithm 1), every client of the cohort:

  1. runs its usual local training from the broadcast w^t (the FedAvg part): delta_k;
  2. updates its own v_k by local steps on ``F_k(v) + lam / 2 * ||v - w^t||^2``, i.e. gradient
     ``grad F_k(v) + lam * (v - w^t)`` (with the client optimizer, on the same batches);

then the server averages the deltas like `fed_avg` (any server optimizer). ``lam = 0`` makes the
personal models purely local; a large ``lam`` pins them to the global model. The personal models
persist across rounds in a client store (`fedjax_sim.algorithms.client_state`), initialized to the
initial global model; a client that is not sampled keeps its v_k. `personal_params` holds them,
and per-client evaluation (``eval.per_client``) reports their accuracy as ``personal/...``.

Memory: the store is ``num_clients x model size`` (float32 unless the params are stored in
another dtype). It suits Fashion-MNIST / CIFAR-style splits into tens to thousands of clients of
small models: 100 clients x the 2NN MLP (199,210 params) = 80 MB; 100 x logistic regression = 3 MB;
3,400 EMNIST writers x the 1.2M-param CNN = 16 GB does not fit most devices (use a smaller model,
bfloat16 params, or fewer clients).

Example::

  algorithm = ditto(model, optax.sgd(0.05), optax.sgd(1.0), lam=0.1,
                    num_clients=dataset.train.num_clients)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators.base import Stage
from fedjax_sim.algorithms.client_state import (
    gather_client_state,
    init_client_state,
    scatter_client_state,
)
from fedjax_sim.algorithms.fed_avg import (
    ClientSchedules,
    ServerState,
    client_delta,
    client_weights,
    fed_avg_setup,
    round_metrics,
    scheduled_hyperparams,
    server_fields,
    server_step,
)
from fedjax_sim.algorithms.local import STAT_KEYS, LossFn, local_train
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@struct.dataclass(kw_only=True)
class DittoState(ServerState):
    """Ditto state: FedAvg's `ServerState` (of the global model; its aggregator sees only the
    global update: the personal models never leave the clients) plus

    Attributes:
      lam: the strength of the pull of each personal model towards the global model.
      personal_params: the personal models, a client store: every leaf ``[num_clients, ...]``.
    """

    lam: jax.Array
    personal_params: Params


def ditto(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    lam: float = 0.1,
    personal_steps: int | None = None,
    client_weighting: str | float = "num_examples",
    num_clients: int | None = None,
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """Ditto (Li et al. 2021) with FedAvg / FedOpt as the global solver.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer of both the global and the personal update (fresh
        state every round for each).
      server_optimizer: applied to the pseudo-gradient ``server - weighted mean of clients``.
      lam: lambda >= 0 of the proximal term ``lam / 2 * ||v - w||^2``.
      personal_steps: local steps of the personal update per round (at most the round's steps;
        None: as many as the global update, on the same batches).
      client_weighting: ``"num_examples"`` (default), ``"uniform"``, or an exponent p.
      num_clients: the number of training clients (required: one personal model each; the
        engine passes it).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the clients' deltas (`fedjax_sim.aggregators`; default: the
        weighted mean).
      client_schedules: ``{hyperparameter: round -> value}`` for the client optimizer of both
        updates (see `fed_avg`).

    Returns:
      A `FederatedAlgorithm` whose state is a `DittoState`.
    """
    if num_clients is None or num_clients < 1:
        raise ValueError(
            f"ditto needs num_clients >= 1 (one personal model per client), got {num_clients}"
        )
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if personal_steps is not None and personal_steps < 1:
        raise ValueError(f"personal_steps must be >= 1 or None, got {personal_steps}")
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)

    def init(params: Params) -> DittoState:
        return DittoState(
            **server_fields(params, client_optimizer, server_optimizer, exponent, aggregator),
            lam=jnp.asarray(lam, jnp.float32),
            personal_params=init_client_state(params, num_clients),
        )

    def client_update(inputs, shared):
        client, personal = inputs
        server_params, data, hyperparams, strength = shared
        delta, stats = client_delta(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams)

        def proximal(grads, v):  # the gradient of lam / 2 * ||v - w^t||^2 added to grad F_k(v)
            return jax.tree.map(lambda g, a, b: g + strength * (a - b), grads, v, server_params)

        personal_client = client.replace(key=jax.random.split(client.key)[1])
        if personal_steps is not None:
            steps = client.indices.shape[0]
            keep = jnp.arange(steps) < personal_steps
            personal_client = personal_client.replace(
                mask=client.mask & keep[:, None],
                num_steps=jnp.minimum(client.num_steps, personal_steps),
            )
        personal, personal_stats = local_train(
            loss_fn, client_optimizer, personal, personal_client, data, hyperparams,
            grad_correction=proximal,
        )
        return delta, personal, stats, personal_stats

    def apply(state: DittoState, cohort: Cohort, map_clients: ClientMap):
        clients = cohort.clients
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        personal = gather_client_state(state.personal_params, clients.client_id)
        deltas, personal, stats, personal_stats = map_clients(
            client_update,
            (clients, personal),
            (state.params, cohort.data, hyperparams, state.lam),
        )
        weights = client_weights(clients, state.weight_exponent)
        new_state, aggregator_metrics = server_step(state, server_optimizer, aggregator, deltas,
                                                    weights, cohort.server_key(),
                                                    client_ids=clients.client_id,
                                                    cohort_size=cohort.size)
        trained = clients.valid & (clients.num_steps > 0)
        personal_params = scatter_client_state(
            state.personal_params, clients.client_id, personal, trained
        )
        metrics = {**round_metrics(stats, weights), **aggregator_metrics}
        totals = {k: jnp.sum(personal_stats[k]) for k in STAT_KEYS}
        count = jnp.maximum(totals["count"], 1.0)
        metrics["ditto/personal_train_loss"] = totals["loss_sum"] / count
        metrics["ditto/personal_train_accuracy"] = (
            totals["correct"] / jnp.maximum(totals["accuracy_count"], 1.0))
        new_state = new_state.replace(personal_params=personal_params)
        return new_state, metrics

    return FederatedAlgorithm(init, apply)
