"""Entropy thresholds of D2iT's grain maps from dataset percentiles.

The DVAE marks a region fine when its entropy (:func:`jaxdit.models.dvae.region_entropy`)
is above a threshold; the threshold is the ``100 * (1 - fine_ratio)`` percentile of the
region entropies of the training images, computed here with *exactly* the encoder's
function (``tools/grain_thresholds.py`` writes the 1..99 percentiles to a JSON file that
``dvae.thresholds_file`` reads). Ties (e.g. flat backgrounds, all of one entropy) make the
realised fine ratio lower than asked; it is reported during training (``fine_ratio``).
"""
from __future__ import annotations

import json

import jax
import numpy as np

from jaxdit.data.pipeline import make_source
from jaxdit.models.dvae import region_entropy, region_size

PERCENTILES = tuple(range(1, 100))


def dataset_entropies(config, num_images: int, split: str = "train",
                      batch: int = 64) -> np.ndarray:
    """Region entropies of the first ``num_images`` images of ``split`` (flat float32)."""
    source = make_source(config.data, split)
    n = min(num_images, len(source))
    if n == 0:
        raise ValueError(f"The {split} split is empty: no images to compute thresholds from.")
    d = config.dvae
    fn = jax.jit(lambda x: region_entropy(x, region_size(config.vae.ch_mult), int(d.bins), float(d.sigma)))
    out = []
    for start in range(0, n, batch):
        imgs = np.stack([source[i]["image"] for i in range(start, min(n, start + batch))])
        out.append(np.asarray(fn(imgs.astype(np.float32) / 127.5 - 1.0)).ravel())
    return np.concatenate(out)


def percentile_table(entropies: np.ndarray) -> dict[str, float]:
    """``{"1": p1, ..., "99": p99}`` of the entropies."""
    values = np.percentile(entropies, PERCENTILES)
    return {str(p): float(v) for p, v in zip(PERCENTILES, values)}


def threshold_for_ratio(table: dict[str, float], fine_ratio: float) -> float:
    """Threshold giving ``fine_ratio`` fine regions: the ``100 (1 - ratio)`` percentile,
    interpolated between the table's integer percentiles."""
    if not 0.0 < fine_ratio < 1.0:
        raise ValueError(f"dvae.fine_ratio must be in (0, 1), got {fine_ratio}.")
    q = 100.0 * (1.0 - fine_ratio)
    keys = np.asarray(sorted(int(k) for k in table))
    vals = np.asarray([table[str(k)] for k in keys])
    return float(np.interp(q, keys, vals))


def resolve_threshold(config) -> float:
    """Sets ``config.dvae.threshold`` (if negative) from ``dvae.thresholds_file`` or from
    ``dvae.threshold_images`` training images, and returns it."""
    d = config.dvae
    if d.threshold >= 0:
        return float(d.threshold)
    if d.thresholds_file:
        with open(d.thresholds_file, encoding="utf-8") as f:
            table = json.load(f)
        if "percentiles" in table:
            table = table["percentiles"]
    else:
        table = percentile_table(dataset_entropies(config, int(d.threshold_images)))
    d.threshold = threshold_for_ratio(table, float(d.fine_ratio))
    return float(d.threshold)
