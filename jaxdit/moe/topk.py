"""Exact top-k selection over a dimension that is sharded across devices.

Expert Race keeps the top ``K = B*L*k`` of all ``B*L*E`` router scores; with the batch
sharded over data-parallel devices, ``lax.top_k`` on the global array makes XLA all-gather
every logit. Here the K-th largest value is found instead by a **radix select**: scores are
mapped to order-preserving ``uint32`` keys and the threshold key is decided ``bits`` bits at
a time, most significant first. Each round builds a ``2**bits``-bin histogram of the local
keys that match the prefix decided so far and sums it over the devices with one small
``psum``: ``32 / bits`` rounds of ``G * 2**bits`` int32 each, independent of the data size.

Ties at the threshold are broken deterministically by global position (lower index wins,
the same rule as ``lax.top_k``), using one ``all_gather`` of per-device tie counts, so
exactly ``k`` members per group are selected.

All functions take ``scores`` of shape ``(G, M)``: ``G`` independent groups, top-k over the
``M`` members. Under ``shard_map`` the members are this device's slice of a group whose
global member order is device-major along ``axis_name`` (a mesh axis name or a tuple of
them, in sharding order); ``axis_name=None`` means the whole group is local.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SIGN = 0x80000000
METHODS = ("radix", "gather")
RADIX_BITS = (1, 2, 4, 8)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown moe.topk_method {method!r}; available: {METHODS}.")


def check_bits(bits: int) -> None:
    if bits not in RADIX_BITS:
        raise ValueError(f"moe.topk_bits (radix digit width) must be one of {RADIX_BITS}, "
                         f"got {bits}.")


def ordered_keys(x):
    """Float array -> ``uint32`` keys with the same order (``-0.0`` is treated as ``+0.0``).

    Negative floats get all bits flipped, non-negative ones only the sign bit, so unsigned
    comparison of keys equals float comparison of values. NaN is not supported.
    """
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits & jnp.uint32(SIGN)) != 0
    return jnp.where(negative, ~bits, bits | jnp.uint32(SIGN))


def keys_to_float(keys):
    """Inverse of :func:`ordered_keys`."""
    was_negative = (keys & jnp.uint32(SIGN)) == 0
    bits = jnp.where(was_negative, ~keys, keys & jnp.uint32(~SIGN & 0xFFFFFFFF))
    return lax.bitcast_convert_type(bits, jnp.float32)


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def radix_select(keys, k: int, axis_name=None, bits: int = 4):
    """K-th largest key per group across all devices.

    Args:
      keys: ``(G, M)`` uint32 local keys.
      k: rank (1-based) within each global group; ``1 <= k <= global M``.
      axis_name: mesh axis (or tuple) the members are sharded over, or None.
      bits: bits decided per round (1, 2, 4 or 8): ``32/bits`` rounds, ``2**bits`` bins.
    Returns:
      ``(tau, above)``: ``tau`` (G,) uint32 is the k-th largest key and ``above`` (G,)
      int32 the global number of keys strictly greater than ``tau`` (``above < k``).
    """
    check_bits(bits)
    g = keys.shape[0]
    nbins = 1 << bits
    bins = jnp.arange(nbins, dtype=jnp.uint32)
    prefix = jnp.zeros((g,), jnp.uint32)
    above = jnp.zeros((g,), jnp.int32)
    for shift in range(32 - bits, -1, -bits):
        digit = (keys >> shift) & jnp.uint32(nbins - 1)
        hit = digit[..., None] == bins
        if shift + bits < 32:  # keys must also match the digits decided so far
            top = shift + bits
            hit &= ((keys >> top) == (prefix[:, None] >> top))[..., None]
        hist = _psum(jnp.sum(hit, axis=1, dtype=jnp.int32), axis_name)  # (G, nbins)
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # keys with digit >= d
        enough = at_least >= (k - above)[:, None]
        # Largest digit d with enough keys at or above it (always exists: d=0 counts all).
        d = (nbins - 1) - jnp.argmax(enough[:, ::-1], axis=1)
        strictly = jnp.take_along_axis(at_least - hist, d[:, None], axis=1)[:, 0]
        above = above + strictly
        prefix = prefix | (d.astype(jnp.uint32) << shift)
    return prefix, above


def _device_offset(counts, axis_name):
    """Exclusive prefix sum of per-device ``counts`` (G,) in device order along axis_name."""
    if axis_name is None:
        return jnp.zeros_like(counts)
    every = lax.all_gather(counts, axis_name)  # (P, G)
    me = lax.axis_index(axis_name)
    earlier = jnp.arange(every.shape[0])[:, None] < me
    return jnp.sum(jnp.where(earlier, every, 0), axis=0)


def topk_mask(scores, k: int, axis_name=None, bits: int = 4):
    """Boolean mask of the top ``k`` members of each group (exactly ``k`` globally).

    Args:
      scores: ``(G, M)`` float (any float dtype; compared in fp32).
      k: members to keep per group (global).
    Returns:
      ``(mask (G, M) bool, kth (G,) float32)``; ``kth`` is the k-th largest score, the
      threshold to track for batch-independent selection at inference.
    """
    keys = ordered_keys(scores)
    tau, above = radix_select(keys, k, axis_name, bits)
    greater = keys > tau[:, None]
    tie = keys == tau[:, None]
    rank = jnp.cumsum(tie, axis=1, dtype=jnp.int32) + _device_offset(
        jnp.sum(tie, axis=1, dtype=jnp.int32), axis_name)[:, None]
    keep_tie = tie & (rank <= (k - above)[:, None])
    return greater | keep_tie, keys_to_float(tau)


def gathered_topk_mask(scores, k: int, axis_name=None):
    """Reference: all-gather the scores, ``lax.top_k`` per group, keep this device's part.

    Same result as :func:`topk_mask`; moves every score to every device.
    """
    m = scores.shape[1]
    full = scores if axis_name is None else lax.all_gather(scores, axis_name, axis=1, tiled=True)
    values, idx = lax.top_k(full.astype(jnp.float32), k)
    hit = jnp.zeros(full.shape, bool).at[jnp.arange(full.shape[0])[:, None], idx].set(True)
    if axis_name is None:
        return hit, values[:, -1]
    mine = lax.dynamic_slice_in_dim(hit, lax.axis_index(axis_name) * m, m, axis=1)
    return mine, lax.pmax(values[:, -1], axis_name)  # identical everywhere; marks it so


def select(scores, k: int, axis_name=None, *, method: str = "radix", bits: int = 4):
    """Top-k mask and K-th value by ``method``: ``radix`` (:func:`topk_mask`) or ``gather``
    (:func:`gathered_topk_mask`, the reference). Same contract as :func:`topk_mask`."""
    check_method(method)
    if method == "radix":
        return topk_mask(scores, k, axis_name, bits)
    return gathered_topk_mask(scores, k, axis_name)


def sharded_topk_mask(scores, k: int, mesh, axes, *, method: str = "radix", bits: int = 4):
    """:func:`select` on a global ``(G, M)`` array whose member dim is sharded over
    ``axes`` of ``mesh`` (runs under ``jax.shard_map``)."""
    spec = jax.sharding.PartitionSpec(None, axes)
    name = axes if isinstance(axes, str) else tuple(axes)

    def body(s):
        return select(s, k, name, method=method, bits=bits)

    return jax.shard_map(body, mesh=mesh, in_specs=spec,
                         out_specs=(spec, jax.sharding.PartitionSpec()))(scores)
