"""Builds the full model (text encoder + denoiser) from a config, and the null condition
used for caption dropout and classifier-free guidance."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.kernels.dispatch import check_backend
from jaxdit.models.dit_air import DiTAir
from jaxdit.models.mmdit import MMDiT
from jaxdit.models.pixart import PixArtAlpha
from jaxdit.models.text import TextEncoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEXT_KINDS = ("trainable", "precomputed")


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def build_denoiser(model_cfg, out_channels: int) -> nn.Module:
    """Denoiser for ``model_cfg.family`` in {dit_air, pixart, mmdit}."""
    m = model_cfg
    check_backend(m.attn_impl)
    if m.width % m.num_heads:
        raise ValueError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}.")
    common = dict(depth=m.depth, width=m.width, num_heads=m.num_heads, patch_size=m.patch_size,
                  out_channels=out_channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                  sandwich=m.sandwich, attn_impl=m.attn_impl, remat=m.remat,
                  text_hidden_ratio=m.text_hidden_ratio, dtype=_dtype(m.dtype),
                  param_dtype=_dtype(m.param_dtype))
    if m.family == "dit_air":
        return DiTAir(share=m.share, adaln_layer_offset=m.adaln_layer_offset, **common)
    if m.family == "pixart":
        return PixArtAlpha(**common)
    if m.family == "mmdit":
        return MMDiT(adaln=m.adaln, pos_embed_max_size=m.pos_embed_max_size, **common)
    raise ValueError(f"Unknown model.family {m.family!r}; available: dit_air, pixart, mmdit.")


class DiffusionModel(nn.Module):
    """Text encoder (optional, trained jointly) + denoiser.

    ``__call__(x, t, cond)``: ``cond`` holds either ``text_ids``/``text_mask`` (encoded here
    by ``text_encoder``) or precomputed ``text_tokens``/``text_mask``/``text_pooled``.
    """
    denoiser: nn.Module
    text_encoder: nn.Module | None = None

    def encode_text(self, cond):
        if "text_ids" not in cond:
            return cond
        if self.text_encoder is None:
            raise ValueError("Batch has text_ids but the model has no trainable text encoder "
                             "(text.kind='precomputed' expects text_tokens/text_pooled).")
        tokens, pooled = self.text_encoder(cond["text_ids"], cond["text_mask"])
        return {"text_tokens": tokens, "text_mask": cond["text_mask"], "text_pooled": pooled}

    def __call__(self, x, t, cond):
        return self.denoiser(x, t, self.encode_text(cond))


def build_model(config) -> DiffusionModel:
    text = config.text
    if text.kind not in TEXT_KINDS:
        raise ValueError(f"Unknown text.kind {text.kind!r}; available: {TEXT_KINDS}.")
    encoder = None
    if text.kind == "trainable":
        encoder = TextEncoder(vocab_size=text.vocab_size, max_len=text.max_len, width=text.width,
                              depth=text.depth, num_heads=text.num_heads,
                              dtype=_dtype(config.model.dtype),
                              param_dtype=_dtype(config.model.param_dtype))
    return DiffusionModel(build_denoiser(config.model, config.latent.channels), encoder)


def null_condition(cond: dict[str, Any]) -> dict[str, Any]:
    """The "empty caption" with the same shapes as ``cond``: only the first (BOS) token valid,
    BOS id 1 for token ids, zero features for precomputed embeddings."""
    out = {}
    mask = jnp.zeros_like(cond["text_mask"]).at[:, 0].set(True)
    out["text_mask"] = mask
    if "text_ids" in cond:
        out["text_ids"] = jnp.zeros_like(cond["text_ids"]).at[:, 0].set(1)
    if "text_tokens" in cond:
        out["text_tokens"] = jnp.zeros_like(cond["text_tokens"])
        out["text_pooled"] = jnp.zeros_like(cond["text_pooled"])
    return out


def drop_condition(cond, keep):
    """Per-sample caption dropout: ``keep`` (B,) bool; dropped samples get the null condition."""
    null = null_condition(cond)

    def pick(a, b):
        k = keep.reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.where(k, a, b)

    return {k: pick(cond[k], null[k]) for k in null}
