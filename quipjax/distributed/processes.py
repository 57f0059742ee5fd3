"""Several processes (hosts) in one run, on JAX's own runtime (`jax.distributed`).

    processes.initialize()                          # SLURM / Open MPI / TPU / k8s environments
    processes.initialize("10.0.0.1:1234", 2, 0)     # or explicit: coordinator, count, index
    mesh = parse_mesh("data:16")                    # then spans every process's devices

Every process runs the same program (SPMD). What differs between them is kept here:
* which rows of a batch a process owns (`local_rows`) and how its share becomes part of a
  global array (`put_local`) or comes back (`local_part`, `to_host`);
* who writes files: process 0 (`is_writer`), the others wait for it at a `barrier`;
* who prints: process 0 (`is_writer`).

With one process every function is the plain single-process operation (no collective, no
barrier), so the pipeline has one code path.
"""
from __future__ import annotations

import sys
from typing import Optional

import jax
import numpy as np

__all__ = ["initialize", "count", "index", "is_writer", "barrier", "local_dir", "local_rows",
           "put_local",
           "local_part", "to_host", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300           # seconds a process waits for the others to start


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout: int = DEFAULT_TIMEOUT,
               heartbeat: int = 60) -> None:
    """Join the run's processes (`jax.distributed.initialize`); call before any JAX work.

    Without arguments the cluster is read from the environment (SLURM, Open MPI, TPU pods,
    Kubernetes); otherwise coordinator "host:port", num_processes and process_id are all
    given. timeout: seconds to wait for every process to connect (a process that never
    starts makes the others fail after it); heartbeat: seconds after which a process that
    died is declared dead and the others stop with an error instead of waiting forever.
    CPU processes exchange data through gloo (JAX's CPU collectives)."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num_processes and --process_id go together (or give "
                         "none of them and let JAX read the cluster from SLURM / Open MPI / "
                         "TPU / Kubernetes environment variables)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                         f"{num_processes})")
    if jax.distributed.is_initialized():
        return
    # the CPU backend's cross-process collectives (unused where the devices are GPUs / TPUs)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes is not None:   # said first: a peer that never comes aborts the process
        print(f"process {process_id} of {num_processes}: joining the coordinator at "
              f"{coordinator} (waiting up to {timeout} s for the others)", file=sys.stderr,
              flush=True)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout),
                                   heartbeat_timeout_seconds=int(heartbeat))
    except ValueError as e:         # no cluster in the environment and nothing explicit
        raise ValueError(f"--distributed: {e}: pass --coordinator=host:port --num_processes=N "
                         "--process_id=i, or launch under SLURM / Open MPI / a TPU pod") from e
    except Exception as e:          # the others never came (DEADLINE_EXCEEDED) or the address
        raise RuntimeError(f"--distributed: joining the {num_processes or ''} processes at "
                           f"{coordinator or 'the cluster coordinator'} failed within {timeout} "
                           f"s (did every process start, with the same --coordinator?): "
                           f"{' '.join(str(e).split())[:400]}") from None


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes files and prints progress: process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op with one process): after process 0 wrote
    something the others read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def local_dir(path: str) -> str:
    """This process's own work directory beside `path`: `path` itself with one process, else
    `path.p<index>of<count>` (work files that only this process reads and writes)."""
    if jax.process_count() == 1:
        return path
    return f"{path}.p{jax.process_index()}of{jax.process_count()}"


def local_rows(sharding, n: int) -> tuple:
    """(start, stop): the rows of a leading axis of n, laid out by `sharding`, that live on
    this process's devices (all of them with one process). They must be contiguous, which
    they are for meshes built from `jax.devices()` in order (`parse_mesh`)."""
    if jax.process_count() == 1:
        return 0, n
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map((n,)).values():
        s = idx[0] if idx else slice(None)
        a, b, _ = s.indices(n)
        starts.append(a)
        stops.append(b)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(n, bool)
    for a, b in zip(starts, stops):
        covered[a:b] = True
    if not covered[lo:hi].all():
        raise ValueError("this process's devices hold rows that are not contiguous in the "
                         "mesh: build the mesh from jax.devices() in order (--mesh)")
    return lo, hi


def put_local(local: np.ndarray, sharding, n: int):
    """The global array (n, ...) laid out by `sharding` from this process's rows `local`
    (rows `local_rows(sharding, n)`); with one process, `jax.device_put(local, sharding)`."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                  (n,) + tuple(np.shape(local)[1:]))


def local_part(x) -> np.ndarray:
    """This process's rows of a global array sharded over its leading axis, as numpy (rows
    `local_rows`; replicated shards counted once); with one process, `np.asarray(x)`."""
    if x.is_fully_addressable:
        return np.asarray(x)
    parts = {}
    for s in x.addressable_shards:
        start = s.index[0].indices(x.shape[0])[0] if s.index else 0
        parts.setdefault(start, s.data)
    return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)], 0)


def to_host(x) -> np.ndarray:
    """The whole value of a global array on every process, as numpy (gathered from the other
    processes when some of it lives only there)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
