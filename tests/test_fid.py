"""FID machinery with random Inception weights: feature shapes, weight loading from a
PyTorch-layout state dict, and the Frechet distance's properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.eval.fid import (InceptionV3, feature_stats, frechet_distance, load_inception,
                             torch_from_params)


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(400, 6)) * 2.0 + 1.0
    sa, sb = feature_stats(a), feature_stats(b)
    assert abs(frechet_distance(*sa, *sa)) < 1e-6
    np.testing.assert_allclose(frechet_distance(*sa, *sb), frechet_distance(*sb, *sa), rtol=1e-6)
    # Gaussians with diagonal covariances: |dmu|^2 + sum (s1 - s2)^2 in std units
    mu1, mu2, s1, s2 = np.zeros(3), np.ones(3), np.eye(3), 4 * np.eye(3)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), 3 + 3 * (2 - 1) ** 2)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(a[:1])


def test_inception_features_and_weight_loading(tmp_path):
    model = InceptionV3(resize=False)  # 80-px inputs keep the CPU test cheap
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 80, 80, 3)), jnp.float32)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images))()["params"]
    count = sum(x.size for x in jax.tree.leaves(params))
    assert 21.7e6 < count < 21.9e6  # InceptionV3 without the classifier: 21.8M
    path = str(tmp_path / "inception.npz")
    state = torch_from_params(params)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)  # torch (out, in, kh, kw)
    np.savez(path, **state)
    _, loaded = load_inception(path, resize=False)
    # the round trip gives back every weight (the forward pass and FID of a loaded network
    # run in tests/test_cli.py through `jaxdit.eval`)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
    del state["Mixed_5b.branch1x1.conv.weight"]
    np.savez(path, **state)
    with pytest.raises(KeyError, match="Mixed_5b.branch1x1.conv.weight"):
        load_inception(path, resize=False)
