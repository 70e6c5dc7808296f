"""The model families and the full model (text encoder + denoiser) built from a config,
and the null condition used for caption dropout and classifier-free guidance.

Every family is declared by its own module (``FAMILY``, a
:class:`~jaxdit.models.family.Family`); :data:`FAMILIES` lists them and the tables below
are derived from the declarations."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.errors import ConfigError
from jaxdit.models import d2it, dit_air, dvae, lumina, mmdit, pixart, race_dit, vae
from jaxdit.models.family import Family, dtypes
from jaxdit.models.stack import TRANSIENT_COLLECTIONS
from jaxdit.models.pretrained_text import pretrained_text_module
from jaxdit.models.text import TextEncoder
from jaxdit.models.vae import latent_scale_param

TEXT_KINDS = ("trainable", "pretrained", "precomputed", "none")
# The one list of families (adding a family: its module's FAMILY goes here).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    dit_air.FAMILY, pixart.FAMILY, mmdit.FAMILY, race_dit.FAMILY, lumina.FAMILY, d2it.FAMILY,
    vae.FAMILY, dvae.FAMILY)}
DENOISER_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.role == "denoiser")
# Families that are trained autoencoders (train.objective="autoencoder"), not denoisers.
AUTOENCODER_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.role == "autoencoder")
# Families conditioned on a class label (text.kind="none").
CLASS_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.class_conditional)
FAMILY_FIELDS = {n: f.fields for n, f in FAMILIES.items()}
# Config sections only some families read.
SECTION_FAMILIES = {section: tuple(n for n, f in FAMILIES.items() if section in f.sections)
                    for section in sorted({s for f in FAMILIES.values() for s in f.sections})}


def family_of(config_or_name) -> Family:
    """The :class:`Family` of ``model.family`` (a config or a name); ConfigError naming the
    available ones when unknown."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.model.family
    if name not in FAMILIES:
        raise ConfigError(f"Unknown model.family {name!r}; available: {tuple(FAMILIES)}.")
    return FAMILIES[name]


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


def build_denoiser(model_cfg, out_channels: int, moe_cfg=None) -> nn.Module:
    """Denoiser of ``model_cfg.family`` (one of :data:`DENOISER_FAMILIES`)."""
    family = FAMILIES.get(model_cfg.family)
    if family is None or family.role != "denoiser":
        raise ValueError(f"Unknown model.family {model_cfg.family!r} for a denoiser; "
                         f"available: {DENOISER_FAMILIES}.")
    return family.build(model_cfg, out_channels, moe_cfg)


def build_autoencoder(config, family: str | None = None) -> nn.Module:
    """The autoencoder of ``config.vae``: ``family`` kl_vae or dvae (default
    ``model.family``: the trained one; the frozen one of ``latent.kind='kl_vae'``)."""
    found = family_of(family or config)
    if found.role != "autoencoder":
        raise ValueError(f"model.family={found.name!r} is not an autoencoder; available: "
                         f"{AUTOENCODER_FAMILIES}.")
    return found.build(config)


def example_inputs(config, batch: int = 1) -> tuple:
    """Zero inputs with the right shapes for ``model.init`` (the family's own)."""
    return family_of(config).example_inputs(config, batch)


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


def build_model(config, null_token_id: int = 1) -> nn.Module:
    """Text encoder + denoiser for ``config``; ``null_token_id``: the tokenizer's first
    token of the empty caption (its ``null_id``; BOS 1 of the word tokenizer). Autoencoder
    families build the autoencoder and ``d2it`` its three-part model."""
    text = config.text
    family = family_of(config)
    if family.class_conditional and text.kind != "none":
        raise ValueError(f"model.family={family.name!r} is not text-conditional: set "
                         "text.kind='none'.")
    if family.role != "denoiser":  # the autoencoders, D2iT with its own frozen DVAE
        return family.build(config)
    if text.kind not in TEXT_KINDS:
        raise ValueError(f"Unknown text.kind {text.kind!r}; available: {TEXT_KINDS}.")
    encoder = None
    kw = dtypes(config.model)
    if text.kind == "trainable":
        encoder = TextEncoder(vocab_size=text.vocab_size, max_len=text.max_len, width=text.width,
                              depth=text.depth, num_heads=text.num_heads,
                              scan_layers=config.model.scan_layers, **kw)
    elif text.kind == "pretrained":
        encoder = pretrained_text_module(text, attn_impl=config.model.attn_impl,
                                         scan_layers=config.model.scan_layers, **kw)
    class_cond = text.kind == "none"
    if class_cond != family.class_conditional:
        raise ValueError(f"model.family={family.name!r} needs text.kind="
                         f"{'none' if not class_cond else 'trainable, pretrained or precomputed'}.")
    denoiser = family.build(config.model, config.latent.channels, config.get("moe"))
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
