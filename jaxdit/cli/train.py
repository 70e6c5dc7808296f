"""``python -m jaxdit.train --config experiments/dit_air.py:tiny --workdir DIR [--config.x=y]``"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdit.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    jax.config.update("jax_threefry_partitionable", True)  # sharding-invariant random bits
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(f"Done: loss {result.get('loss', float('nan')):.4f}, val loss "
          f"{result.get('val/loss', float('nan')):.4f}, checkpoint step "
          f"{result['checkpoint_step']}, samples {result.get('samples')}", flush=True)


def run():
    app.run(main)
