"""``load_experiment``: a trained run's model and weights for sampling and evaluation;
``trained_weights``: a frozen autoencoder's, for the feature cache.

Reads the run's own config from its checkpoint, builds the :class:`Experiment` on one
device and restores the train state. Without an explicit step it uses the newest
checkpoint that restores intact and falls back past damaged ones with a warning, as the
train loop does, but read-only: nothing in the workdir is moved or deleted.
"""
from __future__ import annotations

import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.config_lib import base_config
from jaxdit.convert.common import is_diffusers_vae
from jaxdit.models.registry import build_autoencoder
from jaxdit.train.adversarial import autoencoder_params
from jaxdit.train.checkpoint import CheckpointError, Checkpointer
from jaxdit.train.loop import Experiment
from jaxdit.train.stages import configure_latent_vae, diffusers_vae_weights


def _for_one_device(config) -> None:
    config.mesh = {"data": 1}
    config.train.batch_size = max(1, config.train.batch_size // jax.process_count())
    config.optim.grad_accum = 1


def load_experiment(workdir: str, step: int | None = None,
                    adjust: Callable | None = None):
    """``(exp, state, step)`` of the run in ``workdir`` at ``step`` (None: the newest
    intact checkpoint, as :meth:`Checkpointer.restore_latest_valid` finds it, read-only).
    ``adjust(config)`` edits the run's config in place before the model is built (sampler
    overrides, argument checks that may raise).

    Raises :class:`CheckpointError` when no checkpoint (or not ``step``) restores, naming
    each cause; :class:`IncompatibleCheckpoint` when one does not fit its own config."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoints in {ckpt.directory}: train first "
                                  "(python -m jaxdit.train --workdir ...).")
        if step is not None and step not in steps:
            raise CheckpointError(f"No checkpoint step {step} in {ckpt.directory}; it has "
                                  f"steps {sorted(steps)}.")
        exp = Experiment(_run_config(ckpt, [step] if step is not None else steps, adjust),
                         devices=jax.devices()[:1])
        abstract = exp.abstract_state()
        with exp.context():
            if step is not None:
                ckpt.check_compatible(step, abstract)
                state, _ = ckpt.restore(abstract, step=step)
                return exp, state, step
            state, found = ckpt.restore_latest_valid(abstract, move_aside=False)
        return exp, state, found
    finally:
        ckpt.close()


def _run_config(ckpt: Checkpointer, steps: list[int], adjust):
    """The config saved with the newest of ``steps`` whose config reads, made for one
    device and ``adjust``-ed."""
    causes = []
    for step in sorted(steps, reverse=True):
        try:
            config = ckpt.restore_config(step)
            break
        except Exception as e:  # pylint: disable=broad-except
            causes.append(f"step {step}: {str(e)[:200]}")
    else:
        raise CheckpointError(f"No readable config in {ckpt.directory} ({'; '.join(causes)}).")
    _for_one_device(config)
    if adjust is not None:
        adjust(config)
    return config


def trained_weights(workdir: str):
    """``(model, EMA params)`` (an autoencoder's without its discriminator / LPIPS) of the
    newest intact checkpoint of the training run in
    ``workdir`` (read-only, on one device); for a diffusers ``AutoencoderKL`` folder, the
    converted KL-VAE."""
    if not is_diffusers_vae(workdir):
        exp, state, _ = load_experiment(workdir)
        return exp.model, autoencoder_params(state.ema_params)  # without its critics
    config = base_config()
    config.latent.update(kind="kl_vae", vae_workdir=workdir)
    configure_latent_vae(config)
    model = build_autoencoder(config, "kl_vae")
    images = jnp.zeros((1, 8, 8, 3))
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, False)))
    return model, diffusers_vae_weights(workdir, shapes["params"])
