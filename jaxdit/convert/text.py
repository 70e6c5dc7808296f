"""Pretrained text encoder weights from Hugging Face ``transformers`` folders
(``config.json`` + ``*.safetensors``, read with numpy only: no torch) to the params of the
modules :mod:`jaxdit.models.pretrained_text` builds.

Weights (:func:`params_from_hf`; each converter takes the state dict and the module it
is for): torch ``Linear`` ``(out, in)`` become kernels ``(in, out)``; heads stay in the
projections' ``(in, heads * head_dim)`` layout; parts a text tower does not use (CLIP's
vision tower and projections, BERT's pooler, T5's decoder, Gemma's LM head) are dropped;
every name and shape is checked against the module's and all mismatches are reported at
once. :func:`load_pretrained_text` does all of it for a ``config.text``.
"""
from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten, read_diffusers_dir
from jaxdit.models.pretrained_text import pretrained_text_module, text_encoder_dir

BERT_LAYER_NAMES = {  # HF name inside encoder.layer.{i} -> jaxdit path, with {i}
    "attention.self.query": "layer_{i}/attn/qkv/q", "attention.self.key": "layer_{i}/attn/qkv/k",
    "attention.self.value": "layer_{i}/attn/qkv/v",
    "attention.output.dense": "layer_{i}/attn/out/proj",
    "intermediate.dense": "layer_{i}/mlp/fc1", "output.dense": "layer_{i}/mlp/fc2",
}
BERT_NORMS = {
    "attention.output.LayerNorm": "layer_{i}/ln_attn",
    "output.LayerNorm": "layer_{i}/ln_mlp",
}
BERT_IGNORED = ("embeddings.position_ids", "pooler.")  # a buffer; the CLS pooler is unused

CLIP_LAYER_NAMES = {  # inside text_model.encoder.layers.{i}
    "self_attn.q_proj": "layer_{i}/attn/qkv/q", "self_attn.k_proj": "layer_{i}/attn/qkv/k",
    "self_attn.v_proj": "layer_{i}/attn/qkv/v", "self_attn.out_proj": "layer_{i}/attn/out/proj",
    "mlp.fc1": "layer_{i}/mlp/fc1", "mlp.fc2": "layer_{i}/mlp/fc2",
}
CLIP_NORMS = {"layer_norm1": "layer_{i}/ln_attn", "layer_norm2": "layer_{i}/ln_mlp"}
CLIP_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")

T5_LAYER_NAMES = {  # inside encoder.block.{i}; bias-free Linear weights
    "layer.0.SelfAttention.q": "layer_{i}/attn/qkv/q",
    "layer.0.SelfAttention.k": "layer_{i}/attn/qkv/k",
    "layer.0.SelfAttention.v": "layer_{i}/attn/qkv/v",
    "layer.0.SelfAttention.o": "layer_{i}/attn/out/proj",
    "layer.1.DenseReluDense.wi": "layer_{i}/mlp/wi",
    "layer.1.DenseReluDense.wi_0": "layer_{i}/mlp/wi_0",
    "layer.1.DenseReluDense.wi_1": "layer_{i}/mlp/wi_1",
    "layer.1.DenseReluDense.wo": "layer_{i}/mlp/wo",
}
T5_NORMS = {"layer.0.layer_norm": "layer_{i}/ln_attn", "layer.1.layer_norm": "layer_{i}/ln_mlp"}

GEMMA_LAYER_NAMES = {  # inside layers.{i}; bias-free
    "self_attn.q_proj": "layer_{i}/attn/qkv/q", "self_attn.k_proj": "layer_{i}/attn/qkv/k",
    "self_attn.v_proj": "layer_{i}/attn/qkv/v", "self_attn.o_proj": "layer_{i}/attn/out/proj",
    "mlp.gate_proj": "layer_{i}/mlp/wi_0",
    "mlp.up_proj": "layer_{i}/mlp/wi_1",
    "mlp.down_proj": "layer_{i}/mlp/wo",
}
# Gemma (Llama naming: "post_attention" is the pre-MLP norm) and Gemma 2 (sandwich norms)
GEMMA_NORMS = {
    "input_layernorm": "layer_{i}/ln_attn",
    "post_attention_layernorm": "layer_{i}/ln_mlp",
}
GEMMA2_NORMS = {
    "input_layernorm": "layer_{i}/ln_attn",
    "post_attention_layernorm": "layer_{i}/ln_attn_out",
                "pre_feedforward_layernorm": "layer_{i}/ln_mlp",
                "post_feedforward_layernorm": "layer_{i}/ln_mlp_out"}

def _layers(sd: Mapping, prefix: str) -> list[int]:
    n = prefix.count(".")
    return sorted({int(k.split(".")[n]) for k in sd if k.startswith(prefix)})


def _move(out: dict, sd: dict, layer_names: dict, norm_names: dict, pre: str, i: int,
          bias: bool, norm_bias: bool):
    for hf, ours in layer_names.items():
        if f"{pre}.{hf}.weight" not in sd:
            continue  # e.g. T5's wi vs wi_0/wi_1: the module check catches what is missing
        out[f"{ours.format(i=i)}/kernel"] = sd.pop(f"{pre}.{hf}.weight").T
        if bias:
            out[f"{ours.format(i=i)}/bias"] = sd.pop(f"{pre}.{hf}.bias")
    for hf, ours in norm_names.items():
        out[f"{ours.format(i=i)}/scale"] = sd.pop(f"{pre}.{hf}.weight")
        if norm_bias:
            out[f"{ours.format(i=i)}/bias"] = sd.pop(f"{pre}.{hf}.bias")


def bert_from_hf(sd: dict, module=None) -> tuple[dict, dict]:
    """``(flat params, unconverted leftovers)`` of a BERT state dict."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(BERT_IGNORED)}
    out = {}
    for hf, ours in (("word_embeddings", "word_embed"), ("position_embeddings", "pos_embed"),
                     ("token_type_embeddings", "type_embed")):
        out[f"{ours}/embedding"] = sd.pop(f"embeddings.{hf}.weight")
    out["emb_norm/scale"] = sd.pop("embeddings.LayerNorm.weight")
    out["emb_norm/bias"] = sd.pop("embeddings.LayerNorm.bias")
    for i in _layers(sd, "encoder.layer."):
        _move(out, sd, BERT_LAYER_NAMES, BERT_NORMS, f"encoder.layer.{i}", i, True, True)
    return out, sd


def clip_from_hf(sd: dict, module=None) -> tuple[dict, dict]:
    """``(flat params, unconverted leftovers)`` of a CLIP state dict."""
    # transformers 4 prefixes the tower with "text_model." (5 does not in CLIPTextModel)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()
          if not k.startswith(CLIP_IGNORED) and not k.endswith("position_ids")}
    out = {"token_embed/embedding": sd.pop("embeddings.token_embedding.weight"),
           "pos_embed/embedding": sd.pop("embeddings.position_embedding.weight"),
           "final_norm/scale": sd.pop("final_layer_norm.weight"),
           "final_norm/bias": sd.pop("final_layer_norm.bias")}
    for i in _layers(sd, "encoder.layers."):
        _move(out, sd, CLIP_LAYER_NAMES, CLIP_NORMS, f"encoder.layers.{i}", i, True, True)
    return out, sd


def t5_from_hf(sd: dict, module=None) -> tuple[dict, dict]:
    """``(flat params, unconverted leftovers)`` of a T5 state dict."""
    embed = sd.pop("shared.weight", None)
    embed = sd.get("encoder.embed_tokens.weight", embed)  # tied to shared when both exist
    sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    sd.pop("embed_tokens.weight", None)
    if embed is None:
        raise ConversionError("T5 weights without shared.weight / encoder.embed_tokens.weight.")
    rel = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    out = {"token_embed/embedding": embed, "rel_bias": sd.pop(rel),
           "final_norm/scale": sd.pop("final_layer_norm.weight")}
    for i in _layers(sd, "block."):
        _move(out, sd, T5_LAYER_NAMES, T5_NORMS, f"block.{i}", i, False, False)
    return out, sd


def half_split_to_interleaved(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """Permutes the output columns of a q/k kernel ``(in, heads * head_dim)`` from the
    half-split RoPE layout (channel ``i`` pairs with ``i + D/2``) to interleaved pairs
    (``2i`` with ``2i + 1``); q and k permuted alike leave every score unchanged."""
    half = head_dim // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)
    k = kernel.reshape(kernel.shape[0], -1, head_dim)[:, :, order]
    return k.reshape(kernel.shape)


def gemma_from_hf(sd: dict, module) -> tuple[dict, dict]:
    """``(flat params, unconverted leftovers)`` of a Gemma / Gemma 2 state dict (``module``:
    the :class:`~jaxdit.models.text.GemmaEncoder` it is for: head dim, norm layout)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("lm_head.")}
    norms = GEMMA2_NORMS if module.sandwich else GEMMA_NORMS
    out = {"token_embed/embedding": sd.pop("embed_tokens.weight"),
           "final_norm/scale": 1.0 + sd.pop("norm.weight")}
    for i in _layers(sd, "layers."):
        _move(out, sd, GEMMA_LAYER_NAMES, norms, f"layers.{i}", i, False, False)
        for name in norms.values():  # Gemma's RMSNorm multiplies by 1 + w
            out[f"{name.format(i=i)}/scale"] = 1.0 + out[f"{name.format(i=i)}/scale"]
        for proj in ("q", "k"):
            key = f"layer_{i}/attn/qkv/{proj}/kernel"
            out[key] = half_split_to_interleaved(out[key], module.head_dim)
    return out, sd


CONVERTERS = {"BertEncoder": bert_from_hf, "ClipTextEncoder": clip_from_hf,
              "T5Encoder": t5_from_hf, "GemmaEncoder": gemma_from_hf}


def params_from_hf(module, state_dict: Mapping[str, np.ndarray], expected):
    """A Hugging Face state dict to the params of ``module`` (an encoder built from
    :func:`jaxdit.models.pretrained_text.encoder_from_hf_config`), checked against ``expected``."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    name = type(module).__name__
    out, left = CONVERTERS[name](sd, module)
    if left:
        raise ConversionError(f"Unexpected {name} parameters: {sorted(left)[:8]}")
    return check_and_unflatten(out, expected)


def load_pretrained_text(text_cfg, expected=None, scan_layers: bool = False):
    """The frozen encoder's params for ``text_cfg``, converted from the folder's weights
    and checked against ``expected`` (a tree of arrays or shapes; default: the module's,
    its layers stacked for a scan when ``scan_layers``)."""
    module = pretrained_text_module(text_cfg, scan_layers=scan_layers).frozen_encoder
    if expected is None:
        ids = jnp.zeros((1, 2), jnp.int32)
        expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                           ids, jnp.ones((1, 2), bool))["params"])
    _, state = read_diffusers_dir(str(text_encoder_dir(text_cfg.path)))
    return params_from_hf(module, state, expected)


def with_pretrained_text(params, encoder_params):
    """``params`` (an unboxed model param tree, possibly sharded) with the text encoder's
    ``frozen_encoder`` replaced by ``encoder_params``, each leaf placed like the leaf it
    replaces."""
    params = dict(params)
    text = dict(params["text_encoder"])
    text["frozen_encoder"] = jax.tree.map(
        lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
        text["frozen_encoder"], encoder_params)
    params["text_encoder"] = text
    return params
