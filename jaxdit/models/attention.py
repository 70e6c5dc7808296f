"""The one attention function and the attention projection modules every model uses.

``attention(q, k, v, key_mask)`` is the single entry point; backends (XLA reference,
Pallas kernels) are chosen by ``impl`` and live in :mod:`jaxdit.kernels`.
Layouts: ``q`` is ``(B, S, H, D)``, ``k``/``v`` are ``(B, T, Hkv, D)`` with ``H % Hkv == 0``
(grouped-query attention without materialising repeated K/V), ``key_mask`` is
``(B, T)`` bool (True = attend) or None.
"""
from __future__ import annotations

from typing import Any

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.kernels import dispatch
from jaxdit.kernels.reference import xla_attention  # noqa: F401  (re-exported)
from jaxdit.models.layers import RMSNorm, apply_rope, dense

Dtype = Any


HEAD_AXES = ("batch", "length", "act_heads", None)


def attention(q, k, v, key_mask=None, *, impl: str = "xla", scale: float | None = None,
              bias=None, causal: bool = False, softcap: float = 0.0):
    """Dispatches to the configured attention backend (see :mod:`jaxdit.kernels`);
    ``bias`` (additive, broadcastable to (B, H, S, T)), ``causal`` and ``softcap`` (logit
    soft-capping) serve the pretrained text encoders (T5, CLIP, Gemma).

    Inputs and output are pinned to ``(batch, length, heads, head_dim)`` logical shardings
    (batch over data-parallel axes, heads over ``tensor``), so every backend sees the same
    layout and the partitioner has no freedom to pick a different one per call site.
    """
    q, k, v = (nn.with_logical_constraint(a, HEAD_AXES) for a in (q, k, v))
    out = dispatch.attention(q, k, v, key_mask, impl=impl, scale=scale, bias=bias,
                             causal=causal, softcap=softcap)
    return nn.with_logical_constraint(out, HEAD_AXES)


class QKVProjection(nn.Module):
    """Projects ``x`` (B, S, d) to per-head q (B, S, H, D), k, v (B, S, Hkv, D), with optional
    per-head QK RMSNorm (scale shared across heads).

    ``fused=True`` computes q, k and v with one matmul whose kernel ``(d, Hkv, H/Hkv + 2, D)``
    is laid out per KV group ``[its H/Hkv query heads | k | v]``: sharding the ``kv_heads``
    axis over ``tensor`` keeps every query head on the device holding its K/V head, so GQA
    needs no communication. Query head ``h`` uses KV head ``h // (H/Hkv)``.
    Separate from the attention op so dual-stream models (MMDiT) can project each stream
    with its own weights and attend jointly.
    """
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    qk_norm: bool = True
    use_bias: bool = True
    fused: bool = False
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        hkv = self.num_kv_heads or self.num_heads
        if self.num_heads % hkv:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={hkv}.")
        b, s, _ = x.shape
        if self.fused:
            rep = self.num_heads // hkv
            shape = (x.shape[-1], hkv, rep + 2, self.head_dim)
            kernel = self.param("qkv_kernel", nn.with_logical_partitioning(
                xavier_fused, ("embed", "kv_heads", None, None)), shape, self.param_dtype)
            qkv = jnp.einsum("bsd,dgrk->bsgrk", x.astype(self.dtype), kernel.astype(self.dtype))
            if self.use_bias:
                qkv = qkv + self.param("qkv_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, ("kv_heads", None, None)), shape[1:],
                    self.param_dtype).astype(self.dtype)
            q = qkv[:, :, :, :rep].reshape(b, s, self.num_heads, self.head_dim)
            k, v = qkv[:, :, :, rep], qkv[:, :, :, rep + 1]
        else:
            q = dense(self.num_heads * self.head_dim, ("embed", "heads"), name="q", **kw)(x)
            k = dense(hkv * self.head_dim, ("embed", "kv_heads"), name="k", **kw)(x)
            v = dense(hkv * self.head_dim, ("embed", "kv_heads"), name="v", **kw)(x)
            q = q.reshape(b, s, self.num_heads, self.head_dim)
            k = k.reshape(b, s, hkv, self.head_dim)
            v = v.reshape(b, s, hkv, self.head_dim)
        if self.qk_norm:
            norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        return q, k, v


def xavier_fused(key, shape, dtype=jnp.float32):
    """Xavier-uniform for a fused ``(d, Hkv, H/Hkv + 2, D)`` kernel, with the fan-out of the
    equivalent ``(d, (H + 2 Hkv) D)`` matrix (as the official fused ``Linear``)."""
    fan_in, fan_out = shape[0], math.prod(shape[1:])
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


class SelfAttention(nn.Module):
    """QKV projection (+QK-norm, +RoPE) -> :func:`attention` -> output projection.

    Args to ``__call__``: ``x`` (B, S, d); ``key_mask`` (B, S) bool or None; ``rope``
    optional ``(cos, sin)`` each ``(B|1, S, head_dim/2)``; ``bias`` optional additive logits
    ``(B|1, H, S, S)``. ``causal``, ``scale`` (default ``head_dim**-0.5``) and ``softcap``
    serve the pretrained text encoders.
    """
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    qk_norm: bool = True
    use_bias: bool = True
    fused: bool = False
    norm_eps: float = 1e-6
    impl: str = "xla"
    causal: bool = False
    scale: float | None = None
    softcap: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, rope=None, bias=None):
        q, k, v = QKVProjection(self.num_heads, self.head_dim, self.num_kv_heads, self.qk_norm,
                                self.use_bias, self.fused, self.norm_eps, self.dtype,
                                self.param_dtype, name="qkv")(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, key_mask, impl=self.impl, scale=self.scale, bias=bias,
                        causal=self.causal, softcap=self.softcap)
        return OutProjection(x.shape[-1], self.use_bias, self.dtype, self.param_dtype,
                             name="out")(out)


class OutProjection(nn.Module):
    """Merges heads ``(B, S, H, D)`` and projects back to ``features``."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, s, h, d = x.shape
        x = nn.with_logical_constraint(x.reshape(b, s, h * d), ("batch", "length", "act_heads"))
        return dense(self.features, ("heads", "embed"), name="proj", use_bias=self.use_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)


class CrossAttention(nn.Module):
    """Queries from ``x`` (B, S, d), keys/values from ``ctx`` (B, T, d), ``ctx_mask`` (B, T)."""
    num_heads: int
    head_dim: int
    qk_norm: bool = True
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, ctx, ctx_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, s, _ = x.shape
        t = ctx.shape[1]
        hd = self.num_heads * self.head_dim
        q = dense(hd, ("embed", "heads"), name="q", **kw)(x).reshape(b, s, self.num_heads, -1)
        k = dense(hd, ("embed", "heads"), name="k", **kw)(ctx).reshape(b, t, self.num_heads, -1)
        v = dense(hd, ("embed", "heads"), name="v", **kw)(ctx).reshape(b, t, self.num_heads, -1)
        if self.qk_norm:
            q = RMSNorm(name="q_norm", **kw)(q)
            k = RMSNorm(name="k_norm", **kw)(k)
        out = attention(q, k, v, ctx_mask, impl=self.impl)
        return OutProjection(x.shape[-1], True, self.dtype, self.param_dtype, name="out")(out)
