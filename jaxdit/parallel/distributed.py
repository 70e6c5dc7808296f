"""Multi-host initialisation (``jax.distributed``).

* TPU VM pods: ``initialize()`` with no arguments; JAX finds the coordinator and the process
  ids from the TPU metadata (every host runs the same command, e.g. through
  ``tools/launch_tpu_vm.sh``).
* Elsewhere (GPU clusters, several CPU processes): pass the coordinator ``host:port``, the
  number of processes and this process's id, or set ``JAXDIT_COORDINATOR``,
  ``JAXDIT_NUM_PROCESSES`` and ``JAXDIT_PROCESS_ID``.

Call it before anything touches a device. Data is sharded per host by the input pipeline
(each host reads ``process_index::process_count`` of the records and contributes its slice
of the global batch); checkpoints are written by every host into one shared directory.
A process silent for ``PEER_TIMEOUT_S`` (``jaxdit train --peer_timeout``) is declared lost
and the others stop, naming it (:mod:`jaxdit.cli.supervise`).
"""
from __future__ import annotations

import os

import jax
from jax._src import distributed as jax_distributed  # its client: no public handle (barriers)

ENV = ("JAXDIT_COORDINATOR", "JAXDIT_NUM_PROCESSES", "JAXDIT_PROCESS_ID")


def on_tpu_vm() -> bool:
    """A TPU VM exposes its accelerator type through these variables or the metadata."""
    return bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_ID")
                or os.environ.get("CLOUD_TPU_TASK_ID"))


# Seconds without a peer's heartbeats before the coordination service declares it lost
# (jax's default is 100); a lost coordinator is noticed at once.
PEER_TIMEOUT_S = 60


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer.") from None


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` as configured explicitly (arguments win
    over the ``JAXDIT_*`` environment variables), or None when nothing is (one process, or
    a TPU VM, where JAX finds them itself). Touches no device."""
    coordinator = coordinator or os.environ.get(ENV[0])
    if num_processes is None:
        num_processes = _env_int(ENV[1])
    if process_id is None:
        process_id = _env_int(ENV[2])
    explicit = [coordinator, num_processes, process_id]
    if all(v is None for v in explicit):
        return None
    if any(v is None for v in explicit):
        raise ValueError("Multi-process runs need all of coordinator (host:port), "
                         "num_processes and process_id; got "
                         f"{dict(zip(('coordinator', 'num_processes', 'process_id'), explicit))}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
    return coordinator, num_processes, process_id


def tpu_pod_worker() -> int | None:
    """This host's worker id on a multi-host TPU VM slice, else None."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return int(os.environ.get("TPU_WORKER_ID", "0")) if len(hosts) > 1 else None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout_s: int = PEER_TIMEOUT_S) -> bool:
    """Starts ``jax.distributed`` when several processes are configured (:func:`settings`)
    or on a TPU VM; returns whether it did. A peer silent for ``peer_timeout_s`` is lost."""
    explicit = settings(coordinator, num_processes, process_id)
    if explicit is not None:
        coordinator, num_processes, process_id = explicit
        if num_processes == 1:
            return False
        if "cpu" in (os.environ.get("JAX_PLATFORMS") or ""):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id,
                                   heartbeat_timeout_seconds=peer_timeout_s)
        return True
    if on_tpu_vm():
        jax.distributed.initialize(heartbeat_timeout_seconds=peer_timeout_s)
        return jax.process_count() > 1
    return False


# How long a process waits at a compile barrier for its slowest peer (XLA:TPU compiles of
# large models take minutes; a peer that dies meanwhile is caught by the heartbeats).
COMPILE_BARRIER_TIMEOUT_S = 1800
_barrier_count = 0


def wait_for_peers(name: str, timeout_s: int = COMPILE_BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process of the run reaches the barrier ``name`` (no-op in one
    process). Every process must call it in the same order: the id gets a running count."""
    global _barrier_count
    if jax.process_count() == 1:
        return
    _barrier_count += 1
    jax_distributed.global_state.client.wait_at_barrier(
        f"jaxdit/{name}/{_barrier_count}", timeout_in_ms=timeout_s * 1000)


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))))
                           for x in leaves))


class PeerSynced:
    """A jitted function whose every new compilation is done ahead of time and followed by
    :func:`wait_for_peers` before it first runs, in multi-process runs.

    Why: CPU collectives (gloo) give a peer 30 s to join a collective, and the first run of a
    program starts its collectives right after that process's own compile; a process that
    compiles slower (a loaded host) would make the faster one fail. After the barrier all
    processes start the program together. In one process this is the jitted function as is.
    """

    def __init__(self, jitted, name: str):
        self._jitted, self._name, self._seen = jitted, name, set()

    def __call__(self, *args):
        if jax.process_count() > 1:
            key = _signature(args)
            if key not in self._seen:
                self._jitted.lower(*args).compile()  # fills the jit cache: no second compile
                wait_for_peers(self._name)
                self._seen.add(key)
        return self._jitted(*args)

    def __getattr__(self, attr):  # lower, trace, eval_shape, ... of the jitted function
        return getattr(self._jitted, attr)
