"""The diffusers ``AutoencoderKL`` (Stable Diffusion's VAE) -> jaxdit's
:class:`jaxdit.models.vae.KLAutoencoder`: its config fields and its weights."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten


VAE_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
                  # the attention names of older diffusers checkpoints
                  "query": "q", "key": "k", "value": "v", "proj_attn": "out"}
VAE_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "skip"}


def kl_vae_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.vae`` fields plus the latent ``scale`` and ``shift`` of a diffusers
    ``AutoencoderKL`` config (Stable Diffusion's: quant convs, no shift; FLUX's: 16
    channels, no quant convs, ``shift_factor``)."""
    chans = list(dcfg["block_out_channels"])
    checks = {"in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "act_fn": "silu",
              "mid_block_add_attention": True,
              "use_post_quant_conv": dcfg.get("use_quant_conv", True)}
    bad = {k: dcfg[k] for k, want in checks.items() if dcfg.get(k, want) != want}
    if bad or any(c % chans[0] for c in chans):
        raise ConversionError(f"AutoencoderKL config not supported ({bad or chans}): jaxdit's "
                              f"KLAutoencoder needs {checks} and channel multiples of the first.")
    return dict(z_channels=dcfg["latent_channels"], ch=chans[0],
                ch_mult=tuple(c // chans[0] for c in chans),
                num_res_blocks=dcfg["layers_per_block"],
                quant_conv=bool(dcfg.get("use_quant_conv", True)),
                scale=float(dcfg.get("scaling_factor", 0.18215)),
                shift=float(dcfg.get("shift_factor") or 0.0))


def _conv(out: dict, path: str, sd: dict, name: str):
    w = sd.pop(f"{name}.weight")
    w = w[:, :, None, None] if w.ndim == 2 else w  # Linear (attention) = 1x1 conv
    out[f"{path}/kernel"] = w.transpose(2, 3, 1, 0)
    out[f"{path}/bias"] = sd.pop(f"{name}.bias")


def _norm(out: dict, path: str, sd: dict, name: str):
    out[f"{path}/scale"] = sd.pop(f"{name}.weight")
    out[f"{path}/bias"] = sd.pop(f"{name}.bias")


def _vae_block(out: dict, path: str, sd: dict, name: str, names: Mapping):
    for hf, ours in names.items():
        if f"{name}.{hf}.weight" in sd:
            (_norm if "norm" in hf else _conv)(out, f"{path}/{ours}", sd, f"{name}.{hf}")


def kl_vae_from_diffusers(state_dict: Mapping[str, np.ndarray], expected):
    """A diffusers ``AutoencoderKL`` state dict to :class:`jaxdit.models.vae.KLAutoencoder`
    params (``quant_conv=True`` when the VAE has them), checked against ``expected``."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    out = {}
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
    for part, dest in (("encoder", "head"), ("decoder", "decoder")):
        for j in range(2):
            _vae_block(out, f"{dest}/mid_res{j + 1}", sd, f"{part}.mid_block.resnets.{j}",
                       VAE_RES_NAMES)
        _vae_block(out, f"{dest}/mid_attn", sd, f"{part}.mid_block.attentions.0",
                   VAE_ATTN_NAMES)
        _norm(out, f"{dest}/norm_out", sd, f"{part}.conv_norm_out")
        _conv(out, f"{dest}/conv_out", sd, f"{part}.conv_out")
        _conv(out, f"{part}/conv_in", sd, f"{part}.conv_in")
    for i in range(levels):
        for name in sorted({k.split(".")[4] for k in sd
                            if k.startswith(f"encoder.down_blocks.{i}.resnets.")}):
            _vae_block(out, f"encoder/level{i}_res{name}", sd,
                       f"encoder.down_blocks.{i}.resnets.{name}", VAE_RES_NAMES)
        if f"encoder.down_blocks.{i}.downsamplers.0.conv.weight" in sd:
            _conv(out, f"encoder/level{i}_down", sd, f"encoder.down_blocks.{i}.downsamplers.0.conv")
        up = levels - 1 - i  # diffusers walks the decoder from the deepest level
        for name in sorted({k.split(".")[4] for k in sd
                            if k.startswith(f"decoder.up_blocks.{up}.resnets.")}):
            _vae_block(out, f"decoder/level{i}_res{name}", sd,
                       f"decoder.up_blocks.{up}.resnets.{name}", VAE_RES_NAMES)
        if f"decoder.up_blocks.{up}.upsamplers.0.conv.weight" in sd:
            _conv(out, f"decoder/level{i}_up", sd, f"decoder.up_blocks.{up}.upsamplers.0.conv")
    if "quant_conv.weight" in sd:
        _conv(out, "head/quant_conv", sd, "quant_conv")
        _conv(out, "decoder/post_quant_conv", sd, "post_quant_conv")
    if sd:
        raise ConversionError(f"Unexpected AutoencoderKL parameters: {sorted(sd)[:8]}")
    return check_and_unflatten(out, expected)
