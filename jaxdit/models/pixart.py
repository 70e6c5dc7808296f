"""PixArt-alpha baseline (as compared in DiT-Air, Table 1: (6 + 16N) d^2).

Image tokens only in the main stream: self-attention, then cross-attention to the fixed
(projected) text tokens, then MLP. AdaLN is "adaLN-single": one ``Linear(d -> 6d)`` shared
by all layers plus a per-layer ``(6, d)`` offset table. Positions: fixed 2D sin-cos.
Conditioning ``c`` = timestep MLP + pooled-text MLP, the same embedder as DiT-Air/MMDiT so
the three are compared on equal terms.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import CrossAttention, SelfAttention
from jaxdit.models.dit_air import SandwichResidual
from jaxdit.models.layers import (AdaLNModulation, ConditionEmbedder, FinalLayer, LayerNorm,
                                  Mlp, PatchEmbed, TextAdapter, sincos_2d, unpatchify)

Dtype = Any


class PixArtBlock(nn.Module):
    """Self-attn (modulated) -> cross-attn to ``ctx`` -> MLP (modulated)."""
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    sandwich: bool = True
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mods, ctx, ctx_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hd = self.width // self.num_heads
        attn = SelfAttention(self.num_heads, hd, qk_norm=self.qk_norm, impl=self.attn_impl,
                             name="attn", **kw)
        x = SandwichResidual(self.sandwich, name="attn_res", **kw)(x, attn, *mods[:3])
        cross = CrossAttention(self.num_heads, hd, qk_norm=self.qk_norm, impl=self.attn_impl,
                               name="cross_attn", **kw)
        x = x + cross(LayerNorm(dtype=self.dtype)(x), ctx, ctx_mask)
        mlp = Mlp(int(self.width * self.mlp_ratio), name="mlp", **kw)
        x = SandwichResidual(self.sandwich, name="mlp_res", **kw)(x, mlp, *mods[3:])
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class PixArtAlpha(nn.Module):
    """PixArt-alpha denoiser; same ``__call__(x, t, cond)`` contract as :class:`DiTAir`."""
    depth: int
    width: int
    num_heads: int
    patch_size: int = 2
    out_channels: int = 3
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    sandwich: bool = True
    text_hidden_ratio: float = 4.0
    attn_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        p = self.patch_size
        img = PatchEmbed(self.width, p, name="patch_embed", **kw)(x.astype(self.dtype))
        img = img + sincos_2d(h // p, w // p, self.width)[None].astype(self.dtype)
        ctx = TextAdapter(self.width, int(self.text_hidden_ratio * self.width),
                          name="text_adapter", **kw)(cond["text_tokens"])
        ctx_mask = cond["text_mask"].astype(bool)
        cvec = ConditionEmbedder(self.width, name="cond_embed", **kw)(t, cond["text_pooled"])
        shared = AdaLNModulation(self.width, 6, name="adaln_single", **kw)(cvec)
        block_cls = nn.remat(PixArtBlock) if self.remat else PixArtBlock
        for i in range(self.depth):
            table = self.param(f"scale_shift_table_{i}",
                               nn.with_logical_partitioning(nn.initializers.zeros,
                                                            (None, "embed")),
                               (6, self.width), self.param_dtype)
            mods = [m + table[k].astype(self.dtype) for k, m in enumerate(shared)]
            img = block_cls(self.width, self.num_heads, self.mlp_ratio, self.qk_norm,
                            self.sandwich, self.attn_impl, name=f"block_{i}", **kw)(
                                img, mods, ctx, ctx_mask)
        out = FinalLayer(p * p * self.out_channels, name="final", **kw)(img, cvec)
        return unpatchify(out, p, h, w, self.out_channels).astype(jnp.float32)
