"""Fault tolerance: non-finite steps are skipped and reported, and SIGTERM saves a
checkpoint before the process exits. (The fallback from an unreadable latest checkpoint is
tested with resuming, in test_train.py.)"""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.train.loop import Experiment, SkipMonitor
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
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "Preempted (SIGTERM): saved checkpoint step" in out
    steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1
