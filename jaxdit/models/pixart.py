"""PixArt-alpha baseline (as compared in DiT-Air, Table 1: (6 + 16N) d^2).

Image tokens only in the main stream: self-attention, then cross-attention to the fixed
(projected) text tokens, then MLP. AdaLN is "adaLN-single": one ``Linear(d -> 6d)`` shared
by all layers plus a per-layer ``(6, d)`` offset table. Positions: fixed 2D sin-cos.
Conditioning ``c`` = timestep MLP + pooled-text MLP, the same embedder as DiT-Air/MMDiT so
the three are compared on equal terms.
"""
from __future__ import annotations

import flax.linen as nn

from jaxdit.models.attention import CrossAttention, SelfAttention
from jaxdit.models.base import Block, Denoiser
from jaxdit.models.dit_air import SandwichResidual
from jaxdit.models.layers import AdaLNModulation, LayerNorm, Mlp, sincos_2d


class PixArtBlock(Block):
    """Self-attn (modulated) -> cross-attn to ``ctx`` -> MLP (modulated)."""

    @nn.compact
    def __call__(self, x, mods, ctx, ctx_mask):
        attn = SelfAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                             impl=self.attn_impl, name="attn", **self.kw)
        x = SandwichResidual(self.sandwich, name="attn_res", **self.kw)(x, attn, *mods[:3])
        cross = CrossAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                               impl=self.attn_impl, name="cross_attn", **self.kw)
        x = x + cross(LayerNorm(dtype=self.dtype)(x), ctx, ctx_mask)
        mlp = Mlp(int(self.width * self.mlp_ratio), name="mlp", **self.kw)
        x = SandwichResidual(self.sandwich, name="mlp_res", **self.kw)(x, mlp, *mods[3:])
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class PixArtAlpha(Denoiser):
    """PixArt-alpha denoiser (contract in :mod:`jaxdit.models.base`)."""

    def image_positions(self, grid_h, grid_w):
        return sincos_2d(grid_h, grid_w, self.width)[None]

    @nn.compact
    def __call__(self, x, t, cond):
        img, ctx, ctx_mask, cvec = self.embed_inputs(x, t, cond)
        shared = AdaLNModulation(self.width, 6, name="adaln_single", **self.kw)(cvec)
        block_cls = self.block_class(PixArtBlock)
        for i in range(self.depth):
            table = self.param(f"scale_shift_table_{i}",
                               nn.with_logical_partitioning(nn.initializers.zeros,
                                                            (None, "embed")),
                               (6, self.width), self.param_dtype)
            mods = [m + table[k].astype(self.dtype) for k, m in enumerate(shared)]
            img = block_cls(name=f"block_{i}", **self.block_options())(img, mods, ctx, ctx_mask)
        return self.predict(img, cvec, x.shape)
