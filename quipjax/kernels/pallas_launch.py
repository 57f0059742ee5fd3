"""The launch the Pallas decode-matmul kernels share: a (row blocks, K splits) grid of
programs over operands left in place (`pl.ANY`), each writing its split's partial sums; the
splits are added by XLA."""
from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["split_k_call"]


def split_k_call(kern, args, out_shape, out_spec, grid, cfg: dict, interpret: bool, name: str):
    """pallas_call of `kern` on `args` (all `pl.ANY`) over `grid`; out_shape's leading axis is
    the K split, summed here. cfg: "num_warps", "num_stages" of the Triton compile."""
    part = pl.pallas_call(
        kern, out_shape=out_shape, grid=grid,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(args),
        out_specs=out_spec, interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=cfg["num_warps"],
                                                num_stages=cfg["num_stages"]),
        name=name,
    )(*args)
    return part.sum(0)
