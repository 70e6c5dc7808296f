"""jaxdit vs a PyTorch peer on the CPU, side by side in one run: the class-conditional tiny
DiT of ``experiments/race_dit.py:tiny-dense`` and diffusers' ``DiTTransformer2DModel`` of
the same shape (depth 4, width 128, 4 heads, patch 4, 18 classes, adaLN-Zero), trained on
the same shapes batches for the same wall-clock budget each (compilation included, as a
user waits for it), then scored the same way.

  python tools/bench_cpu_peer.py --budget_s 120

Both sides: flow matching (x_t = (1 - t) x0 + t eps, target x0 - eps, logit-normal t),
AdamW (lr, betas, warm-up and global-norm clipping from the flags), 10% label dropout,
fp32. Scored on the raw weights (no EMA on either side): validation loss on a fixed grid
of t with fixed noise, and the alignment score (:mod:`jaxdit.eval.alignment`) of samples
from the same Euler ODE sampler with classifier-free guidance, from the same noise.
Prints images/s (training steps in the budget x batch / budget, and the steady-state rate
without the first step), validation loss and alignment for both, and their ratios.
Needs torch and diffusers (the test extra). Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import flags
from diffusers import DiTTransformer2DModel

from jaxdit import config_lib
from jaxdit.data import shapes
from jaxdit.data.pipeline import make_dataset
from jaxdit.diffusion import flow
from jaxdit.eval.alignment import alignment_scores
from jaxdit.train.loop import Experiment

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")

T_GRID = np.linspace(0.05, 0.95, 10)
SYNC_EVERY = 10  # jaxdit's side waits for the device every this many steps, as the loop logs


def jaxdit_config(args):
    cfg = config_lib.preset("race_dit", "tiny-dense", EXPERIMENTS)
    cfg.optim.update(name="adamw", lr=args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     clip_norm=1.0, warmup_steps=args.warmup, ema_decay=0.0)
    cfg.train.update(batch_size=args.batch, steps=10 ** 6)
    cfg.data.caption_dropout = 0.1
    return cfg


def torch_model(cfg):
    m = cfg.model
    return DiTTransformer2DModel(
        num_attention_heads=m.num_heads, attention_head_dim=m.width // m.num_heads,
        in_channels=3, out_channels=3, num_layers=m.depth, sample_size=cfg.data.image_size,
        patch_size=m.patch_size, num_embeds_ada_norm=m.num_classes)


def batches(cfg):
    it = iter(make_dataset(cfg, "train", cfg.train.batch_size))
    while True:
        b = next(it)
        yield {"image": np.asarray(b["image"], np.float32), "label": np.asarray(b["label"])}


def _keep_going(t0, budget_s, steps, max_steps):
    """Train on while inside the wall-clock budget, or (``--steps``) to a step count."""
    if max_steps:
        return steps < max_steps
    return time.perf_counter() - t0 < budget_s


def train_jaxdit(cfg, budget_s, max_steps=None):
    exp = Experiment(cfg, jax.devices()[:1])
    data = batches(cfg)
    t0 = time.perf_counter()
    with exp.context():
        state = exp.create_state()
        b = exp.to_global(next(data))
        step = exp.jit_train_step(b)
        steps, first = 0, None
        while _keep_going(t0, budget_s, steps, max_steps):
            state, m = step(state, exp.to_global(next(data)) if steps else b)
            steps += 1
            if steps == 1 or steps % SYNC_EVERY == 0:  # as the train loop: no sync per step
                jax.block_until_ready(m["loss"])
            first = first or time.perf_counter()
        jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    variables = {"params": state.params, **state.model_state}

    def predict(x, t, labels):  # x (B, H, W, 3) numpy; labels (B,), -1 = unconditional
        with exp.context():
            cond = {"label": jnp.asarray(np.where(labels < 0, cfg.model.num_classes, labels))}
            return np.asarray(exp.model.apply(variables, jnp.asarray(x, jnp.float32),
                                              jnp.asarray(t, jnp.float32), cond))
    return predict, steps, elapsed, time.perf_counter() - first if steps > 1 else elapsed


def train_torch(cfg, budget_s, args):
    torch.manual_seed(0)
    model = torch_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / max(args.warmup, 1)))
    data = batches(cfg)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    steps, first = 0, None
    model.train()
    while _keep_going(t0, budget_s, steps, args.steps):
        b = next(data)
        x0 = torch.from_numpy(b["image"]).permute(0, 3, 1, 2)
        t = torch.from_numpy(np.asarray(flow.sample_t(
            jax.random.PRNGKey(steps), x0.shape[0], kind="logit_normal", mean=0.0, std=1.0,
            shift=1.0))).float()
        eps = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        pred = model(xt, timestep=t * 1000, class_labels=torch.from_numpy(b["label"]).long()).sample
        loss = torch.mean((pred - (x0 - eps)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps += 1
        first = first or time.perf_counter()
    elapsed = time.perf_counter() - t0
    model.eval()

    @torch.no_grad()
    def predict(x, t, labels):
        xt = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2)))
        lab = torch.from_numpy(np.where(labels < 0, cfg.model.num_classes, labels)).long()
        out = model(xt, timestep=torch.from_numpy(np.asarray(t, np.float32)) * 1000,
                    class_labels=lab).sample
        return out.permute(0, 2, 3, 1).numpy()
    return predict, steps, elapsed, time.perf_counter() - first if steps > 1 else elapsed


def val_loss(predict, cfg, num_batches=4):
    """Mean flow-matching MSE over ``T_GRID`` on validation batches, fixed noise."""
    it = iter(make_dataset(cfg, "val", cfg.train.batch_size, repeat=True))
    rng = np.random.default_rng(1234)
    losses = []
    for _ in range(num_batches):
        b = next(it)
        x0, y = np.asarray(b["image"], np.float32), np.asarray(b["label"])
        for t in T_GRID:
            eps = rng.standard_normal(x0.shape).astype(np.float32)
            tb = np.full((x0.shape[0],), t, np.float32)
            pred = predict(((1 - t) * x0 + t * eps).astype(np.float32), tb, y)
            losses.append(np.mean((pred - (x0 - eps)) ** 2))
    return float(np.mean(losses))


def euler_cfg_samples(predict, labels, size, steps, scale, seed=0):
    """Euler ODE from t=1 to 0 with classifier-free guidance; images in [-1, 1]."""
    x = np.random.default_rng(seed).standard_normal((len(labels), size, size, 3)).astype(
        np.float32)
    times = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    null = np.full_like(labels, -1)
    for t, t_next in zip(times[:-1], times[1:]):
        tb = np.full((len(labels),), t, np.float32)
        c, u = predict(x, tb, labels), predict(x, tb, null)
        x = x + (t - t_next) * (u + scale * (c - u))  # dx/dt = -(x0 - eps)
    return x


def score(name, predict, steps, elapsed, steady, cfg, args):
    labels = np.arange(args.num_samples) % cfg.model.num_classes
    images = euler_cfg_samples(predict, labels, cfg.data.image_size, args.sample_steps,
                               args.cfg_scale)
    align = alignment_scores(list(images), [shapes.class_name(i) for i in labels])
    return {"name": name, "steps": steps, "images_per_s": steps * args.batch / elapsed,
            "steady_images_per_s": max(steps - 1, 1) * args.batch / steady,
            "val_loss": val_loss(predict, cfg), "align": align["align/overall"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget_s", type=float, default=120.0, help="training seconds per side")
    ap.add_argument("--steps", type=int, default=0,
                    help="train each side this many steps instead of for --budget_s "
                         "(learning per step rather than per second)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--num_samples", type=int, default=72)
    ap.add_argument("--sample_steps", type=int, default=50)
    ap.add_argument("--cfg_scale", type=float, default=4.0)
    args = ap.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    cfg = jaxdit_config(args)
    rows = [score("jaxdit", *train_jaxdit(cfg, args.budget_s, args.steps), cfg, args),
            score("diffusers (torch)", *train_torch(cfg, args.budget_s, args), cfg, args)]
    print(f"{'':20s} {'steps':>6s} {'img/s':>8s} {'steady img/s':>13s} {'val loss':>9s} "
          f"{'align':>6s}   (budget {args.budget_s:.0f} s each, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()})")
    for r in rows:
        print(f"{r['name']:20s} {r['steps']:6d} {r['images_per_s']:8.1f} "
              f"{r['steady_images_per_s']:13.1f} {r['val_loss']:9.4f} {r['align']:6.3f}")
    a, b = rows
    print(f"{'jaxdit / peer':20s} {a['steps'] / b['steps']:6.2f} "
          f"{a['images_per_s'] / b['images_per_s']:8.2f} "
          f"{a['steady_images_per_s'] / b['steady_images_per_s']:13.2f} "
          f"{a['val_loss'] / b['val_loss']:9.3f} "
          f"{a['align'] / b['align'] if b['align'] else float('inf'):6.2f}")


if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
    main()
