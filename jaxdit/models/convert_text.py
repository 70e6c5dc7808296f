"""Pretrained text encoders from Hugging Face ``transformers`` folders (``config.json`` +
``*.safetensors``) to jaxdit modules and params, read with numpy only (no torch).

``model_type`` picks the architecture (:func:`encoder_from_hf_config`):

* ``bert`` -> :class:`jaxdit.models.text.BertEncoder` (MiniLM, BERT, ...);
* ``clip_text_model`` (a ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) or ``clip``
  (a whole ``CLIPModel``: its ``text_config``) -> :class:`~jaxdit.models.text.ClipTextEncoder`;
* ``t5`` (``T5EncoderModel`` or a whole ``T5ForConditionalGeneration``: the decoder is
  ignored) -> :class:`~jaxdit.models.text.T5Encoder`;
* ``gemma`` / ``gemma2`` (``GemmaModel`` / ``Gemma2Model`` or their ``*ForCausalLM``: the
  LM head is ignored) -> :class:`~jaxdit.models.text.GemmaEncoder`.

Weights (:func:`params_from_hf`; each converter takes the state dict and the module it
is for): torch ``Linear`` ``(out, in)`` become kernels ``(in, out)``; heads stay in the
projections' ``(in, heads * head_dim)`` layout; parts a text tower does not use (CLIP's
vision tower and projections, BERT's pooler, T5's decoder, Gemma's LM head) are dropped;
every name and shape is checked against the module's and all mismatches are reported at
once.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxdit.models.convert import ConversionError, _check_and_unflatten

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

HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"Activation {name!r} is not supported; supported: "
                              f"{sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def encoder_from_hf_config(cfg: Mapping):
    """``(module class, its fields)`` of the text encoder a Hugging Face ``config.json``
    describes (see the module docstring)."""
    from jaxdit.models import text  # pylint: disable=import-outside-toplevel
    kind = cfg.get("model_type", "bert")
    if kind == "clip":
        cfg, kind = cfg["text_config"], "clip_text_model"
    if kind == "bert":
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ConversionError(f"hidden_act {cfg['hidden_act']!r} is not supported (gelu).")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("Only absolute position embeddings are supported.")
        return text.BertEncoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2), eps=cfg.get("layer_norm_eps", 1e-12))
    if kind == "clip_text_model":
        return text.ClipTextEncoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
            activation=_activation(cfg.get("hidden_act", "quick_gelu")),
            eps=cfg.get("layer_norm_eps", 1e-5))
    if kind == "t5":
        proj = cfg.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        return text.T5Encoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["d_model"], depth=cfg["num_layers"],
            num_heads=cfg["num_heads"], head_dim=cfg["d_kv"], mlp_dim=cfg["d_ff"], gated=gated,
            activation=_activation("gelu_new" if act == "gelu" else act),
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            eps=cfg.get("layer_norm_epsilon", 1e-6))
    if kind in ("gemma", "gemma2"):
        return text.GemmaEncoder, _gemma_fields(cfg, kind == "gemma2")
    raise ConversionError(f"model_type {kind!r} is not a supported text encoder (bert, clip, "
                          "clip_text_model, t5, gemma, gemma2).")


def _gemma_fields(cfg: Mapping, gemma2: bool) -> dict:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"Gemma RoPE scaling {rope} is not supported (default only).")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    return dict(
        vocab_size=cfg["vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=head_dim, mlp_dim=cfg["intermediate_size"],
        max_positions=cfg.get("max_position_embeddings", 8192),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        query_scale=float(cfg.get("query_pre_attn_scalar", head_dim) if gemma2
                          else head_dim) ** -0.5,
        softcap=float(cfg.get("attn_logit_softcapping") or 0.0) if gemma2 else 0.0,
        sandwich=gemma2,
        sliding_window=int(cfg.get("sliding_window") or 0) if gemma2 else 0,
        activation=_activation(act), eps=cfg.get("rms_norm_eps", 1e-6))


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
    :func:`encoder_from_hf_config`), checked against ``expected``."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    name = type(module).__name__
    out, left = CONVERTERS[name](sd, module)
    if left:
        raise ConversionError(f"Unexpected {name} parameters: {sorted(left)[:8]}")
    return _check_and_unflatten(out, expected)
