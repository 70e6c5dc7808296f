"""The one pure training step shared by every model family.

``train_step(state, batch) -> (state, metrics)`` (after ``functools.partial`` binds the
static pieces): flow-matching loss with caption dropout, gradient accumulation over
micro-batches with ``lax.scan``, optimizer update, EMA of the parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdit.diffusion import flow
from jaxdit.models.registry import drop_condition
from jaxdit.train.state import TrainState


def condition_from_batch(batch):
    """Model condition entries of a batch (token ids or precomputed text features)."""
    keys = ("text_ids", "text_mask", "text_tokens", "text_pooled", "label")
    return {k: batch[k] for k in keys if k in batch}


def loss_fn(params, model_state, batch, rng, *, model, autoencoder, cfg):
    """Mean flow-matching loss over ``batch``; returns ``(loss, aux)``."""
    x0 = autoencoder.encode(batch["image"])
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = flow.sample_t(k_t, b, kind=cfg.diffusion.t_sampling, mean=cfg.diffusion.t_mean,
                      std=cfg.diffusion.t_std, shift=cfg.diffusion.shift)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    cond = condition_from_batch(batch)
    if cfg.data.caption_dropout > 0:
        keep = jax.random.uniform(k_drop, (b,)) >= cfg.data.caption_dropout
        cond = {**cond, **drop_condition(cond, keep)}
    variables = {"params": params, **model_state}
    pred = model.apply(variables, flow.interpolate(x0, noise, t), t, cond)
    loss = flow.per_sample_loss(pred, x0, noise).mean()
    return loss, {"t_mean": t.mean()}


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
    kw = dict(model=model, autoencoder=autoencoder, cfg=cfg)
    num_micro = int(cfg.optim.grad_accum)
    if num_micro <= 1:
        (loss, aux), grads = grad_fn(state.params, state.model_state, batch, step_rng, **kw)
    else:
        micro = _split_micro(batch, num_micro)
        keys = jax.random.split(step_rng, num_micro)

        def body(carry, inputs):
            mb, key = inputs
            (l, a), g = grad_fn(state.params, state.model_state, mb, key, **kw)
            return jax.tree.map(jnp.add, carry, (l, a, g)), None

        zeros = (jnp.zeros([]), {"t_mean": jnp.zeros([])},
                 jax.tree.map(jnp.zeros_like, state.params))
        (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
        loss, aux, grads = jax.tree.map(lambda x: x / num_micro, (loss, aux, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.asarray(cfg.optim.ema_decay, jnp.float32)
    if cfg.optim.ema_warmup:
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state, rng=rng)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step), **aux}
    return new_state, metrics
