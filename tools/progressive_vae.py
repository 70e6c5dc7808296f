"""DiT-Air's progressive VAE ablation (its Appendix D, Table 12) on the embedded data.

Trains, in one run and on the same data and seed:
  A: 4 latent channels from scratch, 2N steps;
  B: 8 channels from scratch, 2N steps;
  C: 4 channels for N steps, then widened to 8 (``vae.widen_from``) and trained N more;
and prints reconstruction MSE / PSNR (posterior mean) and the mean KL per latent element
on the validation split side by side (rFID needs Inception weights, which this tool does
not download; reconstruction error is the stand-in).

  python tools/progressive_vae.py --steps 300 --workdir /tmp/progressive_vae
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from jaxdit import config_lib
from jaxdit.models.vae import downsample_factor
from jaxdit.train.loop import train_and_evaluate

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")

flags.DEFINE_integer("steps", 300, "N: steps of each stage (A and B train 2N).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_string("size", "tiny", "VAE size (experiments/vae.py): tiny or f8.")
flags.DEFINE_string("workdir", "/tmp/progressive_vae", "Root of the three runs.")
flags.DEFINE_float("kl_weight", -1.0, "Override vae.kl_weight (negative: the config's).")
FLAGS = flags.FLAGS


def run(arg: str, workdir: str, steps: int, widen_from: str = "") -> dict:
    cfg = config_lib.preset("vae", arg, EXPERIMENTS)
    cfg.train.update(steps=steps, batch_size=FLAGS.batch_size, eval_every=0, sample_every=0,
                     ckpt_every=steps, log_every=max(1, steps // 4), val_batches=8)
    cfg.sampler.num_samples = 8
    if FLAGS.kl_weight >= 0:
        cfg.vae.kl_weight = FLAGS.kl_weight
    cfg.vae.widen_from = widen_from
    return train_and_evaluate(cfg, workdir)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    n, root, size = FLAGS.steps, FLAGS.workdir, FLAGS.size
    rows = {
        "A 4ch scratch": run(f"{size}-4ch", os.path.join(root, "a_4ch"), 2 * n),
        "B 8ch scratch": run(f"{size}-8ch", os.path.join(root, "b_8ch"), 2 * n),
    }
    run(f"{size}-4ch", os.path.join(root, "c_stage1_4ch"), n)
    rows["C 4ch->8ch progressive"] = run(f"{size}-8ch", os.path.join(root, "c_8ch"), n,
                                         widen_from=os.path.join(root, "c_stage1_4ch"))
    print(f"\nProgressive VAE ({size}, {2 * n} steps each, batch {FLAGS.batch_size}):")
    print(f"{'variant':26s} {'val MSE':>9s} {'PSNR dB':>8s} {'KL/elem':>9s} {'KL/image':>10s}")
    for name, r in rows.items():
        z = 8 if "8ch" in name else 4
        cfg = config_lib.preset("vae", f"{size}-{z}ch", EXPERIMENTS)
        cells = (cfg.data.image_size // downsample_factor(cfg.vae.ch_mult)) ** 2 * z
        print(f"{name:26s} {r['val/mse']:9.5f} {r['val/psnr']:8.2f} {r['val/kl']:9.4f} "
              f"{r['val/kl'] * cells:10.1f}")


if __name__ == "__main__":
    app.run(main)
