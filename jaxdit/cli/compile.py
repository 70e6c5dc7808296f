"""``jaxdit compile --config experiments/dit_air.py:XL --topology v5p-128``

Compiles the config's real train step ahead of time for a TPU slice, on any host (a CPU
machine with libtpu installed: ``pip install -e ".[tpu]"``), and prints per-chip HBM
(arguments, temporaries, outputs, total) against the chip's, whether it fits, the lower and
compile times, and the compiler's estimates of FLOPs, step time and MFU (XLA's cost model:
estimates, not measurements). Inputs are cached features (latents and text features), as
in large runs. ``--find_batch`` prints the largest global batch that fits for each remat
policy. Also ``python -m jaxdit.compile``. Examples::

  jaxdit compile --config experiments/dit_air.py:B --topology v5p:2x2x1 --batch 64
  jaxdit compile --config experiments/race_dit.py:XL-8in32 --topology v5p-128 \\
      --find_batch --json plan.json
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only compiles; libtpu serves the topology

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxdit.cli.common import fail, load_config, reject_stray, run_app, run_or_fail  # noqa: E402
from jaxdit.errors import ConfigError  # noqa: E402
from jaxdit.models.base import REMAT_POLICIES  # noqa: E402
from jaxdit.parallel.mesh import MeshConfigError, batch_divisor, make_mesh  # noqa: E402
from jaxdit.train import aot  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py:arg).",
                                lock_config=False)
flags.DEFINE_string("topology", None, "TPU slice: v5p-128 | v5p:4x4x4 | v5e-16 | v6e-16 ...")
flags.DEFINE_integer("batch", None, "Global batch (default: the config's train.batch_size).")
flags.DEFINE_enum("remat", None, sorted(REMAT_POLICIES), "Remat policy (default: the config's).")
flags.DEFINE_bool("find_batch", False, "Print the largest global batch that fits per remat "
                  "policy (several compiles).")
flags.DEFINE_string("json", None, "Also write the report(s) to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])

USER_ERRORS = (aot.AOTError, ConfigError, MeshConfigError)


def _find_batches(config) -> list:
    _, topo_name, chips = aot.parse_topology(FLAGS.topology)
    devices = aot.topology_devices(topo_name)
    mesh = make_mesh(aot.compile_mesh(config, chips), devices)
    divisor = batch_divisor(mesh)
    reports = []
    for remat in ("none", "dots", "full"):
        best = aot.find_batch(config, FLAGS.topology, remat,
                              FLAGS.batch or config.train.batch_size, divisor)
        print(f"remat={remat}: " + (f"largest global batch that fits: {best.batch} "
                                    f"({best.total_bytes / aot.GIB:.1f} GiB per chip)"
                                    if best else "not even the smallest batch fits"))
        reports += [best] if best else []
    return reports


def main(argv):
    reject_stray(argv, __name__)
    logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_threefry_partitionable", True)
    config = load_config(FLAGS)
    if FLAGS.find_batch:
        reports = run_or_fail(_find_batches, USER_ERRORS, config)
    else:
        print(f"Compiling the {config.model.family} train step for {FLAGS.topology} ...",
              flush=True)
        reports = [run_or_fail(aot.compile_train_step, USER_ERRORS, config, FLAGS.topology,
                               batch=FLAGS.batch, remat=FLAGS.remat)]
        print("\n".join(aot.report_lines(reports[0])), flush=True)
    if FLAGS.json:
        try:
            with open(FLAGS.json, "w") as f:
                json.dump([r.as_dict() for r in reports], f, indent=1)
        except OSError as e:
            fail(f"cannot write --json {FLAGS.json}: {e.strerror}.")
        print(f"Wrote {FLAGS.json}")


def run():
    run_app(main, __name__, __doc__)
