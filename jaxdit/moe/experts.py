"""Expert computation: sorted (token, expert) pairs through a grouped matmul.

Experts are DiT MLPs ``Linear(d -> h) -> GELU(tanh) -> Linear(h -> d)`` stored stacked:
``w1`` (E, d, h), ``b1`` (E, h), ``w2`` (E, h, d), ``b2`` (E, d).

:func:`grouped_ffn` takes the selected pairs in expert-major order (a ``nonzero`` of the
transposed mask, so no sort is needed), gathers their tokens into a buffer of static size
``capacity``, runs both matmuls with ``jax.lax.ragged_dot`` (one group per expert) and
scatter-adds the outputs, weighted by the gate, back onto the tokens. Pairs beyond the
buffer are dropped and counted; on one device, training selects exactly ``K = N*k`` pairs
and a buffer of ``K`` is dropless.

:func:`expert_ffn` runs it under ``shard_map``: tokens sharded over the batch axes, experts
sharded over the ``expert`` mesh axis (expert parallelism). With expert parallelism each
device all-gathers the tokens of its expert group, computes its own experts, and the
outputs are reduce-scattered back (``psum_scatter``): the all-gather / reduce-scatter
equivalent of an all-to-all dispatch and combine.

:func:`dense_ffn` runs every expert on every token and masks: the test oracle, and what
``impl="auto"`` uses on CPU. There jax lowers ``ragged_dot`` by masking the buffer once per
expert (E times its FLOPs; ``tools/bench_moe.py`` measured it 2.6x slower than dense),
while TPU (XLA's ragged dot) and GPU (Triton / XLA ragged dot) have grouped lowerings.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxdit.parallel.mesh import target_platform

IMPLS = ("auto", "grouped", "dense")


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``grouped`` on TPU/GPU, ``dense`` on CPU (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown moe.expert_impl {impl!r}; available: {IMPLS}.")
    if impl == "auto":
        return "dense" if target_platform() == "cpu" else "grouped"
    return impl


def capacity(num_tokens: int, local_experts: int, num_experts: int, k: float,
             factor: float) -> int:
    """Static pair-buffer size for ``num_tokens`` tokens and ``local_experts`` experts.

    ``factor <= 0`` gives the dropless worst case (every token on every local expert);
    otherwise ``factor`` times the expected ``num_tokens * k * local_experts / num_experts``,
    rounded up to a multiple of 8 and never above the worst case.
    """
    worst = num_tokens * local_experts
    if factor <= 0:
        return worst
    expected = num_tokens * k * local_experts / num_experts
    return min(worst, max(8, 8 * math.ceil(factor * expected / 8)))


def grouped_ffn(x, mask, weight, params, buffer: int):
    """Dropless-up-to-``buffer`` expert MLPs on the selected pairs.

    Args:
      x: ``(N, d)`` tokens. mask: ``(N, E)`` bool selected pairs. weight: ``(N, E)`` combine
      weights. params: dict of stacked expert weights for these ``E`` experts.
      buffer: static number of pair slots.
    Returns:
      ``(y (N, d) in x.dtype, dropped)``: ``dropped`` is the number of selected pairs that
      did not fit into the buffer (int32 scalar).
    """
    n, e = mask.shape
    counts = jnp.sum(mask, axis=0, dtype=jnp.int32)  # (E,)
    ends = jnp.minimum(jnp.cumsum(counts), buffer)
    group_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
    (flat,) = jnp.nonzero(mask.T.reshape(-1), size=buffer, fill_value=0)  # expert-major
    expert, token = flat // n, flat % n
    valid = jnp.arange(buffer) < ends[-1]
    dtype = x.dtype
    xs = x[token]
    h = lax.ragged_dot(xs, params["w1"].astype(dtype), group_sizes,
                       preferred_element_type=jnp.float32)
    h = jax.nn.gelu(h + params["b1"][expert].astype(jnp.float32), approximate=True)
    y = lax.ragged_dot(h.astype(dtype), params["w2"].astype(dtype), group_sizes,
                       preferred_element_type=jnp.float32)
    y = y + params["b2"][expert].astype(jnp.float32)
    w = jnp.where(valid, weight.T.reshape(-1)[flat], 0.0).astype(jnp.float32)
    out = jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y * w[:, None])
    return out.astype(dtype), jnp.sum(counts) - ends[-1]


def dense_ffn(x, mask, weight, params):
    """Oracle: every expert on every token, masked and weighted. Same contract as
    :func:`grouped_ffn` (never drops)."""
    dtype = x.dtype
    h = jnp.einsum("nd,edh->neh", x, params["w1"].astype(dtype),
                   preferred_element_type=jnp.float32)
    h = jax.nn.gelu(h + params["b1"].astype(jnp.float32), approximate=True)
    y = jnp.einsum("neh,ehd->ned", h.astype(dtype), params["w2"].astype(dtype),
                   preferred_element_type=jnp.float32)
    y = y + params["b2"].astype(jnp.float32)
    w = jnp.where(mask, weight, 0.0).astype(jnp.float32)
    return jnp.einsum("ne,ned->nd", w, y).astype(dtype), jnp.zeros([], jnp.int32)


def expert_ffn(x, mask, weight, params, *, k: float, capacity_factor: float, mesh=None,
               token_axes=(), expert_axis: str | None = None, impl: str = "auto"):
    """Mixture-of-experts MLP over a (possibly sharded) batch.

    Args:
      x: ``(B, L, d)``; mask, weight: ``(B, L, E)``; params: stacked expert weights.
      k: average experts per token (sizes the buffer); capacity_factor: see :func:`capacity`.
      mesh, token_axes: mesh axes the batch dim is sharded over (empty: replicated/no mesh).
      expert_axis: mesh axis the experts are sharded over, or None (replicated experts).
      impl: ``grouped`` (ragged_dot), ``dense`` (oracle) or ``auto``.
    Returns:
      ``(y (B, L, d), dropped)``, ``dropped`` summed over all devices.
    """
    impl = resolve_impl(impl)
    b, l, d = x.shape
    num_experts = mask.shape[-1]
    token_axes = tuple(token_axes)
    gather = expert_axis is not None and expert_axis in token_axes

    def body(x, mask, weight, params):
        if gather:  # tokens of the whole expert group; this device's experts only
            x, mask, weight = (lax.all_gather(a, expert_axis, axis=0, tiled=True)
                               for a in (x, mask, weight))
        e_loc = params["w1"].shape[0]
        if expert_axis is not None:
            start = lax.axis_index(expert_axis) * e_loc
            mask, weight = (lax.dynamic_slice_in_dim(a, start, e_loc, axis=2)
                            for a in (mask, weight))
        bl = x.shape[0] * l
        args = (x.reshape(bl, d), mask.reshape(bl, e_loc), weight.reshape(bl, e_loc), params)
        if impl == "dense":
            y, dropped = dense_ffn(*args)
        else:
            buf = capacity(bl, e_loc, num_experts, k, capacity_factor)
            y, dropped = grouped_ffn(*args, buffer=buf)
        y = y.reshape(x.shape)
        if gather:
            y = lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)
        elif expert_axis is not None:
            y = lax.psum(y, expert_axis)
        axes = tuple(dict.fromkeys(token_axes + ((expert_axis,) if expert_axis else ())))
        if axes:
            dropped = lax.psum(dropped, axes)
        return y, dropped

    if not token_axes and expert_axis is None:
        return body(x, mask, weight, params)
    tok = P(token_axes or None)
    exp = P(expert_axis)
    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, {n: exp for n in params}),
                         out_specs=(tok, P()))(x, mask, weight, params)
