"""Text-image alignment on the shapes data, GenEval-style, by analysing pixels.

A caption of the shapes grammar (:mod:`jaxdit.data.shapes`) names 1-3 objects, each a
colour and a shape, and for two objects a relation ("left of", "right of", "above",
"below"). :func:`detect` finds the objects of an image: pixels within
``color_tol`` (RGB distance) of a palette colour, kept if they cover at least
``min_area`` of the image (each colour appears at most once in the data), with the centroid
as position and the shape read from its bounding box (a square fills it; a triangle has
most of its pixels in the lower half; else a circle). :func:`score` checks the four GenEval-like
categories: colours (every named colour is there), count (as many objects as named),
shapes (each named colour has the named shape) and position (the relation holds between
the two centroids); an image is correct when all its checks pass.

The detector is validated on the data itself (``tests/test_eval.py``): real images score
near 100%, the same images with shuffled captions near chance.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxdit.data.shapes import COLORS, RELATIONS

CATEGORIES = ("color", "count", "shape", "position")
COLOR_TOL = 70.0  # RGB distance from a palette colour that still counts as that colour
_OBJECT = re.compile(r"a (\w+) (circle|square|triangle)")


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    x: float  # centroid, in [0, 1] of the width
    y: float
    area: float  # fraction of the image


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """``[(colour, shape), ...]`` and the relation (None unless two objects)."""
    objects = _OBJECT.findall(caption)
    if not objects or any(c not in COLORS for c, _ in objects):
        raise ValueError(f"Not a caption of the shapes grammar: {caption!r}.")
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    return objects, relation if len(objects) == 2 else None


def to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from uint8 or float in [-1, 1]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip((image.astype(np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of a region: a square fills its bounding box; a triangle (apex up) has far
    fewer pixels in the top half of its box than in the bottom half; else a circle."""
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    if mask.sum() / box > 0.93:
        return "square"
    mid = (ys.min() + ys.max()) / 2.0
    top, bottom = (ys < mid).sum(), (ys > mid).sum()
    return "triangle" if top < 0.6 * max(bottom, 1) else "circle"


def detect(image, color_tol: float = COLOR_TOL, min_area: float = 0.01) -> list[Detection]:
    """Objects in ``image`` (H, W, 3), one per palette colour present."""
    img = to_uint8(image).astype(np.float32)
    h, w, _ = img.shape
    found = []
    for name, rgb in COLORS.items():
        mask = np.linalg.norm(img - np.asarray(rgb, np.float32), axis=-1) < color_tol
        if mask.sum() < min_area * h * w:
            continue
        ys, xs = np.nonzero(mask)
        found.append(Detection(name, classify_shape(mask), (xs.mean() + 0.5) / w,
                               (ys.mean() + 0.5) / h, mask.sum() / (h * w)))
    return found


def _relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    dx, dy = b.x - a.x, b.y - a.y
    return {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[relation]


def score(image, caption: str) -> dict[str, bool]:
    """The checks that apply to ``caption`` (position only for two objects), each True/False,
    plus ``"all"``."""
    objects, relation = parse_caption(caption)
    found = {d.color: d for d in detect(image)}
    checks = {"color": all(c in found for c, _ in objects),
              "count": len(found) == len(objects),
              "shape": all(c in found and found[c].shape == s for c, s in objects)}
    if relation is not None:
        (c1, _), (c2, _) = objects
        checks["position"] = bool(c1 in found and c2 in found
                                  and _relation_holds(found[c1], found[c2], relation))
    checks["all"] = all(checks.values())
    return checks


def alignment_scores(images, captions) -> dict[str, float]:
    """Mean of each check over the images it applies to: ``align/<category>`` and
    ``align/overall`` (the fraction of images with every check passed)."""
    per_image = [score(img, cap) for img, cap in zip(images, captions)]
    out = {}
    for name in CATEGORIES + ("all",):
        vals = [s[name] for s in per_image if name in s]
        if vals:
            out[f"align/{'overall' if name == 'all' else name}"] = float(np.mean(vals))
    return out

