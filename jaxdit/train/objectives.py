"""Training objectives as plug-ins, one table: ``OBJECTIVES[config.train.objective]``.

Each objective owns its loss, its validation function, its sampler and its config checks,
names the model families it trains and places the weights of earlier runs its
config names into a fresh state. :mod:`jaxdit.train.step` keeps only the optimizer /
EMA / accumulation / skip machinery, :class:`jaxdit.train.loop.Experiment` asks the table
for the validation and sampling functions, :func:`jaxdit.train.checks.validate_config` for
the checks. Adding an objective is one module with those four functions and one row here.

* ``flow``: flow matching on latents (:mod:`jaxdit.train.flow_objective`);
* ``draft``: DRaFT reward fine-tuning of a flow model (:mod:`jaxdit.train.draft`);
* ``autoencoder``: reconstruction (+ KL, LPIPS, PatchGAN) of the autoencoder families
  (:mod:`jaxdit.train.autoencoder`);
* ``d2it``: D2iT's grain and content generators (:mod:`jaxdit.train.d2it`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxdit.errors import ConfigError
from jaxdit.eval.sampling import make_sample_fn
from jaxdit.eval.validation import make_val_loss_fn
from jaxdit.models.registry import (AUTOENCODER_FAMILIES, DENOISER_FAMILIES, condition_from_batch,
                                    family_of)
from jaxdit.train.autoencoder import (autoencoder_loss_fn, check_autoencoder_config,
                                      make_autoencoder_val_fn, make_reconstruction_fn)
from jaxdit.train.d2it import (check_d2it_config, d2it_loss_fn, make_d2it_sample_fn,
                               make_d2it_val_fn)
from jaxdit.train.draft import check_draft_config, draft_loss_fn
from jaxdit.train.flow_objective import check_flow_config, flow_loss_fn
from jaxdit.train.stages import (autoencoder_initial_weights, d2it_initial_weights,
                                 flow_initial_weights)

@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective.

    ``loss(params, model_state, batch, rng, *, model, autoencoder, cfg, step)``
      -> ``(loss, (metrics, new_model_state))`` (``step``: the optimizer step, traced);
    ``validation(model, autoencoder, cfg)`` -> jitted ``(variables, batch, rng)`` -> losses
      over ``eval.t_grid`` (an array) or a dict of named scalars;
    ``sampler(model, autoencoder, cfg)`` -> ``(variables, cond, rng) -> images`` in [-1, 1];
    ``check(config)`` raises :class:`~jaxdit.errors.ConfigError` naming the field;
    ``initial_weights(exp, state)`` -> ``state`` with the weights of earlier runs its config
      names (a frozen VAE, a narrower VAE to widen, LPIPS) placed into a fresh state;
    ``families``: the ``model.family`` values it trains;
    ``reconstructs``: its samples are reconstructions of validation images (no condition);
    ``any_size``: it can sample at sizes other than the training size.
    """
    loss: Callable
    validation: Callable
    sampler: Callable
    check: Callable
    families: tuple[str, ...]
    initial_weights: Callable
    reconstructs: bool = False
    any_size: bool = True


def _flow_loss(params, model_state, batch, rng, *, model, autoencoder, cfg, step):
    del step
    return flow_loss_fn(params, model_state, batch, rng, model=model,
                        autoencoder=autoencoder, cfg=cfg)


def _draft_loss(params, model_state, batch, rng, *, model, autoencoder, cfg, step):
    del step
    return draft_loss_fn(params, model_state, batch, rng, model=model,
                         autoencoder=autoencoder, cfg=cfg, cond=condition_from_batch(batch))


def _autoencoder_loss(params, model_state, batch, rng, *, model, autoencoder, cfg, step):
    del autoencoder  # the model is the autoencoder
    return autoencoder_loss_fn(params, model_state, batch, rng, model=model, cfg=cfg,
                               step=step)


def _d2it_loss(params, model_state, batch, rng, *, model, autoencoder, cfg, step):
    del autoencoder, step  # the DVAE is inside the model (frozen_vae)
    return d2it_loss_fn(params, model_state, batch, rng, model=model, cfg=cfg)


def _flow_sampler(model, autoencoder, cfg, image_shape=None):
    s = cfg.data.image_size
    return make_sample_fn(model, autoencoder, cfg, image_shape or (s, s, 3))


OBJECTIVES = {
    "flow": Objective(
        loss=_flow_loss,
        validation=lambda model, ae, cfg: make_val_loss_fn(model, ae, cfg.eval.t_grid),
        sampler=_flow_sampler, check=check_flow_config, families=DENOISER_FAMILIES,
        initial_weights=flow_initial_weights),
    "draft": Objective(
        loss=_draft_loss,
        validation=lambda model, ae, cfg: make_val_loss_fn(model, ae, cfg.eval.t_grid),
        sampler=_flow_sampler, check=check_draft_config, families=DENOISER_FAMILIES,
        initial_weights=flow_initial_weights),
    "autoencoder": Objective(
        loss=_autoencoder_loss,
        validation=lambda model, ae, cfg: make_autoencoder_val_fn(model),
        sampler=lambda model, ae, cfg: make_reconstruction_fn(model),
        check=check_autoencoder_config, families=AUTOENCODER_FAMILIES,
        initial_weights=autoencoder_initial_weights, reconstructs=True, any_size=False),
    "d2it": Objective(
        loss=_d2it_loss,
        validation=lambda model, ae, cfg: make_d2it_val_fn(model, cfg.eval.t_grid),
        sampler=lambda model, ae, cfg: make_d2it_sample_fn(model, cfg, cfg.data.image_size),
        check=check_d2it_config, families=("d2it",), any_size=False,
        initial_weights=d2it_initial_weights),
}


def objective_for(config) -> Objective:
    """``config.train.objective``'s :class:`Objective`, after checking it trains
    ``config.model.family`` (raises :class:`ConfigError` naming both fields)."""
    name, family = config.train.objective, family_of(config).name  # a known family
    if name not in OBJECTIVES:
        raise ConfigError(f"Unknown train.objective {name!r}; available: {tuple(OBJECTIVES)}.")
    objective = OBJECTIVES[name]
    if family not in objective.families:
        fits = [n for n, o in OBJECTIVES.items() if family in o.families]
        raise ConfigError(f"train.objective={name!r} trains model.family in "
                          f"{objective.families}, not {family!r}; model.family={family!r} "
                          f"trains with train.objective in {tuple(fits)}.")
    return objective
