"""What the Pallas decode-matmul kernels share: the launch, a (row blocks, K splits) grid of
programs over operands left in place (`pl.ANY`), each writing its split's partial sums (the
splits are added by XLA); and a float32 fused multiply-add."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["split_k_call", "fma", "k_range"]


def k_range(nk: int, ks: int):
    """The K steps [k0, k1) of this program's split (grid axis 1): ks steps each, the last
    split cut at nk."""
    s = pl.program_id(1)
    return s * ks, jnp.minimum((s + 1) * ks, nk)


def fma(a, b, c, ptx: bool):
    """a * b + c, float32 arrays of one shape. ptx (compiling for a GPU): one inline
    `fma.rn.f32`, since Triton emits a * b + c as mul.rn + add.rn, which ptxas may not
    contract (two instructions per weight in a matvec); otherwise (the interpreter, which
    cannot run inline PTX) a * b + c, one rounding more."""
    if not ptx:
        return a * b + c
    return pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


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
