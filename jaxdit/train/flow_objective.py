"""The flow-matching objective (``train.objective='flow'``): rectified-flow velocity loss
on the autoencoder's latents with caption dropout, Lumina's multi-resolution branch,
Race-DiT's per-layer regularisation (PLR) and the models' sown auxiliary losses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.data.pipeline import bucket_sizes
from jaxdit.diffusion import flow
from jaxdit.diffusion.flow import pooled_grid
from jaxdit.errors import ConfigError
from jaxdit.models.layers import patchify
from jaxdit.models.registry import (TRANSIENT_COLLECTIONS, condition_from_batch, drop_condition,
                                    persistent_variables)
from jaxdit.moe.metrics import summarize as summarize_moe

# Collections written during a training forward pass: running state plus per-step outputs.
MUTABLE = ("moe_state",) + TRANSIENT_COLLECTIONS


def deep_supervision_loss(preds, target, patch_size: int):
    """Per-layer regularisation (Race-DiT PLR): mean over layers of the MSE between each
    layer's target-head prediction (B, N, p*p*C) and the patchified target (B, H, W, C)."""
    tokens = patchify(target.astype(jnp.float32), patch_size)
    errs = [jnp.mean(jnp.square(p - tokens)) for p in jax.tree.leaves(preds)]
    return sum(errs) / len(errs)


def train_shift(cfg, x0) -> float:
    """Time shift for latents ``x0``: ``diffusion.shift``, or Lumina's resolution-dependent
    shift from the image token count when ``diffusion.resolution_shift``."""
    if not cfg.diffusion.resolution_shift:
        return cfg.diffusion.shift
    p = cfg.model.patch_size
    tokens = x0.shape[1] if x0.ndim == 3 else (x0.shape[1] // p) * (x0.shape[2] // p)
    return flow.resolution_shift(tokens)


def pooled_branch_inputs(x0, cond, factor: int, patch_size: int):
    """Latents average-pooled by ``factor`` (cut to whole patches) for the
    multi-resolution branch, and their condition: whole images ``(B, H, W, C)`` pool
    directly (:func:`jaxdit.diffusion.flow.avg_pool_patches`); packed patches ``(B, N, F)``
    pool image by image and carry the pooled images' ``patch_pos`` / ``patch_mask``
    (:func:`jaxdit.diffusion.flow.avg_pool_packed`)."""
    if x0.ndim == 4:
        return flow.avg_pool_patches(x0, patch_size, factor), cond
    tokens, pos, mask = flow.avg_pool_packed(x0, cond["patch_pos"], cond["patch_mask"],
                                             patch_size, factor)
    return tokens, {**cond, "patch_pos": pos, "patch_mask": mask}


def diffusion_branch(model, variables, x0, cond, rng, cfg, shift: float):
    """One flow-matching forward: draws ``t`` and noise, returns ``(per-sample loss (B,),
    t, noise, mutated collections)``."""
    k_t, k_noise = jax.random.split(rng)
    t = flow.sample_t(k_t, x0.shape[0], kind=cfg.diffusion.t_sampling,
                      mean=cfg.diffusion.t_mean, std=cfg.diffusion.t_std, shift=shift)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    pred, out = model.apply(variables, flow.interpolate(x0, noise, t), t, cond, mutable=MUTABLE)
    return flow.per_sample_loss(pred, x0, noise, cond.get("patch_mask")), t, noise, out


def flow_loss_fn(params, model_state, batch, rng, *, model, autoencoder, cfg):
    """Flow-matching loss over ``batch`` plus the model's regularisers (Race-DiT's PLR and
    router losses, sown as ``aux_loss``), with caption / label dropout for CFG.

    Returns ``(loss, (metrics, new_model_state))``; ``new_model_state`` holds the updated
    running statistics (e.g. MoE thresholds). With ``diffusion.multires_pool`` a second
    branch (own t and noise, same captions, same shift, as Lumina's fine-tuning) adds the
    loss on average-pooled latents; its MoE regularisers are not added.
    """
    x0 = autoencoder.bind(params).encode(batch["image"])
    b = x0.shape[0]
    k_main, k_low, k_drop = jax.random.split(rng, 3)
    cond = condition_from_batch(batch)
    if cfg.data.caption_dropout > 0:
        keep = jax.random.uniform(k_drop, (b,)) >= cfg.data.caption_dropout
        cond = {**cond, **drop_condition(cond, keep, model.null_token_id)}
    variables = {"params": params, **model_state}
    shift = train_shift(cfg, x0)
    per_sample, t, noise, out = diffusion_branch(model, variables, x0, cond, k_main, cfg, shift)
    loss = per_sample.mean()
    metrics = {"t_mean": t.mean(), "diffusion_loss": loss}
    pool = cfg.diffusion.multires_pool
    if pool:
        low_x0, low_cond = pooled_branch_inputs(x0, cond, pool, cfg.model.patch_size)
        low, *_ = diffusion_branch(model, variables, low_x0, low_cond, k_low, cfg, shift)
        metrics["multires_loss"] = low.mean()
        loss = loss + cfg.diffusion.multires_weight * low.mean()
    if out.get("deep_pred"):
        plr = deep_supervision_loss(out["deep_pred"], flow.target(x0, noise),
                                    cfg.model.patch_size)
        metrics["plr_loss"] = plr
        loss = loss + cfg.moe.plr_weight * plr
    for path, value in jax.tree_util.tree_flatten_with_path(out.get("aux_loss", {}))[0]:
        name = f"aux/{path[-2].key}" if len(path) > 1 else "aux"
        value = jnp.sum(value)  # a scanned stack sows its layers' values stacked
        metrics[name] = metrics.get(name, 0.0) + value
        loss = loss + value
    if out.get("moe_metrics"):
        metrics.update(summarize_moe(out["moe_metrics"], t))
    return loss, (metrics, persistent_variables(out))


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


def check_flow_config(config) -> None:
    """The flow objective's settings (raises :class:`ConfigError`)."""
    check_multires_pool(config)
