"""The one pure training step shared by every model family.

``train_step(state, batch) -> (state, metrics)`` (after ``functools.partial`` binds the
static pieces): the objective's loss (:mod:`jaxdit.train.objectives`), gradient
accumulation over micro-batches with ``lax.scan``, optimizer update, EMA of the parameters;
a step with a non-finite loss, gradient norm or new state (params, EMA, optimizer, model
state) changes nothing but the step count (``skipped`` = 1; ``skipped_update`` = 1 when
only the update was non-finite). ``param_norm`` is logged for :class:`jaxdit.train.health.ParamNormMonitor`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdit.train.health import all_finite, keep_if
from jaxdit.train.objectives import OBJECTIVES
from jaxdit.train.state import TrainState

def loss_fn(params, model_state, batch, rng, *, model, autoencoder, cfg, step=0):
    """``cfg.train.objective``'s loss (:data:`jaxdit.train.objectives.OBJECTIVES`) over
    ``batch``: ``(loss, (metrics, new_model_state))``. ``step`` is the optimizer step (the
    autoencoders' discriminator starts at ``vae.disc_start``)."""
    objective = OBJECTIVES[cfg.train.objective]
    return objective.loss(params, model_state, batch, rng, model=model,
                          autoencoder=autoencoder, cfg=cfg, step=step)


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
