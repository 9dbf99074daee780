"""Federated Averaging and the FedOpt family.

Each round the server broadcasts its parameters, every client of the cohort runs local
optimizer steps, and the server treats ``delta = server_params - weighted_mean(client_params)``
as a pseudo-gradient for a server optax optimizer:

* server SGD with learning rate 1: FedAvg (McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", arXiv:1602.05629);
* SGD with momentum: FedAvgM (Hsu et al. 2019, arXiv:1909.06335);
* Adam / Yogi / Adagrad: FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, "Adaptive
  Federated Optimization", arXiv:2003.00295).

Client weights are ``num_examples ** weight_exponent`` (1: by examples, the default; 0:
uniform). Hyperparameters of ``optax.inject_hyperparams`` optimizers and the weight exponent
live in the state as arrays, so a whole round can be ``vmap``-ped over a sweep axis.

Example::

  algorithm = fed_avg(model, optax.sgd(0.1), optax.sgd(1.0))
  state = algorithm.init(model.init(jax.random.key(0)))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage, apply_aggregator
from fedjax_sim.algorithms.local import (
    STAT_KEYS,
    GradCorrection,
    LossFn,
    local_train,
    model_loss,
    optimizer_hyperparams,
    weight_exponent,
)
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any
ClientSchedules = Mapping[str, Callable[[jax.Array], jax.Array]]


@struct.dataclass
class ServerState:
    """FedAvg / FedOpt server state; the zoo's richer states extend it (keyword-only fields).

    Attributes:
      params: the global model parameters.
      opt_state: the server optimizer's state.
      client_hyperparams: injected client-optimizer hyperparameters (e.g. ``learning_rate``).
      weight_exponent: client weight = ``num_examples ** weight_exponent``.
      aggregator: the aggregator's state (clip norms, noise multipliers, ...; () for the mean).
      algorithm_hyperparams: the algorithm's own numeric hyperparameters as arrays (FedProx's
        ``mu``), so a sweep can vary them in one program ({} for FedAvg).
    """

    params: Params
    opt_state: optax.OptState
    client_hyperparams: dict[str, jax.Array]
    weight_exponent: jax.Array
    aggregator: Any = ()
    algorithm_hyperparams: dict[str, jax.Array] = struct.field(default_factory=dict)


def fed_avg_setup(model: Model, client_weighting: str | float, loss_fn: LossFn | None,
                  aggregator: Aggregator | Stage | None) -> tuple[float, LossFn, Aggregator]:
    """FedAvg's options as a round uses them: the exponent of the client weights, the local
    objective (default: the model's masked cross-entropy) and the aggregator (default: the
    weighted mean). ValueError for an unknown ``client_weighting``."""
    return (weight_exponent(client_weighting), loss_fn or model_loss(model),
            as_aggregator(aggregator))


def server_fields(params: Params, client_optimizer, server_optimizer, exponent: float,
                  aggregator: Aggregator) -> dict[str, Any]:
    """The fields of `ServerState`, which every state that extends it starts with."""
    return dict(
        params=params,
        opt_state=server_optimizer.init(params),
        client_hyperparams=optimizer_hyperparams(client_optimizer, params),
        weight_exponent=jax.device_put(np.float32(exponent)),  # no eager program to compile
        aggregator=aggregator.init(params),
    )


def client_delta(loss_fn: LossFn, client_optimizer, server_params: Params, client, data,
                 hyperparams=None, grad_correction: GradCorrection | None = None):
    """Local training from ``server_params``: ``(server_params - trained params, stats)``.

    The message of every FedAvg-shaped client: a pseudo-gradient the server averages.
    """
    params, stats = local_train(loss_fn, client_optimizer, server_params, client, data,
                                hyperparams, grad_correction=grad_correction)
    return jax.tree.map(jnp.subtract, server_params, params), stats


def fed_avg_client(loss_fn: LossFn, client_optimizer,
                   correction: Callable[..., GradCorrection] | None = None):
    """``client_update(client, (server_params, data, hyperparams[, algorithm_hyperparams]))
    -> (delta, stats)``.

    ``correction(server_params, algorithm_hyperparams)`` is a gradient correction (FedProx's
    proximal term, whose ``mu`` is an algorithm hyperparameter of the state).
    """

    def client_update(client, shared):
        server_params, data, hyperparams, *rest = shared
        algorithm_hyperparams = rest[0] if rest else {}
        grad_correction = (None if correction is None
                           else correction(server_params, algorithm_hyperparams))
        return client_delta(loss_fn, client_optimizer, server_params, client, data, hyperparams,
                            grad_correction)

    return client_update


def server_step(state, server_optimizer, aggregator: Aggregator, deltas, weights: jax.Array,
                key: jax.Array, transform: Callable[[Params], Params] | None = None,
                client_ids: jax.Array | None = None, cohort_size: int | None = None):
    """Aggregates the clients' ``deltas`` and steps the server optimizer on the result.

    ``state`` has ``params``, ``opt_state`` and ``aggregator`` fields; ``transform`` (optional)
    maps the aggregate to the pseudo-gradient; ``client_ids`` (``[C]``) tell per-client stages
    (error feedback, attacks) whose messages these are; ``cohort_size`` (``Cohort.size``) the
    real rows of a cohort padded for the devices. Returns the new state and the aggregator's
    metrics.
    """
    aggregate, aggregator_state, metrics = apply_aggregator(
        aggregator, state.aggregator, deltas, weights, key, client_ids=client_ids,
        cohort_size=cohort_size)
    pseudo_gradient = aggregate if transform is None else transform(aggregate)
    updates, opt_state = server_optimizer.update(pseudo_gradient, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, aggregator=aggregator_state), metrics


def second_message_metrics(metrics: Mapping[str, jax.Array], name: str) -> dict[str, jax.Array]:
    """An algorithm's second aggregator's metrics, ``aggregator/...`` renamed ``<name>/...``."""
    return {k.replace("aggregator/", f"{name}/", 1): v for k, v in metrics.items()}


def client_weights(clients, exponent: jax.Array) -> jax.Array:
    """``[C]`` aggregation weights: ``num_examples ** exponent``, 0 for clients that did nothing."""
    n = clients.num_examples.astype(jnp.float32)
    active = clients.valid & (clients.num_steps > 0)
    return jnp.where(active, jnp.power(jnp.maximum(n, 1.0), exponent), 0.0)


def scheduled_hyperparams(
    hyperparams: Mapping[str, jax.Array],
    schedules: Mapping[str, Callable[[jax.Array], jax.Array]] | None,
    round_index: jax.Array | int,
) -> dict[str, jax.Array]:
    """``hyperparams`` with each scheduled one replaced by ``schedule(round_index)``.

    Client optimizer state is fresh every round, so a client learning-rate schedule is a
    function of the round (not of the local step). Raises ValueError for a schedule of a
    hyperparameter the client optimizer does not inject.
    """
    if not schedules:
        return dict(hyperparams)
    out = dict(hyperparams)
    for name, schedule in schedules.items():
        if name not in out:
            raise ValueError(
                f"client_schedules: the client optimizer has no injected hyperparameter {name!r} "
                f"(it has {sorted(out)}); build it with optax.inject_hyperparams"
            )
        out[name] = jnp.asarray(schedule(round_index), jnp.asarray(out[name]).dtype)
    return out


def round_metrics(stats: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
    """Train metrics over the cohort, pooled over every trained label (client-weighted)."""
    totals = {k: jnp.sum(stats[k]) for k in STAT_KEYS}
    count = jnp.maximum(totals["count"], 1.0)
    return {
        "train/loss": totals["loss_sum"] / count,
        "train/accuracy": totals["correct"] / jnp.maximum(totals["accuracy_count"], 1.0),
        "train/examples": totals["count"],
        "train/clients": jnp.sum((weights > 0).astype(jnp.float32)),
    }


def fed_avg(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    client_weighting: str | float = "num_examples",
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """FedAvg with any optax client optimizer and any optax server optimizer (FedOpt).

    Args:
      model: the model to train.
      client_optimizer: the clients' local optimizer; its state starts fresh every round.
      server_optimizer: applied to the pseudo-gradient ``server - weighted mean of clients``.
      client_weighting: ``"num_examples"`` (default), ``"uniform"``, or an exponent p
        (weight = num_examples ** p).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      client_schedules: ``{hyperparameter: round -> value}`` for the client optimizer (e.g. a
        learning-rate schedule from `fedjax_sim.optimizers.make_optimizer`); each round the
        clients use ``schedule(cohort.round)``.
      aggregator: how the server combines the clients' deltas (`fedjax_sim.aggregators`;
        default: the weighted mean).

    Returns:
      A `FederatedAlgorithm` whose state is a `ServerState`.
    """
    return averaging_algorithm(model, client_optimizer, server_optimizer, client_weighting,
                               loss_fn, client_schedules, aggregator)


# The aggregation weights, a transform of the aggregate and extra metrics, from the clients'
# weights, the cohort and the round's client hyperparameters.
Reweight = Callable[[jax.Array, Any, Mapping[str, jax.Array]],
                    tuple[jax.Array, Callable[[Params], Params] | None, dict[str, jax.Array]]]


Factory = Callable[..., FederatedAlgorithm]


def options_of(base: Factory) -> Callable[[Factory], Factory]:
    """Marks ``factory(model, client_optimizer, server_optimizer, *, own, **options)`` as taking
    ``base``'s keyword options in ``**options``, passed on unchanged.

    Its signature then lists them after its own, so a config is checked against them (with a
    did-you-mean), the engine passes them, and ``help`` shows them: FedProx and FedNova are
    FedAvg's options plus one of their own, MimeLite is Mime's, written once.
    """

    def mark(factory: Factory) -> Factory:
        own = inspect.signature(factory)
        inherited = [p for p in inspect.signature(base).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY]
        parameters = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        factory.__signature__ = own.replace(parameters=[*parameters, *inherited])
        return factory

    return mark


def averaging_algorithm(model: Model, client_optimizer, server_optimizer,
                        client_weighting: str | float = "num_examples", loss_fn=None,
                        client_schedules=None, aggregator=None, *,
                        correction: Callable[..., GradCorrection] | None = None,
                        reweight: Reweight | None = None,
                        algorithm_hyperparams: Mapping[str, float] | None = None
                        ) -> FederatedAlgorithm:
    """FedAvg's round, with the two places where FedProx and FedNova differ from it.

    Args:
      model, client_optimizer, server_optimizer, client_weighting, loss_fn, client_schedules,
        aggregator: as `fed_avg` (positional or by name).
      correction: ``(server_params, algorithm_hyperparams) -> grad_correction`` for local
        training (FedProx's proximal term); None: plain local steps.
      reweight: ``(weights, clients, hyperparams) -> (aggregation weights, transform, metrics)``:
        the aggregate of the deltas under those weights, mapped by ``transform`` (None: as is),
        is the pseudo-gradient (FedNova's normalized averaging); None: the weighted mean.
      algorithm_hyperparams: ``{name: value}`` kept in the state as float32 arrays (sweepable)
        and handed to ``correction``.

    Returns:
      A `FederatedAlgorithm` whose state is a `ServerState`.
    """
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)
    client_update = fed_avg_client(loss_fn, client_optimizer, correction)

    own = {name: jnp.asarray(value, jnp.float32)
           for name, value in (algorithm_hyperparams or {}).items()}

    def init(params: Params) -> ServerState:
        return ServerState(**server_fields(params, client_optimizer, server_optimizer, exponent,
                                           aggregator), algorithm_hyperparams=dict(own))

    def apply(state: ServerState, cohort: Cohort, map_clients: ClientMap):
        # client learning-rate schedules follow the round (client state is fresh each round)
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        deltas, stats = map_clients(
            client_update, cohort.clients,
            (state.params, cohort.data, hyperparams, state.algorithm_hyperparams)
        )
        weights = client_weights(cohort.clients, state.weight_exponent)
        aggregation_weights, transform, metrics = (
            (weights, None, {}) if reweight is None
            else reweight(weights, cohort.clients, hyperparams))
        new_state, aggregator_metrics = server_step(
            state, server_optimizer, aggregator, deltas, aggregation_weights,
            cohort.server_key(), transform=transform, client_ids=cohort.clients.client_id,
            cohort_size=cohort.size)
        return new_state, {**round_metrics(stats, weights), **metrics, **aggregator_metrics}

    return FederatedAlgorithm(init, apply)
