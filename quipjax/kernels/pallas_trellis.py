"""Pallas (Triton) decode-matmul kernels for the trellis codebooks: y = x @ Q^T from bitstreams.

A weight at (row R, column C) lies in the 16 x 16 tile (R // 16, C // 16), at position
p = 16 (R % 16) + (C % 16) of the tile's sequence; it is component p % V of state p // V, whose
L <= 17 bits start at bit b = (p // V) K V of the tile's stream of W = 16 K uint16 words
(MSB first, wrapping; `codebooks.trellis.pack_states`). The kernel reads the 32-bit window of
words b // 16 and b // 16 + 1 (mod W) with two pointer gathers, shifts out the state and
decodes it by arithmetic (1MAD: a multiply-add and a byte sum; 3INST: a multiply-add, a mask,
an xor and two float16 halves) or from the 2^Q x 2 table (HYB: a multiply, a gather, a sign
flip). Everything that depends on the position in the tile (word offsets, shift, component) is
the same in every K step, so the loop carries it; a step adds the tile's base address.

Kernel layout (`prepare`): the codes (m / 16, n / 16, W) uint16 flattened to one vector,
tile rows padded to a multiple of BM / 16 and tile columns to a multiple of BK / 16 (padded
tiles: code 0, cut from y or meeting zero activations); the HYB table flattened (2^Q * 2,)
float32 (the tuned one when given).

Two kernels, as `kernels.pallas_e8p`: the matvec (batch 1: decoded weights times x on the
CUDA cores, float32) and the small batch (2..16; larger batches in chunks of 16: the decoded
(BM, BK) tile cast to the activation dtype, one `dot` with the (NB, BK) activations, float32
accumulation). Block shapes: BM = 32 rows, BK = 64 columns (4 tiles) per step for both.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from quipjax import codebooks
from quipjax.kernels import TRELLIS_CODEBOOKS
from quipjax.kernels.pallas_launch import split_k_call

__all__ = ["prepare", "matmul", "export_targets", "kernel_configs", "CODEBOOKS"]

CODEBOOKS = TRELLIS_CODEBOOKS       # the registry's trellis codebooks
_BM, _BK = 32, 64
_MAX_BATCH = 16
H100_SMS = 132


def _trellis(name):
    if name not in CODEBOOKS:
        raise ValueError(f"pallas_trellis: {name!r} is not a trellis codebook; have "
                         f"{', '.join(CODEBOOKS)}")
    return codebooks.get(name).trellis


def kernel_configs(m: int, n: int, batch: int) -> dict:
    """The static launch parameters for an (m, n) matrix at this batch size."""
    mp = -(-m // _BM) * _BM
    kp = -(-n // _BK) * _BK
    nk = kp // _BK
    s = max(1, min(nk, math.ceil(2 * H100_SMS / (mp // _BM))))
    ks = -(-nk // s)
    s = -(-nk // ks)
    return dict(kind="matvec" if batch == 1 else "batch", bm=_BM, bk=_BK, mp=mp, kp=kp,
                nk=nk, splits=s, ks=ks, num_warps=4, num_stages=2)


def prepare(codes: jax.Array, codebook_name: str) -> dict:
    """Plain codes (m / 16, n / 16, 16 K) uint16 -> the kernel layout (module docstring)."""
    tr = _trellis(codebook_name)
    codes = jnp.asarray(codes, jnp.uint16)
    rt, ct, w = codes.shape
    rp = -(-rt * 16 // _BM) * _BM // 16
    cp = -(-ct * 16 // _BK) * _BK // 16
    codes = jnp.pad(codes, ((0, rp - rt), (0, cp - ct), (0, 0)))
    out = {"codes": codes.reshape(-1)}
    if tr.code == "HYB":
        out["table"] = jnp.asarray(tr.lut(), jnp.float32).reshape(-1)
    return out


def _positions(tr, bm, bk):
    """Loop invariants of a (BM, BK) block (BM, BK multiples of 16): tile-local word offsets
    of the window's two words, the shift that brings the state down, the component."""
    R = jax.lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
    C = jax.lax.broadcasted_iota(jnp.int32, (bm, bk), 1)
    p = (R % 16) * 16 + (C % 16)
    bit = (p // tr.V) * tr.KV
    W = tr.T * tr.K // 16
    w0 = bit // 16
    w1 = (w0 + 1) % W
    shift = (32 - tr.L - bit % 16).astype(jnp.uint32)
    # tile offsets inside the block: row tiles R // 16 (times the row stride, added per call),
    # column tiles C // 16
    return R // 16, C // 16, w0, w1, shift, p % tr.V


def _decode(tr, state, comp, table_ref):
    """state (BM, BK) uint32 -> float32 values of the code."""
    if tr.code == "1MAD":
        x = state * jnp.uint32(34038481) + jnp.uint32(76625530)
        s = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        return (s.astype(jnp.int32) - 510).astype(jnp.float32) * (1.0 / 147.800537109375)
    if tr.code == "3INST":
        x = state * jnp.uint32(89226354) + jnp.uint32(64248484)
        mask16 = (1 << 15) + (1 << 12) - 1
        r = (x & jnp.uint32((mask16 << 16) + mask16)) ^ jnp.uint32(996162400)
        hi = jax.lax.bitcast_convert_type((r >> 16).astype(jnp.uint16), jnp.float16)
        lo = jax.lax.bitcast_convert_type((r & 0xFFFF).astype(jnp.uint16), jnp.float16)
        return hi.astype(jnp.float32) + lo.astype(jnp.float32)
    # HYB
    h = state * (state + jnp.uint32(1))
    idx = ((h >> (15 - tr.Q)) & ((1 << tr.Q) - 1)).astype(jnp.int32)
    v = table_ref[idx * 2 + comp]
    flip = (comp == 0) & (((h >> 15) & 1) == 1)
    return jnp.where(flip, -v, v)


def _weights(tr, codes_ref, table_ref, inv, row_tile0, col_tile0, ct):
    """The decoded (BM, BK) block whose first tile is (row_tile0, col_tile0); ct: tile
    columns of the (padded) matrix."""
    rt, ctl, w0, w1, shift, comp = inv
    W = tr.T * tr.K // 16
    base = ((row_tile0 + rt) * ct + col_tile0 + ctl) * W
    hi = codes_ref[base + w0].astype(jnp.uint32)
    lo = codes_ref[base + w1].astype(jnp.uint32)
    window = (hi << 16) | lo
    state = (window >> shift) & jnp.uint32((1 << tr.L) - 1)
    return _decode(tr, state, comp, table_ref)


def _k_range(nk, ks):
    s = pl.program_id(1)
    return s * ks, jnp.minimum((s + 1) * ks, nk)


def _kernel(*refs, tr, bm, bk, nk, ks, ct, batch):
    """refs: codes, [table], x -> o. Matvec: x (Kp,), o (1, BM) (float32 products on the CUDA
    cores); batch: x (NB, Kp), o (1, BM, NB) (a `dot` in x's dtype, float32 accumulation)."""
    codes_ref, table_ref = refs[0], (refs[1] if tr.code == "HYB" else None)
    x_ref, o_ref = refs[-2], refs[-1]
    row_tile0 = pl.program_id(0) * (bm // 16)
    k0, k1 = _k_range(nk, ks)
    inv = _positions(tr, bm, bk)
    xdt = x_ref.dtype
    prec = jax.lax.Precision.HIGHEST if xdt == jnp.float32 else None

    def body(k, acc):
        w = _weights(tr, codes_ref, table_ref, inv, row_tile0, k * (bk // 16), ct)
        if not batch:
            x = x_ref[pl.ds(k * bk, bk)].astype(jnp.float32)
            return acc + jnp.sum(w * x[None, :], axis=1)
        x = x_ref[:, pl.ds(k * bk, bk)]                                    # (NB, BK)
        return acc + jax.lax.dot_general(w.astype(xdt), x, (((1,), (1,)), ((), ())),
                                         precision=prec, preferred_element_type=jnp.float32)

    shape = (bm, x_ref.shape[0]) if batch else (bm,)
    acc = jax.lax.fori_loop(k0, k1, body, jnp.zeros(shape, jnp.float32))
    o_ref[...] = acc[None]


def _call(x, arrays, name, shape, interpret):
    """x: (Kp,) (matvec) or (NB, Kp) -> (Mp,) or (Mp, NB) float32."""
    m, n = shape
    tr = _trellis(name)
    cfg = kernel_configs(m, n, 1 if x.ndim == 1 else max(x.shape[0], 2))
    bm, bk, s = cfg["bm"], cfg["bk"], cfg["splits"]
    mp, kp = cfg["mp"], cfg["kp"]
    table = [arrays["table"].reshape(-1)] if tr.code == "HYB" else []     # a tuned one: 2-D
    args = [arrays["codes"]] + table + [x]
    params = dict(tr=tr, bm=bm, bk=bk, nk=cfg["nk"], ks=cfg["ks"], ct=kp // 16)
    kern = functools.partial(_kernel, **params, batch=x.ndim == 2)
    if x.ndim == 1:
        out_shape = jax.ShapeDtypeStruct((s, mp), jnp.float32)
        out_spec = pl.BlockSpec((1, bm), lambda i, j: (j, i))
    else:
        out_shape = jax.ShapeDtypeStruct((s, mp, x.shape[0]), jnp.float32)
        out_spec = pl.BlockSpec((1, bm, x.shape[0]), lambda i, j: (j, i, 0))
    return split_k_call(kern, args, out_shape, out_spec, (mp // bm, s), cfg, interpret,
                        f"trellis_{cfg['kind']}_{name}")


def matmul(x: jax.Array, arrays: dict, codebook_name: str, shape, *, interpret: bool = False):
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32 (kernel layout codes;
    arrays["table"] may hold a tuned HYB table)."""
    m, n = shape
    lead = x.shape[:-1]
    b = math.prod(lead)
    kp = kernel_configs(m, n, 1)["kp"]
    xdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    xf = jnp.pad(jnp.asarray(x, xdt).reshape(b, n), ((0, 0), (0, kp - n)))
    if b == 1:
        return _call(xf[0], arrays, codebook_name, shape, interpret)[:m].reshape(lead + (m,))
    nb = _MAX_BATCH if b > _MAX_BATCH else max(2, 1 << (b - 1).bit_length())
    xf = jnp.pad(xf, ((0, -b % nb), (0, 0))).reshape(-1, nb, kp)
    ys = jax.lax.map(lambda c: _call(c, arrays, codebook_name, shape, interpret), xf)
    y = ys.transpose(0, 2, 1).reshape(-1, ys.shape[1])[:b, :m]
    return y.reshape(lead + (m,))


def export_targets(shapes=((576, 1536), (4096, 4096)), batches=(1, 16),
                   dtypes=(jnp.bfloat16, jnp.float16), names=CODEBOOKS) -> list:
    """(name, jitted fn, example args) for every kernel configuration, for `jax.export` on cuda."""
    out = []
    for cbn in names:
        cb = codebooks.get(cbn)
        for (m, n) in shapes:
            codes = jax.ShapeDtypeStruct(cb.codes_shape(m, n), jnp.uint16)
            arrays = jax.eval_shape(lambda c, cbn=cbn: prepare(c, cbn), codes)
            for b in batches:
                for dt in dtypes:
                    x = jax.ShapeDtypeStruct((b, n), dt)
                    fn = jax.jit(functools.partial(matmul, codebook_name=cbn, shape=(m, n)))
                    out.append((f"trellis_{cbn}_{m}x{n}_b{b}_{np.dtype(dt).name}", fn,
                                (x, arrays)))
    return out
