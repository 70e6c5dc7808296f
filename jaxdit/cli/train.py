"""``python -m jaxdit.train --config experiments/dit_air.py:tiny --workdir DIR [--config.x=y]``"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdit.cli.common import load_config, run_or_fail
from jaxdit.config_lib import ConfigError
from jaxdit.parallel import distributed
from jaxdit.parallel.mesh import MeshConfigError
from jaxdit.train.checkpoint import CheckpointError
from jaxdit.train.health import TrainingDiverged
from jaxdit.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_string("coordinator", None, "Multi-process: coordinator host:port "
                    "(not needed on TPU VMs; see jaxdit/parallel/distributed.py).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors a user's config, data or run causes: one line on stderr and exit code 1
# (JAXDIT_DEBUG=1 shows the traceback).
USER_ERRORS = (ConfigError, MeshConfigError, CheckpointError, TrainingDiverged)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    jax.config.update("jax_threefry_partitionable", True)  # sharding-invariant random bits
    config = load_config(FLAGS)
    result = run_or_fail(train_and_evaluate, USER_ERRORS, config, FLAGS.workdir)
    if result.get("already_finished"):
        return
    val = "val/loss" if "val/loss" in result else "val/mse"  # autoencoders report the MSE
    print(f"Done: loss {result.get('loss', float('nan')):.4g}, {val.replace('/', ' ')} "
          f"{result.get(val, float('nan')):.4g}, checkpoint step "
          f"{result['checkpoint_step']}, samples {result.get('samples')}", flush=True)


def run():
    app.run(main)
