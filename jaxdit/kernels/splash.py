"""TPU splash attention behind jaxdit's attention call (``attn_impl='splash'``).

Splash attention is the block-sparse flash-attention kernel for TPU that ships with JAX
(``jax.experimental.pallas.ops.tpu.splash_attention``, written with Pallas' Mosaic backend);
MaxText uses it by default on TPU. This module adapts jaxdit's layouts to it:

* ``q`` (B, S, H, D), ``k``/``v`` (B, T, Hkv, D) -> head-major per sample, the kernel vmapped
  over the batch. GQA is native: the kernel maps query head ``h`` to KV head
  ``h // (H/Hkv)`` (the convention of every jaxdit backend), K/V are not repeated.
* ``key_mask`` and packed ``segment_ids`` become the kernel's segment ids (masked keys get
  id -1, which no query carries), the one dynamic mask splash takes; its static mask is
  full (non-causal).
* Lengths are padded to multiples of 128 (the kernel's block sizes must be; padded keys
  masked, padded queries dropped) and the head dim to a multiple of 128 (Mosaic's lane
  width; zero columns change no dot product). The softmax scale (of the true head dim) is
  folded into ``q``, since the kernel takes none.
* A query whose keys are all masked gets a finite but meaningless output (an average of V
  over the padded keys; the Pallas kernel gives 0, the XLA reference the mean of V). No
  model produces such rows; padded query rows, whose output is dropped, add nothing to the
  gradients.

On CPU the kernel runs in Pallas interpret mode (how CI tests it against the XLA
reference); on TPU it compiles through Mosaic. It has no GPU lowering.
Not timed on a TPU yet (no TPU was available): see ``docs/performance.md``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.kernels import flash_attention as pallas_flash
from jaxdit.parallel.mesh import target_platform

LANES = 128  # Mosaic's lane width: the kernel's block and head-dim granularity
BLOCK = 512  # largest block tried (MaxText's default splash block on TPU v5)


def _block(length: int, largest: int = BLOCK) -> int:
    """The largest of ``largest``, ``largest/2``, ... 128 dividing ``length`` (a multiple of
    128)."""
    block = largest
    while length % block:
        block //= 2
    return block


def unsupported_reason(q, k, v) -> str | None:
    """Why splash cannot run this call, or None if it can (the Pallas kernel's limits, and
    no float16)."""
    if q.dtype == jnp.float16:
        return "dtype float16 is not supported (float32, bfloat16)"
    return pallas_flash.unsupported_reason(q, k, v)


def _kernel(heads: int, s: int, t: int, interpret: bool):
    """A splash kernel for (heads, s, t) padded lengths with a full static mask (built per
    trace: its mask arrays must belong to the trace that uses them)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
        splash_attention_kernel as sk, splash_attention_mask as sm)
    bq, bk = _block(s), _block(t)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                          block_kv_dq=bk)
    mask = sm.MultiHeadMask([sm.FullMask((s, t)) for _ in range(heads)])
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret), sk.SegmentIds


def splash_attention(q, k, v, key_mask=None, *, segment_ids=None, scale: float | None = None,
                     interpret: bool | None = None):
    """Splash attention; layouts as :func:`jaxdit.kernels.dispatch.attention`. Returns
    (B, S, H, D) in ``q``'s dtype. ``interpret=None``: compiled on TPU, interpreted
    elsewhere."""
    reason = unsupported_reason(q, k, v)
    if reason:
        raise ValueError(f"Splash attention: {reason}.")
    if interpret is None:
        interpret = target_platform() != "tpu"
    b, s, h, d = q.shape
    t = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    s_pad, t_pad, d_pad = (pallas_flash.round_up(n, LANES) for n in (s, t, d))
    qseg, kseg = pallas_flash.padded_segments(b, s, t, s_pad, t_pad, key_mask, segment_ids)
    kernel, segment_type = _kernel(h, s_pad, t_pad, bool(interpret))
    pad = pallas_flash.head_major
    out = jax.vmap(kernel)(pad(q * jnp.asarray(scale, q.dtype), s_pad, d_pad),
                           pad(k, t_pad, d_pad), pad(v, t_pad, d_pad),
                           segment_ids=segment_type(qseg, kseg))
    return out.transpose(0, 2, 1, 3)[:, :s, :, :d].astype(q.dtype)
