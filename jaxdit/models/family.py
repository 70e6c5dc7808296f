"""What a model family declares beside its model: the config fields it reads, how it is
built, what it is conditioned on and what it is trained on.

Each family module ends with one ``FAMILY = Family(...)``; :mod:`jaxdit.models.registry`
collects them, and everything that used to branch on a family's name (config checks, the
example inputs of ``model.init``, which weights are frozen, the latent kinds allowed) asks
the descriptor instead. Adding a family touches its model file (with its descriptor), its
experiment config, its tests and the one list in the registry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from jaxdit.kernels.dispatch import check_backend
from jaxdit.models.base import remat_policy_name

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "denoiser": a latent/pixel denoiser wrapped with a text encoder (or class labels) and an
# optional frozen KL-VAE by registry.build_model; "autoencoder": the trained model is the
# autoencoder of config.vae; "composite": a model with its own frozen parts (D2iT).
ROLES = ("denoiser", "autoencoder", "composite")
# config.model fields every denoiser reads (composites too); the autoencoders read
# config.vae (and config.dvae) and only AUTOENCODER_FIELDS of config.model.
COMMON_FIELDS = ("family", "depth", "width", "num_heads", "patch_size", "mlp_ratio", "qk_norm",
                 "sandwich", "attn_impl", "remat", "scan_layers", "dtype", "param_dtype")
AUTOENCODER_FIELDS = ("family", "dtype", "param_dtype")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    ``build``: for ``role="denoiser"`` ``(config.model, out_channels, config.moe) ->
    Denoiser``; for the other roles ``(config) -> module``.
    ``own_fields``: the ``config.model`` fields it reads beyond :data:`COMMON_FIELDS`
    (autoencoders: beyond :data:`AUTOENCODER_FIELDS`); setting any other is refused.
    ``sections``: config sections only some families read (``moe``, ``d2it``, ``dvae``).
    ``example_inputs``: ``(config, batch) -> args`` of ``model.init``.
    ``latent_kinds``: the ``latent.kind`` values it trains on.
    ``packed_patches``: accepts packed aspect-bucket batches (``data.aspect_buckets``).
    ``frozen_parts``: holds weights the optimizer must not change (a composite's VAE).
    ``check``: ``(config) -> None`` raising ConfigError for family-specific settings.
    ``min_depth``: ``(config.model) -> int``, the smallest ``model.depth`` it builds (cost
    extrapolation over depth starts there).
    """
    name: str
    build: Callable[..., Any]
    example_inputs: Callable[[Any, int], tuple]
    own_fields: tuple[str, ...] = ()
    role: str = "denoiser"
    class_conditional: bool = False
    sections: tuple[str, ...] = ()
    latent_kinds: tuple[str, ...] = ("identity", "kl_vae")
    packed_patches: bool = False
    frozen_parts: bool = False
    check: Callable[[Any], None] | None = None
    min_depth: Callable[[Any], int] = lambda model_cfg: 1

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Family {self.name!r}: role {self.role!r} not in {ROLES}.")

    @property
    def fields(self) -> tuple[str, ...]:
        """Every ``config.model`` field the family reads."""
        base = AUTOENCODER_FIELDS if self.role == "autoencoder" else COMMON_FIELDS
        return base + tuple(f for f in self.own_fields if f not in base)


def dtypes(model_cfg) -> dict:
    """``dict(dtype=..., param_dtype=...)`` from ``model.dtype`` / ``model.param_dtype``."""
    out = {}
    for field in ("dtype", "param_dtype"):
        name = model_cfg[field]
        if name not in DTYPES:
            raise ValueError(f"Unknown model.{field} {name!r}; use one of {sorted(DTYPES)}.")
        out[field] = DTYPES[name]
    return out


def transformer_kwargs(model_cfg, out_channels: int) -> dict:
    """Keyword arguments every transformer denoiser takes from ``config.model``, checked
    (attention backend, remat policy, width divisible by heads) before anything traces."""
    m = model_cfg
    check_backend(m.attn_impl)
    remat_policy_name(m.remat)
    if m.width % m.num_heads:
        raise ValueError(f"model.width={m.width} is not divisible by "
                         f"model.num_heads={m.num_heads}.")
    return dict(depth=m.depth, width=m.width, num_heads=m.num_heads, patch_size=m.patch_size,
                out_channels=out_channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                sandwich=m.sandwich, attn_impl=m.attn_impl, remat=m.remat,
                scan_layers=m.scan_layers, **dtypes(m))


def latent_shape(config, batch: int) -> tuple[int, int, int, int]:
    """``(B, s, s, latent.channels)`` with ``s = data.image_size / latent.downsample``."""
    s = config.data.image_size // config.latent.downsample
    return (batch, s, s, config.latent.channels)


def denoiser_example_inputs(config, batch: int = 1) -> tuple:
    """``(x, t, cond)`` zeros for a denoiser: ``cond`` holds a label (``text.kind='none'``),
    token ids and mask (trainable / pretrained encoders) or precomputed features."""
    x, t, n = jnp.zeros(latent_shape(config, batch)), jnp.zeros((batch,)), config.text.max_len
    if config.text.kind == "none":
        cond = {"label": jnp.zeros((batch,), jnp.int32)}
    elif config.text.kind in ("trainable", "pretrained"):
        cond = {"text_ids": jnp.zeros((batch, n), jnp.int32),
                "text_mask": jnp.ones((batch, n), bool)}
    else:
        cond = {"text_tokens": jnp.zeros((batch, n, config.text.width)),
                "text_mask": jnp.ones((batch, n), bool),
                "text_pooled": jnp.zeros((batch, config.text.pooled_width or config.text.width))}
    return x, t, cond


def image_example_inputs(config, batch: int = 1) -> tuple:
    """``(images (B, S, S, 3), sample=False)`` zeros for an autoencoder."""
    size = config.data.image_size
    return jnp.zeros((batch, size, size, 3)), False
