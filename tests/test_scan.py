"""Scanned block stacks (``model.scan_layers``) compute what the unrolled ones do.

For every family, objective and block-stack variant: the unrolled model's parameters,
stacked with :func:`jaxdit.models.stack.stack_tree_like`, give the scanned model the same
loss, metrics (MoE regularisers and per-layer statistics included), gradients and updated
model state (MoE thresholds), with and without rematerialisation. Parameter counts are the
same in both layouts. The text encoders' hidden states are the same scanned."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxdit import config_lib
from jaxdit.models import text as text_lib

from jaxdit.models.stack import stack_tree_like, unstack_scanned
from jaxdit.train import checkpoint
from jaxdit.train.loop import Experiment
from jaxdit.train.step import loss_fn
from tests.helpers import VARIANTS, fixed_batch, tiny_config

CASES = VARIANTS + [("pixart", "tiny,layout=original"), ("mmdit", "tiny,layout=original"),
                    ("race_dit", "tiny-4in16"), ("d2it", "tiny")]


def _config(family, arg, scan, remat="none"):
    size, _, rest = arg.partition(",layout=")
    cfg = tiny_config(family, size)
    if rest:
        cfg.model.update(layout=rest, qk_norm=False, sandwich=False, text_hidden_ratio=1.0)
    cfg.model.update(scan_layers=scan, remat=remat)
    if family == "race_dit":  # every regulariser on, so their sums over layers are compared
        cfg.moe.update(similarity_weight=0.01, balance_weight=0.01)
    return cfg


def _loss_grads(cfg, params, model_state, batch):
    exp = Experiment(cfg, jax.devices()[:1])
    fn = functools.partial(loss_fn, model=exp.model, autoencoder=exp.autoencoder, cfg=cfg)
    with exp.context():
        (loss, (metrics, new_state)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(
            params, model_state, exp.to_global(batch), jax.random.PRNGKey(7))
    return jax.device_get((loss, metrics, grads, new_state))


def _perturbed(tree):  # zero-init gates would hide most of the blocks from the comparison
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    return treedef.unflatten([a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                              if a.dtype.kind == "f" else a for a, k in zip(leaves, keys)])


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


@pytest.mark.parametrize("family,arg", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_scanned_stack_matches_unrolled(family, arg):
    remat = "full" if family in ("dit_air", "race_dit") else "none"
    unrolled = Experiment(_config(family, arg, False, remat), jax.devices()[:1])
    scanned = Experiment(_config(family, arg, True, remat), jax.devices()[:1])
    with unrolled.context():
        state = jax.device_get(unrolled.create_state())
    abstract = scanned.abstract_state()
    params = _perturbed(state.params)
    batch = {k: np.asarray(v) for k, v in fixed_batch(unrolled.config).items()}
    ref = _loss_grads(unrolled.config, params, state.model_state, batch)
    stacked = (stack_tree_like(params, abstract.params),
               stack_tree_like(state.model_state, abstract.model_state))
    assert jax.tree.structure(stacked[0]) == jax.tree.structure(abstract.params)
    assert sum(a.size for a in jax.tree.leaves(stacked[0])) == sum(
        a.size for a in jax.tree.leaves(params))
    out = _loss_grads(scanned.config, *stacked, batch)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    _close(out[1], ref[1])
    _close(out[2], stack_tree_like(ref[2], abstract.params))
    _close(out[3], stack_tree_like(ref[3], abstract.model_state))
    if family == "race_dit":
        assert {"aux/router_similarity", "aux/balance", "plr_loss"} <= set(ref[1])


def test_stacking_round_trips_and_keeps_a_distinct_last_block():
    tree = {"block_0": {"w": np.zeros(2)}, "block_1": {"w": np.ones(2)},
            "block_2": {"w": np.full(3, 2.0)}, "final": {"w": np.ones(1)}}
    like = {"block_scan": {"w": jax.ShapeDtypeStruct((2, 2), np.float32)},
            "block_2": {"w": jax.ShapeDtypeStruct((3,), np.float32)},
            "final": {"w": jax.ShapeDtypeStruct((1,), np.float32)}}
    stacked = stack_tree_like(tree, like)
    assert stacked["block_scan"]["w"].shape == (2, 2) and set(stacked) == set(like)
    back = unstack_scanned(stacked, "block")
    jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_params_checkpoints_load_into_either_layout(tmp_path):
    """A params-only checkpoint (a converter's output, a split-out denoiser) written by a
    scanned model loads into an unrolled one and back, bit for bit; a model it does not fit
    is refused with the differing leaves named."""
    scanned = Experiment(_config("dit_air", "tiny", True), jax.devices()[:1])
    unrolled = Experiment(_config("dit_air", "tiny", False), jax.devices()[:1])
    with scanned.context():
        params = jax.device_get(scanned.create_state().params["denoiser"])
    checkpoint.save_params(str(tmp_path / "scanned"), params)
    with unrolled.context():
        like = unrolled.abstract_state().params["denoiser"]
        loaded = jax.device_get(checkpoint.load_params(str(tmp_path / "scanned"), like))
    assert "block_0" in loaded and "block_scan" not in loaded
    jax.tree.map(np.testing.assert_array_equal, stack_tree_like(loaded, params), params)
    checkpoint.save_params(str(tmp_path / "unrolled"), loaded)
    with scanned.context():
        back = checkpoint.load_params(str(tmp_path / "unrolled"),
                                      scanned.abstract_state().params["denoiser"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), params)
    wider_cfg = _config("dit_air", "tiny", True)
    wider_cfg.model.width *= 2
    wider = Experiment(wider_cfg, jax.devices()[:1])
    with wider.context(), pytest.raises(checkpoint.CheckpointError,
                                         match=r"kernel \(.*\) in the checkpoint, .* in the model"):
        checkpoint.load_params(str(tmp_path / "scanned"), wider.abstract_state().params["denoiser"])


TEXT_ENCODERS = {
    "trainable": (text_lib.TextEncoder, dict(vocab_size=50, max_len=8, width=32, depth=3)),
    "bert": (text_lib.BertEncoder, dict(vocab_size=50, width=32, depth=3, num_heads=4,
                                        mlp_dim=64)),
    "clip": (text_lib.ClipTextEncoder, dict(vocab_size=50, width=32, depth=3, num_heads=4,
                                            mlp_dim=64)),
    "t5": (text_lib.T5Encoder, dict(vocab_size=50, width=32, depth=3, num_heads=4, head_dim=8,
                                    mlp_dim=64)),
    "gemma2": (text_lib.GemmaEncoder, dict(vocab_size=50, width=32, depth=3, num_heads=4,
                                           num_kv_heads=2, head_dim=8, mlp_dim=64,
                                           query_scale=8 ** -0.5, sliding_window=16)),
}


@pytest.mark.parametrize("kind", sorted(TEXT_ENCODERS))
def test_scanned_text_encoder_matches_unrolled(kind):
    """Every hidden state (and, for a partial run, the first ones) is the same scanned."""
    cls, fields = TEXT_ENCODERS[kind]
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 3, 50)
    mask = jax.numpy.arange(8)[None] < jax.numpy.array([[8], [5]])
    unrolled, scanned = cls(**fields), cls(**fields, scan_layers=True)
    params = _perturbed(nn.unbox(unrolled.init(jax.random.PRNGKey(1), ids, mask)["params"]))
    like = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.PRNGKey(1), ids, mask)))
    stacked = stack_tree_like(params, like["params"])
    assert "layer_scan" in stacked and "layer_0" not in stacked
    def apply(model, p, **kw):
        return jax.jit(functools.partial(model.apply, **kw))({"params": p}, ids, mask)

    _close(apply(scanned, stacked), apply(unrolled, params))
    if kind != "trainable":  # the pretrained encoders can stop after the first layers
        _close(apply(scanned, stacked, num_layers=2), apply(unrolled, params, num_layers=2))


def test_runs_saved_before_the_layer_stacks_keep_their_layout():
    """A config saved without ``model.scan_layers`` was an unrolled run: it restores as one
    (and today's configs default to scanning); the parameter paths of that older layout are
    recognised, so a refused checkpoint says which jaxdit wrote it."""
    old = config_lib.base_config()
    del old.model["scan_layers"]
    assert config_lib.with_defaults(old).model.scan_layers is False
    assert config_lib.base_config().model.scan_layers is True
    old_paths = ["denoiser/scale_shift_table_3/", "text_encoder/attn_0/qkv/q/",
                 "denoiser/adaln_text_1/proj/"]
    new_paths = ["denoiser/block_scan/scale_shift_table/", "text_encoder/layer_0/attn/qkv/",
                 "denoiser/block_1/adaln_text/proj/", "denoiser/layer_scan/attn/"]
    assert all(checkpoint._OLD_LAYOUT.search(p) for p in old_paths)
    assert not any(checkpoint._OLD_LAYOUT.search(p) for p in new_paths)
