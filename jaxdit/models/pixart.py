"""PixArt-alpha baseline (as compared in DiT-Air, Table 1: (6 + 16N) d^2).

Image tokens only in the main stream: self-attention, then cross-attention to the fixed
(projected) text tokens, then MLP. AdaLN is "adaLN-single": one ``Linear(d -> 6d)`` shared
by all layers plus a per-layer ``(6, d)`` offset table. Positions: fixed 2D sin-cos.

``layout`` picks between two forms of the same architecture:

* ``"dit_air"`` (default): the DiT-Air paper's variant, compared on equal terms with
  DiT-Air/MMDiT: conditioning ``c`` = timestep MLP + pooled-text MLP (their shared
  embedder), a LayerNorm before the cross-attention, the AdaLN final layer; QK-norm and
  sandwich norms as configured.
* ``"original"``: PixArt-alpha as published (diffusers ``PixArtTransformer2DModel``, whose
  weights :mod:`jaxdit.convert.baselines` loads): ``c`` is the timestep embedding
  alone (plus, with ``size_conditioning``, PixArt-alpha's resolution and aspect-ratio
  micro-conditions), the cross-attention reads the residual stream un-normalised, and the
  final layer modulates with a learned ``(2, d)`` table plus ``c`` (no projection). Use
  it with ``qk_norm=False, sandwich=False, text_hidden_ratio=1`` (the caption projection
  ``Linear-GELU-Linear`` of hidden ``d``), as the converter reports.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import CrossAttention, SelfAttention
from jaxdit.models.family import Family, denoiser_example_inputs, transformer_kwargs
from jaxdit.models.base import Block, Denoiser, check_layout
from jaxdit.models.dit_air import SandwichResidual
from jaxdit.models.stack import apply_stack
from jaxdit.models.layers import (AdaLNModulation, LayerNorm, Mlp, TimestepEmbedder, dense,
                                  modulate, sincos_2d, zeros)

# config.model fields this family reads beyond family.COMMON_FIELDS.
CONFIG_FIELDS = ("layout", "pos_base_size", "pos_interpolation", "size_conditioning",
                 "text_hidden_ratio")

class PixArtBlock(Block):
    """Self-attn (modulated) -> cross-attn to ``ctx`` -> MLP (modulated); ``cross_norm``:
    LayerNorm before the cross-attention (the DiT-Air variant; PixArt-alpha has none).

    ``shared_mods``: adaLN-single's 6 ``(B, 1, d)`` chunks, to which this block adds its own
    zero-initialised ``scale_shift_table`` (6, d)."""
    cross_norm: bool = True

    @nn.compact
    def __call__(self, x, shared_mods, ctx, ctx_mask):
        table = self.param("scale_shift_table",
                           nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                           (6, self.width), self.param_dtype)
        mods = [m + table[k].astype(self.dtype) for k, m in enumerate(shared_mods)]
        attn = SelfAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                             impl=self.attn_impl, name="attn", **self.kw)
        x = SandwichResidual(self.sandwich, name="attn_res", **self.kw)(x, attn, *mods[:3])
        cross = CrossAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                               impl=self.attn_impl, name="cross_attn", **self.kw)
        x = x + cross(LayerNorm(dtype=self.dtype)(x) if self.cross_norm else x, ctx, ctx_mask)
        mlp = Mlp(int(self.width * self.mlp_ratio), name="mlp", **self.kw)
        x = SandwichResidual(self.sandwich, name="mlp_res", **self.kw)(x, mlp, *mods[3:])
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class TableFinalLayer(nn.Module):
    """PixArt-alpha's final layer: ``LN(x) * (1 + table[1] + c) + table[0] + c`` then a
    zero-init ``Linear`` to ``out_dim``; ``c`` (B, d) is the condition embedding."""
    out_dim: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        d = x.shape[-1]
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            nn.initializers.normal(d ** -0.5), (None, "embed")), (2, d), self.param_dtype)
        shift, scale = (table[i].astype(self.dtype) + c[:, None, :] for i in (0, 1))
        x = modulate(LayerNorm(dtype=self.dtype)(x), shift, scale)
        return dense(self.out_dim, ("embed", "patch"), name="proj", init=zeros,
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)


class SizeEmbedder(nn.Module):
    """PixArt-alpha's micro-conditions: sinusoid MLPs of the image height and width in
    pixels and of its aspect ratio, ``width / 3`` features each, concatenated (B, width)."""
    width: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, height, width, batch: int):
        if self.width % 3:
            raise ValueError(f"size_conditioning needs a width divisible by 3, got {self.width}.")
        kw = dict(time_scale=1.0, dtype=self.dtype, param_dtype=self.param_dtype)
        res = TimestepEmbedder(self.width // 3, name="resolution", **kw)
        ratio = TimestepEmbedder(self.width // 3, name="aspect_ratio", **kw)
        full = lambda v: jnp.full((batch,), v, jnp.float32)  # noqa: E731
        return jnp.concatenate([res(full(height)), res(full(width)),
                                ratio(full(height / width))], axis=-1)


class PixArtAlpha(Denoiser):
    """PixArt-alpha denoiser (contract in :mod:`jaxdit.models.base`); see the module
    docstring for ``layout``. ``pos_base_size`` / ``pos_interpolation``: the sin-cos
    position scaling of :func:`~jaxdit.models.layers.sincos_2d` (PixArt-alpha 1024-px:
    64 / 2). ``size_conditioning``: pixels per latent cell (e.g. 8) to feed PixArt-alpha's
    resolution / aspect-ratio micro-conditions, 0 = off (``layout="original"`` only)."""
    layout: str = "dit_air"
    pos_base_size: int = 0
    pos_interpolation: float = 1.0
    size_conditioning: int = 0

    @property
    def uses_pooled_text(self) -> bool:
        return self.layout == "dit_air"

    def image_positions(self, grid_h, grid_w):
        return sincos_2d(grid_h, grid_w, self.width, self.pos_base_size,
                         self.pos_interpolation)[None]

    @nn.compact
    def __call__(self, x, t, cond):
        check_layout(self.layout)
        original = self.layout == "original"
        if self.size_conditioning and not original:
            raise ValueError("size_conditioning is PixArt-alpha's: use layout='original'.")
        img, ctx, ctx_mask, cvec = self.embed_inputs(x, t, cond)
        if self.size_conditioning:
            f = self.size_conditioning
            cvec = cvec + SizeEmbedder(self.width, name="size_embed", **self.kw)(
                x.shape[1] * f, x.shape[2] * f, x.shape[0]).astype(cvec.dtype)
        shared = AdaLNModulation(self.width, 6, name="adaln_single", **self.kw)(cvec)
        img = apply_stack(PixArtBlock, self.depth, "block", img, shared, ctx, ctx_mask,
                          scan=self.scan_layers, remat=self.remat, cross_norm=not original,
                          **self.block_options())
        if not original:
            return self.predict(img, cvec, x.shape)
        p = self.patch_size
        out = TableFinalLayer(p * p * self.out_channels, name="final", **self.kw)(img, cvec)
        return self.tokens_to_latents(out, x.shape)


def build(model_cfg, out_channels: int, moe_cfg=None) -> PixArtAlpha:
    """PixArt-alpha from ``config.model``."""
    del moe_cfg
    m = model_cfg
    return PixArtAlpha(layout=m.layout, pos_base_size=m.pos_base_size,
                       pos_interpolation=m.pos_interpolation,
                       size_conditioning=m.size_conditioning,
                       text_hidden_ratio=m.text_hidden_ratio,
                       **transformer_kwargs(m, out_channels))


FAMILY = Family("pixart", build, denoiser_example_inputs, own_fields=CONFIG_FIELDS)
