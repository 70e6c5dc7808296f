"""MMDiT baseline (SD3 style, as compared in DiT-Air, Table 1: 36 N d^2).

Dual stream: text and image tokens have their own QKV/O projections, MLPs and AdaLN
(``adaln="per_layer"``: 12 N d^2, or ``"shared"`` across layers: 12 d^2, Table 2); the two
streams meet in one joint attention over ``[text | image]``.

Positions: a learned absolute position table for image tokens (SD3's ``pos_embed_max_size``
idea), cropped to the token grid. The DiT-Air paper does not break down MMDiT's non-block
parameters; a 144x144 table (24M at B size) together with the embedders shared with DiT-Air
reproduces Table 2 (902M per-layer / 631M shared) within 1%. Set ``pos_embed_max_size=0``
to use fixed sin-cos positions instead.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import OutProjection, QKVProjection, attention
from jaxdit.models.layers import (AdaLNModulation, ConditionEmbedder, FinalLayer, LayerNorm,
                                  Mlp, PatchEmbed, RMSNorm, TextAdapter, modulate, sincos_2d,
                                  unpatchify)

Dtype = Any
ADALN_MODES = ("per_layer", "shared")


class StreamModules(nn.Module):
    """Per-stream weights of one MMDiT block: QKV, output projection, MLP, post-norms."""
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    sandwich: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.qkv = QKVProjection(self.num_heads, self.width // self.num_heads,
                                 qk_norm=self.qk_norm, **kw)
        self.out = OutProjection(self.width, **kw)
        self.mlp = Mlp(int(self.width * self.mlp_ratio), **kw)
        if self.sandwich:
            self.attn_post_norm = RMSNorm(**kw)
            self.mlp_post_norm = RMSNorm(**kw)

    def post(self, h, which: str):
        if not self.sandwich:
            return h
        return (self.attn_post_norm if which == "attn" else self.mlp_post_norm)(h)


class MMDiTBlock(nn.Module):
    """Joint attention over both streams; ``mods_*`` are 6 ``(B, 1, d)`` arrays per stream."""
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    sandwich: bool = True
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, txt, img, mods_txt, mods_img, key_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        args = (self.width, self.num_heads, self.mlp_ratio, self.qk_norm, self.sandwich)
        streams = (StreamModules(*args, name="text", **kw), StreamModules(*args, name="image", **kw))
        xs, mods = (txt, img), (mods_txt, mods_img)
        qkv = [s.qkv(modulate(LayerNorm(dtype=self.dtype)(x), m[0], m[1]))
               for s, x, m in zip(streams, xs, mods)]
        q, k, v = (jnp.concatenate([a[i] for a in qkv], axis=1) for i in range(3))
        out = attention(q, k, v, key_mask, impl=self.attn_impl)
        n_txt = txt.shape[1]
        outs = (out[:, :n_txt], out[:, n_txt:])
        new = []
        for s, x, m, o in zip(streams, xs, mods, outs):
            x = x + m[2] * s.post(s.out(o), "attn")
            h = s.mlp(modulate(LayerNorm(dtype=self.dtype)(x), m[3], m[4]))
            new.append(x + m[5] * s.post(h, "mlp"))
        return tuple(nn.with_logical_constraint(a, ("batch", "length", "act_embed")) for a in new)


class MMDiT(nn.Module):
    """MMDiT denoiser; same ``__call__(x, t, cond)`` contract as :class:`DiTAir`."""
    depth: int
    width: int
    num_heads: int
    patch_size: int = 2
    out_channels: int = 3
    mlp_ratio: float = 4.0
    adaln: str = "per_layer"
    qk_norm: bool = True
    sandwich: bool = True
    pos_embed_max_size: int = 144
    text_hidden_ratio: float = 4.0
    attn_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond):
        if self.adaln not in ADALN_MODES:
            raise ValueError(f"adaln must be one of {ADALN_MODES}, got {self.adaln!r}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        img = PatchEmbed(self.width, p, name="patch_embed", **kw)(x.astype(self.dtype))
        img = img + self._positions(gh, gw).astype(self.dtype)
        txt = TextAdapter(self.width, int(self.text_hidden_ratio * self.width),
                          name="text_adapter", **kw)(cond["text_tokens"])
        key_mask = jnp.concatenate([cond["text_mask"].astype(bool),
                                    jnp.ones((b, img.shape[1]), bool)], axis=1)
        cvec = ConditionEmbedder(self.width, name="cond_embed", **kw)(t, cond["text_pooled"])

        def modulations(suffix):
            return (AdaLNModulation(self.width, 6, name=f"adaln_text{suffix}", **kw)(cvec),
                    AdaLNModulation(self.width, 6, name=f"adaln_image{suffix}", **kw)(cvec))

        shared = modulations("") if self.adaln == "shared" else None
        block_cls = nn.remat(MMDiTBlock) if self.remat else MMDiTBlock
        for i in range(self.depth):
            mods_txt, mods_img = shared or modulations(f"_{i}")
            txt, img = block_cls(self.width, self.num_heads, self.mlp_ratio, self.qk_norm,
                                 self.sandwich, self.attn_impl, name=f"block_{i}", **kw)(
                                     txt, img, mods_txt, mods_img, key_mask)
        out = FinalLayer(p * p * self.out_channels, name="final", **kw)(img, cvec)
        return unpatchify(out, p, h, w, self.out_channels).astype(jnp.float32)

    def _positions(self, gh: int, gw: int):
        if not self.pos_embed_max_size:
            return sincos_2d(gh, gw, self.width)[None]
        m = self.pos_embed_max_size
        if gh > m or gw > m:
            raise ValueError(f"Token grid {gh}x{gw} exceeds pos_embed_max_size={m}.")
        table = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("pos", None, "embed")), (m, m, self.width),
            self.param_dtype)
        top, left = (m - gh) // 2, (m - gw) // 2  # centre crop, as SD3
        return table[top:top + gh, left:left + gw].reshape(1, gh * gw, self.width)
