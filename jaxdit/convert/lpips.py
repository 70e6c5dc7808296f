"""LPIPS weights (torchvision VGG16 ``features`` + the ``lpips`` package's v0.1 linear
heads, as numpy state dicts) -> params of :class:`jaxdit.models.lpips.LPIPS`.

Accepted names: torchvision's ``features.<i>.weight`` / ``.bias`` (a ``vgg16-*.pth`` file,
or ``net.slice<k>.<i>.*`` from a whole ``lpips.LPIPS`` state dict) for the trunk, and
``lin<j>.model.1.weight`` (``(1, C, 1, 1)``; ``lin<j>.model.0.weight`` without dropout)
for the heads. ``tools/convert_lpips.py`` reads the ``.pth`` files and saves the result.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jaxdit.convert.common import ConversionError, check_and_unflatten
from jaxdit.models.lpips import TAP_CHANNELS, vgg16_conv_indices

_TRUNK = re.compile(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^lin(\d)\.model\.[01]\.weight$")


def split_state_dict(sd: Mapping) -> tuple[dict, dict]:
    """``(trunk, heads)``: ``{features index: {"weight", "bias"}}`` and ``{j: weight}``;
    other names (the package's ScalingLayer buffers, a classifier) are ignored."""
    trunk, heads = {}, {}
    for name, value in sd.items():
        if m := _TRUNK.match(name):
            trunk.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value, np.float32)
        elif m := _HEAD.match(name):
            heads[int(m.group(1))] = np.asarray(value, np.float32)
    return trunk, heads


def lpips_from_torch(vgg: Mapping, heads: Mapping, expected) -> dict:
    """Params tree shaped like ``expected`` (LPIPS params, e.g. ``jax.eval_shape`` of its
    init) from a VGG16 state dict and a heads state dict (one dict may hold both)."""
    trunk, _ = split_state_dict(vgg)
    _, lins = split_state_dict(heads)
    out = {}
    for n, index in enumerate(vgg16_conv_indices()):
        conv = trunk.get(index)
        if conv is None or set(conv) != {"weight", "bias"}:
            raise ConversionError(f"VGG16 weights: features.{index} (conv {n}) is missing; "
                                  "expected torchvision's vgg16 state dict.")
        out[f"vgg/conv{n}/kernel"] = conv["weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        out[f"vgg/conv{n}/bias"] = conv["bias"]
    for j in range(len(TAP_CHANNELS)):
        if j not in lins:
            raise ConversionError(f"LPIPS heads: lin{j}.model.1.weight is missing; expected "
                                  "the lpips package's weights/v0.1/vgg.pth.")
        out[f"lin{j}"] = lins[j].reshape(-1)  # (1, C, 1, 1) -> (C,)
    return check_and_unflatten(out, expected)
