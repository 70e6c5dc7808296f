"""Lumina-Image 2.0 (Unified Next-DiT): parameter counts, M-RoPE, masks and packed patches,
the diffusers converter with an output parity test, resolution shift, multi-resolution loss
and system prompts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.data import prompts
from jaxdit.data.pipeline import Preprocess, make_tokenizer
from jaxdit.diffusion import flow
from jaxdit.convert import dit as convert_dit
from jaxdit.convert import folders
from jaxdit.convert import lumina as convert_lumina
from jaxdit.convert.common import ConversionError
from jaxdit.models.layers import apply_rope, patchify, rope_tables
from jaxdit.models.lumina import Lumina, mrope_positions
from jaxdit.models.stack import relayout_like
from jaxdit.models.registry import build_denoiser
from jaxdit.train.state import strip_boxes
from helpers import preset


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _abstract(model, text_width, latent=(8, 8, 16), text_len=4):
    x = jnp.zeros((1,) + latent)
    cond = {"text_tokens": jnp.zeros((1, text_len, text_width)),
            "text_mask": jnp.ones((1, text_len), bool)}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(1), cond))
    return strip_boxes(shapes["params"])


@pytest.mark.parametrize("size,expected", [
    ("2B", 2_609_771_456), ("3B", 3.73e9), ("4B", 4.79e9), ("7B", 8.25e9)])
def test_param_counts_of_official_configs(size, expected):
    cfg = preset("lumina", size)
    params = _abstract(build_denoiser(cfg.model, cfg.latent.channels), cfg.text.width)
    n = _count(params)
    if size == "2B":
        assert n == expected, f"{n:,}"
        layers = params["layer_scan"]  # 26 joint blocks, stacked on a leading layer axis
        assert layers["ffn"]["w1"]["kernel"].shape == (26, 2304, 9216)
        assert layers["attn"]["qkv"]["qkv_kernel"].shape == (26, 2304, 8, 5, 96)
    else:
        assert abs(n / expected - 1) < 0.005, f"{size}: {n:,}"


def tiny_lumina(**kw):
    opts = dict(depth=2, width=64, num_heads=4, num_kv_heads=2, axes_dims=(4, 6, 6),
                num_refiner_layers=1, patch_size=2, out_channels=4, ffn_multiple_of=16)
    return Lumina(**{**opts, **kw})


def _random_params(model, text_width=32, seed=0):
    params = _abstract(model, text_width, latent=(8, 8, model.out_channels))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape) + (a.ndim == 1)
                                     for k, a in zip(keys, leaves)])


def test_mrope_positions_follow_the_official_layout():
    text_mask = jnp.array([[True, True, True, False], [True, True, True, True]])
    text_ids, image_ids = mrope_positions(text_mask, jnp.array([[0, 0], [0, 1], [1, 0]]))
    np.testing.assert_array_equal(text_ids[0], [[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(text_ids[1, :, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(image_ids[0], [[3, 0, 0], [3, 0, 1], [3, 1, 0]])
    np.testing.assert_array_equal(image_ids[1, :, 0], [4, 4, 4])
    _, masked = mrope_positions(text_mask, jnp.array([[0, 0], [0, 1], [1, 0]]),
                                jnp.array([[True, False, True], [True, True, True]]))
    np.testing.assert_array_equal(masked[0, 1], [0, 0, 0])


def test_mrope_axis_owns_its_block_of_interleaved_channels():
    axes = (4, 6, 6)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
    for axis, (lo, hi) in enumerate([(0, 4), (4, 10), (10, 16)]):
        pos = jnp.zeros((1, 1, 3), jnp.int32).at[..., axis].set(7)
        out = apply_rope(x, *rope_tables(pos, axes))
        changed = np.nonzero(np.abs(np.asarray(out - x))[0, 0, 0] > 1e-6)[0]
        assert changed.min() >= lo and changed.max() < hi, (axis, changed)
        # interleaved pairs (x[2i], x[2i+1]) rotate together; norms per pair are kept
        pairs = np.asarray(out).reshape(8, 2), np.asarray(x).reshape(8, 2)
        np.testing.assert_allclose(*(np.linalg.norm(p, axis=1) for p in pairs), rtol=1e-5)


def test_zero_init_and_text_padding_is_invisible():
    model = tiny_lumina()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 4))
    tokens = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 32))
    cond = {"text_tokens": tokens, "text_mask": jnp.arange(6)[None] < 4}
    with nn.logical_axis_rules(()):
        init = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.ones(1) * 0.3, cond))
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(init, x, jnp.ones(1) * 0.3, cond), 0.0)
    params = {"params": _random_params(model)}
    padded = apply(params, x, jnp.ones(1) * 0.3, cond)
    trimmed = apply(params, x, jnp.ones(1) * 0.3,
                          {"text_tokens": tokens[:, :4], "text_mask": jnp.ones((1, 4), bool)})
    np.testing.assert_allclose(padded, trimmed, atol=1e-5)
    assert float(jnp.abs(padded).max()) > 1e-2


def test_packed_patches_of_different_sizes_match_each_image_alone():
    """Two aspect ratios (8x4 and 4x8 latents) in one padded batch of patch sequences give
    the same predictions as each image run alone through the (B, H, W, C) path."""
    model = tiny_lumina()
    params = {"params": _random_params(model)}
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(1, 8, 4, 4)).astype(np.float32),
              rng.normal(size=(1, 4, 8, 4)).astype(np.float32)]
    text = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    text_mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    t = jnp.array([0.3, 0.7])
    n_max, feat = 10, 2 * 2 * 4
    packed = np.zeros((2, n_max, feat), np.float32)
    pos = np.zeros((2, n_max, 2), np.int32)
    mask = np.zeros((2, n_max), bool)
    for i, img in enumerate(images):
        h, w = img.shape[1] // 2, img.shape[2] // 2
        packed[i, :h * w] = patchify(jnp.asarray(img), 2)[0]
        pos[i, :h * w] = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"),
                                  -1).reshape(-1, 2)
        mask[i, :h * w] = True
    apply = jax.jit(model.apply)
    out = apply(params, jnp.asarray(packed), t, {"text_tokens": text,
                      "text_mask": text_mask, "patch_pos": pos, "patch_mask": mask})
    assert out.shape == (2, n_max, feat)
    for i, img in enumerate(images):
        alone = apply(params, jnp.asarray(img), t[i:i + 1],
                            {"text_tokens": text[i:i + 1], "text_mask": text_mask[i:i + 1]})
        np.testing.assert_allclose(out[i, :mask[i].sum()], patchify(alone, 2)[0], atol=1e-5)


def test_fused_gqa_projection_matches_separate_projections():
    wq, wk, wv = (np.random.default_rng(i).normal(size=s).astype(np.float32)
                  for i, s in enumerate([(6 * 4, 8), (2 * 4, 8), (2 * 4, 8)]))
    fused = convert_lumina.fuse_qkv(wq, wk, wv, num_heads=6, num_kv_heads=2)
    x = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    out = np.einsum("bd,dgrk->bgrk", x, fused)
    q = out[:, :, :3].reshape(3, 6, 4)
    np.testing.assert_allclose(q, (x @ wq.T).reshape(3, 6, 4), rtol=1e-5)
    k_rep = np.repeat((x @ wk.T).reshape(3, 2, 4), 3, axis=1)  # torch repeat_interleave
    np.testing.assert_allclose(np.repeat(out[:, :, 3], 3, axis=1), k_rep, rtol=1e-5)


def test_matches_diffusers_lumina2_after_conversion():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
        num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
        norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 6, 6), cap_feat_dim=32).eval()
    with torch.no_grad():  # random everything, also the zero-initialised modulation
        for name, p in ref.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    fields = convert_lumina.lumina_config_from_diffusers(ref.config)
    model = tiny_lumina(ffn_multiple_of=fields["ffn_multiple_of"])
    expected = _abstract(model, 32, latent=(8, 8, 4))
    params = convert_lumina.lumina_from_diffusers(
        {k: v.numpy() for k, v in ref.state_dict().items()}, expected, num_heads=4,
        num_kv_heads=2)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)  # torch layout (B, C, H, W)
    text = rng.normal(size=(2, 8, 32)).astype(np.float32)
    mask = np.arange(8)[None] < np.array([[5], [8]])
    t_lumina = np.array([0.25, 0.8], np.float32)  # Lumina's time: 1 = data
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t_lumina), torch.from_numpy(text),
                   torch.from_numpy(mask), return_dict=False)[0].numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                      jnp.asarray(1.0 - t_lumina),
                      {"text_tokens": jnp.asarray(text), "text_mask": jnp.asarray(mask)})
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_converter_reports_every_mismatch():
    model = tiny_lumina()
    expected = _abstract(model, 32, latent=(8, 8, 4))
    bad = {"x_embedder.weight": np.zeros((64, 15)), "foo.weight": np.zeros(3)}
    with pytest.raises(ConversionError, match="Unexpected diffusers parameter 'foo"):
        convert_lumina.lumina_from_diffusers(bad, expected, num_heads=4, num_kv_heads=2)
    with pytest.raises(ConversionError, match=r"(?s)missing .*shape \(15, 64\)"):
        convert_lumina.lumina_from_diffusers({"x_embedder.weight": np.zeros((64, 15))}, expected,
                                      num_heads=4, num_kv_heads=2)


def test_resolution_shift_and_pooling():
    assert flow.resolution_shift(256) == pytest.approx(np.exp(0.5))
    assert flow.resolution_shift(4096) == pytest.approx(np.exp(1.15))
    t = jnp.linspace(0.05, 0.95, 7)
    s = flow.resolution_shift(4096)
    lumina_t = 1 - t  # Lumina's own form on its own time axis
    np.testing.assert_allclose(1 - lumina_t / (lumina_t + s * (1 - lumina_t)),
                               flow.shift_time(t, s), rtol=1e-6)
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    np.testing.assert_allclose(flow.avg_pool(x, 4)[0, 0, 0], x[0, :4, :4].mean((0, 1)))


def test_multires_branch_adds_the_pooled_loss():
    import functools
    from jaxdit.train.loop import Experiment
    from jaxdit.train.step import loss_fn
    from tests.helpers import fixed_batch, tiny_config
    cfg = tiny_config("lumina")
    cfg.model.depth = 1
    cfg.diffusion.update(multires_pool=2, resolution_shift=True)
    exp = Experiment(cfg, jax.devices()[:1])
    with exp.context():
        state = exp.create_state()
        fn = jax.jit(functools.partial(loss_fn, model=exp.model, autoencoder=exp.autoencoder,
                                       cfg=cfg))
        loss, (metrics, _) = fn(state.params, state.model_state, fixed_batch(cfg),
                                jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["multires_loss"]))
    np.testing.assert_allclose(float(loss), float(metrics["diffusion_loss"])
                               + float(metrics["multires_loss"]), rtol=1e-5)


def test_system_prompts_in_the_pipeline():
    cfg = preset("lumina", "tiny")
    tok = make_tokenizer(cfg)
    pre = Preprocess(tok, cfg.text.max_len, cfg.data.system_prompt)
    rec = pre.map({"image": np.zeros((4, 4, 3), np.uint8), "caption": "a red circle",
                   "label": 0})
    text = tok.decode(rec["text_ids"][rec["text_mask"]])
    assert text.startswith("you are an assistant") and text.endswith("prompt start a red circle")
    assert "<unk>" not in text
    with pytest.raises(ValueError, match="Unknown system prompt"):
        prompts.system_prompt("fancy")


def test_dense_dit_matches_diffusers_dit_after_conversion():
    """The spine's class-conditional DiT (Race-DiT's dense baseline) against diffusers'
    DiTTransformer2DModel. diffusers' DiT port shifts its timestep frequencies
    (``downscale_freq_shift=1``) unlike the original DiT, which jaxdit follows; the test sets
    the original's 0 on the diffusers side."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdit.models.race_dit import RaceDiT
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
        norm_eps=1e-6).eval()
    with torch.no_grad():
        for _, p in ref.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
        emb0 = ref.transformer_blocks[0].norm1.emb
        for block in ref.transformer_blocks:  # one shared embedder, as the original DiT
            block.norm1.emb.load_state_dict(emb0.state_dict())
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    model = RaceDiT(depth=2, width=32, num_heads=2, num_classes=10, patch_size=2,
                    out_channels=4, qk_norm=False, sandwich=False)
    x0 = jnp.zeros((1, 8, 8, 4))
    expected = strip_boxes(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), x0, jnp.zeros(1), {"label": jnp.zeros(1, jnp.int32)}))["params"])
    params = convert_dit.dit_from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()},
                                        expected, patch_size=2, channels=4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    t = np.array([0.1, 0.5, 0.9], np.float32)
    labels = np.array([3, 7, 10])  # 10 = the null class
    with torch.no_grad():
        want = ref(torch.from_numpy(x), timestep=torch.from_numpy(1000 * t),
                   class_labels=torch.from_numpy(labels), return_dict=False)[0].numpy()[:, :4]
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), {"label": jnp.asarray(np.where(labels == 10, -1,
                                                                              labels))})
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4,
                               atol=1e-4)


def test_convert_tool_writes_params_a_run_starts_from(tmp_path):
    """diffusers folder (config.json + safetensors) -> ``jaxdit convert`` -> params
    checkpoint -> ``train.init_params_from`` loads it into the denoiser (params and EMA)."""
    from jaxdit.cli.convert import convert
    from jaxdit.train.loop import Experiment, init_params
    from tests.helpers import tiny_config
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.Lumina2Transformer2DModel(
        sample_size=4, patch_size=4, in_channels=3, hidden_size=64, num_layers=2,
        num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=256,
        axes_dim_rope=(4, 6, 6), cap_feat_dim=32)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "transformer")
    out = str(tmp_path / "params")
    convert("lumina", str(tmp_path / "transformer"), out)
    want, fields = folders.convert_diffusers_dir(str(tmp_path / "transformer"), "lumina")
    assert fields["width"] == 64 and fields["text_width"] == 32

    cfg = tiny_config("lumina")
    cfg.train.init_params_from = out
    exp = Experiment(cfg, jax.devices()[:1])
    with exp.context():
        state = init_params(exp.create_state(), exp, out)
    assert "layer_0" in state.params["denoiser"] and "layer_scan" in want  # tiny: unrolled
    want = relayout_like(want, state.params["denoiser"])  # the tool wrote scanned blocks
    for tree in (state.params["denoiser"], state.ema_params["denoiser"]):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), want)
    with pytest.raises(ConversionError, match="no config.json"):
        folders.convert_diffusers_dir(str(tmp_path), "lumina")
