"""``load_experiment``: a trained run's model and weights for sampling and evaluation.

Reads the run's own config from its checkpoint, builds the :class:`Experiment` on one
device and restores the train state. Without an explicit step it uses the newest
checkpoint that restores intact and falls back past damaged ones with a warning, as the
train loop does, but read-only: nothing in the workdir is moved or deleted.
"""
from __future__ import annotations

import os
from typing import Callable

import jax

from jaxdit.train.checkpoint import CheckpointError, Checkpointer, IncompatibleCheckpoint
from jaxdit.train.health import report
from jaxdit.train.loop import Experiment


def _for_one_device(config) -> None:
    config.mesh = {"data": 1}
    config.train.batch_size = max(1, config.train.batch_size // jax.process_count())
    config.optim.grad_accum = 1


def load_experiment(workdir: str, step: int | None = None,
                    adjust: Callable | None = None):
    """``(exp, state, step)`` of the run in ``workdir`` at ``step`` (None: the newest
    intact checkpoint). ``adjust(config)`` edits the restored config in place before the
    model is built (sampler overrides, argument checks that may raise).

    Raises :class:`CheckpointError` when no checkpoint (or not ``step``) restores, naming
    each cause; :class:`IncompatibleCheckpoint` when one does not fit its own config."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        steps = sorted(ckpt.all_steps(), reverse=True) if step is None else [step]
        if step is not None and step not in ckpt.all_steps():
            raise CheckpointError(f"No checkpoint step {step} in {ckpt.directory}; it has "
                                  f"steps {sorted(ckpt.all_steps())}.")
        if not steps:
            raise CheckpointError(f"No checkpoints in {ckpt.directory}: train first "
                                  "(python -m jaxdit.train --workdir ...).")
        failures = []
        for candidate in steps:
            try:
                exp, state = _restore(ckpt, candidate, adjust)
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                if step is not None:  # asked for by number: its own cause, not another step
                    raise
                failures.append((candidate, e))
                continue
            for bad, e in failures:
                report(f"WARNING: checkpoint step {bad} is unreadable or damaged; using step "
                       f"{candidate} (nothing was moved). Cause: {str(e)[:300]}")
            return exp, state, candidate
        causes = "; ".join(f"step {s}: {str(e)[:200]}" for s, e in failures)
        raise CheckpointError(f"No checkpoint in {ckpt.directory} restores ({causes}).")
    finally:
        ckpt.close()


def _restore(ckpt: Checkpointer, step: int, adjust):
    try:
        config = ckpt.restore_config(step)
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"its config cannot be read: {e}") from e
    _for_one_device(config)
    if adjust is not None:
        adjust(config)
    exp = Experiment(config, devices=jax.devices()[:1])
    abstract = exp.abstract_state()
    ckpt.check_compatible(step, abstract)
    with exp.context():
        state, _ = ckpt.restore(abstract, step=step)
    return exp, state
