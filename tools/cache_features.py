"""Precompute and cache training features: autoencoder latents and frozen text-encoder
outputs, so training reads them instead of running the encoders every step (how large
runs go). Writes the folder format of :mod:`jaxdit.data.cache`.

  python tools/cache_features.py --config experiments/dit_air.py:tiny \\
      --config.text.kind=pretrained --config.text.path=minilm --config.text.layers="(-2,)" \\
      --split train --num 20000 --out cache/train
  python tools/cache_features.py ... --split val --num 512 --out cache/val
  python -m jaxdit.train --config experiments/dit_air.py:tiny --workdir wd \\
      --config.data.source=cached --config.data.cache_dir=cache/train \\
      --config.data.val_cache_dir=cache/val

The text encoder must be frozen (``text.kind=pretrained``); a class-conditional config
(``text.kind=none``: Race-DiT, ImageNet-style labels) caches latents and labels only. Several ``text.layers`` are
cached concatenated, without the trained projection (the denoiser's text adapter maps any
feature width). Captions get ``data.system_prompt`` as in training. Examples are taken in
source order (the training pipeline shuffles the cache).

Latents: ``latent.kind=identity`` caches pixels; ``latent.kind=kl_vae`` with
``--config.latent.vae_workdir=<a KL-VAE run>`` caches its scaled posterior means
(``latent.scale``, or 1 / their std on ``latent.scale_images`` training images), and the
meta records the run and the scale so training from the cache decodes its samples with the
same VAE.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdit.data.cache import CacheWriter
from jaxdit.data.pipeline import Preprocess, make_source, make_tokenizer
from jaxdit.models.text import (PretrainedText, load_pretrained_text, masked_mean,
                                pretrained_text_module)
from jaxdit.train.stages import configure_latent_vae, latent_scale, trained_weights

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path.py:arg).")
flags.DEFINE_string("out", None, "Output cache folder.")
flags.DEFINE_enum("split", "train", ["train", "val"], "Which split of data.source to cache.")
flags.DEFINE_integer("num", 0, "Examples to cache (0 = the whole split).")
flags.DEFINE_integer("batch", 64, "Examples per encoder call.")
flags.mark_flags_as_required(["config", "out"])


def make_encode_fn(cfg):
    """Jitted ``(images, ids, mask) -> latents, tokens, pooled`` for the frozen encoders,
    and the text feature width (a class-conditional model, ``text.kind='none'``: latents
    only, tokens and pooled None, width 0)."""
    encode_images = image_encoder(cfg)
    if cfg.text.kind == "none":
        return jax.jit(lambda images, ids, mask: (encode_images(images), None, None)), 0
    if cfg.text.kind != "pretrained":
        raise ValueError("Caching text features needs a frozen text encoder: set "
                         "text.kind='pretrained' (or 'none' for a class-conditional model; "
                         f"got {cfg.text.kind!r}).")
    module = pretrained_text_module(cfg.text)
    variables = {"params": {"frozen_encoder": load_pretrained_text(cfg.text)}}

    @jax.jit
    def encode(images, ids, mask):
        tokens = module.apply(variables, ids, mask, method=PretrainedText.selected)
        return encode_images(images), tokens, masked_mean(tokens, mask)
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
    scale, shift = float(cfg.latent.scale), float(cfg.latent.get("shift", 0.0))
    logging.info("Latents of the KL-VAE in %s, scale %.4f, shift %.4f", cfg.latent.vae_workdir,
                 scale, shift)
    return lambda images: (unscaled(images) - shift) * scale


def cache_features(cfg, split: str, out: str, num: int = 0, batch: int = 64):
    """Encodes the first ``num`` examples (0 = all) of ``split`` into the cache ``out``."""
    encode, width = make_encode_fn(cfg)
    preprocess = Preprocess(make_tokenizer(cfg), cfg.text.max_len, cfg.data.system_prompt)
    src = make_source(cfg.data, split)
    num = min(num or len(src), len(src))
    s, f = cfg.data.image_size, cfg.latent.downsample
    latent = (s // f, s // f, cfg.latent.channels)
    shapes = {"latent": tuple(latent), "text_tokens": (cfg.text.max_len, width),
              "text_mask": (cfg.text.max_len,), "text_pooled": (width,), "label": ()}
    text = None if cfg.text.kind == "none" else {
        "width": width, "max_len": cfg.text.max_len,
        "encoder": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.text.items()}}
    meta = {"image_size": s, "latent": dict(cfg.latent), "text": text,
            "system_prompt": cfg.data.system_prompt, "source": cfg.data.source,
            "split": split}
    writer = CacheWriter(out, num, shapes, meta)
    start = time.time()
    for lo in range(0, num, batch):
        recs = [src[i] for i in range(lo, min(lo + batch, num))]
        pad = batch - len(recs)  # keep one compiled shape: pad the last batch
        captions = [r["caption"] for r in recs]
        examples = [preprocess.map(r) for r in recs]  # exactly what training would feed
        images, ids, mask = (np.stack([e[k] for e in examples])
                             for k in ("image", "text_ids", "text_mask"))
        if pad:
            images, ids, mask = (np.concatenate([a, np.repeat(a[-1:], pad, 0)])
                                 for a in (images, ids, mask))
        lat, tokens, pooled = encode(images, ids, mask)
        writer.add({"latent": lat, "text_tokens": tokens, "text_mask": mask,
                    "text_pooled": pooled, "label": np.stack([e["label"] for e in examples])},
                   captions)
    path = writer.close()
    logging.info("Cached %d examples (latent %s, text %s) in %.1fs to %s", num, latent,
                 shapes["text_tokens"] if text else None, time.time() - start, path)
    return path


def main(argv):
    del argv
    path = cache_features(FLAGS.config, FLAGS.split, FLAGS.out, FLAGS.num, FLAGS.batch)
    print(f"cached to {path}")


if __name__ == "__main__":
    app.run(main)
