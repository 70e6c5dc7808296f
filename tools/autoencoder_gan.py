"""The autoencoders' perceptual and adversarial terms, measured side by side on the
embedded shapes data (issue 21): the same tiny KL-VAE, data and seed trained

  A: L1 + L2 + KL (the tiny config's default);
  B: A + the PatchGAN discriminator (hinge, adaptive weight) from step N/3;
  C: B + LPIPS: the converted VGG16 of ``--lpips_weights`` (tools/convert_lpips.py), or,
     without it, a *random* VGG16 and heads (labelled so: not a perceptual distance);

and prints validation PSNR (posterior mean) and sharpness (mean gradient magnitude of the
reconstructions over that of the originals: 1 = as sharp, < 1 = blurrier), with ratios
against A.

  python tools/autoencoder_gan.py --steps 600 --workdir /tmp/autoencoder_gan
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from jaxdit import config_lib
from jaxdit.train.loop import train_and_evaluate

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")

flags.DEFINE_integer("steps", 600, "Training steps of each run.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_string("workdir", "/tmp/autoencoder_gan", "Root of the runs (must not exist).")
flags.DEFINE_string("lpips_weights", "", "Converted LPIPS folder for run C ('' = random).")
flags.DEFINE_float("disc_weight", 0.5, "vae.disc_weight of runs B and C.")
flags.DEFINE_list("runs", ["a", "b", "c"], "Which runs (C with a random VGG16 is slow on CPU).")
FLAGS = flags.FLAGS


def run(name: str, **vae) -> dict:
    cfg = config_lib.preset("vae", "tiny-4ch", EXPERIMENTS)
    steps = FLAGS.steps
    cfg.train.update(steps=steps, batch_size=FLAGS.batch_size, eval_every=0, sample_every=0,
                     ckpt_every=steps, log_every=max(1, steps // 6), val_batches=8)
    cfg.sampler.num_samples = 8
    cfg.vae.update(**vae)
    return train_and_evaluate(cfg, os.path.join(FLAGS.workdir, name))


def main(argv):
    del argv
    if os.path.exists(FLAGS.workdir):
        raise SystemExit(f"--workdir {FLAGS.workdir} exists: give a new folder.")
    logging.set_verbosity(logging.WARNING)
    gan = dict(disc_weight=FLAGS.disc_weight, disc_start=FLAGS.steps // 3)
    lpips = FLAGS.lpips_weights or "random"
    plan = {"a": ("A L1+L2+KL", "a_base", {}),
            "b": ("B A + PatchGAN", "b_gan", gan),
            "c": (f"C B + LPIPS ({'converted' if FLAGS.lpips_weights else 'RANDOM VGG16'})",
                  "c_gan_lpips", {**gan, "lpips_weight": 1.0, "lpips_weights": lpips})}
    rows = {plan[k][0]: run(plan[k][1], **plan[k][2]) for k in ["a"] + [
        r for r in FLAGS.runs if r != "a"]}  # A is the baseline of the ratios
    base = rows["A L1+L2+KL"]
    print(f"\n{FLAGS.steps} steps, batch {FLAGS.batch_size}, tiny-4ch on shapes (32 px):")
    print(f"{'run':34s} {'val PSNR':>9s} {'x A':>6s} {'sharpness':>10s} {'x A':>6s}")
    for name, out in rows.items():
        print(f"{name:34s} {out['val/psnr']:9.2f} {out['val/psnr'] / base['val/psnr']:6.3f} "
              f"{out['val/sharpness']:10.3f} {out['val/sharpness'] / base['val/sharpness']:6.3f}")


if __name__ == "__main__":
    app.run(main)
