"""LPIPS in JAX against the ``lpips`` package: its shipped v0.1 VGG heads and a random
VGG16 trunk (``pnet_rand=True``), converted with jaxdit's converter, give the same
distances. torchvision is not needed: the trunk is built here in torchvision's layout
(``features.<i>``) and handed to the package through a stand-in ``torchvision`` module."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdit.convert.common import ConversionError
from jaxdit.convert.lpips import lpips_from_torch
from jaxdit.models.lpips import LPIPS, VGG16_LAYOUT


def torchvision_vgg16_features() -> torch.nn.Sequential:
    """torchvision's ``vgg16().features`` layout with random weights (and biases)."""
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
            continue
        conv = torch.nn.Conv2d(channels, item, 3, padding=1)
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.uniform_(conv.bias, -0.1, 0.1)
        layers += [conv, torch.nn.ReLU(inplace=True)]
        channels = item
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference_lpips():
    models = types.SimpleNamespace(vgg16=lambda pretrained=False: types.SimpleNamespace(
        features=torchvision_vgg16_features()))
    stand_in = types.ModuleType("torchvision")
    stand_in.models = models
    saved = {k: sys.modules.get(k) for k in ("torchvision", "lpips")}
    sys.modules["torchvision"] = stand_in
    try:
        torch.manual_seed(0)
        import lpips  # pylint: disable=import-outside-toplevel  (after the stand-in)
        yield lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def jax_lpips_params(state_dict):
    x = jnp.zeros((1, 32, 32, 3))
    expected = jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), x, x))["params"]
    expected = jax.tree.map(lambda b: b.value, expected, is_leaf=lambda b: hasattr(b, "value"))
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    return lpips_from_torch(sd, sd, expected)


def test_lpips_matches_the_package_with_its_heads_and_a_random_trunk(reference_lpips):
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = reference_lpips(torch.from_numpy(a).permute(0, 3, 1, 2),
                               torch.from_numpy(b).permute(0, 3, 1, 2)).numpy().reshape(-1)
    params = jax_lpips_params(reference_lpips.state_dict())
    heads = reference_lpips.state_dict()["lin2.model.1.weight"].numpy().reshape(-1)
    assert np.all(heads >= 0) and heads.std() > 0  # the shipped (learned) heads, not random
    got = np.asarray(jax.jit(LPIPS().apply)({"params": params}, a, b))
    assert got.shape == (3,) and np.all(want > 0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    same = np.asarray(jax.jit(LPIPS().apply)({"params": params}, a, a))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_the_converter_names_what_is_missing(reference_lpips):
    sd = {k: v.numpy() for k, v in reference_lpips.state_dict().items()
          if not k.startswith("lin3")}
    x = jnp.zeros((1, 32, 32, 3))
    expected = jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), x, x))["params"]
    with pytest.raises(ConversionError, match="lin3"):
        lpips_from_torch(sd, sd, expected)
