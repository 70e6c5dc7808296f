"""Weights from earlier training stages, placed into a new run's state.

* :func:`init_params` (``train.init_params_from``): the next stage of a multi-stage
  schedule (EMA weights of a training workdir) or converted diffusers weights;
* :func:`load_stage1_vae` (``d2it.vae_workdir``): D2iT's frozen stage-1 DVAE and its latent
  scale, after :func:`configure_from_vae` took its architecture and grain threshold;
* :func:`load_widened_vae` (``vae.widen_from``): the progressive VAE's narrower run,
  widened to more latent channels;
* :func:`load_latent_vae` (``latent.kind='kl_vae'``, ``latent.vae_workdir``): a trained
  KL-VAE, frozen inside a text-to-image / class-conditional model, after
  :func:`configure_latent_vae` took its architecture.

Each objective places what its config asks for through one function
(``Objective.initial_weights``): :func:`flow_initial_weights`,
:func:`autoencoder_initial_weights`, :func:`d2it_initial_weights`.

``exp`` is the run's ``jaxdit.train.loop.Experiment``; the earlier run is rebuilt from the
config saved in its checkpoint, on the same devices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.config_lib import autoencoder_sections, base_config, editable
from jaxdit.data.pipeline import make_dataset, make_source
from jaxdit.errors import ConfigError
from jaxdit.convert.common import is_diffusers_vae, read_diffusers_dir
from jaxdit.convert.vae import kl_vae_config_from_diffusers, kl_vae_from_diffusers
from jaxdit.models.dvae import fine_downsample
from jaxdit.models.vae import downsample_factor, widen_latent
from jaxdit.train.adversarial import LPIPS_KEY, autoencoder_params
from jaxdit.train.checkpoint import Checkpointer, CheckpointError, load_params


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


def configure_latent_vae(config) -> None:
    """``latent.kind='kl_vae'``: takes the KL-VAE architecture (``config.vae``) and the
    latent size from ``latent.vae_workdir``: a kl_vae training run, or a diffusers
    ``AutoencoderKL`` folder (e.g. Stable Diffusion's or FLUX's VAE; its ``scaling_factor``
    becomes ``latent.scale`` unless that is set, its ``shift_factor`` ``latent.shift``)."""
    workdir = config.latent.vae_workdir
    if is_diffusers_vae(workdir):
        fields = kl_vae_config_from_diffusers(json.loads(
            (Path(workdir) / "config.json").read_text()))
        scale, shift = fields.pop("scale"), fields.pop("shift")
        vae = autoencoder_sections(base_config()).vae
        vae.update(fields)
        if config.latent.scale <= 0:
            config.latent.scale = scale
    elif not os.path.isdir(os.path.join(workdir, "checkpoints")) and "vae" in config:
        return  # a run's saved config: its checkpoints hold the VAE already
    elif not workdir:
        raise ConfigError("latent.kind='kl_vae' needs latent.vae_workdir: the workdir of a "
                          "KL-VAE run (python -m jaxdit.train --config experiments/vae.py:...) "
                          "whose EMA weights encode the images, or a diffusers AutoencoderKL "
                          "folder.")
    else:
        source = saved_config(workdir)
        if source.model.family != "kl_vae":
            raise ConfigError(f"latent.vae_workdir={workdir} trained model.family="
                              f"{source.model.family!r}, not 'kl_vae'.")
        vae, shift = source.vae, 0.0  # a jaxdit KL-VAE's latents are centred by its KL term
    with config.unlocked():  # text-to-image configs have no vae section of their own
        config.vae = vae
        config.latent.shift = shift  # (configs saved before shift existed lack the field)
    config.latent.update(channels=vae.z_channels, downsample=downsample_factor(vae.ch_mult))


def latent_scale(encode, config, num_images: int) -> float:
    """1 / std of ``encode(images)`` (unscaled latents) over the first ``num_images``
    training images of ``config.data``, as the pipeline feeds them (whole square images,
    also when training packs aspect buckets)."""
    n = max(1, min(int(num_images), len(make_source(config.data, "train"))))
    square = editable(config)
    square.data.aspect_buckets = False
    images = next(iter(make_dataset(square, "train", n, repeat=False)))["image"]
    return 1.0 / max(float(jnp.std(encode(jnp.asarray(images)))), 1e-6)


def with_frozen_vae(state, vae_params, scale: float):
    """``state`` with ``frozen_vae`` = ``vae_params`` and ``frozen_latent_scale`` = ``scale``
    (params and EMA)."""
    params = {**state.params,
              "frozen_vae": place_like(state.params["frozen_vae"], vae_params),
              "frozen_latent_scale": place_like(state.params["frozen_latent_scale"], scale)}
    ema = {**state.ema_params, "frozen_vae": jax.tree.map(jnp.copy, params["frozen_vae"]),
           "frozen_latent_scale": jnp.copy(params["frozen_latent_scale"])}
    return state.replace(params=params, ema_params=ema)


def unscaled_encoder(exp, vae_params):
    """Jitted ``images -> latents`` of the model's frozen VAE with weights ``vae_params``
    and latent scale 1 (shifted by ``latent.shift`` if any; only the VAE's params are
    needed)."""
    params = {"frozen_vae": vae_params, "frozen_latent_scale": jnp.ones(())}

    def encode(images):
        out = exp.model.apply({"params": params}, images, method="encode")
        return out[0] if isinstance(out, tuple) else out  # D2iT's is (latents, grain map)
    return jax.jit(encode)


def load_stage1_vae(exp, state):
    """``state`` with the stage-1 DVAE's EMA weights under ``frozen_vae`` and the latent
    scale set to 1 / std of the latents of ``d2it.scale_images`` training images."""
    cfg = exp.config
    stage1_cfg = saved_config(cfg.d2it.vae_workdir)
    stage1_cfg.dvae = editable(cfg.dvae)  # its threshold is resolved already
    previous, step = restore_earlier_run(exp, stage1_cfg, cfg.d2it.vae_workdir)
    weights = autoencoder_params(previous.ema_params)  # without a discriminator / LPIPS
    scale = latent_scale(unscaled_encoder(exp, weights), cfg, cfg.d2it.scale_images)
    print(f"D2iT: DVAE from {cfg.d2it.vae_workdir} (step {step}); latent std {1 / scale:.4f} "
          f"over {cfg.d2it.scale_images} images -> latent scale {scale:.4f}", flush=True)
    return with_frozen_vae(state, weights, scale)


def load_latent_vae(exp, state):
    """``latent.kind='kl_vae'``: ``state`` with the EMA weights of the KL-VAE run in
    ``latent.vae_workdir`` under ``frozen_vae``, and the latent scale ``latent.scale``
    (0: 1 / std of the latents of ``latent.scale_images`` training images)."""
    cfg = exp.config
    workdir = cfg.latent.vae_workdir
    if is_diffusers_vae(workdir):
        weights, origin = diffusers_vae_weights(workdir, state.params["frozen_vae"]), "diffusers"
    else:
        previous, step = restore_earlier_run(exp, saved_config(workdir), workdir)
        weights, origin = autoencoder_params(previous.ema_params), f"step {step}"
    scale = float(cfg.latent.scale)
    if scale <= 0:
        if cfg.data.source == "cached":
            raise ConfigError("latent.scale is unset but the data are cached latents: the "
                              "cache's meta.json must record the scale it encoded with.")
        scale = latent_scale(unscaled_encoder(exp, weights), cfg, cfg.latent.scale_images)
    print(f"Latents: KL-VAE from {workdir} ({origin}), {cfg.latent.channels} channels, "
          f"f{cfg.latent.downsample}, latent scale {scale:.4f}", flush=True)
    return with_frozen_vae(state, weights, scale)


def diffusers_vae_weights(folder: str, expected):
    """KLAutoencoder params converted from a diffusers ``AutoencoderKL`` folder."""
    _, state_dict = read_diffusers_dir(folder)
    return kl_vae_from_diffusers(state_dict, expected)


def load_widened_vae(exp, state):
    """Progressive VAE: ``state`` with the EMA weights of the narrower KL-VAE run in
    ``vae.widen_from``, widened to ``vae.z_channels`` (params and EMA; fresh optimizer)."""
    cfg = exp.config
    source = saved_config(cfg.vae.widen_from)
    if source.model.family != "kl_vae":
        raise ConfigError(f"vae.widen_from={cfg.vae.widen_from} trained model.family="
                          f"{source.model.family!r}, not 'kl_vae'.")
    fields = ("ch", "ch_mult", "num_res_blocks", "attn", "quant_conv")
    if cfg.vae.quant_conv:
        raise ConfigError("vae.widen_from widens VAEs without quant convs (vae.quant_conv).")
    if any(tuple(np.atleast_1d(source.vae.get(k, False))) != tuple(np.atleast_1d(
            cfg.vae.get(k, False))) for k in fields):
        raise ConfigError(f"vae.widen_from={cfg.vae.widen_from}: its vae {fields} must equal "
                          "this run's; only z_channels may grow.")
    previous, step = restore_earlier_run(exp, source, cfg.vae.widen_from)
    wide = widen_latent(jax.device_get(autoencoder_params(previous.ema_params)),
                        cfg.vae.z_channels)
    # This run's own critics (a discriminator, LPIPS) keep their fresh initialisation.
    params = {**state.params, **place_like(autoencoder_params(state.params), wide)}
    print(f"Progressive VAE: {source.vae.z_channels} -> {cfg.vae.z_channels} latent channels "
          f"from {cfg.vae.widen_from} (step {step})", flush=True)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def load_lpips_weights(state, folder: str):
    """``state`` with the LPIPS weights of ``folder`` (``tools/convert_lpips.py``'s output)
    under ``frozen_lpips`` (params and EMA); ``"random"`` keeps the random init (tests)."""
    if folder == "random":
        print("LPIPS: random VGG16 and heads (vae.lpips_weights='random'): a test setting, "
              "not a perceptual distance.", flush=True)
        return state
    if not folder:
        raise ConfigError("vae.lpips_weight > 0 needs vae.lpips_weights: a folder written by "
                          "`python tools/convert_lpips.py --vgg16 <torchvision vgg16 .pth> "
                          "--out <folder>` (or vae.lpips_weight=0 to train without LPIPS).")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state.params[LPIPS_KEY])
    try:
        loaded = load_params(folder, {"lpips": abstract})["lpips"]
    except CheckpointError as e:
        raise ConfigError(f"vae.lpips_weights={folder}: {e}") from None
    print(f"LPIPS: VGG16 + v0.1 heads from {folder}", flush=True)
    return state.replace(params={**state.params, LPIPS_KEY: loaded},
                         ema_params={**state.ema_params,
                                     LPIPS_KEY: jax.tree.map(jnp.copy, loaded)})


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
    * a params-only checkpoint ``{"denoiser": ...}`` (``jaxdit convert``): the
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


def flow_initial_weights(exp, state):
    """A flow (or DRaFT) run's frozen KL-VAE latent space, when ``latent.vae_workdir`` names
    one."""
    if exp.config.latent.kind == "kl_vae" and exp.config.latent.vae_workdir:
        state = load_latent_vae(exp, state)
    return state


def autoencoder_initial_weights(exp, state):
    """An autoencoder run's narrower run to widen (``vae.widen_from``) and its frozen LPIPS
    network's weights (``vae.lpips_weights``) when it has one."""
    if exp.config.vae.widen_from:
        state = load_widened_vae(exp, state)
    if LPIPS_KEY in state.params:
        state = load_lpips_weights(state, exp.config.vae.lpips_weights)
    return state


def d2it_initial_weights(exp, state):
    """D2iT stage 2's frozen stage-1 DVAE (``d2it.vae_workdir``)."""
    if exp.config.d2it.vae_workdir:
        state = load_stage1_vae(exp, state)
    return state
