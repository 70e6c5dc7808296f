"""The autoencoders' GAN recipe: PatchGAN discriminator, hinge / non-saturating losses,
the adaptive weight from last-layer gradient norms, ``disc_start``, the discriminator's
own optimizer state, and the paper configs' settings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixed_batch, tiny_config, preset
from jaxdit.errors import ConfigError
from jaxdit.models.discriminator import NLayerDiscriminator
from jaxdit.models.vae import KLAutoencoder
from jaxdit.train.adversarial import (DISC_KEY, LAST_LAYER, LPIPS_KEY, adaptive_weight,
                                      discriminator_loss, generator_loss, get_leaf,
                                      reconstruct_with_last_layer)
from jaxdit.train.checkpoint import Checkpointer
from jaxdit.train.loop import Experiment

ONE = jax.devices()[:1]


def test_patchgan_has_the_published_layout_and_size():
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    shapes = jax.eval_shape(NLayerDiscriminator().init, jax.random.PRNGKey(0), x)["params"]
    # pix2pix / taming NLayerDiscriminator(ndf=64, n_layers=3): 2,765,633 parameters
    assert sum(a.size for a in jax.tree.leaves(nn.unbox(shapes))) == 2_765_633
    out = jax.eval_shape(lambda p, a: NLayerDiscriminator().apply({"params": p}, a),
                         nn.unbox(shapes), x)
    assert out.shape == (2, 30, 30)  # the 70x70-receptive-field PatchGAN's 30x30 patches


def test_gan_losses():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
    # hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2 = (0.25 + 0.75) / 2
    np.testing.assert_allclose(discriminator_loss("hinge", real, fake), 0.5)
    np.testing.assert_allclose(generator_loss("hinge", fake), 0.75)
    ns = discriminator_loss("non_saturating", real, fake)
    want = 0.5 * (np.mean(np.log1p(np.exp(-np.array([2.0, 0.5]))))
                  + np.mean(np.log1p(np.exp(np.array([-2.0, 0.5])))))
    np.testing.assert_allclose(ns, want, rtol=1e-6)


def test_adaptive_weight_is_the_capped_gradient_norm_ratio():
    g_rec, g_adv = jnp.full((4,), 3.0), jnp.full((4,), 1.0)  # norms 6 and 2: ratio ~3
    np.testing.assert_allclose(adaptive_weight(g_rec, g_adv, 0.5, 1e4), 0.5 * 6 / (2 + 1e-4),
                               rtol=1e-6)
    np.testing.assert_allclose(adaptive_weight(g_rec, g_adv, 1.0, 0.75), 0.75)  # DQ-VAE's cap


def test_last_layer_gradients_equal_the_full_backward_pass():
    """The cheap last-layer gradient (backward through the output conv only) is the
    gradient of the loss with respect to that kernel."""
    model = KLAutoencoder(z_channels=4, ch=8, ch_mult=(1, 2), attn=False)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), images, False)["params"])

    def apply(p):
        return model.apply({"params": p}, images, False)

    def loss(recon):
        return jnp.mean(jnp.abs(recon - images)) + jnp.mean(jnp.square(recon) * 0.3)
    def cheap_grad(p):
        recon, _, last_vjp = reconstruct_with_last_layer(apply, p)
        return last_vjp(jax.grad(loss)(recon))
    cheap = jax.jit(cheap_grad)(params)
    full = get_leaf(jax.jit(jax.grad(lambda p: loss(apply(p)["recon"])))(params), LAST_LAYER)
    np.testing.assert_allclose(cheap, full, rtol=1e-5, atol=1e-8)


def _gan_config(**vae):
    cfg = tiny_config("kl_vae", "tiny-4ch")
    settings = dict(disc_weight=0.5, disc_start=2, lpips_weight=1.0, lpips_weights="random",
                    disc_layers=2)  # 16-px images: 2x2 patches
    cfg.vae.update(**{**settings, **vae})
    cfg.mesh = {"data": 1}
    return cfg


def test_generator_and_discriminator_train_in_one_step_from_disc_start(tmp_path):
    cfg = _gan_config()
    exp = Experiment(cfg, ONE)
    with exp.context():
        state = exp.create_state()
        assert set(state.opt_state.inner_states) == {"train", "frozen", DISC_KEY}
        batch = exp.to_global({k: np.asarray(v) for k, v in fixed_batch(cfg).items()
                               if k == "image"})
        step = exp.jit_train_step(batch)
        history = [jax.device_get(state.params)]
        metrics = []
        for _ in range(3):
            state, m = step(state, batch)
            history.append(jax.device_get(state.params))
            metrics.append(jax.device_get(m))

    def changed(a, b, key):
        return any(np.any(x != y) for x, y in zip(jax.tree.leaves(a[key]),
                                                  jax.tree.leaves(b[key])))
    # steps 0 and 1 (before disc_start=2): the discriminator stands still, the VAE trains
    assert [m["disc_on"] for m in metrics] == [0.0, 0.0, 1.0]
    assert not changed(history[0], history[2], DISC_KEY)
    assert changed(history[1], history[2], "decoder")  # (step 0's warm-up lr is 0)
    assert changed(history[2], history[3], DISC_KEY)  # step 2 trains it
    assert not changed(history[0], history[3], LPIPS_KEY)  # LPIPS is frozen
    last = metrics[-1]
    for k in ("lpips", "d_loss", "g_loss", "d_weight", "logits_real", "logits_fake"):
        assert np.isfinite(last[k]), k
    assert last["lpips"] > 0 and last["d_weight"] > 0
    # the discriminator's optimizer state is saved and restored with the rest
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, state, config=cfg)
    ckpt.wait()
    restored, _ = ckpt.restore(exp.abstract_state())
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(restored.opt_state.inner_states[DISC_KEY]),
                 jax.device_get(state.opt_state.inner_states[DISC_KEY]))


def test_gan_settings_are_checked():
    bad = _gan_config(disc_loss="wasserstein")
    with pytest.raises(ConfigError, match="vae.disc_loss"):
        Experiment(bad, ONE)
    with pytest.raises(ConfigError, match="lower vae.disc_layers"):
        Experiment(_gan_config(disc_layers=3), ONE)
    missing = _gan_config(lpips_weights="")
    with pytest.raises(ConfigError, match="vae.lpips_weights"):
        Experiment(missing, ONE).create_state()


def test_paper_configs_train_with_lpips_and_the_discriminator():
    ldm = preset("vae", "f8-8ch").vae  # LDM's autoencoder_kl_f8 loss
    assert (ldm.lpips_weight, ldm.disc_weight, ldm.disc_start) == (1.0, 0.5, 50001)
    dq = preset("d2it", "dvae-paper").vae  # DQ-VAE's: adaptive weight capped at 0.75
    assert (dq.lpips_weight, dq.disc_weight, dq.disc_weight_max, dq.disc_loss) == (
        1.0, 1.0, 0.75, "hinge")
    assert (dq.disc_ndf, dq.disc_layers) == (64, 3)
    tiny = preset("vae", "tiny-4ch").vae
    assert tiny.lpips_weight == 0 and tiny.disc_weight == 0
