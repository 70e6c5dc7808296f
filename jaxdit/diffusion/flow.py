"""Rectified-flow matching as in DiT-Air / SD3.

Convention: ``t = 0`` is data ``x0``, ``t = 1`` is noise ``eps``;
``x_t = (1 - t) x0 + t eps``. The network predicts ``f(x_t, t) ~ x0 - eps`` (the paper's
objective ``||f - z0 + eps||^2``), so the ODE velocity is ``dx_t/dt = eps - x0 = -f``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

T_SAMPLERS = ("logit_normal", "uniform")


def interpolate(x0, noise, t):
    """``x_t`` on the straight path; ``t`` (B,) broadcast over the other axes."""
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - tb) * x0 + tb * noise


def target(x0, noise):
    """Regression target ``x0 - eps`` (constant along the path)."""
    return x0 - noise


def shift_time(t, shift: float):
    """SD3 resolution shift ``t' = s t / (1 + (s - 1) t)``; ``s > 1`` moves mass to noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(rng, batch: int, *, kind: str = "logit_normal", mean: float = 0.0,
             std: float = 1.0, shift: float = 1.0):
    """Training timesteps (B,): ``sigmoid(N(mean, std))`` or uniform, then shifted."""
    if kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    elif kind == "uniform":
        t = jax.random.uniform(rng, (batch,))
    else:
        raise ValueError(f"Unknown t sampler {kind!r}; available: {T_SAMPLERS}.")
    return shift_time(t, shift)


def per_sample_loss(pred, x0, noise):
    """Mean squared error per sample ``(B,)`` in fp32."""
    err = jnp.square(pred.astype(jnp.float32) - target(x0, noise).astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)
