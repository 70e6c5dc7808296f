"""Run health: non-finite values and exploding parameters, found and reported.

Three lines of defence, from the device outwards:

1. ``train_step`` keeps an update only if the loss, the gradient norm *and* the new
   params / EMA / optimizer / model state are all finite (:func:`all_finite`); otherwise the
   old state is kept and ``skipped`` is 1.
2. The loop watches the step metrics (:class:`SkipMonitor`, :class:`ParamNormMonitor`)
   without a host sync per step: skips are reported, a streak stops the run, and a
   parameter norm that grows past ``train.param_norm_warn_ratio`` times its value at the
   start of the run is reported (a warning and ``param_norm_ratio`` in the metrics).
3. Nothing non-finite is written: :func:`nonfinite_paths` is checked before every
   checkpoint save and sample grid, and a run that ends non-finite raises
   :class:`TrainingDiverged` naming the first bad step and the last good checkpoint.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.train.state import path_names

log = logging.getLogger("jaxdit")


class TrainingDiverged(FloatingPointError):
    """The run cannot go on (or ended) with non-finite values; the message says where."""


def _inexact(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)


def report(msg: str):
    """A warning for the person running the job: printed once, on stdout (also in the
    ``jaxdit`` log at INFO, for log files)."""
    log.info(msg)
    print(msg, flush=True)


def all_finite(tree) -> jax.Array:
    """Scalar bool: every floating-point leaf of ``tree`` is finite (integer leaves such as
    step counts and RNG keys are ignored). Traceable. ``x * 0`` is 0 where ``x`` is finite
    and NaN where it is not, so one sum of it per leaf says whether the leaf is finite and
    can never overflow; the sums add to one scalar (a per-leaf ``all(isfinite)`` stacked
    into a vector took the tiny train step's compile from 9 s to 82 s on the CPU)."""
    sums = [jnp.sum(x.astype(jnp.float32) * 0.0) for x in jax.tree.leaves(tree) if _inexact(x)]
    return jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)


def nonfinite_paths(tree, limit: int = 5) -> list[str]:
    """Key paths (``params/denoiser/block_1/moe/w1``) of up to ``limit`` floating-point
    leaves that hold a NaN or Inf; empty when the tree is finite. Syncs with the device
    once (a scalar per leaf)."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _inexact(x)]
    if not flat:
        return []
    ok = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in flat])
    bad = [p for (p, _), good in zip(flat, ok) if not good]
    return ["/".join(map(str, path_names(p))) for p in bad[:limit]]


def keep_if(ok, new, old):
    """``new`` if the scalar ``ok`` is true, else ``old`` (one ``lax.cond`` over the trees)."""
    return jax.lax.cond(ok, lambda: new, lambda: old)


class SkipMonitor:
    """Counts updates skipped for a non-finite loss, gradient or update
    (``metrics["skipped"]``) on the device, without a host sync per step, and remembers the
    first skipped step. :meth:`check` (at log steps) reports new skips and stops the run
    after ``train.max_consecutive_skips`` in a row."""

    def __init__(self, cfg):
        self.limit = int(cfg.train.max_consecutive_skips)
        self.total = self.run = jnp.zeros((), jnp.float32)
        self.first = jnp.zeros((), jnp.int32)  # 0: none yet
        self.reported = 0
        self.last_good_checkpoint = None  # set by the loop when a save is taken

    def add(self, metrics, step: int = 0):
        skipped = metrics.get("skipped", jnp.zeros(()))
        self.total = self.total + skipped
        self.run = (self.run + skipped) * skipped
        self.first = jnp.where((self.first == 0) & (skipped > 0), step, self.first)

    def state(self) -> tuple[int, int, int]:
        """``(total skipped, current streak, first skipped step or 0)`` (one host sync)."""
        return tuple(int(x) for x in jax.device_get((self.total, self.run, self.first)))

    def where(self) -> str:
        """`` first non-finite step N; last good checkpoint: step M`` for messages."""
        first = self.state()[2]
        ck = (f"step {self.last_good_checkpoint}" if self.last_good_checkpoint is not None
              else "none")
        return (f"first non-finite step {first if first else 'unknown'}; "
                f"last good checkpoint: {ck}")

    def check(self, step: int):
        total, run, _ = self.state()
        if total > self.reported:
            msg = (f"WARNING: {total - self.reported} update(s) skipped for a non-finite loss, "
                   f"gradient or update up to step {step} ({total} in this run).")
            report(msg)
            self.reported = total
        if self.limit and run >= self.limit:
            raise TrainingDiverged(
                f"{run} consecutive steps up to {step} had a non-finite loss, gradient or "
                f"update; stopping (train.max_consecutive_skips={self.limit}); "
                f"{self.where()}. Lower optim.lr or check the data, then rerun (it resumes "
                "from that checkpoint).")


class ParamNormMonitor:
    """Reports a parameter norm that explodes: above ``train.param_norm_warn_ratio`` times
    its value at the start of the run (0 turns it off). Adds ``param_norm_ratio`` to the
    logged scalars and warns once per order of magnitude it grows."""

    def __init__(self, cfg, params):
        self.limit = float(cfg.train.param_norm_warn_ratio)
        self.start = float(jax.device_get(jnp.sqrt(sum(
            jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params)))))
        self.warned_at = 0.0

    def ratio(self, norm: float) -> float:
        return norm / self.start if self.start > 0 else 1.0

    def exploded(self, norm: float) -> bool:
        return bool(self.limit) and np.isfinite(norm) and self.ratio(norm) > self.limit

    def check(self, step: int, scalars: dict, saving: bool = False) -> dict:
        """Returns ``{"param_norm_ratio": r}`` for the logs; warns when the norm exploded
        (again when it grew another 10x since the last warning, and before every save)."""
        norm = float(scalars.get("param_norm", np.nan))
        if not np.isfinite(norm):
            return {}
        r = self.ratio(norm)
        if self.exploded(norm) and (saving or r > 10 * self.warned_at):
            what = f" (checkpoint step {step} is due)" if saving else ""
            report(f"WARNING: parameter norm {norm:.3g} at step {step} is {r:.3g}x its value "
                   f"at the start of the run ({self.start:.3g}; train.param_norm_warn_ratio="
                   f"{self.limit:g}): the run is likely diverging, consider a lower "
                   f"optim.lr{what}.")
            self.warned_at = max(self.warned_at, r)
        return {"param_norm_ratio": r}
