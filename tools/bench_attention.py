"""Attention benchmark: every backend side by side on DiT shapes, forward and
forward+backward, TFLOP/s and peak device memory, in one run.

  python tools/bench_attention.py                       # the default DiT shape sweep
  python tools/bench_attention.py --image_tokens 1024,4096 --head_dims 64,96 --batch 8

Shapes: ``[text | image]`` self-attention, ``text_tokens`` (default 128) plus each of
``image_tokens``, ``width / head_dim`` heads (``kv_heads`` for GQA), bf16, a key mask that
hides a quarter of the text (padding). FLOPs counted as non-causal attention:
forward ``4 B H S^2 D`` (QK^T and PV), forward+backward 3.5x that (the backward recomputes
the scores: 2.5x the forward), whatever the backend actually executes. Times are the median
of 5 rounds of ``--iters`` calls. Memory is the compiled forward+backward's scratch
(``memory_analysis().temp_size_in_bytes``: what it needs beyond inputs and outputs, where
materialised S x S scores show up). Backends that cannot run a case print why (e.g. cuDNN without a GPU, Pallas
on CPU where it only runs interpreted).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxdit.kernels import dispatch
from jaxdit.kernels import flash_attention as pallas_flash

FLAGS = flags.FLAGS
flags.DEFINE_list("image_tokens", ["256", "1024", "4096"], "Image token counts.")
flags.DEFINE_list("head_dims", ["64", "72", "96"], "Head dims.")
flags.DEFINE_list("backends", ["xla", "cudnn", "pallas", "splash"],
                  "Backends to compare (each skipped where the platform lacks it).")
flags.DEFINE_integer("text_tokens", 128, "Text tokens in front of the image tokens.")
flags.DEFINE_integer("width", 1152, "Model width (heads = width / head_dim).")
flags.DEFINE_integer("kv_heads", 0, "KV heads (0 = as many as query heads).")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("iters", 10, "Timed iterations.")
flags.DEFINE_multi_string("pallas_blocks", [], "Pallas block settings to sweep, one per "
                          "flag (BlockSizes.parse: bq,bk,bq_bwd,bk_bwd[,warps[,stages]]); "
                          "each runs as its own backend row. Empty: the default blocks.")
flags.DEFINE_bool("allow_interpret", False, "Run Pallas interpreted on CPU (very slow).")


def skip_reason(backend, q, k):
    if backend == "cudnn":
        return dispatch.cudnn_unsupported_reason(q, k)
    if backend in ("pallas", "splash"):
        if jax.default_backend() == "cpu" and not FLAGS.allow_interpret:
            return "CPU runs Pallas interpreted (pass --allow_interpret to time it anyway)"
        if backend == "splash":
            return dispatch.splash_unsupported_reason(q, k, k)
        return pallas_flash.unsupported_reason(q, k, k)
    return None


def timed(fn, *args):
    """Median over 5 rounds of ``iters`` back-to-back calls, after compile + warm-up."""
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(FLAGS.iters):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / FLAGS.iters)
    return sorted(rounds)[2]


def temp_gib(compiled):
    """Scratch memory the compiled executable needs beyond its inputs and outputs (where
    the S x S scores of a non-fused backend live), or None if the platform does not say."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # pylint: disable=broad-except
        return None


def run_case(backend, seq, head_dim, blocks=None):
    heads = FLAGS.width // head_dim
    kv = FLAGS.kv_heads or heads
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (FLAGS.batch, seq, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (FLAGS.batch, seq, kv, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (FLAGS.batch, seq, kv, head_dim), jnp.bfloat16)
    mask = jnp.arange(seq)[None].repeat(FLAGS.batch, 0) >= FLAGS.text_tokens // 4
    reason = skip_reason(backend, q, k)
    if reason:
        return None, reason

    def fwd(q, k, v):
        if blocks is not None:
            return pallas_flash.flash_attention(q, k, v, mask, blocks=blocks)
        return dispatch.attention(q, k, v, mask, impl=backend)

    def loss(q, k, v):
        return fwd(q, k, v).astype(jnp.float32).sum()

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    t_fwd = timed(jax.jit(fwd), q, k, v)
    t_bwd = timed(fwd_bwd, q, k, v)
    flops = 4.0 * FLAGS.batch * heads * seq * seq * head_dim
    return (flops / t_fwd / 1e12, 3.5 * flops / t_bwd / 1e12, t_fwd * 1e3, t_bwd * 1e3,
            temp_gib(fwd_bwd)), None


def backend_rows():
    """(label, backend, pallas blocks or None) for every row of a shape."""
    rows = []
    for backend in FLAGS.backends:
        if backend == "pallas" and FLAGS.pallas_blocks:
            rows += [(f"pallas {b.label()}", "pallas", b)
                     for b in map(pallas_flash.BlockSizes.parse, FLAGS.pallas_blocks)]
        else:
            rows.append((backend, backend, None))
    return rows


def main(_):
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}, batch {FLAGS.batch}, width {FLAGS.width}, bf16, "
          f"{FLAGS.text_tokens} text tokens")
    header = ("| tokens | head dim | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
              "fwd+bwd TFLOP/s | fwd+bwd scratch GiB | vs xla (fwd+bwd) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in sorted(int(x) for x in FLAGS.image_tokens):
        seq = n + FLAGS.text_tokens
        for d in (int(x) for x in FLAGS.head_dims):
            base = None
            for label, backend, blocks in backend_rows():
                try:
                    res, reason = run_case(backend, seq, d, blocks)
                except Exception as e:  # pylint: disable=broad-except
                    res, reason = None, f"failed: {type(e).__name__}: {str(e)[:120]}"
                if res is None:
                    print(f"| {n} | {d} | {label} | n/a: {reason} | | | | | |", flush=True)
                    continue
                tf_f, tf_b, ms_f, ms_b, peak = res
                base = ms_b if backend == "xla" else base
                ratio = f"{base / ms_b:.2f}x" if base else ""
                mem = f"{peak:.3f}" if peak is not None else "n/a"
                print(f"| {n} | {d} | {label} | {ms_f:.2f} | {tf_f:.1f} | {ms_b:.2f} | "
                      f"{tf_b:.1f} | {mem} | {ratio} |", flush=True)


if __name__ == "__main__":
    app.run(main)
