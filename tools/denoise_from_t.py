"""Where a text-to-image run on the shapes data loses its captions: noise its validation
images to ``t0``, integrate the Euler ODE from there to 0 (no guidance) and score the
result with the alignment checks, for several ``t0``.

    python tools/denoise_from_t.py --workdir workdirs/tiny --t0 0.1,0.3,0.5,0.7,0.9,1.0

Prints, per ``t0``, the alignment scores and the fraction of pixels that end more than the
detector's colour tolerance (70 RGB levels) away from the original. A sampler starting
from pure noise is ``t0 = 1``; where the scores fall is the noise range the model does not
denoise well enough (docs/quality.md).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdit.diffusion.flow import interpolate  # noqa: E402
from jaxdit.eval.alignment import COLOR_TOL, alignment_scores  # noqa: E402
from jaxdit.eval.sampling import encode_captions  # noqa: E402
from jaxdit.train.load import load_experiment  # noqa: E402
from jaxdit.train.loop import validation_images  # noqa: E402


def denoise_from(apply, x0, noise, t0: float, num_steps: int):
    """Euler ODE from ``x_t0 = (1 - t0) x0 + t0 noise`` to t = 0; ``num_steps`` over [0, 1],
    so a start at ``t0`` takes ``round(num_steps * t0)`` of them. ``x0`` (B, H, W, C)."""
    x = interpolate(x0, noise, jnp.full((x0.shape[0],), t0, jnp.float32))
    times = np.linspace(t0, 0.0, max(1, int(round(num_steps * t0))) + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * -apply(x, jnp.full((x.shape[0],), t, jnp.float32))
    return jnp.clip(x, -1.0, 1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--t0", default="0.1,0.3,0.5,0.7,0.9,1.0")
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--num_steps", type=int, default=50)
    args = parser.parse_args(argv)
    exp, state, step = load_experiment(args.workdir)
    cfg = exp.config
    if cfg.data.source != "shapes" or cfg.text.kind == "none":
        print(f"Error: {args.workdir} is not a text-to-image run on the shapes data.",
              file=sys.stderr)
        return 1
    captions, images = validation_images(cfg, args.num_images)
    x0 = jnp.asarray(images)
    cond = {k: jnp.asarray(v) for k, v in
            encode_captions(exp.tokenizer, captions, cfg.text.max_len).items()}
    variables = {"params": state.ema_params, **state.model_state}
    apply = jax.jit(lambda x, t: exp.model.apply(variables, x, t, cond))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    print(f"{args.workdir} step {step}, {args.num_images} validation images")
    for t0 in (float(v) for v in args.t0.split(",")):
        out = np.asarray(denoise_from(apply, x0, noise, t0, args.num_steps))
        off = np.linalg.norm((out - np.asarray(x0)) * 127.5, axis=-1) > COLOR_TOL
        scores = alignment_scores(list(out), captions)
        print(f"t0 {t0:.2f}: " + " ".join(f"{k.split('/')[-1]} {v:.3f}"
                                          for k, v in scores.items())
              + f" | pixels off {off.mean():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
