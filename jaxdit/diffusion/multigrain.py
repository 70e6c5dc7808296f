"""D2iT's multi-grained diffusion pieces: the dynamic grain loss, and training and
sampling of the masked grain-map model (see :mod:`jaxdit.models.d2it`).

Grain maps are ``(B, h, w)`` int (1 = fine, 0 = coarse) over the regions; latents and
noise live on the fine grid ``(B, 2h, 2w, C)``. Multi-grained noise is
:func:`jaxdit.models.dvae.multigrain_noise`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdit.diffusion import flow
from jaxdit.models.d2it import MASK_TOKEN


def dynamic_grain_loss(pred, x0, noise, grain, fine_weight: float = 1.0,
                       coarse_weight: float = 1.0):
    """Flow-matching MSE split by grain, each grain normalised by its own element count.

    A coarse region counts once (its 2x2 block is one code; prediction and target are
    block-averaged), a fine region as its four cells, so neither grain's loss scales with
    how many regions it has. Returns ``(loss, {"fine_loss", "coarse_loss"})``.
    """
    err_target = flow.target(x0, noise).astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    b, hh, ww, c = pred.shape

    def block_mean(a):
        return a.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))

    fine = jnp.repeat(jnp.repeat(grain, 2, 1), 2, 2)[..., None].astype(jnp.float32)
    coarse = (1.0 - grain.astype(jnp.float32))[..., None]
    fine_sq = jnp.square(pred - err_target) * fine
    coarse_sq = jnp.square(block_mean(pred) - block_mean(err_target)) * coarse
    fine_loss = fine_sq.sum() / jnp.maximum(fine.sum() * c, 1.0)
    coarse_loss = coarse_sq.sum() / jnp.maximum(coarse.sum() * c, 1.0)
    loss = fine_weight * fine_loss + coarse_weight * coarse_loss
    return loss, {"fine_loss": fine_loss, "coarse_loss": coarse_loss}


def mask_schedule(progress):
    """MaskGIT cosine schedule: masked fraction at ``progress`` in [0, 1] (1 -> 0)."""
    return jnp.cos(0.5 * math.pi * progress)


def _ranks(score):
    """Rank of each entry of ``score`` (B, N) in descending order per row (0 = largest)."""
    order = jnp.argsort(-score, axis=-1)
    return jnp.argsort(order, axis=-1)


def masked_grain_tokens(rng, grain_tokens):
    """Training input of the grain model: ``grain_tokens`` (B, N) with a cosine-scheduled
    random fraction (at least one token) replaced by :data:`MASK_TOKEN`.
    Returns ``(tokens, masked (B, N) bool, mask_ratio (B,))``."""
    b, n = grain_tokens.shape
    k_ratio, k_pick = jax.random.split(rng)
    ratio = mask_schedule(jax.random.uniform(k_ratio, (b,)))
    num = jnp.maximum(jnp.ceil(ratio * n), 1.0)
    masked = _ranks(jax.random.uniform(k_pick, (b, n))) < num[:, None]
    return jnp.where(masked, MASK_TOKEN, grain_tokens), masked, num / n


def grain_cross_entropy(logits, grain_tokens, masked):
    """Mean CE over the masked regions; also the accuracy there. ``logits`` (B, N, 2)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, grain_tokens[..., None], axis=-1)[..., 0]
    m = masked.astype(jnp.float32)
    denom = jnp.maximum(m.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == grain_tokens) * m).sum() / denom
    return (nll * m).sum() / denom, acc


def sample_grain_map(logits_fn, label, rng, grid: tuple[int, int], *, num_steps: int = 8,
                     temperature: float = 1.0, fine_ratio: float = 0.0,
                     cfg_scale: float = 1.0, choice_temperature: float = 4.5):
    """Draws grain maps ``(B, h, w)`` int32 by iterative unmasking (MaskGIT).

    ``logits_fn(tokens (B, N), mask_ratio (B,), label (B,)) -> (B, N, 2)``. Each of
    ``num_steps`` steps proposes a token for every masked region and keeps the most
    confident proposals so that the masked fraction follows :func:`mask_schedule`.
    ``fine_ratio`` > 0 fixes the number of fine regions to ``round(fine_ratio * N)``
    exactly: proposals are fine for the remaining budget's most likely-fine masked
    regions, coarse elsewhere. ``cfg_scale`` != 1 guides the logits with the null class.
    ``choice_temperature``: Gumbel noise on the log-confidences when choosing which
    proposals to keep, annealed to 0 over the steps (MaskGIT's; without it the
    most-confident-first order drifts every map towards one grain).
    """
    h, w = grid
    b, n = label.shape[0], h * w
    target = int(round(fine_ratio * n))

    def guided(tokens, ratio):
        if cfg_scale == 1.0:
            return logits_fn(tokens, ratio, label)
        both = logits_fn(jnp.concatenate([tokens, tokens]), jnp.concatenate([ratio, ratio]),
                         jnp.concatenate([label, jnp.full_like(label, -1)]))
        cond, uncond = jnp.split(both, 2)
        return uncond + cfg_scale * (cond - uncond)

    def step(tokens, inputs):
        i, key = inputs
        masked = tokens == MASK_TOKEN
        ratio = masked.mean(axis=1)
        logits = guided(tokens, ratio) / max(temperature, 1e-6)
        p_fine = jax.nn.softmax(logits, axis=-1)[..., 1]
        if fine_ratio > 0:
            budget = target - ((tokens == 1).sum(axis=1))
            rank = _ranks(jnp.where(masked, p_fine, -jnp.inf))
            proposal = (rank < budget[:, None]).astype(jnp.int32)
        else:
            proposal = jax.random.bernoulli(key, p_fine).astype(jnp.int32)
        confidence = jnp.log(jnp.where(proposal == 1, p_fine, 1.0 - p_fine) + 1e-20)
        k_choice = jax.random.fold_in(key, 1)
        noise = choice_temperature * (1.0 - (i + 1.0) / num_steps)
        confidence = confidence + noise * jax.random.gumbel(k_choice, confidence.shape)
        keep_masked = jnp.floor(mask_schedule((i + 1.0) / num_steps) * n).astype(jnp.int32)
        num_commit = masked.sum(axis=1) - keep_masked
        commit = masked & (_ranks(jnp.where(masked, confidence, -jnp.inf)) < num_commit[:, None])
        return jnp.where(commit, proposal, tokens), None

    start = jnp.full((b, n), MASK_TOKEN, jnp.int32)
    keys = jax.random.split(rng, num_steps)
    tokens, _ = jax.lax.scan(step, start, (jnp.arange(num_steps, dtype=jnp.float32), keys))
    return tokens.reshape(b, h, w)
