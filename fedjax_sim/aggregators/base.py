"""Aggregation stages and their chaining, in the optax style.

An aggregation is a chain of stages between the clients and the server optimizer:

  client stages   (state, values [C, ...], weights [C], key, context) -> values, weights
  one reducer     (state, values [C, ...], weights [C], key, context) -> aggregate
  server stages   (state, aggregate, key, context)                    -> aggregate

each returning its new state, metrics and the context. ``chain(clip(1.0), mean(),
gaussian_noise(1.0))`` builds one `Aggregator` (``fedjax_sim.core``) out of them; a lone
reducer is an aggregator too (`as_aggregator`).

The *context* is a small dict of arrays that stages hand down the chain, so that a later stage
can calibrate to what an earlier one guaranteed:

* ``sensitivity``: an L2 bound on one client's value (set by `clip`);
* ``weight_bound``: a bound on one client's weight in the reducer's sum (1 when uniform);
* ``scale``: the factor the reducer multiplied the weighted sum by (1 / denominator);
* ``denominator``: that denominator (the expected cohort size for a fixed-denominator mean);
* ``client_ids``: ``[C]`` int32, whose messages the values are (when the algorithm passes them,
  as every built-in one does): per-client state (error feedback) and attacks key on them.
* ``cohort_size``: a static Python int, the cohort's real rows when the engine padded it with
  zero-weight rows to a multiple of the devices (the padding is the last rows; absent without
  padding): a stage that simulates a protocol among the clients (secure aggregation) leaves
  the padding out, so its results do not depend on the device count.

Gaussian noise of multiplier z then has std ``z * sensitivity * weight_bound * scale`` on the
aggregate: ``z * sensitivity`` on the sum, as DP-FedAvg prescribes (McMahan et al. 2018).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core import Aggregator

PyTree = Any
Context = dict[str, jax.Array]

CLIENT, REDUCE, SERVER = "client", "reduce", "server"


class Stage(NamedTuple):
    """One stage of an aggregation chain.

    Attributes:
      kind: ``"client"`` (per-client transform), ``"reduce"`` (the client axis -> one value) or
        ``"server"`` (a transform of the aggregate).
      init: ``example -> state`` (``example``: one client's message, no client axis).
      apply: see the module docstring for each kind's signature.
      name: a short name for metrics (``aggregator/<name>/...``) and errors.
      noise_multipliers: ``state -> {mechanism: z}`` for a stage that adds Gaussian noise.
    """

    kind: str
    init: Callable[[PyTree], PyTree]
    apply: Callable[..., tuple]
    name: str
    noise_multipliers: Callable[[PyTree], dict[str, jax.Array]] | None = None


def no_state(example: PyTree) -> tuple:
    """``init`` of a stateless stage."""
    del example
    return ()


def array_state(**values: float) -> Callable[[PyTree], dict[str, jax.Array]]:
    """``init`` of a stage whose state is its numeric options as float32 arrays (sweepable)."""

    def init(example: PyTree) -> dict[str, jax.Array]:
        del example
        return {name: jnp.asarray(value, jnp.float32) for name, value in values.items()}

    return init


def weighted_mean(values: PyTree, weights: jax.Array) -> PyTree:
    """Mean over the leading client axis with weights ``[C]`` (safe when all are zero).

    A ``tensordot`` rather than ``sum(x * w, axis=0)``: XLA:CPU compiles the latter into a slow
    loop (162 ms vs 1.6 ms for the EMNIST CNN's 10 client deltas). ``HIGHEST`` keeps GPUs and TPUs
    from reducing the precision of this contraction.

    A mean is never larger than the largest value, but the weighted sum can overflow float32
    on the way (values ~1e36 with weights ~1e3, or two values of 3e38): only then (a
    ``lax.cond``) it is recomputed as ``2 sum_i (w_i / W) (x_i / 2)``, which cannot overflow.
    """
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)

    def mean(x):
        summed = jnp.tensordot(weights.astype(x.dtype), x, axes=1,
                               precision=jax.lax.Precision.HIGHEST)
        return summed / total.astype(x.dtype)

    def rescaled(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return mean(x)
        half = jnp.tensordot((weights / total).astype(x.dtype), x * 0.5, axes=1,
                             precision=jax.lax.Precision.HIGHEST)
        big = jnp.finfo(x.dtype).max
        # finite halves stay finite doubled (rounding can reach 2^127); inf or nan from a
        # non-finite value stays
        return jnp.where(jnp.isfinite(half), jnp.clip(half, -big / 2, big / 2) * 2, half)

    means = jax.tree.map(mean, values)
    overflow = functools.reduce(jnp.logical_or, [~jnp.all(jnp.isfinite(m))
                                                 for m in jax.tree.leaves(means)], False)
    return jax.lax.cond(overflow, lambda: jax.tree.map(rescaled, values), lambda: means)


def weighted_sum(values: PyTree, weights: jax.Array) -> PyTree:
    """``sum_i weights[i] * values[i]`` over the leading client axis (a ``tensordot``)."""
    return jax.tree.map(
        lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1,
                                precision=jax.lax.Precision.HIGHEST),
        values,
    )


def client_norms(values: PyTree) -> jax.Array:
    """``[C]`` the L2 norm of each client's whole value (all leaves flattened together).

    Overflow-safe: see `scaled_client_norms` (inf only where the norm itself exceeds float32).
    """
    scale, reduced = scaled_client_norms(values)
    return scale * reduced


# 2^-100: x * 2^-100 squared stays finite for every finite float32 x (<= 7.3e16, so sums of up
# to 4e21 terms) and normal for |x| >= ~1e12, the size some entry must have when the plain sum
# of squares overflows (|x| >= 1.8e19 / sqrt(d)).
_NORM_SHIFT = 2.0 ** -100


def scaled_client_norms(values: PyTree) -> tuple[jax.Array, jax.Array]:
    """``([C] scale, [C] reduced)``: each client's L2 norm is ``scale * reduced``.

    ``scale`` is 1 and ``reduced`` the plain ``sqrt(sum x^2)`` wherever that sum of squares is
    finite; a client whose sum of squares overflows float32 (entries past ~1.8e19) gets
    ``scale = 2^100`` and ``reduced = sqrt(sum (x 2^-100)^2)``, the overflow-free form of its
    norm, so that ``x / scale * (C / reduced)`` clips it without forming the norm (which can
    itself exceed float32). Both sums of squares are sibling reductions of the same pass over
    ``values`` (one read of the data, no ``lax.cond``, which ``vmap`` would turn into computing
    both branches); an inf or nan entry keeps its inf or nan norm.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(values)]

    def squares(shift):
        return sum(jnp.sum(jnp.square(x * shift if shift != 1 else x).reshape(x.shape[0], -1),
                           axis=1) for x in leaves)

    plain, shifted = squares(1), squares(_NORM_SHIFT)
    overflow = jnp.isinf(plain) & jnp.isfinite(shifted)
    scale = jnp.where(overflow, 1.0 / _NORM_SHIFT, 1.0).astype(jnp.float32)
    return scale, jnp.sqrt(jnp.where(overflow, shifted, plain))


def initial_context(client_ids: jax.Array | None, cohort_size: int | None) -> Context:
    """The context the first stage of a chain sees (see the module docstring)."""
    context: Context = {} if client_ids is None else {"client_ids": client_ids}
    if cohort_size is not None:
        context["cohort_size"] = int(cohort_size)
    return context


def apply_aggregator(aggregator: Aggregator, state: PyTree, values: PyTree, weights: jax.Array,
                     key: jax.Array, *, client_ids: jax.Array | None = None,
                     cohort_size: int | None = None) -> tuple[PyTree, PyTree, dict]:
    """``aggregator.apply`` as the built-in algorithms call it.

    ``cohort_size`` (static: the real rows of a cohort padded for the devices, or None) is
    passed only to an ``apply`` that takes it (a ``cohort_size`` or ``**kwargs`` parameter, as
    `chain`'s does), the way optax hands extra arguments only to the transformations that
    accept them: an aggregator written to the older ``apply(state, values, weights, key,
    client_ids=None)`` keeps working.
    """
    if cohort_size is not None and _accepts(aggregator.apply, "cohort_size"):
        return aggregator.apply(state, values, weights, key, client_ids=client_ids,
                                cohort_size=cohort_size)
    return aggregator.apply(state, values, weights, key, client_ids=client_ids)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def participating(weights: jax.Array) -> jax.Array:
    """``[C]`` bool: the clients that send a message (weight > 0)."""
    return weights > 0


def chain(*stages: Stage | Aggregator) -> Aggregator:
    """Composes client stages, one reducer and server stages into one `Aggregator`.

    Example::

      aggregator = chain(clip(1.0), mean(weighting="uniform", denominator=100.0),
                         gaussian_noise(noise_multiplier=1.0))

    Raises ValueError unless there is exactly one reducer with client stages before it and
    server stages after it.
    """
    stages = tuple(stages)
    for stage in stages:
        if not isinstance(stage, Stage):
            raise TypeError(f"chain: expected aggregation stages (clip(), mean(), ...), got "
                            f"{type(stage).__name__}")
    kinds = [stage.kind for stage in stages]
    if kinds.count(REDUCE) != 1:
        raise ValueError(f"chain: needs exactly one reducer (mean, sum, ...), got stages "
                         f"{[s.name for s in stages]}")
    split = kinds.index(REDUCE)
    if any(k != CLIENT for k in kinds[:split]) or any(k != SERVER for k in kinds[split + 1:]):
        raise ValueError(
            f"chain: client stages (clip, ...) go before the reducer and server stages "
            f"(gaussian_noise, ...) after it; got {[f'{s.name} ({s.kind})' for s in stages]}")
    names = _unique_names(stages)

    def init(example: PyTree) -> tuple:
        return tuple(stage.init(example) for stage in stages)

    def apply(state: tuple, values: PyTree, weights: jax.Array, key: jax.Array,
              client_ids: jax.Array | None = None, cohort_size: int | None = None):
        keys = jax.random.split(key, len(stages)) if len(stages) > 1 else [key]
        context = initial_context(client_ids, cohort_size)
        metrics: dict[str, jax.Array] = {}
        new_state = []
        aggregate = None
        for stage, name, stage_state, stage_key in zip(stages, names, state, keys, strict=True):
            if stage.kind == CLIENT:
                values, weights, stage_state, stage_metrics, context = stage.apply(
                    stage_state, values, weights, stage_key, context)
            elif stage.kind == REDUCE:
                aggregate, stage_state, stage_metrics, context = stage.apply(
                    stage_state, values, weights, stage_key, context)
            else:
                aggregate, stage_state, stage_metrics, context = stage.apply(
                    stage_state, aggregate, stage_key, context)
            new_state.append(stage_state)
            metrics.update({f"aggregator/{name}/{k}": v for k, v in stage_metrics.items()})
        return aggregate, tuple(new_state), metrics

    def noise_multipliers(state: tuple) -> dict[str, jax.Array]:
        out = {}
        for stage, name, stage_state in zip(stages, names, state, strict=True):
            if stage.noise_multipliers is not None:
                out.update({f"{name}/{k}": v
                            for k, v in stage.noise_multipliers(stage_state).items()})
        return out

    private = any(stage.noise_multipliers is not None for stage in stages)
    return Aggregator(init, apply, noise_multipliers if private else None)


def _unique_names(stages: tuple[Stage, ...]) -> list[str]:
    names, seen = [], {}
    for stage in stages:
        count = seen.get(stage.name, 0)
        seen[stage.name] = count + 1
        names.append(stage.name if count == 0 else f"{stage.name}_{count}")
    return names
