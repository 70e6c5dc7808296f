"""The one pure training step shared by every model family.

``train_step(state, batch) -> (state, metrics)`` (after ``functools.partial`` binds the
static pieces): flow-matching loss with caption dropout, gradient accumulation over
micro-batches with ``lax.scan``, optimizer update, EMA of the parameters; a step with a
non-finite loss, gradient norm or new state (params, EMA, optimizer, model state) changes
nothing but the step count (``skipped`` = 1; ``skipped_update`` = 1 when only the update
was non-finite). ``param_norm`` is logged for :class:`jaxdit.train.health.ParamNormMonitor`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdit.diffusion import flow
from jaxdit.models.layers import patchify
from jaxdit.models.registry import (TRANSIENT_COLLECTIONS, condition_from_batch, drop_condition,
                                    persistent_variables)
from jaxdit.moe.metrics import summarize as summarize_moe
from jaxdit.train.autoencoder import autoencoder_loss_fn
from jaxdit.train.d2it import d2it_loss_fn
from jaxdit.train.draft import draft_loss_fn
from jaxdit.train.health import all_finite, keep_if
from jaxdit.train.state import TrainState

# ``train.objective``: the flow-matching loss; DRaFT reward fine-tuning
# (:mod:`jaxdit.train.draft`); autoencoder reconstruction (:mod:`jaxdit.train.autoencoder`);
# D2iT's two generators (:mod:`jaxdit.train.d2it`).
OBJECTIVES = ("flow", "draft", "autoencoder", "d2it")

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


def loss_fn(params, model_state, batch, rng, *, model, autoencoder, cfg, step=0):
    """Flow-matching loss over ``batch`` plus the model's regularisers.

    Returns ``(loss, (metrics, new_model_state))``; ``new_model_state`` holds the updated
    running statistics (e.g. MoE thresholds). ``step`` (the optimizer step) switches the
    autoencoders' discriminator on at ``vae.disc_start``. With ``diffusion.multires_pool`` a second
    branch (own t and noise, same captions, same shift, as Lumina's fine-tuning) adds the
    loss on average-pooled latents; its MoE regularisers are not added.
    """
    objective = cfg.train.objective
    if objective == "draft":  # reward fine-tuning (jaxdit.train.draft)
        return draft_loss_fn(params, model_state, batch, rng, model=model,
                             autoencoder=autoencoder, cfg=cfg, cond=condition_from_batch(batch))
    if objective == "autoencoder":
        return autoencoder_loss_fn(params, model_state, batch, rng, model=model, cfg=cfg,
                                   step=step)
    if objective == "d2it":
        return d2it_loss_fn(params, model_state, batch, rng, model=model, cfg=cfg)
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


def _split_micro(batch, num_micro: int):
    def split(a):
        if a.shape[0] % num_micro:
            raise ValueError(f"Batch {a.shape[0]} is not divisible by grad_accum={num_micro}.")
        return a.reshape((num_micro, a.shape[0] // num_micro) + a.shape[1:])
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, autoencoder, tx, schedule, cfg):
    """One optimizer step over ``batch`` (global arrays, leading dim = global batch)."""
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    kw = dict(model=model, autoencoder=autoencoder, cfg=cfg, step=state.step)
    num_micro = int(cfg.optim.grad_accum)
    if num_micro <= 1:
        (loss, (aux, model_state)), grads = grad_fn(state.params, state.model_state, batch,
                                                    step_rng, **kw)
    else:
        micro = _split_micro(batch, num_micro)
        keys = jax.random.split(step_rng, num_micro)

        def micro_0():
            return jax.tree.map(lambda a: a[0], micro)

        def body(carry, inputs):  # model state (running thresholds) threads through
            sums, model_state = carry
            mb, key = inputs
            (l, (a, model_state)), g = grad_fn(state.params, model_state, mb, key, **kw)
            return (jax.tree.map(jnp.add, sums, (l, a, g)), model_state), None

        shapes = jax.eval_shape(lambda: grad_fn(state.params, state.model_state, micro_0(),
                                                keys[0], **kw))
        (_, (aux_shape, _)), _ = shapes
        zeros = (jnp.zeros([]), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
                 jax.tree.map(jnp.zeros_like, state.params))
        ((loss, aux, grads), model_state), _ = jax.lax.scan(
            body, (zeros, state.model_state), (micro, keys))
        loss, aux, grads = jax.tree.map(lambda x: x / num_micro, (loss, aux, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.asarray(cfg.optim.ema_decay, jnp.float32)
    if cfg.optim.ema_warmup:
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    new = (params, ema, opt_state, model_state)

    grad_norm = optax.tree.norm(grads)
    inputs_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Finite gradients can still give a non-finite update (an optimizer's numerics, a bad
    # learning rate): the new state is checked too, and such a step is skipped the same way.
    update_finite = all_finite(new)
    finite = inputs_finite & update_finite
    if cfg.optim.skip_nonfinite:  # a NaN/Inf step keeps the old values
        old = (state.params, state.ema_params, state.opt_state, state.model_state)
        params, ema, opt_state, model_state = keep_if(finite, new, old)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state, model_state=model_state, rng=rng)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "param_norm": optax.tree.norm(params),
               "skipped": 1.0 - finite.astype(jnp.float32),
               "skipped_update": (inputs_finite & ~update_finite).astype(jnp.float32), **aux}
    return new_state, metrics
