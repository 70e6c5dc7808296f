"""Orbax checkpoints: train state (params, EMA, optimizer, step, RNG), the Grain iterator
state and the config, in one ``CheckpointManager`` step directory.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. Saves are asynchronous;
``keep`` most recent steps are kept. Restores go straight into the target shardings.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import ml_collections
import orbax.checkpoint as ocp

from jaxdit.config_lib import with_defaults


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty or unreadable."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"No checkpoint directory at {self.directory}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config=None):
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores ``(state, step)``; the iterator (if given) is restored in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointError(f"Could not restore step {step} from {self.directory}: {e}") from e
        return out["state"], step

    def restore_latest_valid(self, abstract_state, data_iterator=None):
        """Restores the newest readable step. A step that fails to restore (corrupt or
        partial files) is moved aside to ``<step>.corrupt`` with a warning, nothing is
        deleted, and the next older step is tried. Returns ``(state, step)``."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(abstract_state, data_iterator, step)
            except CheckpointError as e:
                aside = self._move_aside(step)
                msg = (f"WARNING: checkpoint step {step} is unreadable; moved it to {aside} "
                       f"and trying an older step. Cause: {str(e)[:300]}")
                logging.warning(msg)
                print(msg, flush=True)
        raise CheckpointError(f"No readable checkpoint in {self.directory}.")

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.corrupt", 1
        while os.path.exists(dst):
            dst, n = f"{src}.corrupt{n}", n + 1
        os.rename(src, dst)
        self.manager.reload()
        return dst

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return with_defaults(ml_collections.ConfigDict(out["config"]))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(directory: str, params) -> None:
    """Writes a params-only Orbax checkpoint (a pytree of arrays) to ``directory``."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), params)
    ckptr.wait_until_finished()


def load_params(directory: str, abstract_params):
    """Restores a params-only checkpoint into ``abstract_params`` (shapes, dtypes and
    shardings); a tree that does not match raises :class:`CheckpointError` with the cause."""
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise CheckpointError(f"No params checkpoint at {path}.")
    try:
        return ocp.StandardCheckpointer().restore(path, abstract_params)
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"Could not load params from {path} into this model: {e}") from e

