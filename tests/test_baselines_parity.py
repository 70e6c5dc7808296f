"""The DiT-Air paper's baselines as published, against diffusers: small random
PixArtTransformer2DModel and SD3Transformer2DModel on the CPU, converted into PixArt-alpha /
MMDiT with ``layout="original"``, give the same outputs (SD3's negated: jaxdit predicts
x0 - eps)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import config_lib
from jaxdit.convert import baselines as convert_baselines
from jaxdit.convert import folders
from jaxdit.convert.common import ConversionError
from jaxdit.models.registry import build_denoiser
from jaxdit.train.state import strip_boxes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _randomise(ref):
    """Every parameter random, also the zero-initialised gates and output layers."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return ref.eval()


def _jaxdit_model(fields, text_width, pooled_width):
    model_cfg = config_lib.base_config().model
    model_cfg.update({k: v for k, v in fields.items() if k in model_cfg})
    model = build_denoiser(model_cfg, fields["latent_channels"])
    cond = {"text_tokens": jnp.zeros((1, 3, text_width)), "text_mask": jnp.ones((1, 3), bool),
            "text_pooled": jnp.zeros((1, pooled_width))}
    p = fields["patch_size"]
    expected = strip_boxes(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2 * p, 2 * p, 4)), jnp.zeros(1), cond))["params"])
    return model, expected


@pytest.mark.parametrize("sizes", [False, True], ids=["plain", "size_conditioning"])
def test_pixart_alpha_matches_diffusers_after_conversion(sizes):
    """At the native latent size and at another aspect ratio (diffusers then stretches the
    sin-cos positions onto its base grid), with a caption padding mask, interpolation
    scale 2 and, for the 1024-px checkpoints, the resolution / aspect-ratio embedding."""
    ref = _randomise(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=48, sample_size=8, patch_size=2,
        caption_channels=24, use_additional_conditions=sizes, interpolation_scale=2))
    fields = convert_baselines.pixart_config_from_diffusers(ref.config)
    assert fields["size_conditioning"] == (8 if sizes else 0)
    assert (fields["pos_base_size"], fields["pos_interpolation"]) == (4, 2.0)
    model, expected = _jaxdit_model(fields, 24, 24)
    params = convert_baselines.pixart_from_diffusers(
        {k: v.numpy() for k, v in ref.state_dict().items()}, expected, patch_size=2, channels=4)
    rng = np.random.default_rng(1)
    text = rng.normal(size=(2, 5, 24)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([[3], [5]])
    t = np.array([0.2, 0.7], np.float32)
    apply = jax.jit(model.apply)
    for h, w in ((8, 8), (8, 12)):
        x = rng.normal(size=(2, 4, h, w)).astype(np.float32)
        extra = {"resolution": torch.tensor([[8.0 * h, 8.0 * w]] * 2),
                 "aspect_ratio": torch.tensor([[h / w]] * 2)} if sizes else None
        with torch.no_grad():
            want = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                       timestep=torch.from_numpy(1000 * t), added_cond_kwargs=extra,
                       encoder_attention_mask=torch.from_numpy(mask.astype(np.float32)),
                       return_dict=False)[0].numpy()[:, :4]  # the noise mean, not sigma
        got = apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                    {"text_tokens": jnp.asarray(text), "text_mask": jnp.asarray(mask)})
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"], ids=["sd3", "sd3.5_qk_norm"])
def test_sd3_mmdit_matches_diffusers_after_conversion(qk_norm, tmp_path):
    """A non-square latent cropped from the position table, pooled text of its own width,
    the text-pre-only last block; the folder converter gives the same params."""
    ref = _randomise(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=24,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=48,
        pooled_projection_dim=20, out_channels=4, pos_embed_max_size=12, qk_norm=qk_norm))
    fields = convert_baselines.sd3_config_from_diffusers(ref.config)
    assert fields["qk_norm"] == (qk_norm is not None) and fields["pooled_width"] == 20
    model, expected = _jaxdit_model(fields, 24, 20)
    params = convert_baselines.sd3_from_diffusers(
        {k: v.numpy() for k, v in ref.state_dict().items()}, expected, patch_size=2, channels=4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 8, 12)).astype(np.float32)
    text = rng.normal(size=(2, 6, 24)).astype(np.float32)
    pooled = rng.normal(size=(2, 20)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                   pooled_projections=torch.from_numpy(pooled),
                   timestep=torch.from_numpy(1000 * t), return_dict=False)[0].numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), {"text_tokens": jnp.asarray(text),
                                                "text_mask": jnp.ones((2, 6), bool),
                                                "text_pooled": jnp.asarray(pooled)})
    assert np.abs(want).max() > 0.1
    # SD3 predicts v = eps - x0, jaxdit x0 - eps: the converted output layer is negated
    np.testing.assert_allclose(-np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4,
                               atol=1e-4)
    ref.save_pretrained(tmp_path / "transformer")
    folder, folder_fields = folders.convert_diffusers_dir(str(tmp_path / "transformer"), "sd3")
    assert folder_fields == fields
    jax.tree.map(np.testing.assert_array_equal, folder, params)


def test_baseline_converters_refuse_what_they_do_not_implement():
    sd3 = dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, patch_size=2,
               in_channels=4, joint_attention_dim=24, pooled_projection_dim=20,
               pos_embed_max_size=12)
    with pytest.raises(ConversionError, match="dual-attention"):
        convert_baselines.sd3_config_from_diffusers({**sd3, "dual_attention_layers": (0,)})
    with pytest.raises(ConversionError, match="qk_norm='layer_norm'"):
        convert_baselines.sd3_config_from_diffusers({**sd3, "qk_norm": "layer_norm"})
    with pytest.raises(ConversionError, match="norm_type"):
        convert_baselines.pixart_config_from_diffusers(
            dict(num_attention_heads=2, attention_head_dim=24, norm_type="ada_norm_zero",
                 caption_channels=24, sample_size=8, patch_size=2, num_layers=1,
                 in_channels=4))
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=24,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=48,
        pooled_projection_dim=20, out_channels=4, pos_embed_max_size=12)
    fields = convert_baselines.sd3_config_from_diffusers(ref.config)
    _, expected = _jaxdit_model(fields, 24, 20)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    state["transformer_blocks.0.attn.extra.weight"] = np.zeros(3)
    with pytest.raises(ConversionError, match="Unexpected diffusers parameters"):
        convert_baselines.sd3_from_diffusers(state, expected, patch_size=2, channels=4)
