"""KL-VAE and DiT-Air's progressive VAE: widening the latent keeps what was learned."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import config_lib
from jaxdit.models.vae import KLAutoencoder, widen_latent
from jaxdit.train.loop import Experiment, train_and_evaluate, validation_images


def test_widen_latent_keeps_the_reconstruction():
    narrow, wide = KLAutoencoder(z_channels=4, ch=16, ch_mult=(1, 2)), KLAutoencoder(
        z_channels=8, ch=16, ch_mult=(1, 2))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = jax.jit(lambda: narrow.init(jax.random.PRNGKey(0), images, False))()["params"]
    widened = widen_latent(params, 8)
    shapes = jax.eval_shape(lambda: wide.init(jax.random.PRNGKey(0), images, False))["params"]
    assert jax.tree.map(lambda a: a.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, widened)
    before = jax.jit(lambda p: narrow.apply({"params": p}, images, False))(params)
    after = jax.jit(lambda p: wide.apply({"params": p}, images, False))(widened)
    np.testing.assert_allclose(after["recon"], before["recon"], atol=1e-5)
    np.testing.assert_allclose(after["mean"][..., :4], before["mean"], atol=1e-6)
    np.testing.assert_allclose(after["logvar"][..., 4:], 0.0, atol=1e-6)  # unit variance
    assert float(jnp.abs(after["mean"][..., 4:]).max()) > 0  # new channels carry signal


def test_progressive_run_starts_from_the_narrow_vae(tmp_path):
    def cfg(arg, **train):
        c = config_lib.vae_config(arg)
        c.vae.update(ch=16, ch_mult=(1, 2))
        c.data.update(image_size=16, num_train=64, num_val=16)
        c.mesh = {"data": 1}
        c.train.update(steps=2, batch_size=8, log_every=1, eval_every=0, ckpt_every=2,
                       val_batches=1, async_checkpointing=False, **train)
        c.sampler.num_samples = 2
        return c

    one = jax.devices()[:1]
    out4 = train_and_evaluate(cfg("tiny-4ch"), str(tmp_path / "vae4"), one)
    c8 = cfg("tiny-8ch")
    c8.vae.widen_from = str(tmp_path / "vae4")
    exp = Experiment(c8, one)
    with exp.context():
        state = exp.create_state()
        val = exp.val_loss_fn({"params": state.params},
                              {"image": jnp.asarray(validation_images(c8, 8)[1])},
                              jax.random.PRNGKey(0))
    # the widened model reconstructs the validation images as the 4-channel one did
    np.testing.assert_allclose(float(val["mse"]), out4["val/mse"], rtol=0.05)
    np.testing.assert_array_equal(jax.device_get(state.params["decoder"]["conv_in"]["kernel"])[
        :, :, 4:], 0.0)  # the new latent channels start unused by the decoder
    bad = cfg("tiny-8ch")
    bad.vae.update(widen_from=str(tmp_path / "vae4"), ch=8)
    try:
        Experiment(bad, one).create_state()
    except ValueError as e:
        assert "only z_channels may grow" in str(e)
    else:
        raise AssertionError("a different architecture must be refused")

