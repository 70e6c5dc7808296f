"""Validation loss at a fixed grid of timesteps (SD3 style) on held-out data.

Noise is fixed per (batch index, t) so successive evaluations differ only by the weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.diffusion import flow
from jaxdit.models.registry import condition_from_batch


def make_val_loss_fn(model, autoencoder, t_grid):
    """Jitted ``(variables, batch, rng) -> losses (len(t_grid),)``."""
    grid = jnp.asarray(t_grid, jnp.float32)

    def val_loss(variables, batch, rng):
        x0 = autoencoder.bind(variables["params"]).encode(batch["image"])
        cond = condition_from_batch(batch)

        def at_t(inputs):
            i, t = inputs
            noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, x0.dtype)
            tb = jnp.full((x0.shape[0],), t)
            pred = model.apply(variables, flow.interpolate(x0, noise, tb), tb, cond)
            return flow.per_sample_loss(pred, x0, noise, cond.get("patch_mask")).mean()

        return jax.lax.map(at_t, (jnp.arange(grid.shape[0]), grid))

    return jax.jit(val_loss)
