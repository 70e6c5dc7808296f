"""Compile time of the train step against depth, unrolled vs scanned, side by side.

  python tools/bench_compile_depth.py --config experiments/dit_air.py:tiny --depths 8,32

Lowers and compiles (nothing runs) the config's real train step on one CPU device at each
depth in ``--depths`` (same width), with ``model.scan_layers`` False and True, and prints
the seconds and the ratios: deepest / shallowest per layout (the scan's goal is <= 1.3x)
and unrolled / scanned per depth. ``--topology v5p-8`` compiles for that TPU slice instead
(needs libtpu; cached-feature inputs, see ``jaxdit.compile``). Times are of this machine
and vary with its load: compare numbers of one run only.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxdit.train import aot  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path.py:arg).")
flags.DEFINE_list("depths", ["8", "32"], "Depths to compile (model.depth).")
flags.DEFINE_integer("batch", 8, "Global batch.")
flags.DEFINE_string("topology", None, "Compile for this TPU slice instead of the CPU.")
flags.mark_flags_as_required(["config"])


def compile_seconds(depth: int, scan: bool) -> float:
    cfg = FLAGS.config.copy_and_resolve_references()
    cfg.model.update(depth=depth, scan_layers=scan)
    if cfg.model.family == "d2it":
        cfg.model.refine_depth = min(cfg.model.refine_depth, depth // 4)
    if FLAGS.topology:
        r = aot.compile_train_step(cfg, FLAGS.topology, batch=FLAGS.batch)
        return r.lower_s + r.compile_s
    cfg.train.batch_size = FLAGS.batch
    _, lower_s, compile_s, _ = aot.lower_and_compile(cfg, jax.devices()[:1])
    return lower_s + compile_s


def main(argv):
    del argv
    jax.config.update("jax_threefry_partitionable", True)
    depths = [int(d) for d in FLAGS.depths]
    times = {}
    for scan in (False, True):
        for d in depths:
            times[scan, d] = compile_seconds(d, scan)
            print(f"  {'scanned' if scan else 'unrolled'} depth {d}: "
                  f"{times[scan, d]:.1f} s (lower + compile)", flush=True)
    lo, hi = depths[0], depths[-1]
    where = FLAGS.topology or f"CPU ({jax.devices()[0].device_kind})"
    print(f"\n{FLAGS.config.model.family} width {FLAGS.config.model.width}, batch "
          f"{FLAGS.batch}, {where}")
    print("| layout | " + " | ".join(f"depth {d}" for d in depths) + f" | depth {hi} / {lo} |")
    print("|---" * (len(depths) + 2) + "|")
    for scan in (False, True):
        row = " | ".join(f"{times[scan, d]:.1f} s" for d in depths)
        print(f"| {'scanned' if scan else 'unrolled'} | {row} | "
              f"{times[scan, hi] / times[scan, lo]:.2f}x |")
    print("| unrolled / scanned | " + " | ".join(
        f"{times[False, d] / times[True, d]:.2f}x" for d in depths) + " | |")


if __name__ == "__main__":
    app.run(main)
