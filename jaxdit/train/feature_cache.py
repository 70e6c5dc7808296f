"""Precomputes training features: autoencoder latents and frozen text-encoder outputs, so
training reads them instead of running the encoders every step (how large runs go). Writes
the folder format of :mod:`jaxdit.data.cache`; the command is ``jaxdit cache``
(:mod:`jaxdit.cli.cache`).

The text encoder must be frozen (``text.kind=pretrained``); a class-conditional config
(``text.kind=none``: Race-DiT, ImageNet-style labels) caches latents and labels only.
Several ``text.layers`` are cached concatenated, without the trained projection (the
denoiser's text adapter maps any feature width). Captions get ``data.system_prompt`` as in
training. Examples are taken in source order (the training pipeline shuffles the cache).

Latents: ``latent.kind=identity`` caches pixels; ``latent.kind=kl_vae`` with
``latent.vae_workdir=<a KL-VAE run>`` caches its scaled posterior means (``latent.scale``,
or 1 / their std on ``latent.scale_images`` training images), and the meta records the run
and the scale so training from the cache decodes its samples with the same VAE.

Aspect buckets (``data.aspect_buckets=True``, Lumina's variable resolution): each image is
resized to its bucket, encoded at that size and its latent stored as packed patches of
``model.patch_size``, so training on the cache (which then packs the same buckets) runs one
compiled step for all of them, in latent space.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from jaxdit.data.buckets import pack_patches
from jaxdit.data.cache import CacheWriter
from jaxdit.data.pipeline import (Preprocess, bucket_sizes, make_source, make_tokenizer,
                                  packed_tokens)
from jaxdit.convert.text import load_pretrained_text
from jaxdit.models.pretrained_text import pretrained_text_module
from jaxdit.models.text import PretrainedText, masked_mean
from jaxdit.train.load import trained_weights
from jaxdit.train.stages import configure_latent_vae, latent_scale


def make_encode_fn(cfg):
    """``(images, ids, mask) -> latents, tokens, pooled`` for the frozen encoders, and the
    text feature width (a class-conditional model, ``text.kind='none'``: latents only,
    tokens and pooled None, width 0). Images and text are jitted apart, so a new image
    size (an aspect bucket) compiles the image encoder only."""
    encode_images = jax.jit(image_encoder(cfg))
    if cfg.text.kind == "none":
        return lambda images, ids, mask: (encode_images(images), None, None), 0
    if cfg.text.kind != "pretrained":
        raise ValueError("Caching text features needs a frozen text encoder: set "
                         "text.kind='pretrained' (or 'none' for a class-conditional model; "
                         f"got {cfg.text.kind!r}).")
    module = pretrained_text_module(cfg.text)
    variables = {"params": {"frozen_encoder": load_pretrained_text(cfg.text)}}

    @jax.jit
    def encode_text(ids, mask):
        tokens = module.apply(variables, ids, mask, method=PretrainedText.selected)
        return tokens, masked_mean(tokens, mask)

    def encode(images, ids, mask):
        return (encode_images(images), *encode_text(ids, mask))
    return encode, module.frozen_encoder.width * len(cfg.text.layers)


def image_encoder(cfg):
    """``images (B, H, W, 3) -> latents`` of ``cfg.latent``; for ``kl_vae`` it first takes
    the VAE's latent size into ``cfg.latent`` and sets ``cfg.latent.scale``."""
    if cfg.latent.kind == "identity":
        return lambda images: images
    if cfg.latent.kind != "kl_vae":
        raise ValueError(f"Caching latents of latent.kind={cfg.latent.kind!r} is not "
                         "supported; use 'identity' or 'kl_vae'.")
    configure_latent_vae(cfg)
    model, params = trained_weights(cfg.latent.vae_workdir)
    unscaled = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))
    if cfg.latent.scale <= 0:
        cfg.latent.scale = latent_scale(unscaled, cfg, cfg.latent.scale_images)
    scale, shift = float(cfg.latent.scale), float(cfg.latent.shift)
    logging.info("Latents of the KL-VAE in %s, scale %.4f, shift %.4f", cfg.latent.vae_workdir,
                 scale, shift)
    return lambda images: (unscaled(images) - shift) * scale


def packing(cfg):
    """``(latent row shape, meta["packed"])``: whole latents, or with ``data.aspect_buckets``
    packed patches of each image's bucket-sized latent (``meta["packed"]`` None otherwise)."""
    s, f, c = cfg.data.image_size, cfg.latent.downsample, cfg.latent.channels
    sizes = bucket_sizes(cfg)
    if not sizes:
        return (s // f, s // f, c), None
    p, tokens = cfg.model.patch_size, packed_tokens(cfg)
    return (tokens, p * p * c), {"patch": p, "tokens": tokens,
                                 "bucket_max_ratio": cfg.data.bucket_max_ratio,
                                 "bucket_filter": cfg.data.bucket_filter,
                                 "buckets": [list(b) for b in sizes]}


def cache_features(cfg, split: str, out: str, num: int = 0, batch: int = 64, log=None):
    """Encodes the first ``num`` examples (0 = all) of ``split`` into the cache ``out``.
    Images are encoded ``batch`` at a time per image size (one size, or one per aspect
    bucket: a compile each), each written to its own row in source order. ``log`` (e.g.
    ``print``) gets a progress line about every tenth of the examples."""
    encode, width = make_encode_fn(cfg)
    preprocess = Preprocess(make_tokenizer(cfg), cfg.text.max_len, cfg.data.system_prompt)
    src = make_source(cfg.data, split, bucket_sizes(cfg))
    num = min(num or len(src), len(src))
    latent, packed = packing(cfg)
    tokens = latent[0]
    shapes = {"latent": latent, "text_tokens": (cfg.text.max_len, width),
              "text_mask": (cfg.text.max_len,), "text_pooled": (width,), "label": (),
              "patch_pos": (tokens, 2), "patch_mask": (tokens,)}
    text = None if cfg.text.kind == "none" else {
        "width": width, "max_len": cfg.text.max_len,
        "encoder": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.text.items()}}
    meta = {"image_size": cfg.data.image_size, "latent": dict(cfg.latent), "text": text,
            "packed": packed, "system_prompt": cfg.data.system_prompt,
            "source": cfg.data.source, "split": split}
    writer = CacheWriter(out, num, shapes, meta)

    def write(rows, recs):
        pad = batch - len(recs)  # keep one compiled shape per image size: pad the batch
        examples = [preprocess.map(r) for r in recs]  # exactly what training would feed
        images, ids, mask = (np.stack([e[k] for e in examples])
                             for k in ("image", "text_ids", "text_mask"))
        if pad:
            images, ids, mask = (np.concatenate([a, np.repeat(a[-1:], pad, 0)])
                                 for a in (images, ids, mask))
        lat, text_tokens, pooled = encode(images, ids, mask)
        arrays = {"latent": lat, "text_tokens": text_tokens, "text_mask": mask,
                  "text_pooled": pooled, "label": np.stack([e["label"] for e in examples])}
        if packed:
            packs = [pack_patches(np.asarray(a), packed["patch"], packed["tokens"])
                     for a in lat[:len(recs)]]
            arrays.update({k: np.stack([q[name] for q in packs]) for k, name in
                           (("latent", "image"), ("patch_pos", "patch_pos"),
                            ("patch_mask", "patch_mask"))})
        writer.put(rows, arrays, [r["caption"] for r in recs])

    start = time.time()
    every = max(num // 10, batch)
    pending: dict[tuple, list] = {}  # image size -> [(row, record)]
    for i in range(num):
        if log and i and i % every == 0:
            elapsed = time.time() - start
            log(f"cached {i}/{num} examples, {elapsed:.0f}s, ETA {elapsed * (num - i) / i:.0f}s")
        rec = src[i]
        group = pending.setdefault(rec["image"].shape, [])
        group.append((i, rec))
        if len(group) == batch:
            write(*zip(*pending.pop(rec["image"].shape)))
    for group in pending.values():
        write(*zip(*group))
    path = writer.close()
    logging.info("Cached %d examples (latent %s%s, text %s) in %.1fs to %s", num, latent,
                 f", {len(packed['buckets'])} aspect buckets" if packed else "",
                 shapes["text_tokens"] if text else None, time.time() - start, path)
    return path


