"""Lumina-Image 2.0: Unified Next-DiT (arXiv 2503.21758), following the official code
(``Alpha-VLLM/Lumina-Image-2.0`` ``models/model.py``; spec in
``docs/lumina_d2it_spec.md`` part 1).

Data flow, for latents ``x`` (B, H, W, C), text features ``text_tokens`` (B, L, Dt) with
``text_mask`` (B, L):

1. ``t_emb`` = timestep MLP of the *Lumina* time ``1 - t`` (width ``min(d, 1024)``, the
   sinusoid of t itself, not 1000 t); it is the only AdaLN input (no pooled text).
2. caption embedder ``Linear(RMSNorm(text))``; **context refiner**: ``num_refiner_layers``
   unmodulated blocks over the text alone.
3. patch embedding; **noise refiner**: ``num_refiner_layers`` modulated blocks over the image
   tokens alone.
4. ``depth`` joint blocks over ``[text | image]`` with a key-padding mask.
5. final layer (LayerNorm, scale-only modulation, zero-init linear), unpatchify.

Blocks: sandwich RMSNorm (before and after each sub-layer), scale-only AdaLN with tanh gates
(zero-init, so modulated blocks start as the identity), fused QKV with per-head QK RMSNorm,
GQA (query heads grouped onto their KV head, K/V never repeated), SwiGLU FFN with hidden
``4d`` rounded up to 256.

Positions: 3-axis M-RoPE. Text token ``j`` is at ``(j, 0, 0)``; image token ``(r, c)`` at
``(cap_len, r, c)``; padding at ``(0, 0, 0)``. Each head's channels are split into
``axes_dims`` blocks of interleaved pairs, one block per axis. The official code compacts
each sample to ``[valid text | image | pad]``; attention with explicit position ids and a
key mask is permutation-equivariant, so the static layout ``[padded text | image]`` used
here gives the same outputs on valid tokens.

Conventions: jaxdit's ``t`` is 0 at data and 1 at noise and the network predicts
``x0 - eps`` (:mod:`jaxdit.diffusion.flow`). Lumina's time is ``1 - t`` and its velocity
``data - noise`` is the same target, so official/diffusers weights drop in unchanged
(:mod:`jaxdit.convert.lumina`).

Variable resolution: besides ``(B, H, W, C)`` latents, the model accepts *packed* patch
sequences ``(B, N, p*p*C)`` with ``cond["patch_pos"]`` (B, N, 2) int (row, col) and
``cond["patch_mask"]`` (B, N) bool, so images of different aspect ratios share one batch
and one compiled step (see :mod:`jaxdit.data.buckets`).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import SelfAttention
from jaxdit.models.family import Family, denoiser_example_inputs, transformer_kwargs
from jaxdit.models.base import Block, Denoiser
from jaxdit.models.layers import (AdaLNModulation, FinalLayer, RMSNorm, SwiGLU,
                                  TimestepEmbedder, dense, grid_positions, patchify,
                                  rope_tables, unpatchify)
from jaxdit.models.stack import apply_stack

# config.model fields this family reads beyond family.COMMON_FIELDS.
CONFIG_FIELDS = ("num_kv_heads", "axes_dims", "num_refiner_layers", "ffn_multiple_of",
                 "text_hidden_ratio")


def mrope_positions(text_mask, image_pos, image_mask=None):
    """3-axis position ids of the text and image tokens.

    Args:
      text_mask: (B, L) bool, valid text tokens (any padding pattern).
      image_pos: (B, N, 2) or (N, 2) int (row, col) of each image token.
      image_mask: (B, N) bool or None (all valid).
    Returns:
      ``(text_ids (B, L, 3), image_ids (B, N, 3))`` int32: text token ``j`` -> (j, 0, 0),
      image token -> (cap_len, row, col), padding -> (0, 0, 0).
    """
    text_mask = text_mask.astype(bool)
    b = text_mask.shape[0]
    index = jnp.cumsum(text_mask, axis=1) - 1
    text_idx = jnp.where(text_mask, index, 0).astype(jnp.int32)
    zero = jnp.zeros_like(text_idx)
    text_ids = jnp.stack([text_idx, zero, zero], axis=-1)
    cap_len = text_mask.sum(axis=1).astype(jnp.int32)
    image_pos = jnp.broadcast_to(image_pos, (b,) + image_pos.shape[-2:]).astype(jnp.int32)
    first = jnp.broadcast_to(cap_len[:, None, None], image_pos.shape[:2] + (1,))
    image_ids = jnp.concatenate([first, image_pos], axis=-1)
    if image_mask is not None:
        image_ids = jnp.where(image_mask[..., None], image_ids, 0)
    return text_ids, image_ids


class LuminaBlock(Block):
    """``JointTransformerBlock``: sandwich-normed attention and SwiGLU, modulated by ``temb``
    (B, Dc) when ``modulation`` (scale-only, tanh gates), plain residuals otherwise.

    ``x`` (B, S, d), ``key_mask`` (B, S) bool or None, ``rope`` = (cos, sin) (B, S, D/2).
    """
    num_kv_heads: int = 0
    ffn_hidden: int = 0
    modulation: bool = True
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, key_mask, rope, temb=None):
        def norm(name):
            return RMSNorm(eps=self.norm_eps, name=name, **self.kw)

        attn = SelfAttention(self.num_heads, self.head_dim, self.num_kv_heads or None,
                             qk_norm=self.qk_norm, use_bias=False, fused=True,
                             norm_eps=self.norm_eps, impl=self.attn_impl, name="attn", **self.kw)
        ffn = SwiGLU(self.ffn_hidden, name="ffn", **self.kw)
        if self.modulation:
            scale_attn, gate_attn, scale_ffn, gate_ffn = AdaLNModulation(
                self.width, 4, name="adaln", **self.kw)(temb)
            h = attn(norm("attn_norm1")(x) * (1 + scale_attn), key_mask, rope)
            x = x + jnp.tanh(gate_attn) * norm("attn_norm2")(h)
            h = ffn(norm("ffn_norm1")(x) * (1 + scale_ffn))
            x = x + jnp.tanh(gate_ffn) * norm("ffn_norm2")(h)
        else:
            x = x + norm("attn_norm2")(attn(norm("attn_norm1")(x), key_mask, rope))
            x = x + norm("ffn_norm2")(ffn(norm("ffn_norm1")(x)))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class Lumina(Denoiser):
    """Unified Next-DiT denoiser (contract in :mod:`jaxdit.models.base`, plus packed patches)."""
    num_kv_heads: int = 0  # 0: same as num_heads (no GQA)
    axes_dims: Sequence[int] = (16, 24, 24)
    rope_theta: float = 10000.0
    num_refiner_layers: int = 2
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5

    @property
    def temb_dim(self) -> int:
        return min(self.width, 1024)

    def check(self):
        head_dim = self.width // self.num_heads
        if sum(self.axes_dims) != head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims={tuple(self.axes_dims)} must be even and sum to the "
                             f"head dim {head_dim} (width {self.width} / {self.num_heads} heads).")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}.")

    def blocks(self, prefix: str, n: int, modulation: bool, x, *args):
        """``x`` through ``n`` :class:`LuminaBlock` s named ``{prefix}_*`` (see
        :func:`~jaxdit.models.stack.apply_stack`)."""
        return apply_stack(LuminaBlock, n, prefix, x, *args, scan=self.scan_layers,
                           remat=self.remat, num_kv_heads=self.num_kv_heads,
                           ffn_hidden=SwiGLU.hidden_dim(self.width, self.ffn_multiple_of),
                           modulation=modulation, norm_eps=self.norm_eps,
                           **self.block_options())

    def image_tokens(self, x, cond):
        """Patch features ``(B, N, p*p*C)``, their (row, col) ids and mask (None = all valid)."""
        if x.ndim == 3:
            if "patch_pos" not in cond or "patch_mask" not in cond:
                raise ValueError("Packed latents (B, N, p*p*C) need cond['patch_pos'] and "
                                 "cond['patch_mask'].")
            return x, cond["patch_pos"], cond["patch_mask"].astype(bool)
        p = self.patch_size
        return patchify(x, p), grid_positions(x.shape[1] // p, x.shape[2] // p), None

    @nn.compact
    def __call__(self, x, t, cond):
        self.check()
        kw = self.kw
        patches, pos, image_mask = self.image_tokens(x, cond)
        text_mask = cond["text_mask"].astype(bool)
        temb = TimestepEmbedder(self.temb_dim, time_scale=1.0, name="t_embed", **kw)(1.0 - t)
        cap = RMSNorm(eps=self.norm_eps, name="cap_norm", **kw)(cond["text_tokens"])
        cap = dense(self.width, ("text_embed", "embed"), name="cap_embed",
                    init=nn.initializers.truncated_normal(0.02), **kw)(cap)
        img = dense(self.width, ("patch", "embed"), name="x_embed", **kw)(
            patches.astype(self.dtype))
        text_ids, image_ids = mrope_positions(text_mask, pos, image_mask)
        rope_text = rope_tables(text_ids, self.axes_dims, self.rope_theta)
        rope_image = rope_tables(image_ids, self.axes_dims, self.rope_theta)
        cap = self.blocks("context_refiner", self.num_refiner_layers, False, cap, text_mask,
                          rope_text)
        img = self.blocks("noise_refiner", self.num_refiner_layers, True, img, image_mask,
                          rope_image, temb)

        num_text = cap.shape[1]
        seq = nn.with_logical_constraint(jnp.concatenate([cap, img], axis=1),
                                         ("batch", "length", "act_embed"))
        valid_image = jnp.ones(img.shape[:2], bool) if image_mask is None else image_mask
        key_mask = jnp.concatenate([text_mask, valid_image], axis=1)
        rope = tuple(jnp.concatenate(pair, axis=1) for pair in zip(rope_text, rope_image))
        seq = self.blocks("layer", self.depth, True, seq, key_mask, rope, temb)
        # Unused by the forward pass, as in the official model; kept so official checkpoints
        # load strictly and the parameter count matches (2,609,771,456 for 2B).
        self.param("norm_final", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   (self.width,), self.param_dtype)
        p, c = self.patch_size, self.out_channels
        out = FinalLayer(p * p * c, use_shift=False, name="final", **kw)(seq[:, num_text:], temb)
        out = out.astype(jnp.float32)
        if x.ndim == 3:
            return out
        return unpatchify(out, p, x.shape[1], x.shape[2], c)


def build(model_cfg, out_channels: int, moe_cfg=None) -> Lumina:
    """Lumina's Unified Next-DiT from ``config.model``, checked (:meth:`Lumina.check`)."""
    del moe_cfg
    m = model_cfg
    model = Lumina(num_kv_heads=m.num_kv_heads, axes_dims=tuple(m.axes_dims),
                   num_refiner_layers=m.num_refiner_layers, ffn_multiple_of=m.ffn_multiple_of,
                   text_hidden_ratio=m.text_hidden_ratio, **transformer_kwargs(m, out_channels))
    model.check()
    return model


FAMILY = Family("lumina", build, denoiser_example_inputs, own_fields=CONFIG_FIELDS,
                packed_patches=True)
