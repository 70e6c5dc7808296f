"""Expert Race MoE: exact sharded top-k, routing strategies, expert compute, regularisers."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdit.models.race_dit import param_counts
from jaxdit.models.registry import build_model, example_inputs
from jaxdit.moe import experts, losses, routing, topk
from jaxdit.models.moe_mlp import MoEMlp, MoESpec, moe_spec
from jaxdit.parallel.mesh import LOGICAL_RULES, make_mesh
from jaxdit.train.state import strip_boxes
from helpers import preset

MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "expert": 2}]
BATCH_AXES = ("data", "fsdp", "expert")


def lax_topk_mask(x, k):
    _, idx = jax.lax.top_k(jnp.asarray(x, jnp.float32), k)
    ref = np.zeros(x.shape, bool)
    np.put_along_axis(ref, np.asarray(idx), True, axis=1)
    return ref


def scores(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: many ties at the threshold
        return jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x.astype(jnp.bfloat16) if kind == "bf16" else x


def test_ordered_keys_preserve_order_and_invert():
    x = jnp.asarray([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], jnp.float32)
    k = topk.ordered_keys(x)
    assert (np.diff(np.asarray(k).astype(np.int64)) >= 0).all()
    assert k[3] == k[4]  # -0.0 == +0.0, as in float comparison
    keep = np.array([0, 1, 2, 5, 6, 7])
    np.testing.assert_array_equal(np.asarray(topk.keys_to_float(k))[keep], np.asarray(x)[keep])


@pytest.mark.parametrize("kind", ["f32", "ties", "bf16"])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_local_topk_mask_equals_lax_top_k(kind, bits):
    x = scores(kind, (3, 200))
    for k in (1, 17, 100, 200):
        mask, kth = topk.topk_mask(x, k, bits=bits)
        np.testing.assert_array_equal(mask, lax_topk_mask(x, k))
        np.testing.assert_array_equal(kth, jax.lax.top_k(x.astype(jnp.float32), k)[0][:, -1])


@pytest.mark.parametrize("mesh_axes", MESHES, ids=str)
@pytest.mark.parametrize("kind", ["f32", "ties", "bf16"])
def test_sharded_topk_equals_gathered_lax_top_k(mesh_axes, kind):
    mesh = make_mesh(mesh_axes)
    axes = tuple(a for a in BATCH_AXES if a in mesh_axes)
    x = scores(kind, (2, 8 * 96), seed=1)
    k = 300
    ref = lax_topk_mask(x, k)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, axes)))
    for method in ("radix", "gather"):
        with jax.set_mesh(mesh):
            fn = jax.jit(functools.partial(topk.sharded_topk_mask, k=k, mesh=mesh, axes=axes,
                                           method=method))
            mask, _ = fn(xs)
        np.testing.assert_array_equal(mask, ref, err_msg=method)
        assert int(mask.sum()) == 2 * k


def test_radix_select_communicates_only_histograms():
    """The radix top-k's collectives move a few KiB; the gathered one moves every score."""
    mesh = make_mesh({"data": 8})
    x = jax.ShapeDtypeStruct((1, 8 * 4096), jnp.float32, sharding=NamedSharding(mesh, P(None, "data")))

    def hlo(method):
        fn = functools.partial(topk.sharded_topk_mask, k=1000, mesh=mesh, axes=("data",),
                               method=method)
        with jax.set_mesh(mesh):
            return jax.jit(fn).lower(x).compile().as_text()

    radix, gather = hlo("radix"), hlo("gather")
    assert "all-gather" in gather and "f32[1,32768]" in gather
    assert "f32[1,32768]" not in radix
    assert radix.count("all-reduce(") + radix.count("all-reduce-start(") >= 8


# ---------------------------------------------------------------------------- routing


@pytest.mark.parametrize("strategy", sorted(routing.STRATEGIES))
def test_every_strategy_selects_b_l_k_pairs_per_its_groups(strategy):
    b, l, e, k = 4, 16, 8, 2
    s = scores("f32", (b, l, e), seed=2)
    mask, _ = routing.route(s, strategy, k)
    assert int(mask.sum()) == b * l * k
    m = np.asarray(mask)
    if strategy == "token_choice":
        assert (m.sum(-1) == k).all()
    if strategy == "expert_choice":
        assert (m.sum(1) == k * l // e).all()
    if strategy == "le_choice":
        assert (m.sum((1, 2)) == l * k).all()
    if strategy == "bl_choice":
        assert (m.sum((0, 1)) == b * l * k // e).all()
    if strategy == "be_choice":
        assert (m.sum((0, 2)) == b * k).all()


def test_expert_race_is_a_global_top_k():
    s = scores("f32", (4, 16, 8), seed=3)
    mask, kth = routing.route(s, "expert_race", 2)
    flat = np.sort(np.asarray(s).reshape(-1))[::-1]
    assert float(kth[0]) == flat[4 * 16 * 2 - 1]
    np.testing.assert_array_equal(mask, np.asarray(s) >= flat[4 * 16 * 2 - 1])
    # Unlike token choice, tokens get different numbers of experts.
    assert len(np.unique(np.asarray(mask).sum(-1))) > 1


@pytest.mark.parametrize("mesh_axes", MESHES, ids=str)
@pytest.mark.parametrize("kind", ["f32", "ties"])
def test_sharded_routing_equals_single_device(mesh_axes, kind):
    mesh = make_mesh(mesh_axes)
    axes = tuple(a for a in BATCH_AXES if a in mesh_axes)
    s = scores(kind, (8, 16, 8), seed=4)
    xs = jax.device_put(s, NamedSharding(mesh, P(axes)))
    for strategy in routing.STRATEGIES:
        ref, ref_kth = routing.route(s, strategy, 2)
        with jax.set_mesh(mesh):
            fn = jax.jit(functools.partial(routing.route, strategy=strategy, k=2,
                                           batch_axes=axes))
            mask, kth = fn(xs)
        np.testing.assert_array_equal(mask, ref, err_msg=strategy)
        if routing.batch_dependent(strategy):
            np.testing.assert_array_equal(kth, ref_kth, err_msg=strategy)


def test_threshold_routing_is_batch_independent():
    s = scores("f32", (4, 16, 8), seed=5)
    _, kth = routing.route(s, "expert_race", 2)
    full = routing.threshold_route(s, "expert_race", kth)
    alone = routing.threshold_route(s[:1], "expert_race", kth)
    np.testing.assert_array_equal(full[:1], alone)
    assert int(full.sum()) == 4 * 16 * 2  # at the batch's own K-th value: the same K pairs


def test_routing_rejects_bad_settings():
    with pytest.raises(ValueError, match="moe.routing"):
        routing.route(jnp.zeros((2, 4, 8)), "random", 1)
    with pytest.raises(ValueError, match="not a whole number"):
        routing.route(jnp.zeros((2, 3, 8)), "expert_choice", 1)
    with pytest.raises(ValueError, match="moe.gating"):
        routing.gate(jnp.zeros((2, 3)), "relu")


# ---------------------------------------------------------------------------- experts


def expert_params(e, d, h, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (e, d, h), "b1": (e, h), "w2": (e, h, d), "b2": (e, d)}
    return {n: jnp.asarray(0.2 * rng.standard_normal(s), jnp.float32) for n, s in shapes.items()}


def _moe_loss(params, x, s, mask, **kw):
    y, dropped = experts.expert_ffn(x, mask, jnp.where(mask, s, 0.0), params, k=2, **kw)
    return jnp.sum(jnp.sin(y)), (y, dropped)


def test_grouped_experts_equal_dense_oracle_values_and_grads():
    b, l, d, e, h = 4, 8, 16, 8, 12
    x, s = scores("f32", (b, l, d), 6), scores("f32", (b, l, e), 7)
    mask, _ = routing.route(s, "expert_race", 2)
    params = expert_params(e, d, h)
    grad = jax.value_and_grad(_moe_loss, argnums=(0, 1), has_aux=True)
    (_, (y_ref, _)), g_ref = grad(params, x, s, mask, capacity_factor=1.0, impl="dense")
    (_, (y, dropped)), g = grad(params, x, s, mask, capacity_factor=1.0, impl="grouped")
    assert int(dropped) == 0  # one device, race: exactly K pairs fit a buffer of K
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5), g, g_ref)


def test_small_buffer_drops_and_counts_pairs():
    b, l, d, e = 2, 8, 8, 4
    x, s = scores("f32", (b, l, d), 8), scores("f32", (b, l, e), 9)
    s = s.at[..., 0].add(5.0)  # expert 0 wins almost everything
    mask, _ = routing.route(s, "expert_race", 1)
    xf, mf = x.reshape(-1, d), mask.reshape(-1, e)
    y, dropped = experts.grouped_ffn(xf, mf, jnp.where(mf, 1.0, 0.0),
                                     expert_params(e, d, 8), buffer=8)
    assert int(dropped) == int(mf.sum()) - 8
    assert experts.capacity(16, 4, 4, 1, 0.0) == 64  # dropless worst case


@pytest.mark.parametrize("mesh_axes", [{"data": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2},
                                       {"data": 8}], ids=str)
def test_expert_parallel_equals_single_device(mesh_axes):
    b, l, d, e, h = 8, 8, 16, 8, 12
    x, s = scores("f32", (b, l, d), 10), scores("f32", (b, l, e), 11)
    mask, _ = routing.route(s, "expert_race", 2)
    params = expert_params(e, d, h, seed=1)
    grad = jax.value_and_grad(_moe_loss, argnums=(0, 1), has_aux=True)
    (_, (y_ref, _)), g_ref = grad(params, x, s, mask, capacity_factor=0.0)
    mesh = make_mesh(mesh_axes)
    token_axes = tuple(a for a in BATCH_AXES if a in mesh_axes)
    expert_axis = "expert" if "expert" in mesh_axes else None
    with jax.set_mesh(mesh):
        fn = jax.jit(functools.partial(grad, capacity_factor=0.0, token_axes=token_axes,
                                       expert_axis=expert_axis))
        (_, (y, dropped)), g = fn(params, x, s, mask)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5), g, g_ref)


# ---------------------------------------------------------------------------- losses, metrics


def test_router_losses_and_metrics_on_known_cases():
    n, e = 64, 8
    uniform = jnp.zeros((n, e))
    balanced = jnp.asarray(np.arange(n)[:, None] % e == np.arange(e)[None])
    np.testing.assert_allclose(losses.router_similarity_loss(uniform, balanced), 1.0 / e * 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.balance_loss(uniform, balanced), 1.0, rtol=1e-6)
    assert float(losses.max_violation(jnp.full((e,), 5))) == 0.0
    assert float(losses.max_violation(jnp.asarray([4, 0, 0, 0]))) == pytest.approx(3.0)
    # Comb: one pair always together -> 1 of 28 pairs covers everything.
    co = jnp.zeros((e, e)).at[0, 1].set(10).at[1, 0].set(10)
    assert float(losses.combination_usage(co)) == pytest.approx(100 / 28)
    full = jnp.ones((e, e))
    assert float(losses.combination_usage(full)) == pytest.approx(100 * 27 / 28)


def test_router_similarity_penalises_collapsed_pairs():
    """Two experts always co-selected with correlated routing probabilities cost more than
    a diverse assignment."""
    n, e = 64, 4
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((n, e)), jnp.float32)
    collapsed = jnp.asarray(np.tile([True, True, False, False], (n, 1)))
    diverse = jnp.asarray(np.stack([np.roll([True, True, False, False], i) for i in range(n)]))
    collapsed_logits = logits.at[:, :2].add(3.0)
    assert (losses.router_similarity_loss(collapsed_logits, collapsed)
            > losses.router_similarity_loss(logits, diverse))


def _layer(routing_name="expert_race"):
    spec = MoESpec(num_experts=8, k=2, routing=routing_name, similarity_weight=0.1,
                   balance_weight=0.1, capacity_factor=0.0)
    return MoEMlp(spec, hidden=16, target_dim=4)


def test_moe_layer_tracks_threshold_in_training_and_uses_it_at_inference():
    layer = _layer()
    x = scores("f32", (4, 8, 16), 12)
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert set(variables) >= {"params", "moe_state"}
    state = {"moe_state": variables["moe_state"]}
    for _ in range(3):
        _, out = layer.apply({"params": variables["params"], **state}, x,
                             mutable=["moe_state", "aux_loss", "moe_metrics", "deep_pred"])
        state = {"moe_state": out["moe_state"]}
    ms = jax.tree_util.tree_leaves_with_path(state)
    assert int(state["moe_state"]["updates"]) == 3
    kth = out["moe_metrics"]["batch_threshold"][0]
    # Same batch every time: bias-corrected EMA equals the batch threshold.
    d = layer.spec.threshold_decay
    tau = state["moe_state"]["threshold_ema"] / (1 - d ** 3)
    np.testing.assert_allclose(tau, kth, rtol=1e-5)
    assert set(out["aux_loss"]) == {"router_similarity", "balance"}
    assert out["deep_pred"]["pred"][0].shape == (4, 8, 4)
    assert ms
    # Inference (moe_state immutable): sample 0 alone gives what it gives inside the batch.
    v = {"params": variables["params"], **state}
    np.testing.assert_allclose(layer.apply(v, x)[:1], layer.apply(v, x[:1]), atol=1e-6)


# ---------------------------------------------------------------------------- configs, counts

# (config, Table 4 total, Table 4 activated) in billions: counts of the transformer blocks.
TABLE4 = [("B-dense", .127, .127), ("M-dense", .265, .265), ("L-dense", .453, .453),
          ("XL-dense", .669, .669), ("B-4in32", .531, .135), ("M-4in32", 1.106, .281),
          ("L-4in32", 1.889, .479), ("XL-4in32", 2.788, .707)]
# Table 5 (B/2, same activated size): totals exclude the router (see param_counts).
TABLE5 = [("B-1in4", .297), ("B-1in8", .524), ("B-1in16", .978), ("B-2in8", .297),
          ("B-2in16", .524), ("B-2in32", .977), ("B-4in16", .297), ("B-4in32", .524),
          ("B-4in64", .977), ("B-8in32", .297), ("B-8in64", .524), ("B-8in128", .977)]


@functools.lru_cache(maxsize=None)
def _counts(arg):
    cfg = preset("race_dit", arg)
    model = build_model(cfg)
    with nn.logical_axis_rules(LOGICAL_RULES):
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                     *example_inputs(cfg)))
    return param_counts(strip_boxes(abstract["params"]), moe_spec(cfg.moe))


@pytest.mark.parametrize("arg,total,active", TABLE4)
def test_table4_parameter_counts(arg, total, active):
    c = _counts(arg)
    assert abs(c["blocks"] / 1e9 / total - 1) < 0.01, c
    assert abs(c["activated"] / 1e9 / active - 1) < 0.01, c


def test_table5_parameter_counts():
    for arg, total in TABLE5:
        c = _counts(arg)
        assert abs(c["blocks_without_router"] / 1e9 / total - 1) < 0.01, (arg, c)
        assert abs(c["activated"] / _counts("B-dense")["activated"] - 1) < 0.07, (arg, c)


def test_race_config_parsing_and_errors():
    c = preset("race_dit", "B-4in32,routing=token_choice,depth=3")
    assert (c.moe.num_experts, c.moe.k, c.moe.hidden_split) == (32, 4, 4)
    assert c.moe.routing == "token_choice" and c.model.depth == 3
    assert preset("race_dit", "XL-dense").moe.num_experts == 0
    for bad, msg in (("B-4of32", "MoE variant"), ("Q-dense", "Unknown size"),
                     ("B-4in32,bogus=1", "Unknown field")):
        with pytest.raises(ValueError, match=msg):
            preset("race_dit", bad)
    c = preset("race_dit", "tiny-4in16,gating=tanh")
    with pytest.raises(ValueError, match="moe.gating"):
        build_model(c)


def test_router_statistics_reduce_e_by_e_not_the_logits():
    """Router similarity over batch-sharded (N, E) logits: XLA reduces E x E partial sums and
    never gathers the (N, E) logits."""
    mesh = make_mesh({"data": 8})
    n, e = 8 * 512, 16
    sh = NamedSharding(mesh, P("data"))
    logits = jax.ShapeDtypeStruct((n, e), jnp.float32, sharding=sh)
    mask = jax.ShapeDtypeStruct((n, e), jnp.bool_, sharding=sh)
    with jax.set_mesh(mesh):
        hlo = jax.jit(losses.router_similarity_loss).lower(logits, mask).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo
