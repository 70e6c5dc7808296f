"""D2iT stage 2 (``train.objective="d2it"``): loss, validation and sampling.

One step trains both generators on the frozen DVAE's codes: the content transformer with
the dynamic grain loss on multi-grained noise, and the grain transformer with the masked
cross-entropy (weight ``d2it.grain_weight``). Sampling draws the grain map first, then the
content, and returns the image beside its grain map.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.diffusion import flow
from jaxdit.diffusion.multigrain import (dynamic_grain_loss, grain_cross_entropy,
                                         masked_grain_tokens, sample_grain_map)
from jaxdit.diffusion.samplers import cfg_model, sample
from jaxdit.errors import ConfigError
from jaxdit.models.dvae import fine_downsample, multigrain_noise
from jaxdit.models.registry import drop_condition

# Grain-map colours of the sample grids (the paper's Fig. 3: red fine, blue coarse).
FINE_RGB, COARSE_RGB = (0.85, -0.7, -0.7), (-0.7, -0.4, 0.85)


def d2it_loss_fn(params, model_state, batch, rng, *, model, cfg):
    """``(loss, (metrics, model_state))`` of one D2iT batch (``image``, ``label``)."""
    variables = {"params": params, **model_state}
    x0, grain = model.apply(variables, batch["image"], method="encode")
    b = x0.shape[0]
    k_t, k_noise, k_drop, k_mask = jax.random.split(rng, 4)
    label = batch["label"]
    if cfg.data.caption_dropout > 0:  # label dropout: the null class -1 for CFG
        keep = jax.random.uniform(k_drop, (b,)) >= cfg.data.caption_dropout
        label = drop_condition({"label": label}, keep)["label"]
    d = cfg.diffusion
    t = flow.sample_t(k_t, b, kind=d.t_sampling, mean=d.t_mean, std=d.t_std, shift=d.shift)
    noise = multigrain_noise(k_noise, x0.shape, grain, x0.dtype)
    pred = model.apply(variables, flow.interpolate(x0, noise, t), t,
                       {"label": label, "grain": grain})
    content, parts = dynamic_grain_loss(pred, x0, noise, grain, cfg.d2it.fine_weight,
                                        cfg.d2it.coarse_weight)
    tokens = grain.reshape(b, -1)
    inputs, masked, ratio = masked_grain_tokens(k_mask, tokens)
    logits = model.apply(variables, inputs, ratio, label, method="grain_logits")
    ce, acc = grain_cross_entropy(logits, tokens, masked)
    loss = content + cfg.d2it.grain_weight * ce
    metrics = {"content_loss": content, "grain_ce": ce, "grain_acc": acc,
               "fine_ratio": grain.mean(), "t_mean": t.mean(), **parts}
    return loss, (metrics, model_state)


def make_d2it_val_fn(model, t_grid):
    """Jitted ``(variables, batch, rng) -> {"loss_t<t>": content loss, "grain_ce"}``
    (noise fixed per (batch index, t), as the spine's validation)."""
    grid = jnp.asarray(t_grid, jnp.float32)

    def val(variables, batch, rng):
        x0, grain = model.apply(variables, batch["image"], method="encode")
        cond = {"label": batch["label"], "grain": grain}

        def at_t(inputs):
            i, t = inputs
            noise = multigrain_noise(jax.random.fold_in(rng, i), x0.shape, grain, x0.dtype)
            tb = jnp.full((x0.shape[0],), t)
            pred = model.apply(variables, flow.interpolate(x0, noise, tb), tb, cond)
            return dynamic_grain_loss(pred, x0, noise, grain)[0]

        losses = jax.lax.map(at_t, (jnp.arange(grid.shape[0]), grid))
        tokens = grain.reshape(grain.shape[0], -1)
        inputs, masked, ratio = masked_grain_tokens(jax.random.fold_in(rng, 1 << 20), tokens)
        logits = model.apply(variables, inputs, ratio, batch["label"], method="grain_logits")
        ce, acc = grain_cross_entropy(logits, tokens, masked)
        return {"loss": losses, "grain_ce": ce, "grain_acc": acc}

    return jax.jit(val)


def grain_image(grain, size: int):
    """Grain map ``(B, h, w)`` -> RGB ``(B, size, size, 3)`` in [-1, 1] (red = fine)."""
    rgb = jnp.where(grain[..., None] == 1, jnp.asarray(FINE_RGB), jnp.asarray(COARSE_RGB))
    rep = size // grain.shape[1]
    return jnp.repeat(jnp.repeat(rgb, rep, axis=1), rep, axis=2)


def make_d2it_sample_fn(model, config, image_size: int):
    """Jitted ``(variables, {"label"}, rng) -> (B, S, 2S, 3)``: each sample beside its grain
    map. Grain maps come from the grain transformer (``d2it.grain_steps`` unmasking
    steps, ``d2it.grain_temperature``, ``d2it.grain_choice_temperature``,
    ``d2it.sample_fine_ratio`` > 0 fixes the fine ratio, ``d2it.grain_cfg_scale``); content
    from ``config.sampler`` (an ODE method)."""
    s, d = config.sampler, config.d2it
    side = image_size // fine_downsample(config.vae.ch_mult)
    channels = config.latent.channels

    def sample_fn(variables, cond, rng):
        label = cond["label"]
        b = label.shape[0]
        k_grain, k_noise, k_sde = jax.random.split(rng, 3)

        def logits_fn(tokens, ratio, lab):
            return model.apply(variables, tokens, ratio, lab, method="grain_logits")

        grain = sample_grain_map(logits_fn, label, k_grain, (side // 2, side // 2),
                                 num_steps=int(d.grain_steps),
                                 temperature=float(d.grain_temperature),
                                 fine_ratio=float(d.sample_fine_ratio),
                                 cfg_scale=float(d.grain_cfg_scale),
                                 choice_temperature=float(d.get("grain_choice_temperature",
                                                                4.5)))

        def apply(x, t, c):
            return model.apply(variables, x, t, c)

        fn = cfg_model(apply, {"label": label, "grain": grain},
                       {"label": jnp.full_like(label, -1), "grain": grain},
                       float(s.cfg_scale), renorm=float(s.cfg_renorm),
                       trunc=float(s.cfg_trunc))
        noise = multigrain_noise(k_noise, (b, side, side, channels), grain)
        x = sample(fn, noise, k_sde, method=s.method, sde=False, num_steps=int(s.num_steps),
                   shift=float(s.shift))
        images = jnp.clip(model.apply(variables, x, method="decode"), -1.0, 1.0)
        return jnp.concatenate([images, grain_image(grain, image_size)], axis=2)

    return jax.jit(sample_fn)


def check_d2it_config(config) -> None:
    """D2iT's sampler, grain steps and latent size (raises :class:`ConfigError`)."""
    if config.sampler.sde:
        raise ConfigError("D2iT samples with an ODE sampler (fresh SDE noise would break "
                          "the multi-grained structure): set sampler.sde=False.")
    if config.d2it.grain_steps < 1:
        raise ConfigError(f"d2it.grain_steps must be >= 1, got {config.d2it.grain_steps}.")
    fine = fine_downsample(config.vae.ch_mult)
    if config.latent.downsample != fine:
        raise ConfigError(f"latent.downsample={config.latent.downsample} must be the DVAE's "
                          f"fine downsampling {fine}.")
