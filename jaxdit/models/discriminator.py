"""PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``, as taming-transformers / LDM /
DQ-VAE train their autoencoders with): images ``(B, H, W, 3)`` -> one real/fake logit per
overlapping patch ``(B, h, w)``.

Layout with ``n_layers=3``, ``ndf=64``: 4x4 convs with padding 1 - stride 2 to ``ndf``
(LeakyReLU 0.2, no norm), stride 2 to 2 ``ndf`` and 4 ``ndf``, stride 1 to 8 ``ndf`` (each
without bias, batch-normalised, LeakyReLU 0.2), then stride 1 to one channel. Weights
start N(0, 0.02), norm scales N(1, 0.02) (taming's ``weights_init``).

Batch norm always uses the statistics of the batch it sees (the discriminator only ever
runs in training, on a real batch or a reconstructed one, as in those repos' training
mode); no running averages are kept, so it has parameters only. Under a data-parallel
mesh the statistics are those of the global batch, so sharded == unsharded.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdit.models.vae import CONV_AXES  # replicated, like the autoencoders' convs

Dtype = Any


class BatchStatNorm(nn.Module):
    """Batch norm over ``(B, H, W)`` with the batch's own statistics: ``(B, H, W, C) ->``
    same shape, learned per-channel scale and bias."""
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(
            lambda k, s: 1.0 + 0.02 * nn.initializers.normal(1.0)(k, s), ("conv_out",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("conv_out",)), (c,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=(0, 1, 2))
        var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale + bias
        return y.astype(x.dtype)


def patch_conv(features: int, stride: int, bias: bool, name: str, dtype) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=bias, dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``(B, H, W, 3)`` -> logits ``(B, h, w)`` (32-px input, 3 layers: 2x2)."""
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(patch_conv(self.ndf, 2, True, "conv0", self.dtype)(
            x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = patch_conv(self.ndf * min(2 ** n, 8), stride, False, f"conv{n}", self.dtype)(h)
            h = nn.leaky_relu(BatchStatNorm(name=f"norm{n}")(h), 0.2)
        logits = patch_conv(1, 1, True, "conv_out", self.dtype)(h)
        return logits[..., 0].astype(jnp.float32)
