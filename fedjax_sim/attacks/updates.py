"""Update attacks: client stages that replace the malicious clients' messages.

Each is a client `Stage` (``fedjax_sim.aggregators``) that knows the malicious set as a bool
array over all clients and reads whose messages it sees from ``context["client_ids"]``; a
participating (weight > 0) malicious client's message is replaced, every other message passes
unchanged. Chain it first: ``chain(sign_flip(malicious), median())``, or wrap any aggregator
with `prepend`. The messages are the algorithm's pseudo-gradients (``server - client`` params
for FedAvg and its family), so flipping the sign pushes the model uphill.

* `sign_flip`: ``-scale * x`` (Damaskinos et al. 2018; the classic Byzantine baseline);
* `scaled_update`: ``scale * x``;
* `gaussian_update`: ``N(0, stddev^2)`` in every coordinate (Blanchard et al. 2017);
* `little_is_enough`: ``mean - z * std`` of the round's benign messages, coordinate-wise
  (Baruch, Baruch and Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", arXiv:1902.06156), with the paper's
  ``s = floor(n / 2 + 1) - m``, ``z = Phi^-1((n - s) / n)`` for n participating clients, m of
  them malicious;
* `boosted_update`: ``boost * x``, the model replacement of a backdoor (Bagdasaryan et al. 2020,
  "How To Backdoor Federated Learning", arXiv:1807.00459): ``gamma = n / eta`` scales the
  attacker's ``X - G`` so that it survives averaging (with ``boost=None``,
  ``n / m``: the round's participating over malicious clients, eta = 1 and the m attackers
  sharing the replacement).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.base import CLIENT, Stage, participating

# (state, values, weights, attackers [C] bool, key) -> forged values for every client
Forge = Callable[..., object]


def update_attack(name: str, malicious: np.ndarray, forge: Forge,
                  hyperparams: dict[str, float] | None = None) -> Stage:
    """A client stage replacing the participating malicious clients' messages by ``forge``'s.

    Args:
      name: the stage's name (metrics ``aggregator/<name>/malicious_clients``).
      malicious: ``[num_clients]`` bool, fixed for the run.
      forge: ``(state, values, weights, attackers, key) -> values`` for the whole cohort
        (only the attackers' rows are used).
      hyperparams: numbers kept as arrays in the state (sweepable).
    """
    malicious = np.asarray(malicious, bool)
    if malicious.ndim != 1:
        raise ValueError(f"{name}: malicious must be a [num_clients] bool array, got shape "
                         f"{malicious.shape}")

    def init(example):
        del example
        return {k: jnp.asarray(v, jnp.float32) for k, v in (hyperparams or {}).items()}

    def apply(state, values, weights, key, context):
        if "client_ids" not in context:
            raise ValueError(f"{name}: an attack needs the cohort's client ids; call the "
                             "aggregator with apply(..., client_ids=...) as the algorithms do")
        attackers = jnp.asarray(malicious)[context["client_ids"]] & participating(weights)
        forged = forge(state, values, weights, attackers, key)
        values = jax.tree.map(
            lambda x, f: jnp.where(attackers.reshape((-1,) + (1,) * (x.ndim - 1)),
                                   f.astype(x.dtype), x), values, forged)
        metrics = {"malicious_clients": jnp.sum(attackers.astype(jnp.float32))}
        return values, weights, state, metrics, context

    return Stage(CLIENT, init, apply, name)


def sign_flip(malicious: np.ndarray, scale: float = 1.0) -> Stage:
    """Malicious clients send ``-scale * x`` instead of their update ``x``."""
    if not float(scale) > 0:
        raise ValueError(f"sign_flip: scale must be > 0, got {scale!r}")
    return update_attack("sign_flip", malicious,
                         lambda s, v, w, a, k: jax.tree.map(lambda x: -s["scale"] * x, v),
                         {"scale": scale})


def scaled_update(malicious: np.ndarray, scale: float = 10.0) -> Stage:
    """Malicious clients send ``scale * x``."""
    return update_attack("scaled_update", malicious,
                         lambda s, v, w, a, k: jax.tree.map(lambda x: s["scale"] * x, v),
                         {"scale": scale})


def gaussian_update(malicious: np.ndarray, stddev: float = 1.0) -> Stage:
    """Malicious clients send i.i.d. ``N(0, stddev^2)`` coordinates (fresh each round)."""
    if not float(stddev) > 0:
        raise ValueError(f"gaussian_update: stddev must be > 0, got {stddev!r}")

    def forge(state, values, weights, attackers, key):
        leaves, treedef = jax.tree.flatten(values)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            state["stddev"] * jax.random.normal(k, x.shape, jnp.float32)
            for x, k in zip(leaves, keys, strict=True)])

    return update_attack("gaussian_update", malicious, forge, {"stddev": stddev})


def little_is_enough_z(num_clients: jax.Array, num_malicious: jax.Array) -> jax.Array:
    """The paper's z: ``s = floor(n/2 + 1) - m``, ``z = Phi^-1((n - s) / n)``.

    Kept in [0, Phi^-1(1 - 1e-6)] (about 4.75): z < 0 when m = 0, and z = inf when the attackers
    are half or more of the round (s <= 0), where the paper's formula does not apply.
    """
    n = jnp.maximum(num_clients.astype(jnp.float32), 1.0)
    supporters = jnp.floor(n / 2.0 + 1.0) - num_malicious.astype(jnp.float32)
    quantile = jnp.clip((n - supporters) / n, 0.5, 1.0 - 1e-6)
    return jax.scipy.special.ndtri(quantile)


# 2^-100: deviations of finite float32 values times it square to finite numbers (as in
# `fedjax_sim.aggregators.base.scaled_client_norms`).
_SHIFT = 2.0 ** -100


def little_is_enough(malicious: np.ndarray, z: float | None = None) -> Stage:
    """"A Little Is Enough": malicious clients send ``mean - z * std`` of the benign messages.

    Mean and standard deviation (``ddof=0``) are coordinate-wise over the round's participating
    benign clients, unweighted (the attackers are assumed to know them, as in the paper);
    benign values too large for float32 squares or sums (past ~1.8e19) are rescaled by powers
    of two on the way, so the forged message is finite whenever ``mean - z * std`` is.

    Args:
      malicious: ``[num_clients]`` bool.
      z: the shift in standard deviations; None: the paper's formula from the round's numbers
        of participating and malicious clients (`little_is_enough_z`).
    """

    def forge(state, values, weights, attackers, key):
        del key
        sending = participating(weights)
        benign = (sending & ~attackers).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(benign), 1.0)
        shift = (state["z"] if z is not None else
                 little_is_enough_z(jnp.sum(sending), jnp.sum(attackers)))

        def leaf(x):
            b = benign.reshape((-1,) + (1,) * (x.ndim - 1)) > 0
            x = x.astype(jnp.float32)

            def total(terms):  # over the benign rows only (an attacker's inf stays out)
                return jnp.sum(jnp.where(b, terms, 0.0), axis=0)

            # Huge benign values overflow float32 on the way, not in the result: the sum of
            # values near 3e38 (then sum x / count is used) and the squares of deviations past
            # ~1.8e19 (then the deviations times 2^-100, squared, and the std times 2^100, the
            # power-of-two rescale of `scaled_client_norms`). Sibling reductions of one pass;
            # ordinary values take the plain sums, unchanged.
            plain_mean = total(x) / count
            mean = jnp.where(jnp.isfinite(plain_mean), plain_mean, total(x / count))
            plain = total(jnp.square(x - mean[None]))
            shifted = total(jnp.square(x * _SHIFT - mean[None] * _SHIFT))
            std = jnp.where(jnp.isinf(plain) & jnp.isfinite(shifted),
                            jnp.sqrt(shifted / count) / _SHIFT, jnp.sqrt(plain / count))
            return jnp.broadcast_to(mean - shift * std, x.shape)

        return jax.tree.map(leaf, values)

    return update_attack("little_is_enough", malicious, forge,
                         {"z": z} if z is not None else None)


def boosted_update(malicious: np.ndarray, boost: float | None = None) -> Stage:
    """Model replacement: malicious clients send ``boost * x`` (None: n / m of the round)."""
    if boost is not None and not float(boost) > 0:
        raise ValueError(f"backdoor: boost must be > 0, got {boost!r}")

    def forge(state, values, weights, attackers, key):
        del key
        factor = (state["boost"] if boost is not None else
                  jnp.sum(participating(weights).astype(jnp.float32))
                  / jnp.maximum(jnp.sum(attackers.astype(jnp.float32)), 1.0))
        return jax.tree.map(lambda x: factor * x, values)

    return update_attack("boosted_update", malicious, forge,
                         {"boost": boost} if boost is not None else None)
