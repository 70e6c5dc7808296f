"""MMDiT baseline (SD3 style, as compared in DiT-Air, Table 1: 36 N d^2).

Dual stream: text and image tokens have their own QKV/O projections, MLPs and AdaLN
(``adaln="per_layer"``: 12 N d^2, or ``"shared"`` across layers: 12 d^2, Table 2); the two
streams meet in one joint attention over ``[text | image]``.

Positions: a learned absolute position table for image tokens (SD3's ``pos_embed_max_size``
idea), cropped to the token grid. The DiT-Air paper does not break down MMDiT's non-block
parameters; a 144x144 table (24M at B size) together with the embedders shared with DiT-Air
reproduces Table 2 (902M per-layer / 631M shared) within 1%. Set ``pos_embed_max_size=0``
to use fixed sin-cos positions instead.

``layout="original"`` is SD3's MMDiT (diffusers ``SD3Transformer2DModel``, whose weights
:mod:`jaxdit.convert.baselines` loads): in the last block the text stream only
supplies keys and values (``context_pre_only``: its AdaLN gives shift and scale, and it has
no output projection or MLP). Use it with ``sandwich=False`` and ``text_hidden_ratio=0``
(one Linear context embedder); SD3 has no QK-norm, SD3.5 has it. ``"dit_air"`` (default)
is the DiT-Air paper's variant, every block dual-stream throughout.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import OutProjection, QKVProjection, attention
from jaxdit.models.family import Family, denoiser_example_inputs, transformer_kwargs
from jaxdit.models.base import Block, Denoiser, check_layout
from jaxdit.models.layers import AdaLNModulation, LayerNorm, Mlp, RMSNorm, modulate, sincos_2d
from jaxdit.models.stack import apply_stack

ADALN_MODES = ("per_layer", "shared")
# config.model fields this family reads beyond family.COMMON_FIELDS.
CONFIG_FIELDS = ("adaln", "pos_embed_max_size", "layout", "text_hidden_ratio")


class StreamModules(Block):
    """Per-stream weights of one MMDiT block: QKV, output projection, MLP, post-norms."""

    def setup(self):
        self.qkv = QKVProjection(self.num_heads, self.head_dim, qk_norm=self.qk_norm, **self.kw)
        self.out = OutProjection(self.width, **self.kw)
        self.mlp = Mlp(int(self.width * self.mlp_ratio), **self.kw)
        if self.sandwich:
            self.attn_post_norm = RMSNorm(**self.kw)
            self.mlp_post_norm = RMSNorm(**self.kw)

    def post(self, h, which: str):
        if not self.sandwich:
            return h
        return (self.attn_post_norm if which == "attn" else self.mlp_post_norm)(h)


class MMDiTBlock(Block):
    """Joint attention over both streams ``(txt (B, L, d), img (B, N, d))``, modulated by 6
    ``(B, 1, d)`` chunks per stream (shift, scale, gate for attention, then for the MLP):
    ``shared_mods`` (text, image) when the model shares one AdaLN, else this block's own
    projections of ``cvec`` (B, d). ``context_pre_only``: the text stream only feeds
    keys/values (its AdaLN gives shift and scale) and is returned unchanged."""
    context_pre_only: bool = False

    def modulations(self, cvec):
        text_chunks = 2 if self.context_pre_only else 6
        return (AdaLNModulation(self.width, text_chunks, name="adaln_text", **self.kw)(cvec),
                AdaLNModulation(self.width, 6, name="adaln_image", **self.kw)(cvec))

    @nn.compact
    def __call__(self, txt_img, cvec, shared_mods, key_mask):
        streams = (StreamModules(name="text", **self.options()),
                   StreamModules(name="image", **self.options()))
        mods = shared_mods or self.modulations(cvec)
        xs = txt_img
        qkv = [s.qkv(modulate(LayerNorm(dtype=self.dtype)(x), m[0], m[1]))
               for s, x, m in zip(streams, xs, mods)]
        q, k, v = (jnp.concatenate([a[i] for a in qkv], axis=1) for i in range(3))
        out = attention(q, k, v, key_mask, impl=self.attn_impl)
        n_txt = xs[0].shape[1]
        outs = (out[:, :n_txt], out[:, n_txt:])
        new = []
        for s, x, m, o in zip(streams, xs, mods, outs):
            if self.context_pre_only and s is streams[0]:
                new.append(x)
                continue
            x = x + m[2] * s.post(s.out(o), "attn")
            h = s.mlp(modulate(LayerNorm(dtype=self.dtype)(x), m[3], m[4]))
            new.append(x + m[5] * s.post(h, "mlp"))
        return tuple(nn.with_logical_constraint(a, ("batch", "length", "act_embed")) for a in new)


class MMDiT(Denoiser):
    """MMDiT denoiser (contract in :mod:`jaxdit.models.base`); ``layout`` in the module
    docstring. ``adaln="shared"`` uses one AdaLN pair (``adaln_text``/``adaln_image``) for
    every block; ``"per_layer"`` gives each block its own."""
    adaln: str = "per_layer"
    pos_embed_max_size: int = 144
    layout: str = "dit_air"

    @nn.compact
    def __call__(self, x, t, cond):
        if self.adaln not in ADALN_MODES:
            raise ValueError(f"adaln must be one of {ADALN_MODES}, got {self.adaln!r}.")
        check_layout(self.layout)
        img, txt, text_mask, cvec = self.embed_inputs(x, t, cond)
        key_mask = jnp.concatenate([text_mask, jnp.ones(img.shape[:2], bool)], axis=1)
        opts = self.block_options()
        shared = None
        if self.adaln == "shared":
            shared = (AdaLNModulation(self.width, 6, name="adaln_text", **self.kw)(cvec),
                      AdaLNModulation(self.width, 6, name="adaln_image", **self.kw)(cvec))
        # layout="original" (SD3): the last block's text stream only feeds keys/values.
        last_distinct = self.layout == "original"
        streams = apply_stack(MMDiTBlock, self.depth - last_distinct, "block", (txt, img), cvec,
                              shared, key_mask, scan=self.scan_layers, remat=self.remat, **opts)
        if last_distinct:
            block = self.block_class(MMDiTBlock)(name=f"block_{self.depth - 1}",
                                                 context_pre_only=True, **opts)
            streams = block(streams, cvec, shared, key_mask)
        return self.predict(streams[1], cvec, x.shape)

    def image_positions(self, grid_h: int, grid_w: int):
        if not self.pos_embed_max_size:
            return sincos_2d(grid_h, grid_w, self.width)[None]
        m = self.pos_embed_max_size
        if grid_h > m or grid_w > m:
            raise ValueError(f"Token grid {grid_h}x{grid_w} exceeds pos_embed_max_size={m}.")
        table = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("pos", None, "embed")), (m, m, self.width),
            self.param_dtype)
        top, left = (m - grid_h) // 2, (m - grid_w) // 2  # centre crop, as SD3
        return table[top:top + grid_h, left:left + grid_w].reshape(1, grid_h * grid_w, self.width)


def build(model_cfg, out_channels: int, moe_cfg=None) -> MMDiT:
    """MMDiT from ``config.model``."""
    del moe_cfg
    m = model_cfg
    return MMDiT(adaln=m.adaln, pos_embed_max_size=m.pos_embed_max_size, layout=m.layout,
                 text_hidden_ratio=m.text_hidden_ratio, **transformer_kwargs(m, out_channels))


FAMILY = Family("mmdit", build, denoiser_example_inputs, own_fields=CONFIG_FIELDS)
