"""Secure aggregation, simulated: the server learns only the sum of the clients' quantized values.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
arXiv:1611.04482. Each client encodes its value as integers mod 2^k and sends

  y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ji)   (mod 2^k)

with a self mask b_i and a pairwise mask per neighbour pair from a seed both ends agree on (a
Diffie-Hellman key agreement in the protocol). The pairwise masks cancel in the sum. A client
that drops out after masking leaves its neighbours' masks with it uncancelled: the survivors
hand the server Shamir shares of its pairwise seed, and the server regenerates and removes
those masks; for every survivor it reconstructs b_i instead and removes the self mask. The
result equals the plain modular sum of the survivors' inputs exactly.

Simulated here, inside the jitted round: the masked inputs, the dropouts after masking, the
server's reconstruction of the missing masks and the modular arithmetic (uint32, or uint64 under
x64). Not simulated: the key agreement, secret sharing and encryption themselves (seeds come
from the stage key), the threshold check, malicious clients or server; their cost is counted
from the protocol's message sizes (see `secure_sum`). ``neighbors`` masks along a sparse
circulant graph instead of all pairs (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", arXiv:2004.04637).

Distributed DP (Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", arXiv:2102.06387): each client adds its share of
the noise before quantization (``noise_multiplier``: Gaussian, or ``noise="skellam"``: integer
Skellam noise after quantization, closed under summation; Agarwal, Kairouz and Liu 2021,
arXiv:2110.04995), so the server only ever sees a noised sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.base import REDUCE, Stage, participating
from fedjax_sim.aggregators.compression import flatten_clients

KEY_BITS = 256    # a public key (Curve25519) in AdvertiseKeys
SHARE_BITS = 256  # one Shamir share of a 256-bit seed (encryption overhead not counted)
NOISES = ("gaussian", "skellam")
WEIGHTINGS = ("uniform", "given")


def _modulus_mask(bits: int, dtype) -> jax.Array:
    width = np.dtype(dtype).itemsize * 8
    return jnp.asarray((1 << bits) - 1 if bits < width else (1 << width) - 1, dtype)


def graph_offsets(num_slots: int, neighbors: int | None) -> tuple[int, int]:
    """``(offsets, neighbours per client)`` of the masking graph over ``num_slots`` clients.

    Client i is paired with ``i + s mod C`` for s = 1..offsets: all pairs (offsets = C // 2;
    with C even the offset C / 2 pairs each client once), or a circulant graph of degree
    ``neighbors`` (rounded down to even) when that is smaller.
    """
    complete = num_slots // 2
    if neighbors is None or neighbors >= num_slots - 1:
        return complete, num_slots - 1
    offsets = min(int(neighbors) // 2, (num_slots - 1) // 2)
    return offsets, 2 * offsets


def masked_modular_sum(residues: jax.Array, survivors: jax.Array, bits: int, key: jax.Array,
                       neighbors: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The survivors' sum mod 2^bits, computed the way the secure-aggregation server does.

    Args:
      residues: ``[C, D]`` unsigned integers (uint32, or uint64 under x64) below 2^bits: every
        cohort slot's input; all slots mask (the masking graph is over the C slots).
      survivors: ``[C]`` bool: the clients whose masked input reaches the server; the others
        drop out after masking and the server reconstructs their pairwise masks.
      bits: k, the modulus 2^k (1 <= k <= the dtype's width).
      key: the round's seed for the masks (per-pair seeds are ``fold_in``s of it).
      neighbors: None: mask with every other client; an int: a circulant graph of that degree.

    Returns:
      ``([D] sum of the survivors' residues mod 2^bits, stats)``: stats
      ``reconstructed_pair_masks`` (survivor-dropout pairs the server regenerates) and
      ``reconstructed_self_masks`` (survivors).
    """
    num, size = residues.shape
    dtype = residues.dtype
    if not jnp.issubdtype(dtype, jnp.unsignedinteger):
        raise TypeError(f"masked_modular_sum: needs unsigned residues, got {dtype}")
    modulus = _modulus_mask(bits, dtype)
    offsets, _ = graph_offsets(num, neighbors)
    self_key, pair_key = jax.random.split(key)
    slots = jnp.arange(num)

    def prg(seed):
        return jax.random.bits(seed, (size,), dtype)

    self_masks = jax.vmap(lambda i: prg(jax.random.fold_in(self_key, i)))(slots)
    zero = jnp.zeros((), dtype)

    def add_offset(s, carry):
        pairwise, correction, regenerated = carry
        offset_key = jax.random.fold_in(pair_key, s)
        masks = jax.vmap(lambda i: prg(jax.random.fold_in(offset_key, i)))(slots)
        # row i: the mask of pair (i, i + s); with C even, offset C/2 pairs each client once
        first = (2 * s != num) | (slots < num // 2)
        masks = jnp.where(first[:, None], masks, zero)
        partner = (slots + s) % num
        back = (slots - s) % num
        received = jnp.take(masks, back, axis=0)  # row j: the mask of pair (j - s, j)
        pairwise = pairwise + masks - received     # i adds, its partner subtracts (mod 2^w)
        # The server's reconstruction: a survivor's term whose partner dropped does not cancel.
        first_lost = survivors & ~survivors[partner] & first
        second_lost = survivors & ~survivors[back] & jnp.take(first, back)
        correction = (correction
                      + jnp.sum(jnp.where(first_lost[:, None], masks, zero), axis=0, dtype=dtype)
                      - jnp.sum(jnp.where(second_lost[:, None], received, zero), axis=0,
                                dtype=dtype))
        regenerated = regenerated + jnp.sum(first_lost) + jnp.sum(second_lost)
        return pairwise, correction, regenerated

    pairwise, correction, regenerated = jax.lax.fori_loop(
        1, offsets + 1, add_offset,
        (jnp.zeros((num, size), dtype), jnp.zeros((size,), dtype), jnp.zeros((), jnp.int32)))
    masked_inputs = (residues + self_masks + pairwise) & modulus  # what the clients send
    received_sum = jnp.sum(jnp.where(survivors[:, None], masked_inputs, zero), axis=0,
                           dtype=dtype)
    self_sum = jnp.sum(jnp.where(survivors[:, None], self_masks, zero), axis=0, dtype=dtype)
    total = (received_sum - self_sum - correction) & modulus
    stats = {"reconstructed_pair_masks": regenerated,
             "reconstructed_self_masks": jnp.sum(survivors).astype(jnp.int32)}
    return total, stats


def _secure(name: str, mean: bool, bits: int, scale: float | None, clip: float | None,
            weighting: str, dropout: float, neighbors: int | None,
            noise_multiplier: float | None, expected_clients: float | None, noise: str,
            denominator: float | None) -> Stage:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ValueError(f"{name}: bits must be an int in [2, 32] (uint32 arithmetic), "
                         f"got {bits!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{name}: weighting={weighting!r}: expected one of {WEIGHTINGS}")
    if noise not in NOISES:
        raise ValueError(f"{name}: noise={noise!r}: expected one of {NOISES}")
    for option, value in (("scale", scale), ("clip", clip), ("denominator", denominator)):
        if value is not None and not float(value) > 0:
            raise ValueError(f"{name}: {option} must be > 0, got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
    if neighbors is not None and (not isinstance(neighbors, int) or neighbors < 2):
        raise ValueError(f"{name}: neighbors must be an int >= 2 (or None: all pairs), got "
                         f"{neighbors!r}")
    if noise_multiplier is not None:
        if not float(noise_multiplier) >= 0:
            raise ValueError(f"{name}: noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if expected_clients is None or not float(expected_clients) > 0:
            raise ValueError(f"{name}: noise_multiplier needs expected_clients > 0 (each client "
                             f"adds 1 / expected_clients of the noise variance)")
    half = 2.0 ** (bits - 1)
    top = float(np.float32(half - 1))
    if top >= half:  # float32 cannot hold 2^31 - 1: the largest float32 below 2^31
        top = float(np.nextafter(np.float32(half), np.float32(0)))

    def init(example):
        del example
        state = {"dropout": jnp.asarray(dropout, jnp.float32)}
        for option, value in (("scale", scale), ("clip", clip), ("denominator", denominator),
                              ("noise_multiplier", noise_multiplier),
                              ("expected_clients", expected_clients)):
            if value is not None:
                state[option] = jnp.asarray(value, jnp.float32)
        return state

    def apply(state, values, weights, key, context):
        flat, unflatten = flatten_clients(values)
        real = context.get("cohort_size")
        if real is not None and real < flat.shape[0]:
            # Rows past the cohort only pad it for the devices: they are not clients of the
            # protocol (they neither mask nor count), so nothing depends on the device count.
            flat, weights = flat[:real], weights[:real]
        num, size = flat.shape
        drop_key, round_key, noise_key, mask_key = jax.random.split(key, 4)
        sending = participating(weights)
        uniform = weighting == "uniform"
        if not uniform:
            flat = flat * weights[:, None].astype(jnp.float32)
        weight_bound = jnp.ones((), jnp.float32) if uniform else jnp.max(weights)
        if "clip" in state:
            flat = jnp.clip(flat, -state["clip"], state["clip"])
        # Distributed noise: each client adds 1 / m of the variance (z S)^2 of the sum.
        client_std = jnp.zeros((), jnp.float32)
        if "noise_multiplier" in state:
            if "sensitivity" not in context:
                raise ValueError(f"{name}(noise_multiplier=...) needs a clip stage before it "
                                 "(the noise std is the multiplier times the clip norm)")
            client_std = (state["noise_multiplier"] * context["sensitivity"] * weight_bound
                          / jnp.sqrt(state["expected_clients"]))
        if "scale" in state:
            step = state["scale"]
        else:
            if "clip" in state:  # clips the (weighted) value itself
                bound = state["clip"]
            elif "sensitivity" in context:  # an L2 bound bounds every coordinate
                bound = context["sensitivity"] * weight_bound
            else:
                raise ValueError(
                    f"{name}: set scale= (integers per unit), or bound the values (clip= here, "
                    f"or a clip stage before it) so that the scale can be chosen without "
                    f"overflow")
            # C clients at the bound plus their rounding, and 6 std of the summed noise, fit
            # in [-2^(k-1), 2^(k-1)).
            headroom = num * bound + 6.0 * client_std * jnp.sqrt(jnp.float32(num))
            step = (half - 1.0 - num) / jnp.maximum(headroom, jnp.finfo(jnp.float32).tiny)
        encoded = flat * step
        if noise == "gaussian":
            encoded = encoded + client_std * step * jax.random.normal(noise_key, flat.shape)
        floor = jnp.floor(encoded)
        integers = floor + (jax.random.uniform(round_key, flat.shape) < encoded - floor)
        if noise == "skellam" and "noise_multiplier" in state:
            # Skellam(mu) = Poisson(mu) - Poisson(mu), variance 2 mu; int32 Poisson draws cap mu.
            mu = jnp.minimum(jnp.square(client_std * step) / 2.0, 2.0 ** 29)
            first, second = jax.random.split(noise_key)
            integers = integers + (jax.random.poisson(first, mu, flat.shape)
                                   - jax.random.poisson(second, mu, flat.shape)
                                   ).astype(jnp.float32)
        clipped = (integers < -half) | (integers > top)
        integers = jnp.clip(integers, -half, top)
        residues = integers.astype(jnp.int32).astype(jnp.uint32) & _modulus_mask(bits,
                                                                                 jnp.uint32)
        dropped = jax.random.uniform(drop_key, (num,)) < state["dropout"]
        survivors = sending & ~dropped
        total, stats = masked_modular_sum(residues, survivors, bits, mask_key, neighbors)
        if bits == 32:
            decoded = jax.lax.bitcast_convert_type(total, jnp.int32)
        else:
            decoded = total.astype(jnp.int32)
            decoded = jnp.where(decoded >= int(half), decoded - (1 << bits), decoded)
        decoded = decoded.astype(jnp.float32)
        # Overflow: the plain sum (float32, exact below 2^24 and close above) differs from the
        # decoded modular sum by a nonzero multiple of 2^k.
        plain = jnp.sum(jnp.where(survivors[:, None], integers, 0.0), axis=0)
        wraps = jnp.round((plain - decoded) / 2.0 ** bits) != 0
        summed = decoded / step
        count = jnp.sum(survivors.astype(jnp.float32))
        if uniform:
            total_weight = count
        else:
            total_weight = jnp.sum(jnp.where(survivors, weights, 0.0))
        if mean:
            divide = (state["denominator"] if "denominator" in state
                      else jnp.maximum(total_weight, jnp.finfo(jnp.float32).tiny))
        else:
            divide = jnp.ones((), jnp.float32)
        aggregate = unflatten((summed / divide)[None])
        aggregate = jax.tree.map(lambda x: x[0], aggregate)
        _, degree = graph_offsets(num, neighbors)
        metrics = {
            "survivors": count,
            "dropouts": jnp.sum((sending & dropped).astype(jnp.float32)),
            "bits_per_client": jnp.float32(size * bits),
            "overhead_upload_bits_per_client": jnp.float32(
                2 * KEY_BITS + degree * 2 * SHARE_BITS + degree * SHARE_BITS),
            "overhead_download_bits_per_client": jnp.float32(
                degree * 2 * KEY_BITS + degree * 2 * SHARE_BITS + num),
            "extra_messages_per_client": jnp.float32(6),
            "server_reconstructed_pair_masks": stats["reconstructed_pair_masks"].astype(
                jnp.float32),
            "server_reconstructed_self_masks": stats["reconstructed_self_masks"].astype(
                jnp.float32),
            "overflow": jnp.any(wraps).astype(jnp.float32),
            "overflow_fraction": jnp.mean(wraps.astype(jnp.float32)),
            "client_overflow_fraction": (
                jnp.sum(jnp.where(sending[:, None], clipped, False).astype(jnp.float32))
                / jnp.maximum(jnp.sum(sending) * size, 1)),
            "scale": step,
        }
        if "noise_multiplier" in state:
            metrics["noise_stddev"] = client_std * jnp.sqrt(count) / divide
        # No survivor and a realised denominator: the aggregate is 0 and a noise stage after
        # it must not scale by 1 / tiny (as `mean` does)
        scale = (1.0 / divide if "denominator" in state or not mean
                 else jnp.where(total_weight > 0, 1.0 / divide, 0.0))
        context = {**context, "weight_bound": weight_bound, "scale": scale,
                   "denominator": divide}
        return aggregate, state, metrics, context

    def noise_multipliers(state):
        return {"update": state["noise_multiplier"]}

    return Stage(REDUCE, init, apply, name,
                 noise_multipliers if noise_multiplier is not None else None)


def secure_sum(bits: int = 32, *, scale: float | None = None, clip: float | None = None,
               weighting: str = "uniform", dropout: float = 0.0, neighbors: int | None = None,
               noise_multiplier: float | None = None, expected_clients: float | None = None,
               noise: str = "gaussian") -> Stage:
    """The clients' sum through simulated secure aggregation (a reducer).

    Each client's message (all leaves as one vector; times its weight with
    ``weighting="given"``) is clipped to ``[-clip, clip]`` (optional), scaled by ``scale``,
    stochastically rounded to integers (unbiased) and masked mod 2^bits; after masking each
    client drops out with probability ``dropout`` (so do weight-0 clients); the server removes
    the masks (reconstructing the dropouts') and decodes the signed sum. Rows that only pad
    the cohort for the devices (the context's ``cohort_size``) take no part in the protocol.

    Args:
      bits: k, the modulus 2^k of the masked arithmetic (2..32).
      scale: integers per unit. Default: the largest scale that cannot overflow for C clients
        at the bound (``clip``, or the L2 clip norm of a `clip` stage before it, times the
        weight bound), with 6 standard deviations of headroom for the distributed noise.
      clip: clip every coordinate (of the weighted value with ``weighting="given"``) to
        ``[-clip, clip]`` before scaling.
      weighting: ``"uniform"`` (each surviving client counts once) or ``"given"`` (the
        algorithm's weights multiply the values before encoding).
      dropout: the probability that a participating client drops out after masking.
      neighbors: None: pairwise masks between all clients; an int: a circulant masking graph
        of that degree (SecAgg+).
      noise_multiplier: z of distributed DP noise: each client adds its 1 / expected_clients
        share of ``N(0, (z S)^2)`` before rounding (S: the clip norm times the weight bound),
        so m clients together add std z S. Fewer survivors, less noise.
      expected_clients: m, needed with ``noise_multiplier``.
      noise: ``"gaussian"`` (continuous, before rounding) or ``"skellam"`` (Poisson(mu) -
        Poisson(mu) on the integers, mu <= 2^29 for int32 draws).

    Returns:
      A reducer `Stage`. Metrics: ``survivors``, ``dropouts``, ``bits_per_client`` (d k: the
      masked input), ``overhead_upload_bits_per_client`` (AdvertiseKeys: two 256-bit keys;
      ShareKeys: two 256-bit shares per neighbour; Unmasking: one share per neighbour),
      ``overhead_download_bits_per_client`` (the neighbours' keys and shares and the survivor
      list), ``extra_messages_per_client`` (three uploads and three broadcasts beyond the
      masked input), ``server_reconstructed_pair_masks`` / ``..._self_masks`` (the server's
      PRG expansions), ``overflow`` (1 if the sum wrapped mod 2^k), ``overflow_fraction``
      (of coordinates), ``client_overflow_fraction`` (coordinates clipped to the range when
      encoding), ``scale`` and, with noise, ``noise_stddev`` on the aggregate.
    """
    return _secure("secure_sum", False, bits, scale, clip, weighting, dropout, neighbors,
                   noise_multiplier, expected_clients, noise, None)


def secure_mean(bits: int = 32, *, scale: float | None = None, clip: float | None = None,
                weighting: str = "uniform", dropout: float = 0.0, neighbors: int | None = None,
                noise_multiplier: float | None = None, expected_clients: float | None = None,
                noise: str = "gaussian", denominator: float | None = None) -> Stage:
    """`secure_sum` divided by the survivors' total weight, or by a fixed ``denominator``
    (the DP-FedAvg estimator). Arguments and metrics as `secure_sum`."""
    return _secure("secure_mean", True, bits, scale, clip, weighting, dropout, neighbors,
                   noise_multiplier, expected_clients, noise, denominator)
