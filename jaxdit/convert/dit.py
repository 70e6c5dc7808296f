"""DiT (diffusers ``DiTTransformer2DModel``) weights -> the dense Race-DiT
(:class:`jaxdit.models.race_dit.RaceDiT` without experts), and the patch-embedding and
output-head layouts the baselines share (:mod:`jaxdit.convert.baselines`)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten, linear


DIT_BLOCK_NAMES = {
    "norm1.linear": "adaln/proj",
    "attn1.to_q": "attn/qkv/q", "attn1.to_k": "attn/qkv/k", "attn1.to_v": "attn/qkv/v",
    "attn1.to_out.0": "attn/out/proj",
    "ff.net.0.proj": "mlp/fc1", "ff.net.2": "mlp/fc2",
}
DIT_EMBEDDER = {
    "norm1.emb.timestep_embedder.linear_1": "cond_embed/t_embed/fc1",
    "norm1.emb.timestep_embedder.linear_2": "cond_embed/t_embed/fc2",
}


def patch_embed(out: dict, sd: Mapping, name: str, patch: int, channels: int):
    """A diffusers ``PatchEmbed`` conv ``(d, C, p, p)`` -> jaxdit's ``patch_embed/proj``
    Linear over patch features ordered ``(ph, pw, c)``."""
    w = np.asarray(sd[f"{name}.weight"], np.float32)
    out["patch_embed/proj/kernel"] = w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, -1)
    out["patch_embed/proj/bias"] = np.asarray(sd[f"{name}.bias"], np.float32)


def output_head(out: dict, path: str, sd: Mapping, name: str, patch: int, channels: int,
                 sign: float = 1.0):
    """The final ``Linear(d -> p*p*C_out)``: a learned-sigma head (``C_out = 2C``) keeps the
    mean channels; ``sign=-1`` flips the prediction (v = eps - x0 -> jaxdit's x0 - eps)."""
    w, b = (np.asarray(sd[f"{name}.{k}"], np.float32) for k in ("weight", "bias"))
    out_ch = w.shape[0] // (patch * patch)
    w = w.reshape(patch, patch, out_ch, -1)[:, :, :channels].reshape(patch * patch * channels, -1)
    b = b.reshape(patch, patch, out_ch)[:, :, :channels].reshape(-1)
    out[f"{path}/kernel"], out[f"{path}/bias"] = sign * w.T, sign * b


def dit_from_diffusers(state_dict: Mapping[str, np.ndarray], expected, *, patch_size: int,
                       channels: int):
    """Converts a diffusers ``DiTTransformer2DModel`` state dict to the params of
    :class:`jaxdit.models.race_dit.RaceDiT` without experts.

    diffusers stores a copy of the timestep/label embedder in every block; jaxdit has one,
    so the copies must be equal (they are in converted DiT checkpoints). A learned-sigma
    output (``out_channels = 2 * channels``) keeps only the mean channels.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    out = {}
    patch_embed(out, sd, "pos_embed.proj", patch_size, channels)
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        pre = f"transformer_blocks.{i}"
        for name, path in DIT_BLOCK_NAMES.items():
            linear(out, f"block_{i}/{path}", sd, f"{pre}.{name}")
        for name in [k for k in sd if k.startswith(f"{pre}.norm1.emb.")]:
            if not np.array_equal(sd[name], sd[name.replace(pre, "transformer_blocks.0", 1)]):
                raise ConversionError(f"{name} differs from block 0: jaxdit shares one "
                                      "timestep/label embedder across blocks.")
    pre = "transformer_blocks.0"
    for name, path in DIT_EMBEDDER.items():
        linear(out, path, sd, f"{pre}.{name}")
    out["cond_embed/label_embed/embedding"] = sd[f"{pre}.norm1.emb.class_embedder.embedding_table.weight"]
    linear(out, "final/adaln/proj", sd, "proj_out_1")
    output_head(out, "final/proj", sd, "proj_out_2", patch_size, channels)
    return check_and_unflatten(out, expected)


def dit_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.model`` fields (and the latent channels) of a diffusers DiT config."""
    return dict(family="race_dit", depth=dcfg["num_layers"],
                width=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
                num_heads=dcfg["num_attention_heads"], patch_size=dcfg["patch_size"],
                num_classes=dcfg["num_embeds_ada_norm"], qk_norm=False, sandwich=False,
                latent_channels=dcfg["in_channels"])
