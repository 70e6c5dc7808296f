"""Pallas flash attention and TPU splash attention against the XLA reference (interpret
mode on CPU): values and gradients with masks, GQA/MQA, odd head dims, bf16, S != T;
lowering for GPU (Triton) and TPU (Mosaic) checked by exporting from the CPU; both kernels
per shard under device meshes; the ``pallas`` backend inside a model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxdit.kernels import dispatch
from jaxdit.kernels.flash_attention import BlockSizes, flash_attention
from jaxdit.kernels.reference import xla_attention
from jaxdit.kernels.splash import splash_attention
from jaxdit.parallel.mesh import LOGICAL_RULES, make_mesh
from jaxdit.train.aot import topology_devices

SMALL = BlockSizes(16, 16, 16, 16)  # several blocks per sequence at test sizes
FUSED = BlockSizes(16, 16, 16, 16, fused_bwd=True)  # dQ by atomics in the dK/dV kernel


def _inputs(b, s, t, h, hkv, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, s, h, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d)).astype(dtype)
    lengths = jnp.array([t // 2 + 1] + [t] * (b - 1))[:, None]
    return q, k, v, jnp.arange(t)[None] < lengths


def _loss(fn, mask):
    def loss(q, k, v):
        out = fn(q, k, v, mask).astype(jnp.float32)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum()
    return loss


@pytest.mark.parametrize("s,t,h,hkv,d,blocks", [
    (40, 56, 4, 2, 72, SMALL),    # GQA, head dim padded 72 -> 128, ragged lengths
    (40, 56, 4, 2, 72, FUSED),    # the same through the fused (atomic dQ) backward
    (33, 33, 3, 1, 108, SMALL),   # MQA, odd length, head dim 108
    (24, 40, 2, 2, 64, SMALL),    # plain MHA, S != T
])
def test_values_and_gradients_match_xla(s, t, h, hkv, d, blocks):
    q, k, v, mask = _inputs(2, s, t, h, hkv, d)
    flash = jax.jit(lambda *a: flash_attention(*a, blocks=blocks))
    np.testing.assert_allclose(flash(q, k, v, mask), xla_attention(q, k, v, mask),
                               atol=2e-5, rtol=1e-5)
    got = jax.jit(jax.grad(_loss(lambda *a: flash_attention(*a, blocks=blocks), mask),
                           argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_loss(xla_attention, mask), argnums=(0, 1, 2))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    # masked keys get exactly zero gradient
    np.testing.assert_array_equal(np.asarray(got[1])[0, t // 2 + 1:], 0.0)


def test_segment_ids_for_packed_samples():
    """Two samples packed in each row (segments 0 and 1, plus masked padding): equal to
    attention run on each sample alone, in values and gradients."""
    q, k, v, _ = _inputs(2, 36, 36, 4, 2, 32, seed=5)
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 16], 2, axis=0), jnp.int32)
    mask = jnp.arange(36)[None] < jnp.array([[36], [30]])
    ids = (seg, seg)
    out = jax.jit(lambda *a: flash_attention(*a, mask, segment_ids=ids, blocks=SMALL))(q, k, v)
    ref = xla_attention(q, k, v, mask, segment_ids=ids)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    alone = xla_attention(q[:1, :20], k[:1, :20], v[:1, :20])
    np.testing.assert_allclose(out[:1, :20], alone, atol=2e-5)
    want = jax.grad(_loss(lambda *a: xla_attention(*a, segment_ids=ids), mask),
                    argnums=(0, 1, 2))(q, k, v)
    for blocks in (SMALL, FUSED):
        got = jax.jit(jax.grad(_loss(lambda *a, b=blocks: flash_attention(
            *a, segment_ids=ids, blocks=b), mask), argnums=(0, 1, 2)))(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dispatch.attention(q, k, v, mask, impl="pallas",
                                                  segment_ids=ids), ref, atol=2e-5)


@pytest.mark.parametrize("s,t,h,hkv,d,packed", [
    (40, 56, 4, 2, 72, False),  # GQA, head dim 72 and lengths padded to 128 for Mosaic
    (36, 36, 3, 1, 108, True),  # MQA, two packed samples per row plus masked padding
])
def test_splash_matches_xla(s, t, h, hkv, d, packed):
    q, k, v, mask = _inputs(2, s, t, h, hkv, d, seed=7)
    ids = None
    if packed:
        ids = (jnp.asarray(np.repeat([[0] * 20 + [1] * 16], 2, axis=0), jnp.int32),) * 2
        mask = jnp.arange(t)[None] < jnp.array([[t], [30]])
    fn = lambda *a: splash_attention(*a, segment_ids=ids)
    ref = lambda *a: xla_attention(*a, segment_ids=ids)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, mask), ref(q, k, v, mask), atol=2e-5)
    got = jax.jit(jax.grad(_loss(fn, mask), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_loss(ref, mask), argnums=(0, 1, 2))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    out = splash_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                           v.astype(jnp.bfloat16), mask, segment_ids=ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref(q, k, v, mask), atol=5e-2)
    np.testing.assert_allclose(dispatch.attention(q, k, v, mask, impl="splash",
                                                  segment_ids=ids), ref(q, k, v, mask),
                               atol=2e-5)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernels_run_per_shard_under_a_mesh(impl):
    """A kernel is a custom call the partitioner cannot split: under a mesh it runs in
    ``shard_map`` on each device's batch (and, where the head counts divide, head) shard,
    equal to the unsharded call in values and gradients. Where nothing divides (4 KV heads
    over tensor=8, batch unsplit) it runs whole."""
    q, k, v, _ = _inputs(8, 40, 40, 8, 4, 32, seed=2)
    mask = jnp.arange(40)[None] < jnp.array([30] + [40] * 7)[:, None]
    ids = (jnp.asarray(np.repeat([[0] * 24 + [1] * 16], 8, axis=0), jnp.int32),) * 2
    call = lambda *a: dispatch.attention(*a, impl=impl, segment_ids=ids)
    want = xla_attention(q, k, v, mask, segment_ids=ids)
    gwant = jax.grad(_loss(lambda *a: xla_attention(*a, segment_ids=ids), mask),
                     argnums=(0, 1, 2))(q, k, v)
    for axes, split in ((dict(data=8), True), (dict(fsdp=4, tensor=2), True),
                        (dict(tensor=8), False)):
        with jax.set_mesh(make_mesh(axes)), nn.logical_axis_rules(LOGICAL_RULES):
            assert ("shard_map" in str(jax.make_jaxpr(call)(q, k, v, mask))) == split, axes
            np.testing.assert_allclose(jax.jit(call)(q, k, v, mask), want, atol=2e-5)
            got = jax.jit(jax.grad(_loss(call, mask), argnums=(0, 1, 2)))(q, k, v)
        for g, w, name in zip(got, gwant, "qkv"):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"{axes} d{name}")


def test_bf16_and_no_mask():
    q, k, v, _ = _inputs(1, 48, 48, 4, 2, 96, jnp.bfloat16, seed=3)
    out = flash_attention(q, k, v, None, blocks=SMALL)
    ref = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
    gq = jax.grad(lambda q: flash_attention(q, k, v, None, blocks=SMALL)
                  .astype(jnp.float32).sum())(q)
    gq_ref = jax.grad(lambda q: xla_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32)).sum())(q)
    np.testing.assert_allclose(gq.astype(jnp.float32), gq_ref, atol=5e-2)


def _tpu_info_for_export():
    """Pallas' TPU lowering asks the local device for the chip generation; register the CPU
    as a v5p so the Mosaic lowering can run here (private API: skip if it moved)."""
    try:
        from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
        tpu_info.registry.setdefault("cpu", lambda: tpu_info.get_tpu_info_for_chip(
            tpu_info.ChipVersion.TPU_V5P, 1))
    except (ImportError, AttributeError) as e:
        pytest.skip(f"cannot target TPU from this jax: {e}")


@pytest.mark.parametrize("platform,target", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(platform, target):
    """Forward and backward pass the Triton (GPU) and Mosaic (TPU v5p) lowerings at a DiT
    shape (bf16, GQA, head dim 96). Lowering only: compiling needs the device."""
    if platform == "tpu":
        _tpu_info_for_export()
    q = jax.ShapeDtypeStruct((2, 256, 8, 96), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 384, 2, 96), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 384), jnp.bool_)

    def fwd(q, k, v, m, blocks=None):
        return flash_attention(q, k, v, m, interpret=False, platform=platform, blocks=blocks)

    def grads(q, k, v, m):
        return jax.grad(lambda *a: fwd(*a, m).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
            q, k, v)

    checks = [export.DisabledSafetyCheck.custom_call(n)
              for n in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    for fn, kernels in ((fwd, 1), (grads, 3)):
        text = export.export(jax.jit(fn), platforms=[target], disabled_checks=checks)(
            q, k, k, mask).mlir_module()
        assert text.count("custom_call @") == kernels
    fused = BlockSizes(64, 64, 64, 64, fused_bwd=True)
    fused_grads = lambda *a: jax.grad(lambda *b: fwd(*b, a[3], fused).astype(
        jnp.float32).sum(), argnums=(0, 1, 2))(*a[:3])
    if platform == "gpu":  # forward + one backward kernel
        text = export.export(jax.jit(fused_grads), platforms=[target],
                             disabled_checks=checks)(q, k, k, mask).mlir_module()
        assert text.count("custom_call @") == 2
    else:
        with pytest.raises(ValueError, match="Mosaic TPU has none"):
            export.export(jax.jit(fused_grads), platforms=[target],
                          disabled_checks=checks)(q, k, k, mask)


def test_splash_lowers_for_tpu_per_shard(monkeypatch):
    """Splash (forward and backward) passes the Mosaic lowering at a DiT shape (bf16, GQA,
    head dim 72, 300 tokens); under a data x tensor mesh each kernel sits inside one manual
    (per-device) computation."""
    _tpu_info_for_export()
    q = jax.ShapeDtypeStruct((8, 300, 8, 72), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((8, 300, 2, 72), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((8, 300), jnp.bool_)
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")
    fwd = lambda q, k, v, m: dispatch.attention(q, k, v, m, impl="splash")
    grads = lambda q, k, v, m: jax.grad(lambda *a: fwd(*a, m).astype(jnp.float32).sum(),
                                        argnums=(0, 1, 2))(q, k, v)
    checks = [export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    lower = lambda fn: export.export(jax.jit(fn), platforms=["tpu"], disabled_checks=checks)(
        q, k, k, mask).mlir_module()
    assert lower(fwd).count("tpu_custom_call") == 1
    assert lower(grads).count("tpu_custom_call") == 3  # forward, dQ, dK/dV
    # The mesh says which platform the kernels are for: 8 chips of a v5p topology (libtpu).
    tpu_mesh = make_mesh(dict(data=4, tensor=2), topology_devices("v5p:2x2x2"))
    with jax.set_mesh(tpu_mesh), nn.logical_axis_rules(LOGICAL_RULES):
        for impl in ("splash", "pallas"):
            text = lower(lambda q, k, v, m, i=impl: dispatch.attention(q, k, v, m, impl=i))
            assert text.count("tpu_custom_call") == 1 and "manual_computation" in text, impl


def test_kernel_backends_in_dispatch_and_model():
    q, k, v, mask = _inputs(2, 20, 20, 4, 2, 16)
    np.testing.assert_allclose(dispatch.attention(q, k, v, mask, impl="pallas"),
                               xla_attention(q, k, v, mask), atol=2e-5)
    with pytest.raises(ValueError, match="attn_impl='pallas' cannot run this call: head dim"):
        dispatch.attention(*_inputs(1, 4, 4, 1, 1, 300)[:3], impl="pallas")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        dispatch.attention(*_inputs(1, 4, 4, 3, 2, 8)[:3], impl="pallas")

    from jaxdit.models.registry import build_model
    from tests.helpers import fixed_batch, tiny_config
    cfg = tiny_config("lumina")
    cfg.model.depth = 1
    cfg.text.vocab_size = 40
    batch = fixed_batch(cfg, 2)
    cond = {"text_ids": batch["text_ids"], "text_mask": batch["text_mask"]}
    t = jnp.array([0.3, 0.8])
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"], t, cond)
    params = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)),
                          params)
    ref = jax.jit(model.apply)(params, batch["image"], t, cond)
    assert float(jnp.abs(ref).max()) > 1e-3
    for impl in ("pallas", "splash"):
        cfg.model.attn_impl = impl
        out = jax.jit(build_model(cfg).apply)(params, batch["image"], t, cond)
        np.testing.assert_allclose(out, ref, atol=1e-4, err_msg=impl)


def test_reference_bias_and_causal_mask_for_the_text_encoders():
    """The T5 bias, CLIP causal mask and Gemma 2 soft cap of the XLA path equal a per-head
    softmax written out; the kernels refuse them and ``auto`` takes XLA."""
    rng = np.random.default_rng(3)
    b, s, h, hkv, d = 2, 6, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(1, h, s, s)), jnp.float32)
    mask = jnp.asarray(np.arange(s)[None] < np.array([[6], [4]]))
    out = xla_attention(q, k, v, mask, 1.0, bias=bias, causal=True)
    kr, vr = (jnp.repeat(a, h // hkv, axis=2) for a in (k, v))
    logits = jnp.einsum("bshd,bthd->bhst", q, kr) + bias
    allowed = mask[:, None, None, :] & jnp.tril(jnp.ones((s, s), bool))
    want = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(jnp.where(allowed, logits, -1e30)), vr)
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="no logit bias, causal mask"):
        dispatch.attention(q, k, v, mask, impl="pallas", causal=True)
    capped = xla_attention(q, k, v, mask, softcap=0.5)  # Gemma 2: tanh-capped logits
    want_capped = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(jnp.where(
        mask[:, None, None, :], 0.5 * jnp.tanh(jnp.einsum("bshd,bthd->bhst", q, kr)
                                                * d ** -0.5 / 0.5), -1e30)), vr)
    np.testing.assert_allclose(capped, want_capped, atol=1e-5)
    np.testing.assert_allclose(dispatch.attention(q, k, v, mask, impl="auto", softcap=0.5),
                               capped, atol=1e-6)
    for impl in ("pallas", "cudnn"):
        with pytest.raises(ValueError, match="soft-capping"):
            dispatch.attention(q, k, v, mask, impl=impl, softcap=0.5)
    np.testing.assert_allclose(dispatch.attention(q, k, v, mask, impl="auto", scale=1.0,
                                                  bias=bias, causal=True), out, atol=1e-6)
