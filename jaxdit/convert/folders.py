"""Whole diffusers model folders (``config.json`` + ``*.safetensors``) to jaxdit denoiser
params: reads the folder, derives the ``config.model`` fields from its config, builds the
matching jaxdit model abstractly (``jax.eval_shape``: nothing allocated) and converts the
weights against it. What ``jaxdit convert`` runs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit import config_lib
from jaxdit.convert import baselines
from jaxdit.convert.common import ConversionError, read_diffusers_dir
from jaxdit.convert.dit import dit_config_from_diffusers, dit_from_diffusers
from jaxdit.convert.lumina import lumina_config_from_diffusers, lumina_from_diffusers
from jaxdit.models.registry import build_denoiser


DIFFUSERS_FAMILIES = ("lumina", "dit", "pixart", "sd3")


def convert_diffusers_dir(model_dir: str, family: str):
    """Converts a diffusers folder of ``family`` in :data:`DIFFUSERS_FAMILIES`: Lumina2,
    DiT (into the dense Race-DiT), PixArt-alpha and SD3 (into PixArt-alpha / MMDiT with
    ``layout="original"``, :mod:`jaxdit.convert.baselines`).

    Returns ``(denoiser params, model fields)``; the fields say which ``config.model``
    values (plus ``latent_channels`` and, for text models, ``text_width`` and
    ``pooled_width``) the run must use.
    """
    configs = {"lumina": lumina_config_from_diffusers, "dit": dit_config_from_diffusers,
               "pixart": baselines.pixart_config_from_diffusers,
               "sd3": baselines.sd3_config_from_diffusers}
    if family not in configs:
        raise ConversionError(f"Unknown family {family!r}; available: {DIFFUSERS_FAMILIES}.")
    dcfg, state = read_diffusers_dir(model_dir)
    fields = configs[family](dcfg)
    if family == "dit":
        cond = {"label": jnp.zeros((1,), jnp.int32)}
    else:
        width = fields["text_width"]
        cond = {"text_tokens": jnp.zeros((1, 4, width)), "text_mask": jnp.ones((1, 4), bool),
                "text_pooled": jnp.zeros((1, fields.get("pooled_width", width)))}
    model_cfg = config_lib.base_config().model
    model_cfg.update({k: v for k, v in fields.items() if k in model_cfg})
    model = build_denoiser(model_cfg, fields["latent_channels"])
    p, channels = fields["patch_size"], fields["latent_channels"]
    x = jnp.zeros((1, 2 * p, 2 * p, channels))
    expected = nn.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(1), cond))["params"])
    if family == "lumina":
        params = lumina_from_diffusers(state, expected, num_heads=fields["num_heads"],
                                       num_kv_heads=fields["num_kv_heads"])
    else:
        convert = {"dit": dit_from_diffusers, "pixart": baselines.pixart_from_diffusers,
                   "sd3": baselines.sd3_from_diffusers}[family]
        params = convert(state, expected, patch_size=p, channels=channels)
    return params, fields
