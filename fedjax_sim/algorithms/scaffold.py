"""SCAFFOLD: local training corrected by control variates, with a control variate per client.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, arXiv:1910.06378 (Algorithm 1, options I and II).

The server keeps params x and a control variate c; every client i keeps its own c_i (all N of
them live in the state as a ``[num_clients, ...]`` store, gathered and scattered by the cohort's
ids inside the jitted round). Client i starts from y = x and takes K local steps with

  g = grad f_i(y; batch) - c_i + c,

then computes its new control variate c_i+ by one of the paper's two rules (line 12, option
``control_update``):

* ``"option_ii"`` (default; the paper's cheaper choice, used in all its experiments):
  ``c_i+ = c_i - c + (x - y) / (K * lr)``, K its number of real local steps and lr the client
  learning rate;
* ``"option_i"``: ``c_i+ = g_i(x)``, the client's gradient at the server model x from "an
  additional pass over the local data": the mean gradient at x over the client's examples, each
  once (`fedjax_sim.algorithms.local.first_pass_gradient`), taken from the first n slots of the
  round's own batch stream (n = the client's examples; the same batches, padding masks and
  client keys as its local steps). With local epochs, or fixed local steps with ``K * B >= n``,
  those slots hold every example once, so c_i+ is the full-data gradient ``grad f_i(x)``; a
  round with fewer than n example slots (fixed steps with ``K * B < n``, ``max_local_steps``)
  gives the gradient over the ``K * B`` distinct examples the client trains on, a uniform subset
  (an unbiased estimate of ``grad f_i(x)``, like the stochastic g_i of the paper's analysis; the
  host data path ships no other rows). A deadline that cuts a straggler cuts its pass too. It
  costs up to ``ceil(n / B)`` more gradient evaluations per client (S, mostly masked, under
  ``vmap``) and needs no client learning rate.

The server steps its optimizer on the weighted mean of ``x - y_i`` (SGD with learning rate
eta_g is the paper's global step; 1.0 by default) and sets ``c <- c + 1/N * sum_i (c_i+ - c_i)``
over the cohort (= |S|/N times the cohort mean), under either option. Padding clients and
clients without a real step neither write their row nor count in that sum.

The corrections ``c - c_i`` cancel in the server average only in the paper's setting: every
client takes the same number K of local steps, the average is uniform, and the clients run
plain SGD. Then ``x - y_i = lr sum_k g_i(y_ik) + K lr (c - c_i)`` averages to a step along the
path gradients, because ``c`` is the mean of the ``c_i``. With step counts that differ (local
training by epochs over clients of different sizes, a deadline that cuts stragglers), weights by
examples, or client momentum (a correction enters every later step once more), a residue of
the corrections stays in every server step and SCAFFOLD can lose to FedAvg; `scaffold` then
warns (`ScaffoldSettingWarning`) at build time.

Example::

  algorithm = scaffold(model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                       optax.sgd(1.0), num_clients=100)
  option_i = scaffold(model, optax.sgd(0.05), optax.sgd(1.0), num_clients=100,
                      control_update="option_i")
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_sim.aggregators import as_aggregator
from fedjax_sim.aggregators.base import Stage, apply_aggregator
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
    second_message_metrics,
    server_fields,
    server_step,
)
from fedjax_sim.algorithms.local import LossFn, first_pass_gradient, weight_exponent
from fedjax_sim.core import Aggregator, ClientMap, Cohort, FederatedAlgorithm
from fedjax_sim.models.base import Model

Params = Any

CONTROL_UPDATES = ("option_i", "option_ii")
"""The paper's two control-variate updates (Algorithm 1, line 12): ``c_i+ = g_i(x)`` (I) and
``c_i+ = c_i - c + (x - y_i) / (K lr)`` (II)."""


class ScaffoldSettingWarning(UserWarning):
    """SCAFFOLD runs outside its paper's setting, where its control-variate corrections cancel."""


def _has_momentum(optimizer: optax.GradientTransformation) -> bool:
    """Whether a zero gradient after a nonzero one still moves the parameters (momentum, Adam).

    Probed on one zero parameter (so weight decay adds nothing); an optimizer that cannot be
    probed this way (it needs extra arguments) counts as having none.
    """
    params = jnp.zeros((1,), jnp.float32)
    try:
        state = optimizer.init(params)
        _, state = optimizer.update(jnp.ones_like(params), state, params)
        updates, _ = optimizer.update(jnp.zeros_like(params), state, params)
    except (TypeError, ValueError):
        return False
    return bool(jnp.any(updates != 0))


def check_setting(
    client_optimizer: optax.GradientTransformation,
    client_weighting: str | float = "num_examples",
    equal_local_steps: bool | None = None,
) -> list[str]:
    """Why SCAFFOLD's corrections would not cancel in the server average (empty: they do).

    Args:
      client_optimizer: the local optimizer (momentum breaks the cancellation).
      client_weighting: as `scaffold`'s (anything but uniform breaks it).
      equal_local_steps: whether every client takes the same number of local steps each round;
        False breaks it, None (unknown) is not checked.
    """
    reasons = []
    if equal_local_steps is False:
        reasons.append("clients' local step counts differ (local training by epochs over clients "
                       "of different sizes, or a deadline that cuts stragglers; set "
                       "client.local_steps)")
    if weight_exponent(client_weighting) != 0:
        reasons.append(f"client weights are not uniform (client_weighting={client_weighting!r}; "
                       "set client.weighting: uniform)")
    if _has_momentum(client_optimizer):
        reasons.append("the client optimizer has momentum (a correction enters every later "
                       "step again; use plain SGD)")
    return reasons


@struct.dataclass(kw_only=True)
class ScaffoldState(ServerState):
    """SCAFFOLD server state: FedAvg's `ServerState` (``params`` is the global model x, its
    ``aggregator`` combines the model deltas) plus

    Attributes:
      control: the server control variate c (shaped like params).
      client_controls: every client's control variate c_i, leaves ``[num_clients, ...]``.
      client_learning_rate: the local learning rate in option II's ``(x - y) / (K * lr)``
        (0 when it is read from the client optimizer's state, or unused: option I).
      control_aggregator: the state of the aggregator of the control-variate deltas.
    """

    control: Params
    client_controls: Params
    client_learning_rate: jax.Array
    control_aggregator: Any = ()


def scaffold(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    control_update: str = "option_ii",
    client_learning_rate: float | None = None,
    client_weighting: str | float = "num_examples",
    num_clients: int | None = None,
    loss_fn: LossFn | None = None,
    client_schedules: ClientSchedules | None = None,
    aggregator: Aggregator | Stage | None = None,
    control_aggregator: Aggregator | Stage | None = None,
    equal_local_steps: bool | None = None,
) -> FederatedAlgorithm:
    """SCAFFOLD (option I or II control variates) with optax client and server optimizers.

    Args:
      model: the model to train.
      client_optimizer: the local optimizer (SGD in the paper); its state starts fresh each round.
      server_optimizer: applied to ``x - weighted mean of y_i`` (SGD with the global learning
        rate eta_g; 1.0 is the paper's default).
      control_update: ``"option_ii"`` (default): ``c_i+ = c_i - c + (x - y_i) / (K * lr)``;
        ``"option_i"``: ``c_i+ = g_i(x)``, the client's mean gradient at the server model x over
        its examples, each once (the first pass of its round's batches: all its examples
        whenever the round reaches them, else the ones it trains on; see the module docstring).
        Config: ``algorithm.control_update``. Example-level DP-SGD's accounting
        (`fedjax_sim.privacy.dp_sgd`) counts the local steps only, not option I's extra pass
        over the examples (a config refuses the pair).
      client_learning_rate: lr in option II's ``(x - y) / (K * lr)``. None (default): the client
        optimizer's injected ``learning_rate`` (what the config's optimizers have), read from
        the state each round, so sweeps and schedules of it stay consistent. Option I uses no
        learning rate and refuses one.
      client_weighting: ``"num_examples"``, ``"uniform"`` or an exponent of num_examples (the
        weights of the params average; the control variate update is the paper's 1/N sum).
      num_clients: N, the number of training clients (required: the store has a row for each).
      loss_fn: the local objective (default: the model's masked cross-entropy).
      aggregator: combines the clients' model deltas ``x - y_i`` (the first of SCAFFOLD's two
        messages; `fedjax_sim.aggregators`, default the weighted mean).
      control_aggregator: combines the second message, the control-variate deltas
        ``c_i+ - c_i`` (default: their uniform mean over the clients that trained, which the
        update scales by |S| / N). A DP run must privatize both messages.
      equal_local_steps: whether every client takes the same number of local steps each round
        (the engine passes it: False under ``client.local_epochs`` with clients of different
        sizes, or a deadline with per-client speeds). None: unknown, not checked.

    Returns:
      A `FederatedAlgorithm` whose state is a `ScaffoldState`.

    Raises:
      ValueError: ``"<option>: <problem>"`` for a bad ``control_update``, or a
        ``client_learning_rate`` with option I (the config names the key from it).

    Warns:
      ScaffoldSettingWarning: outside the paper's setting (equal local steps, uniform weights,
        plain client SGD), where the control-variate corrections do not cancel (see
        `check_setting`).
    """
    if num_clients is None or int(num_clients) < 1:
        raise ValueError(f"scaffold needs num_clients (>= 1) for its per-client control "
                         f"variates, got {num_clients!r}")
    if control_update not in CONTROL_UPDATES:
        close = difflib.get_close_matches(str(control_update), CONTROL_UPDATES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"control_update: {control_update!r} is not one of "
                         f"{list(CONTROL_UPDATES)}{hint}")
    option_i = control_update == "option_i"
    if option_i and client_learning_rate is not None:
        raise ValueError("client_learning_rate: only option II's (x - y) / (K lr) uses it; "
                         "control_update='option_i' does not (leave it unset)")
    if client_learning_rate is not None and not float(client_learning_rate) > 0:
        raise ValueError(f"scaffold: client_learning_rate must be > 0, got "
                         f"{client_learning_rate!r}")
    exponent, loss_fn, aggregator = fed_avg_setup(model, client_weighting, loss_fn, aggregator)
    reasons = check_setting(client_optimizer, client_weighting, equal_local_steps)
    if reasons:
        warnings.warn(
            "scaffold: the control-variate corrections do not cancel in the server average when "
            + "; ".join(reasons) + ". They cancel with equal local steps, uniform client weights "
            "and plain client SGD (the paper's setting); otherwise SCAFFOLD drifts and can lose "
            "to FedAvg.", ScaffoldSettingWarning, stacklevel=2)
    control_aggregator = as_aggregator(control_aggregator)

    def init(params: Params) -> ScaffoldState:
        fields = server_fields(params, client_optimizer, server_optimizer, exponent, aggregator)
        if (not option_i and client_learning_rate is None
                and "learning_rate" not in fields["client_hyperparams"]):
            raise ValueError(
                "scaffold: set client_learning_rate, or use a client optimizer built with "
                "optax.inject_hyperparams(...)(learning_rate=...) so it can be read"
            )
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaffoldState(
            **fields,
            control=zeros,
            client_controls=init_client_state(zeros, int(num_clients)),
            client_learning_rate=jnp.asarray(
                0.0 if client_learning_rate is None else client_learning_rate, jnp.float32),
            control_aggregator=control_aggregator.init(params),
        )

    def client_update(inputs, shared):
        client, client_control = inputs
        server_params, control, data, hyperparams, learning_rate = shared

        shift = jax.tree.map(jnp.subtract, control, client_control)  # c - c_i, fixed per round

        def corrected(grads, params):  # g - c_i + c
            return jax.tree.map(jnp.add, grads, shift)

        delta, stats = client_delta(loss_fn, client_optimizer, server_params, client, data,
                                    hyperparams, corrected)
        if option_i:  # c_i+ = g_i(x): the gradient at the server model over the local data
            return delta, first_pass_gradient(loss_fn, server_params, client, data), stats
        scale = 1.0 / (jnp.maximum(client.num_steps, 1).astype(jnp.float32) * learning_rate)
        new_control = jax.tree.map(
            lambda ci, c, d: ci - c + scale.astype(d.dtype) * d, client_control, control, delta
        )
        return delta, new_control, stats

    def apply(state: ScaffoldState, cohort: Cohort, map_clients: ClientMap):
        # client learning-rate schedules follow the round (client state is fresh each round)
        hyperparams = scheduled_hyperparams(state.client_hyperparams, client_schedules,
                                            cohort.round)
        clients = cohort.clients
        learning_rate = (state.client_learning_rate  # option I: unused (0)
                         if option_i or client_learning_rate is not None
                         else hyperparams["learning_rate"])
        client_controls = gather_client_state(state.client_controls, clients.client_id)
        deltas, new_controls, stats = map_clients(
            client_update,
            (clients, client_controls),
            (state.params, state.control, cohort.data, hyperparams,
             jnp.asarray(learning_rate, jnp.float32)),
        )
        weights = client_weights(clients, state.weight_exponent)
        trained = weights > 0  # valid clients with at least one real step
        key_deltas, key_controls = jax.random.split(cohort.server_key())
        new_state, metrics = server_step(state, server_optimizer, aggregator, deltas, weights,
                                         key_deltas, client_ids=clients.client_id,
                                         cohort_size=cohort.size)
        # c <- c + 1/N sum_{i in S} (c_i+ - c_i), over the clients that trained.
        summed, control_aggregator_state, control_metrics = apply_aggregator(
            control_aggregator, state.control_aggregator,
            jax.tree.map(jnp.subtract, new_controls, client_controls),
            trained.astype(jnp.float32), key_controls, client_ids=clients.client_id,
            cohort_size=cohort.size)
        fraction = jnp.sum(trained.astype(jnp.float32)) / num_clients
        control = jax.tree.map(lambda c, s: c + fraction * s, state.control, summed)
        new_state = new_state.replace(
            control=control,
            client_controls=scatter_client_state(
                state.client_controls, clients.client_id, new_controls, trained),
            control_aggregator=control_aggregator_state,
        )
        return new_state, {**round_metrics(stats, weights), **metrics,
                           **second_message_metrics(control_metrics, "control_aggregator")}

    return FederatedAlgorithm(init, apply)
