"""DiT-Air and DiT-Air-Lite (arXiv 2503.10618).

A vanilla DiT over the concatenated sequence ``[text tokens | image tokens]``: one set of
QKVO projections and MLPs for both modalities, and a *dual-stream* AdaLN (one modulation
projection for text tokens, one for image tokens) shared by all layers (Table 1: 12 d^2).

Design choices the paper leaves open (all configurable, documented here):
* per-layer AdaLN offsets (PixArt-alpha's ``scale_shift_table``, O(d) params per layer,
  zero-init) added to the shared modulation, so layers are not forced to identical
  shift/scale/gate (``adaln_layer_offset``);
* the shared modulation is zero-initialised, so every block starts as the identity;
* 2D RoPE on image tokens (row, column halves of each head), text tokens at position 0
  (identity rotation);
* text tokens are projected with a ``Linear(Dt->4d)-GELU-Linear(4d->d)`` adapter; together
  with the timestep/pooled-text MLPs and the final layer this non-block overhead is 17M at
  B size, which reproduces Table 3 (321M / 49M / 230M) within 1%.

DiT-Air-Lite: ``share="full"`` reuses one block (attention + MLP) N times;
``share="attention"`` shares the attention (QKVO, QK-norm) and keeps per-layer MLPs.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import SelfAttention
from jaxdit.models.family import Family, denoiser_example_inputs, transformer_kwargs
from jaxdit.models.base import Block, Denoiser
from jaxdit.models.layers import (AdaLNModulation, LayerNorm, Mlp, RMSNorm, grid_positions,
                                  modulate, rope_tables)
from jaxdit.models.stack import apply_stack

Dtype = Any
SHARE_MODES = ("none", "full", "attention")
# config.model fields this family reads beyond family.COMMON_FIELDS.
CONFIG_FIELDS = ("share", "adaln_layer_offset", "text_hidden_ratio")


def joint_rope(num_text: int, grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0):
    """2D RoPE tables for ``[text | image]``: text at (0, 0), image token (r, c) at (r, c).

    Returns ``(cos, sin)`` each ``(1, num_text + grid_h*grid_w, head_dim/2)``.
    """
    text_pos = jnp.zeros((num_text, 2), jnp.int32)
    pos = jnp.concatenate([text_pos, grid_positions(grid_h, grid_w)], axis=0)[None]
    half = head_dim // 2
    return rope_tables(pos, (half, head_dim - half), theta)


def stream_select(text_val, image_val, num_text: int, num_image: int):
    """Per-token array ``(B, L+N, d)`` taking ``text_val`` (B,1,d) on the first ``num_text``
    tokens and ``image_val`` (B,1,d) on the rest."""
    b, _, d = image_val.shape
    return jnp.concatenate([jnp.broadcast_to(text_val, (b, num_text, d)),
                            jnp.broadcast_to(image_val, (b, num_image, d))], axis=1)


class SandwichResidual(nn.Module):
    """``x + gate * postnorm(f(modulate(prenorm(x), shift, scale)))`` (postnorm optional)."""
    sandwich: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, fn, shift, scale, gate):
        h = fn(modulate(LayerNorm(dtype=self.dtype)(x), shift, scale))
        if self.sandwich:
            h = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="post_norm")(h)
        return x + gate * h


def layer_modulation(text_mod, image_mod, offset, num_text: int, num_image: int, dtype):
    """The 6 per-token modulations ``(B, L+N, d)`` of one layer: the shared text / image
    chunks (6 of ``(B, 1, d)`` each) plus that layer's ``offset`` (2, 6, d) or None."""
    mods = []
    for k in range(6):
        tm, im = text_mod[k], image_mod[k]
        if offset is not None:
            tm, im = tm + offset[0, k].astype(dtype), im + offset[1, k].astype(dtype)
        mods.append(stream_select(tm, im, num_text, num_image))
    return mods


class AirBlock(Block):
    """One DiT-Air block over the joint sequence ``x`` (B, L+N, d), ``L = num_text``.

    ``__call__(x, stream_mods, offset, key_mask, rope, attn_params)``: ``stream_mods`` =
    (text, image) chunks of the shared modulation, ``offset`` this layer's (2, 6, d) or None
    (see :func:`layer_modulation`). ``shared_attention``: the attention weights are
    ``attn_params`` (DiT-Air-Lite, one attention for all layers), not this block's own.
    """
    num_text: int = 0
    shared_attention: bool = False

    def attention(self, **module_kw) -> SelfAttention:
        """This block's attention; ``parent=None`` gives an unbound definition."""
        return SelfAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                             impl=self.attn_impl, **module_kw, **self.kw)

    @nn.compact
    def __call__(self, x, stream_mods, offset, key_mask, rope, attn_params=None):
        mods = layer_modulation(*stream_mods, offset, self.num_text, x.shape[1] - self.num_text,
                                self.dtype)
        if self.shared_attention:
            attn = functools.partial(self.attention(parent=None).apply, {"params": attn_params})
        else:
            attn = self.attention(name="attn")
        mlp = Mlp(int(self.width * self.mlp_ratio), name="mlp", **self.kw)
        x = SandwichResidual(self.sandwich, name="attn_res", **self.kw)(
            x, lambda h: attn(h, key_mask, rope), *mods[:3])
        x = SandwichResidual(self.sandwich, name="mlp_res", **self.kw)(x, mlp, *mods[3:])
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class DiTAir(Denoiser):
    """DiT-Air denoiser (contract in :mod:`jaxdit.models.base`)."""
    share: str = "none"
    adaln_layer_offset: bool = True
    rope_theta: float = 10000.0

    def _layer_offsets(self):
        if not self.adaln_layer_offset:
            return None
        return self.param("adaln_layer_offset",
                          nn.with_logical_partitioning(nn.initializers.zeros,
                                                       ("layers", None, None, "embed")),
                          (self.depth, 2, 6, self.width), self.param_dtype)

    def _shared_attention_params(self, block: AirBlock):
        """DiT-Air-Lite's one attention (``shared_attn``), created here and passed to every
        layer, so a scanned stack broadcasts it instead of stacking it."""
        attn_def = block.attention(parent=None).clone(impl="xla")  # shapes only: any length
        x = jnp.zeros((1, 1, self.width), self.dtype)
        return self.param("shared_attn", lambda rng: attn_def.init(rng, x)["params"])

    @nn.compact
    def __call__(self, x, t, cond):
        if self.share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {self.share!r}.")
        img, txt, text_mask, cvec = self.embed_inputs(x, t, cond)
        b, num_text, num_img = x.shape[0], txt.shape[1], img.shape[1]
        seq = nn.with_logical_constraint(jnp.concatenate([txt, img], axis=1),
                                         ("batch", "length", "act_embed"))
        key_mask = jnp.concatenate([text_mask, jnp.ones((b, num_img), bool)], axis=1)
        p = self.patch_size
        rope = joint_rope(num_text, x.shape[1] // p, x.shape[2] // p,
                          self.width // self.num_heads, self.rope_theta)
        text_mod = AdaLNModulation(self.width, 6, name="adaln_text", **self.kw)(cvec)
        image_mod = AdaLNModulation(self.width, 6, name="adaln_image", **self.kw)(cvec)
        fields = dict(num_text=num_text, shared_attention=self.share == "attention",
                      **self.block_options())
        attn_params = None
        if self.share == "attention":
            attn_params = self._shared_attention_params(AirBlock(**fields, parent=None))
        seq = apply_stack(AirBlock, self.depth, "block", seq, (text_mod, image_mod),
                          self._layer_offsets(), key_mask, rope, attn_params,
                          in_axes=(None, 0), scan=self.scan_layers, remat=self.remat,
                          shared=self.share == "full", **fields)
        return self.predict(seq[:, num_text:], cvec, x.shape)


def build(model_cfg, out_channels: int, moe_cfg=None) -> DiTAir:
    """DiT-Air from ``config.model`` (``moe_cfg`` unused: dense MLPs)."""
    del moe_cfg
    m = model_cfg
    return DiTAir(share=m.share, adaln_layer_offset=m.adaln_layer_offset,
                  text_hidden_ratio=m.text_hidden_ratio, **transformer_kwargs(m, out_channels))


FAMILY = Family("dit_air", build, denoiser_example_inputs, own_fields=CONFIG_FIELDS)
