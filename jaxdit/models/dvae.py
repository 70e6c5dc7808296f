"""D2iT's Dynamic VAE (DVAE): a hierarchical encoder with two grains, Dynamic Grained
Coding by region entropy, neighbour copying onto the fine grid, a KL-regularised
continuous latent and a positional decoder.

D2iT's code is unreleased; these are the choices of ``docs/lumina_d2it_spec.md`` part 2 (from
the predecessor DQ-VAE of the same group), each configurable (``config.dvae``):

* **Two grains**: fine = downsampling ``2**fine_level`` (8 at 256 px), coarse = twice that
  (16), i.e. ``fine_level + 2`` encoder levels. A *region* is one coarse cell
  (``2**(fine_level+1)`` pixels square); the grain map has one entry per region, ``1`` =
  fine, ``0`` = coarse (the paper's figures write them 2 and 1).
* **Entropy** (:func:`region_entropy`): gray ``0.2989 R + 0.5870 G + 0.1140 B`` of the
  [-1, 1] image, per region a Gaussian-kernel histogram over ``bins`` (32) centres
  ``linspace(-1, 1)`` with ``sigma`` 0.01, normalised, natural-log Shannon entropy. The
  thresholds come from dataset percentiles computed with this same function
  (``tools/grain_thresholds.py``; the DQ-VAE's offline script used other bin centres than
  its model, which skews the ratio). A region is fine when its entropy is above the
  threshold for the target fine ratio (``dvae.fine_ratio``, 0.5 as DQ-VAE).
* **Neighbour copying** (:func:`neighbor_copy`): the coarse code of a coarse region fills
  its 2x2 block of the fine grid, so the latent is dense ``(B, H/f, W/f, z)``.
* **Continuous latent**: each branch ends in a :class:`MomentsHead` (mean, log-variance);
  the moments are merged by the grain map, sampled, and regularised by a KL term
  (``dvae.kl_weight``; LDM uses ~1e-6). Training losses are L1 + L2 reconstruction + KL
  (:mod:`jaxdit.train.autoencoder`); perceptual/adversarial terms are not implemented.
* **Decoder**: the LDM decoder from the fine grid with learned row/column embeddings
  added to the latent (DQ-VAE's ``DecoderPositional``; its Fourier term is left out).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.errors import ConfigError
from jaxdit.models.family import Family, image_example_inputs
from jaxdit.models.vae import (ConvDecoder, ConvEncoder, MomentsHead, autoencoder_kwargs,
                               downsample_factor, gaussian_kl)

Dtype = Any
GRAY = (0.2989, 0.5870, 0.1140)


def fine_downsample(ch_mult) -> int:
    """Pixels per fine latent cell of a DVAE with encoder levels ``ch_mult``."""
    return 2 ** (len(ch_mult) - 2)


def region_size(ch_mult) -> int:
    """Pixels per grain-map region (one coarse cell) of a DVAE with levels ``ch_mult``."""
    return downsample_factor(ch_mult)


def region_entropy(images, region: int, bins: int = 32, sigma: float = 0.01):
    """Per-region entropy of gray intensities: ``(B, H, W, 3)`` in [-1, 1] ->
    ``(B, H/region, W/region)`` float32 (see the module docstring)."""
    b, h, w, _ = images.shape
    if h % region or w % region:
        raise ValueError(f"Image size {(h, w)} is not divisible by the region size {region}.")
    gray = jnp.tensordot(images.astype(jnp.float32), jnp.asarray(GRAY, jnp.float32), axes=1)
    patches = gray.reshape(b, h // region, region, w // region, region)
    patches = patches.transpose(0, 1, 3, 2, 4).reshape(b, h // region, w // region, -1)
    centres = jnp.linspace(-1.0, 1.0, bins, dtype=jnp.float32)
    density = jnp.exp(-0.5 * jnp.square((patches[..., None] - centres) / sigma)).mean(axis=-2)
    p = density / (density.sum(axis=-1, keepdims=True) + 1e-30)
    return -(p * jnp.log(p + 1e-30)).sum(axis=-1)


def grain_map(entropy, threshold: float):
    """Fine (1) where the region entropy exceeds ``threshold``, else coarse (0); int32."""
    return (entropy > threshold).astype(jnp.int32)


def upsample2(x):
    """Nearest x2 in both spatial axes: ``(B, h, w, ...)`` -> ``(B, 2h, 2w, ...)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def fine_mask(grain, dtype=jnp.float32):
    """Grain map ``(B, h, w)`` -> fine-grid mask ``(B, 2h, 2w, 1)``, 1 in fine regions."""
    return upsample2(grain.astype(dtype))[..., None]


def neighbor_copy(fine, coarse, grain):
    """Dense fine-grid code: ``fine`` ``(B, 2h, 2w, C)`` in fine regions, the coarse code
    ``coarse`` ``(B, h, w, C)`` copied over the 2x2 block of every coarse region."""
    return jnp.where(fine_mask(grain, jnp.float32) > 0, fine, upsample2(coarse))


def multigrain_noise(rng, shape, grain, dtype=jnp.float32):
    """Standard normal noise of ``shape`` ``(B, 2h, 2w, C)`` that is constant over the 2x2
    block of every coarse region of ``grain`` ``(B, h, w)`` (fine noise elsewhere): what a
    coarse code copied to the fine grid can hold."""
    k_fine, k_coarse = jax.random.split(rng)
    b, hh, ww, c = shape
    fine = jax.random.normal(k_fine, shape, dtype)
    coarse = jax.random.normal(k_coarse, (b, hh // 2, ww // 2, c), dtype)
    return neighbor_copy(fine, coarse, grain)


class DVAE(nn.Module):
    """Two-grain KL autoencoder. Images ``(B, H, W, 3)`` in [-1, 1]; latents
    ``(B, H/f, W/f, z_channels)`` with ``f = 2**fine_level``; grain maps ``(B, H/2f, W/2f)``.

    ``threshold``: entropy threshold of the fine grain (set from the data's percentiles
    before training; ``config.dvae.threshold``).
    """
    z_channels: int = 4
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn: bool = True
    threshold: float = 0.0
    bins: int = 32
    sigma: float = 0.01
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def fine_level(self) -> int:
        return len(self.ch_mult) - 2

    @property
    def downsample(self) -> int:
        """Pixels per fine latent cell."""
        return fine_downsample(self.ch_mult)

    @property
    def region(self) -> int:
        """Pixels per grain-map region (one coarse cell)."""
        return region_size(self.ch_mult)

    def setup(self):
        if len(self.ch_mult) < 2:
            raise ValueError("DVAE needs at least two encoder levels (fine and coarse).")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = ConvEncoder(self.ch, self.ch_mult, self.num_res_blocks, **kw)
        self.fine_head = MomentsHead(self.z_channels, self.attn, **kw)
        self.coarse_head = MomentsHead(self.z_channels, self.attn, **kw)
        self.decoder = ConvDecoder(self.ch, self.ch_mult[:self.fine_level + 1],
                                   self.num_res_blocks, self.attn, positional=True, **kw)

    def grain(self, images):
        """Grain map ``(B, H/2f, W/2f)`` int32 of ``images`` (no parameters involved)."""
        return grain_map(region_entropy(images, self.region, self.bins, self.sigma),
                         self.threshold)

    def moments(self, images, grain):
        """Merged posterior ``(mean, logvar)``, each ``(B, H/f, W/f, z)``."""
        levels = self.encoder(images)
        fine = self.fine_head(levels[self.fine_level])
        coarse = self.coarse_head(levels[-1])
        return tuple(neighbor_copy(f, c, grain) for f, c in zip(fine, coarse))

    def encode(self, images):
        """``(posterior mean (B, H/f, W/f, z), grain map (B, H/2f, W/2f))``."""
        grain = self.grain(images)
        return self.moments(images, grain)[0], grain

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, images, sample: bool = True):
        """Reconstruction pass: ``{"recon", "mean", "logvar", "kl", "grain"}``; ``kl`` per
        latent element ``(B, H/f, W/f, z)`` (copied coarse codes count once per fine cell);
        posterior samples use the ``"sample"`` RNG."""
        grain = self.grain(images)
        mean, logvar = self.moments(images, grain)
        if sample:  # coarse codes are sampled once and copied, like their moments
            z = mean + jnp.exp(0.5 * logvar) * multigrain_noise(self.make_rng("sample"),
                                                                 mean.shape, grain)
        else:
            z = mean
        return {"recon": self.decode(z), "mean": mean, "logvar": logvar,
                "kl": gaussian_kl(mean, logvar), "grain": grain}


def build(config) -> DVAE:
    """The DVAE of ``config.vae`` / ``config.dvae`` (its grain threshold resolved from the
    data first: :func:`jaxdit.data.grains.resolve_threshold`)."""
    d = config.dvae
    if d.threshold < 0:
        raise ValueError("dvae.threshold is unset (negative): resolve it from the data "
                         "first (jaxdit.data.grains.resolve_threshold).")
    return DVAE(threshold=float(d.threshold), bins=int(d.bins), sigma=float(d.sigma),
                **autoencoder_kwargs(config))


def check_dvae(config) -> None:
    """``data.image_size`` must hold whole grain-map regions; ``vae.widen_from`` is the
    KL-VAE's (progressive VAE), not the DVAE's."""
    if config.vae.widen_from:
        raise ConfigError(f"vae.widen_from={config.vae.widen_from!r} widens a kl_vae run's "
                          "latent; model.family='dvae' cannot start from it: leave it empty.")
    check_region(config)


def check_region(config) -> None:
    """``data.image_size`` must hold whole grain-map regions."""
    region = region_size(config.vae.ch_mult)
    if config.data.image_size % region:
        raise ConfigError(f"data.image_size={config.data.image_size} must be a multiple of "
                          f"the DVAE region size {region} (2**(len(vae.ch_mult)-1)).")


FAMILY = Family("dvae", build, image_example_inputs, role="autoencoder",
                class_conditional=True, sections=("dvae",), latent_kinds=("identity",),
                check=check_dvae)

