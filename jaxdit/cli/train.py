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
from jaxdit.train.workdir_lock import WorkdirBusy

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
USER_ERRORS = (ConfigError, MeshConfigError, CheckpointError, TrainingDiverged, WorkdirBusy)


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
    if result.get("preempted") and "loss" not in result:
        return  # stopped before a step was logged; the loop said what was saved
    print("Done: " + done_summary(result), flush=True)


def done_summary(result: dict) -> str:
    """``loss 0.1, val loss 0.1, checkpoint step 600, samples <path>``: what the run measured
    and wrote (a value it did not measure is left out, not printed as NaN)."""
    parts = [f"loss {result['loss']:.4g}"] if "loss" in result else []
    parts += [f"{k.replace('/', ' ')} {result[k]:.4g}" for k in ("val/loss", "val/mse")
              if k in result]  # autoencoders report the MSE
    saved = result.get("checkpoint_step")
    parts.append(f"checkpoint step {saved}" if saved is not None else "no checkpoint saved")
    if result.get("samples"):
        parts.append(f"samples {result['samples']}")
    return ", ".join(parts)


def run():
    app.run(main)
