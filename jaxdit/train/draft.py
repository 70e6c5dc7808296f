"""DRaFT-style reward fine-tuning (``train.objective='draft'``).

The loss is ``-reward(decode(sample(noise)))`` where ``sample`` is an Euler solve of the
flow from ``t = 1`` to 0 in ``draft.num_steps`` steps, differentiated only through the
last ``draft.grad_steps`` of them (DRaFT-K): the first ``num_steps - grad_steps`` run under
``stop_gradient`` (no gradient to the parameters or the state through them), as in the
DiT-Air paper's reward stage (backprop through the last T - Ts steps). Each differentiated
step is rematerialised, so memory grows with K, not with the whole chain. Sampling is
conditional without CFG (the reward shapes the conditional model).

Rewards (``draft.reward``), differentiable in the pixels:

* ``color``: the colour of the class / first object (shapes data: ``label % 6``) must cover
  ``draft.reward_area`` of the image: reward = ``min(coverage, area) / area`` with a soft
  per-pixel match ``exp(-|pixel - colour|^2 / (2 w^2))``, ``w = draft.reward_width``
  (pixels in [-1, 1]; wide enough that far-off pixels still get a gradient). Capped, so it
  is satisfied by one object of that colour, not by painting the whole image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.data.shapes import COLORS
from jaxdit.errors import ConfigError
from jaxdit.diffusion.samplers import time_grid

REWARDS = ("color",)


def color_reward(images, labels, area: float = 0.1, width: float = 0.4):
    """``images`` (B, H, W, 3) in [-1, 1], ``labels`` (B,) int -> reward (B,) in [0, 1]."""
    palette = jnp.asarray(list(COLORS.values()), jnp.float32) / 127.5 - 1.0
    target = palette[labels % len(COLORS)][:, None, None, :]
    match = jnp.exp(-jnp.sum((images - target) ** 2, axis=-1) / (2 * width ** 2))
    coverage = match.mean(axis=(1, 2))
    return jnp.minimum(coverage, area) / area


def draft_sample(velocity_fn, noise, num_steps: int, grad_steps: int, shift: float = 1.0):
    """Euler solve from noise (t=1) to data (t=0) with gradients through the last
    ``grad_steps`` steps only. ``velocity_fn(x, t (B,)) -> model prediction f``
    (``dx/dt = -f``)."""
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"draft.grad_steps={grad_steps} must be in [0, {num_steps}].")
    times = time_grid(num_steps, shift)

    def step(x, ts):
        t, s = ts
        f = velocity_fn(x, jnp.full((x.shape[0],), t, x.dtype))
        return x + (t - s) * f, None  # x_s = x_t + (s - t) * (-f)

    pairs = jnp.stack([times[:-1], times[1:]], axis=1)
    free = num_steps - grad_steps
    x = noise
    if free:
        x, _ = jax.lax.scan(step, noise, pairs[:free])
        x = jax.lax.stop_gradient(x)
    if grad_steps:
        x, _ = jax.lax.scan(jax.checkpoint(step), x, pairs[free:])
    return x


def draft_loss_fn(params, model_state, batch, rng, *, model, autoencoder, cfg, cond):
    """``(loss, (metrics, model_state))`` of one DRaFT batch; ``cond`` is the batch's model
    condition (:func:`jaxdit.models.registry.condition_from_batch`)."""
    d = cfg.draft
    if d.reward not in REWARDS:
        raise ValueError(f"Unknown draft.reward {d.reward!r}; available: {REWARDS}.")
    variables = {"params": params, **model_state}
    image_shape = batch["image"].shape[1:]
    noise = jax.random.normal(rng, (batch["image"].shape[0],)
                              + tuple(autoencoder.latent_shape(image_shape)), jnp.float32)
    x0 = draft_sample(lambda x, t: model.apply(variables, x, t, cond), noise,
                      int(d.num_steps), int(d.grad_steps), float(d.shift))
    images = autoencoder.bind(params).decode(x0)
    reward = color_reward(images, batch["label"], float(d.reward_area), float(d.reward_width))
    loss = -reward.mean()
    return loss, ({"reward": reward.mean(), "draft_loss": loss}, model_state)


def check_draft_config(config) -> None:
    """``config.draft``'s reward and step counts (raises :class:`ConfigError`)."""
    d = config.draft
    if d.reward not in REWARDS:
        raise ConfigError(f"Unknown draft.reward {d.reward!r}; available: {REWARDS}.")
    if d.reward == "color" and config.data.source != "shapes":
        raise ConfigError("draft.reward='color' reads the target colour from the shapes "
                          "data's labels: set data.source='shapes'.")
    if not 0 <= d.grad_steps <= d.num_steps:
        raise ConfigError(f"draft.grad_steps={d.grad_steps} must be in [0, "
                          f"draft.num_steps={d.num_steps}].")
