"""Training loop: exact resume, checkpoint round trip, optimizers and bad-config errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdit import config_lib
from jaxdit.parallel.mesh import MeshConfigError, make_mesh, mesh_axes, resolve_mesh_shape
from jaxdit.train.checkpoint import CheckpointError, Checkpointer
from jaxdit.errors import ConfigError
from jaxdit.train.loop import Experiment, init_params, train_and_evaluate
from jaxdit.train.optimizers import make_optimizer, scale_by_factored_rms
from tests.helpers import fixed_batch, tiny_config, preset


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, capsys):
    devices = jax.devices()[:2]  # a sharded (data=2) run; two devices keep compiles short

    def config(steps, samples=0):  # sampling is not under test: compile it once
        cfg = tiny_config(steps=steps)
        cfg.sampler.update(method="euler", sde=False, num_samples=samples)
        return cfg

    full = str(tmp_path / "full")
    assert "samples" not in train_and_evaluate(config(4), full, devices)
    split = str(tmp_path / "split")
    first = train_and_evaluate(config(2), split, devices)
    assert first["checkpoint_step"] == 2
    second = train_and_evaluate(config(4, samples=2), split, devices)
    assert second["checkpoint_step"] == 4
    a, b = _losses(full), _losses(split)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
    assert os.path.exists(second["samples"])
    ckdir = os.path.join(split, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["2", "4"]

    # An unreadable latest checkpoint (a partial write: every state file truncated) is moved
    # aside, not deleted, and the run resumes from the previous one, reproducing steps 3-4.
    for root, _, files in os.walk(os.path.join(ckdir, "4", "state")):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(os.path.getsize(fh.name) // 3)
    os.remove(os.path.join(split, "metrics.jsonl"))
    third = train_and_evaluate(config(4), split, devices)
    assert third["checkpoint_step"] == 4
    assert "checkpoint step 4 is unreadable" in capsys.readouterr().out
    assert sorted(os.listdir(ckdir)) == ["2", "4", "4.corrupt"]
    redone = _losses(split)
    assert sorted(redone) == [3, 4] and all(redone[s] == a[s] for s in (3, 4))

    # Stage 2 of a multi-resolution schedule: twice the resolution, a larger time shift,
    # initialised from the stage-1 workdir's EMA weights with a fresh optimizer.
    stage2 = config(2)
    stage2.data.image_size = 2 * stage2.data.image_size
    stage2.diffusion.shift = 2.0
    stage2.train.init_params_from = split
    exp = Experiment(stage2, devices)
    with exp.context():
        fresh = exp.create_state()
        state = init_params(fresh, exp, split)
        ckpt = Checkpointer(ckdir, create=False)
        stage1, _ = ckpt.restore(exp.abstract_state())
        ckpt.close()
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(stage1.ema_params)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert int(state.step) == 0
        step = exp.jit_train_step(exp.to_global(fixed_batch(stage2)))
        _, metrics = step(state, exp.to_global(fixed_batch(stage2)))
        assert np.isfinite(float(metrics["loss"]))


def test_checkpoint_round_trip_restores_every_field(tmp_path):
    cfg = tiny_config(steps=2)
    exp = Experiment(cfg)
    with exp.context():
        state = exp.create_state()
        state = state.replace(step=jnp.asarray(7, jnp.int32),
                              ema_params=jax.tree.map(lambda a: a + 1.0, state.ema_params))
        ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=True)
        ck.save(7, state, config=cfg)
        ck.wait()
        restored, step = ck.restore(exp.abstract_state())
    assert step == 7
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    assert ck.restore_config().model.family == "dit_air"
    ck.close()
    with pytest.raises(CheckpointError):
        Checkpointer(str(tmp_path / "nothing"), create=False)
    empty = Checkpointer(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="No checkpoint"):
        empty.restore(None)


def test_adafactor_constant_b2_factored_and_unfactored():
    tx = scale_by_factored_rms(b2=0.999, min_dim_size_to_factor=4)
    params = {"w": jnp.ones((8, 6)), "b": jnp.ones((3,))}
    state = tx.init(params)
    assert state.v_row["w"].shape == (8,) and state.v_col["w"].shape == (6,)
    assert state.v["b"].shape == (3,)
    grads = {"w": jnp.full((8, 6), 2.0), "b": jnp.array([1.0, -2.0, 3.0])}
    updates, state = tx.update(grads, state)
    # Bias-corrected first step: update = g / |g| elementwise for constant gradients.
    np.testing.assert_allclose(updates["w"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(updates["b"], [1.0, -1.0, 1.0], rtol=1e-5)


def test_adafactor_survives_a_starved_expert_whose_factored_statistics_underflow():
    """Regression (Race-DiT tiny-4in16 went NaN at step 3): an expert fed one token has a
    rank-1 gradient spanning 1e-11 .. 1e-26; its row ratio (1.3e-6) times a column
    statistic at the eps floor (3e-33) is below float32's smallest normal, the compiled
    step flushed it to 0, and rsqrt(0) * g wrote Inf into the weights (5,626 of these
    16,384 entries before the fix). Jitted, as in the train step: eager ops keep
    denormals and hide it."""
    tx = scale_by_factored_rms(b2=0.999)
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(128, 128)) * 1e-7
    a = np.geomspace(1e-5, 1e-13, 128)
    grads = {"w": jnp.asarray(np.stack([healthy, np.outer(a, a)]), jnp.float32)}
    state = tx.init(grads)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(grads, state)
        assert np.isfinite(np.asarray(updates["w"])).all()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_minimise_a_quadratic(name):
    cfg = config_lib.base_config().optim
    cfg.update(name=name, lr=0.05, clip_norm=1.0)
    tx, schedule = make_optimizer(cfg, 200)
    params = {"w": jnp.full((16, 16), 3.0)}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    for _ in range(200):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.05 * 16 * 16 * 9
    assert float(schedule(0)) == pytest.approx(0.05)


def test_mesh_shapes_and_errors():
    assert resolve_mesh_shape({"data": -1, "tensor": 2}, 8)["data"] == 4
    with pytest.raises(MeshConfigError, match="multiplies to 4 devices but 8"):
        resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(MeshConfigError, match="At most one"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(MeshConfigError, match="does not divide"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(MeshConfigError, match="Unknown mesh axes"):
        resolve_mesh_shape({"model": 8}, 8)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "sequence": 1}
    # v5p presets: fsdp over the slice's chips (cores / 2) / tensor, data over slices
    assert mesh_axes({"preset": "v5p-128", "tensor": 4, "data": 7})["fsdp"] == 16
    assert resolve_mesh_shape(mesh_axes({"preset": "v5p-16", "tensor": 1}), 16) == {
        "data": 2, "fsdp": 8, "tensor": 1, "expert": 1, "sequence": 1}
    with pytest.raises(MeshConfigError, match="v5p-8 has 4 chips"):
        mesh_axes({"preset": "v5p-8", "tensor": 8})
    with pytest.raises(MeshConfigError, match="Unknown mesh preset"):
        mesh_axes({"preset": "v9-8"})


@pytest.mark.parametrize("mutate,error,match", [
    (lambda c: c.train.update(batch_size=6), ConfigError, "multiple of the 8 devices"),
    (lambda c: c.optim.update(grad_accum=3), ConfigError, "grad_accum"),
    (lambda c: c.data.update(image_size=18), ConfigError, "multiple of"),
    (lambda c: c.model.update(family="unet"), ValueError, "Unknown model.family"),
    (lambda c: c.model.update(num_heads=5), ValueError, "not divisible"),
    (lambda c: c.optim.update(name="sgd"), ValueError, "Unknown optim.name"),
    (lambda c: c.text.update(kind="clip"), ValueError, "Unknown text.kind"),
    (lambda c: c.latent.update(kind="kl_vae"), ValueError, "needs latent.vae_workdir"),
    (lambda c: c.latent.update(kind="sd"), ValueError, "latent.kind='sd'"),
    (lambda c: c.data.update(source="laion"), ValueError, "Unknown data.source"),
    (lambda c: c.mesh.update(data=3), MeshConfigError, "multiplies to 3"),
])
def test_bad_configs_fail_fast_with_clear_errors(tmp_path, mutate, error, match):
    cfg = tiny_config()
    mutate(cfg)
    with pytest.raises(error, match=match):
        train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_config_argument_parsing():
    c = preset("dit_air", "B,share=attention")
    assert (c.model.depth, c.model.width, c.model.num_heads) == (18, 1152, 18)
    assert c.model.share == "attention" and c.text.width == 1024 and c.latent.channels == 8
    with pytest.raises(ValueError, match="Unknown size"):
        preset("dit_air", "Q")
    with pytest.raises(ValueError, match="Unknown model field"):
        preset("dit_air", "tiny,sharing=full")
    with pytest.raises(ValueError, match="key=value"):
        preset("dit_air", "tiny,full")


def test_a_config_saved_by_an_older_version_gains_the_new_fields():
    """Checkpoints restore their saved config verbatim; fields added to jaxdit since then
    come in with their defaults, and what was saved is kept."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    saved = json.loads(preset("vae", "tiny-4ch").to_json_best_effort())
    del saved["model"]["layout"], saved["text"]["pooled_width"]
    saved["model"]["width"] = 96
    config = config_lib.with_defaults(ml_collections.ConfigDict(saved))
    assert config.model.layout == "dit_air" and config.text.pooled_width == 0
    assert config.model.width == 96 and config.vae.z_channels == 4  # kept, family section too
