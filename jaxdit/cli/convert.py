"""``jaxdit convert --family lumina --model_dir <diffusers folder> --out DIR``

Converts a diffusers model folder (config.json + safetensors, read with numpy: no torch
needed) into a jaxdit params checkpoint ``{"denoiser": ...}`` and prints the config values
the run must use; start training from it with ``--config.train.init_params_from=DIR``.
Families: ``lumina`` (Lumina2Transformer2DModel), ``dit`` (DiTTransformer2DModel, into the
dense Race-DiT), ``pixart`` (PixArtTransformer2DModel) and ``sd3`` (SD3Transformer2DModel),
into PixArt-alpha / MMDiT with ``model.layout=original``. Also ``python -m
jaxdit.convert``. Example::

  jaxdit convert --family lumina --model_dir Lumina-Image-2.0/transformer --out lumina2b
"""
from __future__ import annotations

import json
import os

import jax
from absl import flags

from jaxdit.cli.common import fail, reject_stray, run_app, run_or_fail
from jaxdit.convert.common import ConversionError
from jaxdit.convert.folders import DIFFUSERS_FAMILIES, convert_diffusers_dir
from jaxdit.train.checkpoint import CheckpointError, save_params

FLAGS = flags.FLAGS
flags.DEFINE_enum("family", None, list(DIFFUSERS_FAMILIES), "Which diffusers model class.")
flags.DEFINE_string("model_dir", None, "The diffusers model folder (config.json + "
                    "*.safetensors).")
flags.DEFINE_string("out", None, "Output params checkpoint folder (must not exist).")
flags.mark_flags_as_required(["family", "model_dir", "out"])


def convert(family: str, model_dir: str, out: str) -> dict:
    """Converts ``model_dir`` and saves it to ``out``: the config fields it needs."""
    if os.path.exists(out):
        fail(f"--out {out} exists: give a new folder (nothing is written over).")
    params, fields = run_or_fail(convert_diffusers_dir, (ConversionError, OSError), model_dir,
                                 family)
    run_or_fail(save_params, (CheckpointError, OSError, ValueError), out,
                {"denoiser": params})
    n = sum(int(a.size) for a in jax.tree.leaves(params))
    print(f"Wrote {n:,} parameters to {os.path.abspath(out)}")
    print("Use a config with these values:", json.dumps(fields, default=list))
    return fields


def main(argv):
    reject_stray(argv, __name__)
    convert(FLAGS.family, FLAGS.model_dir, FLAGS.out)


def run():
    run_app(main, __name__, __doc__)
