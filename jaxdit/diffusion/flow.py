"""Rectified-flow matching as in DiT-Air / SD3.

Convention: ``t = 0`` is data ``x0``, ``t = 1`` is noise ``eps``;
``x_t = (1 - t) x0 + t eps``. The network predicts ``f(x_t, t) ~ x0 - eps`` (the paper's
objective ``||f - z0 + eps||^2``), so the ODE velocity is ``dx_t/dt = eps - x0 = -f``.
"""
from __future__ import annotations

import math

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


def resolution_shift(num_tokens: int, low=(256, 0.5), high=(4096, 1.15)) -> float:
    """Lumina-Image 2.0's resolution-dependent shift ``exp(mu)``, ``mu`` linear in the image
    token count through ``low`` and ``high`` ((256, 0.5) and (4096, 1.15): 1.65 at 256
    tokens, 3.16 at 4096). Used as ``shift`` in :func:`shift_time`, which in this module's
    convention (t = 1 is noise) is exactly Lumina's ``t / (t + e^mu (1 - t))``."""
    (x1, y1), (x2, y2) = low, high
    mu = y1 + (num_tokens - x1) * (y2 - y1) / (x2 - x1)
    return math.exp(mu)


def avg_pool(x, factor: int):
    """Average-pools latents ``(B, H, W, C)`` by ``factor`` in both spatial axes."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"Latent size {(h, w)} is not divisible by the pool factor {factor}.")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


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


def per_sample_loss(pred, x0, noise, token_mask=None):
    """Mean squared error per sample ``(B,)`` in fp32. For packed patches ``(B, N, F)`` with
    ``token_mask`` (B, N), the mean runs over the valid tokens only."""
    err = jnp.square(pred.astype(jnp.float32) - target(x0, noise).astype(jnp.float32))
    if token_mask is None:
        return err.reshape(err.shape[0], -1).mean(axis=1)
    m = token_mask.astype(jnp.float32)
    valid = jnp.maximum(m.sum(axis=1) * err.shape[-1], 1.0)
    return (err.sum(axis=-1) * m).sum(axis=1) / valid
