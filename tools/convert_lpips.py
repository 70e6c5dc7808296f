"""Converts LPIPS (VGG16 trunk + v0.1 linear heads) from local PyTorch files into a jaxdit
params checkpoint for ``--config.vae.lpips_weights=<out>``. Nothing is downloaded.

  python tools/convert_lpips.py --vgg16 vgg16-397923af.pth --out lpips_vgg
  python tools/convert_lpips.py --vgg16 vgg16.pth --heads lpips/weights/v0.1/vgg.pth \\
      --out lpips_vgg

``--vgg16``: torchvision's ImageNet VGG16 state dict (``features.*``), or a whole
``lpips.LPIPS`` state dict (trunk and heads together). ``--heads``: the ``lpips``
package's ``weights/v0.1/vgg.pth``; by default the one of the installed package. Needs
torch to read the ``.pth`` files (``pip install torch lpips``; lpips only for its heads).
"""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxdit.convert.common import ConversionError
from jaxdit.convert.lpips import lpips_from_torch
from jaxdit.models.lpips import LPIPS
from jaxdit.train.checkpoint import save_params
from jaxdit.train.state import ABSTRACT_KEY, strip_boxes

flags.DEFINE_string("vgg16", None, "torchvision VGG16 state dict (.pth).")
flags.DEFINE_string("heads", "", "lpips v0.1 heads (.pth); default: the installed package's.")
flags.DEFINE_string("out", None, "Output params checkpoint folder (must not exist).")
flags.mark_flags_as_required(["vgg16", "out"])
FLAGS = flags.FLAGS


def installed_heads() -> str:
    """Path of the installed ``lpips`` package's VGG heads, or ''."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else ""


def expected_params():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(lambda k, a: LPIPS().init(k, a, a), ABSTRACT_KEY, x)
    return strip_boxes(abstract["params"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import torch  # pylint: disable=import-outside-toplevel  (reading .pth needs torch)
    if os.path.exists(FLAGS.out):
        raise SystemExit(f"--out {FLAGS.out} exists: give a new folder (nothing is written over).")
    heads_path = FLAGS.heads or installed_heads()
    for path in (FLAGS.vgg16, heads_path):
        if path and not os.path.isfile(path):
            raise SystemExit(f"convert_lpips: no file {path}.")
    vgg = torch.load(FLAGS.vgg16, map_location="cpu", weights_only=True)
    heads = torch.load(heads_path, map_location="cpu", weights_only=True) if heads_path else vgg
    try:
        params = lpips_from_torch({k: v.numpy() for k, v in vgg.items()},
                                  {k: v.numpy() for k, v in heads.items()}, expected_params())
    except ConversionError as e:
        raise SystemExit(f"convert_lpips: {e}") from None
    save_params(FLAGS.out, {"lpips": params})
    n = sum(int(a.size) for a in jax.tree.leaves(params))
    print(f"Wrote {n:,} LPIPS parameters to {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
    app.run(main)
