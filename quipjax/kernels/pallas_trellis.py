"""Pallas (Triton) decode-matmul kernels for the trellis codebooks: y = x @ Q^T from bitstreams.

A weight at (row R, column C) lies in the 16 x 16 tile (R // 16, C // 16), at position
p = 16 (R % 16) + (C % 16) of the tile's sequence; it is component p % V of state p // V, whose
L <= 17 bits start at bit (p // V) K V of the tile's stream of W = 16 K uint16 words (MSB
first, wrapping; `codebooks.trellis.pack_states`). A tile row's 16 weights are 16 / V
consecutive states starting on word (R % 16) K: one kernel element is one tile row of one
tile. It reads the words holding that row's K + 1 stream words (even K: K / 2 + 1 uint32
pairs; odd K: K + 1 uint16; the last wraps to the tile's start in row 15), forms 32-bit
windows of the stream (a loaded pair, or one funnel shift of two; `_window_plan` picks them so
that most states sit at a window's top, middle or bottom) and takes each state with static
shifts and masks (one instruction at those three places, else two), then decodes it by arithmetic
(1MAD: a multiply-add and a byte sum; 3INST: a multiply-add, a mask, an xor and the float16
sum of two halves) or from the 2^Q x 2 table (HYB: a multiply-add and two loads from a table
holding both signs of the first component). The
activations are column-permuted outside the kernel (x[16 t + c] at [c, t]) and passed as 16
inputs, one per c, so that the 16 weights of an element meet 16 contiguous slices.

Kernel layout (`prepare`): the codes (m / 16, n / 16, W) uint16 (for even K as uint32 pairs,
word 2i << 16 | word 2i + 1, so that a uint32 load returns the stream in order), reordered to
(rows, words of a tile row, tile columns) and flattened: the words of neighbouring tiles are
adjacent, so the elements a thread holds load as one vector. Rows are padded to a multiple of
the row block and tile columns to a multiple of 16 (padded tiles: code 0, cut from y or
meeting zero activations); the HYB table is kept (2^Q, 2) float32 (the tuned one when
given) and laid out for the kernel per call (`_kernel_table`).

Two kernels, as `kernels.pallas_e8p`: the matvec (batch 1: (256 or 128 rows, 8 or 4 tiles) per step,
float32 products accumulated per element on the CUDA cores with one `fma.rn.f32` each, summed
once at the end) and the small batch (2..16; larger batches in chunks of 16:
(64 rows, 16 tiles) per step, the decoded weights of tile column c cast to the activation
dtype and multiplied by a `dot` with that column's (NB, 16) activations, float32
accumulation). Three single PTX instructions are inline (`kernels.pallas_launch`): the
matvec's `fma.rn.f32`, 3INST's mask-and-xor as one `lop3` and 1MAD's byte sum as one `dp4a`
(1MAD's products are taken with the integer byte sum and the float32 sums divided by
147.800537109375 once). The interpreter cannot run PTX: there the kernel computes the same
values with plain operations (a * b + c: one rounding more) (BUILD_NOTES.md, "GPU kernels
for the trellis codes").
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from quipjax import codebooks
from quipjax.kernels import TRELLIS_CODEBOOKS
from quipjax.kernels.pallas_launch import (and_xor, byte_sum, fma, funnel, k_range,
                                           middle_half, split_k_call)

__all__ = ["prepare", "matmul", "export_targets", "kernel_configs", "CODEBOOKS"]

CODEBOOKS = TRELLIS_CODEBOOKS       # the registry's trellis codebooks
_BM_VEC, _BM_BATCH = (256, 128), 64   # rows per program (`_vec_rows`; prepare pads to both)
# HYB at 4 warps: 255 registers and 32 B of spills, reloaded 5 times a step (no stores in the
# loop), for 9.0 SASS per weight against 13.2 at 8 warps (4096 x 4096; BUILD_NOTES.md)
_WARPS_BATCH = {"1MAD": 4, "3INST": 4, "HYB": 4}
_BT_VEC, _BT_BATCH = (8, 4), 16   # tile columns per step (batch: its dot needs >= 16)
_MAX_BATCH = 16
H100_SMS = 132


def _trellis(name):
    if name not in CODEBOOKS:
        raise ValueError(f"pallas_trellis: {name!r} is not a trellis codebook; have "
                         f"{', '.join(CODEBOOKS)}")
    tr = codebooks.get(name).trellis
    if tr.L > 17:           # a state must fit the 32-bit pair of the words holding it
        raise ValueError(f"pallas_trellis: {name!r} has L = {tr.L} > 17 state bits; use "
                         "backend='xla'")
    return tr


def _vec_tiles(n: int) -> int:
    """Tile columns per matvec step: 8 if they divide the matrix's tile columns (no padded
    steps), else 4. Why: the 16 activation loads of a step serve BM x BT weights, so wider
    steps spend fewer instructions per weight (4096 x 4096 1MAD2: 7.34 SASS per weight at 4
    tiles, 6.89 at 8; 16 gave 6.68 but 96-160 registers and spills for HYB3; BUILD_NOTES.md),
    and a matrix of 36 tile columns (576) would be padded by 4."""
    ct = -(-n // 16)
    return next((bt for bt in _BT_VEC if ct % bt == 0), _BT_VEC[-1])


def _vec_rows(m: int) -> int:
    """Matvec rows per program: 256 where they divide the matrix's rows (no padded rows),
    else 128. Why: at 256 a thread holds 4 rows of its tile columns, so a step's 16 activation
    loads and their 64-bit address updates serve twice the weights (4096 x 4096 1MAD2: 6.05
    -> 5.84 SASS per weight, 128 registers, no spills; BUILD_NOTES.md)."""
    return next((bm for bm in _BM_VEC if m % bm == 0), _BM_VEC[-1])


def kernel_configs(m: int, n: int, batch: int, code: str = "3INST") -> dict:
    """The static launch parameters for an (m, n) matrix at this batch size (bk = 16 bt
    columns per step)."""
    vec = batch == 1
    bm, bt = (_vec_rows(m), _vec_tiles(n)) if vec else (_BM_BATCH, _BT_BATCH)
    mp = -(-m // bm) * bm
    kp = -(-n // (16 * bt)) * 16 * bt
    nk = kp // (16 * bt)
    s = max(1, min(nk, math.ceil(2 * H100_SMS / (mp // bm))))
    ks = -(-nk // s)
    s = -(-nk // ks)
    return dict(kind="matvec" if vec else "batch", bm=bm, bt=bt, bk=16 * bt, mp=mp, kp=kp,
                nk=nk, splits=s, ks=ks, num_warps=4 if vec else _WARPS_BATCH[code],
                num_stages=2)


def prepare(codes: jax.Array, codebook_name: str) -> dict:
    """Plain codes (m / 16, n / 16, 16 K) uint16 -> the kernel layout (module docstring)."""
    tr = _trellis(codebook_name)
    codes = jnp.asarray(codes, jnp.uint16)
    rt, ct, w = codes.shape
    bm = max(_vec_rows(rt * 16), _BM_BATCH)
    rp = -(-rt * 16 // bm) * bm // 16
    cp = -(-ct // _BT_BATCH) * _BT_BATCH           # a multiple of both kernels' steps
    codes = jnp.pad(codes, ((0, rp - rt), (0, cp - ct), (0, 0)))
    if _wide(tr):                               # big-endian pairs: a load gives stream order
        codes = (codes[..., 0::2].astype(jnp.uint32) << 16) | codes[..., 1::2]
    nw = _row_words(tr)                         # (row tiles, tiles, 16 rows x words) ->
    codes = codes.reshape(rp, cp, 16, nw).transpose(0, 2, 3, 1)   # (rows, words, tiles)
    out = {"codes": codes.reshape(-1)}
    if tr.code == "HYB":
        out["table"] = jnp.asarray(tr.lut(), jnp.float32)
    return out


def _wide(tr) -> bool:
    """Whether the kernel layout holds the stream as uint32 pairs of words (even K: a tile row
    starts on a pair) rather than as uint16 words (odd K: half the rows start inside a pair,
    and realigning them cost the batch kernel more than the saved loads)."""
    return tr.K % 2 == 0


def _row_offsets(tr, bm, bt, ct):
    """Loop invariants of a (BM rows, BT tile columns) block, (BM, BT) int32 each: the offsets
    of the layout words holding each element's K + 1 stream words (K / 2 + 1 uint32 pairs, or
    K + 1 uint16), at the block's first step. The layout is (rows, words, tile columns): the
    words of neighbouring tiles are adjacent, so a thread's elements load as one vector. The
    last word is the first of the next row of the tile (row 15: of row 0)."""
    r = jax.lax.broadcasted_iota(jnp.int32, (bm, bt), 0)
    t = jax.lax.broadcasted_iota(jnp.int32, (bm, bt), 1)
    R = pl.program_id(0) * bm + r
    nw = _row_words(tr)
    nxt = R - R % 16 + (R + 1) % 16
    return [(R * nw + i) * ct + t for i in range(nw)] + [nxt * nw * ct + t]


def _row_words(tr) -> int:
    """Layout words per tile row: K / 2 uint32 pairs or K uint16."""
    return tr.K // 2 if _wide(tr) else tr.K


def _row_values(tr, words, table_ref, ptx):
    """words: the (BM, BT) uint32 layout words of a tile row (`_row_offsets`: pairs of
    stream words, or single ones; MSB first) -> 16 (BM, BT) float32 arrays, the row's weights
    at tile columns 0..15. State j starts at stream bit j K V: each is cut from a 32-bit
    window of the stream with static shifts (`_window_plan` for pairs; for single words the
    window starting at the state's word), then decoded."""
    if _wide(tr):
        wins = {}

        def window(s):                  # stream bits [s, s + 32): a word or a funnel shift
            if s not in wins:
                a, n = divmod(s, 32)
                wins[s] = words[a] if n == 0 else funnel(words[a], words[a + 1], n, ptx)
            return wins[s]
        plan = _window_plan(tr.L, tr.KV, 16 // tr.V, 32 * len(words))
        states = [_field(window(s), q, tr.L, ptx) for s, q in plan]
    else:
        pairs = [(words[a] << 16) | words[a + 1] for a in range(tr.K)]
        states = [_field(pairs[o // 16], o % 16, tr.L, ptx)
                  for o in range(0, 16 * tr.K, tr.KV)]
    return [v for st in states for v in _decode(tr, st, table_ref, ptx)]


def _field(w, q: int, L: int, ptx):
    """The L-bit field q bits below the top of the uint32 array w: one instruction at the top
    (a shift), the bottom (an and) or, for L = 16, the middle (a `prmt`); else a shift and a
    mask."""
    mask = jnp.uint32((1 << L) - 1)
    if q == 0:
        return w >> (32 - L)
    if q == 32 - L:
        return w & mask
    if L == 16 and q == 8:
        return middle_half(w, ptx)
    return (w >> (32 - L - q)) & mask


@functools.lru_cache(maxsize=None)
def _window_plan(L: int, step: int, n_states: int, bits: int) -> tuple:
    """Where to cut the n_states states of a tile row from (state j: stream bits [j step,
    j step + L) of the `bits` loaded bits, MSB first, as uint32 words): ((s, q), ...) per
    state, the window of stream bits [s, s + 32) and the state's offset q below its top.
    A window costs nothing when it is a loaded word (s % 32 == 0), else one funnel shift;
    a state costs one instruction where `_field` has a one-instruction form, else two.
    Windows are those where some state has a one-instruction form; the cheapest set is
    searched exhaustively when that is small (every even-K code at L = 16), else greedily.
    4096 x 4096 1MAD2: 28 -> 23 instructions per 16 states. Why: cutting the states was a
    quarter of the matvec's instructions (BUILD_NOTES.md)."""
    one = {0, 32 - L} | ({8} if L == 16 else set())
    offs = [j * step for j in range(n_states)]
    free = frozenset(range(0, bits - 31, 32))
    cands = sorted({o - q for o in offs for q in one if 0 <= o - q <= bits - 32} - free)
    big = 1 << 20

    def ext(s, o):
        q = o - s
        return big if q < 0 or q + L > 32 else (1 if q in one else 2)

    def total(ch):
        return len(ch - free) + sum(min(ext(s, o) for s in ch) for o in offs)

    chosen = set(free)                      # greedy: the window that saves most, while any
    while True:
        gains = [(total(chosen) - total(chosen | {c}), -c) for c in cands if c not in chosen]
        if not gains or max(gains)[0] <= 0:
            break
        chosen.add(-max(gains)[1])
    best = (total(chosen), tuple(sorted(chosen - free)))
    # exhaustive below the greedy cost: a set of k windows costs at least k + n_states
    sizes = range(max(0, best[0] - n_states))
    if sum(math.comb(len(cands), k) for k in sizes) <= 20000:
        for k in sizes:
            for sub in itertools.combinations(cands, k):
                t = total(free | set(sub))
                if t < best[0]:
                    best = (t, sub)
    if best[0] >= big:
        raise AssertionError(f"no window holds a state: L={L} step={step} bits={bits}")
    chosen = free | set(best[1])
    return tuple(min(((ext(s, o), s), (s, o - s)) for s in chosen)[1] for o in offs)


# the values of 1MAD are (byte sum - 510) / 147.800537109375: the kernels multiply by the
# integer and divide the float32 sums once (that rounds as the summation order does)
_1MAD_DIV = 147.800537109375


def _decode(tr, state, table_ref, ptx):
    """state (BM, BT) uint32 -> the V float32 values of the code (1MAD: times 147.8...)."""
    if tr.code == "1MAD":
        x = state * jnp.uint32(34038481) + jnp.uint32(76625530)
        return [byte_sum(x, -510, ptx).astype(jnp.float32)]
    if tr.code == "3INST":
        x = state * jnp.uint32(89226354) + jnp.uint32(64248484)
        mask16 = (1 << 15) + (1 << 12) - 1
        r = and_xor(x, (mask16 << 16) + mask16, 996162400, ptx)
        hi = jax.lax.bitcast_convert_type((r >> 16).astype(jnp.uint16), jnp.float16)
        lo = jax.lax.bitcast_convert_type(r.astype(jnp.uint16), jnp.float16)    # truncates
        return [(hi + lo).astype(jnp.float32)]      # the code's float16 add (one HADD)
    # HYB: a hashed row of the (2^Q, 2) table, the first component's sign from bit 15. The
    # kernel's table is [v0; -v0; v1; v1] (`_kernel_table`): bits 15 - Q .. 15 of h index
    # the signed first component (no sign flip) and, in the table's second half, the second
    # (separate tables for the two, or an index LLVM cannot see through, measured no fewer
    # instructions: the 64-bit address is the same two per load)
    n = 2 << tr.Q
    h = state * state + state
    i = ((h >> (15 - tr.Q)) & (n - 1)).astype(jnp.int32)
    return [table_ref[i], table_ref[i + n]]


def _kernel_table(table) -> jax.Array:
    """A HYB table (2^Q, 2) (or flattened) -> the kernels' (4 2^Q,) float32 [v0; -v0; v1;
    v1]: row r's first component with a clear sign bit at r, with a set one at 2^Q + r; its
    second 2^(Q+1) further."""
    t = jnp.asarray(table, jnp.float32).reshape(-1, 2)
    return jnp.concatenate([t[:, 0], -t[:, 0], t[:, 1], t[:, 1]])


def _kernel(*refs, tr, bm, bt, nk, ks, ct, batch, ptx):
    """refs: codes, [table], x -> o. x is column-permuted: x[c, t] = x_orig[16 t + c] (matvec:
    (16, Kp / 16); batch: (16, NB, Kp / 16)). Matvec: o (1, BM), float32 products on the CUDA
    cores accumulated per element, summed once; batch: o (1, BM, NB), one `dot` per tile
    column c in x's dtype, float32 accumulation."""
    codes_ref, table_ref = refs[0], (refs[1] if tr.code == "HYB" else None)
    x_refs, o_ref = refs[-17:-1], refs[-1]     # one ref per tile column c (why: `_call`)
    addrs = _row_offsets(tr, bm, bt, ct)
    k0, k1 = k_range(nk, ks)
    xdt = x_refs[0].dtype
    prec = jax.lax.Precision.HIGHEST if xdt == jnp.float32 else None

    def body(k, acc):
        step = k * bt
        words = [codes_ref[a + step].astype(jnp.uint32) for a in addrs]
        vals = _row_values(tr, words, table_ref, ptx)
        cols = pl.ds(k * bt, bt)
        for c, v in enumerate(vals):
            if not batch:
                xc = jnp.broadcast_to(x_refs[c][cols][None, :], (bm, bt))
                acc = fma(v, xc, acc, ptx)
            else:
                acc = acc + jax.lax.dot_general(
                    v.astype(xdt), x_refs[c][:, cols], (((1,), (1,)), ((), ())),
                    precision=prec, preferred_element_type=jnp.float32)
        return acc

    shape = (bm, x_refs[0].shape[0]) if batch else (bm, bt)
    acc = jax.lax.fori_loop(k0, k1, body, jnp.zeros(shape, jnp.float32))
    out = acc if batch else jnp.sum(acc, axis=1)
    o_ref[...] = (out / _1MAD_DIV if tr.code == "1MAD" else out)[None]


def _call(x, arrays, name, shape, interpret):
    """x: column-permuted (16, Kp / 16) (matvec) or (16, NB, Kp / 16) -> (Mp,) or (Mp, NB)
    float32."""
    m, n = shape
    tr = _trellis(name)
    batch = x.ndim == 3
    cfg = kernel_configs(m, n, max(x.shape[1], 2) if batch else 1, tr.code)
    bm, s, mp = cfg["bm"], cfg["splits"], cfg["mp"]
    table = [_kernel_table(arrays["table"])] if tr.code == "HYB" else []   # a tuned one: 2-D
    # x[c] as 16 separate inputs: the 16 loads of a step then share one 64-bit offset
    # computation (each adds it to its own base) instead of 16 (Triton adds the row offset
    # c * stride inside the 32-bit index, before the sign extension)
    args = [arrays["codes"]] + table + list(x)
    params = dict(tr=tr, bm=bm, bt=cfg["bt"], nk=cfg["nk"], ks=cfg["ks"],
                  ct=-(-n // (16 * _BT_BATCH)) * _BT_BATCH)     # tile columns of `prepare`
    kern = functools.partial(_kernel, **params, batch=batch, ptx=not interpret)
    if not batch:
        out_shape = jax.ShapeDtypeStruct((s, mp), jnp.float32)
        out_spec = pl.BlockSpec((1, bm), lambda i, j: (j, i))
    else:
        out_shape = jax.ShapeDtypeStruct((s, mp, x.shape[1]), jnp.float32)
        out_spec = pl.BlockSpec((1, bm, x.shape[1]), lambda i, j: (j, i, 0))
    return split_k_call(kern, args, out_shape, out_spec, (mp // bm, s), cfg, interpret,
                        f"trellis_{cfg['kind']}_{name}")


def _permute_columns(x):
    """(..., Kp) -> (16, ..., Kp / 16): x[..., 16 t + c] at [c, ..., t], so that the kernels
    read the activations of tile column c of a step as one contiguous slice."""
    xt = x.reshape(x.shape[:-1] + (x.shape[-1] // 16, 16))
    return jnp.moveaxis(xt, -1, 0)


def matmul(x: jax.Array, arrays: dict, codebook_name: str, shape, *, interpret: bool = False):
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32 (kernel layout codes;
    arrays["table"] may hold a tuned HYB table)."""
    m, n = shape
    lead = x.shape[:-1]
    b = math.prod(lead)
    xdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    xf = jnp.asarray(x, xdt).reshape(b, n)
    if b == 1:                           # the matvec multiplies in float32: convert x once
        kp = kernel_configs(m, n, 1)["kp"]
        xp = _permute_columns(jnp.pad(xf[0].astype(jnp.float32), (0, kp - n)))
        return _call(xp, arrays, codebook_name, shape, interpret)[:m].reshape(lead + (m,))
    kp = kernel_configs(m, n, 2)["kp"]
    nb = _MAX_BATCH if b > _MAX_BATCH else max(2, 1 << (b - 1).bit_length())
    xf = jnp.pad(xf, ((0, -b % nb), (0, kp - n))).reshape(-1, nb, kp)
    ys = jax.lax.map(lambda c: _call(_permute_columns(c), arrays, codebook_name, shape,
                                     interpret), xf)
    y = ys.transpose(0, 2, 1).reshape(-1, ys.shape[1])[:b, :m]
    return y.reshape(lead + (m,))


def export_targets(shapes=((576, 1536), (4096, 4096)), batches=(1, 16),
                   dtypes=(jnp.bfloat16, jnp.float16), names=CODEBOOKS) -> list:
    """(name, jitted fn, example args, meta) for every kernel configuration, for `jax.export`
    on cuda (meta: weights decoded per CTA per loop iteration, for experiments/kernel_ptx.py)."""
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
                    cfg = kernel_configs(m, n, b, cb.trellis.code)
                    out.append((f"trellis_{cbn}_{m}x{n}_b{b}_{np.dtype(dt).name}", fn,
                                (x, arrays), {"weights_per_iter": cfg["bm"] * cfg["bk"]}))
    return out
