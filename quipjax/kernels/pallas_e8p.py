"""Pallas (Triton) decode-matmul kernels for the E8P codebooks: y = x @ Q^T from uint16 codes.

Two kernels, each for E8P12 (2 bit) and the residual E8P12RVQ3B / E8P12RVQ4B (both stages
decoded and accumulated in the same kernel):
  * matvec (batch 1): every program owns BM output rows and a slice of the K loop; decoded
    weights meet x on the CUDA cores (float32 products and sums). x arrives halved and with
    the sum of each code's 8 inputs, so a weight costs a signed integer 2 s_i p_i and one FMA,
    and the +-1/4 shift one FMA per code (0.25 * sign * sum).
  * small batch (2..16, larger batches run in chunks of 16): the same decode, then a tensor-core
    `dot` of the decoded (BM, BK) tile, cast to the activation dtype (exact: every E8P value
    is k/4 with |k| <= 15), with the (16, BK) activation tile, float32 accumulation. The second
    RVQ stage goes through its own dot and is divided by the residual scale once at the end,
    so no rounding enters the weights.

Decode, per code c (16 bits, official layout, `quipjax.codebooks.e8p`): one pointer gather of
the packed 8-nibble pattern word `tab[c >> 8]` from a 1 KiB table (L1/L2 resident), the sign
byte's parity by three xor-folds, then per coordinate a shift, one `lop3` setting the nibble
into the mantissa of float32 2^23 and one subtraction (exactly nibble - 8, no integer-to-float
conversion), and the sign bit xored into the float (a shift and one `lop3`). The E81B stage
(3-bit) is one gather of its nibble-packed codeword, decoded the same way. The `lop3`s and the
matvec's `fma` are inline PTX (`kernels.pallas_launch`); the interpreter, which cannot run
PTX, computes the same values with plain operations.

Kernel layout of the codes (`prepare`): plain (m, n/8) uint16 codes (one array per stage;
uint8 for the E81B stage),
rows padded to a multiple of 64 and columns (codes) to a multiple of BK (64, 32 or 16, the
choice that pads least), both with code 0 (its padded rows are cut from y; its padded columns
meet zero activations). Row-major: one row of a (BM, BK) tile is BK * 2 = 128 contiguous bytes
at BK = 64, so a tile load is BM fully used 128-byte transactions. The activations are
reordered per call to (8, batch, n/8): coordinate i of every code is a contiguous row, so
the kernel never reshapes or slices loaded values (Triton cannot): it computes
y = sum_i  Q_i @ x_i  with Q_i (m, n/8) the i-th coordinates of the codes.

Block shapes, chosen for an H100 (132 SMs, 3.35 TB/s; see BUILD_NOTES.md, "GPU kernels"):
BM = 32 rows x BK = 64 codes (512 weights per row) per step for the matvec: 2048 codes (4 KiB)
per step and 16 decoded float32 values per thread and coordinate at 4 warps; the K loop is
split over enough programs (`_splits`) to give at least 2 waves of 132 SMs even for the
576-row SmolLM2 layers (partial sums added by XLA: 4 bytes per split and output row, small
next to the codes). Small batch: BM = 64, BK = 32 (BK = 64 spills registers), a (64, 16)
float32 accumulator per RVQ stage.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from quipjax.codebooks import e8p as _e8p
from quipjax.codebooks import rvq as _rvq
from quipjax.kernels import stage_table
from quipjax.kernels.pallas_launch import and_or, fma, k_range, split_k_call, xor_masked

__all__ = ["prepare", "matmul", "export_targets", "kernel_configs",
           "ROW_MULTIPLE", "H100_SMS"]

ROW_MULTIPLE = 64          # rows padded to this (the largest BM)
H100_SMS = 132
_MAX_BATCH = 16            # the small-batch kernel's N; larger batches run in chunks
_SHUFFLE = _e8p.SHUFFLE_MAP

# {codebook: (stage-2 kind, residual scale)}; stage 1 is always E8P
_STAGES = stage_table()


@functools.lru_cache(maxsize=None)
def _e81b_packed() -> np.ndarray:
    """E81B codewords as 8 nibbles 2v + 8 (coordinate i in nibble i), int32 (256,)."""
    t = _rvq.e81b_table().astype(np.float64)
    nib = (2 * t + 8).astype(np.int64)
    assert nib.min() >= 0 and nib.max() <= 15
    word = np.zeros(256, np.int64)
    for i in range(8):
        word |= nib[:, i] << (4 * i)
    return word.astype(np.uint32).view(np.int32)


def _e8p_packed() -> np.ndarray:
    return _e8p.packed_abs_grid().view(np.int32)


def _block_k(kc: int) -> int:
    """Codes per K step: the power of two in {64, 32, 16} that pads kc the least."""
    return min((-(-kc // b) * b, -b, b) for b in (64, 32, 16))[2]


def _pad_to(a, axis, mult):
    r = (-a.shape[axis]) % mult
    if r == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, r)
    return jnp.pad(a, pad)


def prepare(codes: jax.Array, codebook_name: str) -> dict:
    """Plain codes (m, n/8[, 2]) uint16 -> the kernel layout (module docstring)."""
    if codebook_name not in _STAGES:
        raise ValueError(f"no Pallas kernel for codebook {codebook_name!r}; have {list(_STAGES)}")
    codes = jnp.asarray(codes, jnp.uint16)
    kind, _ = _STAGES[codebook_name]
    bk = _block_k(codes.shape[1])
    stages = [codes] if kind is None else [codes[..., 0], codes[..., 1]]
    if kind == "e81b":               # 256-entry stage: one byte per code is enough
        stages[1] = stages[1].astype(jnp.uint8)
    out = {f"c{s + 1}": _pad_to(_pad_to(c, 0, ROW_MULTIPLE), 1, bk) for s, c in enumerate(stages)}
    out["tab1"] = jnp.asarray(_e8p_packed())
    if kind is not None:
        out["tab2"] = jnp.asarray(_e8p_packed() if kind == "e8p" else _e81b_packed())
    return out


# ---------------------------------------------------------------------------------------
# In-kernel decode
def _e8p_fields(c, tab_ref):
    """c (BM, BK) int32 E8P codes -> (packed 8-nibble pattern words, sign bits, shift parity).

    The parity of the sign byte says whether the +-1/4 shift is negative; the sign of the last
    coordinate is implied by it (official layout), hence s ^ parity.
    """
    packed = tab_ref[c >> 8]
    s = c & 255
    par = s ^ (s >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    return packed, s ^ par, par


def _e8p_coords(c, tab_ref, ptx: bool):
    """c (BM, BK) int32 E8P codes -> list of 8 float32 (BM, BK) tiles, coordinate i of each:
    the signed integer 2 s_i p_i of `_e8p_signed_coords` times 1/2 plus the +-1/4 shift (one
    FMA, exact: every value is k / 4 with |k| <= 15)."""
    w, sgn = _e8p_signed_coords(c, tab_ref, ptx)
    shift = 0.25 * sgn
    return [fma(v, jnp.full_like(v, 0.5), shift, ptx) for v in w]


def _e81b_coords(c, tab_ref, ptx: bool):
    packed = jax.lax.bitcast_convert_type(tab_ref[c], jnp.uint32)
    return [_nibble_minus_8(packed, 4 * i, ptx) * 0.5 for i in range(8)]


def _stage_coords(kind, c, tab_ref, ptx: bool):
    return (_e81b_coords if kind == "e81b" else _e8p_coords)(c, tab_ref, ptx)


# float32 2^23: an integer below 2^23 set into its mantissa bits reads as 2^23 + that integer
_F32_2P23 = 0x4B000000


def _nibble_minus_8(word, shift: int, ptx: bool):
    """word (BM, BK) uint32 -> float32 ((word >> shift) & 15) - 8, exactly: the nibble set
    into the mantissa of 2^23 (one lop3) and 2^23 + 8 subtracted (one FADD), in place of a
    mask, a subtraction and an integer-to-float conversion."""
    bits = and_or(word >> shift, 15, _F32_2P23, ptx)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - (2.0 ** 23 + 8)


def _e8p_signed_coords(c, tab_ref, ptx: bool):
    """c (BM, BK) int32 E8P codes -> (8 float32 tiles 2 s_i p_i (integers), shift sign +-1).

    The matvec keeps the factor 1/2 in x and the +-1/4 shift as one term per code
    (0.25 * sign * sum of the code's 8 inputs): two fewer float ops per weight. Sign bit ii
    of s is moved to bit 31 and xored into the float (one shift, one lop3).
    """
    packed, s, par = _e8p_fields(c, tab_ref)
    packed = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    s = s.astype(jnp.uint32)
    out = []
    for i in range(8):
        ii = _SHUFFLE[i]
        v = jax.lax.bitcast_convert_type(_nibble_minus_8(packed, 4 * ii, ptx), jnp.uint32)
        v = xor_masked(v, s << (31 - ii), 0x80000000, ptx)
        out.append(jax.lax.bitcast_convert_type(v, jnp.float32))
    return out, 1.0 - 2.0 * par.astype(jnp.float32)


def _matvec_kernel(*refs, kind, bm, bk, nk, ks, ptx):
    """refs: tab1, c1, [tab2, c2], xh_0..xh_7 (Kp,) = x / 2 by coordinate, xs (Kp,) = sums
    of 8 (float32) -> o (1, BM). Each code's products are accumulated in place (one fused
    multiply-add per weight) and the (BM, BK) partial sums reduced once, after the loop."""
    nst = 1 if kind is None else 2
    tabs, cs = refs[0:2 * nst:2], refs[1:2 * nst:2]
    x_refs, xs_ref, o_ref = refs[2 * nst:2 * nst + 8], refs[2 * nst + 8], refs[2 * nst + 9]
    row0 = pl.program_id(0) * bm
    k0, k1 = k_range(nk, ks)

    def body(k, accs):
        col = k * bk
        xs = [jnp.broadcast_to(x_refs[i][pl.ds(col, bk)][None, :], (bm, bk)) for i in range(8)]
        new = []
        for st in range(nst):
            c = cs[st][pl.ds(row0, bm), pl.ds(col, bk)].astype(jnp.int32)
            t = accs[st]
            if st == 1 and kind == "e81b":
                packed = jax.lax.bitcast_convert_type(tabs[st][c], jnp.uint32)
                w = [_nibble_minus_8(packed, 4 * i, ptx) for i in range(8)]
            else:
                w, sgn = _e8p_signed_coords(c, tabs[st], ptx)
                xq = jnp.broadcast_to(0.25 * xs_ref[pl.ds(col, bk)][None, :], (bm, bk))
                t = fma(sgn, xq, t, ptx)
            for i in range(8):
                t = fma(w[i], xs[i], t, ptx)
            new.append(t)
        return tuple(new)

    zero = jnp.zeros((bm, bk), jnp.float32)
    accs = [jnp.sum(a, axis=1) for a in jax.lax.fori_loop(k0, k1, body, (zero,) * nst)]
    y = accs[0] if nst == 1 else accs[0] + accs[1] * (1.0 / _STAGES_SCALE[kind])
    o_ref[...] = y[None, :]


def _batch_kernel(*refs, kind, bm, bk, nk, ks, ptx):
    """refs: tab1, c1, [tab2, c2], x_0..x_7 (NB, Kp) by coordinate -> o (1, BM, NB) block of
    (S, Mp, NB)."""
    nst = 1 if kind is None else 2
    tabs, cs = refs[0:2 * nst:2], refs[1:2 * nst:2]
    x_refs, o_ref = refs[2 * nst:2 * nst + 8], refs[2 * nst + 8]
    row0 = pl.program_id(0) * bm
    k0, k1 = k_range(nk, ks)
    nb = x_refs[0].shape[0]
    xdt = x_refs[0].dtype
    prec = jax.lax.Precision.HIGHEST if xdt == jnp.float32 else None

    def body(k, accs):
        col = k * bk
        new = []
        for st in range(nst):
            c = cs[st][pl.ds(row0, bm), pl.ds(col, bk)].astype(jnp.int32)
            w = _stage_coords(kind if st else "e8p", c, tabs[st], ptx)
            acc = accs[st]
            for i in range(8):
                xi = x_refs[i][:, pl.ds(col, bk)]                     # (NB, BK)
                acc = acc + jax.lax.dot_general(
                    w[i].astype(xdt), xi, (((1,), (1,)), ((), ())),
                    precision=prec, preferred_element_type=jnp.float32)
            new.append(acc)
        return tuple(new)

    zero = jnp.zeros((bm, nb), jnp.float32)
    accs = jax.lax.fori_loop(k0, k1, body, (zero,) * nst)
    y = accs[0] if nst == 1 else accs[0] + accs[1] * (1.0 / _STAGES_SCALE[kind])
    o_ref[...] = y[None]


_STAGES_SCALE = {kind: scale for kind, scale in _STAGES.values() if kind}


def _splits(n_row_blocks: int, nk: int) -> int:
    """K splits so that row blocks x splits >= 2 waves of an H100 (capped by the K steps)."""
    return max(1, min(nk, math.ceil(2 * H100_SMS / n_row_blocks)))


def kernel_configs(m: int, n: int, batch: int) -> dict:
    """The static launch parameters for an (m, n) matrix at this batch size."""
    kc = n // 8
    bk = _block_k(kc)
    kp = -(-kc // bk) * bk
    mp = -(-m // ROW_MULTIPLE) * ROW_MULTIPLE
    vec = batch == 1
    bm = 32 if vec else 64
    if not vec:
        # 64 x 64 decoded tiles of 8 coordinates overflow 255 registers at 4 warps (ptxas
        # spills 0.3-0.7 KiB per thread); 64 x 32 fits (BUILD_NOTES.md, "GPU kernels")
        bk = min(bk, 32)
    nk = kp // bk
    s = _splits(mp // bm, nk)
    ks = -(-nk // s)
    s = -(-nk // ks)                       # no empty splits
    return dict(kind="matvec" if vec else "batch", bm=bm, bk=bk, kp=kp, mp=mp, nk=nk,
                splits=s, ks=ks, num_warps=4, num_stages=2)


def _call(x8, arrays, codebook_name, shape, interpret):
    """x8: (8, Kp) (matvec) or (8, NB, Kp) -> (Mp,) or (Mp, NB) float32."""
    m, n = shape
    kind, _ = _STAGES[codebook_name]
    batch = 1 if x8.ndim == 2 else x8.shape[1]
    cfg = kernel_configs(m, n, 1 if x8.ndim == 2 else max(batch, 2))
    bm, bk, s = cfg["bm"], cfg["bk"], cfg["splits"]
    args = [arrays["tab1"], arrays["c1"]]
    if kind is not None:
        args += [arrays["tab2"], arrays["c2"]]
    # each coordinate's activations a separate input: the loads of a step then share one
    # 64-bit offset computation (Triton adds the row offset i * stride inside the 32-bit
    # index, before the sign extension, so one (8, Kp) input costs 8)
    if x8.ndim == 2:
        xf = x8.astype(jnp.float32)
        args += list(0.5 * xf) + [xf.sum(0)]    # float32: converted once, not per row block
    else:
        args += list(x8)
    mp = arrays["c1"].shape[0]
    grid = (mp // bm, s)
    params = dict(kind=kind, bm=bm, bk=bk, nk=cfg["nk"], ks=cfg["ks"])
    if x8.ndim == 2:
        kern = functools.partial(_matvec_kernel, **params, ptx=not interpret)
        out_shape = jax.ShapeDtypeStruct((s, mp), jnp.float32)
        out_spec = pl.BlockSpec((1, bm), lambda i, j: (j, i))
    else:
        kern = functools.partial(_batch_kernel, **params, ptx=not interpret)
        out_shape = jax.ShapeDtypeStruct((s, mp, batch), jnp.float32)
        out_spec = pl.BlockSpec((1, bm, batch), lambda i, j: (j, i, 0))
    return split_k_call(kern, args, out_shape, out_spec, grid, cfg, interpret,
                        f"e8p_{'matvec' if x8.ndim == 2 else 'batch'}_{codebook_name}")


def matmul(x: jax.Array, arrays: dict, codebook_name: str, shape, *, interpret: bool = False):
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32 (kernel layout codes)."""
    m, n = shape
    lead = x.shape[:-1]
    b = math.prod(lead)
    kp = arrays["c1"].shape[1]
    xdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    xf = _pad_to(jnp.asarray(x, xdt).reshape(b, n // 8, 8), 1, kp)     # (B, Kp, 8)
    if b == 1:
        y = _call(xf[0].T, arrays, codebook_name, shape, interpret)[:m]
        return y.reshape(lead + (m,))
    nb = _MAX_BATCH if b > _MAX_BATCH else max(2, 1 << (b - 1).bit_length())
    xf = _pad_to(xf, 0, nb)
    chunks = xf.reshape(-1, nb, kp, 8).transpose(0, 3, 1, 2)           # (C, 8, NB, Kp)
    ys = jax.lax.map(lambda c: _call(c, arrays, codebook_name, shape, interpret), chunks)
    y = ys.transpose(0, 2, 1).reshape(-1, ys.shape[1])[:b, :m]
    return y.reshape(lead + (m,))


def export_targets(shapes=((576, 1536), (4096, 4096), (4096, 11008)),
                   batches=(1, 16), dtypes=(jnp.bfloat16, jnp.float16),
                   codebooks=tuple(_STAGES)) -> list:
    """(name, jitted fn, example args, meta) for every kernel configuration, for `jax.export`
    on cuda (meta: weights decoded per CTA per loop iteration, for experiments/kernel_ptx.py)."""
    out = []
    for cbn in codebooks:
        for (m, n) in shapes:
            for b in batches:
                for dt in dtypes:
                    codes_shape = (m, n // 8) if cbn == "E8P12" else (m, n // 8, 2)
                    codes = jax.ShapeDtypeStruct(codes_shape, jnp.uint16)
                    arrays = jax.eval_shape(lambda c, cbn=cbn: prepare(c, cbn), codes)
                    x = jax.ShapeDtypeStruct((b, n), dt)
                    fn = jax.jit(functools.partial(matmul, codebook_name=cbn, shape=(m, n)))
                    name = f"{cbn}_{m}x{n}_b{b}_{jnp.dtype(dt).name}"
                    cfg = kernel_configs(m, n, b)
                    out.append((name, fn, (x, arrays),
                                {"weights_per_iter": cfg["bm"] * cfg["bk"] * 8}))
    return out
