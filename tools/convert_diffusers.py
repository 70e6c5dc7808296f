"""Converts a diffusers model folder to a jaxdit params checkpoint.

  python tools/convert_diffusers.py --family lumina \
      --model_dir /path/Lumina-Image-2.0/transformer --out /path/lumina2b_params

writes an Orbax params checkpoint ``{"denoiser": ...}`` and prints the config values the run
must use. Start training from it with ``--config.train.init_params_from=<out>`` (the text
encoder, if trainable, keeps its own initialisation). Reads safetensors with numpy: no
torch needed. Families: ``lumina`` (Lumina2Transformer2DModel), ``dit``
(DiTTransformer2DModel, loaded into the dense Race-DiT), ``pixart``
(PixArtTransformer2DModel) and ``sd3`` (SD3Transformer2DModel), loaded into PixArt-alpha /
MMDiT with ``model.layout=original``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdit.models.convert import DIFFUSERS_FAMILIES, convert_diffusers_dir  # noqa: E402
from jaxdit.train.checkpoint import save_params  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=DIFFUSERS_FAMILIES)
    parser.add_argument("--model_dir", required=True, help="diffusers model folder")
    parser.add_argument("--out", required=True, help="output params checkpoint directory")
    args = parser.parse_args(argv)
    params, fields = convert_diffusers_dir(args.model_dir, args.family)
    save_params(args.out, {"denoiser": params})
    n = sum(int(a.size) for a in __import__("jax").tree.leaves(params))
    print(f"Wrote {n:,} parameters to {os.path.abspath(args.out)}")
    print("Use a config with these values:", json.dumps(fields, default=list))


if __name__ == "__main__":
    main()
