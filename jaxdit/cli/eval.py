"""``jaxdit eval --workdir DIR [--step N | --all_steps] [--num_samples 64]``

Evaluates checkpoints of a training workdir with the config saved in them: validation
loss (flow-matching loss on ``train.val_batches`` validation batches, EMA weights, the
per-``t`` breakdown of ``eval.t_grid``) and, on the shapes data, the text-image alignment
score of samples drawn for the first ``--num_samples`` validation captions (or class names
for class-conditional models), per category (:mod:`jaxdit.eval.alignment`); with
``--inception_weights`` also the FID of those samples against as many validation images
(:mod:`jaxdit.eval.fid`). Results are printed and written to ``DIR/eval/step_<N>.json``.
Also ``python -m jaxdit.eval``. Examples::

  jaxdit eval --workdir workdirs/tiny
  jaxdit eval --workdir workdirs/tiny --all_steps --num_samples 64
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from jaxdit.data import shapes
from jaxdit.eval.alignment import alignment_scores
from jaxdit.eval.fid import fid, load_inception
from jaxdit.cli.common import fail, reject_stray, run_app, run_or_fail
from jaxdit.cli.errors import INPUT_ERRORS
from jaxdit.train.checkpoint import CheckpointError, Checkpointer
from jaxdit.train.load import load_experiment
from jaxdit.train.loop import (Experiment, evaluate, sample_condition, state_variables,
                               validation_captions, validation_images)
from jaxdit.train.metrics import MetricWriter

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("all_steps", False, "Evaluate every checkpoint in the workdir.")
flags.DEFINE_integer("num_samples", 64, "Samples for the alignment score (0: skip).")
flags.DEFINE_integer("sample_batch", 32, "Samples per sampler call.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("inception_weights", None, "FID: .npz of pytorch-fid's InceptionV3 "
                    "state dict (see jaxdit/eval/fid.py); FID of --num_samples samples "
                    "against as many validation images.")
flags.mark_flags_as_required(["workdir"])


def draw_samples(exp: Experiment, state, num: int, batch: int, seed: int):
    """``(images (num, S, S, 3) in [-1, 1], their captions or class names)``: samples for
    the first ``num`` validation captions, or for classes 0, 1, ... (class-conditional)."""
    cfg = exp.config
    class_cond = cfg.text.kind == "none"
    if class_cond:  # the class names are captions of the grammar
        wanted = [i % cfg.model.num_classes for i in range(num)]
        names = [shapes.class_name(i) for i in wanted]
    else:
        wanted = names = validation_captions(cfg, num)
    images = []
    for lo in range(0, len(wanted), batch):
        chunk = wanted[lo:lo + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled batch size
        _, cond = sample_condition(exp, n=batch,
                                   **{"labels" if class_cond else "captions": padded})
        out = exp.sample_fn(state_variables(state), {k: jnp.asarray(v) for k, v in cond.items()},
                            jax.random.PRNGKey(seed + lo))
        # D2iT grids put the grain map right of each sample: score the image only
        images += list(np.asarray(out)[:len(chunk), :, :cfg.data.image_size])
    return np.stack(images), names


def sample_metrics(exp: Experiment, state, num: int, batch: int, seed: int,
                   inception=None) -> dict:
    """Alignment scores (shapes data) and, given ``inception = (model, params)``
    (:func:`jaxdit.eval.fid.load_inception`), the FID of ``num`` samples against ``num``
    validation images. {} for autoencoders or ``num <= 0``."""
    cfg = exp.config
    if num <= 0 or exp.objective.reconstructs:
        return {}
    if cfg.data.source != "shapes" and inception is None:
        return {}
    images, names = draw_samples(exp, state, num, batch, seed)
    out = alignment_scores(list(images), names) if cfg.data.source == "shapes" else {}
    if inception is not None:
        out["fid"] = fid(*inception, images, validation_images(cfg, num)[1], batch=batch)
    return out


def evaluate_step(workdir: str, step: int | None, num_samples: int = 64,
                  sample_batch: int = 32, seed: int = 0, inception=None) -> dict:
    """Validation loss, alignment scores and (with ``inception``) FID of checkpoint
    ``step`` (None: the newest intact one) of the run in ``workdir``."""
    exp, state, step = run_or_fail(load_experiment, INPUT_ERRORS, workdir, step)
    with exp.context():
        val = evaluate(exp, state, step, MetricWriter("", enabled=False))
        results = {k: float(v) for k, v in val.items()}
        results.update(sample_metrics(exp, state, num_samples, sample_batch, seed, inception))
    return {"step": int(step), **results}


def main(argv):
    reject_stray(argv, __name__)
    # Orbax logs every restore at INFO and warns about metadata a read-only restore does not
    # need; jaxdit prints its own warnings, so only errors of the libraries are shown.
    logging.set_verbosity(logging.ERROR)
    steps = [FLAGS.step]  # None: the newest intact checkpoint
    if FLAGS.all_steps:
        ckpt = run_or_fail(Checkpointer, (CheckpointError,),
                           os.path.join(FLAGS.workdir, "checkpoints"), create=False)
        steps = ckpt.all_steps()
        ckpt.close()
        if not steps:
            fail(f"no checkpoints in {FLAGS.workdir}/checkpoints: train first, or pass the "
                 "workdir of a run that saved one.")
    out_dir = os.path.join(FLAGS.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    inception = load_inception(FLAGS.inception_weights) if FLAGS.inception_weights else None
    for step in steps:
        results = evaluate_step(FLAGS.workdir, step, FLAGS.num_samples, FLAGS.sample_batch,
                                FLAGS.seed, inception)
        path = os.path.join(out_dir, f"step_{results['step']:07d}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in results.items()))
        print(f"Wrote {path}", flush=True)


def run():
    run_app(main, __name__, __doc__)
