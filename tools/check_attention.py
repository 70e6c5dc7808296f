"""Correctness check of the fast attention backends on the device they run on (GPU/TPU):
values and gradients against the XLA reference evaluated in float32 on upcast inputs.

  python tools/check_attention.py                          # cudnn and pallas, all cases
  python tools/check_attention.py --backends pallas --blocks 128,64,64,64,4,3
  python tools/check_attention.py --backends splash,pallas  # on a TPU VM (not run yet)

Every case draws fresh random inputs (never zeros) and reports the relative error
``|out - ref| / |ref|`` (Frobenius norms) of the output and of each gradient, for a loss
``sum(out * w)`` with a random ``w``. Tolerances: 2e-2 for bf16 inputs, 5e-3 for fp32 (the
GPU's matrix units run fp32 dots as tf32). Exits non-zero if any case fails; a backend that
does not support a case (e.g. cuDNN with segment ids or fp32) prints why and is skipped.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxdit.kernels import dispatch
from jaxdit.kernels import flash_attention as pallas_flash
from jaxdit.kernels.reference import xla_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("backends", ["cudnn", "pallas"], "Backends to check.")
flags.DEFINE_list("only", [], "Run only the cases whose name contains one of these.")
flags.DEFINE_string("blocks", "", "Pallas block sizes (BlockSizes.parse); empty: default.")

# (name, batch, seq, heads, kv heads, head dim, dtype, masked, segments)
CASES = [
    ("mha d64 mask", 2, 384, 8, 8, 64, jnp.bfloat16, True, False),
    ("gqa 24/8 d96 mask", 2, 300, 24, 8, 96, jnp.bfloat16, True, False),
    ("gqa 6/2 d72", 1, 256, 6, 2, 72, jnp.bfloat16, False, False),
    ("mqa 4/1 d108 mask", 2, 200, 4, 1, 108, jnp.bfloat16, True, False),
    ("mha d120 long", 1, 1152, 4, 4, 120, jnp.bfloat16, True, False),
    ("mha d64 fp32 mask", 2, 320, 4, 4, 64, jnp.float32, True, False),
    ("gqa 8/2 d96 packed", 2, 272, 8, 2, 96, jnp.bfloat16, True, True),
]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def make_inputs(rng, b, s, h, hkv, d, dtype, masked, segments):
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), dtype) for n in (h, hkv, hkv))
    w = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    lengths = rng.integers(s // 2, s, size=b) if masked else np.full(b, s)
    mask = jnp.asarray(np.arange(s)[None] < lengths[:, None])
    seg = None
    if segments:  # two packed samples per row, split before the padding starts (a query
        # whose whole segment is padding gets 0 from Pallas, mean(V) from XLA: no model
        # produces such rows, and they are not compared)
        cut = rng.integers(s // 4, lengths)
        ids = jnp.asarray((np.arange(s)[None] >= cut[:, None]).astype(np.int32))
        seg = (ids, ids)
    return (q, k, v), w, mask, seg


def run(fn, args, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *grads)]


def main(_):
    blocks = pallas_flash.BlockSizes.parse(FLAGS.blocks) if FLAGS.blocks else None
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("| case | backend | out | dq | dk | dv | ok |")
    print("|---|---|---|---|---|---|---|")
    failures = 0
    for index, (name, b, s, h, hkv, d, dtype, masked, segments) in enumerate(CASES):
        if FLAGS.only and not any(x in name for x in FLAGS.only):
            continue
        rng = np.random.default_rng(index)  # the same inputs with or without --only
        args, w, mask, seg = make_inputs(rng, b, s, h, hkv, d, dtype, masked, segments)
        up = [a.astype(jnp.float32) for a in args]
        with jax.default_matmul_precision("highest"):
            ref = run(lambda q, k, v: xla_attention(q, k, v, mask, None, seg), up, w)
        tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
        for backend in FLAGS.backends:
            if backend == "pallas":
                fn = lambda q, k, v: pallas_flash.flash_attention(
                    q, k, v, mask, segment_ids=seg, blocks=blocks)
            else:
                fn = lambda q, k, v, backend=backend: dispatch.attention(
                    q, k, v, mask, impl=backend, segment_ids=seg)
            try:
                got = run(fn, args, w)
            except ValueError as e:  # the backend's own "cannot run this" message
                print(f"| {name} | {backend} | n/a: {str(e)[:100]} | | | | skip |")
                continue
            except Exception as e:  # pylint: disable=broad-except
                failures += 1
                print(f"| {name} | {backend} | FAILED {type(e).__name__}: {str(e)[:200]} | | | | no |")
                continue
            errs = [rel(g, r) for g, r in zip(got, ref)]
            ok = all(np.isfinite(errs)) and max(errs) < tol
            failures += not ok
            print(f"| {name} | {backend} | " + " | ".join(f"{e:.1e}" for e in errs)
                  + f" | {'yes' if ok else 'NO'} |", flush=True)
    print(f"{failures} failing case(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
