"""``jaxdit cache --config CONFIG --out DIR [--split train|val] [--num N]``

Runs the config's frozen encoders (the autoencoder and a pretrained text encoder) once over
``--split`` of its data and writes their outputs to the feature cache ``--out`` that
training reads with ``data.source=cached`` (:mod:`jaxdit.train.feature_cache`). Also
``python -m jaxdit.cache``. Examples::

  jaxdit cache --config experiments/dit_air.py:tiny --config.text.kind=pretrained \\
      --config.text.path=minilm --config.text.layers="(-2,)" --split train --num 20000 \\
      --out cache/train
  jaxdit cache --config experiments/dit_air.py:tiny ... --split val --num 512 --out cache/val
  jaxdit train --config experiments/dit_air.py:tiny --workdir wd \\
      --config.data.source=cached --config.data.cache_dir=cache/train \\
      --config.data.val_cache_dir=cache/val
"""
from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from jaxdit.cli.common import load_config, reject_stray, run_app, run_or_fail
from jaxdit.errors import ConfigError
from jaxdit.data.cache import CacheError
from jaxdit.train.checkpoint import CheckpointError
from jaxdit.train.feature_cache import cache_features

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py:arg).",
                                lock_config=False)
flags.DEFINE_string("out", None, "Output cache folder.")
flags.DEFINE_enum("split", "train", ["train", "val"], "Which split of data.source to cache.")
flags.DEFINE_integer("num", 0, "Examples to cache (0 = the whole split).")
flags.DEFINE_integer("batch", 64, "Examples per encoder call.")
flags.mark_flags_as_required(["config", "out"])

USER_ERRORS = (CacheError, CheckpointError, ConfigError, ValueError, OSError)


def main(argv):
    reject_stray(argv, __name__)
    logging.set_verbosity(logging.WARNING)
    config = load_config(FLAGS)
    path = run_or_fail(cache_features, USER_ERRORS, config, FLAGS.split, FLAGS.out,
                       FLAGS.num, FLAGS.batch, log=print)
    print(f"Cached the {FLAGS.split} split to {path}")


def run():
    run_app(main, __name__, __doc__)
