"""Flash attention in Pallas: forward and backward kernels under one ``custom_vjp``.

``flash_attention(q, k, v, key_mask, segment_ids=None)`` takes the layouts of
:func:`jaxdit.models.attention.attention`: ``q`` (B, S, H, D), ``k``/``v`` (B, T, Hkv, D) with
``H % Hkv == 0``, ``key_mask`` (B, T) bool or None (True = attend; the [text | image] padding
of the joint-attention models) and optional ``segment_ids`` ``(q_ids (B, S), kv_ids (B, T))``
for packed variable-length samples (a query sees only its own segment). Non-causal.

* **Online softmax** over key blocks (FlashAttention-2): never materialises the (S, T)
  scores; the forward saves only the output and the row log-sum-exp.
* **GQA without repeated K/V**: a query head's program reads its KV head
  (``h // (H/Hkv)``) through the block index map; the dK/dV kernel runs once per KV head and
  loops over the query heads of its group, so no K/V copy and no atomics are needed.
* **Any head dim** (64, 72, 96, 108, 120, ...): padded with zeros to a power of two (a
  Triton requirement, and lane-friendly on TPU); zero columns change no dot product and the
  padded output columns are dropped. The softmax scale uses the true head dim.
* **Any length**: sequences are padded to the block sizes; padded keys are masked, padded
  queries dropped. A query whose keys are all masked gets output 0 (the XLA reference gives
  the mean of V there; no model produces such rows).
* Statistics in fp32; inputs fp32 or bf16 (matmuls accumulate in fp32).

Backends: the same kernels lower through Triton on NVIDIA GPUs and Mosaic on TPU; on CPU
they run in Pallas interpret mode, which is how CI checks values and gradients against the
XLA reference (``tests/test_kernels.py``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas.triton import atomic_add

from jaxdit.parallel.mesh import target_platform

NEG_INF = -1e30  # finite, so fully masked blocks never compute inf - inf
BIG = 1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block sizes of the forward and backward kernels (powers of two >= 16), and
    the Triton launch settings (GPU only; ignored elsewhere)."""
    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Backward in one kernel: the dK/dV kernel also adds its share of dQ into an fp32
    # buffer with atomics (GPU only), instead of a second kernel that recomputes the
    # scores for dQ (5 instead of 7 block matmuls).
    fused_bwd: bool = False

    @classmethod
    def parse(cls, text: str) -> "BlockSizes":
        """``"bq,bk,bq_bwd,bk_bwd[,warps[,stages[,fused]]]"``, e.g. ``"128,64,64,64,4,3,1"``."""
        try:
            values = [int(x) for x in text.split(",")]
            if len(values) == 7:
                values[6] = bool(values[6])
            return cls(*values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Block sizes {text!r}: want 4 to 7 comma-separated ints (bq, bk, "
                             "bq_bwd, bk_bwd[, num_warps[, num_stages[, fused_bwd 0/1]]]).") from e

    def label(self) -> str:
        return (f"{self.block_q}x{self.block_k}/{self.block_q_bwd}x{self.block_k_bwd}"
                f" w{self.num_warps}s{self.num_stages}{' fused' if self.fused_bwd else ''}")


# Per-platform defaults. GPU: the best all-round setting of the H100 sweep in
# docs/performance.md (64x64 blocks, 4 warps, 2 stages); TPU: its 128-lane width (untimed).
DEFAULT_BLOCKS = {"gpu": BlockSizes(64, 64, 64, 64, 4, 2), "tpu": BlockSizes(128, 128, 128, 128)}


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _fit(block: int, length: int) -> int:
    """Block size for ``length``: ``block`` or the smallest power of two covering it."""
    return min(block, _pow2_at_least(length))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------------------ kernels
# Refs (per program, after the block index maps): q/do/o (bq, D); k/v (T, D) or (bk, D);
# segment ids: queries (bq, 1) or (S, 1), keys (1, T) or (1, bk) int32, a query attending to
# the keys of its own segment (masked keys carry -1); lse/delta (bq, 1). The dK/dV kernel's
# group refs hold all query heads of one KV head: (rep, S, D) and (rep, S, 1). Every block
# keeps two dims (column vectors for row statistics), as Mosaic's TPU tiling wants.

def _scores(q, k, valid, scale):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    return jnp.where(valid, s, NEG_INF)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, block_k):
    q, qseg = q_ref[...], qseg_ref[...]
    bq, d = q.shape

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        valid = qseg == kseg_ref[:, pl.ds(start, block_k)]  # (bq, bk)
        s = _scores(q, k, valid, scale)
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l_new

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), NEG_INF, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, BIG, m + jnp.log(l_safe))


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, block_k):
    q, do, qseg = q_ref[...], do_ref[...], qseg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        valid = qseg == kseg_ref[:, pl.ds(start, block_k)]
        p = jnp.exp(_scores(q, k, valid, scale) - lse)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body,
                           jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, *out_refs,
                scale, block_q, fused):
    """dK, dV of one key block of one KV head; with ``fused`` also adds this block's share
    of dQ into the fp32 ``dq`` buffer (aliased with a zeros input) with atomics."""
    if fused:
        _, dk_ref, dv_ref, dq_ref = out_refs  # the aliased zeros input ref comes first
    else:
        dk_ref, dv_ref = out_refs
    k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]  # kseg (1, bk)
    rep, s_len, _ = q_ref.shape

    def body(i, carry, r):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[r, pl.ds(start, block_q), :]
        do = do_ref[r, pl.ds(start, block_q), :]
        lse = lse_ref[r, pl.ds(start, block_q), :]
        delta = delta_ref[r, pl.ds(start, block_q), :]
        valid = qseg_ref[pl.ds(start, block_q), :] == kseg
        p = jnp.exp(_scores(q, k, valid, scale) - lse)  # (bq, bk)
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        if fused:
            dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale
            atomic_add(dq_ref, (jnp.int32(r), pl.ds(start, block_q), slice(None)), dq)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for r in range(rep):  # the query heads sharing this KV head
        carry = jax.lax.fori_loop(0, s_len // block_q, functools.partial(body, r=r), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------- pallas calls
# Arrays here are head-major and padded: q (B, H, S, D), k/v (B, Hkv, T, D), query segment
# ids (B, S, 1), key segment ids (B, 1, T), row statistics (B, H, S, 1).

def _compiler_params(platform: str, blocks: BlockSizes):
    """Grid programs write disjoint blocks: parallel on TPU; Triton settings on GPU."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    if platform in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
        return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return None


def _call(kernel, name, grid, in_specs, out_specs, out_shape, blocks, cfg, aliases=None):
    platform, interpret = cfg
    params = None if interpret else _compiler_params(platform, blocks)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name=name,
                          compiler_params=params, input_output_aliases=aliases or {})


def _forward(q, k, v, qseg, kseg, scale, blocks: BlockSizes, cfg):
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    rep, bq = h // hkv, blocks.block_q
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=blocks.block_k)
    kv_full = pl.BlockSpec((None, None, t, d), lambda i, j, n: (i, j // rep, 0, 0))
    return _call(
        kernel, "flash_attention_fwd", (b, h, s // bq),
        [pl.BlockSpec((None, None, bq, d), lambda i, j, n: (i, j, n, 0)), kv_full, kv_full,
         pl.BlockSpec((None, bq, 1), lambda i, j, n: (i, n, 0)),
         pl.BlockSpec((None, 1, t), lambda i, j, n: (i, 0, 0))],
        [pl.BlockSpec((None, None, bq, d), lambda i, j, n: (i, j, n, 0)),
         pl.BlockSpec((None, None, bq, 1), lambda i, j, n: (i, j, n, 0))],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32)],
        blocks, cfg)(q, k, v, qseg, kseg)


def _backward(q, k, v, qseg, kseg, o, lse, do, scale, blocks: BlockSizes, cfg):
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    rep = h // hkv
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    kv_full = pl.BlockSpec((None, None, t, d), lambda i, j, n: (i, j // rep, 0, 0))
    group = pl.BlockSpec((None, rep, s, d), lambda i, g, n: (i, g, 0, 0))
    group_rows = pl.BlockSpec((None, rep, s, 1), lambda i, g, n: (i, g, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, d), lambda i, g, n: (i, g, n, 0))
    args = [q, k, v, qseg, kseg, do, lse, delta]
    in_specs = [group, kv_block, kv_block, pl.BlockSpec((None, s, 1), lambda i, g, n: (i, 0, 0)),
                pl.BlockSpec((None, 1, bk), lambda i, g, n: (i, 0, n)), group, group_rows,
                group_rows]
    out_specs = [kv_block, kv_block]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if blocks.fused_bwd:
        outs = _call(functools.partial(_dkv_kernel, scale=scale, block_q=bq, fused=True),
                     "flash_attention_bwd_fused", (b, hkv, t // bk), in_specs + [group],
                     out_specs + [group],
                     out_shape + [jax.ShapeDtypeStruct(q.shape, jnp.float32)], blocks, cfg,
                     aliases={len(args): 2})(*args, jnp.zeros(q.shape, jnp.float32))
        dk, dv, dq = outs
        return dq.astype(q.dtype), dk, dv
    dk, dv = _call(functools.partial(_dkv_kernel, scale=scale, block_q=bq, fused=False),
                   "flash_attention_dkv", (b, hkv, t // bk), in_specs, out_specs, out_shape,
                   blocks, cfg)(*args)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda i, j, n: (i, j, n, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda i, j, n: (i, j, n, 0))
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk), "flash_attention_dq",
        (b, h, s // bq),
        [q_spec, kv_full, kv_full, pl.BlockSpec((None, bq, 1), lambda i, j, n: (i, n, 0)),
         pl.BlockSpec((None, 1, t), lambda i, j, n: (i, 0, 0)), q_spec, row_spec, row_spec],
        q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), blocks, cfg)(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash_core(q, k, v, qseg, kseg, scale, blocks, cfg):
    return _forward(q, k, v, qseg, kseg, scale, blocks, cfg)[0]


def _flash_core_fwd(q, k, v, qseg, kseg, scale, blocks, cfg):
    o, lse = _forward(q, k, v, qseg, kseg, scale, blocks, cfg)
    return o, (q, k, v, qseg, kseg, o, lse)


def _flash_core_bwd(scale, blocks, cfg, res, do):
    q, k, v, qseg, kseg, o, lse = res
    dq, dk, dv = _backward(q, k, v, qseg, kseg, o, lse, do, scale, blocks, cfg)
    zero = functools.partial(np.zeros, dtype=jax.dtypes.float0)  # int inputs: float0 cotangents
    return dq, dk, dv, zero(qseg.shape), zero(kseg.shape)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# ------------------------------------------------------------------------------- public

def unsupported_reason(q, k, v) -> str | None:
    """Why the Pallas kernel cannot run this call, or None if it can."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return "expects q (B, S, H, D) and k, v (B, T, Hkv, D) of equal shapes"
    if q.shape[2] % k.shape[2]:
        return f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})"
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} is not supported (float32, bfloat16, float16)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256 is not supported"
    return None


def _check_blocks(blocks: BlockSizes, platform: str) -> None:
    if blocks.fused_bwd and platform == "tpu":
        raise ValueError("BlockSizes(fused_bwd=True) needs atomics (GPU, or CPU interpret); "
                         "Mosaic TPU has none: use fused_bwd=False there.")


def padded_segments(b: int, s: int, t: int, s_pad: int, t_pad: int, key_mask, segment_ids):
    """Query and key segment ids (B, s_pad), (B, t_pad) int32 with masked keys set to -1
    (the one masking mechanism of the kernels): padded queries get segment 0 (their output
    is dropped), padded keys -1. User segment ids must be >= 0."""
    if segment_ids is None:
        qseg, kseg = jnp.zeros((b, s), jnp.int32), jnp.zeros((b, t), jnp.int32)
    else:
        qseg, kseg = (jnp.asarray(x, jnp.int32) for x in segment_ids)
        if qseg.shape != (b, s) or kseg.shape != (b, t):
            raise ValueError(f"segment_ids shapes {qseg.shape}, {kseg.shape} != {(b, s)}, "
                             f"{(b, t)}.")
    if key_mask is not None:
        kseg = jnp.where(key_mask.astype(bool), kseg, -1)
    return (jnp.pad(qseg, ((0, 0), (0, s_pad - s))),
            jnp.pad(kseg, ((0, 0), (0, t_pad - t)), constant_values=-1))


def head_major(x, length: int, head_dim: int):
    """``x`` (B, L, H, D) zero-padded to (B, length, H, head_dim) and laid out head-major
    (B, H, length, head_dim), as the kernels read it."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3])))
    return x.transpose(0, 2, 1, 3)


def flash_attention(q, k, v, key_mask=None, *, segment_ids=None, scale: float | None = None,
                    blocks: BlockSizes | None = None, interpret: bool | None = None,
                    platform: str | None = None):
    """Pallas flash attention; layouts as the module docstring. Returns (B, S, H, D).

    ``segment_ids``: None or ``(q_ids (B, S), kv_ids (B, T))`` int; a query attends only to
    keys of its own segment (packed variable-length samples), on top of ``key_mask``.

    ``interpret=None`` runs the kernels compiled on GPU/TPU and interpreted on CPU;
    ``platform`` (default: the default backend) picks the lowering ("gpu": Triton, "tpu":
    Mosaic), e.g. to export for another platform. ``blocks`` default:
    :data:`DEFAULT_BLOCKS` of the platform, else :class:`BlockSizes`.
    """
    platform = platform or target_platform()
    if blocks is None:
        blocks = DEFAULT_BLOCKS.get(platform, BlockSizes())
    reason = unsupported_reason(q, k, v)
    if reason:
        raise ValueError(f"Pallas flash attention: {reason}.")
    _check_blocks(blocks, platform)
    if interpret is None:
        interpret = platform == "cpu"
    b, s, h, d = q.shape
    t = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    dp = _pow2_at_least(d)
    bq_f, bk_f = _fit(blocks.block_q, s), _fit(blocks.block_k, t)
    bq_b, bk_b = _fit(blocks.block_q_bwd, s), _fit(blocks.block_k_bwd, t)
    s_pad = round_up(s, max(bq_f, bq_b))
    t_pad = round_up(t, max(bk_f, bk_b))
    fitted = dataclasses.replace(blocks, block_q=bq_f, block_k=bk_f, block_q_bwd=bq_b,
                                 block_k_bwd=bk_b)

    qseg, kseg = padded_segments(b, s, t, s_pad, t_pad, key_mask, segment_ids)
    out = _flash_core(head_major(q, s_pad, dp), head_major(k, t_pad, dp),
                      head_major(v, t_pad, dp), qseg[:, :, None], kseg[:, None, :],
                      float(scale), fitted, (platform, bool(interpret)))
    return out.transpose(0, 2, 1, 3)[:, :s, :, :d]
