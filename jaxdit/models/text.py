"""Text encoders. The denoisers consume ``text_tokens`` (B, L, Dt), ``text_mask`` (B, L) and
``text_pooled`` (B, Dt); anything producing those plugs in.

* :class:`TextEncoder`: a small bidirectional transformer over token ids with average
  pooling, trained jointly from scratch (the tiny default).
* ``precomputed`` features: the batch already carries the three arrays (e.g. cached outputs
  of a frozen CLIP/T5/LLM); :class:`DiffusionModel` then passes them straight through.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.attention import SelfAttention
from jaxdit.models.layers import LayerNorm, Mlp

Dtype = Any


def masked_mean(x, mask):
    """Average of ``x`` (B, L, D) over valid positions of ``mask`` (B, L) -> (B, D)."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class TextEncoder(nn.Module):
    """Bidirectional pre-LN transformer: ids (B, L) int, mask (B, L) bool ->
    ``(tokens (B, L, width), pooled (B, width))`` with masked average pooling."""
    vocab_size: int
    max_len: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"Text length {ids.shape[1]} exceeds max_len {self.max_len}.")
        emb = nn.Embed(self.vocab_size, self.width, name="token_embed",
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.normal(0.02), ("vocab", "text_embed")), **kw)
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("pos", "text_embed")), (self.max_len, self.width),
            self.param_dtype)
        x = emb(ids) + pos[None, :ids.shape[1]].astype(self.dtype)
        mask = mask.astype(bool)
        for i in range(self.depth):
            attn = SelfAttention(self.num_heads, self.width // self.num_heads, qk_norm=False,
                                 name=f"attn_{i}", **kw)
            x = x + attn(LayerNorm(use_affine=True, name=f"ln_attn_{i}", **kw)(x), mask)
            x = x + Mlp(4 * self.width, name=f"mlp_{i}", **kw)(
                LayerNorm(use_affine=True, name=f"ln_mlp_{i}", **kw)(x))
        x = LayerNorm(use_affine=True, name="ln_final", **kw)(x)
        return x, masked_mean(x, mask)
