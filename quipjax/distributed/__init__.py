"""Distribution as placement: one code path for 1 or N devices, in 1 or N processes.

`processes`: several processes (hosts) in one run (`jax.distributed`); `mesh`: the --mesh
flag (axes "data" and "model"); `placement`: where parameters and batches live, declared
once by rules (`Placement`, a no-op without a mesh); `programs`: the compiled shard_map
programs of the pipeline (block forward, Hessian engine, one matrix per device for
`quantize_stack`, evaluation), the same bits on any mesh.
"""
from __future__ import annotations

from quipjax.distributed import processes
from quipjax.distributed.mesh import (AXES, BATCH, CPU_THREADS_PER_DEVICE, describe, mesh_shape,
                                      num_devices, one_device_mesh, parse_mesh,
                                      simulate_cpu_devices)
from quipjax.distributed.placement import RULES, Placement, spec_for
from quipjax.distributed.programs import (DEFAULT_HESSIAN_SHARDS, EvalPrograms, HessianEngine,
                                          ShardLift, block_forward_fn, collectives, gather,
                                          nll_sum)

__all__ = ["processes", "AXES", "BATCH", "mesh_shape", "parse_mesh", "one_device_mesh", "describe",
           "num_devices", "simulate_cpu_devices", "CPU_THREADS_PER_DEVICE", "RULES", "spec_for",
           "Placement", "DEFAULT_HESSIAN_SHARDS",
           "block_forward_fn", "HessianEngine", "ShardLift", "EvalPrograms", "nll_sum",
           "collectives", "gather"]
