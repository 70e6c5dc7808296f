"""Two processes x 4 fake CPU devices on localhost (jax.distributed with gloo collectives):
train a few steps with per-host data, checkpoint, then restore in a new pair of processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from jaxdit.cli import supervise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pair(workdir: str, steps: int, extra=(), **popen) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "jaxdit.train", "--config", "experiments/dit_air.py:tiny",
         "--workdir", workdir, "--coordinator", f"localhost:{port}", "--num_processes", "2",
         "--process_id", str(i), f"--config.train.steps={steps}", "--config.train.log_every=1",
         "--config.train.batch_size=8", "--config.model.depth=1", "--config.train.ckpt_every=2",
         "--config.train.eval_every=0", "--config.train.val_batches=1",
         "--config.sampler.num_steps=2", "--config.sampler.num_samples=4",
         "--config.sampler.method=euler", "--config.sampler.sde=False", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        **popen) for i in range(2)]


def _finish(procs, timeout: float = 500) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outs


def _run_pair(workdir: str, steps: int) -> list[str]:
    procs = _start_pair(workdir, steps)
    outs = _finish(procs)
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


def test_a_lost_peer_stops_the_other_naming_it_and_the_relaunch_resumes(tmp_path):
    """Process 1 dies (its whole process group, as a host would): process 0 stops within
    the peer timeout with one line naming the lost process and the last complete
    checkpoint, exit 3, no fatal-error dump on its output; relaunching resumes."""
    wd = str(tmp_path / "wd")
    procs = _start_pair(wd, steps=1000, extra=["--peer_timeout=10"], start_new_session=True)
    deadline = time.time() + 400
    while not os.path.isdir(os.path.join(wd, "checkpoints", "4")):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outs = [p.communicate()[0] for p in procs]
            raise AssertionError("no progress:\n" + "\n".join(
                f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}"
                for i, (p, out) in enumerate(zip(procs, outs))))
        time.sleep(0.5)
    os.killpg(procs[1].pid, signal.SIGKILL)
    lost_at = time.time()
    out = _finish(procs[:1], timeout=120)[0]
    waited = time.time() - lost_at
    procs[1].wait()
    assert procs[0].returncode == 3, out[-3000:]
    assert waited < 60, waited
    line = [l for l in out.splitlines() if l.startswith("Lost process 1 of the run")]
    assert line, out[-3000:]
    assert "Check failure" not in out and "Fatal Python error" not in out
    step = int(line[0].split("last complete checkpoint is step ")[1].split()[0])
    assert step >= 4 and os.path.isdir(os.path.join(wd, "checkpoints", str(step)))
    logs = os.listdir(os.path.join(wd, "logs"))
    assert len(logs) == 1 and logs[0].startswith("peer_lost_process0_")
    again = _run_pair(wd, steps=step + 1)
    assert all(f"Resumed from checkpoint step {step}" in o for o in again)


def test_the_lost_process_is_read_from_the_services_report(tmp_path):
    unhealthy = ("E1207 coordination_service.cc:1549] ... UNAVAILABLE: The following tasks are "
                 "unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.")
    assert supervise.lost_processes(unhealthy, 0) == "process 1"
    assert supervise.lost_processes("PollForError ... Socket closed", 1) == (
        "the coordinator (process 0)")
    os.makedirs(tmp_path / "checkpoints" / "4")
    os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp")
    message = supervise.peer_lost_message(unhealthy, 0, str(tmp_path))
    assert message.startswith("Lost process 1 of the run: process 0 stopped (exit 3)")
    assert "the last complete checkpoint is step 4" in message


def test_bad_multi_process_flags_fail_in_one_line(tmp_path):
    for flags, expected in ((["--peer_timeout=0"], "--peer_timeout must be at least 1"),
                            ([], "need all of coordinator")):
        out = subprocess.run(
            [sys.executable, "-m", "jaxdit.train", "--config", "experiments/dit_air.py:tiny",
             "--workdir", str(tmp_path / "wd"), "--num_processes", "2", *flags],
            cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
            text=True, timeout=120)
        assert out.returncode == 1 and expected in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "wd")
