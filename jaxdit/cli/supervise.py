"""Multi-process runs that end with a name when a peer disappears.

When a process of a ``jax.distributed`` run dies (a host crash, an OOM kill), the others
learn it from the coordination service: after ``heartbeat_timeout_seconds`` without its
heartbeats, or at once when the lost one is the coordinator (process 0). The service
client then aborts the process from C++ (a fatal-error dump of every thread, exit -6);
nothing in Python can catch that. So a multi-process ``jaxdit train`` runs the training in
a child process and watches it: the child's output is passed through line by line until
the first line of a fatal abort (:data:`FATAL_MARKERS`); the dump from it goes to a log file in the
workdir (``logs/``), and this process prints one line naming the lost process and the last
complete checkpoint, and exits with :data:`EXIT_PEER_LOST`. Relaunching every process
resumes from that checkpoint. SIGTERM and SIGINT are passed on to the child (preemption
notices keep working). Nothing here imports jax.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading

EXIT_PEER_LOST = 3
CHILD_ENV = "JAXDIT_SUPERVISED"  # set in the child: it trains instead of supervising
# The first line of what a process aborted from C++ prints: the coordination service
# client's last words, a failed check, an uncaught C++ exception (e.g. a collective whose
# peer is gone), Python's fatal-error handler.
FATAL_MARKERS = ("JAX distributed service detected fatal errors", "*** Check failure",
                 "terminate called after throwing", "Fatal Python error")
# What in such a dump says that another process is gone.
PEER_LOST_SIGNS = ("JAX distributed service detected fatal errors", "stopped sending heartbeats",
                   "Connection closed by peer", "Connection reset by peer", "Socket closed",
                   "gloo")
_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def last_complete_checkpoint(workdir: str) -> int | None:
    """The newest finished checkpoint step in ``workdir/checkpoints`` (Orbax renames a
    save's ``<step>.orbax-checkpoint-tmp`` folder to ``<step>`` only once it is complete)."""
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps) if steps else None


def lost_processes(dump: str, process_id: int) -> str:
    """Which process the fatal text says is gone: ``"process 1"``, ``"processes 1, 2"``, or
    the coordinator when this process lost its connection to it."""
    match = _UNHEALTHY.search(dump)
    if match:
        ids = [i for i in re.split(r"[,\s]+", match.group(1).strip()) if i]
        return ("process " if len(ids) == 1 else "processes ") + ", ".join(ids)
    if process_id == 0:
        return "another process"
    return "the coordinator (process 0)"


def saved_text(workdir: str) -> str:
    step = last_complete_checkpoint(workdir)
    return (f"the last complete checkpoint is step {step} in {workdir}/checkpoints"
            if step is not None else f"no checkpoint was completed in {workdir}")


def peer_lost_message(dump: str, process_id: int, workdir: str) -> str:
    saved = saved_text(workdir)
    return (f"Lost {lost_processes(dump, process_id)} of the run: process {process_id} "
            f"stopped (exit {EXIT_PEER_LOST}); {saved}. Relaunch every process with the same "
            "command to resume from it.")


class _Relay(threading.Thread):
    """Copies a child's stream to ``out`` until a fatal marker, then to ``dump`` only."""

    def __init__(self, stream, out):
        super().__init__(daemon=True)
        self.stream, self.out = stream, out
        self.dump: list[str] = []

    def run(self):
        for line in self.stream:
            if self.dump or any(m in line for m in FATAL_MARKERS):
                self.dump.append(line)
                continue
            self.out.write(line)
            self.out.flush()


def supervise(argv: list[str], workdir: str, process_id: int) -> int:
    """Runs ``python -m jaxdit.train <argv>`` as a child and returns the exit code to use:
    the child's, or :data:`EXIT_PEER_LOST` (after one line on stderr) when the coordination
    service ended it because a peer was lost."""
    env = dict(os.environ, **{CHILD_ENV: "1", "PYTHONUNBUFFERED": "1"})
    child = subprocess.Popen([sys.executable, "-m", "jaxdit.train", *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             errors="replace")
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    relays = [_Relay(child.stdout, sys.stdout), _Relay(child.stderr, sys.stderr)]
    try:
        for relay in relays:
            relay.start()
        returncode = child.wait()
        for relay in relays:
            relay.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    dump = "".join(relays[0].dump + relays[1].dump)
    code = returncode if returncode >= 0 else 128 - returncode
    if not dump:
        return code
    log = _write_dump(dump, workdir, process_id)
    if not any(sign in dump for sign in PEER_LOST_SIGNS):
        print(f"Process {process_id} aborted (exit {code}); {saved_text(workdir)}. Its "
              f"report: {log}", file=sys.stderr, flush=True)
        return code
    print(f"{peer_lost_message(dump, process_id, workdir)} (the report: {log})",
          file=sys.stderr, flush=True)
    return EXIT_PEER_LOST


def _write_dump(dump: str, workdir: str, process_id: int) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(workdir, "logs", f"peer_lost_process{process_id}_{stamp}.log")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(dump)
    except OSError:
        return "not written: the workdir is not writable"
    return path
