"""Two processes x 4 fake CPU devices on localhost (jax.distributed with gloo collectives):
train a few steps with per-host data, checkpoint, then restore in a new pair of processes."""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_pair(workdir: str, steps: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxdit.train", "--config", "experiments/dit_air.py:tiny",
         "--workdir", workdir, "--coordinator", f"localhost:{port}", "--num_processes", "2",
         "--process_id", str(i), f"--config.train.steps={steps}", "--config.train.log_every=1",
         "--config.train.batch_size=8", "--config.model.depth=1", "--config.train.ckpt_every=2",
         "--config.train.eval_every=0", "--config.train.val_batches=1",
         "--config.sampler.num_steps=2", "--config.sampler.num_samples=4",
         "--config.sampler.method=euler", "--config.sampler.sde=False"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=500)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    wd = str(tmp_path / "wd")
    first = _run_pair(wd, steps=2)
    assert all("global batch 8" in out and "'data': 8" in out for out in first)
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
    assert os.path.exists(os.path.join(wd, "samples", "step_0000002.png"))
    os.remove(os.path.join(wd, "samples", "step_0000002.png"))
    # A new pair restores the sharded state (params, optimizer, data iterators of both
    # hosts), trains one more step, saves and samples from it.
    second = _run_pair(wd, steps=3)
    assert all("Resumed from checkpoint step 2" in out for out in second)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
    assert os.path.exists(os.path.join(wd, "samples", "step_0000003.png"))
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2, 3]  # only the first process writes metrics
