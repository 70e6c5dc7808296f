"""``python -m tests.health_check FAMILY``: trains one family's tiny config for a few dozen
steps with its defaults and prints one JSON line (losses, skip flags, non-finite leaves).

Run in its own process by ``tests/test_training_health.py``: these runs are bound by
execution, which the suite's ``-O0`` compile flag (tests/conftest.py) slows 3-4x.
"""
import json
import sys

import jax
import numpy as np
from absl import flags

from jaxdit.data.pipeline import make_dataset
from jaxdit.train.health import nonfinite_paths
from jaxdit.train.loop import Experiment
from tests.helpers import preset

STEPS = 40
# Race-DiT runs at full size (below), 1.2 s a step: 24 steps still cover its old failure
# (step 3) and a loss that falls by a quarter.
STEPS_FOR = {"race_dit": 24}
CASES = {
    "dit_air": lambda: preset("dit_air", "tiny"),
    "pixart": lambda: preset("pixart", "tiny"),
    "mmdit": lambda: preset("mmdit", "tiny"),
    "race_dit": lambda: preset("race_dit", "tiny-4in16"),  # PLR + router similarity
    "lumina": lambda: preset("lumina", "tiny"),
    "dvae": lambda: preset("d2it", "dvae-tiny"),
    "d2it": lambda: preset("d2it", "tiny"),
    "kl_vae": lambda: preset("vae", "tiny-4ch"),
}
# Trained at their full tiny size and batch: Race-DiT's old failure needs a starved expert,
# which depth 2 / batch 16 did not produce (the old optimizer passed there).
FULL_SIZE = ("race_dit",)


def health_config(family: str):
    """The family's tiny config with its defaults; only the cost is cut (depth 2, batch 16
    for the transformers outside ``FULL_SIZE``; batch 16 for the autoencoders)."""
    config = CASES[family]()
    if family not in FULL_SIZE:
        if config.model.depth:  # the autoencoders have no transformer depth
            config.model.depth = 2
        config.train.batch_size = 16
    steps = STEPS_FOR.get(family, STEPS)
    config.train.update(steps=steps, eval_every=0, ckpt_every=steps)
    return config


def train(config) -> dict:
    """Losses and skip flags of ``train.steps`` train steps on the config's own data."""
    exp = Experiment(config, jax.devices()[:1])
    ds = iter(make_dataset(config, "train", config.train.batch_size))
    losses, skipped = [], []
    with exp.context():
        state = exp.create_state()
        batch = exp.to_global(next(ds))
        step = exp.jit_train_step(batch)
        for i in range(config.train.steps):
            if i:
                batch = exp.to_global(next(ds))
            state, metrics = step(state, batch)
            m = jax.device_get({k: metrics[k] for k in ("loss", "skipped")})
            losses.append(float(m["loss"]))
            skipped.append(float(m["skipped"]))
        return {"losses": losses, "skipped": skipped, "nonfinite": nonfinite_paths(state)}


if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    jax.config.update("jax_threefry_partitionable", True)
    out = train(health_config(sys.argv[1]))
    print(json.dumps({k: np.asarray(v).tolist() if k != "nonfinite" else v
                      for k, v in out.items()}))
