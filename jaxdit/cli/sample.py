"""``jaxdit sample --workdir DIR --prompt "a red circle" [--prompt ...] [--out grid.png]``

Loads the config saved in the checkpoint and the EMA weights of the latest (or ``--step``)
checkpoint, and writes a grid with ``--num_per_prompt`` samples per prompt (one row each)
and a ``.txt`` with the caption of every cell, by default to
``DIR/samples/sampled_step_<step>[_<n>].png`` (never over an earlier grid). Class-
conditional models (Race-DiT) take ``--label 3 --label 7`` instead of prompts.
``--height`` / ``--width`` sample another size or aspect ratio than the training one.
Also ``python -m jaxdit.sample``. Examples::

  jaxdit sample --workdir workdirs/tiny --prompt "a yellow triangle" --prompt "a red circle"
  jaxdit sample --workdir workdirs/race --label 3 --label 7 --num_per_prompt 8
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jaxdit.diffusion.samplers import SAMPLERS
from jaxdit.eval.sampling import default_grid_path, save_grid, write_captions
from jaxdit.cli.common import reject_stray, run_app, run_or_fail
from jaxdit.cli.errors import INPUT_ERRORS
from jaxdit.train.load import load_experiment
from jaxdit.train.loop import sample_condition, state_variables

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_multi_string("prompt", None, "Caption(s) to sample; repeat the flag for more.")
flags.DEFINE_multi_integer("label", None, "Class label(s) for class-conditional models.")
flags.DEFINE_string("out", None, "Output PNG path (default: "
                    "<workdir>/samples/sampled_step_<step>.png).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("num_per_prompt", 4, "Samples per prompt (one grid row per prompt).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("cfg_scale", None, "Override sampler.cfg_scale.")
flags.DEFINE_integer("num_steps", None, "Override sampler.num_steps.")
flags.DEFINE_enum("method", None, list(SAMPLERS), "Override sampler.method.")
flags.DEFINE_bool("sde", None, "Override sampler.sde.")
flags.DEFINE_bool("ema", True, "Use the EMA weights (default) or the raw parameters.")
flags.DEFINE_integer("height", None, "Sample height in pixels (default data.image_size).")
flags.DEFINE_integer("width", None, "Sample width in pixels (default data.image_size). "
                     "Denoisers with 2D RoPE / M-RoPE or sin-cos positions (and MMDiT "
                     "within its position table) sample any multiple of patch x latent "
                     "downsampling; D2iT and autoencoders only their training size.")
flags.mark_flags_as_required(["workdir"])


def sample_fn_for_size(exp, config, height: int | None, width: int | None):
    """The experiment's sampler at ``height x width`` pixels (default: the training size)."""
    size = config.data.image_size
    h, w = height or size, width or size
    if (h, w) == (size, size):
        return exp.sample_fn
    if not exp.objective.any_size:
        raise app.UsageError(f"{config.model.family} samples only at its training size "
                             f"{size}x{size} (learned positions / fixed grain grid).")
    unit = config.model.patch_size * config.latent.downsample
    if h % unit or w % unit or h <= 0 or w <= 0:
        raise app.UsageError(f"--height/--width must be positive multiples of model.patch_size "
                             f"x latent.downsample = {unit}, got {h}x{w}.")
    return exp.objective.sampler(exp.model, exp.autoencoder, config, (h, w, 3))


def check_request(config) -> None:
    """Applies the sampler overrides to the run's ``config`` and checks the prompts or
    labels against it (raises :class:`app.UsageError`)."""
    for name in ("cfg_scale", "num_steps", "method", "sde"):
        if getattr(FLAGS, name) is not None:
            config.sampler[name] = getattr(FLAGS, name)
    class_cond = config.text.kind == "none"
    wanted = FLAGS.label if class_cond else FLAGS.prompt
    if not wanted:
        raise app.UsageError("This checkpoint is " + ("class-conditional: pass --label."
                             if class_cond else "text-conditional: pass --prompt."))
    if class_cond:
        classes = config.model.num_classes
        bad = [label for label in wanted if not 0 <= label < classes]
        if bad:
            raise app.UsageError(f"--label {bad[0]} is not a class of this checkpoint: labels "
                                 f"run from 0 to {classes - 1}.")
    if FLAGS.num_per_prompt < 1:
        raise app.UsageError(f"--num_per_prompt must be at least 1, got {FLAGS.num_per_prompt}.")
    config.train.batch_size = 1


def main(argv):
    reject_stray(argv, __name__)
    # Orbax logs every restore at INFO and warns about metadata a read-only restore does not
    # need; jaxdit prints its own warnings, so only errors of the libraries are shown.
    logging.set_verbosity(logging.ERROR)
    exp, state, step = run_or_fail(load_experiment, INPUT_ERRORS, FLAGS.workdir,
                                   FLAGS.step, check_request)
    config = exp.config
    class_cond = config.text.kind == "none"
    wanted = FLAGS.label if class_cond else FLAGS.prompt
    with exp.context():
        repeated = [w for w in wanted for _ in range(FLAGS.num_per_prompt)]
        captions, cond = (sample_condition(exp, labels=repeated, n=len(repeated)) if class_cond
                          else sample_condition(exp, captions=repeated, n=len(repeated)))
        sample_fn = run_or_fail(sample_fn_for_size, (), exp, config, FLAGS.height, FLAGS.width)
        images = sample_fn(state_variables(state, ema=FLAGS.ema),
                           {k: jnp.asarray(v) for k, v in cond.items()},
                           jax.random.PRNGKey(FLAGS.seed))
    path = save_grid(np.asarray(images), FLAGS.out or default_grid_path(FLAGS.workdir, step),
                     cols=FLAGS.num_per_prompt)
    write_captions(captions, os.path.splitext(path)[0] + ".txt", FLAGS.num_per_prompt)
    print(f"Wrote {len(captions)} samples from checkpoint step {step} to {path} (captions: "
          f"{os.path.splitext(path)[0]}.txt)")


def run():
    run_app(main, __name__, __doc__)
