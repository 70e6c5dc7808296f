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
    """Average-pools latents ``(B, H, W, C)`` by ``factor`` in both spatial axes; as
    PyTorch's ``avg_pool2d`` (Lumina's multi-resolution branch), rows and columns past a
    multiple of ``factor`` are dropped."""
    b, h, w, c = x.shape
    hf, wf = h // factor, w // factor
    if not hf or not wf:
        raise ValueError(f"Latent size {(h, w)} is smaller than the pool factor {factor}.")
    x = x[:, :hf * factor, :wf * factor]
    return x.reshape(b, hf, factor, wf, factor, c).mean(axis=(2, 4))


def pooled_grid(size, patch: int, factor: int):
    """Patch-grid side after pooling a ``size``-patch side by ``factor``: the pooled latent
    (``size * patch // factor`` pixels) cut to whole patches."""
    return (size * patch // factor) // patch


def avg_pool_patches(x, patch: int, factor: int):
    """:func:`avg_pool` of whole latents ``(B, H, W, C)``, cut to whole patches of
    ``patch`` (:func:`pooled_grid` patches a side), as :func:`avg_pool_packed` does for
    packed ones."""
    low = avg_pool(x, factor)
    h, w = (pooled_grid(n // patch, patch, factor) * patch for n in x.shape[1:3])
    return low[:, :h, :w]


def avg_pool_packed(tokens, pos, mask, patch: int, factor: int):
    """:func:`avg_pool` of each image of a packed batch, cut to whole patches and repacked
    in the layout of :func:`jaxdit.data.buckets.pack_patches`.

    Args:
      tokens: ``(B, N, p*p*C)`` row-major patches of images of different sizes, padded.
      pos: ``(B, N, 2)`` int (row, col) patch positions; mask: ``(B, N)`` bool valid tokens.
      patch: ``p``; factor: pool factor ``f``.
    Returns:
      ``(tokens (B, N // f^2, p*p*C), pos, mask)`` of the pooled images; an image of
      ``h x w`` patches pools to :func:`pooled_grid` ``(h) x (w)`` patches.
    """
    b, n, feat = tokens.shape
    c = feat // (patch * patch)
    n_out = n // (factor * factor)
    mask = mask.astype(bool)
    rows, cols = pos[..., 0].astype(jnp.int32), pos[..., 1].astype(jnp.int32)
    grid_h = pooled_grid(jnp.max(jnp.where(mask, rows + 1, 0), axis=1), patch, factor)
    grid_w = pooled_grid(jnp.max(jnp.where(mask, cols + 1, 0), axis=1), patch, factor)
    # Latent pixel (r*p + i, c*p + j) of every token -> its pooled pixel (y, x).
    sub = jnp.arange(patch)
    y = ((rows[..., None] * patch + sub) // factor)[..., :, None]  # (B, N, p, 1): rows i
    x = ((cols[..., None] * patch + sub) // factor)[..., None, :]  # (B, N, 1, p): cols j
    inside = (mask[..., None, None] & (y < (grid_h * patch)[:, None, None, None])
              & (x < (grid_w * patch)[:, None, None, None]))
    index = (y // patch) * grid_w[:, None, None, None] + x // patch  # pooled token
    index = jnp.where(inside, index, n_out)  # padding and cut-off pixels -> a dropped slot
    where = (index * patch + y % patch) * patch + x % patch
    pooled = jnp.zeros((b, (n_out + 1) * patch * patch, c), jnp.float32)
    pooled = pooled.at[jnp.arange(b)[:, None], where.reshape(b, -1)].add(
        tokens.reshape(b, n * patch * patch, c).astype(jnp.float32))
    pooled = pooled[:, :n_out * patch * patch] / (factor * factor)
    k = jnp.arange(n_out)
    width = jnp.maximum(grid_w, 1)[:, None]
    out_mask = k[None] < (grid_h * grid_w)[:, None]
    out_pos = jnp.where(out_mask[..., None], jnp.stack([k // width, k % width], -1), 0)
    return (pooled.reshape(b, n_out, feat).astype(tokens.dtype), out_pos.astype(jnp.int32),
            out_mask)


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
