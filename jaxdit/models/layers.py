"""Shared building blocks: dense layers with logical axes, norms, AdaLN, MLPs, embeddings, RoPE.

Conventions: activations are ``(batch, length, features)``; ``dtype`` is the compute
dtype and ``param_dtype`` the storage dtype of parameters (fp32 params + bf16 compute is
the usual TPU setting).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


class Dense(nn.Dense):
    """``nn.Dense`` applied to ``(..., in)`` as one 2-D matmul ``(prod(...), in) @ (in, out)``.

    The same result and parameters as ``nn.Dense`` (the class keeps its name, so auto-named
    layers keep theirs); XLA:CPU runs the backward of a 3-D ``(B, L, in)`` dense up to 2.5x
    slower than that of the flattened one (the tiny DiT's train step: 225 -> 120 ms on 2
    cores, ``docs/performance.md``). Elsewhere the reshape is free."""

    def __call__(self, inputs):
        if inputs.ndim <= 2:
            return super().__call__(inputs)
        flat = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return flat.reshape(*inputs.shape[:-1], self.features)


def dense(features: int, axes: tuple[str | None, str | None], *, name: str | None = None,
          use_bias: bool = True, init: Callable = xavier, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """:class:`Dense` whose kernel/bias carry logical axis names ``axes=(in, out)``."""
    return Dense(
        features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(zeros, (axes[1],)))


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learnable scale (initialised to 1)."""
    eps: float = 1e-6
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)),
                               (x.shape[-1],), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; affine-free by default (AdaLN supplies shift/scale)."""
    eps: float = 1e-6
    use_affine: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_affine:
            d = x.shape[-1]
            y = y * self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,),
                               self.param_dtype)
            y = y + self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (d,),
                               self.param_dtype)
        return y.astype(self.dtype)


def modulate(x, shift, scale):
    """AdaLN modulation ``x * (1 + scale) + shift``; shift/scale broadcast over length."""
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """``SiLU -> Linear(cond_dim -> num_chunks * width)`` split into ``num_chunks`` vectors.

    The one AdaLN helper used by every family. Input ``c``: ``(B, cond_dim)``; returns a
    tuple of ``num_chunks`` arrays ``(B, 1, width)`` ready to broadcast over tokens.
    ``zero_init`` makes shift/scale/gate start at 0 (adaLN-Zero, blocks start as identity).
    """
    width: int
    num_chunks: int = 6
    zero_init: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        init = zeros if self.zero_init else nn.initializers.normal(0.02)
        out = dense(self.num_chunks * self.width, ("embed", "mod"), name="proj", init=init,
                    dtype=self.dtype, param_dtype=self.param_dtype)(nn.silu(c))
        # The weight is split over "tensor" along its 6d outputs, but the activation is
        # pinned to (batch, replicated) before the split into chunks: letting the partitioner
        # carry the tensor-sharded dim through the split mis-orders batch shards on
        # data x fsdp x tensor meshes (caught by tests/test_sharding.py).
        out = nn.with_logical_constraint(out, ("batch", "act_embed"))
        return tuple(jnp.split(out[:, None, :], self.num_chunks, axis=-1))


ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact (erf): BERT
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # CLIP
    "relu": nn.relu,
}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; available: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Transformer MLP: ``Linear(d -> hidden) -> act -> Linear(hidden -> d)``; ``activation``
    one of :data:`ACTIVATIONS` (GELU in its tanh form by default)."""
    hidden: int
    activation: str = "gelu_tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.with_logical_constraint(activation_fn(self.activation)(h),
                                       ("batch", "length", "act_mlp"))
        return dense(d, ("mlp", "embed"), name="fc2", **kw)(h)


class SwiGLU(nn.Module):
    """Gated MLP ``w2(silu(w1 x) * w3 x)`` without biases (LLaMA / Lumina FFN).

    ``hidden_dim(d, multiple_of)`` gives Lumina's hidden size (4d rounded up)."""
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @staticmethod
    def hidden_dim(width: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
        h = 4 * width if multiplier is None else int(multiplier * 4 * width)
        return multiple_of * -(-h // multiple_of)

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        gate = dense(self.hidden, ("embed", "mlp"), name="w1", **kw)(x)
        up = dense(self.hidden, ("embed", "mlp"), name="w3", **kw)(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="w2", **kw)(h)


def timestep_sinusoid(t, dim: int = 256, max_period: float = 10000.0):
    """DiT/GLIDE sinusoidal embedding ``[cos, sin]`` of ``t`` (B,) -> (B, dim), in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """``t`` in [0, 1] (B,) -> (B, width): sinusoid(1000 t) then ``Linear-SiLU-Linear``."""
    width: int
    freq_dim: int = 256
    time_scale: float = 1000.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  init=nn.initializers.normal(0.02))
        e = timestep_sinusoid(t * self.time_scale, self.freq_dim).astype(self.dtype)
        e = dense(self.width, ("cond", "embed"), name="fc1", **kw)(e)
        return dense(self.width, ("embed", "embed_out"), name="fc2", **kw)(nn.silu(e))


class PatchEmbed(nn.Module):
    """Image/latent ``(B, H, W, C)`` -> tokens ``(B, H/p * W/p, width)`` (row-major)."""
    width: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        tokens = patchify(x, self.patch)
        return dense(self.width, ("patch", "embed"), name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(tokens)


def patchify(x, p: int):
    """``(B, H, W, C)`` -> ``(B, (H/p)(W/p), p*p*C)``; features ordered ``(ph, pw, c)``."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"Spatial size {(h, w)} is not divisible by patch size {p}.")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int, c: int):
    """Inverse of :func:`patchify`: ``(B, N, p*p*C)`` -> ``(B, H, W, C)``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class FinalLayer(nn.Module):
    """Norm -> AdaLN shift/scale from ``c`` -> Linear to ``out_dim``; all zero-init.
    ``use_shift=False``: scale only, ``LN(x) * (1 + scale)`` (Lumina's final layer)."""
    out_dim: int
    use_shift: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chunks = AdaLNModulation(x.shape[-1], 2 if self.use_shift else 1, name="adaln", **kw)(c)
        shift, scale = chunks if self.use_shift else (0.0, chunks[0])
        x = modulate(LayerNorm(dtype=self.dtype)(x), shift, scale)
        return dense(self.out_dim, ("embed", "patch"), name="proj", init=zeros, **kw)(x)


class TextAdapter(nn.Module):
    """Projects text-encoder tokens (B, L, Dt) to the model width: ``Linear-GELU-Linear``
    with ``hidden`` units, or one ``Linear`` when ``hidden`` is 0 (SD3's context embedder)."""
    width: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        if not self.hidden:
            return dense(self.width, ("text_embed", "embed"), name="proj", **kw)(x)
        h = dense(self.hidden, ("text_embed", "mlp"), name="fc1", **kw)(x)
        return dense(self.width, ("mlp", "embed"), name="fc2", **kw)(nn.gelu(h, approximate=True))


class ConditionEmbedder(nn.Module):
    """Global condition ``c = TimestepMLP(t) + PooledMLP(pooled)`` (MMDiT style), or a class
    embedding instead of the pooled text when ``num_classes`` > 0 (row ``num_classes`` is the
    null class used for classifier-free guidance)."""
    width: int
    num_classes: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, pooled=None, label=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = TimestepEmbedder(self.width, name="t_embed", **kw)(t)
        if self.num_classes:
            table = nn.Embed(self.num_classes + 1, self.width, name="label_embed",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(0.02), ("vocab", "embed")),
                             dtype=self.dtype, param_dtype=self.param_dtype)
            c = c + table(label)
        if pooled is not None:
            p = dense(self.width, ("text_embed", "embed"), name="pooled_fc1", **kw)(
                pooled.astype(self.dtype))
            c = c + dense(self.width, ("embed", "embed_out"), name="pooled_fc2", **kw)(nn.silu(p))
        return c


# ----------------------------------------------------------------------------------------
# Rotary position embeddings over several position axes (2D for DiT-Air, 3D for Lumina).
# ----------------------------------------------------------------------------------------

def rope_tables(pos_ids, axes_dims: Sequence[int], theta: float = 10000.0):
    """Cos/sin tables for multi-axis RoPE.

    Args:
      pos_ids: int ``(B, S, A)`` (or ``(S, A)``) position per token along ``A`` axes.
      axes_dims: rotary channels per axis (each even); their sum is the head dim.
    Returns:
      ``(cos, sin)`` each ``(..., S, sum(axes_dims)/2)`` in fp32; axis ``a`` owns a
      contiguous block of ``axes_dims[a]/2`` frequency pairs.
    """
    parts = []
    for a, d in enumerate(axes_dims):
        if d % 2:
            raise ValueError(f"RoPE axis dims must be even, got {axes_dims}.")
        inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        parts.append(pos_ids[..., a].astype(jnp.float32)[..., None] * inv)
    ang = jnp.concatenate(parts, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """Rotates interleaved channel pairs ``(x[2i], x[2i+1])`` of ``x`` (B, S, H, D).

    ``cos``/``sin`` are ``(B or 1, S, D/2)``. Position 0 is the identity rotation.
    """
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def grid_positions(h: int, w: int):
    """Row-major ``(h*w, 2)`` int32 (row, col) ids of an ``h x w`` token grid."""
    r, c = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    return jnp.stack([r.reshape(-1), c.reshape(-1)], axis=-1).astype(jnp.int32)


def sincos_2d(h: int, w: int, dim: int, base_size: int = 0, interpolation: float = 1.0):
    """Fixed MAE/DiT 2D sin-cos position embedding ``(h*w, dim)`` (no parameters):
    ``[sin(col w), cos(col w), sin(row w), cos(row w)]`` per row-major token, the column
    half first as in MAE/DiT (so DiT checkpoints convert unchanged).

    ``base_size`` > 0 stretches each axis onto a ``base_size`` grid (coordinate
    ``i * base_size / n`` on an ``n``-token axis) and ``interpolation`` divides the
    coordinates, as PixArt-alpha's ``base_size`` / ``interpolation_scale``."""
    pos = grid_positions(h, w).astype(jnp.float32)
    if base_size:
        pos = pos * jnp.asarray([base_size / h, base_size / w], jnp.float32)
    pos = pos / interpolation
    quarter = dim // 4
    omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
    out = [f(pos[:, i:i + 1] * omega) for i in (1, 0) for f in (jnp.sin, jnp.cos)]
    emb = jnp.concatenate(out, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - emb.shape[-1])))
