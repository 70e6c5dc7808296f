"""Sampling from a trained model: captions -> images, and PNG sample grids."""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdit.diffusion.samplers import cfg_model, sample
from jaxdit.models.registry import null_condition


def encode_captions(tokenizer, captions: Sequence[str], max_len: int) -> dict:
    ids, mask = zip(*(tokenizer.encode(c, max_len) for c in captions))
    return {"text_ids": np.stack(ids), "text_mask": np.stack(mask)}


def make_sample_fn(model, autoencoder, config, image_shape):
    """Jitted ``(variables, cond, rng) -> images (B, H, W, 3) in [-1, 1]`` using
    ``config.sampler`` (method, SDE, steps, CFG scale, time shift)."""
    s = config.sampler
    latent_shape = autoencoder.latent_shape(image_shape)

    def sample_fn(variables, cond, rng):
        b = next(iter(cond.values())).shape[0]
        k_noise, k_sde = jax.random.split(rng)

        def apply(x, t, c):
            return model.apply(variables, x, t, c)

        null = null_condition(cond, model.null_token_id)
        fn = cfg_model(apply, cond, null, float(s.cfg_scale),
                       renorm=float(s.cfg_renorm), trunc=float(s.cfg_trunc))
        noise = jax.random.normal(k_noise, (b,) + tuple(latent_shape), jnp.float32)
        x = sample(fn, noise, k_sde, method=s.method, sde=bool(s.sde), num_steps=int(s.num_steps),
                   shift=float(s.shift), sde_strength=float(s.sde_strength))
        return jnp.clip(autoencoder.bind(variables["params"]).decode(x), -1.0, 1.0)

    return jax.jit(sample_fn)


def to_uint8(images) -> np.ndarray:
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255), np.uint8)


def default_grid_path(workdir: str, step: int) -> str:
    """Where ``jaxdit sample`` writes without ``--out``: ``workdir/samples/
    sampled_step_<step>.png``, or the first ``_<n>`` suffix that names no file yet (a grid
    drawn earlier is never overwritten)."""
    stem = os.path.join(workdir, "samples", f"sampled_step_{step:07d}")
    path, n = stem + ".png", 1
    while os.path.exists(path):
        path, n = f"{stem}_{n}.png", n + 1
    return path


def save_grid(images, path: str, cols: int | None = None, pad: int = 2) -> str:
    """Tiles ``images`` (N, H, W, 3) (uint8 or [-1, 1] floats) into one PNG at ``path``."""
    imgs = images if images.dtype == np.uint8 else to_uint8(images)
    n, h, w, _ = imgs.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def write_captions(captions: Sequence[str], path: str, cols: int):
    with open(path, "w", encoding="utf-8") as f:
        for i, c in enumerate(captions):
            f.write(f"row {i // cols} col {i % cols}: {c}\n")
