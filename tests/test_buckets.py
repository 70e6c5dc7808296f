"""Aspect-ratio buckets and packed patches: official bucket list, nearest-bucket crops,
pack/unpack round trip, a pipeline batch mixing shapes, and one compiled Lumina train step
for batches of different buckets."""
import numpy as np
import pytest
from PIL import Image

from jaxdit.data import buckets
from jaxdit.data.pipeline import bucket_sizes, make_dataset
from jaxdit.data.sources import ImageFolderSource
from jaxdit.errors import ConfigError
from jaxdit.train.loop import Experiment, evaluate, sample_condition
from jaxdit.train.metrics import MetricWriter
from tests.helpers import tiny_config


def test_official_bucket_list():
    sizes = buckets.crop_size_list(4096, 16, 4.0, "official")
    assert len(sizes) == 51
    assert sizes[0] == (512, 2048) and sizes[-1] == (2048, 512) and (1024, 1024) in sizes
    assert all(h * w <= 1024 * 1024 and max(h, w) / min(h, w) <= 4 for h, w in sizes)


def test_nearest_bucket_and_resize():
    sizes = buckets.crop_size_list(64, 4, 2.0)
    assert buckets.nearest_bucket(100, 200, sizes) == (20, 40)
    assert buckets.nearest_bucket(300, 290, sizes) == (32, 32)
    img = np.random.default_rng(0).integers(0, 255, (90, 200, 3), np.uint8)
    assert buckets.resize_to_bucket(img, (20, 40)).shape == (20, 40, 3)


def test_pack_unpack_round_trip():
    img = np.random.default_rng(0).normal(size=(12, 20, 3)).astype(np.float32)
    packed = buckets.pack_patches(img, 4, 20)
    assert packed["image"].shape == (20, 48) and packed["patch_mask"].sum() == 15
    np.testing.assert_array_equal(packed["patch_pos"][5], [1, 0])
    np.testing.assert_array_equal(packed["image"][15:], 0)
    back = buckets.unpack_patches(packed["image"], packed["patch_pos"], packed["patch_mask"], 4)
    np.testing.assert_array_equal(back, img)
    with pytest.raises(ValueError, match="more than"):
        buckets.pack_patches(img, 2, 20)


def test_pooling_packed_images_equals_pooling_each_image():
    """The multi-resolution branch on packed buckets: per-image average pooling (PyTorch's
    floor on uneven sides, as the official 2000-px buckets need), cut to whole patches and
    repacked, equals packing each image pooled alone."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from jaxdit.diffusion import flow  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    sizes = [(64, 16), (16, 64), (32, 32), (40, 24), (20, 50), (44, 22)]
    images = [rng.normal(size=hw + (3,)).astype(np.float32) for hw in sizes]
    packs = [buckets.pack_patches(im, 2, 256) for im in images]
    tokens, pos, mask = (jnp.asarray(np.stack([q[k] for q in packs]))
                         for k in ("image", "patch_pos", "patch_mask"))
    low, low_pos, low_mask = flow.avg_pool_packed(tokens, pos, mask, 2, 4)
    assert low.shape == (6, 16, 12)
    for i, im in enumerate(images):
        pooled = np.asarray(flow.avg_pool(jnp.asarray(im)[None], 4))[0]
        h, w = pooled.shape[0] // 2 * 2, pooled.shape[1] // 2 * 2  # whole patches
        want = buckets.pack_patches(pooled[:h, :w], 2, 16)
        np.testing.assert_allclose(low[i], want["image"], atol=1e-6)
        np.testing.assert_array_equal(low_pos[i], want["patch_pos"])
        np.testing.assert_array_equal(low_mask[i], want["patch_mask"])
    # (44, 22) pools to 11 x 5 (floor), cut to 10 x 4: 5 x 2 patches
    assert int(low_mask[5].sum()) == 10


def _bucket_config(**data):
    cfg = tiny_config("lumina", "tiny", batch_size=8)
    cfg.diffusion.multires_pool = 0
    cfg.data.update(image_size=32, aspect_buckets=True, bucket_max_ratio=2.0, **data)
    return cfg


def test_pipeline_mixes_buckets_in_one_static_shape(tmp_path):
    cfg = _bucket_config()
    batch = next(iter(make_dataset(cfg, "train", 8)))
    n = (32 // cfg.model.patch_size) ** 2
    assert batch["image"].shape == (8, n, 4 * 4 * 3)
    assert batch["patch_pos"].shape == (8, n, 2) and batch["patch_mask"].shape == (8, n)
    assert len(set(batch["patch_mask"].sum(1).tolist())) > 1, "one bucket only"
    # image folders: each picture goes to the bucket nearest its own aspect ratio
    for i, (h, w) in enumerate([(40, 90), (64, 64), (100, 45)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    src = ImageFolderSource(str(tmp_path), 32, bucket_sizes(cfg))
    assert [src[i]["image"].shape[:2] for i in range(3)] == [(20, 40), (32, 32), (40, 20)]


def test_one_compiled_step_trains_on_every_bucket(tmp_path):
    """Training and validation on packed buckets, and sampling prompts with the system
    prompt (the CLI path of ``python -m jaxdit.train``, in process)."""
    cfg = _bucket_config()
    exp = Experiment(cfg)
    it = iter(make_dataset(cfg, "train", 8))
    with exp.context():
        state = exp.create_state()
        first = exp.to_global(next(it))
        step = exp.jit_train_step(first)
        seen = set()
        for _ in range(3):
            host = next(it)
            seen |= set(host["patch_mask"].sum(1).tolist())
            state, metrics = step(state, exp.to_global(host))
            assert np.isfinite(float(metrics["loss"]))
        assert step._cache_size() == 1 and len(seen) > 2
        scalars = evaluate(exp, state, 3, MetricWriter(str(tmp_path), enabled=False))
        assert np.isfinite(scalars["val/loss"])
    captions, cond = sample_condition(exp, ["a red circle"])
    assert captions == ["a red circle"]
    words = exp.tokenizer.decode(np.asarray(cond["text_ids"])[0])
    assert words.startswith("you are an assistant")  # (truncated at the tiny max_len)


def test_bucket_config_errors():
    cfg = _bucket_config()
    cfg.model.family = "dit_air"
    with pytest.raises(ConfigError, match="only model.family='lumina'"):
        Experiment(cfg)
    cfg = _bucket_config()
    cfg.diffusion.multires_pool = 4  # the 5x10-patch bucket pools to 1x2 patches of 4 px
    Experiment(cfg)
    cfg.diffusion.multires_pool = 8  # ... and to none
    with pytest.raises(ConfigError, match=r"multires_pool=8: patch grids \[\(5, 10\)"):
        Experiment(cfg)
