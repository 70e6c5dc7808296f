"""D2iT: grain coding, DVAE, multi-grained noise and loss, grain sampling, parameter
counts of its configs, and both stages trained end to end (shapes data and a folder)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdit.cli.eval import evaluate_step
from jaxdit.data.grains import dataset_entropies, percentile_table, threshold_for_ratio
from jaxdit.diffusion.multigrain import (dynamic_grain_loss, masked_grain_tokens,
                                         sample_grain_map)
from jaxdit.models.d2it import MASK_TOKEN, param_counts
from jaxdit.models.dvae import DVAE, multigrain_noise, neighbor_copy, region_entropy
from jaxdit.models.registry import build_model, example_inputs
from jaxdit.train.loop import train_and_evaluate
from jaxdit.train.state import strip_boxes
from tests.helpers import tiny_config, preset


def coarse_spread(x, grain):
    """Largest deviation from the block mean inside coarse regions' 2x2 blocks."""
    b, hh, ww, c = x.shape
    blocks = np.asarray(x).reshape(b, hh // 2, 2, ww // 2, 2, c)
    spread = np.abs(blocks - blocks.mean(axis=(2, 4), keepdims=True)).max(axis=(2, 4, 5))
    return float(np.where(np.asarray(grain) == 0, spread, 0.0).max())


def test_region_entropy_matches_a_direct_implementation():
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    img[0, :8, :8] = 0.3  # one flat region
    got = np.asarray(region_entropy(jnp.asarray(img), 8))
    gray = img @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    centres = np.linspace(-1, 1, 32)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                v = gray[b, 8 * i:8 * i + 8, 8 * j:8 * j + 8].ravel()
                pdf = np.exp(-0.5 * ((v[:, None] - centres) / 0.01) ** 2).mean(0)
                pdf /= pdf.sum()
                ref = -(pdf * np.log(pdf + 1e-30)).sum()
                np.testing.assert_allclose(got[b, i, j], ref, rtol=1e-4, atol=1e-5)
    assert got[0, 0, 0] < 0.8 < got[1].min()  # flat region vs noise


def test_thresholds_give_the_target_fine_ratio_on_the_data():
    cfg = tiny_config("dvae", "dvae-tiny")
    cfg.data.update(image_size=32, num_train=256)
    ent = dataset_entropies(cfg, 256)
    table = percentile_table(ent)
    assert len(table) == 99 and table["10"] <= table["50"] <= table["90"]
    for ratio in (0.25, 0.5):
        thr = threshold_for_ratio(table, ratio)
        assert abs((ent > thr).mean() - ratio) < 0.05
    with pytest.raises(ValueError, match="fine_ratio"):
        threshold_for_ratio(table, 1.5)


def test_neighbor_copy_and_multigrain_noise_follow_the_grain_map():
    grain = jnp.asarray(np.random.default_rng(1).integers(0, 2, (3, 4, 4)), jnp.int32)
    noise = multigrain_noise(jax.random.PRNGKey(0), (3, 8, 8, 5), grain)
    assert coarse_spread(noise, grain) == 0.0
    fine_cells = np.asarray(noise).reshape(3, 4, 2, 4, 2, 5).std(axis=(2, 4))[np.asarray(grain) == 1]
    assert fine_cells.min() > 0  # fine regions hold four different values
    big = multigrain_noise(jax.random.PRNGKey(1), (64, 16, 16, 4),
                           jnp.asarray(np.random.default_rng(2).integers(0, 2, (64, 8, 8))))
    assert abs(float(big.std()) - 1.0) < 0.02  # unit marginal variance in both grains
    fine = jnp.arange(3 * 8 * 8 * 1, dtype=jnp.float32).reshape(3, 8, 8, 1)
    coarse = -jnp.ones((3, 4, 4, 1))
    merged = np.asarray(neighbor_copy(fine, coarse, grain))
    up = np.repeat(np.repeat(np.asarray(grain), 2, 1), 2, 2)[..., None]
    np.testing.assert_array_equal(merged, np.where(up == 1, np.asarray(fine), -1.0))


def test_dvae_latents_are_dense_and_coarse_codes_copied():
    model = DVAE(z_channels=3, ch=16, ch_mult=(1, 2, 2), threshold=1.0)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    images = images.at[:, :8].set(0.5)  # top half flat -> coarse
    variables = jax.jit(lambda: model.init({"params": jax.random.PRNGKey(0)}, images,
                                           sample=False))()
    out = jax.jit(lambda v: model.apply(v, images, sample=True,
                                        rngs={"sample": jax.random.PRNGKey(1)}))(variables)
    assert out["recon"].shape == images.shape and out["mean"].shape == (2, 8, 8, 3)
    grain = np.asarray(out["grain"])
    assert grain.shape == (2, 4, 4) and grain[:, :2].sum() == 0 and grain[:, 2:].all()
    z, g = jax.jit(lambda v: model.apply(v, images, method="encode"))(variables)
    assert coarse_spread(z, g) < 1e-6
    assert out["kl"].shape == (2, 8, 8, 3) and float(out["kl"].min()) >= 0


def test_dynamic_grain_loss_normalises_each_grain():
    grain = jnp.asarray([[[1, 0], [0, 0]]], jnp.int32)  # one fine, three coarse regions
    x0 = jnp.zeros((1, 4, 4, 1))
    noise = jnp.zeros_like(x0)
    fine_err = jnp.zeros_like(x0).at[0, :2, :2].set(2.0)  # only the fine region is wrong
    loss, parts = dynamic_grain_loss(fine_err, x0, noise, grain)
    np.testing.assert_allclose(parts["fine_loss"], 4.0)
    np.testing.assert_allclose(parts["coarse_loss"], 0.0)
    # a coarse error counts once per region: 1 of 3 coarse regions off by 3 -> 9 / 3
    coarse_err = jnp.zeros_like(x0).at[0, 2:, 2:].set(3.0)
    loss, parts = dynamic_grain_loss(coarse_err, x0, noise, grain, coarse_weight=0.5)
    np.testing.assert_allclose(parts["coarse_loss"], 3.0)
    np.testing.assert_allclose(loss, 1.5)


def test_masked_grain_tokens():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 2, (16, 64)), jnp.int32)
    inputs, masked, ratio = masked_grain_tokens(jax.random.PRNGKey(0), tokens)
    m = np.asarray(masked)
    assert m.sum(1).min() >= 1
    np.testing.assert_allclose(m.mean(1), np.asarray(ratio))
    np.testing.assert_array_equal(np.asarray(inputs)[m], MASK_TOKEN)
    np.testing.assert_array_equal(np.asarray(inputs)[~m], np.asarray(tokens)[~m])


def test_grain_sampling_unmasks_everything_and_controls_the_ratio():
    prefer = jnp.asarray(np.random.default_rng(0).normal(size=(2, 36)), jnp.float32)

    def logits_fn(tokens, ratio, label):
        del ratio
        return jnp.stack([jnp.zeros_like(prefer), prefer], -1)[: tokens.shape[0]] + 0 * label[:, None, None]

    label = jnp.asarray([0, 1])
    free = np.asarray(sample_grain_map(logits_fn, label, jax.random.PRNGKey(0), (6, 6)))
    assert free.shape == (2, 6, 6) and set(np.unique(free)) <= {0, 1}
    for ratio in (0.25, 0.5):
        maps = np.asarray(sample_grain_map(logits_fn, label, jax.random.PRNGKey(1), (6, 6),
                                           num_steps=5, fine_ratio=ratio))
        np.testing.assert_array_equal(maps.reshape(2, -1).sum(1), round(ratio * 36))
        # with a fixed budget the most likely-fine regions are the fine ones
        top = np.argsort(-np.asarray(prefer), axis=1)[:, :round(ratio * 36)]
        assert all(maps.reshape(2, -1)[i][top[i]].mean() > 0.7 for i in range(2))


def test_grain_sampling_is_not_drawn_towards_one_grain():
    """Independent regions with p(fine) = 0.7 should come out ~70% fine; committing the
    most confident proposals first without MaskGIT's Gumbel choice noise gives ~94%."""
    logits = jnp.log(jnp.asarray([0.3, 0.7]))

    def logits_fn(tokens, ratio, label):
        del ratio, label
        return jnp.broadcast_to(logits, tokens.shape + (2,))

    label = jnp.zeros(64, jnp.int32)
    fair = sample_grain_map(logits_fn, label, jax.random.PRNGKey(0), (8, 8))
    greedy = sample_grain_map(logits_fn, label, jax.random.PRNGKey(0), (8, 8),
                              choice_temperature=0.0)
    assert abs(float(fair.mean()) - 0.7) < 0.1 and float(greedy.mean()) > 0.85


def test_content_prediction_is_constant_over_coarse_blocks():
    cfg = tiny_config("d2it", "tiny")
    cfg.dvae.threshold = 1.0
    model = build_model(cfg).denoiser
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(cfg, 2)))()
    params = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0),
                          strip_boxes(variables["params"]))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    grain = jnp.asarray(np.random.default_rng(3).integers(0, 2, (2, 4, 4)), jnp.int32)
    out = jax.jit(model.apply)({"params": params}, x, jnp.asarray([0.3, 0.7]),
                               {"label": jnp.asarray([1, -1]), "grain": grain})
    assert out.shape == x.shape and coarse_spread(out, grain) < 1e-5
    assert float(jnp.abs(out).max()) > 0


PAPER_PARAMS = {"L": 467e6, "XL": 687e6}  # its Tables 1 and 2
DIT_PARAMS = {"L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_param_counts_match_the_paper_and_stay_close_to_dit(size):
    cfg = preset("d2it", size)
    cfg.dvae.threshold = 1.0
    model = build_model(cfg)
    shapes = strip_boxes(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                           *example_inputs(cfg))))["params"]
    counts = param_counts(shapes)
    dcfg = preset("race_dit", f"{size}-dense")
    dit = build_model(dcfg)
    dit_shapes = jax.eval_shape(lambda: dit.init(jax.random.PRNGKey(0), *example_inputs(dcfg)))
    dit_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dit_shapes["params"]))
    # the content transformer costs < 1.5% over DiT of the same size (routing embedders,
    # learned positions, the rough head), the grain transformer ~10M
    assert 0 < counts["denoiser"] - dit_count < 0.015 * dit_count
    assert counts["grain_model"] < 11e6
    den = shapes["denoiser"]
    assert {k for k in den if k.endswith("_scan")} == {"block_scan", "refine_scan"}
    assert den["refine_scan"]["attn"]["qkv"]["q"]["kernel"].shape[0] == 2  # the 10+2 of B
    if size in PAPER_PARAMS:
        assert abs(counts["total"] - PAPER_PARAMS[size]) < 0.01 * PAPER_PARAMS[size]
        assert abs(dit_count - DIT_PARAMS[size]) < 0.005 * DIT_PARAMS[size]


def _folder(tmp_path, n=24):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = tmp_path / "imgs" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.zeros((20, 20, 3), np.uint8)
        img[rng.integers(0, 10):, :, i % 3] = 200  # a coloured band: edges and flat areas
        Image.fromarray(img).save(d / f"{i}.png")
    return str(tmp_path / "imgs")


@pytest.mark.parametrize("source", ["shapes", "folder"])
def test_both_stages_train_and_sample_grain_map_then_content(tmp_path, source):
    common = dict(steps=2, batch_size=8, log_every=1, eval_every=0, ckpt_every=2,
                  val_batches=1, async_checkpointing=False)
    stage1 = tiny_config("dvae", "dvae-tiny", **common)
    stage2 = tiny_config("d2it", "tiny", **common)
    stage2.d2it.grain_steps = 2
    # A fixed threshold (data-derived ones are tested above) keeps the programs of both
    # sources identical, so the second compiles nothing (session compilation cache).
    stage1.dvae.threshold = 0.5
    for cfg in (stage1, stage2):
        cfg.mesh = {"data": 1}  # one device: this test is about the stages, not sharding
        if source == "folder":
            cfg.data.update(source="folder", folder=_folder(tmp_path), image_size=16)
    one = jax.devices()[:1]
    out1 = train_and_evaluate(stage1, str(tmp_path / "dvae"), one)
    assert out1["checkpoint_step"] == 2 and out1["val/mse"] > 0 and "val/kl" in out1
    recon = Image.open(out1["samples"])  # image | reconstruction | grain map per sample
    assert recon.size[0] > recon.size[1]
    stage2.d2it.vae_workdir = str(tmp_path / "dvae")
    stage2.dvae.threshold = -1.0  # taken from stage 1
    out2 = train_and_evaluate(stage2, str(tmp_path / "d2it"), one)
    with open(tmp_path / "d2it" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["dvae"]["threshold"] == stage1.dvae.threshold  # resolved
    for key in ("content_loss", "grain_ce", "fine_loss", "coarse_loss", "val/loss",
                "val/grain_ce"):
        assert np.isfinite(out2[key]), key
    grid = Image.open(out2["samples"])  # two samples, each image beside its grain map
    assert grid.size == (2 * (2 * 16) + 3 * 2, 16 + 2 * 2)
    rows = [json.loads(x) for x in open(tmp_path / "d2it" / "metrics.jsonl", encoding="utf-8")]
    assert 0.0 < rows[0]["fine_ratio"] < 1.0
    assert os.listdir(tmp_path / "d2it" / "checkpoints") == ["2"]
    if source == "shapes":  # the stage-2 checkpoint is self-contained: evaluate it alone
        shutil.rmtree(tmp_path / "dvae")
        res = evaluate_step(str(tmp_path / "d2it"), None, num_samples=2, sample_batch=2)
        assert res["step"] == 2 and np.isfinite(res["val/loss"])
        assert 0.0 <= res["align/overall"] <= 1.0
