"""Builds the full model (text encoder + denoiser) from a config, and the null condition
used for caption dropout and classifier-free guidance."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.kernels.dispatch import check_backend
from jaxdit.models.base import remat_policy_name
from jaxdit.errors import ConfigError
from jaxdit.models import d2it, dit_air, lumina, mmdit, pixart, race_dit
from jaxdit.models.d2it import D2iT, DynamicContentTransformer, GrainTransformer
from jaxdit.models.dit_air import DiTAir
from jaxdit.models.dvae import DVAE
from jaxdit.models.lumina import Lumina
from jaxdit.models.mmdit import MMDiT
from jaxdit.models.pixart import PixArtAlpha
from jaxdit.models.moe_mlp import MoESpec
from jaxdit.models.race_dit import RaceDiT
from jaxdit.models.stack import TRANSIENT_COLLECTIONS
from jaxdit.models.pretrained_text import pretrained_text_module
from jaxdit.models.text import TextEncoder
from jaxdit.models.vae import KLAutoencoder, latent_scale_param
from jaxdit.moe import experts, routing, topk

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEXT_KINDS = ("trainable", "pretrained", "precomputed", "none")
FAMILIES = ("dit_air", "pixart", "mmdit", "race_dit", "lumina", "d2it")
# Families that are trained autoencoders (train.objective="autoencoder"), not denoisers.
AUTOENCODER_FAMILIES = ("kl_vae", "dvae")
# Families conditioned on a class label (text.kind="none").
CLASS_FAMILIES = ("race_dit", "d2it") + AUTOENCODER_FAMILIES

# config.model fields every denoiser reads; each family module adds its CONFIG_FIELDS. The
# autoencoders read config.vae (and config.dvae) and only these of config.model.
COMMON_FIELDS = ("family", "depth", "width", "num_heads", "patch_size", "mlp_ratio", "qk_norm",
                 "sandwich", "attn_impl", "remat", "scan_layers", "dtype", "param_dtype")
AUTOENCODER_FIELDS = ("family", "dtype", "param_dtype")
FAMILY_FIELDS = {
    "dit_air": COMMON_FIELDS + dit_air.CONFIG_FIELDS,
    "pixart": COMMON_FIELDS + pixart.CONFIG_FIELDS,
    "mmdit": COMMON_FIELDS + mmdit.CONFIG_FIELDS,
    "race_dit": COMMON_FIELDS + race_dit.CONFIG_FIELDS,
    "lumina": COMMON_FIELDS + lumina.CONFIG_FIELDS,
    "d2it": COMMON_FIELDS + d2it.CONFIG_FIELDS,
    "kl_vae": AUTOENCODER_FIELDS,
    "dvae": AUTOENCODER_FIELDS,
}
# Config sections only some families read.
SECTION_FAMILIES = {"moe": ("race_dit",), "d2it": ("d2it",), "dvae": ("dvae", "d2it")}


def check_set_fields(family: str, names) -> None:
    """Refuses set fields (``"model.share"``, ``"moe.k"``, ...) that ``family`` does not
    read, naming them, the families that do and the family's own model fields: a setting
    that would silently do nothing. Unknown families are left to the builders."""
    if family not in FAMILY_FIELDS:
        return
    own = FAMILY_FIELDS[family]
    for name in names:
        section, _, field = name.partition(".")
        if section == "model" and field not in own:
            users = [f for f, fields in FAMILY_FIELDS.items() if field in fields]
            raise ConfigError(
                f"model.{field}: model.family={family!r} does not use it (used by "
                f"{', '.join(users) or 'no family'}); {family}'s model fields: "
                f"{', '.join(own)}.")
        if section in SECTION_FAMILIES and family not in SECTION_FAMILIES[section]:
            raise ConfigError(f"{name}: only model.family in {SECTION_FAMILIES[section]} reads "
                              f"config.{section} (this is {family!r}).")


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def moe_spec(moe_cfg) -> MoESpec | None:
    """:class:`MoESpec` from ``config.moe`` (None when ``num_experts == 0``: dense MLPs)."""
    if moe_cfg is None or not moe_cfg.num_experts:
        return None
    fields = {f.name for f in dataclasses.fields(MoESpec)}
    spec = MoESpec(**{k: v for k, v in moe_cfg.items() if k in fields})
    routing.check_strategy(spec.routing)
    routing.check_gating(spec.gating)
    if not 1 <= spec.k <= spec.num_experts:
        raise ValueError(f"moe.k={spec.k} must be in [1, moe.num_experts={spec.num_experts}].")
    experts.resolve_impl(spec.expert_impl)
    topk.check_method(spec.topk_method)
    topk.check_bits(spec.topk_bits)
    if not 0.0 <= spec.threshold_decay < 1.0:
        raise ValueError(f"moe.threshold_decay must be in [0, 1), got {spec.threshold_decay}.")
    return spec


def build_denoiser(model_cfg, out_channels: int, moe_cfg=None) -> nn.Module:
    """Denoiser for ``model_cfg.family`` in :data:`FAMILIES`."""
    m = model_cfg
    check_backend(m.attn_impl)
    remat_policy_name(m.remat)  # validates model.remat before any tracing
    if m.width % m.num_heads:
        raise ValueError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}.")
    if m.family == "race_dit":
        if m.num_classes < 1:
            raise ValueError("model.family='race_dit' is class-conditional: set model.num_classes.")
        return RaceDiT(depth=m.depth, width=m.width, num_heads=m.num_heads,
                       num_classes=m.num_classes, patch_size=m.patch_size,
                       out_channels=out_channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                       sandwich=m.sandwich, moe=moe_spec(moe_cfg), attn_impl=m.attn_impl,
                       remat=m.remat, scan_layers=m.scan_layers,
                       dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
    common = dict(depth=m.depth, width=m.width, num_heads=m.num_heads, patch_size=m.patch_size,
                  out_channels=out_channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                  sandwich=m.sandwich, attn_impl=m.attn_impl, remat=m.remat,
                  scan_layers=m.scan_layers, text_hidden_ratio=m.text_hidden_ratio,
                  dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
    if m.family == "dit_air":
        return DiTAir(share=m.share, adaln_layer_offset=m.adaln_layer_offset, **common)
    if m.family == "pixart":
        return PixArtAlpha(layout=m.layout, pos_base_size=m.pos_base_size,
                           pos_interpolation=m.pos_interpolation,
                           size_conditioning=m.size_conditioning, **common)
    if m.family == "mmdit":
        return MMDiT(adaln=m.adaln, pos_embed_max_size=m.pos_embed_max_size, layout=m.layout,
                     **common)
    if m.family == "lumina":
        model = Lumina(num_kv_heads=m.num_kv_heads, axes_dims=tuple(m.axes_dims),
                       num_refiner_layers=m.num_refiner_layers,
                       ffn_multiple_of=m.ffn_multiple_of, **common)
        model.check()
        return model
    raise ValueError(f"Unknown model.family {m.family!r}; available: {FAMILIES}.")


class DiffusionModel(nn.Module):
    """Text encoder (optional, trained jointly) + denoiser (+ frozen latent VAE).

    ``__call__(x, t, cond)``: ``cond`` holds either ``text_ids``/``text_mask`` (encoded here
    by ``text_encoder``) or precomputed ``text_tokens``/``text_mask``/``text_pooled``; for a
    class-conditional model (``class_conditional``) only ``label`` is used.
    ``frozen_vae`` (``latent.kind='kl_vae'``): the KL-VAE whose scaled latents the denoiser
    works in; ``encode`` / ``decode`` map images ``(B, H, W, 3)`` <-> latents
    ``(B, H/f, W/f, z)`` (the optimizer leaves ``frozen_*`` weights unchanged).
    """
    denoiser: nn.Module
    text_encoder: nn.Module | None = None
    class_conditional: bool = False
    null_token_id: int = 1  # first token of the empty caption (BOS, or [CLS] for BERT)
    frozen_vae: nn.Module | None = None
    latent_shift: float = 0.0  # latents = (z - shift) * scale (a diffusers shift_factor)

    def setup(self):
        if self.frozen_vae is not None:
            self.frozen_latent_scale = latent_scale_param(self)

    def encode(self, images):
        """Shifted and scaled posterior means of the frozen VAE, no gradient."""
        z = self.frozen_vae.encode(images) - self.latent_shift
        return jax.lax.stop_gradient(z * self.frozen_latent_scale)

    def decode(self, latents):
        return self.frozen_vae.decode(latents / self.frozen_latent_scale + self.latent_shift)

    def encode_text(self, cond):
        if "text_ids" not in cond:
            return cond
        if self.text_encoder is None:
            raise ValueError("Batch has text_ids but the model has no text encoder "
                             "(text.kind='precomputed' expects text_tokens/text_pooled).")
        tokens, pooled = self.text_encoder(cond["text_ids"], cond["text_mask"])
        rest = {k: v for k, v in cond.items() if k != "text_ids"}  # e.g. packed patch ids
        return {**rest, "text_tokens": tokens, "text_pooled": pooled}

    def __call__(self, x, t, cond):
        if self.frozen_vae is not None and self.is_initializing():  # create its weights
            b, h, w, _ = x.shape
            f = self.frozen_vae.downsample
            self.frozen_vae(jnp.zeros((b, h * f, w * f, 3), jnp.float32), sample=False)
        if self.class_conditional:
            return self.denoiser(x, t, {"label": cond["label"]})
        return self.denoiser(x, t, self.encode_text(cond))


def build_autoencoder(config, family: str | None = None) -> nn.Module:
    """The autoencoder of ``config.vae``: ``family`` kl_vae or dvae (default
    ``model.family``: the trained one; D2iT's and ``latent.kind='kl_vae'``'s frozen one)."""
    v = config.vae
    kw = dict(z_channels=v.z_channels, ch=v.ch, ch_mult=tuple(v.ch_mult),
              num_res_blocks=v.num_res_blocks, attn=v.attn, dtype=_dtype(config.model.dtype),
              param_dtype=_dtype(config.model.param_dtype))
    if (family or config.model.family) == "kl_vae":
        return KLAutoencoder(quant_conv=bool(v.quant_conv), **kw)
    d = config.dvae
    if d.threshold < 0:
        raise ValueError("dvae.threshold is unset (negative): resolve it from the data "
                         "first (jaxdit.data.grains.resolve_threshold).")
    return DVAE(threshold=float(d.threshold), bins=int(d.bins), sigma=float(d.sigma), **kw)


def build_d2it(config) -> D2iT:
    """Frozen DVAE + grain transformer + content transformer (``model.family='d2it'``)."""
    m, d = config.model, config.d2it
    if m.num_classes < 1:
        raise ValueError("model.family='d2it' is class-conditional: set model.num_classes.")
    if config.latent.channels != config.vae.z_channels:
        raise ValueError(f"latent.channels={config.latent.channels} must equal the DVAE's "
                         f"vae.z_channels={config.vae.z_channels}.")
    dtypes = dict(dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
    check_backend(m.attn_impl)
    remat_policy_name(m.remat)
    content = DynamicContentTransformer(
        depth=m.depth, width=m.width, num_heads=m.num_heads, patch_size=m.patch_size,
        out_channels=config.latent.channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
        sandwich=m.sandwich, attn_impl=m.attn_impl, remat=m.remat, num_classes=m.num_classes,
        refine_depth=m.refine_depth, scan_layers=m.scan_layers, **dtypes)
    grain = GrainTransformer(depth=d.grain_depth, width=d.grain_width, num_heads=d.grain_heads,
                             num_classes=m.num_classes, attn_impl=m.attn_impl,
                             scan_layers=m.scan_layers, **dtypes)
    return D2iT(build_autoencoder(config), grain, content)


def build_model(config, null_token_id: int = 1) -> nn.Module:
    """Text encoder + denoiser for ``config``; ``null_token_id``: the tokenizer's first
    token of the empty caption (its ``null_id``; BOS 1 of the word tokenizer). Autoencoder
    families build the autoencoder and ``d2it`` its three-part model."""
    text = config.text
    family = config.model.family
    if family in CLASS_FAMILIES and text.kind != "none":
        raise ValueError(f"model.family={family!r} is not text-conditional: set text.kind='none'.")
    if family in AUTOENCODER_FAMILIES:
        return build_autoencoder(config)
    if family == "d2it":
        return build_d2it(config)
    if text.kind not in TEXT_KINDS:
        raise ValueError(f"Unknown text.kind {text.kind!r}; available: {TEXT_KINDS}.")
    encoder = None
    dtypes = dict(dtype=_dtype(config.model.dtype), param_dtype=_dtype(config.model.param_dtype))
    if text.kind == "trainable":
        encoder = TextEncoder(vocab_size=text.vocab_size, max_len=text.max_len, width=text.width,
                              depth=text.depth, num_heads=text.num_heads,
                              scan_layers=config.model.scan_layers, **dtypes)
    elif text.kind == "pretrained":
        encoder = pretrained_text_module(text, attn_impl=config.model.attn_impl,
                                         scan_layers=config.model.scan_layers, **dtypes)
    class_cond = text.kind == "none"
    if class_cond != (family in CLASS_FAMILIES):
        raise ValueError(f"model.family={family!r} needs text.kind="
                         f"{'none' if not class_cond else 'trainable, pretrained or precomputed'}.")
    denoiser = build_denoiser(config.model, config.latent.channels, config.get("moe"))
    vae = None
    # latent.kind='kl_vae' holds the VAE of config.vae (taken from latent.vae_workdir by
    # jaxdit.train.stages.configure_latent_vae); paper configs without one count the
    # denoiser and text encoder only.
    if config.latent.kind == "kl_vae" and "vae" in config:
        vae = build_autoencoder(config, "kl_vae")
        if (vae.z_channels, vae.downsample) != (config.latent.channels, config.latent.downsample):
            raise ValueError(f"latent.channels/downsample=({config.latent.channels}, "
                             f"{config.latent.downsample}) must be the VAE's "
                             f"({vae.z_channels}, {vae.downsample}).")
    return DiffusionModel(denoiser, encoder, class_conditional=class_cond,
                          null_token_id=null_token_id, frozen_vae=vae,
                          latent_shift=float(config.latent.shift))


def persistent_variables(variables):
    """Drops the per-step output collections (see :data:`TRANSIENT_COLLECTIONS`)."""
    return {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}


def condition_from_batch(batch):
    """Model condition entries of a batch (token ids or precomputed text features)."""
    keys = ("text_ids", "text_mask", "text_tokens", "text_pooled", "label", "patch_pos",
            "patch_mask")
    return {k: batch[k] for k in keys if k in batch}


def null_condition(cond: dict[str, Any], null_token_id: int = 1) -> dict[str, Any]:
    """The "empty caption" with the same shapes as ``cond``: only the first token valid,
    id ``null_token_id`` (BOS 1, or [CLS] for BERT; ``DiffusionModel.null_token_id``),
    zero features for precomputed embeddings; label -1 (null class)."""
    out = {}
    if "label" in cond:
        out["label"] = jnp.full_like(cond["label"], -1)
    if "text_mask" in cond:
        out["text_mask"] = jnp.zeros_like(cond["text_mask"]).at[:, 0].set(True)
    if "text_ids" in cond:
        out["text_ids"] = jnp.zeros_like(cond["text_ids"]).at[:, 0].set(null_token_id)
    if "text_tokens" in cond:
        out["text_tokens"] = jnp.zeros_like(cond["text_tokens"])
        out["text_pooled"] = jnp.zeros_like(cond["text_pooled"])
    return out


def drop_condition(cond, keep, null_token_id: int = 1):
    """Per-sample caption dropout: ``keep`` (B,) bool; dropped samples get the null condition."""
    null = null_condition(cond, null_token_id)

    def pick(a, b):
        k = keep.reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.where(k, a, b)

    return {k: pick(cond[k], null[k]) for k in null}
