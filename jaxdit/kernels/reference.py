"""Reference attention in plain XLA (the numerics every other backend is tested against)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(q, k, v, key_mask=None, scale: float | None = None, segment_ids=None,
                  bias=None, causal: bool = False, softcap: float = 0.0):
    """Softmax attention with fp32 statistics; ``q`` (B, S, H, D), ``k``/``v`` (B, T, Hkv, D),
    ``key_mask`` (B, T) bool or None, ``segment_ids`` None or ``(q_ids (B, S), kv_ids (B, T))``
    int: a query attends only to keys of its own segment (packed samples); ``bias`` None or
    an additive logit bias broadcastable to ``(B, H, S, T)`` (T5's relative positions);
    ``causal``: query ``i`` attends to keys ``<= i`` (CLIP's text encoder); ``softcap`` > 0:
    scaled logits become ``softcap * tanh(logits / softcap)`` (Gemma 2). Returns
    ``(B, S, H, D)``.

    Query heads are grouped onto their KV head with a reshape (query head ``h`` uses KV head
    ``h // (H // Hkv)``), so K/V are never repeated in memory.
    """
    b, s, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"Query heads ({h}) must be a multiple of KV heads ({hkv}).")
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, s, hkv, g, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], h, s, k.shape[1]))
        logits = logits + bias.reshape(bias.shape[0], hkv, g, s, -1).astype(jnp.float32)
    allowed = None
    if key_mask is not None:
        allowed = jnp.broadcast_to(key_mask[:, None, :].astype(bool), (b, s, k.shape[1]))
    if segment_ids is not None:
        same = segment_ids[0][:, :, None] == segment_ids[1][:, None, :]
        allowed = same if allowed is None else allowed & same
    if causal:
        lower = jnp.tril(jnp.ones((s, k.shape[1]), bool))[None]
        allowed = lower if allowed is None else allowed & lower
    if allowed is not None:
        logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)
