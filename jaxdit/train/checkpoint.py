"""Orbax checkpoints: train state (params, EMA, optimizer, step, RNG), the Grain iterator
state and the config, in one ``CheckpointManager`` step directory.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. Saves are asynchronous;
``keep`` most recent steps are kept. Restores go straight into the target shardings.
"""
from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxdit.config_lib import with_defaults
from jaxdit.models.stack import relayout_like
from jaxdit.train.checksums import checksums, mismatches
from jaxdit.train.state import path_names


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty or unreadable."""


class IncompatibleCheckpoint(CheckpointError):
    """A readable checkpoint whose parameters do not fit the config's model (another
    depth, width or family): refused, and nothing in the workdir is touched."""


# Config sections whose fields decide the parameter tree; named in an incompatibility.
STRUCTURE_SECTIONS = ("model", "moe", "text", "latent")


def param_shapes(tree) -> dict[str, tuple]:
    """``{"a/b/kernel": shape}`` of the arrays (or array metadata) in ``tree``."""
    return {"/".join(map(str, path_names(path))): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_differences(saved: dict, wanted: dict, limit: int = 3) -> list[str]:
    """Up to ``limit`` readable differences between two :func:`param_shapes` dicts."""
    out = [f"{k} {saved[k]} in the checkpoint, {wanted[k]} in the model"
           for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
    out += [f"{k} missing from the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
    out += [f"{k} only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
    more = len(out) - limit
    return out[:limit] + ([f"{more} more"] if more > 0 else [])


# Parameter paths only jaxdit's layout before the layer stacks (2026-12-03) has: per-layer
# tables outside their blocks, text-encoder layers not grouped in layer modules.
_OLD_LAYOUT = re.compile(r"(^|/)(scale_shift_table_\d+|adaln_(text|image)_\d+|"
                         r"(attn|mlp|ln_attn|ln_mlp)_\d+)/")
OLD_LAYOUT_HINT = ("it was written by jaxdit before 2026-12-03, whose parameter layout "
                   "differs (layer stacks, models/stack.py): sample or continue it with that "
                   "version (git checkout 107451b)")


def config_differences(saved: ml_collections.ConfigDict, config) -> list[str]:
    """``"model.depth 4 in the checkpoint, 6 in the config"`` for each field of
    :data:`STRUCTURE_SECTIONS` that differs."""
    out = []
    for section in STRUCTURE_SECTIONS:
        old, new = saved.get(section, {}), config.get(section, {})
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (
                    list(b) if isinstance(b, (list, tuple)) else b):
                out.append(f"{section}.{key} {_brief(a)} in the checkpoint, {_brief(b)} in "
                           "the config")
    return out


def _brief(value, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (e.g. a long ``text.vocab``)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    words = f", {len(value.split()):,} words" if isinstance(value, str) else ""
    return f"{text[:limit - 5]}...{text[-1]} ({len(text):,} characters{words})"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"No checkpoint directory at {self.directory}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_names=("state", "data", "config", "checksums"))
        self._saving = self._complete = None  # the step in flight, the last one before it

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def check_saves(self) -> None:
        """Raises :class:`CheckpointError` at once when an asynchronous save has failed (a
        full disk, a lost mount), naming the step, the cause and the last complete one."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            cause = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise CheckpointError(
                f"Saving checkpoint step {self._saving} in {self.directory} failed: {cause}. "
                f"The last complete checkpoint is "
                f"{'step ' + str(self._complete) if self._complete is not None else 'none'}; "
                "fix the cause (e.g. free disk space) and rerun the same command to resume "
                "from it.") from e

    def save(self, step: int, state, data_iterator=None, config=None):
        self.check_saves()  # the previous save finished, or its failure is reported now
        self._complete, self._saving = self.latest_step(), step
        items = {"state": ocp.args.StandardSave(state),
                 "checksums": ocp.args.JsonSave({"state": checksums(state)})}
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
        if os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
            items["checksums"] = ocp.args.JsonRestore()  # absent in saves before 2026-12-04
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointError(f"Could not restore step {step} from {self.directory}: {e}") from e
        if "checksums" in items:
            bad = mismatches(out["checksums"]["state"], out["state"])
            if bad:
                raise CheckpointError(
                    f"Step {step} in {self.directory} is damaged: {', '.join(bad)} read back "
                    "with other values than were saved (checksum mismatch).")
        return out["state"], step

    def saved_param_shapes(self, step: int) -> dict[str, tuple] | None:
        """:func:`param_shapes` of step ``step``'s saved params, or None when its metadata
        cannot be read (damage: the restore then fails and says why)."""
        path = os.path.join(self.directory, str(step), "state")
        try:
            meta = ocp.StandardCheckpointer().metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            return param_shapes(tree["params"])
        except Exception:  # pylint: disable=broad-except
            return None

    def check_compatible(self, step: int, abstract_state, config=None) -> None:
        """Raises :class:`IncompatibleCheckpoint` when step ``step`` holds params of
        another shape or tree than ``abstract_state``'s, naming the config fields and the
        parameters that differ; a step whose metadata is unreadable passes (see
        :meth:`saved_param_shapes`)."""
        saved = self.saved_param_shapes(step)
        if saved is None:
            return
        wanted = param_shapes(abstract_state.params)
        if saved == wanted:
            return
        what = []
        if config is not None:
            try:
                what = config_differences(self.restore_config(step), config)
            except Exception:  # pylint: disable=broad-except
                what = []
        what = what or shape_differences(saved, wanted)
        if any(_OLD_LAYOUT.search(k) for k in saved):
            what.append(OLD_LAYOUT_HINT)
        advice = (" Resume it with its own config (config.json beside checkpoints/), or start "
                  "a new --workdir (with --config.train.init_params_from=<this workdir> to start "
                  "from its weights when the shapes fit).") if config is not None else ""
        raise IncompatibleCheckpoint(
            f"The checkpoint at step {step} in {self.directory} does not fit "
            f"{'this config' if config is not None else 'its own config'}'s model "
            f"({'; '.join(what)}). Nothing was changed.{advice}")

    def restore_latest_valid(self, abstract_state, data_iterator=None, config=None,
                             move_aside: bool = True):
        """Restores the newest readable step. Every step is first checked against the
        model (:meth:`check_compatible`: a mismatch is refused, nothing touched). A step
        that fails to restore (corrupt or partial files, a checksum mismatch) is moved aside
        to ``<step>.corrupt`` with a warning, but only once an older step has restored:
        without a good copy nothing is moved. ``move_aside=False`` (sampling, evaluation)
        only warns. Returns ``(state, step)``."""
        unreadable = []
        for step in sorted(self.all_steps(), reverse=True):
            self.check_compatible(step, abstract_state, config)
            try:
                state, step = self.restore(abstract_state, data_iterator, step)
            except CheckpointError as e:
                unreadable.append((step, e))
                continue
            for bad, e in unreadable:
                if move_aside:
                    msg = (f"checkpoint step {bad} is unreadable; moved it to "
                           f"{self._move_aside(bad)} and resumed from step {step}.")
                else:
                    msg = (f"checkpoint step {bad} is unreadable or damaged; using step "
                           f"{step} (nothing was moved).")
                msg = f"WARNING: {msg} Cause: {str(e)[:300]}"
                logging.info(msg)  # printed once below; INFO keeps it in log files
                print(msg, flush=True)
            return state, step
        causes = "; ".join(f"step {st}: {str(e)[:200]}" for st, e in unreadable)
        raise CheckpointError(f"No readable checkpoint in {self.directory}; nothing was moved "
                              f"or deleted ({causes}).")

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

    def close(self, raise_errors: bool = True):
        """Waits for the save in flight and closes. Its failure raises
        :class:`CheckpointError` (one line), or with ``raise_errors=False`` (the run is
        stopping for another error) becomes one warning."""
        try:
            self.manager.wait_until_finished()
            self.check_saves()
        except Exception as e:  # pylint: disable=broad-except
            if raise_errors:
                raise e if isinstance(e, CheckpointError) else CheckpointError(
                    f"Saving checkpoint step {self._saving} in {self.directory} failed: "
                    f"{str(e)[:300]}") from e
            logging.warning("The checkpoint save in flight failed while stopping: %s",
                            str(e)[:300])
        finally:
            try:
                self.manager.close()
            except Exception:  # pylint: disable=broad-except
                if raise_errors:
                    raise


def save_params(directory: str, params) -> None:
    """Writes a params-only Orbax checkpoint (a pytree of arrays) to ``directory``."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), params)
    ckptr.wait_until_finished()


def read_arrays(path: str):
    """The pytree saved at ``path`` (one Orbax pytree item) as host numpy arrays, in its
    own structure, whatever the model."""
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def load_params(directory: str, abstract_params):
    """Restores a params-only checkpoint into ``abstract_params`` (shapes, dtypes and
    shardings). The blocks may be stored scanned or unrolled whatever the model's
    ``scan_layers`` (a converter's output fits both); a tree that does not match raises
    :class:`CheckpointError` naming the differing leaves."""
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise CheckpointError(f"No params checkpoint at {path}.")
    try:
        host = read_arrays(path)
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"Could not read the params checkpoint at {path}: {e}") from e
    try:
        host = relayout_like(host, abstract_params)
    except ValueError as e:
        raise CheckpointError(f"Params at {path} do not fit this model: {e}") from e
    problems = shape_differences(param_shapes(host), param_shapes(abstract_params), limit=8)
    if problems:
        raise CheckpointError(f"Params at {path} do not fit this model: "
                              + "; ".join(problems))
    return jax.tree.map(lambda a, want: jax.device_put(a.astype(want.dtype), want.sharding),
                        host, abstract_params)
