"""Converters from PyTorch state dicts to jaxdit parameter trees (Lumina-Image 2.0, DiT
and the diffusers AutoencoderKL, from their diffusers layouts; PixArt-alpha and SD3 in
:mod:`jaxdit.models.convert_baselines`).

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
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.models.stack import stack_flat_like

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


class ConversionError(ValueError):
    """The state dict does not fit the target model (names or shapes)."""


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
    return _check_and_unflatten(out, expected)


def _check_and_unflatten(out: dict, expected):
    """``out`` ("a/b/c" -> array) against the ``expected`` tree; every problem at once."""
    flat_expected = {"/".join(k): v for k, v in flatten_dict(expected).items()}
    out = stack_flat_like(out, flat_expected)  # scanned models: blocks on a layer axis
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in flat_expected.items() if k not in out]
    problems += [f"unexpected {k}" for k in out if k not in flat_expected]
    problems += [f"{k}: shape {out[k].shape} != expected {tuple(flat_expected[k].shape)}"
                 for k in out if k in flat_expected and out[k].shape != flat_expected[k].shape]
    if problems:
        raise ConversionError("State dict does not fit the model:\n  " + "\n  ".join(problems))
    converted = {tuple(k.split("/")): out[k].astype(flat_expected[k].dtype) for k in out}
    return unflatten_dict(converted)


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



# ------------------------------------------------------------------------------------------
# DiT (diffusers DiTTransformer2DModel) -> jaxdit RaceDiT with dense MLPs.
# ------------------------------------------------------------------------------------------

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


def _linear(out: dict, path: str, sd: Mapping, name: str):
    out[f"{path}/kernel"] = np.asarray(sd[f"{name}.weight"], np.float32).T
    out[f"{path}/bias"] = np.asarray(sd[f"{name}.bias"], np.float32)


def _patch_embed(out: dict, sd: Mapping, name: str, patch: int, channels: int):
    """A diffusers ``PatchEmbed`` conv ``(d, C, p, p)`` -> jaxdit's ``patch_embed/proj``
    Linear over patch features ordered ``(ph, pw, c)``."""
    w = np.asarray(sd[f"{name}.weight"], np.float32)
    out["patch_embed/proj/kernel"] = w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, -1)
    out["patch_embed/proj/bias"] = np.asarray(sd[f"{name}.bias"], np.float32)


def _output_head(out: dict, path: str, sd: Mapping, name: str, patch: int, channels: int,
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
    _patch_embed(out, sd, "pos_embed.proj", patch_size, channels)
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        pre = f"transformer_blocks.{i}"
        for name, path in DIT_BLOCK_NAMES.items():
            _linear(out, f"block_{i}/{path}", sd, f"{pre}.{name}")
        for name in [k for k in sd if k.startswith(f"{pre}.norm1.emb.")]:
            if not np.array_equal(sd[name], sd[name.replace(pre, "transformer_blocks.0", 1)]):
                raise ConversionError(f"{name} differs from block 0: jaxdit shares one "
                                      "timestep/label embedder across blocks.")
    pre = "transformer_blocks.0"
    for name, path in DIT_EMBEDDER.items():
        _linear(out, path, sd, f"{pre}.{name}")
    out["cond_embed/label_embed/embedding"] = sd[f"{pre}.norm1.emb.class_embedder.embedding_table.weight"]
    _linear(out, "final/adaln/proj", sd, "proj_out_1")
    _output_head(out, "final/proj", sd, "proj_out_2", patch_size, channels)
    return _check_and_unflatten(out, expected)


# ------------------------------------------------------------------------------------------
# KL-VAE (diffusers AutoencoderKL: Stable Diffusion's VAE) -> jaxdit KLAutoencoder.
# ------------------------------------------------------------------------------------------

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
    return _check_and_unflatten(out, expected)


def is_diffusers_vae(path: str) -> bool:
    """Whether ``path`` is a diffusers ``AutoencoderKL`` folder (config.json + weights)."""
    import json  # pylint: disable=import-outside-toplevel
    from pathlib import Path  # pylint: disable=import-outside-toplevel
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"


# ------------------------------------------------------------------------------------------
# Whole diffusers model folders (config.json + *.safetensors).
# ------------------------------------------------------------------------------------------

def dit_config_from_diffusers(dcfg: Mapping) -> dict:
    """``config.model`` fields (and the latent channels) of a diffusers DiT config."""
    return dict(family="race_dit", depth=dcfg["num_layers"],
                width=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
                num_heads=dcfg["num_attention_heads"], patch_size=dcfg["patch_size"],
                num_classes=dcfg["num_embeds_ada_norm"], qk_norm=False, sandwich=False,
                latent_channels=dcfg["in_channels"])


def read_diffusers_dir(model_dir: str) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a diffusers model folder, read with numpy only."""
    import json  # pylint: disable=import-outside-toplevel
    from pathlib import Path  # pylint: disable=import-outside-toplevel
    try:
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ConversionError("Reading diffusers weights needs `pip install safetensors`.") from e
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise ConversionError(f"{root} has no config.json (expected a diffusers model folder, "
                              "e.g. the transformer/ subfolder of a pipeline).")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"No .safetensors weights in {root}.")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return json.loads((root / "config.json").read_text()), state


DIFFUSERS_FAMILIES = ("lumina", "dit", "pixart", "sd3")


def convert_diffusers_dir(model_dir: str, family: str):
    """Converts a diffusers folder of ``family`` in :data:`DIFFUSERS_FAMILIES`: Lumina2,
    DiT (into the dense Race-DiT), PixArt-alpha and SD3 (into PixArt-alpha / MMDiT with
    ``layout="original"``, :mod:`jaxdit.models.convert_baselines`).

    Returns ``(denoiser params, model fields)``; the fields say which ``config.model``
    values (plus ``latent_channels`` and, for text models, ``text_width`` and
    ``pooled_width``) the run must use.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from jaxdit import config_lib  # pylint: disable=import-outside-toplevel
    from jaxdit.models import convert_baselines as baselines  # pylint: disable=import-outside-toplevel
    from jaxdit.models.registry import build_denoiser  # pylint: disable=import-outside-toplevel
    from jaxdit.train.state import strip_boxes  # pylint: disable=import-outside-toplevel
    configs = {"lumina": lumina_config_from_diffusers, "dit": dit_config_from_diffusers,
               "pixart": baselines.pixart_config_from_diffusers,
               "sd3": baselines.sd3_config_from_diffusers}
    if family not in configs:
        raise ConversionError(f"Unknown family {family!r}; available: {DIFFUSERS_FAMILIES}.")
    dcfg, state = read_diffusers_dir(model_dir)
    fields = configs[family](dcfg)
    if family == "dit":
        cond = {"label": jnp.zeros((1,), jnp.int32)}
    else:
        width = fields["text_width"]
        cond = {"text_tokens": jnp.zeros((1, 4, width)), "text_mask": jnp.ones((1, 4), bool),
                "text_pooled": jnp.zeros((1, fields.get("pooled_width", width)))}
    model_cfg = config_lib.base_config().model
    model_cfg.update({k: v for k, v in fields.items() if k in model_cfg})
    model = build_denoiser(model_cfg, fields["latent_channels"])
    p, channels = fields["patch_size"], fields["latent_channels"]
    x = jnp.zeros((1, 2 * p, 2 * p, channels))
    expected = strip_boxes(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(1), cond))["params"])
    if family == "lumina":
        params = lumina_from_diffusers(state, expected, num_heads=fields["num_heads"],
                                       num_kv_heads=fields["num_kv_heads"])
    else:
        convert = {"dit": dit_from_diffusers, "pixart": baselines.pixart_from_diffusers,
                   "sd3": baselines.sd3_from_diffusers}[family]
        params = convert(state, expected, patch_size=p, channels=channels)
    return params, fields
