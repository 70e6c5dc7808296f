"""Samplers for the flow ``dx/dt = u(x, t)``, integrated from ``t = 1`` (noise) to 0 (data).

``model_fn(x, t) -> f`` is the network prediction ``f ~ x0 - eps`` (see
:mod:`jaxdit.diffusion.flow`), so ``u = -f``. Available: Euler, Heun and midpoint, each as
an ODE (probability flow) or an SDE with the same marginals, and DPM-Solver++(2M)
(multistep, ODE only). All are ``lax.scan`` loops, so one jitted function samples any
number of steps of one size.

DPM-Solver++ in flow terms: ``alpha_t = 1 - t``, ``sigma_t = t``, data prediction
``x0 = x - t u``, ``lambda = log(alpha / sigma)``. A step from ``t`` to ``s`` is
``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D`` with ``h = lambda_s - lambda_t``
and ``D`` the current ``x0`` (first order: the first and the last step) or the 2M
extrapolation ``(1 + 1/(2r)) x0_t - 1/(2r) x0_prev``, ``r = h_prev / h``.

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

SAMPLERS = ("euler", "heun", "midpoint", "dpmpp_2m")


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
      method: one of :data:`SAMPLERS`. sde: stochastic variant (not for dpmpp_2m).
      num_steps: integration steps.
      shift: time-grid shift (> 1 spends more steps near noise).
    """
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {method!r}; available: {SAMPLERS}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    times = time_grid(num_steps, shift)
    if method == "dpmpp_2m":
        if sde:
            raise ValueError("dpmpp_2m is a deterministic multistep solver; use sde=False.")
        return _dpmpp_2m(model_fn, noise, times)
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
        if method == "midpoint":
            d_mid = drift(x + 0.5 * h * d, t + 0.5 * h)
            return x + h * d_mid + noise_term, None
        x_pred = x + h * d + noise_term
        if method == "euler":
            return x_pred, None
        d_next = drift(x_pred, t_next)
        return x + 0.5 * h * (d + d_next) + noise_term, None

    keys = jax.random.split(rng, num_steps)
    x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:], keys))
    return x


def _dpmpp_2m(model_fn, x, times):
    """DPM-Solver++(2M) over ``times`` (1 -> 0); see the module docstring."""
    n = times.shape[0] - 1
    tiny = 1e-12

    def step(carry, inputs):
        x, x0_prev, h_prev = carry
        i, t, s = inputs
        x0 = x - t * _velocity(model_fn, x, t)
        # e^{-h} = (alpha_t sigma_s) / (sigma_t alpha_s); 0 when t = 1 or s = 0.
        decay = jnp.where((t >= 1.0) | (s <= 0.0), 0.0,
                          (1.0 - t) * s / jnp.maximum(t * (1.0 - s), tiny))
        lam = lambda u: jnp.log(jnp.maximum(1.0 - u, tiny)) - jnp.log(jnp.maximum(u, tiny))
        h = lam(s) - lam(t)
        r = h_prev / jnp.maximum(h, tiny)
        second = (i > 0) & (i < n - 1) & (t < 1.0)
        d = jnp.where(second, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
        x_next = (s / jnp.maximum(t, tiny)) * x + (1.0 - s) * (1.0 - decay) * d
        return (x_next, x0, h), None

    init = (x, jnp.zeros_like(x), jnp.ones([], x.dtype))
    (x, _, _), _ = jax.lax.scan(step, init, (jnp.arange(n), times[:-1], times[1:]))
    return x


def cfg_model(apply_fn: Callable, cond, null_cond, scale, *, renorm: float = 0.0,
              trunc: float = 1.0):
    """Classifier-free guidance: one batched call on ``[cond; null]``, then
    ``f_null + scale * (f_cond - f_null)``. ``apply_fn(x, t, cond) -> f``.

    ``scale``: float or per-sample (B,). ``renorm > 0`` (Lumina's CFG renormalisation) caps
    each sample's guided prediction norm at ``renorm`` times the conditional one's.
    ``trunc`` (Lumina's CFG truncation): guidance only during the first ``trunc`` fraction
    of the trajectory from noise (t > 1 - trunc); later steps use the conditional
    prediction. Both are per-sample selects, so the function stays jit-friendly.
    """
    if not 0.0 <= trunc <= 1.0:
        raise ValueError(f"cfg trunc must be in [0, 1], got {trunc}.")

    def model_fn(x, t):
        if isinstance(scale, (int, float)) and scale == 1.0:
            return apply_fn(x, t, cond)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), cond, null_cond)
        out = apply_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        f_c, f_u = jnp.split(out, 2, axis=0)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        w = jnp.broadcast_to(jnp.asarray(scale, f_c.dtype), t.shape).reshape(bshape)
        guided = f_u + w * (f_c - f_u)
        if renorm > 0:
            axes = tuple(range(1, x.ndim))
            cap = renorm * jnp.sqrt(jnp.sum(f_c * f_c, axis=axes, keepdims=True))
            norm = jnp.sqrt(jnp.sum(guided * guided, axis=axes, keepdims=True))
            guided = guided * jnp.minimum(1.0, cap / jnp.maximum(norm, 1e-12))
        if trunc < 1.0:
            guided = jnp.where((t > 1.0 - trunc).reshape(bshape), guided, f_c)
        return guided
    return model_fn
