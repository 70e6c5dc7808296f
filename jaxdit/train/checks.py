"""Config checks that need the device mesh and the data settings, run by
:class:`jaxdit.train.loop.Experiment` before anything is compiled: each raises a
:class:`~jaxdit.errors.ConfigError` naming the field."""
from __future__ import annotations

import jax

from jaxdit.errors import ConfigError
from jaxdit.data.pipeline import bucket_sizes
from jaxdit.diffusion.flow import pooled_grid
from jaxdit.models.dvae import fine_downsample, region_size
from jaxdit.models.registry import AUTOENCODER_FAMILIES
from jaxdit.models.vae import LATENT_KINDS
from jaxdit.parallel.mesh import batch_divisor
from jaxdit.train.adversarial import DISC_LOSSES
from jaxdit.train.draft import REWARDS
from jaxdit.train.step import OBJECTIVES


def validate_config(config, mesh) -> None:
    t = config.train
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"Unknown train.objective {t.objective!r}; available: {OBJECTIVES}.")
    family = config.model.family
    if (family in AUTOENCODER_FAMILIES) != (t.objective == "autoencoder"):
        raise ConfigError(f"train.objective='autoencoder' trains the autoencoder families "
                          f"{AUTOENCODER_FAMILIES} and only those (model.family={family!r}, "
                          f"objective {t.objective!r}).")
    if (family == "d2it") != (t.objective == "d2it"):
        raise ConfigError(f"model.family='d2it' trains with train.objective='d2it' and only "
                          f"it (model.family={family!r}, objective {t.objective!r}).")
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
    if t.objective == "autoencoder":
        check_autoencoder_losses(config.vae, config.data.image_size)
    if family == "d2it":
        if config.sampler.sde:
            raise ConfigError("D2iT samples with an ODE sampler (fresh SDE noise would break "
                              "the multi-grained structure): set sampler.sde=False.")
        if config.d2it.grain_steps < 1:
            raise ConfigError(f"d2it.grain_steps must be >= 1, got {config.d2it.grain_steps}.")
        fine = fine_downsample(config.vae.ch_mult)
        if config.latent.downsample != fine:
            raise ConfigError(f"latent.downsample={config.latent.downsample} must be the DVAE's "
                              f"fine downsampling {fine}.")
    if t.objective == "draft":
        d = config.draft
        if d.reward not in REWARDS:
            raise ConfigError(f"Unknown draft.reward {d.reward!r}; available: {REWARDS}.")
        if d.reward == "color" and config.data.source != "shapes":
            raise ConfigError("draft.reward='color' reads the target colour from the shapes "
                              "data's labels: set data.source='shapes'.")
        if not 0 <= d.grad_steps <= d.num_steps:
            raise ConfigError(f"draft.grad_steps={d.grad_steps} must be in [0, "
                              f"draft.num_steps={d.num_steps}].")
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
    check_multires_pool(config)
    if not 0.0 <= config.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got "
                          f"{config.data.caption_dropout}.")


def check_multires_pool(config) -> None:
    """Every image (each aspect bucket) must keep at least one patch after pooling."""
    pool = config.diffusion.multires_pool
    if not pool:
        return
    p, f = config.model.patch_size, config.latent.downsample
    side = config.data.image_size // (p * f)
    grids = ([(h // (p * f), w // (p * f)) for h, w in bucket_sizes(config)]
             if config.data.aspect_buckets else [(side, side)])
    small = [g for g in grids if min(pooled_grid(n, p, pool) for n in g) < 1]
    if small:
        raise ConfigError(f"diffusion.multires_pool={pool}: patch grids {small} pool to no "
                          f"whole patch of {p}; use a smaller pool factor or larger images.")


def check_autoencoder_losses(v, image_size: int) -> None:
    """The perceptual and adversarial settings of ``config.vae``."""
    if v.lpips_weight < 0 or v.disc_weight < 0:
        raise ConfigError(f"vae.lpips_weight={v.lpips_weight} and vae.disc_weight="
                          f"{v.disc_weight} must be >= 0 (0 turns the term off).")
    if v.lpips_weight > 0 and image_size < 16:
        raise ConfigError(f"LPIPS needs images of at least 16 pixels, data.image_size="
                          f"{image_size}.")
    if v.disc_weight > 0:
        if v.disc_loss not in DISC_LOSSES:
            raise ConfigError(f"Unknown vae.disc_loss {v.disc_loss!r}; available: {DISC_LOSSES}.")
        if v.disc_weight_max <= 0 or v.disc_start < 0 or v.disc_layers < 1 or v.disc_ndf < 1:
            raise ConfigError("vae.disc_weight_max must be > 0, vae.disc_start >= 0, "
                              "vae.disc_layers and vae.disc_ndf >= 1.")
        patches = image_size // 2 ** v.disc_layers - 2  # (4x4 convs, padding 1)
        if patches < 1:
            raise ConfigError(f"data.image_size={image_size} is too small for a "
                              f"{v.disc_layers}-layer discriminator: it needs at least "
                              f"{3 * 2 ** v.disc_layers} pixels; lower vae.disc_layers.")
