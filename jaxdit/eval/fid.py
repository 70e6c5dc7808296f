"""FID: InceptionV3 pool features (the pytorch-fid network) and the Frechet distance.

No weights are downloaded: :func:`load_inception` reads a user-provided ``.npz`` of the
PyTorch state dict of pytorch-fid's ``FIDInceptionV3`` (``pt_inception-2015-12-05``; save it
once with ``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``; torchvision names:
``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...). With random
weights (tests) the numbers are not FIDs anyone can compare, but the machinery is the same.

Images ``(B, H, W, 3)`` in [-1, 1] are resized bilinearly to 299 (``resize``) as
pytorch-fid does; features are the 2048-d average pool. FID between two feature sets is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

BN_EPS = 1e-3
INPUT_SIZE = 299


class BasicConv(nn.Module):
    """Conv (no bias) + inference batch norm + ReLU, torchvision's ``BasicConv2d``."""
    features: int
    kernel: Sequence[int]
    stride: int = 1
    padding: Sequence[int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        ph, pw = self.padding
        x = nn.Conv(self.features, (kh, kw), (self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        c = self.features
        scale = self.param("bn_scale", nn.initializers.ones, (c,))
        bias = self.param("bn_bias", nn.initializers.zeros, (c,))
        mean = self.param("bn_mean", nn.initializers.zeros, (c,))
        var = self.param("bn_var", nn.initializers.ones, (c,))
        return nn.relu((x - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias)


def _avg3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), 2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), 2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3(x)], -1)


class InceptionC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), 2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), 2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3(x)], -1)


class InceptionE(nn.Module):
    """``max_pool``: pytorch-fid's last block pools with max instead of average."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = _max3(x, 1, 1) if self.max_pool else _avg3(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """Images ``(B, H, W, 3)`` in [-1, 1] -> pool features ``(B, 2048)`` (fp32).
    ``resize``: bilinear resize to ``size`` first (299, as pytorch-fid; a smaller size
    only for cheap tests); without it inputs must be >= 75 px."""
    resize: bool = True
    size: int = INPUT_SIZE

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.resize:
            x = jax.image.resize(x, (x.shape[0], self.size, self.size, 3), "bilinear")
        x = BasicConv(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max3(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max3(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


TORCH_BN = {"bn_scale": "weight", "bn_bias": "bias", "bn_mean": "running_mean",
            "bn_var": "running_var"}


def _torch_key(names) -> str:
    """Flax param path -> torch name: ``[..., "conv", "kernel"]`` -> ``"....conv.weight"``,
    ``[..., "bn_var"]`` -> ``"....bn.running_var"``."""
    if names[-2:] == ["conv", "kernel"]:
        return ".".join(names[:-2]) + ".conv.weight"
    return ".".join(names[:-1]) + ".bn." + TORCH_BN[names[-1]]


def params_from_torch(state: dict, expected) -> dict:
    """PyTorch ``FIDInceptionV3`` / torchvision ``Inception3`` state dict (numpy arrays) ->
    params shaped like ``expected``; every parameter must be present with its shape."""
    def convert(path, leaf):
        key = _torch_key([p.key for p in path])
        if key not in state:
            raise KeyError(f"Inception weights: missing {key!r}.")
        value = np.asarray(state[key], np.float32)
        if value.ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
            value = value.transpose(2, 3, 1, 0)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"Inception weights: {key} has shape {value.shape}, expected "
                             f"{tuple(leaf.shape)}.")
        return value
    return jax.tree_util.tree_map_with_path(convert, expected)


def torch_from_params(params) -> dict:
    """Inverse of :func:`params_from_torch` (for tests and for exporting)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        out[_torch_key([p.key for p in path])] = (value.transpose(3, 2, 0, 1)
                                                  if value.ndim == 4 else value)
    return out


def load_inception(path: str, resize: bool = True, size: int = INPUT_SIZE):
    """``(model, params)`` from an ``.npz`` state dict (see the module docstring)."""
    model = InceptionV3(resize, size)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, size, size, 3)))["params"]
    with np.load(path) as data:
        state = {k: data[k] for k in data.files}
    return model, params_from_torch(state, expected)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of features ``(N, D)``."""
    f = np.asarray(features, np.float64)
    if f.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` (pytorch-fid's numerics)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # rank-deficient covariances (fewer images than dims)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(model, params, images_a, images_b, batch: int = 50) -> float:
    """FID between two image sets ``(N, H, W, 3)`` in [-1, 1]."""
    fn = jax.jit(lambda x: model.apply({"params": params}, x))

    def features(images):
        return np.concatenate([np.asarray(fn(jnp.asarray(images[i:i + batch])))
                               for i in range(0, len(images), batch)])

    return frechet_distance(*feature_stats(features(images_a)),
                            *feature_stats(features(images_b)))
