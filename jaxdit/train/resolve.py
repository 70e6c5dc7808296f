"""Resolve once: the user's config plus what it points at -> one complete, frozen config.

``resolve_config(config, mesh)`` is the only place where a config is completed from
outside it, in this order:

1. a rerun in ``workdir`` keeps the word vocabulary its run started with (``config.json``);
2. ``data.source='cached'``: text and latent settings from the feature cache's ``meta.json``;
3. ``latent.kind='kl_vae'``: the VAE architecture and latent size from ``latent.vae_workdir``;
4. the checks that need the mesh (:func:`jaxdit.train.checks.validate_config`);
5. a trainable text encoder's vocabulary from the training captions, and its size;
6. a pretrained text encoder's width from its folder;
7. D2iT stage 2: the DVAE architecture and grain threshold from ``d2it.vae_workdir``;
8. DVAE / D2iT: the grain threshold from the data (``dvae.threshold < 0``).

It works on a copy and returns an ``ml_collections.FrozenConfigDict``: the caller's config
is left as it was, and nothing after this step can change the run's config (an attempt
raises). The train loop records the result in ``config.json`` and every checkpoint.
Each step is a no-op on a config it already completed, so a run's saved config resolves to
itself without reading the data again (its data folder may be gone when sampling).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_collections

from jaxdit.config_lib import editable, is_resolved
from jaxdit.data.cache import configure_from_cache
from jaxdit.data.grains import resolve_threshold
from jaxdit.data.pipeline import make_tokenizer
from jaxdit.data.vocabulary import needs_vocabulary, resolve_vocabulary
from jaxdit.models.pretrained_text import pretrained_text_width
from jaxdit.train.checks import validate_config
from jaxdit.train.stages import configure_from_vae, configure_latent_vae


def _main_process_print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def resolve_config(config, mesh, workdir: str | None = None,
                   log: Callable[[str], None] = _main_process_print
                   ) -> ml_collections.FrozenConfigDict:
    """The complete, frozen config of ``config`` on ``mesh`` (see the module docstring).
    ``workdir``: the run's folder, whose ``config.json`` (if any) keeps the vocabulary.
    ``log`` receives the vocabulary coverage line. A resolved config is returned as is.
    Raises :class:`~jaxdit.errors.ConfigError` (and the data / cache / checkpoint errors of
    the steps) naming the field or file at fault."""
    if is_resolved(config):
        return config
    config = editable(config)
    if workdir:
        inherit_vocabulary(config, workdir)
    if config.data.source == "cached":
        configure_from_cache(config)
    if config.latent.kind == "kl_vae":
        configure_latent_vae(config)
    validate_config(config, mesh)
    resolve_vocabulary(config, log=log)
    if config.text.kind == "trainable":
        config.text.vocab_size = make_tokenizer(config).vocab_size
    if config.text.kind == "pretrained":
        config.text.width = pretrained_text_width(config.text)
    family = config.model.family
    if family == "d2it" and config.d2it.vae_workdir:
        configure_from_vae(config)
    if family in ("dvae", "d2it"):
        resolve_threshold(config)
    return ml_collections.FrozenConfigDict(config)


def inherit_vocabulary(config, workdir: str) -> None:
    """A rerun in ``workdir`` keeps the word vocabulary its run was started with (recorded
    in its ``config.json``), even when the captions have changed since."""
    path = os.path.join(workdir, "config.json")
    if not (needs_vocabulary(config) and os.path.isfile(path)):
        return
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f).get("text", {}).get("vocab", "")
    except (OSError, ValueError):
        return  # an unreadable config.json: the checkpoint's own config decides on restore
    if vocab:
        config.text.vocab = vocab
