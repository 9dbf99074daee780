"""FedBuff: buffered asynchronous aggregation, simulated on a virtual clock in the jitted round.

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
arXiv:2106.06639 (AISTATS 2022). ``concurrency`` (M) clients train at the same time, each on the
server model of the moment it started; the server applies an update as soon as K of them have
reported (K = the cohort size, the paper's buffer size), scaling each client's delta by its
staleness ``s(tau) = (1 + tau) ** -staleness_exponent`` (the paper's ``1 / sqrt(1 + tau)`` for
the default 0.5), where tau is the number of server updates since the client started.

How it maps onto the engine's synchronous round (one engine round = one buffer of K):

1. **arrive**: of the M in-flight updates, the K that finish first (by simulated finish time;
   ties by dispatch order) arrive. Their deltas are combined with staleness scaling,
   ``sum_i w_i s(tau_i) delta_i / sum_i w_i`` (``w_i = num_examples_i ** p``, as in `fed_avg`;
   p = 0 gives the paper's ``1/K``), and the server optimizer applies it as a pseudo-gradient.
   The clock moves to the latest of the K arrivals;
2. **dispatch**: the round's cohort (K newly sampled clients) starts on the updated server model
   in the K freed slots, finishing at ``clock + duration`` (``ClientInput.duration``: from the
   system model, `fedjax_sim.simulation.system`; 1 s per local step without one). A client's
   update is computed when it is dispatched and held in the in-flight buffer until it arrives.

**The clock's precision does not degrade with the run's length.** JAX runs in float32 (x64
off), whose spacing at an absolute time t is about ``t * 2^-23`` (2 s at 2^24 s = 194 days), so
absolute finish times ``clock + duration`` would round durations to that grid, reorder the
arrivals and tie them. In-flight clients therefore keep their finish time *relative to the
clock* (``slot_remaining``: seconds from the last server update until the client reports; when
the clock moves by ``a``, ``a`` is subtracted from every slot), which stays the size of a
duration however long the run: arrivals are ordered to float32 precision of the durations (a
remaining time carries the rounding of the few subtractions made while its client is in
flight, at most half a float32 spacing of the remaining time each; so finish times equal in
exact arithmetic but reached by different sums, client x then y against y then x, may be
ordered by that rounding instead of by dispatch order). The absolute time is the
sum of the advances kept as a two-float (TwoSum): ``clock`` is the float32 nearest to it and
``clock_error`` the rest (``clock + clock_error``, added in float64, reads it), so it does not
pick up a rounding of ``clock``'s spacing at every update as a float32 sum would; its error is
that of the advances, about float32's relative precision of the durations (0.01 s after
200,000 updates of ``configs/fashion_mnist_fedbuff.yaml``, 4.3e6 s; ``system/clock``,
the float32 ``clock``, is as coarse as float32 at that time; ``system/round_seconds`` is the
advance itself). Short runs whose times are exact in float32 (whole seconds, the default without
a system model) are unchanged: the same arrivals, clock and metrics as absolute times gave.

The pipeline starts empty: the first M / K rounds only dispatch (all on the initial model, at
time 0); from then on every round applies one server update. The in-flight buffer is part of the
state: **memory M x the model** (plus M scalars).

Simplifications against a real deployment: a freed slot is refilled when the buffer is applied
(not the instant its client reports), a sampled client may already be in flight (sampling does
not exclude busy clients), and a dropped client (weight 0) still takes its slot and arrives
after its (zero) duration, counting toward K.

Example::

  algorithm = fed_buff(model, optax.sgd(0.05), optax.sgd(1.0), concurrency=30)
  # cohort.size = K = 10: every round, 10 updates arrive and 10 clients start.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators.base import Stage
from fedjax_sim.algorithms.fed_avg import (
    ClientSchedules,
    ServerState,
    client_weights,
    fed_avg_client,
    fed_avg_setup,
    round_metrics,
    scheduled_hyperparams,
    server_fields,
)
from fedjax_sim.algorithms.local import LossFn
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any


@struct.dataclass(kw_only=True)
class FedBuffState(ServerState):
    """FedAvg's `ServerState` plus the in-flight buffer (leading axis M = ``concurrency``).

    Attributes:
      slot_deltas: ``[M, ...params]`` each in-flight client's ``start params - trained params``.
      slot_remaining: ``[M]`` float32 simulated seconds from ``clock`` until the client reports
        (its finish time relative to the last server update: it stays the size of a duration
        however long the run; 0 in an empty slot, which ``slot_filled`` marks: the state holds
        no inf, which the engine's NaN/inf check of the state would read as a diverged run).
      slot_version: ``[M]`` int32 server version the client started from.
      slot_weight: ``[M]`` float32 aggregation weight (0: dropped or padding client).
      slot_client: ``[M]`` int32 the in-flight client's id (for per-client aggregation stages).
      slot_sequence: ``[M]`` int32 dispatch order (breaks ties between equal finish times).
      slot_filled: ``[M]`` bool, False for an empty slot.
      clock: float32 simulated seconds of the last server update (the float32 nearest to it).
      clock_error: float32 the rest: the sum of the clock's advances is ``clock + clock_error``
        (add them in float64 to read it beyond float32's resolution).
      version: int32 server updates applied so far.
      dispatched: int32 clients dispatched so far.
    """

    slot_deltas: Params
    slot_remaining: jax.Array
    slot_version: jax.Array
    slot_weight: jax.Array
    slot_client: jax.Array
    slot_sequence: jax.Array
    slot_filled: jax.Array
    clock: jax.Array
    clock_error: jax.Array
    version: jax.Array
    dispatched: jax.Array


def _add_to_clock(clock: jax.Array, error: jax.Array, seconds: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """``(clock, error) + seconds`` as a two-float sum: ``(hi, lo)`` with ``hi`` the float32
    nearest to ``clock + error + seconds`` and ``lo`` the rest (Knuth's TwoSum, then Fast2Sum to
    renormalize; XLA does not reassociate floating-point additions, so the rounding errors these
    recover are not optimized away)."""
    total = clock + seconds
    seconds_part = total - clock
    rounding = (clock - (total - seconds_part)) + (seconds - seconds_part)  # exact: TwoSum
    low = error + rounding
    high = total + low
    return high, low - (high - total)  # Fast2Sum: |total| >= |low|


def staleness_scale(staleness: jax.Array, exponent: float | jax.Array) -> jax.Array:
    """``(1 + staleness) ** -exponent``: the paper's ``1 / sqrt(1 + tau)`` for exponent 0.5."""
    return jnp.power(1.0 + staleness.astype(jnp.float32), -jnp.asarray(exponent, jnp.float32))


def fed_buff(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    concurrency: int = 20,
    staleness_exponent: float = 0.5,
    client_weighting: str | float = "num_examples",
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
) -> FederatedAlgorithm:
    """FedBuff with any optax client and server optimizer.

    Args:
      model: the model to train.
      client_optimizer: the clients' local optimizer (fresh state per client).
      server_optimizer: applied to the staleness-scaled mean of the K arrived deltas.
      concurrency: M, clients in flight; a multiple of the cohort size K (the buffer size).
      staleness_exponent: a delta of staleness tau is scaled by ``(1 + tau) ** -exponent``
        (0.5: the paper's choice; 0: no staleness scaling).
      client_weighting: ``"num_examples"`` (default), ``"uniform"`` (the paper's 1/K), or an
        exponent p (weight = num_examples ** p).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the buffer when it is released: the K arrived clients'
        staleness-scaled deltas ``s(tau_i) * delta_i`` with their weights
        (`fedjax_sim.aggregators`; default: the weighted mean, i.e. the paper's buffered
        average).
      client_schedules: ``{hyperparameter: round -> value}`` for the client optimizer.

    Returns:
      A `FederatedAlgorithm` whose state is a `FedBuffState`. Round metrics add
      ``system/clock`` (simulated seconds: the float32 nearest to the state's two-float clock),
      ``system/round_seconds`` (how far the clock moved),
      ``system/staleness`` (mean staleness of the arrived updates), ``system/updates``.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency={concurrency!r}: expected an integer >= 1")
    if not staleness_exponent >= 0:
        raise ValueError(f"staleness_exponent={staleness_exponent!r}: expected a number >= 0")
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)
    slots = concurrency

    def init(params: Params) -> FedBuffState:
        return FedBuffState(
            **server_fields(params, client_optimizer, server_optimizer, exponent, aggregator),
            slot_deltas=jax.tree.map(lambda p: jnp.zeros((slots, *jnp.shape(p)), p.dtype),
                                     params),
            slot_remaining=jnp.zeros((slots,), jnp.float32),  # empty slots: see slot_filled
            slot_version=jnp.zeros((slots,), jnp.int32),
            slot_weight=jnp.zeros((slots,), jnp.float32),
            slot_client=jnp.zeros((slots,), jnp.int32),
            slot_sequence=jnp.zeros((slots,), jnp.int32),
            slot_filled=jnp.zeros((slots,), bool),
            clock=jnp.zeros((), jnp.float32),
            clock_error=jnp.zeros((), jnp.float32),
            version=jnp.zeros((), jnp.int32),
            dispatched=jnp.zeros((), jnp.int32),
            # an array of the state: a sweep over it is one program
            algorithm_hyperparams={"staleness_exponent": jnp.asarray(staleness_exponent,
                                                                      jnp.float32)},
        )

    client_update = fed_avg_client(loss_fn, client_optimizer)

    def apply(state: FedBuffState, cohort: Cohort, map_clients: ClientMap):
        # K: the drawn clients; rows past it pad the cohort for the devices and never take a
        # slot of the buffer (so K, and the run, do not depend on the number of devices).
        k = cohort.size or cohort.clients.client_id.shape[0]
        if slots % k:
            raise ValueError(
                f"fed_buff: concurrency={slots} must be a multiple of the cohort size (the "
                f"buffer size K={k})"
            )
        # 1. Arrive: once every slot is busy, the K earliest finishers report.
        full = jnp.all(state.slot_filled)
        finish = jnp.where(state.slot_filled, state.slot_remaining, jnp.inf)
        arrived = jnp.lexsort((state.slot_sequence, finish))[:k]
        staleness = state.version - state.slot_version[arrived]
        weights = state.slot_weight[arrived]
        scale = staleness_scale(staleness,
                                state.algorithm_hyperparams["staleness_exponent"])
        messages = jax.tree.map(
            lambda d: d[arrived] * scale.astype(d.dtype).reshape((-1,) + (1,) * (d.ndim - 1)),
            state.slot_deltas)
        pseudo_gradient, aggregator_state, aggregator_metrics = aggregator.apply(
            state.aggregator, messages, jnp.where(full, weights, 0.0), cohort.server_key(),
            client_ids=state.slot_client[arrived])
        updates, opt_state = server_optimizer.update(pseudo_gradient, state.opt_state,
                                                     state.params)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(full, new, old),
            (optax.apply_updates(state.params, updates), opt_state),
            (state.params, state.opt_state),
        )
        version = state.version + full.astype(jnp.int32)
        # The clock moves by the latest arrival's remaining time; every slot's remaining time
        # shrinks by as much (the K arrived slots' are overwritten below; the others finish no
        # earlier than the latest arrival, so theirs stay >= 0).
        advance = jnp.where(full, jnp.max(finish[arrived]), 0.0)
        clock, clock_error = _add_to_clock(state.clock, state.clock_error, advance)
        filled = jnp.where(full, state.slot_filled.at[arrived].set(False), state.slot_filled)

        # 2. Dispatch: the cohort starts on the updated model in K free slots.
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        deltas, stats = map_clients(
            client_update, cohort.clients, (params, cohort.data, hyperparams)
        )
        new_weights = client_weights(cohort.clients, state.weight_exponent)
        free = jnp.argsort(filled, stable=True)[:k]  # empty slots (False) sort first
        drawn = jax.tree.map(lambda x: x[:k], (deltas, new_weights, cohort.clients.duration,
                                               cohort.clients.client_id))
        drawn_deltas, drawn_weights, drawn_duration, drawn_ids = drawn
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            slot_deltas=jax.tree.map(lambda buf, d: buf.at[free].set(d), state.slot_deltas,
                                     drawn_deltas),
            slot_remaining=(state.slot_remaining - advance).at[free].set(
                drawn_duration.astype(jnp.float32)),
            slot_version=state.slot_version.at[free].set(version),
            slot_weight=state.slot_weight.at[free].set(drawn_weights),
            slot_client=state.slot_client.at[free].set(drawn_ids),
            slot_sequence=state.slot_sequence.at[free].set(
                state.dispatched + jnp.arange(k, dtype=jnp.int32)),
            slot_filled=filled.at[free].set(True),
            clock=clock,
            clock_error=clock_error,
            version=version,
            dispatched=state.dispatched + k,
            aggregator=jax.tree.map(lambda new, old: jnp.where(full, new, old),
                                    aggregator_state, state.aggregator),
        )
        reported = full & (weights > 0)
        count = jnp.maximum(jnp.sum(reported), 1)
        metrics = {
            **round_metrics(stats, new_weights),
            "system/clock": clock,
            "system/round_seconds": advance,
            "system/staleness": jnp.sum(jnp.where(reported, staleness, 0)) / count,
            "system/updates": version.astype(jnp.float32),
            **aggregator_metrics,
        }
        return new_state, metrics

    return FederatedAlgorithm(init, apply)
