"""TensorFlow Federated's vocabulary in JAX: placed values, federated intrinsics, computations.

A federated computation is an ordinary function of *placed* values (TFF's programming model,
https://www.tensorflow.org/federated/federated_core): a value lives at the ``SERVER`` (one
value) or at the ``CLIENTS`` (one value per client), and intrinsics move and combine values::

  @federated_computation(FederatedType(jnp.float32, CLIENTS))
  def get_average_temperature(sensor_readings):
      return federated_mean(sensor_readings)

  get_average_temperature([68.5, 70.3, 69.8])                   # 69.53333

Representation (everything is a JAX pytree, so a whole computation is one ``jax.jit``):

* a CLIENTS value is a `FederatedValue` whose leaves carry a leading client axis ``[C, ...]``,
  plus optional ``weights [C]`` (the default weights of `federated_mean`) and ``mask [C]``
  (False for padding clients, which no aggregation counts);
* an *all-equal* CLIENTS value (what `federated_broadcast` and `federated_value` make) and a
  SERVER value hold the member itself, with no client axis;
* `federated_map` over CLIENTS values runs on the engine's client map
  (`fedjax_sim.simulation.client_map`): a sequential ``lax.map`` on CPU, a ``vmap`` on GPU/TPU,
  chunks, or shards over a device mesh, as `execution_context` selects; all-equal (broadcast)
  arguments are shared, not copied. A SERVER map runs once.

Types are TFF's: ``FederatedType(member, placement, all_equal)`` whose member is a pytree of
``jax.ShapeDtypeStruct`` (or `TensorType`, which allows unknown dimensions; ``...`` accepts any
member); ``str`` prints TFF's notation: ``{float32}@CLIENTS``, ``float32@SERVER``,
``<x=float32[?,2],y=int32[?]>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim.aggregators import masked_modular_sum, weighted_mean
from fedjax_sim.core import ClientMap
from fedjax_sim.simulation.client_map import (
    local_client_map,
    resolve_strategy,
    sharded_client_map,
)

PyTree = Any

__all__ = [
    "CLIENTS",
    "SERVER",
    "FederatedComputation",
    "FederatedType",
    "FederatedValue",
    "Placement",
    "TensorType",
    "at_clients",
    "at_server",
    "Execution",
    "current_execution",
    "execution_context",
    "federated_aggregate",
    "federated_broadcast",
    "federated_computation",
    "federated_map",
    "federated_max",
    "federated_mean",
    "federated_min",
    "federated_secure_sum",
    "federated_sum",
    "federated_value",
    "federated_zip",
    "type_at_clients",
    "type_at_server",
    "type_of",
]


class Placement(enum.Enum):
    """Where a federated value lives."""

    CLIENTS = "CLIENTS"
    SERVER = "SERVER"

    def __str__(self) -> str:
        return self.value

    __repr__ = __str__


CLIENTS = Placement.CLIENTS
SERVER = Placement.SERVER


# ---------------------------------------------------------------------------------------------
# Member types
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorType:
    """A tensor type whose shape may have unknown dimensions (``None``, printed ``?``).

    ``TensorType(jnp.float32, (None, 2))`` matches any ``float32[n, 2]``. A fully known shape is
    normalized to a ``jax.ShapeDtypeStruct`` inside a `FederatedType`.
    """

    dtype: Any
    shape: tuple[int | None, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        shape = tuple(None if d is None else int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)

    def __str__(self) -> str:
        return _tensor_str(self.dtype, self.shape)


def _is_member_leaf(x: Any) -> bool:
    return x is Ellipsis or isinstance(x, (jax.ShapeDtypeStruct, TensorType))


def _normalize_leaf(leaf: Any) -> jax.ShapeDtypeStruct | TensorType:
    """A dtype-like (``jnp.float32``, ``"int32"``), TensorType or ShapeDtypeStruct leaf."""
    if leaf is Ellipsis:  # any member
        return leaf
    if isinstance(leaf, TensorType):
        if any(d is None for d in leaf.shape):
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    try:
        return jax.ShapeDtypeStruct((), np.dtype(leaf))
    except TypeError:
        raise TypeError(
            f"a member type leaf must be a dtype (e.g. jnp.float32), a jax.ShapeDtypeStruct or a "
            f"TensorType, got {leaf!r}"
        ) from None


def _normalize_member(member: PyTree) -> PyTree:
    return jax.tree.map(_normalize_leaf, member, is_leaf=_is_member_leaf)


def _tensor_str(dtype: Any, shape: Sequence[int | None]) -> str:
    name = np.dtype(dtype).name
    if not shape:
        return name
    return name + "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _member_str(member: PyTree) -> str:
    """TFF's notation: ``float32[2]``, ``<a=float32,b=int32>``, ``<float32,int32>``."""
    if member is Ellipsis:
        return "?"
    if _is_member_leaf(member):
        return _tensor_str(member.dtype, member.shape)
    if isinstance(member, Mapping):
        keys = sorted(member) if all(isinstance(k, str) for k in member) else list(member)
        return "<" + ",".join(f"{k}={_member_str(member[k])}" for k in keys) + ">"
    if isinstance(member, tuple) and hasattr(member, "_fields"):  # namedtuple
        return "<" + ",".join(f"{k}={_member_str(v)}" for k, v in member._asdict().items()) + ">"
    if isinstance(member, (tuple, list)):
        return "<" + ",".join(_member_str(v) for v in member) + ">"
    if dataclasses.is_dataclass(member):
        fields = [f.name for f in dataclasses.fields(member)
                  if f.metadata.get("pytree_node", True)]
        return "<" + ",".join(f"{k}={_member_str(getattr(member, k))}" for k in fields) + ">"
    if member is None:
        return "<>"
    children, _ = jax.tree_util.tree_flatten(member, is_leaf=lambda n: n is not member)
    return "<" + ",".join(_member_str(c) for c in children) + ">"


def _leaf_matches(expected, given) -> bool:
    if expected is Ellipsis:  # any member (e.g. one field of a struct declared as ``...``)
        return True
    if np.dtype(expected.dtype) != np.dtype(given.dtype):
        return False
    if len(expected.shape) != len(given.shape):
        return False
    return all(e is None or e == g for e, g in zip(expected.shape, given.shape, strict=True))


def _member_matches(expected: PyTree, given: PyTree) -> bool:
    """Same leaf paths and matching leaves (static fields of a flax struct are not compared)."""
    if expected is Ellipsis:
        return True
    e_leaves = jax.tree_util.tree_flatten_with_path(expected, is_leaf=_is_member_leaf)[0]
    g_leaves = jax.tree_util.tree_flatten_with_path(given, is_leaf=_is_member_leaf)[0]
    if [path for path, _ in e_leaves] != [path for path, _ in g_leaves]:
        return False
    return all(_leaf_matches(e, g) for (_, e), (_, g) in zip(e_leaves, g_leaves, strict=True))


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedType:
    """The type of a placed value: its member type, its placement and whether it is all-equal.

    Attributes:
      member: the type of one member: a pytree (dict, tuple, namedtuple, flax struct, ...) of
        ``jax.ShapeDtypeStruct`` or `TensorType` leaves; a dtype alone (``jnp.float32``) means a
        scalar. ``jax.eval_shape(model.init, key)`` gives a model's parameter type.
      placement: `CLIENTS` or `SERVER`.
      all_equal: every client holds the same member (always True at the SERVER). Default:
        False at CLIENTS, True at the SERVER.

    ``str`` follows TFF: ``{float32}@CLIENTS`` (one value per client), ``float32@CLIENTS``
    (all-equal), ``float32@SERVER``.
    """

    member: PyTree
    placement: Placement
    all_equal: bool | None = None

    def __post_init__(self):
        if not isinstance(self.placement, Placement):
            raise TypeError(f"placement must be CLIENTS or SERVER, got {self.placement!r}")
        object.__setattr__(self, "member", _normalize_member(self.member))
        all_equal = self.placement is SERVER if self.all_equal is None else bool(self.all_equal)
        if self.placement is SERVER and not all_equal:
            raise ValueError("a SERVER value is always all_equal")
        object.__setattr__(self, "all_equal", all_equal)

    def __str__(self) -> str:
        member = _member_str(self.member)
        if self.placement is CLIENTS and not self.all_equal:
            member = "{" + member + "}"
        return f"{member}@{self.placement}"

    __repr__ = __str__

    def _key(self):
        leaves, treedef = jax.tree.flatten(self.member, is_leaf=_is_member_leaf)
        return (treedef, tuple(x if x is Ellipsis else (np.dtype(x.dtype), tuple(x.shape))
                               for x in leaves),
                self.placement, self.all_equal)

    def __eq__(self, other) -> bool:
        return isinstance(other, FederatedType) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(str(self))

    def is_assignable_from(self, other: FederatedType) -> bool:
        """True when a value of type ``other`` may be passed where ``self`` is declared.

        Placement and ``all_equal`` must agree (an all-equal CLIENTS value is also accepted
        where per-client values are declared) and every dimension must match (``None`` in
        ``self`` matches any size).
        """
        if self.placement is not other.placement:
            return False
        if self.all_equal and not other.all_equal:
            return False
        return _member_matches(self.member, other.member)


def type_at_clients(member: PyTree, all_equal: bool = False) -> FederatedType:
    """``FederatedType(member, CLIENTS, all_equal)`` (TFF's ``tff.type_at_clients``)."""
    return FederatedType(member, CLIENTS, all_equal)


def type_at_server(member: PyTree) -> FederatedType:
    """``FederatedType(member, SERVER)`` (TFF's ``tff.type_at_server``)."""
    return FederatedType(member, SERVER)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class FederatedValue:
    """A placed value; a JAX pytree (its placement is static), so it passes through ``jit``.

    Attributes:
      value: at CLIENTS (not all-equal): a pytree whose leaves have a leading client axis
        ``[C, ...]``; otherwise the member itself.
      placement: `CLIENTS` or `SERVER` (static).
      all_equal: True for SERVER values and broadcast CLIENTS values (static).
      weights: optional ``[C]`` float32, the default weights `federated_mean` uses.
      mask: optional ``[C]`` bool, False for padding clients: they are left out of every
        aggregation (mean, sum, min, max, aggregate, secure sum).
    """

    value: PyTree
    placement: Placement = struct.field(pytree_node=False, default=CLIENTS)
    all_equal: bool = struct.field(pytree_node=False, default=False)
    weights: jax.Array | None = None
    mask: jax.Array | None = None

    @property
    def type(self) -> FederatedType:
        """The value's `FederatedType` (the client axis is not part of the member type)."""
        return type_of(self)

    @property
    def num_clients(self) -> int | None:
        """C, the length of the client axis (None for all-equal and SERVER values)."""
        if self.placement is SERVER or self.all_equal:
            return None
        leaves = jax.tree.leaves(self.value)
        return leaves[0].shape[0] if leaves else None

    def __getitem__(self, key) -> FederatedValue:
        """Selection, as in TFF: ``value[0]``, ``value["x"]`` select from every member.

        The member must be a structure (tuple, list, dict, namedtuple): as in TFF, a tensor
        member has no elements to select (indexing the stacked ``[C, ...]`` array would pick
        clients, not a part of every member), so that raises TypeError.
        """
        if not isinstance(self.value, (tuple, list, Mapping)):
            raise TypeError(
                f"selection [{key!r}] needs a structure member (a tuple, list or dict), got "
                f"{self.type}; to slice every member, use federated_map(lambda m: m[...], value)"
            )
        if isinstance(key, str) and hasattr(self.value, "_fields"):  # a namedtuple's field
            return self.replace(value=getattr(self.value, key))
        return self.replace(value=self.value[key])

    def __repr__(self) -> str:
        return f"FederatedValue({self.type}, clients={self.num_clients})"


def _leaf_spec(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def type_of(value: FederatedValue) -> FederatedType:
    """The `FederatedType` of a `FederatedValue`."""
    if not isinstance(value, FederatedValue):
        raise TypeError(f"type_of expects a FederatedValue, got {_describe(value)}")
    per_client = value.placement is CLIENTS and not value.all_equal
    member = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)) if per_client
        else _leaf_spec(x),
        value.value,
    )
    return FederatedType(member, value.placement, value.all_equal)


def at_clients(value: PyTree, *, weights: Any = None, mask: Any = None) -> FederatedValue:
    """A CLIENTS value from a pytree whose leaves have a leading client axis ``[C, ...]``.

    Args:
      value: the clients' members, stacked (a list of per-client members is stacked here).
      weights: optional ``[C]`` weights (the default weights of `federated_mean`).
      mask: optional ``[C]`` bool, False for padding clients.
    """
    if isinstance(value, list):
        value = _stack_clients(value)
    value = jax.tree.map(jnp.asarray, value)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(value)}
    if None in sizes or len(sizes) > 1:
        raise ValueError(
            "at_clients: every leaf needs the same leading client axis [C, ...], got leading "
            f"sizes {sorted(sizes, key=str)}"
        )
    num_clients = sizes.pop() if sizes else None
    extras = {}
    for name, extra, dtype in (("weights", weights, jnp.float32), ("mask", mask, jnp.bool_)):
        if extra is None:
            continue
        extra = jnp.asarray(extra, dtype)
        if extra.ndim != 1 or (num_clients is not None and extra.shape[0] != num_clients):
            raise ValueError(
                f"at_clients: {name} must have shape [C] = [{num_clients}], got {extra.shape}"
            )
        extras[name] = extra
    return FederatedValue(value, CLIENTS, False, **extras)


def at_server(value: PyTree) -> FederatedValue:
    """A SERVER value."""
    return FederatedValue(jax.tree.map(jnp.asarray, value), SERVER, True)


def _stack_clients(entries: list) -> PyTree:
    if not entries:
        raise ValueError("a CLIENTS value needs at least one client")
    structures = {jax.tree.structure(e) for e in entries}
    if len(structures) > 1:
        raise ValueError(f"the clients' values have different structures: {structures}")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *entries)


def _describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, FederatedValue):
        return str(x.type)
    leaves = jax.tree.leaves(x)
    if len(leaves) == 1 and leaves[0] is x and hasattr(x, "dtype"):
        return f"a plain {_tensor_str(x.dtype, np.shape(x))} array (not a federated value)"
    if leaves:
        try:
            spec = jax.tree.map(_leaf_spec, x)
            return f"a plain {_member_str(spec)} value (not a federated value)"
        except TypeError:
            pass
    return f"{type(x).__name__} {x!r:.60}"


# ---------------------------------------------------------------------------------------------
# The tracing context: how many clients a computation has (to expand all-equal values)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Clients:
    num_clients: int
    mask: jax.Array | None


_context = threading.local()


def _context_stack() -> list[_Clients | None]:
    if not hasattr(_context, "stack"):
        _context.stack = []
    return _context.stack


def _current_clients() -> _Clients | None:
    stack = _context_stack()
    return stack[-1] if stack else None


# ---------------------------------------------------------------------------------------------
# The execution context: how `federated_map` runs the clients (the engine's client map)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Execution:
    """How `federated_map` runs the clients: a client map, and whether it runs them one at a
    time (``sequential``; None when unknown), as `execution_context` selected.

    Hashable (a static argument of a computation's jit): the same map compiles once.
    """

    map_clients: ClientMap
    sequential: bool | None


@functools.cache
def _engine_execution(strategy: str, batch_size: int | None, mesh: Any) -> Execution:
    if mesh is None:
        map_clients = local_client_map(strategy, batch_size)
    else:
        map_clients = sharded_client_map(mesh, strategy, batch_size)
    return Execution(map_clients, strategy == "map" and (batch_size or 1) == 1)


def current_execution() -> Execution:
    """The `Execution` of the innermost `execution_context` (default: the engine's for the
    backend: sequential on CPU, ``vmap`` on GPU/TPU)."""
    stack = getattr(_context, "executions", None)
    if stack:
        return stack[-1]
    return _engine_execution(resolve_strategy("auto"), None, None)


@contextlib.contextmanager
def execution_context(
    client_execution: str | ClientMap = "auto",
    *,
    client_batch_size: int | None = None,
    mesh: Any = None,
) -> Iterator[None]:
    """Selects how `federated_map` runs the clients of the computations called inside.

    The options are the round step's (`fedjax_sim.simulation.round_step.build_round_step`):

    Args:
      client_execution: ``"auto"`` (the backend's default: sequential on CPU, ``vmap`` on
        GPU/TPU), ``"vmap"``, ``"map"`` (a ``lax.map`` in chunks of ``client_batch_size``,
        sequential when 1), or a `fedjax_sim.core.ClientMap` (e.g. the engine's own, when a
        computation runs as an algorithm).
      client_batch_size: clients per chunk under ``"map"``.
      mesh: a ``jax.sharding.Mesh`` with a ``clients`` axis: each device maps its share of the
        clients (C must be a multiple of the axis size).

    Example::

      with execution_context("vmap"):
          get_average_temperature([68.5, 70.3, 69.8])
    """
    if callable(client_execution):
        execution = Execution(client_execution, None)
    else:
        execution = _engine_execution(resolve_strategy(client_execution), client_batch_size,
                                      mesh)
    with _executing(execution):
        yield


@contextlib.contextmanager
def _executing(execution: Execution) -> Iterator[None]:
    stack = _context.__dict__.setdefault("executions", [])
    stack.append(execution)
    try:
        yield
    finally:
        stack.pop()


def _expand(value: FederatedValue, intrinsic: str) -> FederatedValue:
    """A per-client ``[C, ...]`` version of an all-equal CLIENTS value."""
    if not value.all_equal:
        return value
    clients = _current_clients()
    if clients is None:
        raise ValueError(
            f"{intrinsic} of an all-equal CLIENTS value ({value.type}) needs the number of "
            "clients: call it inside a federated_computation that has a CLIENTS argument, or "
            "federated_map it together with a per-client value first"
        )
    expanded = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (clients.num_clients, *jnp.shape(x))), value.value
    )
    return FederatedValue(expanded, CLIENTS, False, value.weights, clients.mask)


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------


def _require(value: Any, placement: Placement, intrinsic: str, what: str = "its argument"):
    if not isinstance(value, FederatedValue):
        hint = ("at_clients(...)" if placement is CLIENTS else "at_server(...)")
        raise TypeError(
            f"{intrinsic}: {what} must be a federated value placed at {placement}, got "
            f"{_describe(value)}; declare it as an argument of the federated_computation or "
            f"wrap it with {hint}"
        )
    if value.placement is not placement:
        fix = {
            (SERVER, CLIENTS): "; move it to the clients with federated_broadcast first",
            (CLIENTS, SERVER): "; aggregate it to the server first (federated_mean, "
                               "federated_sum, ...)",
        }.get((value.placement, placement), "")
        raise TypeError(
            f"{intrinsic}: {what} must be placed at {placement}, got {value.type}{fix}"
        )


def federated_value(value: PyTree, placement: Placement) -> FederatedValue:
    """An all-equal value at ``placement`` (TFF's ``tff.federated_value``).

    At CLIENTS every client holds ``value``; at the SERVER it is a server value.
    """
    if isinstance(value, FederatedValue):
        raise TypeError(f"federated_value: the value is already placed ({value.type})")
    if not isinstance(placement, Placement):
        raise TypeError(f"federated_value: placement must be CLIENTS or SERVER, got {placement!r}")
    return FederatedValue(jax.tree.map(jnp.asarray, value), placement, True)


def federated_broadcast(value: FederatedValue) -> FederatedValue:
    """SERVER -> all-equal CLIENTS: every client receives the server's value.

    No copy is made: the member is the client map's shared (unbatched) argument.
    """
    _require(value, SERVER, "federated_broadcast")
    return FederatedValue(value.value, CLIENTS, True)


def _as_value_list(value: Any, intrinsic: str) -> tuple[list[FederatedValue], bool]:
    """``value`` as a list of federated values, and whether it came as a list/tuple."""
    if isinstance(value, FederatedValue):
        return [value], False
    if isinstance(value, (list, tuple)) and value:
        for i, v in enumerate(value):
            if not isinstance(v, FederatedValue):
                raise TypeError(
                    f"{intrinsic}: element {i} must be a federated value, got {_describe(v)}"
                )
        return list(value), True
    raise TypeError(
        f"{intrinsic}: expected a federated value or a list of federated values, got "
        f"{_describe(value)}"
    )


def _common_placement(values: list[FederatedValue], intrinsic: str) -> Placement:
    placement = values[0].placement
    for i, v in enumerate(values):
        if v.placement is not placement:
            raise TypeError(
                f"{intrinsic}: all arguments must have the same placement; argument 0 is "
                f"{values[0].type} but argument {i} is {v.type}"
                + ("; broadcast the SERVER value with federated_broadcast"
                   if SERVER in (placement, v.placement) else "")
            )
    return placement


def _num_clients(values: list[FederatedValue], intrinsic: str) -> int | None:
    sizes = {v.num_clients for v in values if v.num_clients is not None}
    if len(sizes) > 1:
        raise ValueError(f"{intrinsic}: the arguments have different numbers of clients {sizes}")
    return sizes.pop() if sizes else None


def _first(values: list[FederatedValue], attribute: str):
    for v in values:
        if getattr(v, attribute) is not None:
            return getattr(v, attribute)
    return None


def _combined_mask(values: list[FederatedValue]) -> jax.Array | None:
    """The clients every value counts: the AND of the values' masks (None: no mask)."""
    masks = [v.mask for v in values if v.mask is not None]
    if not masks:
        return None
    mask = jnp.asarray(masks[0], bool)
    for m in masks[1:]:
        mask = mask & jnp.asarray(m, bool)
    return mask


def federated_map(fn: Callable[..., PyTree], value: Any) -> FederatedValue:
    """Applies ``fn`` to every member (TFF's ``tff.federated_map``).

    Args:
      fn: a JAX-traceable function of one member; given a list ``[a, b, ...]`` of federated
        values it is called as ``fn(a_member, b_member, ...)``.
      value: a federated value, or a list/tuple of federated values at the same placement.

    Returns:
      At CLIENTS: ``fn`` over the client axis by the current client map (`execution_context`:
      sequential, ``vmap``, chunks or device shards, all giving the same result), all-equal
      arguments shared; the result keeps the first argument's ``weights`` and counts only
      clients that every argument counts (the AND of their ``mask``). If every
      argument is all-equal (or at the SERVER), ``fn`` runs once and the result is all-equal.
    """
    if not callable(fn):
        raise TypeError(f"federated_map: fn must be callable, got {fn!r}")
    values, as_list = _as_value_list(value, "federated_map")
    placement = _common_placement(values, "federated_map")
    members = [v.value for v in values]
    call = (lambda *ms: fn(*ms)) if as_list else (lambda m: fn(m))
    if placement is SERVER or all(v.all_equal for v in values):
        return FederatedValue(call(*members), placement, True)
    _num_clients(values, "federated_map")

    def one_client(client, shared):  # the engine's ClientMap signature
        client, shared = iter(client), iter(shared)
        return call(*[next(shared) if v.all_equal else next(client) for v in values])

    result = current_execution().map_clients(
        one_client, tuple(v.value for v in values if not v.all_equal),
        tuple(v.value for v in values if v.all_equal))
    return FederatedValue(result, CLIENTS, False, _first(values, "weights"),
                          _combined_mask(values))


def federated_zip(values: Sequence[FederatedValue] | Mapping[str, FederatedValue]
                  ) -> FederatedValue:
    """A list/tuple/dict of federated values -> one federated value of that structure.

    All-equal CLIENTS values zipped with per-client ones are broadcast to ``[C, ...]``.
    """
    if isinstance(values, Mapping):
        keys, items = list(values), list(values.values())
    elif isinstance(values, (list, tuple)):
        keys, items = None, list(values)
    else:
        raise TypeError(
            f"federated_zip: expected a list, tuple or dict of federated values, got "
            f"{_describe(values)}"
        )
    items, _ = _as_value_list(items, "federated_zip")
    placement = _common_placement(items, "federated_zip")
    all_equal = all(v.all_equal for v in items)
    if not all_equal:
        num_clients = _num_clients(items, "federated_zip")
        items = [v if not v.all_equal else FederatedValue(
            jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), v.value),
            CLIENTS, False) for v in items]
    members = [v.value for v in items]
    if keys is not None:
        member = dict(zip(keys, members, strict=True))
    elif isinstance(values, tuple) and hasattr(values, "_fields"):  # a namedtuple
        member = type(values)(*members)
    else:
        member = type(values)(members) if isinstance(values, (list, tuple)) else members
    return FederatedValue(member, placement, all_equal, _first(items, "weights"),
                          _combined_mask(items))


def _where_valid(mask: jax.Array | None, x: jax.Array, fill) -> jax.Array:
    if mask is None:
        return x
    return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (x.ndim - 1)), x, fill)


def _check_float(value: FederatedValue, intrinsic: str) -> None:
    for leaf in jax.tree.leaves(value.value):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{intrinsic}: needs floating-point members, got {value.type}; cast with "
                "federated_map(lambda v: v.astype(jnp.float32), value)"
            )


def federated_mean(value: FederatedValue, weight: FederatedValue | None = None
                   ) -> FederatedValue:
    """CLIENTS -> SERVER: the (weighted) mean over the clients (TFF's ``tff.federated_mean``).

    ``sum_c w_c x_c / sum_c w_c`` with ``w`` = ``weight`` (a CLIENTS float scalar), else the
    value's own ``weights``, else 1; padding clients (``mask`` False) get weight 0. All weights
    zero gives 0 (a safe divide).
    """
    _require(value, CLIENTS, "federated_mean")
    _check_float(value, "federated_mean")
    if weight is not None:
        _require(weight, CLIENTS, "federated_mean", "the weight")
        leaves = jax.tree.leaves(weight.value)
        if len(leaves) != 1 or (jnp.ndim(leaves[0]) != (0 if weight.all_equal else 1)):
            raise TypeError(f"federated_mean: the weight must be a scalar per client, got "
                            f"{weight.type}")
    if value.all_equal:
        if weight is None or weight.all_equal:
            return FederatedValue(value.value, SERVER, True)
        value = _expand(value, "federated_mean")
    num_clients = value.num_clients
    if weight is not None:
        w = leaves[0]
        w = jnp.broadcast_to(w, (num_clients,)) if weight.all_equal else w
        mask = _combined_mask([value, weight])  # a client padding in either is left out
    else:
        w = value.weights if value.weights is not None else jnp.ones((num_clients,))
        mask = value.mask
    w = w.astype(jnp.float32)
    if mask is not None:
        w = jnp.where(mask, w, 0.0)
    masked = jax.tree.map(lambda x: _where_valid(mask, x, 0), value.value)
    return FederatedValue(weighted_mean(masked, w), SERVER, True)


def federated_sum(value: FederatedValue) -> FederatedValue:
    """CLIENTS -> SERVER: the sum over the (unmasked) clients (TFF's ``tff.federated_sum``)."""
    _require(value, CLIENTS, "federated_sum")
    value = _expand(value, "federated_sum")
    total = jax.tree.map(lambda x: jnp.sum(_where_valid(value.mask, x, 0), axis=0), value.value)
    return FederatedValue(total, SERVER, True)


def _extreme(value: FederatedValue, intrinsic: str, reduce, identity) -> FederatedValue:
    _require(value, CLIENTS, intrinsic)
    if value.all_equal:
        return FederatedValue(value.value, SERVER, True)

    def one(x):
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.floating):
            fill = identity * jnp.inf
        elif dtype == jnp.bool_:
            fill = identity > 0
        else:
            info = jnp.iinfo(dtype)
            fill = info.max if identity > 0 else info.min
        return reduce(_where_valid(value.mask, x, jnp.asarray(fill, dtype)), axis=0)

    return FederatedValue(jax.tree.map(one, value.value), SERVER, True)


def federated_min(value: FederatedValue) -> FederatedValue:
    """CLIENTS -> SERVER: the elementwise minimum over the (unmasked) clients."""
    return _extreme(value, "federated_min", jnp.min, 1)


def federated_max(value: FederatedValue) -> FederatedValue:
    """CLIENTS -> SERVER: the elementwise maximum over the (unmasked) clients."""
    return _extreme(value, "federated_max", jnp.max, -1)


def federated_aggregate(
    value: FederatedValue,
    zero: PyTree,
    accumulate: Callable[[PyTree, PyTree], PyTree],
    merge: Callable[[PyTree, PyTree], PyTree],
    report: Callable[[PyTree], PyTree],
    *,
    num_groups: int = 1,
) -> FederatedValue:
    """CLIENTS -> SERVER: a general reduction (TFF's ``tff.federated_aggregate``).

    The clients are split into ``num_groups`` contiguous groups (as an aggregation tree would
    split them over aggregators); each group folds its members into an accumulator with
    ``accumulate(accumulator, member)``, starting from ``zero`` (a ``lax.scan`` over the
    group's clients, the groups ``vmap``-ped); the group accumulators are combined left to
    right with ``merge(a, b)``; ``report(accumulator)`` gives the SERVER result. As in TFF, the
    result must not depend on how the clients are grouped: ``merge`` must agree with
    ``accumulate``. Padding clients (``mask`` False) are skipped.

    Args:
      value: a CLIENTS value.
      zero: the initial accumulator (an unplaced pytree).
      accumulate: ``(accumulator, member) -> accumulator``.
      merge: ``(accumulator, accumulator) -> accumulator``.
      report: ``accumulator -> result``.
      num_groups: static number of groups (1: one scan, ``merge`` unused).
    """
    _require(value, CLIENTS, "federated_aggregate")
    if isinstance(zero, FederatedValue):
        raise TypeError(f"federated_aggregate: zero must be an unplaced value, got {zero.type}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"federated_aggregate: num_groups must be an int >= 1, got {num_groups}")
    value = _expand(value, "federated_aggregate")
    zero = jax.tree.map(jnp.asarray, zero)
    num_clients = value.num_clients
    mask = value.mask if value.mask is not None else jnp.ones((num_clients,), bool)
    per_group = -(-num_clients // num_groups)
    pad = per_group * num_groups - num_clients

    def grouped(x):
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        return x.reshape(num_groups, per_group, *x.shape[1:])

    members = jax.tree.map(grouped, value.value)
    valid = grouped(mask)

    def fold(group_members, group_valid):
        def step(accumulator, item):
            member, ok = item
            new = accumulate(accumulator, member)
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, accumulator), None

        accumulator, _ = jax.lax.scan(step, zero, (group_members, group_valid))
        return accumulator

    accumulators = jax.vmap(fold)(members, valid)
    result = jax.tree.map(lambda a: a[0], accumulators)
    for g in range(1, num_groups):
        result = merge(result, jax.tree.map(lambda a, g=g: a[g], accumulators))
    return FederatedValue(report(result), SERVER, True)


def _unsigned_for(dtype) -> Any:
    bits = max(np.dtype(dtype).itemsize * 8, 32)
    if bits > 32 and not jax.config.jax_enable_x64:
        bits = 32
    return jnp.uint64 if bits == 64 else jnp.uint32


def federated_secure_sum(value: FederatedValue, bitwidth: int | PyTree) -> FederatedValue:
    """CLIENTS -> SERVER: ``sum(value) mod 2**bitwidth`` of integer members.

    TFF's ``tff.federated_secure_sum_bitwidth`` semantics: the clients' values are integers in
    ``[0, 2**bitwidth - 1]`` (a value outside is taken modulo ``2**bitwidth``, as a secure
    aggregator's modular arithmetic would) and the server learns only the sum modulo
    ``2**bitwidth``. The sum is computed as the secure-aggregation server would (Bonawitz et
    al. 2017; `fedjax_sim.aggregators.masked_modular_sum`): every client's input carries
    pairwise masks that cancel in the sum, and padding clients are dropouts whose masks the
    server reconstructs.

    Args:
      value: a CLIENTS value with integer members.
      bitwidth: an int, or a pytree of ints with the structure of the member (one per leaf);
        each must be in ``[1, bits of the leaf's dtype]`` (one bit less for a signed dtype, so
        the result fits its dtype).

    Raises:
      TypeError: a non-integer member, or a non-integer bitwidth.
      ValueError: a bitwidth out of range for its leaf's dtype.
    """
    _require(value, CLIENTS, "federated_secure_sum")
    value = _expand(value, "federated_secure_sum")
    leaves, treedef = jax.tree.flatten(value.value)
    if isinstance(bitwidth, (int, np.integer)) and not isinstance(bitwidth, bool):
        widths = [int(bitwidth)] * len(leaves)
    else:
        widths, width_def = jax.tree.flatten(bitwidth)
        if width_def != treedef:
            raise TypeError(
                f"federated_secure_sum: bitwidth {bitwidth!r} must be an int or match the "
                f"structure of the member {value.type}"
            )
    results = []
    for index, (leaf, width) in enumerate(zip(leaves, widths, strict=True)):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"federated_secure_sum: needs integer members, got {value.type}; secure "
                "summation works on integers (quantize floats first)"
            )
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
            raise TypeError(f"federated_secure_sum: bitwidth must be an int, got {width!r}")
        max_bits = np.dtype(dtype).itemsize * 8 - (1 if jnp.issubdtype(dtype, jnp.signedinteger)
                                                    else 0)
        if not 1 <= width <= max_bits:
            raise ValueError(
                f"federated_secure_sum: bitwidth {width} is out of range for {np.dtype(dtype)} "
                f"members: expected 1 <= bitwidth <= {max_bits}"
            )
        # Two's complement: ``x & (2**b - 1)`` is ``x mod 2**b`` for negative x too, and the
        # unsigned sum wraps modulo 2**32 (or 2**64), a multiple of 2**b.
        unsigned = _unsigned_for(dtype)
        modulus_mask = jnp.asarray((1 << int(width)) - 1, unsigned)
        residues = leaf.astype(unsigned) & modulus_mask
        num_clients = residues.shape[0]
        survivors = (jnp.ones((num_clients,), bool) if value.mask is None
                     else jnp.asarray(value.mask, bool))
        # The secure-aggregation server's computation (pairwise-masked inputs, padding clients
        # as dropouts whose masks it reconstructs): the same code as the secure_sum reducer.
        total, _ = masked_modular_sum(residues.reshape(num_clients, -1), survivors,
                                      int(width), jax.random.fold_in(jax.random.key(0), index))
        results.append(total.reshape(residues.shape[1:]).astype(dtype))
    return FederatedValue(jax.tree.unflatten(treedef, results), SERVER, True)


# ---------------------------------------------------------------------------------------------
# Computations
# ---------------------------------------------------------------------------------------------


def _convert_leaf(x: Any, expected, where: str) -> jax.Array:
    """``x`` as an array of the expected dtype (numpy 'same_kind' casting)."""
    if expected is Ellipsis:  # any member: the array as given
        return jnp.asarray(x)
    if isinstance(x, jax.Array):
        given = x.dtype
    else:
        x = np.asarray(x)
        given = x.dtype
    want = np.dtype(expected.dtype)
    if given != want:
        if given == np.bool_ and want != np.bool_ or not np.can_cast(given, want, "same_kind"):
            raise TypeError(f"{where}: cannot convert {np.dtype(given).name} to {want.name}")
    return jnp.asarray(x, want)


def _convert_argument(x: Any, declared: FederatedType, where: str) -> FederatedValue:
    """A call argument as a `FederatedValue` of (at most) the declared type; see the docs."""
    if isinstance(x, FederatedValue):
        return x
    per_client = declared.placement is CLIENTS and not declared.all_equal
    if declared.member is Ellipsis:  # any member: arrays as given
        if per_client:
            return at_clients(x)
        return FederatedValue(jax.tree.map(jnp.asarray, x), declared.placement, True)
    expected_leaves, expected_def = jax.tree.flatten(declared.member, is_leaf=_is_member_leaf)

    def leaves_of(tree):
        # Up to the declared structure: a Python list where a tensor is declared is its data.
        try:
            return expected_def.flatten_up_to(tree)
        except (TypeError, ValueError):
            raise TypeError(
                f"{where} expects {declared}, got a value of structure "
                f"{jax.tree.structure(tree)} (expected {expected_def})"
            ) from None

    if per_client and isinstance(x, list):  # one member per client
        if not x:
            raise ValueError(f"{where}: a CLIENTS value needs at least one client")
        per_entry = [leaves_of(entry) for entry in x]
        given = [np.stack([np.asarray(e[i]) for e in per_entry]) for i in range(len(per_entry[0]))]
    else:
        given = leaves_of(x)
    leaves = [_convert_leaf(g, e, where) for g, e in zip(given, expected_leaves, strict=True)]
    value = jax.tree.unflatten(expected_def, leaves)
    if per_client:
        if any(jnp.ndim(v) == 0 for v in leaves):
            raise TypeError(
                f"{where} expects {declared}: a per-client value needs a leading client axis "
                "[C, ...] (or a list with one entry per client), got a scalar"
            )
        return FederatedValue(value, CLIENTS, False)
    return FederatedValue(value, declared.placement, True)


class FederatedComputation:
    """A function of placed values, type-checked at call time and compiled with ``jax.jit``.

    Made by `federated_computation`. Calling it converts the arguments (see the conversion rules
    in `federated_computation`), checks each against its declared `FederatedType` (a mismatch
    raises TypeError naming the argument, the expected and the given type), then runs the
    whole body as one jitted function; the jit cache is keyed on shapes, dtypes and the client
    map (`execution_context`), so a call with the same shapes and map does not retrace.
    Top-level results are unwrapped: a SERVER value becomes its member, a CLIENTS value its
    ``[C, ...]`` pytree; inside another federated computation results stay federated values.

    Attributes:
      fn: the Python function.
      parameter_types: the declared argument types.
      jitted: the jitted body ``(execution, *FederatedValue) -> FederatedValue pytree``
        (``execution`` static: the client map).
      num_traces: how many times the body has been traced (each trace is a compilation).
    """

    def __init__(self, fn: Callable[..., Any], parameter_types: Sequence[FederatedType]):
        self.fn = fn
        self.parameter_types = tuple(parameter_types)
        self.__name__ = getattr(fn, "__name__", "computation")
        self.__doc__ = fn.__doc__
        functools.update_wrapper(self, fn, updated=())
        parameters = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(parameters) != len(self.parameter_types):
            raise TypeError(
                f"federated_computation: {self.__name__} takes {len(parameters)} positional "
                f"arguments but {len(self.parameter_types)} types were declared"
            )
        self.parameter_names = tuple(p.name for p in parameters)
        for name, declared in zip(self.parameter_names, self.parameter_types, strict=True):
            if not isinstance(declared, FederatedType):
                raise TypeError(
                    f"federated_computation: the type of argument {name!r} must be a "
                    f"FederatedType (e.g. FederatedType(jnp.float32, SERVER)), got {declared!r}"
                )
        self.jitted = jax.jit(self._traced, static_argnums=0)
        self.num_traces = 0  # how often the body was traced (a retrace = a recompile)
        self._result_type: PyTree = None

    def _traced(self, execution: Execution, *values: FederatedValue):
        self.num_traces += 1
        per_client = [v for v in values if v.placement is CLIENTS and not v.all_equal]
        clients = None
        if per_client:
            clients = _Clients(per_client[0].num_clients, _first(per_client, "mask"))
        stack = _context_stack()
        stack.append(clients)
        try:
            with _executing(execution):
                result = self.fn(*values)
        finally:
            stack.pop()
        leaves = jax.tree.leaves(result, is_leaf=lambda x: isinstance(x, FederatedValue))
        for leaf in leaves:
            if not isinstance(leaf, FederatedValue):
                raise TypeError(
                    f"{self.__name__} must return federated values (or a tuple/dict of them), "
                    f"but returned {_describe(leaf)}; place it with federated_value(..., SERVER)"
                    " or compute it inside federated_map"
                )
        self._result_type = jax.tree.map(type_of, result,
                                         is_leaf=lambda x: isinstance(x, FederatedValue))
        return result

    def _check(self, args: tuple) -> list[FederatedValue]:
        if len(args) != len(self.parameter_types):
            raise TypeError(
                f"{self.__name__} takes {len(self.parameter_types)} arguments "
                f"({', '.join(self.parameter_names)}), got {len(args)}"
            )
        values, sizes = [], {}
        for name, declared, arg in zip(self.parameter_names, self.parameter_types, args,
                                       strict=True):
            where = f"{self.__name__}: argument {name!r}"
            value = _convert_argument(arg, declared, where)
            given = type_of(value)
            if not declared.is_assignable_from(given):
                raise TypeError(f"{where} expects {declared}, got {given}")
            if value.num_clients is not None:
                sizes[name] = value.num_clients
            values.append(value)
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"{self.__name__}: the CLIENTS arguments have different numbers of clients: "
                + ", ".join(f"{k}: {v}" for k, v in sizes.items())
            )
        return values

    def __call__(self, *args):
        values = self._check(args)
        result = self.jitted(current_execution(), *values)
        if _context_stack():
            return result  # called inside another computation: results stay federated

        def unwrap(v):
            return v.value

        return jax.tree.map(unwrap, result, is_leaf=lambda x: isinstance(x, FederatedValue))

    @property
    def type_signature(self) -> str:
        """TFF's function type, e.g. ``({float32}@CLIENTS -> float32@SERVER)``.

        The result type is known once the computation has been traced (after the first call,
        or right away when every declared shape is fully known).
        """
        if self._result_type is None:
            self._infer_result_type()
        params = [str(t) for t in self.parameter_types]
        if len(params) == 1:
            parameter = params[0]
        else:
            parameter = "<" + ",".join(
                f"{n}={t}" for n, t in zip(self.parameter_names, params, strict=True)) + ">"
        result = "?" if self._result_type is None else _result_str(self._result_type)
        return f"({parameter} -> {result})" if params else f"( -> {result})"

    def _infer_result_type(self) -> None:
        def example(t: FederatedType):
            leaves = jax.tree.leaves(t.member, is_leaf=_is_member_leaf)
            if any(x is Ellipsis or isinstance(x, TensorType) for x in leaves):
                raise LookupError
            lead = (2,) if t.placement is CLIENTS and not t.all_equal else ()
            member = jax.tree.map(lambda s: jax.ShapeDtypeStruct(lead + s.shape, s.dtype),
                                  t.member, is_leaf=_is_member_leaf)
            return FederatedValue(member, t.placement, t.all_equal)

        try:
            args = [example(t) for t in self.parameter_types]
        except LookupError:
            return
        jax.eval_shape(functools.partial(self._traced, current_execution()), *args)

    def __repr__(self) -> str:
        return f"<federated_computation {self.__name__}: {self.type_signature}>"


def _result_str(result_type: PyTree) -> str:
    if isinstance(result_type, FederatedType):
        return str(result_type)
    if isinstance(result_type, Mapping):
        return "<" + ",".join(f"{k}={_result_str(v)}" for k, v in result_type.items()) + ">"
    if isinstance(result_type, (tuple, list)):
        return "<" + ",".join(_result_str(v) for v in result_type) + ">"
    return str(result_type)


def federated_computation(*parameter_types: FederatedType | Callable
                          ) -> FederatedComputation | Callable[[Callable], FederatedComputation]:
    """Declares a federated computation (TFF's ``@tff.federated_computation``).

    ``@federated_computation(type_1, type_2, ...)`` declares one `FederatedType` per positional
    parameter of the decorated function; ``@federated_computation`` (or ``()``) declares none.

    Calling the computation converts each argument, checks it against its type, and runs the
    body as one jitted function in which `federated_map` runs the clients by the client map of
    the current `execution_context` (by default the engine's for the backend).

    Conversion rules for an argument declared with type ``T``:

    * a `FederatedValue` is passed as is (its placement and member type must match ``T``;
      this is the only way to hand in ``weights`` or ``mask``: `at_clients`);
    * ``T`` at CLIENTS (per-client): a Python ``list`` holds one member per client and is
      stacked on a new leading axis; anything else (a numpy/JAX array, a dict of arrays) must
      already have the leading client axis ``[C, ...]`` on every leaf;
    * ``T`` at the SERVER or all-equal at CLIENTS: the member itself, no client axis;
    * leaves are converted to the declared dtype when numpy allows a ``same_kind`` cast
      (Python floats and float64 -> float32, ints -> float32, int64 -> int32); other casts
      (float -> int, bool <-> number) raise TypeError. Shapes must match (``None`` in a
      `TensorType` matches any size); every CLIENTS argument must have the same C.

    Example::

      @federated_computation(FederatedType(jnp.float32, CLIENTS))
      def get_average_temperature(sensor_readings):
          return federated_mean(sensor_readings)

      get_average_temperature([68.5, 70.3, 69.8])     # Array(69.53333, dtype=float32)
      get_average_temperature.type_signature          # '({float32}@CLIENTS -> float32@SERVER)'
    """
    first = parameter_types[0] if len(parameter_types) == 1 else None
    if callable(first) and not isinstance(first, (type, FederatedType)):  # bare decorator
        return FederatedComputation(parameter_types[0], ())

    def decorate(fn: Callable) -> FederatedComputation:
        return FederatedComputation(fn, parameter_types)

    return decorate
