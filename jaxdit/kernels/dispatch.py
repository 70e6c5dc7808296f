"""Attention backend selection (``model.attn_impl``).

* ``xla``: :func:`jaxdit.kernels.reference.xla_attention`, every platform.
* ``cudnn``: cuDNN fused attention through ``jax.nn.dot_product_attention`` (NVIDIA GPUs,
  bf16/fp16, head dim a multiple of 8 up to 128).
* ``pallas``: jaxdit's flash-attention kernels (:mod:`jaxdit.kernels.flash_attention`):
  Triton on GPU, Mosaic on TPU, interpret mode on CPU (slow; for tests).
* ``auto``, from the H100 measurements in ``docs/performance.md``: on NVIDIA GPUs cuDNN
  where it supports the call (fastest at 1k-4k tokens), else the Pallas kernel (1.4-3.6x
  faster than XLA: head dims cuDNN refuses, packed segment ids, fp32), else XLA; XLA on
  CPU and TPU (the Mosaic kernel is not timed on a TPU yet).

An explicitly requested backend that cannot run the call raises ``ValueError`` saying why;
only ``auto`` falls back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.kernels import flash_attention as pallas_flash
from jaxdit.kernels.reference import xla_attention

BACKENDS = ("xla", "cudnn", "pallas", "auto")


def cudnn_unsupported_reason(q, k) -> str | None:
    """Why cuDNN cannot run this call, or None if it can."""
    if jax.default_backend() != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU (backend is {jax.default_backend()!r})"
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
    if jax.default_backend() != "gpu":
        return "xla"
    if segment_ids is None and cudnn_unsupported_reason(q, k) is None:
        return "cudnn"
    return "xla" if extras or pallas_flash.unsupported_reason(q, k, v) else "pallas"


def check_backend(impl: str) -> None:
    if impl not in BACKENDS:
        raise ValueError(f"Unknown attention backend {impl!r}; available: {BACKENDS}.")


def attention(q, k, v, key_mask=None, *, impl: str = "xla", scale: float | None = None,
              segment_ids=None, bias=None, causal: bool = False):
    """``q`` (B, S, H, D), ``k``/``v`` (B, T, Hkv, D), ``key_mask`` (B, T) bool or None,
    ``segment_ids`` None or ``(q_ids (B, S), kv_ids (B, T))`` (xla and pallas only),
    ``bias`` an additive logit bias broadcastable to (B, H, S, T) and ``causal`` (xla and
    cudnn only: the text encoders use them)."""
    check_backend(impl)
    extras = bias is not None or causal
    if impl == "auto":
        impl = auto_backend(q, k, v, segment_ids, extras)
    if impl == "xla":
        return xla_attention(q, k, v, key_mask, scale, segment_ids, bias, causal)
    if impl == "pallas":
        reason = pallas_flash.unsupported_reason(q, k, v)
        if extras:
            reason = "the kernel takes no logit bias or causal mask"
        if reason:
            raise ValueError(f"attn_impl='pallas' cannot run this call: {reason}.")
        return pallas_flash.flash_attention(q, k, v, key_mask, segment_ids=segment_ids,
                                            scale=scale)
    if segment_ids is not None:
        raise ValueError("attn_impl='cudnn' does not take segment_ids here; use 'pallas' or "
                         "'xla'.")
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
