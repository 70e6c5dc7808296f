"""LPIPS (Zhang et al. 2018, v0.1 with the VGG16 trunk): the perceptual distance the
autoencoders train with (``vae.lpips_weight``).

``LPIPS()(x, y) -> (B,)`` for images ``(B, H, W, 3)`` in [-1, 1]: both images are shifted
and scaled channel-wise (the package's ``ScalingLayer``), run through VGG16's 13 convs, and
at the five taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) the features are unit-
normalised over channels; the squared differences are weighted per channel by the linear
heads (1x1 convs without bias, ``lin0..lin4``), averaged over positions and summed over
taps. The weights are frozen: they come from local files converted by
``tools/convert_lpips.py`` (torchvision's VGG16 + the ``lpips`` package's v0.1 heads) and
sit under ``frozen_lpips`` in the train state, so the optimizer never moves them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.vae import CONV_AXES  # replicated, like the autoencoders' convs

Dtype = Any
# VGG16 ``features``: channels of each 3x3 conv; "M" = 2x2 max pool. torchvision indexes
# the convs 0, 2, 5, ... (a ReLU after each, pools at 4, 9, 16, 23).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512)
TAPS = (1, 3, 6, 9, 12)  # conv numbers (0-based, pools not counted) after which LPIPS reads
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # the lpips package's ScalingLayer
SCALE = (0.458, 0.448, 0.450)


def vgg16_conv_indices() -> list[int]:
    """torchvision ``features`` index of each of the 13 convs, in order."""
    indices, i = [], 0
    for item in VGG16_LAYOUT:
        if item == "M":
            i += 1
        else:
            indices.append(i)
            i += 2  # conv + ReLU
    return indices


def unit_normalize(x, eps: float = 1e-10):
    """``x / (||x||_channels + eps)`` over the last axis (the package's normalize_tensor)."""
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def max_pool2(x):
    """2x2 max pool, stride 2, floor (torch's MaxPool2d(2, 2)): ``(B, H, W, C) -> (B, H//2,
    W//2, C)``."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG16Features(nn.Module):
    """VGG16 convs; ``(B, H, W, 3)`` -> the five tap activations ``[(B, H/2**i, W/2**i,
    TAP_CHANNELS[i])]`` (after their ReLU)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps, n = [], 0
        for item in VGG16_LAYOUT:
            if item == "M":
                x = max_pool2(x)
                continue
            x = nn.relu(nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                kernel_init=nn.with_logical_partitioning(
                                    nn.initializers.lecun_normal(), CONV_AXES),
                                bias_init=nn.with_logical_partitioning(
                                    nn.initializers.zeros, ("conv_out",)),
                                name=f"conv{n}")(x))
            if n in TAPS:
                taps.append(x)
            n += 1
        return taps


class LPIPS(nn.Module):
    """Perceptual distance ``(x, y) -> (B,)`` of two image batches ``(B, H, W, 3)`` in
    [-1, 1] (the inputs need at least 16 pixels a side for the fifth tap)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
        feats = VGG16Features(self.dtype, name="vgg")(((both - shift) / scale).astype(self.dtype))
        b = x.shape[0]
        total = jnp.zeros((b,), jnp.float32)
        for i, f in enumerate(feats):
            f = f.astype(jnp.float32)
            diff = jnp.square(unit_normalize(f[:b]) - unit_normalize(f[b:]))
            weight = self.param(f"lin{i}", nn.with_logical_partitioning(
                nn.initializers.uniform(0.1), ("conv_out",)), (f.shape[-1],))
            total = total + jnp.mean(diff @ weight.astype(jnp.float32), axis=(1, 2))
        return total

