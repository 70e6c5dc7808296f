"""Attention backend selection (``model.attn_impl``).

* ``xla``: :func:`jaxdit.kernels.reference.xla_attention`, every platform.
* ``cudnn``: cuDNN fused attention through ``jax.nn.dot_product_attention`` (NVIDIA GPUs,
  bf16/fp16, head dim a multiple of 8 up to 128).
* ``pallas``: jaxdit's flash-attention kernels (:mod:`jaxdit.kernels.flash_attention`):
  Triton on GPU, Mosaic on TPU, interpret mode on CPU (slow; for tests).
* ``splash``: JAX's TPU splash-attention kernel (:mod:`jaxdit.kernels.splash`): Mosaic on
  TPU, interpret mode on CPU (for tests); refused on GPU.
* ``auto``: on NVIDIA GPUs, from the H100 measurements in ``docs/performance.md``, cuDNN
  where it supports the call (fastest at 1k-4k tokens), else the Pallas kernel (1.4-3.6x
  faster than XLA: head dims cuDNN refuses, packed segment ids, fp32), else XLA. On TPU
  splash where it supports the call (XLA materialises the S x S scores: 19 GiB at 4k
  tokens on the H100; splash is MaxText's TPU default; not timed here, no TPU was
  available), else XLA. XLA on CPU.

The Pallas kernels (``pallas``, ``splash``) are custom calls the XLA partitioner cannot
split, so under a device mesh they run inside ``shard_map`` on each device's shard: batch
over the mesh axes of the ``batch`` logical rule, heads over those of ``act_heads`` when
both the query and KV head counts divide (GQA groups stay on one device). Without that the
partitioner would gather the whole batch onto every device and compute it there.

An explicitly requested backend that cannot run the call raises ``ValueError`` saying why;
only ``auto`` falls back.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdit.kernels import flash_attention as pallas_flash
from jaxdit.kernels import splash
from jaxdit.kernels.reference import xla_attention
from jaxdit.parallel.mesh import LOGICAL_RULES, logical_mesh_axes, target_platform

BACKENDS = ("xla", "cudnn", "pallas", "splash", "auto")


def cudnn_unsupported_reason(q, k) -> str | None:
    """Why cuDNN cannot run this call, or None if it can."""
    if target_platform() != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU (platform is {target_platform()!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bf16/fp16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 128:
        return f"cuDNN attention needs head_dim a multiple of 8 and <= 128, got {d}"
    if q.shape[2] % k.shape[2]:
        return "query heads must be a multiple of KV heads"
    return None


def auto_backend(q, k, v, segment_ids=None, extras: bool = False) -> str:
    """The backend ``auto`` picks for this call (see the module docstring); ``extras``: the
    call has a logit bias or a causal mask, which the Pallas kernel does not take."""
    platform = target_platform()
    if platform == "tpu":
        return "xla" if extras or splash.unsupported_reason(q, k, v) else "splash"
    if platform != "gpu":
        return "xla"
    if segment_ids is None and cudnn_unsupported_reason(q, k) is None:
        return "cudnn"
    return "xla" if extras or pallas_flash.unsupported_reason(q, k, v) else "pallas"


def check_backend(impl: str) -> None:
    if impl not in BACKENDS:
        raise ValueError(f"Unknown attention backend {impl!r}; available: {BACKENDS}.")


def attention(q, k, v, key_mask=None, *, impl: str = "xla", scale: float | None = None,
              segment_ids=None, bias=None, causal: bool = False, softcap: float = 0.0):
    """``q`` (B, S, H, D), ``k``/``v`` (B, T, Hkv, D), ``key_mask`` (B, T) bool or None,
    ``segment_ids`` None or ``(q_ids (B, S), kv_ids (B, T))`` (not cudnn),
    ``bias`` an additive logit bias broadcastable to (B, H, S, T) and ``causal`` (xla and
    cudnn only), ``softcap`` (logit soft-capping, xla only): the text encoders use them."""
    check_backend(impl)
    extras = bias is not None or causal or bool(softcap)
    if impl == "auto":
        impl = "xla" if softcap else auto_backend(q, k, v, segment_ids, extras)
    if impl == "xla":
        return xla_attention(q, k, v, key_mask, scale, segment_ids, bias, causal, softcap)
    if impl in ("pallas", "splash"):
        return _kernel_attention(impl, q, k, v, key_mask, segment_ids, scale, extras)
    if segment_ids is not None or softcap:
        raise ValueError("attn_impl='cudnn' does not take segment_ids or logit soft-capping "
                         "here; use 'xla' (or 'pallas' for segment_ids).")
    reason = cudnn_unsupported_reason(q, k)
    if reason:
        raise ValueError(f"attn_impl='cudnn' cannot run this call: {reason}. "
                         "Use attn_impl='auto' to fall back to XLA.")
    mask = None
    if key_mask is not None:  # cuDNN wants the mask at full (B, 1, S, T) size
        b, s, t = q.shape[0], q.shape[1], k.shape[1]
        mask = jnp.broadcast_to(key_mask[:, None, None, :], (b, 1, s, t))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        is_causal=causal, implementation="cudnn")


def splash_unsupported_reason(q, k, v) -> str | None:
    """Why splash cannot run this call here, or None if it can."""
    if target_platform() == "gpu":
        return "splash attention is a TPU kernel (use 'pallas' or 'cudnn' on GPUs)"
    return splash.unsupported_reason(q, k, v)


KERNELS = {  # backend -> (kernel, why it cannot run a call)
    "pallas": (pallas_flash.flash_attention, pallas_flash.unsupported_reason),
    "splash": (splash.splash_attention, splash_unsupported_reason),
}


def _kernel_attention(impl, q, k, v, key_mask, segment_ids, scale, extras):
    kernel, unsupported = KERNELS[impl]
    reason = ("the kernel takes no logit bias, causal mask or soft-capping" if extras
              else unsupported(q, k, v))
    if reason:
        raise ValueError(f"attn_impl={impl!r} cannot run this call: {reason}.")
    return per_shard(functools.partial(kernel, scale=scale), q, k, v, key_mask, segment_ids)


def _mesh_axes(logical: str, sizes: dict, dims: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes the ``logical`` axis is split over under the rules in context
    (:func:`~jaxdit.parallel.mesh.logical_mesh_axes`), as far as their product divides
    every size in ``dims`` (a prefix)."""
    kept = []
    for a in logical_mesh_axes(logical, sizes, nn.get_logical_axis_rules() or LOGICAL_RULES):
        n = math.prod(sizes[b] for b in kept + [a])
        if any(d % n for d in dims):
            break
        kept.append(a)
    return tuple(kept)


def per_shard(kernel, q, k, v, key_mask=None, segment_ids=None):
    """``kernel(q, k, v, key_mask, segment_ids=...)`` on each device's shard of the mesh in
    context (see the module docstring); called directly without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    call = lambda q, k, v, m, ids: kernel(q, k, v, m, segment_ids=ids)
    if mesh.empty:
        return call(q, k, v, key_mask, segment_ids)
    sizes = dict(mesh.shape)
    batch = _mesh_axes("batch", sizes, (q.shape[0],)) or None
    heads = _mesh_axes("act_heads", sizes, (q.shape[2], k.shape[2])) or None
    if batch is None and heads is None:
        return call(q, k, v, key_mask, segment_ids)
    qkv, rows = P(batch, None, heads, None), P(batch, None)
    mask_spec = None if key_mask is None else rows
    ids_spec = None if segment_ids is None else (rows, rows)
    return jax.shard_map(call, mesh=mesh, in_specs=(qkv, qkv, qkv, mask_spec, ids_spec),
                         out_specs=qkv, check_vma=False)(q, k, v, key_mask, segment_ids)
