"""Attention benchmark: every backend side by side on DiT shapes, forward and
forward+backward, TFLOP/s and peak device memory, in one run.

  python tools/bench_attention.py                       # the default DiT shape sweep
  python tools/bench_attention.py --image_tokens 1024,4096 --head_dims 64,96 --batch 8

Shapes: ``[text | image]`` self-attention, ``text_tokens`` (default 128) plus each of
``image_tokens``, ``width / head_dim`` heads (``kv_heads`` for GQA), bf16, a key mask that
hides a quarter of the text (padding). FLOPs counted as non-causal attention:
forward ``4 B H S^2 D`` (QK^T and PV), forward+backward 3.5x that (the backward recomputes
the scores: 2.5x the forward), whatever the backend actually executes. Peak memory is the
device's ``peak_bytes_in_use`` after each case (reset per process is not available, so
each backend/shape runs in order of increasing size; "n/a" where the platform has no
memory stats). Backends that cannot run a case print why (e.g. cuDNN without a GPU, Pallas
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
flags.DEFINE_list("backends", ["xla", "cudnn", "pallas"], "Backends to compare.")
flags.DEFINE_integer("text_tokens", 128, "Text tokens in front of the image tokens.")
flags.DEFINE_integer("width", 1152, "Model width (heads = width / head_dim).")
flags.DEFINE_integer("kv_heads", 0, "KV heads (0 = as many as query heads).")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("iters", 10, "Timed iterations.")
flags.DEFINE_bool("allow_interpret", False, "Run Pallas interpreted on CPU (very slow).")


def skip_reason(backend, q, k):
    if backend == "cudnn":
        return dispatch.cudnn_unsupported_reason(q, k)
    if backend == "pallas":
        if jax.default_backend() == "cpu" and not FLAGS.allow_interpret:
            return "CPU runs Pallas interpreted (pass --allow_interpret to time it anyway)"
        return pallas_flash.unsupported_reason(q, k, k)
    return None


def timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / FLAGS.iters


def peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None


def run_case(backend, seq, head_dim):
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
        return dispatch.attention(q, k, v, mask, impl=backend)

    def loss(q, k, v):
        return fwd(q, k, v).astype(jnp.float32).sum()

    t_fwd = timed(jax.jit(fwd), q, k, v)
    t_bwd = timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v)
    flops = 4.0 * FLAGS.batch * heads * seq * seq * head_dim
    return (flops / t_fwd / 1e12, 3.5 * flops / t_bwd / 1e12, t_fwd * 1e3, t_bwd * 1e3,
            peak_gib()), None


def main(_):
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}, batch {FLAGS.batch}, width {FLAGS.width}, bf16, "
          f"{FLAGS.text_tokens} text tokens")
    header = ("| tokens | head dim | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
              "fwd+bwd TFLOP/s | peak GiB | vs xla (fwd+bwd) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in sorted(int(x) for x in FLAGS.image_tokens):
        seq = n + FLAGS.text_tokens
        for d in (int(x) for x in FLAGS.head_dims):
            base = None
            for backend in FLAGS.backends:
                try:
                    res, reason = run_case(backend, seq, d)
                except Exception as e:  # pylint: disable=broad-except
                    res, reason = None, f"failed: {type(e).__name__}: {str(e)[:120]}"
                if res is None:
                    print(f"| {n} | {d} | {backend} | n/a: {reason} | | | | | |")
                    continue
                tf_f, tf_b, ms_f, ms_b, peak = res
                base = ms_b if backend == "xla" else base
                ratio = f"{base / ms_b:.2f}x" if base else ""
                mem = f"{peak:.2f}" if peak is not None else "n/a"
                print(f"| {n} | {d} | {backend} | {ms_f:.2f} | {tf_f:.1f} | {ms_b:.2f} | "
                      f"{tf_b:.1f} | {mem} | {ratio} |", flush=True)


if __name__ == "__main__":
    app.run(main)
