"""Samplers for the flow ``dx/dt = u(x, t)``, integrated from ``t = 1`` (noise) to 0 (data).

``model_fn(x, t) -> f`` is the network prediction ``f ~ x0 - eps`` (see
:mod:`jaxdit.diffusion.flow`), so ``u = -f``. Available: Euler and Heun, each as an ODE
(probability flow) or an SDE with the same marginals. All are ``lax.scan`` loops, so one
jitted function samples any number of steps of one size.

SDE: for ``x_t = (1-t) x0 + t eps`` the score is ``-E[eps | x_t] / t`` with
``E[eps | x_t] = x_t + (1 - t) u``. The reverse-time SDE with diffusion ``g(t)^2 = 2 a t``
(``a = sde_strength``) is ``dx = (u - g^2/2 * score) dt + g dW``; the noise vanishes at
``t -> 0`` so the last steps are deterministic.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdit.diffusion.flow import shift_time

SAMPLERS = ("euler", "heun")


def time_grid(num_steps: int, shift: float = 1.0):
    """``num_steps + 1`` times from 1 to 0, optionally resolution-shifted."""
    return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def _velocity(model_fn, x, t):
    tb = jnp.full((x.shape[0],), t, x.dtype)
    return -model_fn(x, tb)


def _sde_drift(u, x, t, strength):
    """Reverse-SDE drift ``u - g^2/2 score`` with ``g^2 = 2 a t``: ``u + a * E[eps|x]``."""
    eps_hat = x + (1.0 - t) * u
    return u + strength * eps_hat


def sample(model_fn: Callable, noise, rng, *, method: str = "heun", sde: bool = False,
           num_steps: int = 50, shift: float = 1.0, sde_strength: float = 1.0):
    """Integrates from ``noise`` (t=1) to t=0 and returns the final sample.

    Args:
      model_fn: ``(x, t (B,)) -> f``; wrap a guided model for CFG (see :func:`cfg_model`).
      noise: ``(B, ...)`` standard normal start.
      rng: PRNG key for SDE noise (unused for ODEs).
      method: "euler" or "heun". sde: stochastic variant. num_steps: integration steps.
      shift: time-grid shift (> 1 spends more steps near noise).
    """
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {method!r}; available: {SAMPLERS}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    times = time_grid(num_steps, shift)
    strength = sde_strength if sde else 0.0

    def drift(x, t):
        u = _velocity(model_fn, x, t)
        return _sde_drift(u, x, t, strength) if sde else u

    def step(x, inputs):
        t, t_next, key = inputs
        h = t_next - t  # negative
        noise_term = 0.0
        if sde:
            g = jnp.sqrt(2.0 * strength * t)
            noise_term = g * jnp.sqrt(-h) * jax.random.normal(key, x.shape, x.dtype)
        d = drift(x, t)
        x_pred = x + h * d + noise_term
        if method == "euler":
            return x_pred, None
        d_next = drift(x_pred, t_next)
        return x + 0.5 * h * (d + d_next) + noise_term, None

    keys = jax.random.split(rng, num_steps)
    x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:], keys))
    return x


def cfg_model(apply_fn: Callable, cond, null_cond, scale: float):
    """Classifier-free guidance: one batched call on ``[cond; null]``, then
    ``f_null + scale * (f_cond - f_null)``. ``apply_fn(x, t, cond) -> f``."""
    def model_fn(x, t):
        if scale == 1.0:
            return apply_fn(x, t, cond)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), cond, null_cond)
        out = apply_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        f_c, f_u = jnp.split(out, 2, axis=0)
        return f_u + scale * (f_c - f_u)
    return model_fn
