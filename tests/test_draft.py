"""DRaFT reward fine-tuning: gradients flow only through the last K sampler steps, the
colour reward behaves, and a few fine-tuning steps raise the reward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from jaxdit.data.shapes import COLORS
from jaxdit.train import draft


def test_gradients_only_through_the_last_k_steps():
    w = jnp.asarray(0.7)
    noise = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)

    def run(w, k):
        return draft.draft_sample(lambda x, t: w * x + t[:, None, None, None], noise, 4, k)

    full = run(w, 4)
    for k in (0, 1, 4):  # the samples do not depend on K
        np.testing.assert_allclose(run(w, k), full, rtol=1e-6)
    grads = {k: float(jax.grad(lambda w, k=k: run(w, k).sum())(w)) for k in (0, 1, 2, 4)}
    assert grads[0] == 0.0 and grads[1] != 0.0
    assert len({round(g, 6) for g in grads.values()}) == 4  # each K a different truncation
    with pytest.raises(ValueError, match="grad_steps"):
        run(w, 5)


def test_color_reward():
    red = np.asarray(COLORS["red"], np.float32) / 127.5 - 1.0
    img = np.full((2, 16, 16, 3), -0.8, np.float32)
    img[0, :6, :6] = red  # 14% of the image red: capped at the 10% target
    img[1, :3, :3] = red  # 3.5%
    r = draft.color_reward(jnp.asarray(img), jnp.asarray([0, 0]), width=0.15)  # class 0: red
    np.testing.assert_allclose(r, [1.0, 9 / 256 / 0.1], rtol=1e-3)
    assert float(draft.color_reward(jnp.asarray(img), jnp.asarray([1, 1]), width=0.15)[0]) < 0.05
    wide = draft.color_reward(jnp.asarray(img), jnp.asarray([0, 0]))  # default width 0.4
    assert float(wide[1]) > float(r[1])  # near-colours count partly


def test_a_draft_step_raises_the_reward_of_its_samples():
    """One DRaFT train step (the shared train_step, objective 'draft') raises the reward of
    the very samples it was computed on (same noise, same batch): the gradient through the
    truncated sampler points uphill. Adam's first step moves every parameter by lr along
    the sign of its gradient, so a small lr gives a first-order increase."""
    from jaxdit.data.pipeline import make_dataset  # pylint: disable=import-outside-toplevel
    from jaxdit.train.loop import Experiment  # pylint: disable=import-outside-toplevel
    from jaxdit.train.step import loss_fn  # pylint: disable=import-outside-toplevel
    cfg = tiny_config()
    cfg.train.objective = "draft"
    cfg.draft.update(num_steps=4, grad_steps=2)
    cfg.optim.update(name="adamw", lr=1e-3, warmup_steps=0, ema_decay=0.0, clip_norm=0.0)
    exp = Experiment(cfg)
    batch = next(iter(make_dataset(cfg, "train", 8)))
    with exp.context():
        state = exp.create_state()
        gbatch = exp.to_global(batch)
        step_rng = jax.random.split(state.rng)[1]  # what train_step hands to loss_fn
        reward = jax.jit(lambda p, ms: -loss_fn(p, ms, gbatch, step_rng, model=exp.model,
                                                autoencoder=exp.autoencoder, cfg=cfg)[0])
        before = float(reward(state.params, state.model_state))
        new, metrics = exp.jit_train_step(gbatch)(state, gbatch)
        after = float(reward(new.params, new.model_state))
    assert abs(float(metrics["reward"]) - before) < 1e-5  # the step saw these samples
    print(f"reward {before:.4f} -> {after:.4f}")
    assert after > before + 1e-3, (before, after)


def test_bad_draft_configs():
    from jaxdit.errors import ConfigError  # pylint: disable=import-outside-toplevel
    from jaxdit.train.loop import Experiment  # pylint: disable=import-outside-toplevel
    cfg = tiny_config()
    cfg.train.objective = "dpo"
    with pytest.raises(ConfigError, match="train.objective"):
        Experiment(cfg)
    cfg.train.objective = "draft"
    cfg.draft.grad_steps = 9
    with pytest.raises(ConfigError, match="grad_steps"):
        Experiment(cfg)
