"""Config checks that need the device mesh and the data settings, run by
:func:`jaxdit.train.resolve.resolve_config` before anything is compiled: each raises a
:class:`~jaxdit.errors.ConfigError` naming the field. Each objective's own checks are in its
module (:mod:`jaxdit.train.objectives`)."""
from __future__ import annotations

import jax

from jaxdit.errors import ConfigError
from jaxdit.models.dvae import region_size
from jaxdit.models.registry import AUTOENCODER_FAMILIES
from jaxdit.models.vae import LATENT_KINDS
from jaxdit.parallel.mesh import batch_divisor
from jaxdit.train.objectives import objective_for


def validate_config(config, mesh) -> None:
    t = config.train
    objective = objective_for(config)  # known, and trains this family
    family = config.model.family
    kind = config.latent.kind
    wanted = ("identity",) if family in AUTOENCODER_FAMILIES else (
        ("dvae",) if family == "d2it" else ("identity", "kl_vae"))
    if kind not in wanted:
        raise ConfigError(f"latent.kind={kind!r} with model.family={family!r}: use one of "
                          f"{wanted} (kinds: {LATENT_KINDS}).")
    if family in ("dvae", "d2it"):
        region = region_size(config.vae.ch_mult)
        if config.data.image_size % region:
            raise ConfigError(f"data.image_size={config.data.image_size} must be a multiple of "
                              f"the DVAE region size {region} (2**(len(vae.ch_mult)-1)).")
    objective.check(config)
    div = batch_divisor(mesh)
    if t.batch_size <= 0 or t.batch_size % div:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a positive multiple of the "
                          f"{div} devices the batch is split over (mesh {dict(mesh.shape)}).")
    if t.batch_size % config.optim.grad_accum or (t.batch_size // config.optim.grad_accum) % div:
        raise ConfigError(f"train.batch_size={t.batch_size} / optim.grad_accum="
                          f"{config.optim.grad_accum} must be a multiple of {div}.")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} must divide over "
                          f"{jax.process_count()} hosts.")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}.")
    if config.data.image_size % (config.model.patch_size * config.latent.downsample):
        raise ConfigError(f"data.image_size={config.data.image_size} must be a multiple of "
                          f"model.patch_size * latent.downsample = "
                          f"{config.model.patch_size * config.latent.downsample}.")
    if config.data.aspect_buckets:
        if config.model.family != "lumina":
            raise ConfigError("data.aspect_buckets packs patches, which only model.family="
                              f"'lumina' accepts (got {config.model.family!r}).")
        if config.latent.kind != "identity" and config.data.source != "cached":
            raise ConfigError("data.aspect_buckets with a latent autoencoder trains on packed "
                              "latents cached by `jaxdit cache` (run it with the "
                              "same data.aspect_buckets settings): set data.source='cached'.")
    if not 0.0 <= config.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got "
                          f"{config.data.caption_dropout}.")
