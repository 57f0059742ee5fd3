"""Meshes: the --mesh flag, parsed and checked.

Two axes: "data" (calibration and evaluation windows and stacks of matrices are split over
it) and "model" (weights are also sharded over it, FSDP style). Batches go over both axes
together (`BATCH`): every device works on its own windows or matrices.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["AXES", "BATCH", "mesh_shape", "parse_mesh", "one_device_mesh", "describe",
           "num_devices", "simulate_cpu_devices", "CPU_THREADS_PER_DEVICE"]

AXES = ("data", "model")
BATCH = ("data", "model")            # batch / stack axis: every device
CPU_THREADS_PER_DEVICE = 4           # XLA CPU threads per simulated device (see below)


def simulate_cpu_devices(n: int, threads_per_device: int = CPU_THREADS_PER_DEVICE) -> None:
    """Simulate n devices on the CPU (to run --mesh without accelerators). Call right after
    `import jax`, before any JAX operation (else JAX raises).

    Also sizes XLA's CPU thread pools to threads_per_device * n threads (the environment
    variable PJRT_NPROC, unless it is set already). Why: XLA runs every simulated device's
    program on one shared pool of max(cores, devices) threads, and a collective holds its
    thread until every device of its group arrives. A program with collectives inside loops
    (the scanned fine-tuning step on a data x model mesh) can have several of them waiting
    per device, so a pool of one thread per device can fill with waiting collectives while
    the devices they wait for have no thread left to run on: XLA then aborts the process
    after its rendezvous timeout. Measured on 2 cores (8 devices): the e2e step on
    data:4,model:2 hung so in 3 of 16 runs with 8 threads, in none of 15 with 32 (BUILD_NOTES,
    issue 17). The pool size does not change results (bit for bit in the tests)."""
    if n < 1:
        raise ValueError(f"simulate_cpu_devices: n must be >= 1, got {n}")
    jax.config.update("jax_num_cpu_devices", n)    # raises first if JAX has started
    # read when the CPU backend starts, after this
    os.environ.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, threads_per_device * n)))


def mesh_shape(spec: Optional[str]) -> dict:
    """{"data": a, "model": b} from a --mesh string ("data:8", "data:2,model:4", "model:8");
    an axis left out has size 1; None or "" is {"data": 1, "model": 1}. Clear errors."""
    if spec is None or not spec.strip():
        return {a: 1 for a in AXES}
    sizes = {}
    for part in spec.split(","):
        part = part.strip()
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--mesh={spec!r}: each axis is written name:size (e.g. data:8 or "
                             f"data:2,model:4), got {part!r}")
        if name not in AXES:
            raise ValueError(f"--mesh={spec!r}: unknown axis {name!r}; the axes are 'data' "
                             "(windows and matrices are split over it) and 'model' (weights "
                             "are sharded over it)")
        if name in sizes:
            raise ValueError(f"--mesh={spec!r}: axis {name!r} is given twice")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"--mesh={spec!r}: the size of axis {name!r} must be a positive "
                             f"integer, got {size!r}") from None
        if n < 1:
            raise ValueError(f"--mesh={spec!r}: the size of axis {name!r} must be >= 1, got {n}")
        sizes[name] = n
    return {a: sizes.get(a, 1) for a in AXES}


def parse_mesh(spec: Optional[str], devices: Optional[Sequence] = None,
               n_devices: Optional[int] = None) -> Optional[Mesh]:
    """A Mesh with axes ("data", "model") from "data:8", "data:2,model:4", "model:8".

    None or "" means no mesh (one device, the default programs). An axis left out has size 1.
    The sizes must multiply to the number of devices. `n_devices` checks a spec against a
    device count without building a mesh (returns None).
    """
    if spec is None or not spec.strip():
        return None
    shape = tuple(mesh_shape(spec)[a] for a in AXES)
    total = int(np.prod(shape))
    if devices is None and n_devices is None:
        devices = jax.devices()
    have = len(devices) if devices is not None else n_devices
    if total != have:
        platform = devices[0].platform + " " if devices is not None and len(devices) else ""
        raise ValueError(
            f"--mesh={spec!r} needs {total} devices but {have} {platform}devices are visible: "
            f"the axis sizes must multiply to the device count (for {have} devices e.g. "
            f"data:{have}" + (f" or data:{have // 2},model:2" if have % 2 == 0 and have > 1 else "")
            + "); use CUDA_VISIBLE_DEVICES to use fewer GPUs, or --cpu_devices=N "
            "(`simulate_cpu_devices`) to simulate devices on a CPU")
    if devices is None:
        return None
    return Mesh(np.asarray(devices).reshape(shape), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def one_device_mesh() -> Mesh:
    """The mesh of the default (no --mesh) programs: this process's first device, axes of
    size 1 (in a run of several processes each computes such a program by itself)."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        return "no mesh (1 device)"
    return (",".join(f"{a}:{mesh.shape[a]}" for a in AXES)
            + f" ({mesh.size} {mesh.devices.flat[0].platform} devices)")


def num_devices(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.size
