"""One run per workdir: an advisory lock held for the whole run.

``<workdir>/.jaxdit.lock`` is ``flock``-ed by process 0 of the run for as long as it trains
(the operating system drops the lock when the process dies, however it dies), and holds
who took it (pid, host, time). A second run on the same workdir is refused before it
touches ``checkpoints/`` or ``metrics.jsonl``; a lock file left by a run that died is
taken over with a warning. The file is never deleted (deleting it would let a third
process lock a new file while a second still holds the old one), only emptied on exit.
On several hosts process 0 decides and every process learns the decision.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_NAME = ".jaxdit.lock"


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir's lock."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on {info['host']}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['time']))}")
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


class WorkdirLock:
    """Context manager: ``with WorkdirLock(workdir): ...`` trains alone in ``workdir`` or
    raises :class:`WorkdirBusy` naming the run that holds it."""

    def __init__(self, workdir: str, warn=print):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.warn = warn
        self._fd = None

    def __enter__(self):
        refused = ""
        if jax.process_index() == 0:
            refused = self._acquire()
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(not refused))
            if not ok and not refused:
                refused = (f"Another run is using {os.path.dirname(self.path)} (process 0 "
                           "found its lock); wait for it to finish or use another --workdir.")
        if refused:
            raise WorkdirBusy(refused)
        return self

    def _acquire(self) -> str:
        """Takes the lock; returns the refusal message when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            return (f"Another run ({held_by}) is using {os.path.dirname(self.path)}: wait "
                    f"for it to finish, stop it, or use another --workdir. (Lock: {self.path})")
        except OSError as e:  # a filesystem without flock (some network mounts)
            os.close(fd)
            self.warn(f"Warning: cannot lock {self.path} ({e.strerror}); running without the "
                      "one-run-per-workdir check: do not start a second run on this workdir.")
            return ""
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if left:
            self.warn(f"Warning: took over the lock of a run that did not exit cleanly "
                      f"({_holder(left)}); its checkpoints are resumed as usual.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "time": time.time()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return ""

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean exit leaves nothing to take over
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
