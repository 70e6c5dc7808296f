"""Train-step benchmark: step time, images/s, TFLOP/s and MFU of a config.

Runs the framework's own jitted ``train_step`` on synthetic *cached* inputs (latents and
text features, the large-run regime), so the autoencoder and text encoder are not part of
the measurement:

  python tools/bench_train_step.py --config experiments/dit_air.py:XL --batch 64

FLOP counting (stated so numbers are comparable): model FLOPs per step =
``6 * (matmul params touched per token) * tokens`` for the dense layers (block weights;
AdaLN modulation runs once per sample and is not counted), plus
``12 * layers * S^2 * width`` per sample for attention (QK^T and PV, forward 4 S^2 d, x3
for forward + backward), non-causal, no recompute counted. MFU = model FLOPs / (step time
* peak); the peak is given with ``--peak_tflops`` (default: 989 = H100 SXM dense bf16).
XLA's own count of the compiled step (which includes remat recompute) is printed beside it.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxdit.train import aot
from jaxdit.train.loop import Experiment
from jaxdit.train.state import count_params, path_names

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path.py:arg).")
flags.DEFINE_integer("batch", 64, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("text_len", 128, "Text tokens per sample.")
flags.DEFINE_float("peak_tflops", 989.0, "Accelerator peak TFLOP/s for MFU.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("optim", "adafactor", "Optimizer.")
flags.DEFINE_string("remat", "full", "Block rematerialisation: none | full | dots.")
flags.DEFINE_string("attn_impl", "xla", "Attention backend: xla | cudnn | pallas | splash | auto.")
flags.DEFINE_integer("profile_top", 0, "If > 0: trace 3 steps and print the N device "
                     "kernels that take the most time per step, and time per kernel class.")
flags.mark_flags_as_required(["config"])

KERNEL_CLASSES = (  # first match wins; names as cuBLAS/cuDNN/XLA/Triton print them
    ("attention (cuDNN)", ("fmha", "flash", "cudnn")),
    ("attention (Pallas)", ("flash_attention",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "dot")),
    ("reduction fusion", ("reduce", "input_")),
    ("collective/copy", ("nccl", "memcpy", "copy", "transpose")),
    ("elementwise fusion", ("fusion", "loop_", "convert", "add", "multiply")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def hlo_shapes(compiled) -> dict:
    """Kernel name (HLO instruction name, '.' -> '_') -> its result shape, from the
    optimized HLO, to tell activation-sized kernels from parameter-sized ones."""
    import re  # pylint: disable=import-outside-toplevel
    shapes = {}
    for m in re.finditer(r"%([\w.\-]+) = (\S+(?: \S+)??) (?:fusion|custom-call)\(",
                         compiled.as_text()):
        shapes.setdefault(m.group(1).replace(".", "_").replace("-", "_"), m.group(2))
    return shapes


def profile(compiled, state, batch, top: int, steps: int = 3):
    """Trace ``steps`` steps; print the top kernels of the accelerator streams per step."""
    import collections, glob, os, tempfile  # pylint: disable=import-outside-toplevel,multiple-imports
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    logdir = tempfile.mkdtemp(prefix="jaxdit_profile_")
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    per_kernel, lines = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            total = sum(ev.duration_ns for ev in line.events)
            lines[f"{plane.name} {line.name}"] += total
            if line.name.startswith("Stream"):
                for ev in line.events:
                    per_kernel[ev.name] += ev.duration_ns
    print("device lines (ms/step): " + ", ".join(
        f"{k} {v / steps / 1e6:.1f}" for k, v in lines.most_common(8)))
    busy = max(sum(per_kernel.values()) / steps / 1e6, 1e-9)
    classes = collections.Counter()
    for name, ns in per_kernel.items():
        classes[kernel_class(name)] += ns
    print(f"kernel time {busy:.1f} ms/step; by class: " + ", ".join(
        f"{k} {v / steps / 1e6:.1f} ms ({v / steps / 1e6 / busy:.0%})"
        for k, v in classes.most_common()))
    shapes = hlo_shapes(compiled)
    print("| kernel | ms/step | share | class | HLO result |\n|---|---|---|---|---|")
    for name, ns in per_kernel.most_common(top):
        ms = ns / steps / 1e6
        print(f"| {name[:80]} | {ms:.2f} | {ms / busy:.1%} | {kernel_class(name)} | "
              f"{shapes.get(name, '')[:60]} |")


def model_flops(config, params_in_blocks: int, batch: int) -> float:
    m = config.model
    grid = config.data.image_size // config.latent.downsample // m.patch_size
    img_tokens = grid * grid
    text = config.text.max_len if config.text.kind != "none" else 0
    seq = img_tokens + (text if m.family != "pixart" else 0)
    dense = 6.0 * params_in_blocks * seq * batch
    attn = 12.0 * m.depth * seq * seq * m.width * batch
    if m.family == "pixart":  # cross-attention image x text
        attn += 12.0 * m.depth * img_tokens * text * m.width * batch
    return dense + attn


def main(argv):
    del argv
    # Cached latents (the "image" fed to the step is the latent grid) and text features.
    cfg = aot.with_cached_inputs(FLAGS.config, FLAGS.text_len)
    size = cfg.data.image_size
    class_conditional = cfg.text.kind == "none"
    cfg.model.update(dtype=FLAGS.dtype, remat=FLAGS.remat, attn_impl=FLAGS.attn_impl)
    cfg.optim.update(name=FLAGS.optim)
    cfg.train.batch_size = FLAGS.batch
    exp = Experiment(cfg)
    rng = np.random.default_rng(0)
    b, c = FLAGS.batch, cfg.latent.channels
    host = {"image": rng.normal(size=(b, size, size, c)).astype(np.float32)}
    if class_conditional:
        host["label"] = rng.integers(0, cfg.model.num_classes, size=b).astype(np.int32)
    else:
        host.update(
            text_tokens=rng.normal(size=(b, FLAGS.text_len, cfg.text.width)).astype(np.float32),
            text_mask=np.ones((b, FLAGS.text_len), bool),
            text_pooled=rng.normal(size=(b, cfg.text.width)).astype(np.float32))
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
        if FLAGS.profile_top:
            profile(compiled, state, batch, FLAGS.profile_top)
    params = count_params(state.params)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    def in_block(path):  # per-token matmuls: under <block_i | shared_block | shared_attn>,
        names = [str(n) for n in path_names(path)]  # not the per-sample AdaLN
        return (any(n.startswith(("block_", "shared_")) for n in names)
                and not any(n.startswith("adaln") for n in names))

    block_matmul = sum(int(np.prod(a.shape)) for p, a in flat if a.ndim >= 2 and in_block(p))
    if cfg.model.share == "full":
        block_matmul *= cfg.model.depth
    flops = model_flops(cfg, block_matmul, b)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | config "
          f"{cfg.model.family} depth={cfg.model.depth} width={cfg.model.width} "
          f"share={cfg.model.share} | params {params / 1e6:.1f}M | batch {b} | "
          f"{size}x{size}x{c} latent, patch {cfg.model.patch_size}, "
          f"{'class labels' if class_conditional else f'text {FLAGS.text_len}'} | "
          f"{FLAGS.dtype}, remat={FLAGS.remat}, {FLAGS.optim}, attn={FLAGS.attn_impl}")
    print(f"compile {compile_s:.1f}s | step {dt * 1e3:.1f} ms | {b / dt:.1f} img/s | "
          f"model {flops / dt / 1e12:.1f} TFLOP/s | MFU {flops / dt / 1e12 / FLAGS.peak_tflops:.1%}"
          + (f" | XLA-counted {xla_flops / dt / 1e12:.1f} TFLOP/s" if xla_flops else "")
          + f" | loss {float(m['loss']):.4f}")


if __name__ == "__main__":
    app.run(main)
