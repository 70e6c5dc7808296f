"""Train-step benchmark: step time, images/s, TFLOP/s and MFU of a config.

Runs the framework's own jitted ``train_step`` on synthetic *cached* inputs (latents and
text features, the large-run regime), so the autoencoder and text encoder are not part of
the measurement:

  python tools/bench_train_step.py --config experiments/dit_air.py:XL --batch 64

FLOP counting (stated so numbers are comparable): model FLOPs per step =
``6 * (matmul params touched per token) * tokens`` for the dense layers, plus
``12 * layers * S^2 * width`` per sample for attention (QK^T and PV, forward 4 S^2 d, x3
for forward + backward), non-causal, no recompute counted. MFU = model FLOPs / (step time
* peak); the peak is given with ``--peak_tflops`` (default: 989 = H100 SXM dense bf16).
XLA's own count of the compiled step (which includes remat recompute) is printed beside it.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxdit.train.loop import Experiment
from jaxdit.train.state import count_params

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path.py:arg).")
flags.DEFINE_integer("batch", 64, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("text_len", 128, "Text tokens per sample.")
flags.DEFINE_float("peak_tflops", 989.0, "Accelerator peak TFLOP/s for MFU.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("optim", "adafactor", "Optimizer.")
flags.DEFINE_bool("remat", True, "Rematerialise blocks.")
flags.DEFINE_string("attn_impl", "xla", "Attention backend: xla | cudnn | auto.")
flags.mark_flags_as_required(["config"])


def model_flops(config, params_in_blocks: int, batch: int) -> float:
    m = config.model
    grid = config.data.image_size // config.latent.downsample // m.patch_size
    img_tokens = grid * grid
    text = config.text.max_len
    seq = img_tokens + (text if m.family != "pixart" else 0)
    dense = 6.0 * params_in_blocks * seq * batch
    attn = 12.0 * m.depth * seq * seq * m.width * batch
    if m.family == "pixart":  # cross-attention image x text
        attn += 12.0 * m.depth * img_tokens * text * m.width * batch
    return dense + attn


def main(argv):
    del argv
    cfg = FLAGS.config
    # Cached latents: the "image" fed to the step is the latent grid itself.
    size = cfg.data.image_size // max(cfg.latent.downsample, 1)
    cfg.latent.update(kind="identity", downsample=1)
    cfg.data.image_size = size
    cfg.text.update(kind="precomputed", max_len=FLAGS.text_len)
    cfg.model.update(dtype=FLAGS.dtype, remat=FLAGS.remat, attn_impl=FLAGS.attn_impl)
    cfg.optim.update(name=FLAGS.optim)
    cfg.train.batch_size = FLAGS.batch
    exp = Experiment(cfg)
    rng = np.random.default_rng(0)
    b, c = FLAGS.batch, cfg.latent.channels
    host = {"image": rng.normal(size=(b, size, size, c)).astype(np.float32),
            "text_tokens": rng.normal(size=(b, FLAGS.text_len, cfg.text.width)).astype(np.float32),
            "text_mask": np.ones((b, FLAGS.text_len), bool),
            "text_pooled": rng.normal(size=(b, cfg.text.width)).astype(np.float32)}
    with exp.context():
        state = exp.create_state()
        batch = exp.to_global(host)
        step = exp.jit_train_step(batch)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        xla_flops = None
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            xla_flops = float(cost.get("flops", 0.0)) or None
        except Exception:  # pylint: disable=broad-except
            pass
        for _ in range(FLAGS.warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / FLAGS.steps
    params = count_params(state.params)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    def in_block(path):  # params under denoiser/<block_i | shared_block | shared_attn>
        names = [str(getattr(k, "key", "")) for k in path]
        return any(n.startswith(("block_", "shared_")) for n in names)

    block_matmul = sum(int(np.prod(a.shape)) for p, a in flat if a.ndim >= 2 and in_block(p))
    if cfg.model.share == "full":
        block_matmul *= cfg.model.depth
    flops = model_flops(cfg, block_matmul, b)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | config "
          f"{cfg.model.family} depth={cfg.model.depth} width={cfg.model.width} "
          f"share={cfg.model.share} | params {params / 1e6:.1f}M | batch {b} | "
          f"{size}x{size}x{c} latent, patch {cfg.model.patch_size}, text {FLAGS.text_len} | "
          f"{FLAGS.dtype}, remat={FLAGS.remat}, {FLAGS.optim}, attn={FLAGS.attn_impl}")
    print(f"compile {compile_s:.1f}s | step {dt * 1e3:.1f} ms | {b / dt:.1f} img/s | "
          f"model {flops / dt / 1e12:.1f} TFLOP/s | MFU {flops / dt / 1e12 / FLAGS.peak_tflops:.1%}"
          + (f" | XLA-counted {xla_flops / dt / 1e12:.1f} TFLOP/s" if xla_flops else "")
          + f" | loss {float(m['loss']):.4f}")


if __name__ == "__main__":
    app.run(main)
