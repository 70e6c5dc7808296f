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

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import SelfAttention
from jaxdit.models.base import Block, Denoiser
from jaxdit.models.layers import (AdaLNModulation, LayerNorm, Mlp, RMSNorm, grid_positions,
                                  modulate, rope_tables)

Dtype = Any
SHARE_MODES = ("none", "full", "attention")


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


class AirBlock(Block):
    """One DiT-Air block over the joint sequence. ``mods`` = 6 per-token ``(B, S, d)`` arrays
    (shift/scale/gate for attention, then for the MLP). ``attn`` may be a shared module."""
    attn: nn.Module | None = None

    @nn.compact
    def __call__(self, x, mods, key_mask, rope):
        attn = self.attn or SelfAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                                          impl=self.attn_impl, name="attn", **self.kw)
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

    def _blocks(self):
        if self.share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {self.share!r}.")
        block_cls = self.block_class(AirBlock)
        if self.share == "full":
            return [block_cls(name="shared_block", **self.block_options())] * self.depth
        shared_attn = None
        if self.share == "attention":
            shared_attn = SelfAttention(self.num_heads, self.width // self.num_heads,
                                        qk_norm=self.qk_norm, impl=self.attn_impl,
                                        name="shared_attn", **self.kw)
        return [block_cls(attn=shared_attn, name=f"block_{i}", **self.block_options())
                for i in range(self.depth)]

    def _layer_offsets(self):
        if not self.adaln_layer_offset:
            return None
        return self.param("adaln_layer_offset",
                          nn.with_logical_partitioning(nn.initializers.zeros,
                                                       ("layers", None, None, "embed")),
                          (self.depth, 2, 6, self.width), self.param_dtype)

    @nn.compact
    def __call__(self, x, t, cond):
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
        offsets = self._layer_offsets()
        for i, block in enumerate(self._blocks()):
            mods = []
            for k in range(6):
                tm, im = text_mod[k], image_mod[k]
                if offsets is not None:
                    tm = tm + offsets[i, 0, k].astype(self.dtype)
                    im = im + offsets[i, 1, k].astype(self.dtype)
                mods.append(stream_select(tm, im, num_text, num_img))
            seq = block(seq, mods, key_mask, rope)
        return self.predict(seq[:, num_text:], cvec, x.shape)
