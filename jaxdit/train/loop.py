"""The one train loop for every model family.

``train_and_evaluate(config, workdir)``: mesh -> model -> data -> sharded state (or resume
from the latest checkpoint) -> jitted ``train_step`` -> periodic validation loss, sample
grids and checkpoints. Writes into ``workdir``: ``checkpoints/``, ``samples/``, ``tb/``,
``metrics.jsonl`` and ``config.json``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxdit.data import prompts, shapes
from jaxdit.data.cache import CachedSource, cached_example
from jaxdit.data.pipeline import make_dataset, make_source, make_tokenizer
from jaxdit.eval.sampling import encode_captions, save_grid, write_captions
from jaxdit.models.registry import (build_model, example_inputs, family_of,
                                    persistent_variables)
from jaxdit.convert.text import load_pretrained_text, with_pretrained_text
from jaxdit.models.vae import PrecomputedLatents, make_autoencoder
from jaxdit.parallel.distributed import PeerSynced
from jaxdit.parallel.mesh import LOGICAL_RULES, batch_sharding, make_mesh
from jaxdit.train.checkpoint import Checkpointer
from jaxdit.train.health import (ParamNormMonitor, SkipMonitor, TrainingDiverged,
                                 nonfinite_paths, report)
from jaxdit.train.metrics import MetricWriter, Progress
from jaxdit.train.adversarial import (DISC_KEY, init_critics, uses_discriminator,
                                      uses_lpips)
from jaxdit.train.objectives import OBJECTIVES
from jaxdit.train.optimizers import make_optimizer
from jaxdit.train.resolve import resolve_config
from jaxdit.train.stages import init_params
from jaxdit.train.state import (abstract_state, count_params, create_train_state,
                                 state_shardings)
from jaxdit.train.step import train_step
from jaxdit.train.workdir_lock import WorkdirLock

log = logging.getLogger("jaxdit")


class Experiment:
    """Everything built from a config: mesh, model, optimizer, jitted step and samplers."""

    def __init__(self, config, devices=None, workdir: str | None = None):
        """``config``: a user's config (resolved here, see :mod:`jaxdit.train.resolve`;
        ``workdir`` keeps a rerun's vocabulary) or an already resolved one."""
        self.mesh = make_mesh(dict(config.mesh), devices)
        self.config = config = resolve_config(config, self.mesh, workdir)
        self.tokenizer = make_tokenizer(config)
        family = family_of(config)
        self.model = build_model(config, self.tokenizer.null_id)
        # Autoencoder families are the model; D2iT holds its DVAE inside (frozen_vae).
        own_vae = family.role != "denoiser"
        self.autoencoder = None if own_vae else make_autoencoder(config.latent, self.model)
        if config.data.source == "cached":
            self.autoencoder = PrecomputedLatents(self.autoencoder)
        critics = config.train.objective == "autoencoder" and (
            uses_discriminator(config.vae) or uses_lpips(config.vae))
        self.tx, self.schedule = make_optimizer(
            config.optim, config.train.steps,
            frozen=(config.text.kind == "pretrained" or family.frozen_parts
                    or config.latent.kind == "kl_vae" or critics),
            own=(DISC_KEY,) if critics and uses_discriminator(config.vae) else ())
        inputs = example_inputs(config)

        def init_variables(rng):
            variables = persistent_variables(self.model.init(rng, *inputs))
            if critics:  # the autoencoder's LPIPS / discriminator beside its own params
                extra = init_critics(jax.random.fold_in(rng, 1), config.vae, inputs[0])
                variables["params"] = {**variables["params"], **extra}
            return variables
        self.init_variables = init_variables

    @functools.cached_property
    def state_sh(self):
        """TrainState of ``NamedSharding``s (derived with ``eval_shape``, nothing allocated)."""
        return state_shardings(self.init_variables, self.tx, self.mesh)

    def create_state(self):
        """A fresh TrainState; a pretrained text encoder's weights are read from its folder
        and placed over the random init (params and EMA), then the objective's earlier-run
        weights (``Objective.initial_weights``: a frozen VAE, a VAE to widen, LPIPS)."""
        state, _ = create_train_state(self.init_variables, self.tx, self.mesh, self.config.seed,
                                      shardings=self.state_sh)
        if self.config.text.kind == "pretrained":
            weights = load_pretrained_text(
                self.config.text, state.params["text_encoder"]["frozen_encoder"])
            state = state.replace(params=with_pretrained_text(state.params, weights),
                                  ema_params=with_pretrained_text(state.ema_params, weights))
        return self.objective.initial_weights(self, state)

    def abstract_state(self):
        """Shape/sharding tree of the state, for restoring a checkpoint into."""
        return abstract_state(self.state_sh, self.init_variables, self.tx)

    def batch_shardings(self, batch):
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def jit_train_step(self, example_batch):
        step = functools.partial(train_step, model=self.model, autoencoder=self.autoencoder,
                                 tx=self.tx, schedule=self.schedule, cfg=self.config)
        return PeerSynced(jax.jit(step, in_shardings=(self.state_sh,
                                                      self.batch_shardings(example_batch)),
                                  out_shardings=(self.state_sh, None), donate_argnums=(0,)),
                          "train_step")

    def to_global(self, host_batch):
        """Host-local numpy batch -> global ``jax.Array``s sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, np.ndim(v)),
                                                          np.asarray(v))
                for k, v in host_batch.items()}

    @functools.cached_property
    def objective(self):
        """The :class:`~jaxdit.train.objectives.Objective` of ``train.objective``."""
        return OBJECTIVES[self.config.train.objective]

    @functools.cached_property
    def val_loss_fn(self):
        """Jitted ``(variables, batch, rng)`` -> losses over ``eval.t_grid`` (an array), or
        a dict of named scalars / an array under ``"loss"``."""
        return PeerSynced(self.objective.validation(self.model, self.autoencoder,
                                                    self.config), "validation")

    @functools.cached_property
    def sample_fn(self):
        """``(variables, cond, rng) -> images``: samples (or reconstructions of
        ``{"image"}``; D2iT: image | grain map) at the training size."""
        return PeerSynced(self.objective.sampler(self.model, self.autoencoder, self.config),
                          "sampler")

    def context(self):
        """Mesh + logical-axis-rules context every jitted call runs under."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
        return stack


def state_variables(state, ema: bool = True):
    """Flax variables for ``model.apply``: EMA (default) or raw params plus model state."""
    return {"params": state.ema_params if ema else state.params, **state.model_state}


def evaluate(exp: Experiment, state, step: int, writer: MetricWriter):
    cfg = exp.config
    per_host = cfg.train.batch_size // jax.process_count()
    val_ds = make_dataset(cfg, "val", per_host, process_index=jax.process_index(),
                          process_count=jax.process_count(), repeat=True)
    fn = exp.val_loss_fn
    it = iter(val_ds)
    outs = []
    for i in range(cfg.train.val_batches):
        batch = exp.to_global(next(it))
        out = fn(state_variables(state), batch, jax.random.PRNGKey(10_000 + i))
        outs.append(jax.device_get(out if isinstance(out, dict) else {"loss": out}))
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *outs)
    scalars = {f"val/{k}": float(v) for k, v in mean.items() if np.ndim(v) == 0}
    if "loss" in mean and np.ndim(mean["loss"]) == 1:  # flow losses over eval.t_grid
        total = mean["loss"]
        scalars.update({"val/loss": float(total.mean()),
                        **{f"val/loss_t{t:.2f}": float(v)
                           for t, v in zip(cfg.eval.t_grid, total)}})
    writer.write(step, scalars)
    return scalars


def validation_captions(config, n: int) -> list[str]:
    source = make_source(config.data, "val")
    return [source[i]["caption"] for i in range(min(n, len(source)))]


def validation_images(config, n: int) -> tuple[list[str], np.ndarray]:
    """Captions and images ``(n, S, S, 3)`` in [-1, 1] of the first ``n`` validation
    examples, normalised as the pipeline does."""
    source = make_source(config.data, "val")
    recs = [source[i] for i in range(min(n, len(source)))]
    images = np.stack([r["image"] for r in recs]).astype(np.float32) / 127.5 - 1.0
    return [r["caption"] for r in recs], images


def label_names(config, labels) -> list[str]:
    """Readable class names (the shapes data's "a red circle", else "class <i>")."""
    if config.data.source == "shapes":
        return [shapes.class_name(i) for i in labels]
    return [f"class {int(i)}" for i in labels]


def sample_condition(exp: Experiment, captions=None, labels=None, n: int | None = None):
    """``(names, cond)`` to sample: captions (text models; default the first ``n``
    validation captions) or class labels (class-conditional models; default 0, 1, 2, ...);
    ``n`` defaults to ``sampler.num_samples``."""
    cfg = exp.config
    n = cfg.sampler.num_samples if n is None else n
    if exp.objective.reconstructs:  # reconstructions of validation images
        captions, images = validation_images(cfg, n)
        return captions, {"image": images}
    if cfg.text.kind == "none":
        labels = list(labels) if labels is not None else [i % cfg.model.num_classes
                                                          for i in range(n)]
        return label_names(cfg, labels), {"label": np.asarray(labels, np.int32)}
    if cfg.text.kind == "precomputed":
        return cached_condition(cfg, n, captions)
    captions = captions or validation_captions(cfg, n)
    prompted = [prompts.apply_template(c, cfg.data.sample_system_prompt) for c in captions]
    return captions, encode_captions(exp.tokenizer, prompted, cfg.text.max_len)


def cached_condition(cfg, n: int, captions=None):
    """Precomputed text features have no encoder to run: sample the first ``n`` validation
    examples of the feature cache (their captions are in the cache)."""
    if cfg.data.source != "cached":
        raise ValueError("Sampling with text.kind='precomputed' takes its text features from "
                         "a feature cache: set data.source='cached'.")
    if captions:
        raise ValueError("With cached text features, samples use the cache's validation "
                         "captions; free captions need the text encoder (text.kind="
                         "'pretrained').")
    src = CachedSource(cfg.data.val_cache_dir or cfg.data.cache_dir)
    recs = [src[i] for i in range(min(n, len(src)))]
    examples = [cached_example(r) for r in recs]  # as training reads them
    cond = {k: np.stack([e[k] for e in examples])
            for k in ("text_tokens", "text_mask", "text_pooled")}
    return [r["caption"] for r in recs], cond


def write_samples(exp: Experiment, state, step: int, workdir: str, captions=None,
                  labels=None) -> str:
    """Samples ``captions`` / ``labels`` (see :func:`sample_condition`) with the EMA weights
    and writes ``samples/step_<step>.png`` plus the captions or class names beside it.
    Returns its path, or None (with a warning) when the samples are not finite."""
    cfg = exp.config
    captions, cond = sample_condition(exp, captions, labels)
    images = exp.sample_fn(state_variables(state), {k: jnp.asarray(v) for k, v in cond.items()},
                           jax.random.PRNGKey(cfg.sampler.seed))
    if jax.process_count() > 1:  # every host samples (collectives); the first one writes
        images = multihost_utils.process_allgather(images, tiled=True)
    images = np.asarray(images)
    if not np.isfinite(images).all():  # a grid of clipped NaNs would look like a result
        report(f"WARNING: samples at step {step} are not finite "
               f"({int((~np.isfinite(images)).sum())} values); no sample grid written.")
        return None
    cols = int(np.ceil(np.sqrt(len(captions))))
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    if jax.process_index() == 0:
        save_grid(images, path, cols=cols)
        write_captions(captions, path.replace(".png", ".txt"), cols)
    return path


class PreemptionGuard:
    """Turns SIGTERM (preemption notices on TPU VMs / GPU schedulers) into a flag the loop
    checks after every step: it saves a checkpoint and returns instead of dying. On several
    hosts every process must stop at the same step, so the flag is combined across hosts
    (an all-reduce, every ``sync_every`` steps)."""

    def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
        self.signals, self.sync_every = signals, sync_every
        self.fired, self.signal_name, self._previous = False, "", {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        self.fired, self.signal_name = True, signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (on several hosts: agreed every ``sync_every``)."""
        if jax.process_count() > 1 and step % self.sync_every:
            return False
        return self.requested_now()

    def requested_now(self) -> bool:
        """Whether any process received the signal (an all-reduce on several hosts)."""
        if jax.process_count() == 1:
            return self.fired
        flags = multihost_utils.process_allgather(np.asarray(self.fired, np.int32))
        self.fired = bool(np.any(flags))
        if self.fired:
            self.signal_name = self.signal_name or "SIGTERM on another host"
        return self.fired


def save_checkpoint(ckpt: Checkpointer, step: int, state, train_iter, cfg, skips: SkipMonitor):
    """Saves ``state`` at ``step``; returns whether it did. A state holding a NaN/Inf stops the
    run (:class:`TrainingDiverged` names the leaves and the last good checkpoint); during a
    streak of skipped updates nothing is saved (a warning says which checkpoint stays the
    latest), so ``keep`` never rotates the last good one out for a diverging run's."""
    bad = nonfinite_paths(state)
    if bad:
        raise TrainingDiverged(
            f"Not saving checkpoint step {step}: the train state holds non-finite values "
            f"({', '.join(bad)}); {skips.where()}.")
    streak = skips.state()[1]
    if streak:  # a run that may be diverging must not rotate its last good save out
        last = skips.last_good_checkpoint
        report(f"WARNING: not saving checkpoint step {step}: its last {streak} update(s) were "
               f"skipped as non-finite; the latest checkpoint stays "
               f"{'step ' + str(last) if last is not None else 'none'}.")
        return False
    ckpt.save(step, state, train_iter, cfg)
    skips.last_good_checkpoint = step
    return True


def check_finished_finite(result: dict, skips: SkipMonitor):
    """Raises :class:`TrainingDiverged` when the run ended with a non-finite training or
    validation loss (a finished run must not read as a success with ``loss nan``)."""
    bad = [k for k in ("loss", "val/loss", "val/mse") if k in result
           and not np.isfinite(result[k])]
    if bad:
        values = ", ".join(f"{k} {result[k]}" for k in bad)
        raise TrainingDiverged(f"The run ended with a non-finite {values}; {skips.where()}.")


def compile_first_step(step_fn, state, batch, cfg):
    """The first train step, announced (it compiles: tens of seconds on a CPU) and timed."""
    print(f"Compiling the {cfg.model.family} train step (global batch "
          f"{cfg.train.batch_size}) ...", flush=True)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    print(f"Compiled and ran the first step in {time.perf_counter() - t0:.1f}s", flush=True)
    return state, metrics


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Returns the last logged metrics (plus ``samples`` and ``checkpoint_step``;
    ``already_finished`` when the workdir's checkpoint had reached ``train.steps``).
    Raises :class:`TrainingDiverged` when the run stops or ends non-finite.
    """
    exp = Experiment(config, devices, workdir)  # resolves and checks it; nothing written yet
    os.makedirs(workdir, exist_ok=True)
    # The lock before anything in the workdir is read or written; the SIGTERM guard for the
    # whole run, so a notice during the final save lets it finish instead of killing it.
    with WorkdirLock(workdir), PreemptionGuard() as preemption:
        return _train(exp, workdir, preemption)


def _train(exp, workdir: str, preemption: PreemptionGuard) -> dict:
    """:func:`train_and_evaluate`'s body, inside the workdir lock and the SIGTERM guard."""
    cfg = exp.config
    is_main = jax.process_index() == 0
    per_host = cfg.train.batch_size // jax.process_count()
    train_ds = make_dataset(cfg, "train", per_host, process_index=jax.process_index(),
                            process_count=jax.process_count())
    train_iter = iter(train_ds)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train.keep_checkpoints,
                        cfg.train.async_checkpointing)
    writer = MetricWriter(workdir, enabled=is_main)
    skips = SkipMonitor(cfg)
    try:
        last = _run(exp, workdir, preemption, ckpt, writer, skips, train_iter)
    except BaseException:  # an error or a stop still finishes the in-flight save, quietly:
        ckpt.close(raise_errors=False)  # the error that stopped the run is the one to see
        writer.close()
        raise
    ckpt.close()  # SIGTERM is held off meanwhile; a failed final save is reported
    writer.close()
    if last.get("already_finished") or last.get("preempted"):
        return last
    if preemption.fired:  # the notice came during the last step's save or after it
        print(f"{preemption.signal_name} while the run was finishing: its final checkpoint "
              f"(step {last['checkpoint_step']}) is complete; the run is done.", flush=True)
        last["preempted"] = True
    check_finished_finite(last, skips)
    return last


def _run(exp, workdir: str, preemption: PreemptionGuard, ckpt: Checkpointer,
         writer: MetricWriter, skips: SkipMonitor, train_iter) -> dict:
    """Restore or initialise, then train, validate, sample and save: the last metrics."""
    cfg = exp.config
    is_main = jax.process_index() == 0
    with exp.context():
        if ckpt.latest_step() is not None:
            state, start = ckpt.restore_latest_valid(exp.abstract_state(), train_iter, cfg)
            skips.last_good_checkpoint = start
            log.info("Resumed from step %d", start)
            print(f"Resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
        else:
            state, start = exp.create_state(), 0
            if cfg.train.init_params_from:
                state = init_params(state, exp, cfg.train.init_params_from)
        if start >= cfg.train.steps:  # restored first: a damaged last step is redone
            print(f"The run in {workdir} already finished: its checkpoint is at step {start} "
                  f"of train.steps={cfg.train.steps}. Nothing to train; raise "
                  "--config.train.steps to continue it.", flush=True)
            return {"checkpoint_step": start, "already_finished": True}
        if is_main:  # only once the workdir's checkpoint (if any) fits this config
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(cfg.to_json_best_effort(indent=2))
        n_params = count_params(state.params)
        print(f"Model {cfg.model.family}: {n_params / 1e6:.2f}M params | mesh "
              f"{dict(exp.mesh.shape)} | global batch {cfg.train.batch_size}", flush=True)
        batch = exp.to_global(next(train_iter))
        step_fn = exp.jit_train_step(batch)
        progress = Progress(cfg.train.steps, cfg.train.log_every, cfg.train.batch_size)
        norms = ParamNormMonitor(cfg, state.params)
        last = {}
        t_start = time.perf_counter()
        state, metrics = compile_first_step(step_fn, state, batch, cfg)
        for step in range(start + 1, cfg.train.steps + 1):
            if step > start + 1:
                batch = exp.to_global(next(train_iter))
                state, metrics = step_fn(state, batch)
            ckpt.check_saves()  # a failed async save stops the run at once
            skips.add(metrics, step)
            saving = step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or saving:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                skips.check(step)
                scalars.update(norms.check(step, scalars, saving=saving))
                rate = progress.update(step, scalars) or {}
                writer.write(step, {**scalars, **{f"perf/{k}": v for k, v in rate.items()}})
                last = {**scalars, **rate}
            if preemption.requested(step):
                saved = save_checkpoint(ckpt, step, state, train_iter, cfg, skips)
                ckpt.wait()
                what = (f"saved checkpoint step {step}" if saved else
                        f"the latest checkpoint is step {skips.last_good_checkpoint}")
                print(f"Preempted ({preemption.signal_name}): {what}; rerun the same "
                      "command to resume.", flush=True)
                last["preempted"] = True
                break
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                last.update(evaluate(exp, state, step, writer))
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                write_samples(exp, state, step, workdir)
            if saving:
                save_checkpoint(ckpt, step, state, train_iter, cfg, skips)
        progress.close()
        if last.get("preempted"):
            return {**last, "checkpoint_step": skips.last_good_checkpoint}
        final_step = int(jax.device_get(state.step))
        last["checkpoint_step"] = skips.last_good_checkpoint  # None: nothing saved
        evaluated = cfg.train.eval_every and final_step % cfg.train.eval_every == 0
        if not evaluated and not preemption.requested_now():
            last.update(evaluate(exp, state, final_step, writer))
        if cfg.sampler.num_samples > 0 and not preemption.requested_now():
            last["samples"] = write_samples(exp, state, final_step, workdir)
        last["train_time_s"] = time.perf_counter() - t_start
    return last
