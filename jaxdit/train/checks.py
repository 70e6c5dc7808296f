"""Config checks that need the device mesh and the data settings, run by
:func:`jaxdit.train.resolve.resolve_config` before anything is compiled: each raises a
:class:`~jaxdit.errors.ConfigError` naming the field. Each objective's own checks are in its
module (:mod:`jaxdit.train.objectives`)."""
from __future__ import annotations

import jax

from jaxdit.errors import ConfigError
from jaxdit.models.registry import FAMILIES, family_of
from jaxdit.models.vae import LATENT_KINDS
from jaxdit.parallel.mesh import batch_divisor
from jaxdit.train.objectives import objective_for


def validate_config(config, mesh) -> None:
    t = config.train
    objective = objective_for(config)  # known, and trains this family
    family = family_of(config)
    kind = config.latent.kind
    if kind not in family.latent_kinds:
        raise ConfigError(f"latent.kind={kind!r} with model.family={family.name!r}: use one of "
                          f"{family.latent_kinds} (kinds: {LATENT_KINDS}).")
    if family.check is not None:
        family.check(config)
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
        if not family.packed_patches:
            packs = [n for n, f in FAMILIES.items() if f.packed_patches]
            raise ConfigError("data.aspect_buckets packs patches, which only "
                              f"{' or '.join(f'model.family={n!r}' for n in packs)} accepts "
                              f"(got {family.name!r}).")
        if config.latent.kind != "identity" and config.data.source != "cached":
            raise ConfigError("data.aspect_buckets with a latent autoencoder trains on packed "
                              "latents cached by `jaxdit cache` (run it with the "
                              "same data.aspect_buckets settings): set data.source='cached'.")
    if not 0.0 <= config.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got "
                          f"{config.data.caption_dropout}.")
