"""Lumina-Image 2.0 weights from diffusers.

``lumina_from_diffusers``: a ``diffusers`` ``Lumina2Transformer2DModel`` state dict (the
layout of ``Alpha-VLLM/Lumina-Image-2.0`` on the Hugging Face hub, ``transformer/``) to the
params of :class:`jaxdit.models.lumina.Lumina`. Inputs are numpy arrays (e.g. from
``safetensors.numpy.load_file``), so conversion needs no torch.

Layout changes: torch ``Linear`` weights ``(out, in)`` become kernels ``(in, out)``; the
separate ``to_q``/``to_k``/``to_v`` are fused into the per-KV-group kernel
``(d, Hkv, H/Hkv + 2, D)`` of :class:`jaxdit.models.attention.QKVProjection`; diffusers has no
``norm_final`` (unused by the model), which is set to ones. The conversion checks every
name and shape against the expected tree and reports all mismatches at once.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten

BLOCK_GROUPS = {"layers": "layer", "noise_refiner": "noise_refiner",
                "context_refiner": "context_refiner"}

# diffusers name inside a block -> (jaxdit path inside the block, is a Linear weight/bias)
BLOCK_NAMES = {
    "attn.norm_q.weight": ("attn/qkv/q_norm/scale", False),
    "attn.norm_k.weight": ("attn/qkv/k_norm/scale", False),
    "attn.to_out.0.weight": ("attn/out/proj/kernel", True),
    "feed_forward.linear_1.weight": ("ffn/w1/kernel", True),
    "feed_forward.linear_2.weight": ("ffn/w2/kernel", True),
    "feed_forward.linear_3.weight": ("ffn/w3/kernel", True),
    "norm1.linear.weight": ("adaln/proj/kernel", True),
    "norm1.linear.bias": ("adaln/proj/bias", False),
    "norm1.norm.weight": ("attn_norm1/scale", False),  # modulated blocks
    "norm1.weight": ("attn_norm1/scale", False),  # context refiner
    "norm2.weight": ("attn_norm2/scale", False),
    "ffn_norm1.weight": ("ffn_norm1/scale", False),
    "ffn_norm2.weight": ("ffn_norm2/scale", False),
}
TOP_NAMES = {
    "x_embedder.weight": ("x_embed/kernel", True),
    "x_embedder.bias": ("x_embed/bias", False),
    "time_caption_embed.timestep_embedder.linear_1.weight": ("t_embed/fc1/kernel", True),
    "time_caption_embed.timestep_embedder.linear_1.bias": ("t_embed/fc1/bias", False),
    "time_caption_embed.timestep_embedder.linear_2.weight": ("t_embed/fc2/kernel", True),
    "time_caption_embed.timestep_embedder.linear_2.bias": ("t_embed/fc2/bias", False),
    "time_caption_embed.caption_embedder.0.weight": ("cap_norm/scale", False),
    "time_caption_embed.caption_embedder.1.weight": ("cap_embed/kernel", True),
    "time_caption_embed.caption_embedder.1.bias": ("cap_embed/bias", False),
    "norm_out.linear_1.weight": ("final/adaln/proj/kernel", True),
    "norm_out.linear_1.bias": ("final/adaln/proj/bias", False),
    "norm_out.linear_2.weight": ("final/proj/kernel", True),
    "norm_out.linear_2.bias": ("final/proj/bias", False),
}
QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")


def fuse_qkv(wq, wk, wv, num_heads: int, num_kv_heads: int):
    """torch ``(H*D, d)``, ``(Hkv*D, d)``, ``(Hkv*D, d)`` -> fused ``(d, Hkv, H/Hkv + 2, D)``.

    Query head ``h`` goes to group ``h // (H/Hkv)``, matching GQA's ``repeat_interleave``."""
    d = wq.shape[1]
    head_dim = wq.shape[0] // num_heads
    rep = num_heads // num_kv_heads
    q = wq.T.reshape(d, num_kv_heads, rep, head_dim)
    k = wk.T.reshape(d, num_kv_heads, 1, head_dim)
    v = wv.T.reshape(d, num_kv_heads, 1, head_dim)
    return np.concatenate([q, k, v], axis=2)


def _target_path(name: str):
    """(jaxdit path, is_linear) for a diffusers name, or None for the fused q/k/v parts."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)", name)
    if m and m.group(3) in BLOCK_NAMES:
        path, linear = BLOCK_NAMES[m.group(3)]
        return f"{BLOCK_GROUPS[m.group(1)]}_{m.group(2)}/{path}", linear
    if m and m.group(3) in QKV:
        return None
    raise ConversionError(f"Unexpected diffusers parameter {name!r}.")


def lumina_from_diffusers(state_dict: Mapping[str, np.ndarray], expected, *,
                          num_heads: int, num_kv_heads: int):
    """Converts a diffusers Lumina2 state dict to jaxdit params.

    Args:
      state_dict: name -> array (torch tensors are accepted via ``np.asarray``).
      expected: the target params tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from
        ``jax.eval_shape`` of ``Lumina.init``); fixes names, shapes and dtypes.
    Returns:
      A params tree with the structure of ``expected`` (numpy arrays).
    """
    out, blocks = {}, {}
    for name, value in state_dict.items():
        value = np.asarray(value, np.float32)
        target = _target_path(name)
        if target is None:
            prefix, _, leaf = name.partition(".attn.")
            blocks.setdefault(prefix, {})["attn." + leaf] = value
            continue
        path, linear = target
        out[path] = value.T if linear else value
    for prefix, parts in blocks.items():
        missing = [n for n in QKV if n not in parts]
        if missing:
            raise ConversionError(f"{prefix}: missing {missing}.")
        group, index = prefix.split(".")
        path = f"{BLOCK_GROUPS[group]}_{index}/attn/qkv/qkv_kernel"
        out[path] = fuse_qkv(*(parts[n] for n in QKV), num_heads, num_kv_heads)
    if "norm_final" in expected and "norm_final" not in out:
        out["norm_final"] = np.ones(expected["norm_final"].shape, np.float32)
    return check_and_unflatten(out, expected)


def lumina_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.model`` fields (and the latent channels) of a diffusers Lumina2 config."""
    if dcfg.get("ffn_dim_multiplier") not in (None, 1.0):
        raise ConversionError("ffn_dim_multiplier is not supported.")
    if dcfg.get("out_channels") not in (None, dcfg["in_channels"]):
        raise ConversionError("out_channels must equal in_channels.")
    return dict(family="lumina", width=dcfg["hidden_size"], depth=dcfg["num_layers"],
                num_heads=dcfg["num_attention_heads"], num_kv_heads=dcfg["num_kv_heads"],
                axes_dims=tuple(dcfg["axes_dim_rope"]), patch_size=dcfg["patch_size"],
                num_refiner_layers=dcfg["num_refiner_layers"], qk_norm=True,
                ffn_multiple_of=dcfg["multiple_of"], latent_channels=dcfg["in_channels"],
                text_width=dcfg["cap_feat_dim"])
