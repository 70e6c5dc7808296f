"""Autoencoder training (``train.objective="autoencoder"``): the KL-VAE and D2iT's DVAE.

Loss per batch: ``l1_weight * |x - x^| + l2_weight * (x - x^)^2`` (means over pixels) +
``lpips_weight * LPIPS(x, x^)`` + ``kl_weight * KL`` (mean over latent elements), from
``config.vae``, plus, with ``disc_weight > 0``, the PatchGAN terms
(:mod:`jaxdit.train.adversarial`). Validation reports the
reconstruction MSE, PSNR and KL of the posterior mean / samples; sample grids show each
validation image beside its reconstruction (and its grain map for the DVAE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.errors import ConfigError
from jaxdit.models.lpips import LPIPS
from jaxdit.train.adversarial import (DISC_LOSSES, LPIPS_KEY, adversarial_terms,
                                      autoencoder_params, reconstruct_with_last_layer,
                                      uses_discriminator, uses_lpips)
from jaxdit.train.d2it import grain_image


def reconstruction_terms(out, images):
    """Per-batch means: ``l1``, ``mse`` (pixels) and ``kl`` (latent elements)."""
    diff = out["recon"].astype(jnp.float32) - images.astype(jnp.float32)
    return {"l1": jnp.abs(diff).mean(), "mse": jnp.square(diff).mean(), "kl": out["kl"].mean()}


def reconstruction_loss_fn(params, images, vae_cfg):
    """``recon -> (scalar, metrics)``: ``l1_weight * L1 + l2_weight * MSE`` (+
    ``lpips_weight * LPIPS`` with the frozen ``frozen_lpips`` weights); metrics
    ``recon_l1``, ``recon_mse`` (+ ``lpips``)."""
    lpips_params = (jax.lax.stop_gradient(params[LPIPS_KEY]) if uses_lpips(vae_cfg) else None)

    def rec_loss(recon):
        diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
        metrics = {"recon_l1": jnp.abs(diff).mean(), "recon_mse": jnp.square(diff).mean()}
        loss = vae_cfg.l1_weight * metrics["recon_l1"] + vae_cfg.l2_weight * metrics["recon_mse"]
        if lpips_params is not None:
            metrics["lpips"] = LPIPS().apply({"params": lpips_params}, images, recon).mean()
            loss = loss + vae_cfg.lpips_weight * metrics["lpips"]
        return loss, metrics
    return rec_loss


def autoencoder_loss_fn(params, model_state, batch, rng, *, model, cfg, step):
    """``(loss, (metrics, model_state))`` of one reconstruction batch (``image``): the
    reconstruction loss + ``kl_weight * KL``, and with ``vae.disc_weight > 0`` the GAN terms
    of :func:`jaxdit.train.adversarial.adversarial_terms` (from step ``vae.disc_start``)."""
    v, images = cfg.vae, batch["image"]
    vae_params = autoencoder_params(params)
    rec_fn = reconstruction_loss_fn(params, images, v)

    def apply(p):
        return model.apply({"params": p, **model_state}, images, sample=True,
                           rngs={"sample": rng})
    if uses_discriminator(v):  # the adversarial weight needs d(rec loss)/d(recon)
        recon, out, last_layer_vjp = reconstruct_with_last_layer(apply, vae_params)
        loss, rec_vjp, metrics = jax.vjp(rec_fn, recon, has_aux=True)
        adv, adv_metrics = adversarial_terms(params, images, recon,
                                             rec_vjp(jnp.ones((), jnp.float32))[0],
                                             last_layer_vjp, step, v)
        loss, metrics = loss + adv, {**metrics, **adv_metrics}
    else:
        out = apply(vae_params)
        loss, metrics = rec_fn(out["recon"])
    metrics["recon_kl"] = out["kl"].mean()
    loss = loss + v.kl_weight * metrics["recon_kl"]
    if "grain" in out:
        metrics["fine_ratio"] = out["grain"].mean()
    return loss, (metrics, model_state)


def psnr(mse):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def gradient_magnitude(images):
    """Mean absolute difference of horizontally and vertically adjacent pixels of
    ``(B, H, W, C)`` images: a sharpness measure (blur lowers it)."""
    x = images.astype(jnp.float32)
    return (jnp.abs(x[:, 1:] - x[:, :-1]).mean() + jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean())


def make_autoencoder_val_fn(model):
    """Jitted ``(variables, batch, rng) -> {"mse", "psnr", "kl", "mse_sampled",
    "sharpness"}``: MSE from the posterior mean and from a posterior sample, the mean KL,
    and the reconstructions' :func:`gradient_magnitude` over the originals' (1 = as sharp,
    below 1 = blurrier)."""
    def val(variables, batch, rng):
        images = batch["image"]
        mean_out = model.apply(variables, images, sample=False)
        sampled = model.apply(variables, images, sample=True, rngs={"sample": rng})
        terms = reconstruction_terms(mean_out, images)
        sharp = gradient_magnitude(jnp.clip(mean_out["recon"], -1, 1)) / jnp.maximum(
            gradient_magnitude(images), 1e-8)
        return {"mse": terms["mse"], "psnr": psnr(terms["mse"]), "kl": terms["kl"],
                "mse_sampled": reconstruction_terms(sampled, images)["mse"],
                "sharpness": sharp}
    return jax.jit(val)


def make_reconstruction_fn(model):
    """Jitted ``(variables, {"image"}, rng) -> (B, S, 2S or 3S, 3)``: image | recon
    (| grain map for the DVAE)."""
    def recon(variables, cond, rng):
        del rng
        images = cond["image"]
        out = model.apply(variables, images, sample=False)
        parts = [images, jnp.clip(out["recon"], -1.0, 1.0)]
        if "grain" in out:
            parts.append(grain_image(out["grain"], images.shape[1]))
        return jnp.concatenate(parts, axis=2)
    return jax.jit(recon)


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


def check_autoencoder_config(config) -> None:
    """The autoencoder objective's loss settings (raises :class:`ConfigError`)."""
    check_autoencoder_losses(config.vae, config.data.image_size)
