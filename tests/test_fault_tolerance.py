"""Fault tolerance: non-finite steps (loss, gradient or update) are skipped and reported,
nothing non-finite is saved or drawn, an exploding parameter norm is reported, and SIGTERM
saves a checkpoint before the process exits. (The fallback from an unreadable latest checkpoint is
tested with resuming, in test_train.py.)"""
import os
import signal
import subprocess
import sys
import time

import json

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxdit.train.checkpoint import (CheckpointError, Checkpointer, IncompatibleCheckpoint,
                                     read_arrays)
from jaxdit.train.checksums import fingerprint
from jaxdit.train.health import SkipMonitor, TrainingDiverged, nonfinite_paths
from jaxdit.train.load import load_experiment
from jaxdit.train.loop import Experiment, save_checkpoint, train_and_evaluate, write_samples
from jaxdit.train.workdir_lock import LOCK_NAME, WorkdirBusy, WorkdirLock
from tests.helpers import fixed_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nonfinite_step_changes_nothing_but_the_step_count():
    cfg = tiny_config()
    cfg.model.depth = 1
    exp = Experiment(cfg, jax.devices()[:2])
    with exp.context():
        state = exp.create_state()
        good = {k: np.asarray(v) for k, v in fixed_batch(cfg).items()}
        bad = {**good, "image": np.where(np.arange(good["image"].size).reshape(
            good["image"].shape) == 5, np.nan, good["image"]).astype(np.float32)}
        step = exp.jit_train_step(exp.to_global(good))
        before = jax.device_get((state.params, state.ema_params, state.opt_state))
        state, metrics = step(state, exp.to_global(bad))
        assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
        assert int(state.step) == 1
        after = jax.device_get((state.params, state.ema_params, state.opt_state))
        jax.tree.map(np.testing.assert_array_equal, after, before)
        for _ in range(2):  # the optimizer's own count (warm-up) did not advance either
            state, metrics = step(state, exp.to_global(good))
        assert float(metrics["skipped"]) == 0.0 and int(state.step) == 3
        moved = jax.device_get(state.params)
        assert any(not np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(moved), jax.tree.leaves(before[0])))


def test_skip_monitor_reports_and_stops(capsys):
    cfg = tiny_config()
    cfg.train.max_consecutive_skips = 3
    mon = SkipMonitor(cfg)
    for skipped in (1.0, 0.0, 1.0, 1.0):
        mon.add({"skipped": jnp.asarray(skipped)})
    mon.check(4)
    assert "3 update(s) skipped" in capsys.readouterr().out
    mon.add({"skipped": jnp.asarray(1.0)})
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        mon.check(5)


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    wd = str(tmp_path / "wd")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdit.train", "--config", "experiments/dit_air.py:tiny",
         "--workdir", wd, "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.batch_size=8", "--config.model.depth=1", "--config.train.eval_every=0",
         "--config.train.ckpt_every=100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    # While it trains, the same command again is refused in one line, touching nothing.
    size = os.path.getsize(metrics)
    second = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"Error: Another run (pid {proc.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    assert os.path.getsize(metrics) >= size and not os.listdir(os.path.join(wd, "checkpoints"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "Preempted (SIGTERM): saved checkpoint step" in out
    steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1


SIGTERM_AFTER_FINAL_SAVE_STARTS = """
import os, signal, sys
from jaxdit.train import checkpoint
start_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
    start_save(self, step, *args, **kwargs)
    if step == 3:  # the last step: the notice arrives while its async save is in flight
        os.kill(os.getpid(), signal.SIGTERM)
checkpoint.Checkpointer.save = save
from jaxdit.cli.train import run
sys.argv = ["jaxdit.train"] + sys.argv[1:]
run()
"""


def test_sigterm_during_the_final_save_lets_it_finish(tmp_path):
    """A preemption notice while the last checkpoint is being written (it used to kill the
    process, rc -15, leaving ``3.orbax-checkpoint-tmp``): the save completes, rc 0."""
    wd = str(tmp_path / "wd")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AFTER_FINAL_SAVE_STARTS, "--config",
         "experiments/dit_air.py:tiny", "--workdir", wd, "--config.train.steps=3",
         "--config.train.batch_size=8", "--config.model.depth=1", "--config.train.eval_every=0",
         "--config.sampler.num_samples=4", "--config.sampler.num_steps=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SIGTERM while the run was finishing: its final checkpoint (step 3) is complete" \
        in proc.stdout
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), create=False)
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_one_run_per_workdir_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    cfg = tiny_config(steps=1)
    cfg.model.depth, cfg.sampler.num_samples = 1, 0
    os.makedirs(wd)
    with WorkdirLock(wd):  # a live holder: refused before anything is written
        with pytest.raises(WorkdirBusy, match=rf"Another run \(pid {os.getpid()} on .*use "
                           "another --workdir"):
            train_and_evaluate(cfg, wd, jax.devices()[:1])
    assert os.listdir(wd) == [LOCK_NAME]
    with open(os.path.join(wd, LOCK_NAME), "w", encoding="utf-8") as f:  # died holding it
        json.dump({"pid": 999999, "host": "gone", "time": 0}, f)
    assert train_and_evaluate(cfg, wd, jax.devices()[:1])["checkpoint_step"] == 1
    out = capsys.readouterr().out
    assert "took over the lock of a run that did not exit cleanly (pid 999999 on gone" in out
    with open(os.path.join(wd, LOCK_NAME), encoding="utf-8") as f:
        assert f.read() == ""  # a clean exit leaves nothing to take over


def test_a_finite_gradient_whose_update_is_not_finite_is_skipped():
    """What optim.lr=nan (now refused by the config check) and the old Adafactor underflow
    did: loss and gradient finite, the update NaN. The step keeps the old state."""
    cfg = tiny_config()
    cfg.model.depth = 1
    exp = Experiment(cfg, jax.devices()[:2])
    exp.tx = optax.chain(exp.tx, optax.scale(float("nan")))  # before state_sh is derived
    with exp.context():
        state = exp.create_state()
        batch = exp.to_global(fixed_batch(cfg))
        before = jax.device_get((state.params, state.ema_params, state.opt_state))
        state, metrics = exp.jit_train_step(batch)(state, batch)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
        assert float(metrics["skipped"]) == 1.0 and float(metrics["skipped_update"]) == 1.0
        after = jax.device_get((state.params, state.ema_params, state.opt_state))
        jax.tree.map(np.testing.assert_array_equal, after, before)


def test_a_nan_weight_is_never_saved_or_drawn(tmp_path, capsys):
    """A NaN injected into one weight: every step is skipped, the checkpoint save refuses
    naming the leaf and the last good checkpoint, and no sample grid is written."""
    cfg = tiny_config()
    cfg.model.depth = 1
    exp = Experiment(cfg, jax.devices()[:2])
    with exp.context():
        state = exp.create_state()
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[0].set(jnp.nan) if "final" in jax.tree_util.keystr(p)
            and x.ndim == 2 else x, state.params)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        assert nonfinite_paths(state.params)
        batch = exp.to_global(fixed_batch(cfg))
        skips = SkipMonitor(cfg)
        skips.last_good_checkpoint = 4
        state, metrics = exp.jit_train_step(batch)(state, batch)
        skips.add(metrics, 5)
        assert float(metrics["skipped"]) == 1.0
        ckpt = Checkpointer(str(tmp_path / "ck"), async_save=False)
        with pytest.raises(TrainingDiverged, match=r"Not saving checkpoint step 5: .*final.*"
                           r"first non-finite step 5; last good checkpoint: step 4"):
            save_checkpoint(ckpt, 5, state, None, cfg, skips)
        assert ckpt.all_steps() == []
        ckpt.close()
        assert write_samples(exp, state, 5, str(tmp_path)) is None
    assert "no sample grid written" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "samples")


def test_no_checkpoint_is_taken_during_a_skip_streak(tmp_path, capsys):
    """Skipped updates in a row mean a run that may be diverging: its save is refused with
    a warning, so ``keep`` never rotates the last good checkpoint out."""
    cfg = tiny_config()
    skips = SkipMonitor(cfg)
    skips.last_good_checkpoint = 10
    ckpt = Checkpointer(str(tmp_path / "ck"), async_save=False)
    state = {"w": jnp.ones(3)}
    skips.add({"skipped": jnp.ones(())}, 19)
    skips.add({"skipped": jnp.ones(())}, 20)
    assert save_checkpoint(ckpt, 20, state, None, cfg, skips) is False
    assert ckpt.all_steps() == [] and skips.last_good_checkpoint == 10
    assert ("not saving checkpoint step 20: its last 2 update(s) were skipped as non-finite; "
            "the latest checkpoint stays step 10") in capsys.readouterr().out
    skips.add({"skipped": jnp.zeros(())}, 21)  # a kept update ends the streak
    assert skips.state()[1] == 0
    ckpt.close()


def test_an_exploding_parameter_norm_is_reported_before_the_save(tmp_path, capsys):
    """optim.lr=1e10: the parameters grow by ~1e10 at once; a warning (and
    param_norm_ratio in the metrics) says so when the checkpoint is due. Steps 2 and 3 then
    overflow and are skipped, so the step-3 save is refused (a streak of skipped updates)
    and the run reports that no checkpoint was saved: nothing exploded is kept."""
    cfg = tiny_config(steps=3, ckpt_every=3)
    cfg.model.depth = 1
    cfg.optim.update(lr=1e10, warmup_steps=0)
    cfg.sampler.num_samples = 0
    wd = str(tmp_path / "wd")
    result = train_and_evaluate(cfg, wd, jax.devices()[:2])
    out = capsys.readouterr().out
    assert "WARNING: parameter norm" in out and "(checkpoint step 3 is due)" in out
    assert ("not saving checkpoint step 3: its last 2 update(s) were skipped as non-finite; "
            "the latest checkpoint stays none") in out
    assert result["checkpoint_step"] is None
    assert os.listdir(os.path.join(wd, "checkpoints")) == []
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert max(r.get("param_norm_ratio", 0) for r in rows) > 1e6


def test_cli_refuses_a_nan_learning_rate_in_one_line_and_writes_nothing(tmp_path):
    wd = tmp_path / "wd"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdit.train", "--config", "experiments/dit_air.py:tiny",
         "--workdir", str(wd), "--config.optim.lr=nan"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: optim.lr must be a finite number > 0, got nan.")
    assert "Traceback" not in proc.stderr and not wd.exists()
    # A config file that is not there: one line too (ml_collections alone prints two
    # chained tracebacks).
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdit.train", "--config", "experiments/no_such.py:tiny",
         "--workdir", str(wd)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not wd.exists()
    assert proc.stderr.strip().splitlines() == [
        "Error: cannot load the config file 'experiments/no_such.py' (from --config "
        "experiments/no_such.py:tiny): no such file, or it does not import; use "
        "path.py:<arg>, e.g. experiments/dit_air.py:tiny."]


def test_a_resume_with_another_model_is_refused_and_touches_nothing(tmp_path, capsys):
    """A workdir trained at depth 1, rerun at depth 2: refused with the field that differs,
    every checkpoint kept as it was; the original config then resumes from it. A workdir
    whose only checkpoint is unreadable is refused too, with nothing moved aside."""
    def config(steps, depth=1):
        cfg = tiny_config(steps=steps, ckpt_every=2)
        cfg.model.depth = depth
        cfg.sampler.num_samples = 0
        return cfg

    wd = str(tmp_path / "wd")
    devices = jax.devices()[:2]
    train_and_evaluate(config(2), wd, devices)
    ckdir = os.path.join(wd, "checkpoints")
    with pytest.raises(IncompatibleCheckpoint, match=r"model.depth 1 in the checkpoint, 2 in "
                       r"the config.*Nothing was changed"):
        train_and_evaluate(config(4, depth=2), wd, devices)
    assert sorted(os.listdir(ckdir)) == ["2"]
    with open(os.path.join(wd, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["depth"] == 1  # the run's own config, as the error says
    assert train_and_evaluate(config(3), wd, devices)["checkpoint_step"] == 3
    assert "Resumed from checkpoint step 2" in capsys.readouterr().out
    assert sorted(os.listdir(ckdir)) == ["2", "3"]

    lone = str(tmp_path / "lone")
    train_and_evaluate(config(2), lone, devices)
    for root, _, files in os.walk(os.path.join(lone, "checkpoints", "2", "state")):
        for f in files:
            if not f.startswith("_"):  # keep the metadata: the arrays are what is damaged
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(fh.name) // 3)
    with pytest.raises(CheckpointError, match="nothing was moved or deleted"):
        train_and_evaluate(config(4), lone, devices)
    assert sorted(os.listdir(os.path.join(lone, "checkpoints"))) == ["2"]


def test_every_single_bit_flip_changes_the_checksum():
    for dtype, word in ((np.float32, np.uint32), (jnp.bfloat16, np.uint16), (np.int32, np.uint32)):
        x = np.arange(15).reshape(3, 5).astype(dtype)
        base = int(fingerprint(jnp.asarray(x)))
        bits = x.view(word)
        for i in range(bits.size):
            for k in range(8 * bits.itemsize):
                flipped = bits.copy().reshape(-1)
                flipped[i] ^= word(1 << k)
                got = int(fingerprint(jnp.asarray(flipped.reshape(bits.shape).view(dtype))))
                assert got != base, (dtype, i, k)
    swapped = np.array([1.0, 2.0], np.float32)
    assert int(fingerprint(jnp.asarray(swapped))) != int(fingerprint(jnp.asarray(swapped[::-1])))


def _rewrite_with_one_value_changed(state_dir: str) -> None:
    """What a flipped bit that still decodes does: the arrays on disk hold another value
    than was saved (here one parameter + 1), every file and the checksums otherwise intact."""
    tree = read_arrays(state_dir)
    kernel = tree["params"]["denoiser"]["final"]["proj"]["kernel"]
    kernel[0, 0] += 1.0
    shutil.rmtree(state_dir)
    ocp.PyTreeCheckpointer().save(state_dir, tree)


def test_damage_that_still_decodes_is_caught_and_the_previous_checkpoint_used(tmp_path, capsys):
    cfg = tiny_config(steps=4, ckpt_every=2)
    cfg.model.depth, cfg.sampler.num_samples = 1, 0
    wd = str(tmp_path / "wd")
    devices = jax.devices()[:1]
    train_and_evaluate(cfg, wd, devices)
    ckdir = os.path.join(wd, "checkpoints")
    _rewrite_with_one_value_changed(os.path.join(ckdir, "4", "state"))
    capsys.readouterr()
    # jaxdit.sample / jaxdit.eval: the previous step, read-only
    exp, state, step = load_experiment(wd)
    assert step == 2 and int(jax.device_get(state.step)) == 2
    out = capsys.readouterr().out
    assert "checkpoint step 4 is unreadable or damaged; using step 2 (nothing was moved)" in out
    assert "params/denoiser/final/proj/kernel" in out and "checksum mismatch" in out
    assert sorted(os.listdir(ckdir)) == ["2", "4"]
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_experiment(wd, step=4)  # asked for by number: refused, not replaced
    # the train loop: resumes from step 2, the damaged step kept aside
    cfg.train.steps = 5
    assert train_and_evaluate(cfg, wd, devices)["checkpoint_step"] == 5
    assert "Resumed from checkpoint step 2" in capsys.readouterr().out
    assert sorted(os.listdir(ckdir)) == ["2", "4", "4.corrupt", "5"]  # 4 redone, intact


def test_a_failed_async_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    """A save that fails in the background (here the checkpointer reports a full disk once
    step 4's save is under way) stops training at step 5 with one message naming the step,
    the cause and the last complete checkpoint, instead of a save interval later."""
    failing = {"on": False}
    start_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        start_save(self, step, *args, **kwargs)
        failing["on"] = failing["on"] or step == 4

    def check_for_errors(self):  # pylint: disable=unused-argument
        if failing["on"]:
            raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(Checkpointer, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check_for_errors)
    cfg = tiny_config(steps=8, ckpt_every=2)
    cfg.model.depth, cfg.sampler.num_samples, cfg.train.log_every = 1, 0, 1
    wd = str(tmp_path / "wd")
    with pytest.raises(CheckpointError, match=r"Saving checkpoint step 4 in .* failed: "
                       r"\[Errno 28\] No space left on device\. The last complete checkpoint "
                       r"is step 2; fix the cause"):
        train_and_evaluate(cfg, wd, jax.devices()[:1])
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert max(r["step"] for r in rows) == 4  # step 5 ran, its check stopped the run
