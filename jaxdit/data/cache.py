"""Cached training features: latents and text-encoder outputs computed once
(``jaxdit cache``) and read back as a data source (``data.source=cached``).

A cache is a folder of ``.npy`` arrays with one row per example, memory-mapped when read:

* ``latent`` (N, h, w, c) float32: the autoencoder's latents of the images;
* ``text_tokens`` (N, L, D) float16, ``text_mask`` (N, L) bool, ``text_pooled`` (N, D)
  float32: the frozen text encoder's outputs;
* ``label`` (N,) int32, and ``captions.txt`` (one caption per line, for sample grids);
  a cache for a class-conditional model (``text.kind='none'``) has no text arrays
  (``meta["text"]`` is null);
* with ``data.aspect_buckets`` (``meta["packed"]``): each image was encoded at the size of
  its aspect-ratio bucket and ``latent`` holds its packed patches (N, T, p*p*c), with
  ``patch_pos`` (N, T, 2) int32 and ``patch_mask`` (N, T) bool
  (:func:`jaxdit.data.buckets.pack_patches`);
* ``meta.json``: counts, shapes and what produced them (config of the encoder, source).

Writing goes to ``<dir>.partial`` and is renamed into place at the end, so an interrupted
run never leaves a cache that looks complete; reading checks every array against
``meta.json`` and says what is wrong with a damaged one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

ARRAYS = {"latent": np.float32, "text_tokens": np.float16, "text_mask": np.bool_,
          "text_pooled": np.float32, "label": np.int32, "patch_pos": np.int32,
          "patch_mask": np.bool_}
TEXT_ARRAYS = ("text_tokens", "text_mask", "text_pooled")
PACKED_ARRAYS = ("patch_pos", "patch_mask")


def array_names(meta: dict) -> list[str]:
    """The arrays a cache holds: :data:`ARRAYS` without the text ones when it was written
    for a class-conditional model, and without the packing ones unless it is packed."""
    return [k for k in ARRAYS if (meta.get("text") is not None or k not in TEXT_ARRAYS)
            and (meta.get("packed") or k not in PACKED_ARRAYS)]


class CacheError(ValueError):
    """A cache folder that is missing, incomplete or inconsistent."""


class CacheWriter:
    """Writes ``num`` examples into ``out_dir`` (see the module docstring), in any order:
    :meth:`put` fills given rows (e.g. one aspect bucket at a time)."""

    def __init__(self, out_dir: str, num: int, shapes: dict[str, tuple], meta: dict):
        self.final = Path(out_dir)
        self.tmp = Path(f"{out_dir}.partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.num, self.meta = num, meta
        self.arrays = {k: np.lib.format.open_memmap(self.tmp / f"{k}.npy", mode="w+",
                                                    dtype=ARRAYS[k], shape=(num,) + shapes[k])
                       for k in array_names(meta)}
        self.captions: list[str | None] = [None] * num
        self.written = np.zeros(num, bool)

    def put(self, rows, batch: dict, captions: list[str]) -> None:
        """Rows ``rows`` (indices) get ``batch[k][:len(rows)]`` and ``captions``."""
        rows = np.asarray(rows, np.int64)
        n = len(rows)
        for k, a in self.arrays.items():
            a[rows] = np.asarray(batch[k][:n]).astype(a.dtype)
        for r, c in zip(rows, captions):
            self.captions[r] = c.replace("\n", " ")
        self.written[rows] = True

    @property
    def full(self) -> bool:
        return bool(self.written.all())

    def close(self) -> Path:
        if not self.full:
            raise CacheError(f"Only {int(self.written.sum())} of {self.num} examples were "
                             "written.")
        for a in self.arrays.values():
            a.flush()
        del self.arrays
        (self.tmp / "captions.txt").write_text("\n".join(self.captions) + "\n")
        (self.tmp / "meta.json").write_text(json.dumps({**self.meta, "num": self.num}, indent=1))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final


def read_meta(cache_dir: str) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a feature cache (no meta.json); write one with "
                         "`jaxdit cache`.")
    return json.loads(path.read_text())


class CachedSource:
    """Random-access source over a cache: records with ``image`` (the latent), the text
    features, ``label`` and ``caption``."""

    def __init__(self, cache_dir: str):
        if not cache_dir:
            raise CacheError("data.source='cached' needs data.cache_dir (and optionally "
                             "data.val_cache_dir).")
        self.dir = Path(cache_dir)
        self.meta = read_meta(cache_dir)
        n = self.meta["num"]
        self.arrays = {}
        for k in array_names(self.meta):
            dtype = ARRAYS[k]
            try:
                a = np.load(self.dir / f"{k}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CacheError(f"Cache {cache_dir}: cannot read {k}.npy ({e}).") from e
            if a.shape[0] != n or a.dtype != dtype:
                raise CacheError(f"Cache {cache_dir}: {k}.npy is {a.dtype}{list(a.shape)}, "
                                 f"meta.json says {n} rows of {np.dtype(dtype)}.")
            self.arrays[k] = a
        self.captions = (self.dir / "captions.txt").read_text().splitlines()
        if len(self.captions) != n:
            raise CacheError(f"Cache {cache_dir}: {len(self.captions)} captions for {n} rows.")

    def __len__(self):
        return self.meta["num"]

    def __repr__(self):
        return f"CachedSource({str(self.dir)!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict:
        rec = {k: np.asarray(a[index]) for k, a in self.arrays.items()}
        rec["image"] = rec.pop("latent")
        rec["caption"] = self.captions[index]
        return rec


def cached_example(record: dict) -> dict:
    """A cached record as a model-ready example (fp32 features; no tokenization)."""
    out = {"image": record["image"].astype(np.float32),
           "label": np.asarray(record["label"], np.int32)}
    if "text_tokens" in record:
        out.update(text_tokens=record["text_tokens"].astype(np.float32),
                   text_mask=record["text_mask"].astype(bool),
                   text_pooled=record["text_pooled"].astype(np.float32))
    if "patch_pos" in record:
        out.update(patch_pos=record["patch_pos"].astype(np.int32),
                   patch_mask=record["patch_mask"].astype(bool))
    return out


def configure_from_cache(config) -> dict:
    """Sets what the cache fixes (``text.kind='precomputed'``, text width and length, the
    latent autoencoder, the pixel ``data.image_size`` and, for a packed cache, the aspect
    buckets) from ``data.cache_dir``'s ``meta.json``; returns the meta. A validation cache
    must have the same shapes."""
    meta = read_meta(config.data.cache_dir)
    if config.data.val_cache_dir:
        val = read_meta(config.data.val_cache_dir)
        for key in ("image_size", "latent", "text", "packed"):
            if val.get(key) != meta.get(key):
                raise CacheError(f"data.val_cache_dir differs from data.cache_dir in {key}: "
                                 f"{val.get(key)} != {meta.get(key)}.")
    configure_packing(config, meta)
    if meta["text"] is None:  # latents and labels only
        if config.text.kind != "none":
            raise CacheError(f"{config.data.cache_dir} holds no text features (written for a "
                             "class-conditional model): train one (text.kind='none').")
    else:
        config.text.update(kind="precomputed", width=meta["text"]["width"],
                           max_len=meta["text"]["max_len"])
    config.latent.update(**meta["latent"])
    config.data.image_size = meta["image_size"]
    return meta


def configure_packing(config, meta: dict) -> None:
    """A packed cache turns ``data.aspect_buckets`` on with the buckets it was written with;
    its patch size must be the model's. An unpacked cache refuses ``data.aspect_buckets``."""
    packed = meta.get("packed")
    if not packed:
        if config.data.aspect_buckets:
            raise CacheError(f"{config.data.cache_dir} holds whole images, not aspect-bucket "
                             "packed latents: write it with data.aspect_buckets=True or turn "
                             "data.aspect_buckets off.")
        return
    if packed["patch"] != config.model.patch_size:
        raise CacheError(f"{config.data.cache_dir} is packed in patches of {packed['patch']}, "
                         f"but model.patch_size={config.model.patch_size}: write it again "
                         "with the model's patch size.")
    config.data.update(aspect_buckets=True, bucket_max_ratio=packed["bucket_max_ratio"],
                       bucket_filter=packed["bucket_filter"])
