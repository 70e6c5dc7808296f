"""Procedural text-to-image data: coloured shapes with matching English captions.

Each record is generated from ``(seed, index)`` alone, so the dataset is deterministic,
needs no files, and is a Grain random-access source of any size. A record holds:

* ``image``: uint8 ``(S, S, 3)``; 1-3 objects (circle / square / triangle) in one of
  ``COLORS`` on a dark background;
* ``caption``: e.g. ``"a red circle left of a blue square"``, ``"a green triangle above a
  yellow circle"``, ``"a white square, a red circle and a blue triangle"``;
* ``label``: class of the first object, ``shape * len(COLORS) + color`` (18 classes), for
  class-conditional models (use ``max_objects=1`` for clean class data);
* ``obj_shape``/``obj_color``/``obj_x``/``obj_y`` (3,) and ``num_objects``: ground truth
  for alignment metrics (-1 / 0 for absent objects).
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
RELATIONS = ("left of", "right of", "above", "below")
NUM_CLASSES = len(SHAPES) * len(COLORS)
VOCAB = (["a", "and"] + list(SHAPES) + list(COLOR_NAMES)
         + [w for r in RELATIONS for w in r.split()])


def class_name(label: int) -> str:
    shape, color = divmod(int(label), len(COLORS))
    return f"a {COLOR_NAMES[color]} {SHAPES[shape]}"


def _shape_mask(kind: int, height: int, width: int, cx: float, cy: float,
                r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if SHAPES[kind] == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if SHAPES[kind] == "square":
        h = 0.85 * r
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # Upward triangle: apex above the centre, flat base below.
    top, base = cy - r, cy + 0.6 * r
    half_w = (yy - top) / (base - top) * 0.95 * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half_w)


def _regions(n: int, relation: int, rng) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) in unit coordinates, one per object, matching the caption."""
    if n == 1:
        return [(0.0, 0.0, 1.0, 1.0)]
    if n == 2:
        left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
        top, bottom = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
        return [[left, right], [right, left], [top, bottom], [bottom, top]][relation]
    order = rng.permutation(3)
    return [(order[i] / 3, 0.0, (order[i] + 1) / 3, 1.0) for i in range(3)]


class ShapesSource:
    """Grain ``RandomAccessDataSource`` of procedural shape images (deterministic by index).

    ``sizes``: optional list of ``(height, width)``; each record is then drawn at one of them
    (chosen by index), for aspect-ratio bucketed training. Default: square ``image_size``.
    """

    def __init__(self, num_records: int = 50_000, image_size: int = 32, seed: int = 0,
                 max_objects: int = 3, sizes=None):
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}.")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}.")
        self.num_records, self.image_size = int(num_records), int(image_size)
        self.seed, self.max_objects = int(seed), int(max_objects)
        self.sizes = [tuple(int(v) for v in hw) for hw in sizes] if sizes else None
        if self.sizes and min(min(hw) for hw in self.sizes) < 16:
            raise ValueError(f"Every size must be >= 16 pixels, got {self.sizes}.")

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:  # Grain checks the source repr when restoring iterator state.
        return (f"ShapesSource(num_records={self.num_records}, image_size={self.image_size}, "
                f"seed={self.seed}, max_objects={self.max_objects}, sizes={self.sizes})")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_records:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(index)])
        h = w = self.image_size
        if self.sizes:  # own stream, so square records are the same with or without sizes
            pick = np.random.default_rng([self.seed, int(index), 1]).integers(len(self.sizes))
            h, w = self.sizes[pick]
        n = int(rng.integers(1, self.max_objects + 1))
        relation = int(rng.integers(len(RELATIONS)))
        shapes = rng.integers(len(SHAPES), size=n)
        colors = rng.choice(len(COLORS), size=n, replace=False)
        bg = rng.integers(10, 45, size=3)
        img = np.broadcast_to(bg, (h, w, 3)).astype(np.float32).copy()
        xs, ys = np.zeros(3, np.float32), np.zeros(3, np.float32)
        for i, (x0, y0, x1, y1) in enumerate(_regions(n, relation, rng)):
            r = rng.uniform(0.13, 0.2) * min(h, w) * (1.0 if n == 1 else 0.85)
            r = min(r, 0.45 * min(w * (x1 - x0), h * (y1 - y0)))
            cx = rng.uniform(x0 * w + r, x1 * w - r)
            cy = rng.uniform(y0 * h + r, y1 * h - r)
            img[_shape_mask(int(shapes[i]), h, w, cx, cy, r)] = COLORS[COLOR_NAMES[colors[i]]]
            xs[i], ys[i] = cx / w, cy / h
        img += rng.normal(0, 3.0, size=img.shape)
        pad = lambda a: np.concatenate([a, -np.ones(3 - n, np.int32)]).astype(np.int32)
        return {
            "image": np.clip(img, 0, 255).astype(np.uint8),
            "caption": self.caption(shapes, colors, relation),
            "label": np.int32(shapes[0] * len(COLORS) + colors[0]),
            "num_objects": np.int32(n),
            "obj_shape": pad(shapes), "obj_color": pad(colors),
            "obj_x": xs, "obj_y": ys,
        }

    @staticmethod
    def caption(shapes, colors, relation: int) -> str:
        names = [f"a {COLOR_NAMES[c]} {SHAPES[k]}" for k, c in zip(shapes, colors)]
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return f"{names[0]} {RELATIONS[relation]} {names[1]}"
        return f"{names[0]}, {names[1]} and {names[2]}"
