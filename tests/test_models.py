"""Model shapes, zero-init identity, and parameter counts against DiT-Air Tables 1-3."""
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import keystr, tree_flatten_with_path

from jaxdit.models.attention import xla_attention
from jaxdit.models.registry import (AUTOENCODER_FAMILIES, CLASS_FAMILIES, FAMILIES,
                                    build_denoiser, build_model, example_inputs, family_of)
from jaxdit.train.state import strip_boxes
from tests.helpers import VARIANTS, fixed_batch, tiny_config, preset


def _init(config, batch=2):
    model = build_model(config)
    b = fixed_batch(config, batch)
    cond = {"text_ids": b["text_ids"], "text_mask": b["text_mask"]}
    t = jnp.linspace(0.1, 0.9, batch)
    with nn.logical_axis_rules(()):
        variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), b["image"], t, cond))
    return model, variables, b["image"], t, cond


@pytest.mark.parametrize("family,arg", VARIANTS)
def test_output_shape_and_zero_init(family, arg):
    cfg = tiny_config(family, arg)
    cfg.text.vocab_size = 32
    model, variables, x, t, cond = _init(cfg)
    out = jax.jit(model.apply)(variables, x, t, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # adaLN-Zero / zero-init final layer: the model starts by predicting exactly 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("arg", ["tiny", "tiny,share=full", "tiny,share=attention"])
def test_dit_air_blocks_start_as_identity(arg):
    cfg = tiny_config("dit_air", arg)
    cfg.text.vocab_size = 32
    model, variables, x, t, cond = _init(cfg)
    _, inter = model.apply(variables, x, t, cond, capture_intermediates=True)
    den = inter["intermediates"]["denoiser"]
    seq0 = jnp.concatenate([den["text_adapter"]["__call__"][0],
                            den["patch_embed"]["__call__"][0]], axis=1)
    # a scanned stack records its layers' outputs first, stacked on a leading layer axis
    outs = [o for k, v in den.items() if "block" in k
            for o in (v["__call__"][:1] if cfg.model.scan_layers else v["__call__"])]
    assert sum(o.shape[0] if o.ndim > seq0.ndim else 1 for o in outs) == cfg.model.depth
    for o in outs:
        np.testing.assert_allclose(np.asarray(o), np.broadcast_to(seq0, o.shape), atol=1e-6)


def test_bf16_compute_runs_and_is_close_to_fp32():
    cfg = tiny_config("dit_air", "tiny")
    cfg.text.vocab_size = 32
    model, variables, x, t, cond = _init(cfg)
    variables = jax.tree.map(lambda a: a + 0.02 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                             variables)
    ref = jax.jit(model.apply)(variables, x, t, cond)
    cfg.model.dtype = "bfloat16"
    out = jax.jit(build_model(cfg).apply)(variables, x, t, cond)
    assert out.dtype == jnp.float32
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05


def test_gqa_attention_matches_repeated_kv_and_respects_mask():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[4], [7]]))
    out = xla_attention(q, k, v, mask)
    kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
    logits = jnp.einsum("bshd,bthd->bhst", q, kr) / np.sqrt(8)
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    ref = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(logits, -1), vr)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # Masked keys have no influence.
    k2 = k.at[0, 5].set(100.0)
    np.testing.assert_allclose(xla_attention(q, k2, v, mask)[0], out[0], atol=1e-6)


# ---------------------------------------------------------------- parameter counts

def _abstract_params(family, arg):
    cfg = preset(family, arg)
    model = build_denoiser(cfg.model, cfg.latent.channels)
    s = cfg.data.image_size // cfg.latent.downsample
    x = jnp.zeros((1, s, s, cfg.latent.channels))
    cond = {"text_tokens": jnp.zeros((1, 4, cfg.text.width)), "text_mask": jnp.ones((1, 4), bool),
            "text_pooled": jnp.zeros((1, cfg.text.width))}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(1), cond))
    return cfg, strip_boxes(shapes["params"])


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("family,arg,expected", [
    ("dit_air", "B", 321e6), ("dit_air", "B,share=full", 49e6),
    ("dit_air", "B,share=attention", 230e6), ("mmdit", "B", 902e6),
    ("mmdit", "B,adaln=shared", 631e6)])
def test_paper_param_counts_within_one_percent(family, arg, expected):
    _, params = _abstract_params(family, arg)
    n = _count(params)
    assert abs(n / expected - 1) < 0.01, f"{family}:{arg} has {n:,} params, paper {expected:,.0f}"


BLOCK_PREFIXES = ("block", "shared_block", "shared_attn", "adaln")


def _block_matrix_params(params):
    """Matrix weights (ndim >= 2) of transformer blocks and the (shared) AdaLN."""
    total = 0
    for path, leaf in tree_flatten_with_path(params)[0]:
        top = keystr(path[:1]).strip("[]'")
        if top.startswith(BLOCK_PREFIXES) and path[-1].key == "kernel":
            total += int(np.prod(leaf.shape))
    return total


@pytest.mark.parametrize("size", ["S", "B"])
@pytest.mark.parametrize("family,arg,formula", [
    ("dit_air", "", lambda n: 12 + 12 * n),
    ("dit_air", "share=full", lambda n: 24),
    ("dit_air", "share=attention", lambda n: 16 + 8 * n),
    ("pixart", "", lambda n: 6 + 16 * n),
    ("mmdit", "", lambda n: 36 * n),
    ("mmdit", "adaln=shared", lambda n: 24 * n + 12)])
def test_table1_block_formulas_exact(size, family, arg, formula):
    cfg, params = _abstract_params(family, ",".join(filter(None, [size, arg])))
    d, n = cfg.model.width, cfg.model.depth
    assert _block_matrix_params(params) == formula(n) * d * d


def test_precomputed_text_features_and_caption_dropout():
    """A frozen/pretrained encoder plugs in as precomputed features; dropout nulls them."""
    from jaxdit.models.registry import drop_condition
    cfg = tiny_config()
    cfg.text.update(kind="precomputed", width=24)
    model = build_model(cfg)
    assert model.text_encoder is None
    rng = np.random.default_rng(0)
    cond = {"text_tokens": jnp.asarray(rng.normal(size=(2, 8, 24)), jnp.float32),
            "text_mask": jnp.ones((2, 8), bool),
            "text_pooled": jnp.asarray(rng.normal(size=(2, 24)), jnp.float32)}
    x, t = jnp.zeros((2, 16, 16, 3)), jnp.array([0.2, 0.7])
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), x, t, cond))
    assert model.apply(variables, x, t, cond).shape == x.shape
    dropped = drop_condition(cond, jnp.array([True, False]))
    np.testing.assert_array_equal(dropped["text_tokens"][0], cond["text_tokens"][0])
    np.testing.assert_array_equal(dropped["text_tokens"][1], 0.0)
    np.testing.assert_array_equal(dropped["text_pooled"][1], 0.0)
    assert dropped["text_mask"][1].tolist() == [True] + [False] * 7
    ids = {"text_ids": jnp.full((2, 8), 5, jnp.int32), "text_mask": jnp.ones((2, 8), bool)}
    d = drop_condition(ids, jnp.array([False, True]))
    assert d["text_ids"][0].tolist() == [1] + [0] * 7 and d["text_ids"][1].tolist() == [5] * 8


@pytest.mark.parametrize("family", ["dit_air", "mmdit"])  # one block output / a tuple
def test_remat_gives_the_same_gradients(family):
    cfg = tiny_config(family, "tiny")
    cfg.text.vocab_size = 32
    model, variables, x, t, cond = _init(cfg)
    variables = jax.tree.map(lambda a: a + 0.02 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                             variables)
    loss = lambda m: lambda v: jnp.mean(m.apply(v, x, t, cond) ** 2)
    g_ref = jax.jit(jax.grad(loss(model)))(variables)
    for policy in ("full", "dots"):
        cfg.model.remat = policy
        g = jax.jit(jax.grad(loss(build_model(cfg))))(variables)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     g, g_ref)
    cfg.model.remat = "everything"
    with pytest.raises(ValueError, match="model.remat='everything'"):
        build_model(cfg)


def test_attention_backend_dispatch():
    from jaxdit.kernels import dispatch
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
    mask = jnp.asarray(np.arange(6)[None] < np.array([[3], [6]]))
    ref = xla_attention(q, k, k, mask)
    np.testing.assert_allclose(dispatch.attention(q, k, k, mask, impl="auto"), ref)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            dispatch.attention(q, k, k, mask, impl="cudnn")
    with pytest.raises(ValueError, match="Unknown attention backend"):
        dispatch.attention(q, k, k, mask, impl="flash3")
    cfg = tiny_config()
    cfg.model.attn_impl = "flash3"
    with pytest.raises(ValueError, match="Unknown attention backend"):
        build_model(cfg)


def test_auto_attention_backend_choice(monkeypatch):
    """``auto`` on a GPU: cuDNN where it can, Pallas for what cuDNN refuses, XLA elsewhere;
    on TPU splash where it can, else XLA."""
    from jaxdit.kernels import dispatch
    bf16 = lambda d, h=4: jax.ShapeDtypeStruct((2, 16, h, d), jnp.bfloat16)
    seg = (jnp.zeros((2, 16), jnp.int32),) * 2
    assert dispatch.auto_backend(bf16(64), bf16(64), bf16(64)) == "xla"  # CPU here
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert dispatch.auto_backend(bf16(64), bf16(64), bf16(64)) == "cudnn"
    assert dispatch.auto_backend(bf16(108), bf16(108), bf16(108)) == "pallas"  # not 8k
    assert dispatch.auto_backend(bf16(64), bf16(64), bf16(64), seg) == "pallas"
    f32 = jax.ShapeDtypeStruct((2, 16, 4, 64), jnp.float32)
    assert dispatch.auto_backend(f32, f32, f32) == "pallas"
    big = jax.ShapeDtypeStruct((2, 16, 4, 320), jnp.bfloat16)
    assert dispatch.auto_backend(big, big, big) == "xla"  # neither fast backend
    with pytest.raises(ValueError, match="splash attention is a TPU kernel"):
        dispatch.attention(*(jnp.zeros((1, 8, 2, 64), jnp.bfloat16),) * 3, impl="splash")
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")  # splash on TPU
    assert dispatch.auto_backend(bf16(72), bf16(72), bf16(72), seg) == "splash"
    assert dispatch.auto_backend(f32, f32, f32) == "splash"
    assert dispatch.auto_backend(bf16(64), bf16(64), bf16(64), extras=True) == "xla"
    assert dispatch.auto_backend(big, big, big) == "xla"


FAMILY_CONFIGS = {"dit_air": "dit_air.py:tiny", "pixart": "pixart.py:tiny",
                  "mmdit": "mmdit.py:tiny", "race_dit": "race_dit.py:tiny-4in16",
                  "lumina": "lumina.py:tiny", "d2it": "d2it.py:tiny",
                  "kl_vae": "vae.py:tiny-4ch", "dvae": "d2it.py:dvae-tiny"}


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_each_family_descriptor_builds_its_model_from_its_own_inputs(name):
    """The descriptor is the family's one entry point: its experiment config names it, its
    fields include every field that config sets to a non-default, and ``build_model`` +
    its ``example_inputs`` initialise the model (abstractly); the tables derived from the
    descriptors agree with the family's conditioning and role."""
    assert set(FAMILY_CONFIGS) == set(FAMILIES)
    path, arg = FAMILY_CONFIGS[name].split(":")
    spec = importlib.util.spec_from_file_location("experiment", f"experiments/{path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    family = family_of(cfg)
    assert family is FAMILIES[name]
    if name in ("dvae", "d2it"):
        cfg.dvae.threshold = 0.5  # resolved from the data by resolve_config
    if cfg.text.kind == "trainable":
        cfg.text.vocab_size = 32  # likewise from the tokenizer
    assert (cfg.text.kind == "none") == (name in CLASS_FAMILIES)
    assert (family.role == "autoencoder") == (name in AUTOENCODER_FAMILIES)
    assert cfg.latent.kind in family.latent_kinds
    model = build_model(cfg)
    with nn.logical_axis_rules(()):
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                   *example_inputs(cfg, 2)))
    assert jax.tree.leaves(shapes["params"])
    with pytest.raises(ValueError, match="Unknown model.family 'unet'"):
        family_of("unet")
