"""Grain input pipelines: source -> per-host slice -> shuffle -> repeat -> preprocess -> batch.

Batches are dicts of numpy arrays: ``image`` float32 (B, S, S, 3) in [-1, 1], ``text_ids``
int32 (B, L), ``text_mask`` bool (B, L), ``label`` int32 (B,). With ``data.aspect_buckets``
``image`` is instead packed patches (B, N, p*p*C) with ``patch_pos`` (B, N, 2) and
``patch_mask`` (B, N), see :mod:`jaxdit.data.buckets`: pixels packed here, or latents packed
by ``jaxdit cache`` (``data.source='cached'``). The iterator is a Grain
``DatasetIterator`` whose state is saved in every checkpoint, so resuming continues with
exactly the batch the interrupted run would have seen next.
"""
from __future__ import annotations

import grain
import numpy as np

from jaxdit.data import buckets, cache, prompts, shapes
from jaxdit.data.sources import ImageFolderSource, TfdsSource
from jaxdit.data.tokenizer import HFTokenizer, WordTokenizer
from jaxdit.models.pretrained_text import text_encoder_dir

SOURCES = ("shapes", "folder", "tfds", "cached")


def packed_tokens(config) -> int:
    """Patches per packed example: those of a square ``data.image_size`` image."""
    side = config.data.image_size // (config.model.patch_size * config.latent.downsample)
    return side * side


def bucket_sizes(config):
    """Aspect-ratio buckets ``[(h, w), ...]`` in pixels holding at most
    :func:`packed_tokens` patches, or None when ``data.aspect_buckets`` is off."""
    d = config.data
    if not d.aspect_buckets:
        return None
    patch_px = config.model.patch_size * config.latent.downsample
    return buckets.crop_size_list(packed_tokens(config), patch_px, d.bucket_max_ratio,
                                  d.bucket_filter)


def make_source(data_cfg, split: str, sizes=None):
    """Random-access source for ``split`` in {"train", "val"}; ``sizes``: aspect buckets."""
    kind = data_cfg.source
    if kind == "shapes":
        n = data_cfg.num_train if split == "train" else data_cfg.num_val
        seed = data_cfg.seed + (0 if split == "train" else 1_000_003)  # held-out stream
        return shapes.ShapesSource(n, data_cfg.image_size, seed, data_cfg.max_objects, sizes)
    if kind == "folder":
        root = data_cfg.folder if split == "train" else (data_cfg.val_folder or data_cfg.folder)
        if not root:
            raise ValueError("data.source='folder' needs data.folder=<directory of images>.")
        return ImageFolderSource(root, data_cfg.image_size, sizes,
                                 strict=data_cfg.strict)
    if kind == "cached":
        return cache.CachedSource(data_cfg.cache_dir if split == "train"
                                  else (data_cfg.val_cache_dir or data_cfg.cache_dir))
    if kind == "tfds":
        if not data_cfg.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name.")
        tfds_split = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_val_split
        return TfdsSource(data_cfg.tfds_name, tfds_split, data_cfg.image_size,
                          data_cfg.tfds_data_dir or None, label_key=data_cfg.tfds_label_key or None,
                          caption_key=data_cfg.tfds_caption_key or None, buckets=sizes)
    raise ValueError(f"Unknown data.source {kind!r}; available: {SOURCES}.")


def make_tokenizer(config):
    """The pretrained encoder's own tokenizer (``text.kind='pretrained'``), else a
    :class:`WordTokenizer` over ``text.vocab`` (built from the training captions of a
    folder / TFDS source: :mod:`jaxdit.data.vocabulary`; the shapes grammar when empty),
    the configured system prompts and ``data.extra_vocab`` (space separated words)."""
    if config.text.kind == "pretrained":
        return HFTokenizer(str(text_encoder_dir(config.text.path) / "tokenizer.json"))
    data_cfg = config.data
    words = prompts.prompt_words(data_cfg.system_prompt, data_cfg.sample_system_prompt)
    base = config.text.vocab.split() if config.text.vocab else list(shapes.VOCAB)
    return WordTokenizer(base + words + data_cfg.extra_vocab.split())


class Preprocess(grain.transforms.Map):
    """Record -> model-ready example (normalised image, token ids and mask, label); the
    caption gets the ``system_prompt`` template (:mod:`jaxdit.data.prompts`)."""

    def __init__(self, tokenizer, max_len: int, system_prompt: str = ""):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.system_prompt = system_prompt
        prompts.system_prompt(system_prompt)  # fail early on an unknown name

    def map(self, record):
        caption = prompts.apply_template(record["caption"], self.system_prompt)
        ids, mask = self.tokenizer.encode(caption, self.max_len)
        return {"image": record["image"].astype(np.float32) / 127.5 - 1.0,
                "text_ids": ids, "text_mask": mask,
                "label": np.asarray(record["label"], np.int32)}


def make_dataset(config, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, repeat: bool = True) -> grain.IterDataset:
    """Per-host batched dataset (``batch_size`` is the per-host batch)."""
    sizes = bucket_sizes(config)
    src = make_source(config.data, split, sizes)
    ds = grain.MapDataset.source(src)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) < batch_size:
        raise ValueError(f"The {split} split has {len(ds)} examples per host, fewer than the "
                         f"per-host batch size {batch_size}.")
    if split == "train":
        ds = ds.shuffle(seed=config.data.seed)
    if repeat:
        ds = ds.repeat(None)
    if config.data.source == "cached":  # features computed already: nothing to tokenize
        ds = ds.map(cache.cached_example)
    else:
        ds = ds.map(Preprocess(make_tokenizer(config), config.text.max_len,
                               config.data.system_prompt))
    if sizes and config.data.source != "cached":  # a packed cache is packed already
        ds = ds.map(buckets.PackPatches(config.model.patch_size, packed_tokens(config)))
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
