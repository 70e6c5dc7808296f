"""``jaxdit train --config experiments/dit_air.py:tiny --workdir DIR [--config.x=y ...]``

Trains the config's model in DIR (checkpoints, sample grids, metrics, TensorBoard events,
config.json), resuming from DIR's latest checkpoint when it has one. Also
``python -m jaxdit.train``. Examples::

  jaxdit train --config experiments/dit_air.py:tiny --workdir workdirs/tiny
  jaxdit train --config experiments/race_dit.py:tiny-4in16 --workdir workdirs/race \\
      --config.train.steps=200
"""
from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from jaxdit.cli.common import load_config, reject_stray, run_app, run_or_fail
from jaxdit.cli import supervise
from jaxdit.cli.errors import TRAIN_ERRORS
from jaxdit.parallel import distributed
from jaxdit.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_string("coordinator", None, "Multi-process: coordinator host:port "
                    "(not needed on TPU VMs; see jaxdit/parallel/distributed.py).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id.")
flags.DEFINE_integer("peer_timeout", distributed.PEER_TIMEOUT_S, "Multi-process: seconds "
                     "without a peer's heartbeats before the run stops, naming it.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors a user's config, data or run causes: one line on stderr and exit code 1
# (JAXDIT_DEBUG=1 shows the traceback).
def main(argv):
    reject_stray(argv, __name__)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    process_id = run_or_fail(multi_process_id, (ValueError,))
    if process_id is not None and not supervise.is_child():
        # A lost peer aborts this process from C++; a parent process names it instead.
        sys.exit(supervise.supervise(sys.argv[1:], FLAGS.workdir, process_id))
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.peer_timeout)
    jax.config.update("jax_threefry_partitionable", True)  # sharding-invariant random bits
    config = load_config(FLAGS)
    result = run_or_fail(train_and_evaluate, TRAIN_ERRORS, config, FLAGS.workdir)
    if result.get("already_finished"):
        return
    if result.get("preempted") and "loss" not in result:
        return  # stopped before a step was logged; the loop said what was saved
    print(done_summary(result, FLAGS.workdir), flush=True)


def multi_process_id() -> int | None:
    """This process's id in a multi-process run (flags, environment or a multi-host TPU
    slice), None for a single process. Raises ValueError for settings that cannot work."""
    if FLAGS.peer_timeout < 1:
        raise ValueError(f"--peer_timeout must be at least 1 second, got {FLAGS.peer_timeout}.")
    explicit = distributed.settings(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if explicit is not None:
        return explicit[2] if explicit[1] > 1 else None
    return distributed.tpu_pod_worker()


def done_summary(result: dict, workdir: str) -> str:
    """``Done: loss 0.1, val loss 0.1, checkpoint step 600`` (a value the run did not measure
    is left out, not printed as NaN), then one line per output the run wrote."""
    parts = [f"loss {result['loss']:.4g}"] if "loss" in result else []
    parts += [f"{k.replace('/', ' ')} {result[k]:.4g}" for k in ("val/loss", "val/mse")
              if k in result]  # autoencoders report the MSE
    saved = result.get("checkpoint_step")
    parts.append(f"checkpoint step {saved}" if saved is not None else "no checkpoint saved")
    outputs = {"checkpoint": os.path.join(workdir, "checkpoints", str(saved))
               if saved is not None else None,
               "samples": result.get("samples"),
               "metrics": os.path.join(workdir, "metrics.jsonl"),
               "tensorboard": os.path.join(workdir, "tb"),
               "config": os.path.join(workdir, "config.json")}
    lines = ["Done: " + ", ".join(parts)]
    lines += [f"  {name:<12}{path}" for name, path in outputs.items()
              if path and os.path.exists(path)]
    return "\n".join(lines)


def run():
    run_app(main, __name__, __doc__)
