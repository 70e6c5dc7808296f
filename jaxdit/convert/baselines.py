"""Converters for the DiT-Air paper's baselines as published, from their diffusers layouts:
PixArt-alpha (``PixArtTransformer2DModel``) and SD3's MMDiT (``SD3Transformer2DModel``),
into :class:`jaxdit.models.pixart.PixArtAlpha` / :class:`jaxdit.models.mmdit.MMDiT` with
``layout="original"``.

Conventions:

* PixArt-alpha predicts DDPM noise (plus a learned variance, whose channels are dropped):
  the converted weights are a starting point for flow-matching fine-tuning in jaxdit, not
  a jaxdit flow model as they are.
* SD3 is a rectified flow on jaxdit's path (``x_t = (1 - t) x0 + t eps``, timestep
  ``1000 t``) and predicts ``eps - x0``; jaxdit's models predict ``x0 - eps``, so the
  output layer is negated and the converted weights sample in jaxdit as they are.
* SD3's fixed sin-cos position table (a buffer in diffusers) fills MMDiT's position
  table; SD3.5's dual-attention layers are refused.

Inputs are numpy arrays (e.g. from ``safetensors.numpy.load_file``); every name and shape
is checked against the target tree and every mismatch reported at once.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten, linear
from jaxdit.convert.dit import output_head, patch_embed

ATTN = {"to_q": "q", "to_k": "k", "to_v": "v"}
SD3_TEXT_ATTN = {"add_q_proj": "q", "add_k_proj": "k", "add_v_proj": "v"}
FF = {"ff.net.0.proj": "fc1", "ff.net.2": "fc2"}


def _num_blocks(sd: Mapping) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})


def _check_all_used(sd: dict, used: set):
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ConversionError(f"Unexpected diffusers parameters: {left[:8]}")


def _swap_halves(w):
    """(scale, shift) rows of a ``Linear(d -> 2d)`` -> jaxdit's (shift, scale)."""
    half = w.shape[0] // 2
    return np.concatenate([w[half:], w[:half]])


def _take_linear(out: dict, used: set, sd: Mapping, path: str, name: str, swap: bool = False):
    """Linear ``name`` of ``sd`` -> ``path`` in ``out`` (noted in ``used``); ``swap``: its
    (scale, shift) output halves become jaxdit's (shift, scale)."""
    weight, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]
    if swap:
        weight, bias = _swap_halves(weight), _swap_halves(bias)
    linear(out, path, {f"{name}.weight": weight, f"{name}.bias": bias}, name)
    used.update({f"{name}.weight", f"{name}.bias"})


# ------------------------------------------------------------------------------------------
# PixArt-alpha
# ------------------------------------------------------------------------------------------

PIXART_TOP = {
    "adaln_single.emb.timestep_embedder.linear_1": "cond_embed/t_embed/fc1",
    "adaln_single.emb.timestep_embedder.linear_2": "cond_embed/t_embed/fc2",
    "adaln_single.emb.resolution_embedder.linear_1": "size_embed/resolution/fc1",
    "adaln_single.emb.resolution_embedder.linear_2": "size_embed/resolution/fc2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "size_embed/aspect_ratio/fc1",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "size_embed/aspect_ratio/fc2",
    "adaln_single.linear": "adaln_single/proj",
    "caption_projection.linear_1": "text_adapter/fc1",
    "caption_projection.linear_2": "text_adapter/fc2",
}


def pixart_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.model`` fields (plus ``latent_channels``, ``text_width``) of a diffusers
    ``PixArtTransformer2DModel`` config."""
    width = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    checks = {"norm_type": "ada_norm_single", "attention_bias": True,
              "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
              "cross_attention_dim": width}
    bad = {k: dcfg.get(k) for k, want in checks.items() if dcfg.get(k, want) != want}
    if bad or not dcfg.get("caption_channels"):
        raise ConversionError(f"PixArt config not supported ({bad or 'no caption_channels'}): "
                              f"jaxdit's PixArt-alpha needs {checks} and a caption projection.")
    sample, patch = dcfg["sample_size"], dcfg["patch_size"]
    sizes = dcfg.get("use_additional_conditions")
    sizes = sample == 128 if sizes is None else sizes  # diffusers' default
    interpolation = dcfg.get("interpolation_scale") or max(sample // 64, 1)
    return dict(family="pixart", layout="original", depth=dcfg["num_layers"], width=width,
                num_heads=dcfg["num_attention_heads"], patch_size=patch, qk_norm=False,
                sandwich=False, text_hidden_ratio=1.0, pos_base_size=sample // patch,
                pos_interpolation=float(interpolation),
                size_conditioning=8 if sizes else 0,  # pixels per latent cell (SD's VAE)
                latent_channels=dcfg["in_channels"], text_width=dcfg["caption_channels"])


def pixart_from_diffusers(state_dict: Mapping[str, np.ndarray], expected, *, patch_size: int,
                          channels: int):
    """A diffusers PixArt-alpha state dict -> :class:`PixArtAlpha` (``layout="original"``)
    params, checked against ``expected`` (e.g. ``jax.eval_shape`` of its init)."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    out, used = {}, set()

    def take(path, name):
        _take_linear(out, used, sd, path, name)

    patch_embed(out, sd, "pos_embed.proj", patch_size, channels)
    used.update({"pos_embed.proj.weight", "pos_embed.proj.bias"})
    for name, path in PIXART_TOP.items():
        if f"{name}.weight" in sd:
            take(path, name)
    for i in range(_num_blocks(sd)):
        pre = f"transformer_blocks.{i}"
        out[f"block_{i}/scale_shift_table"] = sd[f"{pre}.scale_shift_table"]
        used.add(f"{pre}.scale_shift_table")
        for hf, ours in {**ATTN, "to_out.0": "out/proj"}.items():
            take(f"block_{i}/attn/{'qkv/' if hf in ATTN else ''}{ours}", f"{pre}.attn1.{hf}")
            take(f"block_{i}/cross_attn/{ours}", f"{pre}.attn2.{hf}")
        for hf, ours in FF.items():
            take(f"block_{i}/mlp/{ours}", f"{pre}.{hf}")
    out["final/scale_shift_table"] = sd["scale_shift_table"]
    output_head(out, "final/proj", sd, "proj_out", patch_size, channels)
    used.update({"scale_shift_table", "proj_out.weight", "proj_out.bias"})
    _check_all_used(sd, used)
    return check_and_unflatten(out, expected)


# ------------------------------------------------------------------------------------------
# SD3 MMDiT
# ------------------------------------------------------------------------------------------

SD3_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "cond_embed/t_embed/fc1",
    "time_text_embed.timestep_embedder.linear_2": "cond_embed/t_embed/fc2",
    "time_text_embed.text_embedder.linear_1": "cond_embed/pooled_fc1",
    "time_text_embed.text_embedder.linear_2": "cond_embed/pooled_fc2",
    "context_embedder": "text_adapter/proj",
}


def sd3_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.model`` fields (plus ``latent_channels``, ``text_width``, ``pooled_width``)
    of a diffusers ``SD3Transformer2DModel`` config."""
    width = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg.get("dual_attention_layers"):
        raise ConversionError("SD3.5's dual-attention layers (attn2) are not supported.")
    if dcfg.get("qk_norm") not in (None, "rms_norm"):
        raise ConversionError(f"qk_norm={dcfg['qk_norm']!r} is not supported (None or "
                              "'rms_norm').")
    if dcfg.get("caption_projection_dim", width) != width:
        raise ConversionError("caption_projection_dim must equal the model width.")
    if dcfg.get("out_channels") not in (None, dcfg["in_channels"]):
        raise ConversionError("out_channels must equal in_channels.")
    return dict(family="mmdit", layout="original", adaln="per_layer", depth=dcfg["num_layers"],
                width=width, num_heads=dcfg["num_attention_heads"],
                patch_size=dcfg["patch_size"], qk_norm=dcfg.get("qk_norm") == "rms_norm",
                sandwich=False, text_hidden_ratio=0.0,
                pos_embed_max_size=dcfg["pos_embed_max_size"],
                latent_channels=dcfg["in_channels"], text_width=dcfg["joint_attention_dim"],
                pooled_width=dcfg["pooled_projection_dim"])


def sd3_from_diffusers(state_dict: Mapping[str, np.ndarray], expected, *, patch_size: int,
                       channels: int):
    """A diffusers SD3 state dict -> :class:`MMDiT` (``layout="original"``) params, checked
    against ``expected``; the output is negated (see the module docstring)."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    if any(".attn2." in k for k in sd):
        raise ConversionError("SD3.5's dual-attention layers (attn2) are not supported.")
    out, used = {}, set()

    def take(path, name, swap=False):
        _take_linear(out, used, sd, path, name, swap)

    patch_embed(out, sd, "pos_embed.proj", patch_size, channels)
    table = sd["pos_embed.pos_embed"][0]
    m = int(round(table.shape[0] ** 0.5))
    out["pos_embed"] = table.reshape(m, m, -1)
    used.update({"pos_embed.proj.weight", "pos_embed.proj.bias", "pos_embed.pos_embed"})
    for name, path in SD3_TOP.items():
        take(path, name)
    for i in range(_num_blocks(sd)):
        pre = f"transformer_blocks.{i}"
        take(f"block_{i}/adaln_image/proj", f"{pre}.norm1.linear")
        pre_only = f"{pre}.attn.to_add_out.weight" not in sd  # SD3's last block
        take(f"block_{i}/adaln_text/proj", f"{pre}.norm1_context.linear", swap=pre_only)
        for stream, names in (("image", ATTN), ("text", SD3_TEXT_ATTN)):
            for hf, ours in names.items():
                take(f"block_{i}/{stream}/qkv/{ours}", f"{pre}.attn.{hf}")
        for hf, ours in (("norm_q", "image/qkv/q_norm"), ("norm_k", "image/qkv/k_norm"),
                         ("norm_added_q", "text/qkv/q_norm"),
                         ("norm_added_k", "text/qkv/k_norm")):
            if f"{pre}.attn.{hf}.weight" in sd:
                out[f"block_{i}/{ours}/scale"] = sd[f"{pre}.attn.{hf}.weight"]
                used.add(f"{pre}.attn.{hf}.weight")
        take(f"block_{i}/image/out/proj", f"{pre}.attn.to_out.0")
        for hf, ours in FF.items():
            take(f"block_{i}/image/mlp/{ours}", f"{pre}.{hf}")
        if not pre_only:
            take(f"block_{i}/text/out/proj", f"{pre}.attn.to_add_out")
            for hf, ours in FF.items():
                take(f"block_{i}/text/mlp/{ours}", f"{pre}.{hf.replace('ff.', 'ff_context.')}")
    take("final/adaln/proj", "norm_out.linear", swap=True)
    output_head(out, "final/proj", sd, "proj_out", patch_size, channels, sign=-1.0)
    used.update({"proj_out.weight", "proj_out.bias"})
    _check_all_used(sd, used)
    return check_and_unflatten(out, expected)
