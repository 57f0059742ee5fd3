"""What the Pallas decode-matmul kernels share: the launch, a (row blocks, K splits) grid of
programs over operands left in place (`pl.ANY`), each writing its split's partial sums (the
splits are added by XLA); and single PTX instructions Triton does not emit on its own (a
float32 fused multiply-add, a three-input bitwise `lop3`, a byte dot product `dp4a`, a byte
permute `prmt`, a funnel shift `shf`), each
with the plain JAX expression of the same value for the interpreter, which cannot run PTX."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["split_k_call", "fma", "and_xor", "and_or", "xor_masked", "byte_sum", "middle_half",
           "funnel", "k_range",
           "AND_XOR_LUT", "AND_OR_LUT", "XOR_MASKED_LUT"]

# truth tables of lop3: bit (4 a + 2 b + c) of the table is f(a, b, c), i.e. the table is
# f(0xF0, 0xCC, 0xAA)
AND_XOR_LUT = (0xF0 & 0xCC) ^ 0xAA          # (a & b) ^ c
AND_OR_LUT = (0xF0 & 0xCC) | 0xAA           # (a & b) | c
XOR_MASKED_LUT = 0xF0 ^ (0xCC & 0xAA)       # a ^ (b & c)


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
    return _asm("fma.rn.f32 $0, $1, $2, $3;", [a, b, c], jnp.float32, "=r,r,r,r")


def _asm(code, args, dtype, constraints):
    """One inline PTX instruction per element; unsigned operands and results go through as
    int32 (Triton's inline asm takes signless integers only)."""
    def signless(a):
        return jax.lax.bitcast_convert_type(a, jnp.int32) if a.dtype == jnp.uint32 else a
    rdt = jnp.int32 if dtype == jnp.uint32 else dtype
    r = pltriton.elementwise_inline_asm(
        code, args=[signless(a) for a in args], constraints=constraints, pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, rdt)])[0]
    return jax.lax.bitcast_convert_type(r, dtype) if rdt != dtype else r


def _lop3(a, b, c, table: int, plain, ptx: bool):
    """One `lop3.b32` of uint32 arrays a, b, c (b, c: Python ints are broadcast, and held
    in registers: a LOP3 takes one immediate, so two constants would cost two LOP3s);
    `plain()` is the same value for the interpreter."""
    if not ptx:
        return plain()
    b, c = (jnp.full(a.shape, v, jnp.uint32) if isinstance(v, int) else v for v in (b, c))
    return _asm(f"lop3.b32 $0, $1, $2, $3, {table:#x};", [a, b, c], jnp.uint32, "=r,r,r,r")


def and_xor(a, mask: int, xor: int, ptx: bool):
    """(a & mask) ^ xor, a uint32 array: one `lop3` (Triton emits an `and` and an `xor`,
    two LOP3s in SASS)."""
    return _lop3(a, mask, xor, AND_XOR_LUT, lambda: (a & jnp.uint32(mask)) ^ jnp.uint32(xor),
                 ptx)


def and_or(a, mask: int, bits: int, ptx: bool):
    """(a & mask) | bits, a uint32 array: one `lop3`."""
    return _lop3(a, mask, bits, AND_OR_LUT, lambda: (a & jnp.uint32(mask)) | jnp.uint32(bits),
                 ptx)


def xor_masked(a, b, mask: int, ptx: bool):
    """a ^ (b & mask), uint32 arrays a, b: one `lop3`."""
    return _lop3(a, b, mask, XOR_MASKED_LUT, lambda: a ^ (b & jnp.uint32(mask)), ptx)


def byte_sum(a, offset: int, ptx: bool):
    """The sum of the four bytes of a (uint32 array) plus `offset` -> int32. ptx: one
    `dp4a.u32.u32` against 0x01010101 (Triton's shifts, masks and adds take ~7 instructions);
    the sum (at most 1020) plus the offset taken mod 2^32 is the int32 result."""
    if not ptx:
        s = (a & 255) + ((a >> 8) & 255) + ((a >> 16) & 255) + (a >> 24)
        return s.astype(jnp.int32) + jnp.int32(offset)
    ones = jnp.full(a.shape, 0x01010101, jnp.uint32)
    c = jnp.full(a.shape, offset % (1 << 32), jnp.uint32)
    r = _asm("dp4a.u32.u32 $0, $1, $2, $3;", [a, ones, c], jnp.uint32, "=r,r,r,r")
    return jax.lax.bitcast_convert_type(r, jnp.int32)


def middle_half(a, ptx: bool):
    """(a >> 8) & 0xFFFF, a uint32 array: one `prmt` (bytes 1 and 2 of a, zeros above); Triton
    emits a `bfe.u32`, which ptxas expands to a shift and a sign-extend (two instructions)."""
    if not ptx:
        return (a >> 8) & jnp.uint32(0xFFFF)
    return _asm("prmt.b32 $0, $1, 0, 0x4421;", [a], jnp.uint32, "=r,r")


def funnel(hi, lo, n: int, ptx: bool):
    """The top 32 bits of the 64-bit (hi, lo) << n, uint32 arrays, 0 < n < 32: one
    `shf.l.wrap`, opaque to LLVM. Why opaque: LLVM folds a shift of the plain expression into
    a bit-field extract of one input (two instructions), undoing a window shared by several
    fields."""
    if not ptx:
        return (hi << n) | (lo >> (32 - n))
    return _asm(f"shf.l.wrap.b32 $0, $2, $1, {n};", [hi, lo], jnp.uint32, "=r,r,r")


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
