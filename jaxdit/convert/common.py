"""What every converter shares: the error, the name/shape check against the target tree,
torch ``Linear`` -> kernel, and reading a diffusers / Hugging Face folder with numpy (no
torch)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.models.stack import stack_flat_like


class ConversionError(ValueError):
    """The state dict does not fit the target model (names or shapes)."""


def check_and_unflatten(out: dict, expected):
    """``out`` ("a/b/c" -> array) against the ``expected`` tree; every problem at once."""
    flat_expected = {"/".join(k): v for k, v in flatten_dict(expected).items()}
    out = stack_flat_like(out, flat_expected)  # scanned models: blocks on a layer axis
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in flat_expected.items() if k not in out]
    problems += [f"unexpected {k}" for k in out if k not in flat_expected]
    problems += [f"{k}: shape {out[k].shape} != expected {tuple(flat_expected[k].shape)}"
                 for k in out if k in flat_expected and out[k].shape != flat_expected[k].shape]
    if problems:
        raise ConversionError("State dict does not fit the model:\n  " + "\n  ".join(problems))
    converted = {tuple(k.split("/")): out[k].astype(flat_expected[k].dtype) for k in out}
    return unflatten_dict(converted)


def linear(out: dict, path: str, sd: Mapping, name: str):
    """torch ``Linear`` ``name`` (weight ``(out, in)``, bias) -> ``path/kernel`` ``(in, out)``
    and ``path/bias`` in ``out``."""
    out[f"{path}/kernel"] = np.asarray(sd[f"{name}.weight"], np.float32).T
    out[f"{path}/bias"] = np.asarray(sd[f"{name}.bias"], np.float32)


def is_diffusers_vae(path: str) -> bool:
    """Whether ``path`` is a diffusers ``AutoencoderKL`` folder (config.json + weights)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"


def read_diffusers_dir(model_dir: str) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a diffusers model folder, read with numpy only."""
    try:
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ConversionError("Reading diffusers weights needs `pip install safetensors`.") from e
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise ConversionError(f"{root} has no config.json (expected a diffusers model folder, "
                              "e.g. the transformer/ subfolder of a pipeline).")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"No .safetensors weights in {root}.")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return json.loads((root / "config.json").read_text()), state
