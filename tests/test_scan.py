"""Scanned block stacks (``model.scan_layers``) compute what the unrolled ones do.

For every family, objective and block-stack variant: the unrolled model's parameters,
stacked with :func:`jaxdit.models.stack.stack_tree_like`, give the scanned model the same
loss, metrics (MoE regularisers and per-layer statistics included), gradients and updated
model state (MoE thresholds), with and without rematerialisation. Parameter counts are the
same in both layouts."""
import functools

import jax
import numpy as np
import pytest

from jaxdit.models.stack import stack_tree_like, unstack_scanned
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
