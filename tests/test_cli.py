"""The README's main command, end to end with a tiny step count, in a fresh process."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_train_then_sample_from_checkpoint(tmp_path):
    wd = str(tmp_path / "wd")
    out = _run(["jaxdit.train", "--config", "experiments/dit_air.py:tiny", "--workdir", wd,
                "--config.train.steps=3", "--config.train.log_every=1",
                "--config.train.batch_size=8", "--config.model.depth=1",
                "--config.sampler.num_steps=2", "--config.sampler.num_samples=4",
                "--config.train.val_batches=1"], tmp_path)
    assert "Done: loss" in out
    # Compilation is announced and timed; the summary names every output of the run.
    assert "Compiling the dit_air train step (global batch 8)" in out
    assert "Compiled and ran the first step in" in out
    for name, path in (("checkpoint", os.path.join(wd, "checkpoints", "3")),
                       ("metrics", os.path.join(wd, "metrics.jsonl")),
                       ("tensorboard", os.path.join(wd, "tb"))):
        assert any(line.split() == [name, path] for line in out.splitlines()), (name, out)
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["3"]
    grid = Image.open(os.path.join(wd, "samples", "step_0000003.png"))
    assert grid.size[0] > 32 and grid.mode == "RGB"
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("val/loss" in r for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
    # The same command again: the run is finished; it says so and changes nothing.
    again = _run(["jaxdit.train", "--config", "experiments/dit_air.py:tiny", "--workdir", wd,
                  "--config.train.steps=3", "--config.model.depth=1"], tmp_path)
    assert "already finished" in again and "raise --config.train.steps" in again
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["3"]

    png = str(tmp_path / "grid.png")
    out = _run(["jaxdit.sample", "--workdir", wd, "--prompt", "a red circle",
                "--prompt", "a blue square above a green triangle", "--out", png,
                "--num_per_prompt", "3", "--num_steps", "2", "--width", "48"], tmp_path)
    assert "from checkpoint step 3" in out
    img = Image.open(png)
    assert img.size == (3 * 48 + 4 * 2, 2 * 32 + 3 * 2)  # 3 columns x 2 rows of 32x48 + padding

    # `python -m jaxdit.eval`'s work, in process: validation loss + alignment of samples
    from jaxdit.cli.eval import evaluate_step  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from jaxdit.eval.fid import InceptionV3  # pylint: disable=import-outside-toplevel
    inception = InceptionV3(size=80)  # random weights, small input: the machinery only
    weights = jax.jit(lambda: inception.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, 3))))()["params"]
    res = evaluate_step(wd, None, num_samples=6, sample_batch=4,
                        inception=(inception, weights))
    assert res["step"] == 3 and res["val/loss"] > 0
    for key in ("align/color", "align/count", "align/shape", "align/overall"):
        assert 0.0 <= res[key] <= 1.0, key
    assert np.isfinite(res["fid"]) and res["fid"] > 0


def test_race_dit_trains_and_samples_by_label(tmp_path):
    """Class-conditional Race-DiT through the same CLI: MoE metrics logged, samples by label."""
    wd = str(tmp_path / "race")
    out = _run(["jaxdit.train", "--config", "experiments/race_dit.py:tiny-4in16",
                "--workdir", wd, "--config.train.steps=2", "--config.train.log_every=1",
                "--config.train.batch_size=8", "--config.model.depth=1",
                "--config.sampler.num_steps=2", "--config.sampler.num_samples=4",
                "--config.train.val_batches=1"], tmp_path)
    assert "Model race_dit" in out
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8")]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("moe/maxvio", "moe/comb", "moe/experts_per_token", "plr_loss",
                "aux/router_similarity", "moe/batch_threshold"):
        assert key in train_rows[-1], key
    assert abs(train_rows[-1]["moe/experts_per_token"] - 4.0) < 1e-5  # K = B*L*k exactly
    names = open(os.path.join(wd, "samples", "step_0000002.txt"), encoding="utf-8").read()
    assert "a red circle" in names

    # No --out: the grid goes into the workdir, beside the training samples.
    out = _run(["jaxdit.sample", "--workdir", wd, "--label", "0", "--label", "7",
                "--num_per_prompt", "2", "--num_steps", "2"], tmp_path)
    png = os.path.join(wd, "samples", "sampled_step_0000002.png")
    assert "from checkpoint step 2" in out
    assert Image.open(png).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert "a green square" in open(png.replace(".png", ".txt"), encoding="utf-8").read()

    # A label that is not a class: refused in one line, no traceback, nothing written.
    bad = subprocess.run([sys.executable, "-m", "jaxdit.sample", "--workdir", wd, "--label", "18",
                          "--out", str(tmp_path / "bad.png")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=_env())
    assert bad.returncode != 0 and "Traceback" not in bad.stderr + bad.stdout
    assert "--label 18 is not a class of this checkpoint: labels run from 0 to 17" in bad.stderr
    assert not os.path.exists(tmp_path / "bad.png")
