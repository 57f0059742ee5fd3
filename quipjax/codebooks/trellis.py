"""QTIP's bitshift trellis codes: decode by arithmetic and an exact Viterbi search, in JAX.

A trellis quantizes a sequence of T weights (T = 256: one 16 x 16 tile of the rotated
weight) as a bitstream of T * K bits. The state is a window of L bits of the stream; each
step shifts K * V new bits into the bottom of the state and emits V weights, the decoded
value of the state. Consecutive states s, s' therefore satisfy

    s' >> KV == s & (2^(L - KV) - 1)          (KV = K * V)

and the stream is tail-biting: its first L - KV bits are also the low bits of the last state,
so the T / V states of a tile cost exactly T * K bits.

Codes (the value of an L-bit state s; QTIP, Tseng et al. 2024, constants from its
repository; shared/reference/QTIP.md):

    1MAD   V = 1: x = s * 34038481 + 76625530 (mod 2^32); value = (sum of x's 4 bytes - 510)
           / 147.800537109375 (unit variance: the sum of 4 uniform bytes)
    3INST  V = 1: x = s * 89226354 + 64248484 (mod 2^32); r = (x & 0x8FFF8FFF) ^ 996162400;
           value = f16(r >> 16) + f16(r & 0xFFFF) (each half read as IEEE float16 bits, added
           in float16: one rounding to nearest even)
    HYB    V = 2: h = (s + 1) * s (mod 2^32); value = table[(h >> (15 - Q)) & (2^Q - 1)] with
           its first component negated when bit 15 of h is set; table (2^Q, 2) float32 (`hyb_table`:
           k-means of 2-D Gaussians, deterministic for a seed; tunable like su / sv)
    LUT    any V: value = table[s], a (2^L, V) table (a reference code for tests)

Search: `viterbi` finds the minimum squared-error state sequence exactly (over every
sequence, or over those whose first and last states agree with a given overlap);
`quantize_tail_biting` is QTIP's two-pass tail-biting search (quantize a copy rolled by half
a sequence, read the overlap at the seam, then quantize the sequence with the overlap fixed).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.codebooks.base import Codebook

__all__ = ["Trellis", "TrellisCodebook", "trellis_codebook", "TILE", "decode_1mad", "decode_3inst", "decode_hyb", "hyb_table", "viterbi",
           "quantize_tail_biting", "pack_states", "unpack_states", "CODES", "HYB_STD"]

CODES = ("1MAD", "3INST", "HYB", "LUT")
# the std QTIP rescales its HYB table to (sqrt(15 / 16))
HYB_STD = 0.9682458365518543


def _u32(s):
    return jnp.asarray(s).astype(jnp.uint32)


def decode_1mad(s: jax.Array) -> jax.Array:
    """States (...) int -> values (...) float32 of the 1MAD code."""
    x = _u32(s) * jnp.uint32(34038481) + jnp.uint32(76625530)
    byte_sum = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
    return (byte_sum.astype(jnp.int32) - 510).astype(jnp.float32) / jnp.float32(147.800537109375)


def _f16_bits(b):
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def decode_3inst(s: jax.Array) -> jax.Array:
    """States (...) int -> values (...) float32 of the 3INST code: one float16 addition of
    the two halves, rounded to nearest even, as QTIP's code (a half + half in its reference,
    a half add in its kernels). The float32 sum of the halves is exact (both lie in
    [1/8, 2)), so rounding it once to float16 is that addition; for 42% of the 2^16 states it
    differs from the unrounded sum (by up to 2^-10)."""
    x = _u32(s) * jnp.uint32(89226354) + jnp.uint32(64248484)
    mask16 = (1 << 15) + (1 << 12) - 1
    r = (x & jnp.uint32((mask16 << 16) + mask16)) ^ jnp.uint32(996162400)
    # reduce_precision, not a float16 add: XLA may keep excess precision in a float16 add
    return jax.lax.reduce_precision(_f16_bits(r >> 16) + _f16_bits(r & 0xFFFF),
                                    exponent_bits=5, mantissa_bits=10)


def decode_hyb(s: jax.Array, table: jax.Array, Q: int) -> jax.Array:
    """States (...) int -> values (..., 2) float32 of the HYB code with `table` (2^Q, 2)."""
    h = _u32(s) * (_u32(s) + jnp.uint32(1))
    v = jnp.take(jnp.asarray(table, jnp.float32), ((h >> (15 - Q)) & ((1 << Q) - 1)).astype(jnp.int32), axis=0)
    flip = jnp.where((h >> 15) & 1, -1.0, 1.0).astype(jnp.float32)
    return v * jnp.stack([flip, jnp.ones_like(flip)], -1)


@functools.lru_cache(maxsize=None)
def hyb_table(Q: int = 9, seed: int = 0, samples: int = 1 << 16, iters: int = 30) -> np.ndarray:
    """The HYB table (2^Q, 2) float32: Lloyd's k-means of `samples` 2-D unit Gaussians
    (numpy Generator(seed)), started from 2^Q of the samples, `iters` iterations, rescaled to
    std HYB_STD as QTIP does. Deterministic: same arguments, same table."""
    with jax.ensure_compile_time_eval():        # a constant, also when first asked inside jit
        return _kmeans_2d(Q, seed, samples, iters)


def _kmeans_2d(Q, seed, samples, iters):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((samples, 2)).astype(np.float32)
    centers = jnp.asarray(data[rng.choice(samples, 1 << Q, replace=False)])
    x = jnp.asarray(data)

    @jax.jit
    def lloyd(c, _):
        d = jnp.sum(x * x, 1)[:, None] - 2 * x @ c.T + jnp.sum(c * c, 1)[None]
        a = jnp.argmin(d, 1)
        sums = jax.ops.segment_sum(x, a, num_segments=c.shape[0])
        counts = jax.ops.segment_sum(jnp.ones(x.shape[0]), a, num_segments=c.shape[0])
        # an empty cluster keeps its center (cannot happen often with 512 of 2^18 points)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c), None

    centers, _ = jax.lax.scan(lloyd, centers, None, length=iters)
    c = np.asarray(centers, np.float64)
    return (c / c.std() * HYB_STD).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Trellis:
    """A bitshift trellis code.

    code: "1MAD", "3INST" (V = 1), "HYB" (V = 2) or "LUT" (reference; `table` (2^L, V)).
    L: state bits. K: bits per weight. V: weights per step. Q: HYB table bits.
    T: weights per trellis (a 16 x 16 tile: 256). table: the HYB / LUT table as a tuple of
    rows (hashable, so a Trellis is a jit-static value); None: `hyb_table(Q)` for HYB.
    """

    code: str = "1MAD"
    L: int = 16
    K: int = 2
    V: int = 1
    Q: int = 9
    T: int = 256
    table: Optional[tuple] = None

    def __post_init__(self):
        if self.code not in CODES:
            raise ValueError(f"trellis code {self.code!r} is not one of {CODES}")
        if self.code in ("1MAD", "3INST") and self.V != 1:
            raise ValueError(f"{self.code} emits one weight per step: V must be 1, not {self.V}")
        if self.code == "HYB" and self.V != 2:
            raise ValueError(f"HYB emits two weights per step: V must be 2, not {self.V}")
        if not 0 < self.K * self.V < self.L:
            raise ValueError(f"K * V = {self.K * self.V} bits per step must be in 1..L-1 "
                             f"(L = {self.L})")
        if self.T % self.V or (self.T * self.K) % 16:
            raise ValueError(f"T = {self.T} weights must be a multiple of V = {self.V} and "
                             f"T * K a multiple of 16 (whole uint16 words)")
        if self.code == "LUT" and self.table is None:
            raise ValueError("the LUT code needs a table of 2^L rows of V values")

    @property
    def KV(self) -> int:
        return self.K * self.V

    @property
    def steps(self) -> int:
        return self.T // self.V

    def lut(self) -> np.ndarray:
        """The HYB / LUT table as a float32 array ((2^Q, 2) or (2^L, V))."""
        if self.table is not None:
            return np.asarray(self.table, np.float32)
        return hyb_table(self.Q)

    def decode_states(self, s: jax.Array, table=None) -> jax.Array:
        """States (...) int -> values (..., V) float32. table: overrides `lut()` (a traced,
        tunable HYB table)."""
        if self.code == "1MAD":
            return decode_1mad(s)[..., None]
        if self.code == "3INST":
            return decode_3inst(s)[..., None]
        tab = self.lut() if table is None else table
        if self.code == "HYB":
            return decode_hyb(s, tab, self.Q)
        return jnp.take(jnp.asarray(tab, jnp.float32), jnp.asarray(s, jnp.int32), axis=0)

    def state_values(self, table=None) -> jax.Array:
        """The values of every state, (2^L, V) float32 (table: as `decode_states`)."""
        return self.decode_states(jnp.arange(1 << self.L, dtype=jnp.int32), table)


def _viterbi_core(x, values, L: int, KV: int, overlap):
    """x (S, B, V) float32, values (2^L, V) -> states (S, B) int32 (see `viterbi`)."""
    S, B, _ = x.shape
    n_low, n_new = 1 << (L - KV), 1 << KV
    states = jnp.arange(1 << L, dtype=jnp.int32)

    # |v - x|^2 less |x|^2, which is the same for every state of a step: one multiply-add
    vsq = jnp.sum(jnp.square(values), -1)

    def err(xt):                                        # (B, V) -> (B, 2^L)
        return vsq[None] - 2.0 * jnp.einsum("bv,sv->bs", xt, values)

    cost = err(x[0])
    if overlap is not None:                             # first state's high bits = overlap
        cost = jnp.where((states[None] >> KV) == overlap[:, None], cost, jnp.inf)

    def step(cost, xt):
        # a state p = j * n_low + u precedes the states u * n_new + b: the best predecessor
        # depends only on u, the low L - KV bits of p
        c = cost.reshape(B, n_new, n_low)
        best = jnp.min(c, 1)
        if KV <= 4:
            arg = jnp.argmin(c, 1).astype(jnp.uint8)
        else:
            # the first predecessor that attains the minimum (= argmin's choice) by a second
            # plain min: XLA:CPU's variadic argmin reduce over 64 / 256 predecessors ran 3.7x /
            # 2.3x slower than this (HYB3 / HYB4; BUILD_NOTES, issue 16)
            dt = jnp.uint8 if KV <= 8 else jnp.int32
            j = jax.lax.broadcasted_iota(dt, c.shape, 1)
            arg = jnp.min(jnp.where(c == best[:, None, :], j, jnp.asarray(n_new - 1, dt)), 1)
        new = err(xt).reshape(B, n_low, n_new) + best[:, :, None]
        return new.reshape(B, 1 << L), arg

    cost, args = jax.lax.scan(step, cost, x[1:])
    if overlap is not None:                             # last state's low bits = overlap
        cost = jnp.where((states[None] & (n_low - 1)) == overlap[:, None], cost, jnp.inf)
    last = jnp.argmin(cost, 1).astype(jnp.int32)

    def back(s, arg):
        u = s >> KV
        prev = jnp.take_along_axis(arg, u[:, None], 1)[:, 0].astype(jnp.int32) * n_low + u
        return prev, prev

    _, prevs = jax.lax.scan(back, last, args, reverse=True)
    return jnp.concatenate([prevs, last[None]], 0)


MAX_CHUNK = 32


def default_chunk(B: int) -> int:
    """Sequences per Viterbi batch for B sequences: at most MAX_CHUNK, in equal batches (no
    padded sequences). Why: a batch's per-step arrays (chunk x 2^L float32) stay near the
    CPU's cache; on 2 AMD EPYC cores a chunk of 30 searched 60 tiles 1.3x (HYB) to 1.8x
    (3INST) faster than one of 60, and 96 tiles in chunks of 32 1.7x faster than in padded
    chunks of 64 (BUILD_NOTES, issue 16)."""
    n = -(-B // MAX_CHUNK)
    return max(1, -(-B // n))


@functools.partial(jax.jit, static_argnames=("tr", "chunk"))
def viterbi(x: jax.Array, tr: Trellis, overlap: Optional[jax.Array] = None,
            table: Optional[jax.Array] = None, chunk: Optional[int] = None) -> jax.Array:
    """The minimum squared-error state sequences of trellis `tr` for sequences x.

    x (B, T') float32 with T' a multiple of tr.V (any length; a tile has tr.T); overlap:
    None (any first state) or (B,) int: the first state's high L - KV bits and the last
    state's low L - KV bits must both equal it (tail-biting). table: a traced HYB / LUT table.
    chunk: sequences searched together (None: `default_chunk(B)`); it never changes a state.
    Returns states (B, T' / V) int32. Exact: ties go to the lowest state index. Memory: a
    chunk of sequences at a time, 2^L costs and T' / V x 2^(L - KV) back-pointer bytes each.
    """
    B, Tn = x.shape
    V = tr.V
    chunk = default_chunk(B) if chunk is None else min(chunk, B)
    values = tr.state_values(table)
    xs = jnp.asarray(x, jnp.float32).reshape(B, Tn // V, V)
    pad = -B % chunk
    xs = jnp.pad(xs, ((0, pad), (0, 0), (0, 0)))
    ov = None if overlap is None else jnp.pad(jnp.asarray(overlap, jnp.int32), (0, pad))
    nb = xs.shape[0] // chunk

    def one(args):
        xc, oc = args
        return _viterbi_core(jnp.swapaxes(xc, 0, 1), values, tr.L, tr.KV, oc).T

    xs = xs.reshape(nb, chunk, Tn // V, V)
    if ov is None:
        out = jax.lax.map(lambda xc: one((xc, None)), xs)
    else:
        out = jax.lax.map(one, (xs, ov.reshape(nb, chunk)))
    return out.reshape(nb * chunk, Tn // V)[:B]


def quantize_tail_biting(x: jax.Array, tr: Trellis, table=None, chunk: Optional[int] = None
                         ) -> Tuple[jax.Array, jax.Array]:
    """QTIP's tail-biting search: x (B, T) float32 -> (states (B, T / V) int32, xhat (B, T)
    float32). The first pass quantizes x rolled by half a sequence; the state at the seam
    gives the overlap bits the second, constrained pass must start and end with."""
    B, Tn = x.shape
    half = Tn // (2 * tr.V)
    rolled = jnp.roll(x, half * tr.V, axis=1)
    s1 = viterbi(rolled, tr, None, table, chunk)
    overlap = s1[:, half] >> tr.KV
    s = viterbi(x, tr, overlap, table, chunk)
    xhat = tr.decode_states(s, table).reshape(B, Tn)
    return s, xhat


def pack_states(states: jax.Array, tr: Trellis) -> jax.Array:
    """Tail-biting states (B, S) int32 -> the bitstreams (B, S * KV / 16) uint16: the first
    state's L bits then each later state's KV new bits, most significant bit first, the last
    L - KV bits (a repeat of the first state's high bits) dropped."""
    B, S = states.shape
    s = jnp.asarray(states, jnp.int32)
    first = (s[:, :1] >> jnp.arange(tr.L - 1, -1, -1)) & 1                 # (B, L)
    new = (s[:, 1:, None] >> jnp.arange(tr.KV - 1, -1, -1)) & 1             # (B, S-1, KV)
    bits = jnp.concatenate([first, new.reshape(B, -1)], 1)[:, :S * tr.KV]
    words = bits.reshape(B, -1, 16) << jnp.arange(15, -1, -1)
    return jnp.sum(words, -1).astype(jnp.uint16)


def unpack_states(packed: jax.Array, tr: Trellis) -> jax.Array:
    """The inverse of `pack_states`: (B, S * KV / 16) uint16 -> states (B, S) int32.

    State i is the L bits starting at bit i * KV of the stream (wrapping past its end). For
    L <= 17 each state lies in the 32-bit window of the word holding its first bit and the
    next one: two word reads, a shift and a mask per state; longer states take the bits one
    by one."""
    B, W = packed.shape
    S = W * 16 // tr.KV
    if tr.L > 17:
        return _unpack_by_bits(packed, tr)
    start = np.arange(S) * tr.KV                                # static bit offsets
    w0 = start // 16
    words = jnp.asarray(packed, jnp.uint32)
    # a gather of static indices beats static slices stacked on a minor axis (an
    # interleaving copy) on XLA:CPU: 2-4x at V = 1, measured
    window = (words[:, w0] << 16) | words[:, (w0 + 1) % W]          # (B, S) uint32
    shift = jnp.asarray(32 - tr.L - (start % 16), jnp.uint32)
    return ((window >> shift) & jnp.uint32((1 << tr.L) - 1)).astype(jnp.int32)


def _unpack_by_bits(packed, tr):
    B, W = packed.shape
    S = W * 16 // tr.KV
    bits = (jnp.asarray(packed, jnp.int32)[:, :, None] >> jnp.arange(15, -1, -1)) & 1
    bits = bits.reshape(B, W * 16)
    reps = -(-(tr.L - tr.KV) // (W * 16)) + 1                 # wrap the tail (any length)
    bits = jnp.tile(bits, (1, reps + 1))
    idx = jnp.arange(S)[:, None] * tr.KV + jnp.arange(tr.L)[None]          # (S, L)
    weights = 1 << jnp.arange(tr.L - 1, -1, -1)
    return jnp.sum(bits[:, idx] * weights, -1).astype(jnp.int32)


# ---------------------------------------------------------------------------- as a codebook

TILE = 16       # a trellis codes a TILE x TILE tile of the rotated weight (QTIP's T_x = T_y)


@dataclasses.dataclass(frozen=True)
class TrellisCodebook(Codebook):
    """A trellis code as a quipjax codebook: one tail-biting trellis per 16 x 16 tile.

    As a vector codebook its vectors are whole tiles (dim 256, row-major within the tile) and
    its codes the packed bitstream, code_shape (16 K,) uint16 words per tile (`pack_states`).
    In a weight (m, n) the codes are (m / 16, n / 16, 16 K): tile (i, j) holds rows
    16 i .. 16 i + 15, columns 16 j .. 16 j + 15; BlockLDLQ rounds blocks of 16 columns (the
    block LDL of the Hessian in 16 x 16 blocks, as QTIP's LDLQ).

    search "tail-biting": QTIP's two passes (`quantize_tail_biting`): the least-error path
    among those whose first and last states share the overlap the first pass chose (exact
    for that overlap, not over every overlap).
    """

    trellis: Trellis = None

    @property
    def block(self) -> int:
        return TILE

    def quantize_t(self, xt):
        """xt (256, N) float -> (codes (N, 16 K) uint16, xhat (256, N) in xt's dtype)."""
        states, xhat = quantize_tail_biting(jnp.asarray(xt, jnp.float32).T, self.trellis)
        return pack_states(states, self.trellis), xhat.T.astype(xt.dtype)

    def validate_codes(self, codes) -> None:
        """Every uint16 word is a valid bitstream piece: only the trailing shape is checked."""
        if np.shape(codes)[-1:] != self.code_shape:
            raise ValueError(f"{self.name} codes end in {self.code_shape[0]} uint16 words per "
                             f"tile, got shape {np.shape(codes)}")

    def decode(self, codes, table=None):
        """codes (..., 16 K) uint16 -> (..., 256) float32: each tile's weights, row-major.
        table: a tuned HYB table (2^Q, 2) (None: the codebook's own)."""
        self.validate_codes(codes)
        self.check_table(table)
        codes = jnp.asarray(codes)
        lead = codes.shape[:-1]
        states = unpack_states(codes.reshape(-1, codes.shape[-1]), self.trellis)
        return self.trellis.decode_states(states, table).reshape(lead + (self.trellis.T,))

    @property
    def has_table(self) -> bool:
        return self.trellis.code == "HYB"

    def default_table(self):
        if not self.has_table:
            return super().default_table()
        return self.trellis.lut()

    def quantize_block(self, x):
        """x (16, m) -> (codes (m / 16, 16 K), xhat (16, m)): the 16-row tiles of a block."""
        b, m = x.shape
        tiles = x.T.reshape(m // TILE, TILE * b)                   # (tiles, 256), row-major
        codes, xh = self.quantize_t(tiles.T)
        return codes, xh.T.reshape(m, b).T

    def codes_shape(self, m: int, n: int) -> tuple:
        return (m // TILE, n // TILE) + self.code_shape

    def decode_matrix(self, codes, m: int, n: int, table=None):
        t = self.decode(codes, table).reshape(m // TILE, n // TILE, TILE, TILE)
        return t.transpose(0, 2, 1, 3).reshape(m, n)

    def matrix_shape(self, codes_shape: tuple) -> tuple:
        return (codes_shape[0] * TILE, codes_shape[1] * TILE)

    @property
    def shape_multiple(self) -> tuple:
        return (TILE, TILE)

    def check_shape(self, m: int, n: int) -> None:
        if m % TILE or n % TILE:
            raise ValueError(f"{self.name} codes 16 x 16 tiles: the weight's shape ({m}, {n}) "
                             "must be a multiple of 16 in both dimensions")


# std of the values over all 2^16 states (the input scale that matches them) for L = 16
_VALUE_STD = {"1MAD": 1.0, "3INST": 1.2437, "HYB": 0.9695}


def trellis_codebook(code: str, K: int, L: int = 16) -> TrellisCodebook:
    """The registered trellis codebook `{code}{K}` ("HYB2", "1MAD3", ...)."""
    tr = Trellis(code, L=L, K=K, V=2 if code == "HYB" else 1)
    s = _VALUE_STD[code]
    return TrellisCodebook(name=f"{code}{K}", dim=tr.T, bits_per_weight=float(K), opt_scale=s,
                           default_scale=s, code_shape=(tr.T * K // 16,),
                           code_dtype=np.uint16, search="tail-biting", trellis=tr)
