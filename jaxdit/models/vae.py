"""Autoencoders between pixels and the latent space the denoiser works in.

An autoencoder here is anything with ``bind(params)`` (the model's params, for the
autoencoders whose weights live in the model; returns the object that encodes),
``encode(images) -> latents``, ``decode(latents) -> images`` and
``latent_shape(image_shape)``; images are float in [-1, 1], ``(B, H, W, 3)``. The tiny
default trains in pixel space through :class:`IdentityAutoencoder`; ``latent.kind='kl_vae'``
uses a trained :class:`KLAutoencoder` held frozen inside the model
(:class:`ModelAutoencoder`), so every checkpoint carries the decoder it samples with.

The trainable convolutional autoencoders (LDM / taming layout: GroupNorm-SiLU-conv residual
blocks, strided-conv downsampling, nearest-neighbour upsampling, single-head spatial
attention at the lowest resolution) are built from :class:`ConvEncoder`,
:class:`MomentsHead` and :class:`ConvDecoder`; :class:`KLAutoencoder` is the plain KL-VAE
and ``jaxdit.models.dvae.DVAE`` the two-grain one of D2iT. They train with
``train.objective="autoencoder"`` (:mod:`jaxdit.train.autoencoder`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.models.attention import attention
from jaxdit.models.family import Family, dtypes, image_example_inputs

Dtype = Any
# Conv kernels are (kh, kw, in, out); the autoencoders are small next to the denoisers, so
# their weights are replicated ("conv_*" map to no mesh axis) and only the batch is split.
CONV_AXES = (None, None, "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class IdentityAutoencoder:
    """Pixel space: latents are the images themselves."""
    channels: int = 3

    def bind(self, params):  # pylint: disable=unused-argument
        return self

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents

    def latent_shape(self, image_shape):
        h, w, _ = image_shape
        return (h, w, self.channels)


@dataclasses.dataclass(frozen=True)
class ModelAutoencoder:
    """Latents of the model's own frozen VAE (``latent.kind='kl_vae'``): the model's
    ``encode`` / ``decode`` methods, with the weights (``frozen_vae``,
    ``frozen_latent_scale``) of the params given to :meth:`bind`; no gradient reaches those
    params (DRaFT still differentiates ``decode`` with respect to the latents)."""
    model: Any
    channels: int
    downsample: int
    params: Any = None

    def bind(self, params):
        return dataclasses.replace(self, params=jax.lax.stop_gradient(params))

    def _apply(self, x, method: str):
        if self.params is None:
            raise ValueError("ModelAutoencoder: call bind(params) before encode/decode.")
        return self.model.apply({"params": self.params}, x, method=method)

    def encode(self, images):
        """``(B, H, W, 3)`` -> scaled latents ``(B, H/f, W/f, channels)``."""
        return self._apply(images, "encode")

    def decode(self, latents):
        return self._apply(latents, "decode")

    def latent_shape(self, image_shape):
        h, w, _ = image_shape
        return (h // self.downsample, w // self.downsample, self.channels)


LATENT_KINDS = ("identity", "kl_vae", "dvae")  # dvae: D2iT's own (jaxdit.models.d2it)


def make_autoencoder(config, model=None):
    """The autoencoder of ``config.latent``; ``kl_vae`` needs the model holding it."""
    kind = config.kind
    if kind == "identity":
        return IdentityAutoencoder(config.channels)
    if kind == "kl_vae":
        if model is None or getattr(model, "frozen_vae", None) is None:
            raise ValueError("latent.kind='kl_vae' encodes with the model's frozen_vae: "
                             "pass the model built with it.")
        return ModelAutoencoder(model, int(config.channels), int(config.downsample))
    raise ValueError(f"Unknown autoencoder kind {kind!r}; available: 'identity', 'kl_vae' "
                     "(and 'dvae' inside model.family='d2it').")


@dataclasses.dataclass(frozen=True)
class PrecomputedLatents:
    """Batches already hold latents (``data.source=cached``): ``encode`` passes them
    through; ``decode`` and ``latent_shape`` are those of the autoencoder that made them."""
    base: object

    def bind(self, params):
        return PrecomputedLatents(self.base.bind(params))

    def encode(self, latents):
        return latents

    def decode(self, latents):
        return self.base.decode(latents)

    def latent_shape(self, image_shape):
        return self.base.latent_shape(image_shape)


# ----------------------------------------------------------------------------------------
# Convolutional autoencoders (NHWC).
# ----------------------------------------------------------------------------------------

def conv(features: int, kernel: int = 3, stride: int = 1, *, name=None, zero_init=False,
         dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Conv:
    init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   name=name, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def group_norm(channels: int, name=None, dtype=jnp.float32, param_dtype=jnp.float32):
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, name=name, dtype=dtype,
                        param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` (1x1 conv on the skip when the width
    changes); ``(B, H, W, Cin) -> (B, H, W, out_ch)``."""
    out_ch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv(self.out_ch, name="conv1", **kw)(nn.silu(group_norm(x.shape[-1], "norm1", **kw)(x)))
        h = conv(self.out_ch, name="conv2", **kw)(nn.silu(group_norm(self.out_ch, "norm2", **kw)(h)))
        skip = x if x.shape[-1] == self.out_ch else conv(self.out_ch, 1, name="skip", **kw)(x)
        return skip + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the ``H*W`` positions (through the one
    :func:`jaxdit.models.attention.attention` function), residual."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = group_norm(c, "norm", **kw)(x).reshape(b, h * w, 1, c)
        q, k, v = (conv(c, 1, name=n, **kw)(y.reshape(b, h, w, c)).reshape(b, h * w, 1, c)
                   for n in ("q", "k", "v"))
        out = attention(q, k, v).reshape(b, h, w, c)
        return x + conv(c, 1, name="out", **kw)(out)


class ConvEncoder(nn.Module):
    """Image ``(B, H, W, 3)`` -> features of every level: level ``i`` has stride ``2**i``
    and ``ch * ch_mult[i]`` channels (``num_res_blocks`` residual blocks per level, a
    strided conv between levels)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> list:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv(self.ch, name="conv_in", **kw)(x.astype(self.dtype))
        levels = []
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, name=f"level{i}_res{j}", **kw)(h)
            levels.append(h)
            if i < len(self.ch_mult) - 1:
                h = conv(h.shape[-1], 3, 2, name=f"level{i}_down", **kw)(h)
        return levels


class MomentsHead(nn.Module):
    """Features -> Gaussian posterior moments ``(mean, logvar)``, each ``(B, h, w,
    z_channels)``: mid block (Res, attention, Res), GN-SiLU, conv to ``2 * z_channels``
    (then a 1x1 ``quant_conv`` in Stable Diffusion's VAE)."""
    z_channels: int
    attn: bool = True
    quant_conv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = h.shape[-1]
        h = ResBlock(c, name="mid_res1", **kw)(h)
        if self.attn:
            h = SpatialAttention(name="mid_attn", **kw)(h)
        h = ResBlock(c, name="mid_res2", **kw)(h)
        h = nn.silu(group_norm(c, "norm_out", **kw)(h))
        moments = conv(2 * self.z_channels, name="conv_out", **kw)(h)
        if self.quant_conv:
            moments = conv(2 * self.z_channels, 1, name="quant_conv", **kw)(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class ConvDecoder(nn.Module):
    """Latent ``(B, h, w, z)`` -> image ``(B, h * 2**(L-1), w * 2**(L-1), 3)`` with
    ``L = len(ch_mult)`` levels walked from the deepest: mid block, ``num_res_blocks + 1``
    residual blocks per level, nearest-x2 + conv between levels. ``positional``: learned
    row and column embeddings added to the latent first (the DQ-VAE decoder's, which tell
    the decoder where a copied coarse code sits). ``post_quant_conv``: Stable Diffusion's
    1x1 conv on the latent first."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn: bool = True
    positional: bool = False
    post_quant_conv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z = z.astype(self.dtype)
        if self.post_quant_conv:
            z = conv(z.shape[-1], 1, name="post_quant_conv", **kw)(z)
        if self.positional:
            _, h, w, c = z.shape
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "conv_out"))
            rows = self.param("row_embed", init, (h, c), self.param_dtype)
            cols = self.param("col_embed", init, (w, c), self.param_dtype)
            z = z + (rows[:, None, :] + cols[None, :, :]).astype(self.dtype)
        c = self.ch * self.ch_mult[-1]
        h = conv(c, name="conv_in", **kw)(z)
        h = ResBlock(c, name="mid_res1", **kw)(h)
        if self.attn:
            h = SpatialAttention(name="mid_attn", **kw)(h)
        h = ResBlock(c, name="mid_res2", **kw)(h)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResBlock(self.ch * self.ch_mult[i], name=f"level{i}_res{j}", **kw)(h)
            if i > 0:
                b, hh, ww, cc = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, cc), "nearest")
                h = conv(cc, name=f"level{i}_up", **kw)(h)
        h = nn.silu(group_norm(h.shape[-1], "norm_out", **kw)(h))
        return conv(3, name="conv_out", **kw)(h).astype(jnp.float32)


def downsample_factor(ch_mult) -> int:
    """Pixels per latent cell of a conv encoder with levels ``ch_mult`` (a strided conv
    between consecutive levels)."""
    return 2 ** (len(ch_mult) - 1)


def gaussian_sample(rng, mean, logvar):
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per element, same shape as ``mean``."""
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


class KLAutoencoder(nn.Module):
    """LDM-style KL-VAE, downsampling ``2**(len(ch_mult)-1)``, ``z_channels`` latents.

    ``__call__(images, sample=True) -> {"recon", "mean", "logvar", "kl"}`` with ``kl``
    per latent element ``(B, h, w, z)``; posterior samples use the ``"sample"`` RNG.
    """
    z_channels: int = 4
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn: bool = True
    quant_conv: bool = False  # SD's 1x1 convs around the latent (diffusers use_quant_conv)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = ConvEncoder(self.ch, self.ch_mult, self.num_res_blocks, **kw)
        self.head = MomentsHead(self.z_channels, self.attn, self.quant_conv, **kw)
        self.decoder = ConvDecoder(self.ch, self.ch_mult, self.num_res_blocks, self.attn,
                                   post_quant_conv=self.quant_conv, **kw)

    @property
    def downsample(self) -> int:
        return downsample_factor(self.ch_mult)

    def moments(self, images):
        return self.head(self.encoder(images)[-1])

    def encode(self, images):
        """Posterior mean ``(B, h, w, z)`` (what diffusion training uses)."""
        return self.moments(images)[0]

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, images, sample: bool = True):
        mean, logvar = self.moments(images)
        z = gaussian_sample(self.make_rng("sample"), mean, logvar) if sample else mean
        return {"recon": self.decode(z), "mean": mean, "logvar": logvar,
                "kl": gaussian_kl(mean, logvar)}


def latent_scale_param(module: nn.Module):
    """``frozen_latent_scale``: the scalar a model holding a frozen VAE multiplies its
    latents by (1 / their std on training images, set when the VAE weights are loaded;
    :mod:`jaxdit.train.stages`). Call from ``setup``."""
    return module.param("frozen_latent_scale",
                        nn.with_logical_partitioning(nn.initializers.ones, ()), ())


def widen_latent(params, new_channels: int, rng=None, new_scale: float = 0.1):
    """Progressive VAE (DiT-Air section 5.2): :class:`KLAutoencoder` params with ``z``
    latent channels -> params of the same model with ``new_channels`` > z, keeping every
    learned weight. The layers around the latent are the ones replaced: the encoder's
    moments conv (``head/conv_out``, 2z -> 2 new outputs) and the decoder's input conv
    (``decoder/conv_in``, z -> new inputs).

    The old mean/log-variance outputs keep their weights; the new mean outputs start as
    small random filters (``new_scale`` x the old filters' std) and the new log-variances
    at 0 (unit-variance posteriors); the decoder's new input weights are zero, so the
    widened model reconstructs exactly as before and continued training learns to use
    the new channels. ``params`` may be boxed or plain arrays; returns plain arrays.
    """
    params = jax.tree.map(np.asarray, nn.unbox(params))
    enc_k = params["head"]["conv_out"]["kernel"]
    enc_b = params["head"]["conv_out"]["bias"]
    z = enc_k.shape[-1] // 2
    if new_channels <= z:
        raise ValueError(f"widen_latent: new_channels={new_channels} must exceed the current "
                         f"{z} latent channels.")
    extra = new_channels - z
    rng = np.random.default_rng(0) if rng is None else rng
    noise = rng.normal(0.0, new_scale * float(enc_k[..., :z].std()), enc_k.shape[:-1] + (extra,))
    zeros_k = np.zeros(enc_k.shape[:-1] + (extra,), enc_k.dtype)
    kernel = np.concatenate([enc_k[..., :z], noise.astype(enc_k.dtype), enc_k[..., z:], zeros_k], -1)
    bias = np.concatenate([enc_b[:z], np.zeros(extra, enc_b.dtype), enc_b[z:],
                           np.zeros(extra, enc_b.dtype)])
    dec_k = params["decoder"]["conv_in"]["kernel"]
    dec_k = np.concatenate([dec_k, np.zeros(dec_k.shape[:2] + (extra,) + dec_k.shape[3:],
                                            dec_k.dtype)], axis=2)
    out = jax.tree.map(lambda x: x, params)
    out["head"] = {**params["head"], "conv_out": {"kernel": kernel, "bias": bias}}
    out["decoder"] = {**params["decoder"],
                      "conv_in": {**params["decoder"]["conv_in"], "kernel": dec_k}}
    return out


def autoencoder_kwargs(config) -> dict:
    """Keyword arguments of the KL-VAE and the DVAE from ``config.vae`` (dtypes from
    ``config.model``)."""
    v = config.vae
    return dict(z_channels=v.z_channels, ch=v.ch, ch_mult=tuple(v.ch_mult),
                num_res_blocks=v.num_res_blocks, attn=v.attn, **dtypes(config.model))


def build(config) -> KLAutoencoder:
    """The KL-VAE of ``config.vae`` (trained as ``model.family='kl_vae'``, or the frozen
    latent VAE of ``latent.kind='kl_vae'``)."""
    return KLAutoencoder(quant_conv=bool(config.vae.quant_conv), **autoencoder_kwargs(config))


FAMILY = Family("kl_vae", build, image_example_inputs, role="autoencoder",
                class_conditional=True, latent_kinds=("identity",))

