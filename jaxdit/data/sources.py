"""Random-access data sources besides the procedural shapes: image folders and TFDS.

Each yields records ``{"image": uint8 (S, S, 3), "caption": str, "label": int32}``, or with
``buckets`` the image resized and cropped to the aspect-ratio bucket nearest its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdit.errors import ConfigError
from jaxdit.data.buckets import nearest_bucket, resize_to_bucket

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> uint8 HxWx3."""
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW[xC] -> uint8 (size, size, 3): centre square crop then bicubic resize."""
    img = to_rgb(img)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top:top + s, left:left + s]
    if s != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img.astype(np.uint8)


def fit_image(img: np.ndarray, size: int, buckets=None) -> np.ndarray:
    """Square ``size`` crop, or the nearest aspect-ratio bucket when ``buckets`` is given."""
    if not buckets:
        return center_crop_resize(img, size)
    img = to_rgb(img)
    return resize_to_bucket(img, nearest_bucket(img.shape[0], img.shape[1], buckets))


_WARNED: set[str] = set()  # roots whose skipped files were reported (once per process)
_CHECKED: dict[tuple, list[Path]] = {}  # (root, strict, files) -> the readable ones
_ANNOUNCE_CHECK = 2_000  # folders this large say that their images are being checked


def unreadable(path: Path) -> str:
    """Why the image at ``path`` or its ``.txt`` caption cannot be read ("" if both can):
    the image is decoded whole (a truncated file fails here, not mid-run) and the caption
    must be UTF-8."""
    try:
        im = Image.open(path)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        return f"not an image: {type(e).__name__}"
    try:
        with im:
            im.load()
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad data
        return f"does not decode: {str(e)[:60] or type(e).__name__}"
    txt = path.with_suffix(".txt")
    if txt.exists():
        try:
            txt.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return f"caption {txt.name} is not UTF-8"
    return ""


class ImageFolderSource:
    """Images under ``root`` (recursively) with captions in same-stem ``.txt`` files.

    The label is the index of the image's first-level sub-folder (sorted), 0 when images sit
    directly in ``root`` - so ``root/<class>/<img>`` works for class-conditional training.
    """

    def __init__(self, root: str, image_size: int, buckets=None, strict: bool = False):
        self.root, self.image_size = str(root), int(image_size)
        self.buckets = buckets
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Image folder {self.root!r} does not exist.")
        files = sorted(p for p in Path(self.root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files = self._readable(files, strict)
        if not files:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root!r}.")
        self.files = [str(p) for p in files]
        classes = sorted({p.relative_to(self.root).parts[0] for p in files
                          if len(p.relative_to(self.root).parts) > 1})
        self.class_index = {c: i for i, c in enumerate(classes)}

    def _readable(self, files: list[Path], strict: bool) -> list[Path]:
        """``files`` whose image decodes and caption reads; the others are left out with
        one warning naming the first few (``strict``: refused instead)."""
        key = (self.root, strict, tuple(files))
        if key in _CHECKED:  # the same folder opened again in this process (train, val)
            return _CHECKED[key]
        if len(files) >= _ANNOUNCE_CHECK:
            print(f"Checking that the {len(files):,} images under {self.root!r} decode ...",
                  flush=True)
        bad = [(p, why) for p in files if (why := unreadable(p))]
        _CHECKED[key] = self._report(files, bad, strict)
        return _CHECKED[key]

    def _report(self, files: list[Path], bad: list[tuple[Path, str]], strict: bool):
        """``files`` without ``bad``, reported in one warning (``strict``: refused)."""
        if not bad:
            return files
        names = ", ".join(f"{p.relative_to(self.root)} ({why})" for p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        if strict:
            raise ConfigError(f"{len(bad)} of {len(files)} images under {self.root!r} cannot "
                              f"be read: {names}{more}. Fix or remove them, or set "
                              "data.strict=False to skip them.")
        if self.root not in _WARNED:
            _WARNED.add(self.root)
            print(f"Warning: skipping {len(bad)} of {len(files)} images under {self.root!r} "
                  f"that cannot be read: {names}{more} (data.strict=True refuses instead).",
                  flush=True)
        skip = {p for p, _ in bad}
        return [p for p in files if p not in skip]

    def __len__(self):
        return len(self.files)

    def captions(self, limit: int) -> list[str]:
        """The captions of the first ``limit`` images ("" where an image has none)."""
        out = []
        for f in self.files[:limit]:
            txt = Path(f).with_suffix(".txt")
            out.append(txt.read_text(encoding="utf-8").strip() if txt.exists() else "")
        return out

    def __repr__(self):
        return f"ImageFolderSource(root={self.root!r}, n={len(self.files)}, size={self.image_size})"

    def __getitem__(self, index: int) -> dict:
        path = Path(self.files[index])
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.exists() else ""
        parts = path.relative_to(self.root).parts
        label = self.class_index.get(parts[0], 0) if len(parts) > 1 else 0
        return {"image": fit_image(img, self.image_size, self.buckets), "caption": caption,
                "label": np.int32(label)}


class TfdsSource:
    """A TFDS dataset read through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed).

    ``caption_key``: a text feature, or None to use the class name of ``label_key`` as the
    caption (or "" when the dataset has no label names).
    """

    def __init__(self, name: str, split: str, image_size: int, data_dir: str | None = None,
                 image_key: str = "image", label_key: str | None = "label",
                 caption_key: str | None = None, buckets=None):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        self.name, self.split, self.image_size = name, split, int(image_size)
        self.buckets = buckets
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        self.label_names = None
        if label_key is not None:
            builder = tfds.builder(name, data_dir=data_dir)
            feat = builder.info.features[label_key]
            self.label_names = getattr(feat, "names", None)

    def __len__(self):
        return len(self.source)

    def captions(self, limit: int) -> list[str]:
        """The captions of the first ``limit`` examples: the caption feature's, else the
        label names (each once), else none."""
        if self.caption_key:
            return [self._caption(self.source[i], 0) for i in range(min(limit, len(self)))]
        if self.label_names:
            return [self._caption({}, i) for i in range(len(self.label_names))]
        return []

    def _caption(self, example: dict, label: int) -> str:
        if self.caption_key:
            cap = example[self.caption_key]
            return cap.decode() if isinstance(cap, bytes) else str(cap)
        if self.label_names:
            return str(self.label_names[label]).replace("_", " ")
        return ""

    def __repr__(self):
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, size={self.image_size})"

    def __getitem__(self, index: int) -> dict:
        ex = self.source[index]
        label = int(ex[self.label_key]) if self.label_key else 0
        caption = self._caption(ex, label)
        return {"image": fit_image(np.asarray(ex[self.image_key]), self.image_size, self.buckets),
                "caption": caption, "label": np.int32(label)}
