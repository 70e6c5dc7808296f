"""Weights from earlier training stages, placed into a new run's state.

* :func:`init_params` (``train.init_params_from``): the next stage of a multi-stage
  schedule (EMA weights of a training workdir) or converted diffusers weights;
* :func:`load_stage1_vae` (``d2it.vae_workdir``): D2iT's frozen stage-1 DVAE and its latent
  scale, after :func:`configure_from_vae` took its architecture and grain threshold;
* :func:`load_widened_vae` (``vae.widen_from``): the progressive VAE's narrower run,
  widened to more latent channels.

``exp`` is the run's ``jaxdit.train.loop.Experiment``; the earlier run is rebuilt from the
config saved in its checkpoint, on the same devices.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.config_lib import ConfigError
from jaxdit.data.pipeline import make_dataset, make_source
from jaxdit.models.dvae import fine_downsample
from jaxdit.models.vae import widen_latent
from jaxdit.train.checkpoint import Checkpointer, load_params


def configure_from_vae(config) -> None:
    """D2iT stage 2: takes the DVAE architecture and grain threshold (``config.vae``,
    ``config.dvae``) from the stage-1 run in ``d2it.vae_workdir``, and its latent size."""
    workdir = config.d2it.vae_workdir
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) and config.dvae.threshold >= 0:
        return  # a stage-2 run's saved config: its checkpoints hold the DVAE already
    stage1 = saved_config(workdir)
    if stage1.model.family != "dvae":
        raise ConfigError(f"d2it.vae_workdir={workdir} trained model.family="
                          f"{stage1.model.family!r}, not a 'dvae'.")
    config.vae = stage1.vae
    config.dvae = stage1.dvae
    config.latent.update(channels=stage1.vae.z_channels,
                         downsample=fine_downsample(stage1.vae.ch_mult))


def load_stage1_vae(exp, state):
    """``state`` with the stage-1 DVAE's EMA weights under ``frozen_vae`` and the latent
    scale set to 1 / std of the latents of ``d2it.scale_images`` training images."""
    cfg = exp.config
    stage1_cfg = saved_config(cfg.d2it.vae_workdir)
    stage1_cfg.dvae = cfg.dvae  # its threshold is resolved already
    previous, step = restore_earlier_run(exp, stage1_cfg, cfg.d2it.vae_workdir)
    params = {**state.params,
              "frozen_vae": place_like(state.params["frozen_vae"], previous.ema_params)}
    n = max(1, min(int(cfg.d2it.scale_images), len(make_source(cfg.data, "train"))))
    images = next(iter(make_dataset(cfg, "train", n, repeat=False)))["image"]
    encode = jax.jit(lambda p, x: exp.model.apply({"params": p}, x, method="encode")[0])
    latents = encode({**params, "frozen_latent_scale": jnp.ones(())}, jnp.asarray(images))
    scale = 1.0 / max(float(jnp.std(latents)), 1e-6)
    print(f"D2iT: DVAE from {cfg.d2it.vae_workdir} (step {step}); latent std {1 / scale:.4f} "
          f"over {n} images -> latent scale {scale:.4f}", flush=True)
    params["frozen_latent_scale"] = place_like(state.params["frozen_latent_scale"], scale)
    ema = {**state.ema_params, "frozen_vae": jax.tree.map(jnp.copy, params["frozen_vae"]),
           "frozen_latent_scale": jnp.copy(params["frozen_latent_scale"])}
    return state.replace(params=params, ema_params=ema)


def load_widened_vae(exp, state):
    """Progressive VAE: ``state`` with the EMA weights of the narrower KL-VAE run in
    ``vae.widen_from``, widened to ``vae.z_channels`` (params and EMA; fresh optimizer)."""
    cfg = exp.config
    source = saved_config(cfg.vae.widen_from)
    if source.model.family != "kl_vae":
        raise ConfigError(f"vae.widen_from={cfg.vae.widen_from} trained model.family="
                          f"{source.model.family!r}, not 'kl_vae'.")
    fields = ("ch", "ch_mult", "num_res_blocks", "attn")
    if any(tuple(np.atleast_1d(source.vae[k])) != tuple(np.atleast_1d(cfg.vae[k]))
           for k in fields):
        raise ConfigError(f"vae.widen_from={cfg.vae.widen_from}: its vae {fields} must equal "
                          "this run's; only z_channels may grow.")
    previous, step = restore_earlier_run(exp, source, cfg.vae.widen_from)
    wide = widen_latent(jax.device_get(previous.ema_params), cfg.vae.z_channels)
    params = place_like(state.params, wide)
    print(f"Progressive VAE: {source.vae.z_channels} -> {cfg.vae.z_channels} latent channels "
          f"from {cfg.vae.widen_from} (step {step})", flush=True)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def saved_config(workdir: str):
    """The config saved in the latest checkpoint of the training run in ``workdir``."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        return ckpt.restore_config()
    finally:
        ckpt.close()


def place_like(tree, new):
    """``new`` (same structure as ``tree``) as arrays with ``tree``'s dtypes and shardings."""
    return jax.tree.map(lambda old, x: jax.device_put(jnp.asarray(x, old.dtype), old.sharding),
                        tree, new)


def restore_earlier_run(exp, config, workdir: str):
    """``(state, step)`` of the run in ``workdir`` (trained with ``config``), rebuilt on
    ``exp``'s devices and mesh."""
    config.mesh = dict(exp.config.mesh)
    earlier = type(exp)(config, exp.mesh.devices.flatten().tolist())
    return restore_workdir(earlier, workdir)


def restore_workdir(exp, workdir: str):
    """``(state, step)`` of the latest checkpoint of the training run in ``workdir``,
    restored into ``exp``'s state layout."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        return ckpt.restore(exp.abstract_state())
    finally:
        ckpt.close()


def init_params(state, exp, source: str):
    """``state`` with weights loaded from ``source`` (``train.init_params_from``):

    * a training workdir (it has ``checkpoints/``): the EMA weights of its latest checkpoint
      become the params and the EMA of this run, whose optimizer starts fresh: the next
      stage of a multi-stage schedule (e.g. 256 then 512 pixels with a larger
      ``diffusion.shift``, or SFT on other data). The model must be the same (the
      resolution may change: positions are computed, not learned) and so must the
      optimizer's state layout (the checkpoint is restored whole);
    * a params-only checkpoint ``{"denoiser": ...}`` (``tools/convert_diffusers.py``): the
      denoiser's params; everything else keeps its initialisation.
    """
    if os.path.isdir(os.path.join(source, "checkpoints")):
        previous, step = restore_workdir(exp, source)
        print(f"Initialised from the EMA weights of {source} (step {step})", flush=True)
        return state.replace(params=previous.ema_params,
                             ema_params=jax.tree.map(jnp.copy, previous.ema_params),
                             model_state=previous.model_state)
    abstract = exp.abstract_state().params
    loaded = load_params(source, {"denoiser": abstract["denoiser"]})["denoiser"]
    print(f"Initialised the denoiser from {source}", flush=True)
    params = {**state.params, "denoiser": loaded}
    ema = {**state.ema_params, "denoiser": jax.tree.map(jnp.copy, loaded)}
    return state.replace(params=params, ema_params=ema)
