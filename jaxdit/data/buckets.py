"""Aspect-ratio buckets and packed patch sequences for variable-resolution training
(Lumina-Image 2.0, official ``imgproc.py``).

Every image is resized and centre-cropped to the bucket closest to its aspect ratio; all
buckets hold at most ``num_patches`` patches. Each example is then cut into patches and
padded to ``num_patches`` tokens with ``patch_pos`` (row, col) and ``patch_mask``, so a batch
mixing e.g. 48x24, 32x32 and 24x48 images has one static shape: one compiled train step
serves every bucket, and the model masks the padding (:class:`jaxdit.models.lumina.Lumina`).
In latent space the same packing is applied to each image's latent, encoded at its bucket
size, by ``jaxdit cache``.
"""
from __future__ import annotations

import grain
import numpy as np
from PIL import Image

# Pure reshapes/transposes: on numpy inputs they stay numpy (no device work in data workers).
from jaxdit.models.layers import patchify, unpatchify


def official_side_filter(side_px: int) -> bool:
    """The official list's extra condition on each side: ``(side // 32) % 2 == 0``."""
    return (side_px // 32) % 2 == 0


SIDE_FILTERS = {"": None, "official": official_side_filter}


def crop_size_list(num_patches: int, patch_px: int, max_ratio: float = 4.0,
                   side_filter: str = ""):
    """Bucket sizes ``[(height, width), ...]`` in pixels: for each patch-grid width ``wp``
    the tallest ``hp`` with ``wp * hp <= num_patches`` and aspect ratio at most
    ``max_ratio`` (the official walk from wide to tall); ``side_filter`` in
    :data:`SIDE_FILTERS` keeps only some sides. The official 1024-px list is
    ``crop_size_list(4096, 16, 4.0, "official")``: 51 buckets."""
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}.")
    if side_filter not in SIDE_FILTERS:
        raise ValueError(f"Unknown side_filter {side_filter!r}; available: {list(SIDE_FILTERS)}.")
    keep = SIDE_FILTERS[side_filter] or (lambda side: True)
    sizes, wp, hp = [], num_patches, 1
    while wp > 0:
        h, w = hp * patch_px, wp * patch_px
        if max(wp, hp) / min(wp, hp) <= max_ratio and keep(h) and keep(w):
            sizes.append((h, w))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return sizes


def nearest_bucket(height: int, width: int, buckets):
    """The bucket keeping most of the image after a cover-resize and centre crop."""
    def kept(b):
        sh, sw = b[0] / height, b[1] / width
        return min(sh, sw) / max(sh, sw)
    return max(buckets, key=kept)


def resize_to_bucket(img: np.ndarray, bucket) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 ``bucket`` (h, w, 3): resize to cover, then centre crop."""
    bh, bw = bucket
    h, w = img.shape[:2]
    scale = max(bh / h, bw / w)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - bh) // 2, (nw - bw) // 2
    return img[top:top + bh, left:left + bw]


def pack_patches(image: np.ndarray, patch: int, num_tokens: int) -> dict:
    """float (H, W, C) -> ``image`` (num_tokens, patch*patch*C) row-major patches (padding
    zero), ``patch_pos`` (num_tokens, 2) int32 (row, col) and ``patch_mask`` bool."""
    h, w = image.shape[0] // patch, image.shape[1] // patch
    if h * w > num_tokens:
        raise ValueError(f"Image {image.shape[:2]} has {h * w} patches, more than the "
                         f"{num_tokens} a packed example holds.")
    tokens = patchify(np.asarray(image)[None, :h * patch, :w * patch], patch)[0]
    out = np.zeros((num_tokens, tokens.shape[-1]), np.float32)
    out[:h * w] = tokens
    pos = np.zeros((num_tokens, 2), np.int32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos[:h * w] = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
    mask = np.arange(num_tokens) < h * w
    return {"image": out, "patch_pos": pos, "patch_mask": mask}


def unpack_patches(tokens, pos, mask, patch: int, channels: int = 3) -> np.ndarray:
    """Inverse of :func:`pack_patches` for one example: (N, p*p*C) -> (H, W, C)."""
    pos, mask = np.asarray(pos)[np.asarray(mask)], np.asarray(mask)
    h, w = pos[:, 0].max() + 1, pos[:, 1].max() + 1
    return unpatchify(np.asarray(tokens)[mask][None], patch, h * patch, w * patch, channels)[0]


class PackPatches(grain.transforms.Map):
    """Example with ``image`` (H, W, C) -> the packed fields of :func:`pack_patches`."""

    def __init__(self, patch: int, num_tokens: int):
        self.patch, self.num_tokens = patch, num_tokens

    def map(self, example):
        return {**example, **pack_patches(example["image"], self.patch, self.num_tokens)}
