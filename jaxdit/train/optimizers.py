"""Optimizers and learning-rate schedules.

``adafactor``: the DiT-Air paper's optimizer (constant lr 1e-4, b1 = 0.9, b2 = 0.999):
a factored second moment with a *constant* decay ``b2`` and bias correction, update RMS
clipping at 1, then momentum ``b1`` on the updates. (optax's ``adafactor`` only offers a
step-dependent ``1 - t^-0.8`` decay, hence the small transform below.)
``adamw``: optax AdamW. Both are preceded by global-norm gradient clipping.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdit.errors import ConfigError
from jaxdit.train.state import path_names

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "cosine")


class FactoredRmsState(NamedTuple):
    count: jax.Array
    v_row: optax.Params
    v_col: optax.Params
    v: optax.Params


def _factored(shape, min_dim: int) -> bool:
    return len(shape) >= 2 and shape[-1] >= min_dim and shape[-2] >= min_dim


def scale_by_factored_rms(b2: float = 0.999, eps: float = 1e-30,
                          min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
    """Adafactor preconditioning with constant decay ``b2`` and bias correction.

    Matrices whose last two dims are both >= ``min_dim_size_to_factor`` keep row/column
    statistics over those two dims (O(n + m) memory); others keep a full second moment.
    """
    def init(params):
        def rows(p):
            return jnp.zeros(p.shape[:-1] if _factored(p.shape, min_dim_size_to_factor) else (1,))

        def cols(p):
            if _factored(p.shape, min_dim_size_to_factor):
                return jnp.zeros(p.shape[:-2] + p.shape[-1:])
            return jnp.zeros((1,))

        def full(p):
            return jnp.zeros((1,) if _factored(p.shape, min_dim_size_to_factor) else p.shape)

        return FactoredRmsState(jnp.zeros([], jnp.int32), jax.tree.map(rows, params),
                                jax.tree.map(cols, params), jax.tree.map(full, params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        corr = 1.0 - b2 ** count.astype(jnp.float32)

        def one(g, vr, vc, v):
            g2 = jnp.square(g.astype(jnp.float32)) + eps
            if _factored(g.shape, min_dim_size_to_factor):
                vr = b2 * vr + (1 - b2) * g2.mean(-1)
                vc = b2 * vc + (1 - b2) * g2.mean(-2)
                # The preconditioner is rsqrt(row_ratio_i * col_j); each factor is taken
                # on its own. Their product can fall below float32's smallest normal
                # (an MoE expert with a tiny gradient: 1.3e-6 * 3e-33), which XLA flushes
                # to 0, and rsqrt(0) * g wrote Inf into the weights.
                row = jax.lax.rsqrt(vr / vr.mean(-1, keepdims=True))
                col = jax.lax.rsqrt(vc / corr)
                u = g * row[..., None] * col[..., None, :]
            else:
                v = b2 * v + (1 - b2) * g2
                u = g * jax.lax.rsqrt(v / corr)
            return u.astype(g.dtype), vr, vc, v

        out = jax.tree.map(one, grads, state.v_row, state.v_col, state.v)
        treedef = jax.tree.structure(grads)
        leaves = treedef.flatten_up_to(out)
        u, vr, vc, v = (treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(4))
        return u, FactoredRmsState(count, vr, vc, v)

    return optax.GradientTransformation(init, update)


def make_schedule(cfg, total_steps: int):
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"Unknown optim.schedule {cfg.schedule!r}; available: {SCHEDULES}.")
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1), max(total_steps, 2),
                                                  end_value=cfg.lr * cfg.final_lr_ratio)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                     optax.constant_schedule(cfg.lr)], [warmup])
    return optax.constant_schedule(cfg.lr)


FROZEN_PREFIX = "frozen_"


def frozen_labels(params):
    """``"frozen"`` for every parameter under a module named ``frozen_*`` (pretrained
    encoders), ``"train"`` elsewhere."""
    def label(path, _):
        names = path_names(path)
        return "frozen" if any(str(n).startswith(FROZEN_PREFIX) for n in names) else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def param_labels(params, own: tuple = ()):
    """:func:`frozen_labels`, with the top-level entries named in ``own`` labelled by
    their name."""
    labels = frozen_labels(params)
    return {k: (jax.tree.map(lambda _, k=k: k, v) if k in own else labels[k])
            for k, v in params.items()}


def make_optimizer(cfg, total_steps: int, frozen: bool = False, own: tuple = ()):
    """Returns ``(tx, schedule)`` for ``cfg.name`` in {adafactor, adamw}. ``frozen``: leave
    parameters under ``frozen_*`` modules unchanged (no update, no decay, no state).
    ``own``: top-level params entries (e.g. an autoencoder's ``discriminator``) that get
    an optimizer of their own (same settings, own state and own gradient clipping)."""
    tx, schedule = _make_optimizer(cfg, total_steps)
    if frozen or own:
        parts = {"train": tx, "frozen": optax.set_to_zero(),
                 **{k: _make_optimizer(cfg, total_steps)[0] for k in own}}
        tx = optax.multi_transform(parts, lambda p: param_labels(p, tuple(own)))
    return tx, schedule


def _make_optimizer(cfg, total_steps: int):
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"optim.lr must be a finite number > 0, got {cfg.lr}.")
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        base = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        parts = [scale_by_factored_rms(cfg.b2), optax.clip_by_block_rms(1.0)]
        if cfg.b1:
            parts.append(optax.ema(cfg.b1, debias=True))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.scale_by_learning_rate(schedule))
        base = optax.chain(*parts)
    else:
        raise ValueError(f"Unknown optim.name {cfg.name!r}; available: {OPTIMIZERS}.")
    if cfg.clip_norm and cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base), schedule
    return base, schedule
