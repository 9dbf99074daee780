"""Cohort batching: cohort ids ``[C]`` -> example indices ``[C, S, B]`` plus a mask, in-graph.

Everything here is pure jnp and runs inside the jitted round step, so the per-round shuffling
costs no host work and no transfer. Shapes are static (C clients, S local steps, B batch size);
clients with fewer examples are padded and masked.

The example stream of one client (length ``S * B``) is built like ``shuffle -> repeat -> batch``
in tf.data / FedJAX: every full epoch is a fresh uniform permutation of the client's examples,
epochs are independent, and a final partial epoch is a uniform random subset.

Two modes (``ClientSchedule``):
  * local epochs E: a client with n examples takes ``ceil(n * E / B)`` steps, its last batch
    partially masked; ``S`` caps the number of steps (clients with more are truncated to their
    first ``S * B`` stream positions, like ``max_steps`` in TFF);
  * fixed local steps S: every (non-empty) client takes exactly S full batches, repeating its
    data as often as needed (FedJAX's ``num_steps``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientSchedule:
    """Static shape of one client's local training.

    Attributes:
      num_steps: S, the (maximum) number of local steps: the static scan length.
      batch_size: B, examples per local step.
      local_epochs: passes over the client's data; None means every client runs exactly
        ``num_steps`` full batches (fixed-steps mode).
      max_client_size: the largest client in the dataset (static bound for the shuffle).
    """

    num_steps: int
    batch_size: int
    local_epochs: int | None
    max_client_size: int

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "max_client_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClientSchedule.{name} must be >= 1, got {getattr(self, name)}")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ValueError(f"ClientSchedule.local_epochs must be >= 1, got {self.local_epochs}")

    @classmethod
    def from_sizes(
        cls,
        client_sizes: np.ndarray,
        batch_size: int,
        *,
        local_epochs: int | None = 1,
        local_steps: int | None = None,
        max_local_steps: int | None = None,
    ) -> ClientSchedule:
        """Picks S from the dataset's client sizes.

        Args:
          client_sizes: ``[num_clients]`` examples per client.
          local_epochs: epochs per round (ignored when ``local_steps`` is given).
          local_steps: fixed steps per round; every client runs exactly this many.
          max_local_steps: cap on S in epoch mode (default: no cap, S fits the largest client).
        """
        max_size = max(int(np.max(client_sizes)), 1)
        if local_steps is not None:
            return cls(int(local_steps), batch_size, None, max_size)
        steps = -(-max_size * local_epochs // batch_size)
        if max_local_steps is not None:
            steps = min(steps, int(max_local_steps))
        return cls(steps, batch_size, int(local_epochs), max_size)

    def steps_for(self, client_sizes: jax.Array) -> jax.Array:
        """``[C]`` int32 number of real (not fully masked) steps of each client."""
        sizes = client_sizes.astype(jnp.int32)
        if self.local_epochs is None:
            return jnp.where(sizes > 0, self.num_steps, 0).astype(jnp.int32)
        steps = (sizes * self.local_epochs + self.batch_size - 1) // self.batch_size
        return jnp.minimum(steps, self.num_steps).astype(jnp.int32)


def client_stream(
    key: jax.Array, size: jax.Array, schedule: ClientSchedule
) -> tuple[jax.Array, jax.Array]:
    """One client's shuffled example stream.

    Args:
      key: the client's shuffle key.
      size: scalar int, n = the client's number of examples.

    Returns:
      ``(positions [S, B] int32 in [0, n), mask [S, B] bool)``: positions are relative to the
      client's first example; masked slots point at position 0.
    """
    length = schedule.num_steps * schedule.batch_size
    n = jnp.maximum(size.astype(jnp.int32), 1)
    if schedule.local_epochs is None:
        limit = jnp.where(size > 0, length, 0)
    else:
        limit = jnp.minimum(size.astype(jnp.int32) * schedule.local_epochs, length)
    key_items, key_slots = jax.random.split(key)
    # sigma: a uniform permutation of the client's n examples (padding keys sort last).
    item_keys = jax.random.uniform(key_items, (schedule.max_client_size,))
    item_keys = jnp.where(jnp.arange(schedule.max_client_size) < n, item_keys, 2.0)
    sigma = jnp.argsort(item_keys).astype(jnp.int32)
    # Slot j belongs to epoch j // n and names item j % n. Shuffling the slots within each epoch
    # (sort by (epoch, uniform)) and composing with sigma makes every full epoch an independent
    # uniform permutation and the final partial epoch a uniform subset.
    slots = jnp.arange(length, dtype=jnp.int32)
    if schedule.local_epochs == 1:
        order = slots  # one pass: sigma alone is the epoch's permutation (saves a sort)
    else:
        epoch = slots // n
        order = jnp.lexsort((jax.random.uniform(key_slots, (length,)), epoch))
    positions = sigma[order % n]
    mask = slots < limit
    positions = jnp.where(mask, positions, 0)
    shape = (schedule.num_steps, schedule.batch_size)
    return positions.reshape(shape), mask.reshape(shape)


def first_pass_mask(mask: jax.Array, num_examples: jax.Array) -> jax.Array:
    """The slots of one client's ``[S, B]`` stream that hold each of its examples once.

    Slot ``j = s * B + b`` of `client_stream` belongs to epoch ``j // n`` (n = the client's
    examples), so its first n slots name every example exactly once when the stream has n slots
    or more (a second epoch, a partial last one or repeated data start after them), and distinct
    examples (the uniform subset the client trains on) when it is shorter (fixed local steps with
    ``S * B < n``, or ``max_local_steps``). Returns ``mask & (j < n)``: ``mask`` as the round
    left it (a system model's dropout or deadline cuts it further). ``num_examples`` is a scalar.
    """
    slots = jnp.arange(mask.size, dtype=jnp.int32).reshape(mask.shape)
    return mask & (slots < num_examples.astype(jnp.int32))


def cohort_indices(
    key: jax.Array,
    cohort: jax.Array,
    offsets: jax.Array,
    schedule: ClientSchedule,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Global example indices for a cohort.

    Args:
      key: the round's batching key; split once per client.
      cohort: ``[C]`` int32 client positions.
      offsets: ``[num_clients + 1]`` int offsets of the flat arrays.

    Returns:
      ``(indices [C, S, B] int32, mask [C, S, B] bool, sizes [C] int32)``.
    """
    sizes = (offsets[cohort + 1] - offsets[cohort]).astype(jnp.int32)
    keys = jax.random.split(key, cohort.shape[0])
    positions, mask = jax.vmap(lambda k, n: client_stream(k, n, schedule))(keys, sizes)
    indices = offsets[cohort].astype(jnp.int32)[:, None, None] + positions
    return indices, mask, sizes
