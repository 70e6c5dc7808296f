"""Checksums of saved arrays: damage on disk that still decodes is caught at restore.

A checkpoint's files can decode into other values (a flipped bit inside an array's chunk:
one parameter off, nothing noticed). Each save therefore records a 32-bit fingerprint of
every array of the train state, and each restore recomputes them from what it read; a
difference is damage, handled like an unreadable checkpoint (the previous one is used).

The fingerprint of ``x`` is ``sum_i bits(x_i) * (2 i + 1) mod 2**32`` over the row-major
element index ``i``: a single flipped bit changes it by ``2**k * (2 i + 1)``, never 0 mod
2**32, and swapped elements change it too. It is computed on the device, in one ``jit``
over the (sharded) arrays, so it costs one elementwise pass and a scalar per array and
works unchanged on several hosts (every process gets the same numbers).
"""
from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxdit.parallel.distributed import PeerSynced
from jaxdit.train.state import path_names

_MASK = 0xFFFFFFFF
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _as_uint32(x):
    """The raw bits of ``x`` as uint32 (8-byte elements become two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    bits = lax.bitcast_convert_type(x, _UINT[size])
    return bits.astype(jnp.uint32)


def fingerprint(x) -> jax.Array:
    """uint32 scalar: ``sum_i bits(x_i) * (2 i + 1) mod 2**32`` (see the module doc)."""
    bits = _as_uint32(jnp.asarray(x))
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):  # row-major index from iotas: no reshape
        index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
            stride & _MASK)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def _fingerprint_all(arrays: list) -> list:
    return [fingerprint(x) for x in arrays]


_fingerprints = PeerSynced(jax.jit(_fingerprint_all), "checksums")


def _key(path) -> str:
    return "/".join(map(str, path_names(path)))


def checksums(tree) -> dict[str, int]:
    """``{"params/denoiser/final/kernel": fingerprint}`` of every array leaf of ``tree``."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype")]
    if not flat:
        return {}
    sums = _fingerprints([x for _, x in flat])
    return {_key(p): int(np.asarray(s.addressable_data(0))) for (p, _), s in zip(flat, sums)}


def mismatches(saved: dict[str, int], tree, limit: int = 3) -> list[str]:
    """Up to ``limit`` arrays of ``tree`` whose fingerprint differs from ``saved`` (arrays
    ``saved`` does not list are not checked)."""
    now = checksums(tree)
    bad = [k for k in saved if k in now and int(saved[k]) != now[k]]
    return bad[:limit] + ([f"{len(bad) - limit} more"] if len(bad) > limit else [])
