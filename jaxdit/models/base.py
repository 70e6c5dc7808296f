"""What every text-to-image denoiser and its blocks share: fields, input embedding and the
output head. Families subclass :class:`Denoiser` and write only their trunk.

Denoiser contract: ``__call__(x, t, cond)`` with latents ``x`` (B, H, W, C), ``t`` (B,) in
[0, 1] and ``cond`` holding ``text_tokens`` (B, L, Dt), ``text_mask`` (B, L) bool and
``text_pooled`` (B, Dt); returns the prediction (B, H, W, C) in fp32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.models.layers import (ConditionEmbedder, FinalLayer, PatchEmbed, TextAdapter,
                                  unpatchify)

Dtype = Any

# ``model.remat``: what a rematerialised block keeps from its forward pass for the backward.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs
    # keep the outputs of weight matmuls (QKV/out projections, MLP) and recompute the
    # cheap elementwise work and the attention scores (matmuls with batch dims)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ``model.layout`` of the DiT-Air paper's baselines (PixArt-alpha, MMDiT): the paper's
# variants, or the architectures as published (and in diffusers).
LAYOUTS = ("dit_air", "original")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown model.layout {layout!r}; available: {LAYOUTS}.")


def remat_policy_name(remat: bool | str) -> str:
    """``model.remat`` as a :data:`REMAT_POLICIES` key (True = ``"full"``, False = ``"none"``)."""
    name = {True: "full", False: "none"}[remat] if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}: use one of {sorted(REMAT_POLICIES)} or a bool.")
    return name


def remat_block(cls, remat: bool | str, prevent_cse: bool = True):
    """``cls`` wrapped in ``nn.remat`` with the policy that ``remat`` names.
    ``prevent_cse=False`` inside a scan: the loop already keeps XLA from merging the
    recomputation with the forward pass (Flax's advice for scan + remat)."""
    name = remat_policy_name(remat)
    if name == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[name], prevent_cse=prevent_cse)


class Block(nn.Module):
    """Fields shared by the transformer blocks of every family."""
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    sandwich: bool = True
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def options(self) -> dict:
        """This block's :class:`Block` fields, to build a sub-block with the same settings."""
        return dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    qk_norm=self.qk_norm, sandwich=self.sandwich, attn_impl=self.attn_impl,
                    **self.kw)


class Denoiser(nn.Module):
    """Base of the denoisers (fields, embedding of inputs, output head). Class-conditional
    families use :meth:`embed_image` and :meth:`predict` and ignore the text fields."""
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
    remat: bool | str = False
    scan_layers: bool = False  # nn.scan over each block stack (see jaxdit.models.stack)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def block_options(self) -> dict:
        """Keyword arguments for a :class:`Block` subclass."""
        return dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    qk_norm=self.qk_norm, sandwich=self.sandwich, attn_impl=self.attn_impl,
                    **self.kw)

    def block_class(self, cls):
        """``cls`` rematerialised per :data:`REMAT_POLICIES` ``[self.remat]``."""
        return remat_block(cls, self.remat)

    def image_positions(self, grid_h: int, grid_w: int):
        """Additive position embedding ``(1, grid_h*grid_w, width)`` or None (e.g. RoPE)."""
        del grid_h, grid_w
        return None

    def embed_image(self, x):
        """Latents ``(B, H, W, C)`` -> patch tokens ``(B, N, d)`` plus :meth:`image_positions`."""
        p = self.patch_size
        img = PatchEmbed(self.width, p, name="patch_embed", **self.kw)(x.astype(self.dtype))
        pos = self.image_positions(x.shape[1] // p, x.shape[2] // p)
        return img if pos is None else img + pos.astype(self.dtype)

    @property
    def uses_pooled_text(self) -> bool:
        """Whether ``c`` takes the pooled text (MMDiT style) besides the timestep."""
        return True

    def embed_inputs(self, x, t, cond):
        """Returns ``(image tokens (B, N, d), text tokens (B, L, d), key mask of the text
        (B, L) bool, condition vector c (B, d))``; ``text_hidden_ratio`` 0 projects the
        text with one Linear."""
        img = self.embed_image(x)
        txt = TextAdapter(self.width, int(self.text_hidden_ratio * self.width),
                          name="text_adapter", **self.kw)(cond["text_tokens"])
        pooled = cond["text_pooled"] if self.uses_pooled_text else None
        cvec = ConditionEmbedder(self.width, name="cond_embed", **self.kw)(t, pooled)
        return img, txt, cond["text_mask"].astype(bool), cvec

    def predict(self, img_tokens, cvec, x_shape):
        """Final layer on the image tokens, back to ``x_shape`` (B, H, W, C), fp32."""
        p = self.patch_size
        out = FinalLayer(p * p * self.out_channels, name="final", **self.kw)(img_tokens, cvec)
        return self.tokens_to_latents(out, x_shape)

    def tokens_to_latents(self, tokens, x_shape):
        """Output tokens ``(B, N, p*p*C)`` -> ``x_shape`` (B, H, W, C), fp32."""
        _, h, w, _ = x_shape
        return unpatchify(tokens, self.patch_size, h, w, self.out_channels).astype(jnp.float32)
