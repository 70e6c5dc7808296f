"""Autoencoder training (``train.objective="autoencoder"``): the KL-VAE and D2iT's DVAE.

Loss per batch: ``l1_weight * |x - x^| + l2_weight * (x - x^)^2`` (means over pixels) +
``kl_weight * KL`` (mean over latent elements), from ``config.vae``. Validation reports the
reconstruction MSE, PSNR and KL of the posterior mean / samples; sample grids show each
validation image beside its reconstruction (and its grain map for the DVAE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.train.d2it import grain_image


def reconstruction_terms(out, images):
    """Per-batch means: ``l1``, ``mse`` (pixels) and ``kl`` (latent elements)."""
    diff = out["recon"].astype(jnp.float32) - images.astype(jnp.float32)
    return {"l1": jnp.abs(diff).mean(), "mse": jnp.square(diff).mean(), "kl": out["kl"].mean()}


def autoencoder_loss_fn(params, model_state, batch, rng, *, model, cfg):
    """``(loss, (metrics, model_state))`` of one reconstruction batch (``image``)."""
    out = model.apply({"params": params, **model_state}, batch["image"], sample=True,
                      rngs={"sample": rng})
    terms = reconstruction_terms(out, batch["image"])
    v = cfg.vae
    loss = v.l1_weight * terms["l1"] + v.l2_weight * terms["mse"] + v.kl_weight * terms["kl"]
    metrics = {f"recon_{k}": x for k, x in terms.items()}
    if "grain" in out:
        metrics["fine_ratio"] = out["grain"].mean()
    return loss, (metrics, model_state)


def psnr(mse):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def make_autoencoder_val_fn(model):
    """Jitted ``(variables, batch, rng) -> {"mse", "psnr", "kl", "mse_sampled"}``: MSE
    from the posterior mean and from a posterior sample, and the mean KL."""
    def val(variables, batch, rng):
        images = batch["image"]
        mean_out = model.apply(variables, images, sample=False)
        sampled = model.apply(variables, images, sample=True, rngs={"sample": rng})
        terms = reconstruction_terms(mean_out, images)
        return {"mse": terms["mse"], "psnr": psnr(terms["mse"]), "kl": terms["kl"],
                "mse_sampled": reconstruction_terms(sampled, images)["mse"]}
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
