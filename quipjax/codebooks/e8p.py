"""E8P12: the 2-bit "E8 padded" lattice codebook of QuIP#, with the official 16-bit codes.

The codebook (65536 points of E8 + 1/4, 8 weights per 16-bit code):
  * 256 absolute-value patterns: every p in {1/2, 3/2, 5/2, 7/2}^8 with ||p||^2 <= 10 (227 of
    them, in lexicographic order) followed by 29 patterns of five 3/2 and three 1/2 (norm^2
    12, the official list `NORM12`);
  * signs: any sign vector s with sum(s * p) even (so s * p lies in D8 + 1/2): 2^7 per pattern;
  * a shift of +1/4 or -1/4.

Official 16-bit layout: bits 15..8 = pattern index; bits 7..0 = sign field. The XOR parity of
the sign field is the shift bit: parity 1 -> flip bit 0 and shift by -1/4, parity 0 -> +1/4.
Bit SHUFFLE_MAP[i] of the (parity-corrected) field negates coordinate i of the *stored*
pattern, whose coordinate 7 is already negated when sum(p) is odd (so every stored pattern
has an even sum). `packed_abs_grid()` is the official 1 KiB table of nibbles (2v + 8) in column
order [0, 2, 4, 6, 1, 3, 5, 7].

Exact nearest-point search, O(1) work per vector (no 65536- or 1366-way argmin): for each
shift, y = x - shift and a = |y|. For a pattern p, the best signs are sign(y), and if
sum(p) + #negatives(y) is odd the coordinate with the smallest p_i a_i must flip, which costs
4 min_i p_i a_i. The 227 patterns of norm^2 <= 10 are closed under permutation, so (by the
rearrangement inequality) the best pattern of each level multiset assigns the levels in
sorted order of a, and then the flip, if needed, falls on the smallest a_i at level 1/2: seven
multisets, scored from the sorted a. The 29 extra patterns are scored directly. The best of
the 36 candidates under each shift is the exact nearest codeword (tests check it against a
brute-force argmin over all 65536 points).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.codebooks.base import Codebook, lex_keys

SHUFFLE_MAP = (0, 4, 1, 5, 2, 6, 3, 7)
_STORED_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)

# The 29 norm^2-12 patterns of the official codebook, times 2 (3 = 3/2, 1 = 1/2), in order.
NORM12_X2 = np.array([
    [3, 1, 1, 1, 3, 3, 3, 3], [1, 3, 1, 1, 3, 3, 3, 3], [1, 1, 3, 1, 3, 3, 3, 3],
    [1, 1, 1, 3, 3, 3, 3, 3], [3, 3, 3, 1, 3, 3, 1, 1], [3, 3, 3, 1, 3, 1, 3, 1],
    [3, 3, 3, 1, 1, 3, 3, 1], [3, 3, 3, 1, 3, 1, 1, 3], [3, 3, 3, 1, 1, 3, 1, 3],
    [3, 3, 3, 1, 1, 1, 3, 3], [3, 3, 1, 3, 3, 3, 1, 1], [3, 3, 1, 3, 3, 1, 3, 1],
    [3, 3, 1, 3, 1, 3, 3, 1], [3, 3, 1, 3, 3, 1, 1, 3], [3, 3, 1, 3, 1, 3, 1, 3],
    [3, 3, 1, 3, 1, 1, 3, 3], [3, 1, 3, 3, 3, 3, 1, 1], [3, 1, 3, 3, 3, 1, 3, 1],
    [3, 1, 3, 3, 1, 3, 3, 1], [3, 1, 3, 3, 3, 1, 1, 3], [3, 1, 3, 3, 1, 3, 1, 3],
    [1, 3, 3, 3, 1, 1, 3, 3], [1, 3, 3, 3, 3, 3, 1, 1], [1, 3, 3, 3, 3, 1, 3, 1],
    [1, 3, 3, 3, 1, 3, 3, 1], [1, 3, 3, 3, 3, 1, 1, 3], [1, 3, 3, 3, 1, 3, 1, 3],
    [1, 1, 3, 3, 1, 3, 3, 3], [3, 3, 1, 1, 3, 3, 3, 1],
], dtype=np.int64)

# Level multisets of the 227 permutation-closed patterns: (#3/2, #5/2); the rest are 1/2.
_MULTISETS = ((0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (0, 1), (1, 1))
_N_MAIN = len(_MULTISETS)
# Per coordinate, a 29-bit mask of the NORM12 patterns that put 3/2 there (no gathers needed).
_EXTRA_MASKS = tuple(int(sum(1 << e for e in range(NORM12_X2.shape[0]) if NORM12_X2[e, i] == 3))
                     for i in range(8))

@functools.lru_cache(maxsize=None)
def abs_grid() -> np.ndarray:
    """The 256 absolute-value patterns (256, 8) float64, in official index order."""
    lv = np.array([1, 3, 5, 7])  # 2 * level
    grid = np.stack(np.meshgrid(*([lv] * 8), indexing="ij"), -1).reshape(-1, 8)
    grid = grid[(grid ** 2).sum(1) <= 40]
    grid = grid[np.argsort(lex_keys(grid, 8), kind="stable")]
    assert grid.shape[0] == 227
    return np.concatenate([grid, NORM12_X2]).astype(np.float64) / 2


@functools.lru_cache(maxsize=None)
def packed_abs_grid() -> np.ndarray:
    """The official 256-entry packed pattern table (uint32 holding 8 nibbles 2v + 8)."""
    cba = abs_grid()[:, list(_STORED_COLUMNS)].copy()
    odd = (abs_grid().sum(1) % 2).astype(np.int64)
    cba[:, 7] *= 1 - 2 * odd
    nib = (cba * 2 + 8).astype(np.uint64)
    acc = np.zeros(256, np.uint64)
    for s in range(8):
        acc |= nib[:, s] << np.uint64(4 * s)
    return acc.astype(np.uint32)


def decode_from_layout(codes: np.ndarray) -> np.ndarray:
    """Decode 16-bit codes by the official bit layout, straight from the packed table (NumPy).

    This is the layout's definition (used to build the decode table and by tests).
    """
    codes = np.asarray(codes, np.int64)
    signs = codes & 255
    pattern = codes >> 8
    parity = np.zeros_like(signs)
    for i in range(8):
        parity ^= (signs >> i) & 1
    signs = signs ^ parity
    packed = packed_abs_grid().astype(np.int64)[pattern]
    out = np.zeros(codes.shape + (8,), np.float64)
    for i in range(8):
        ii = SHUFFLE_MAP[i]
        v = (((packed >> (4 * ii)) & 15) - 8) * 0.5
        out[..., i] = np.where((signs >> ii) & 1, -v, v)
    return out + np.where(parity, -0.25, 0.25)[..., None]


@functools.lru_cache(maxsize=None)
def codeword_table() -> np.ndarray:
    """All 65536 codewords (65536, 8) float32, row c = decode(c)."""
    return decode_from_layout(np.arange(1 << 16)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _key3_to_pattern() -> np.ndarray:
    """Base-3 key of a level vector (levels 1/2, 3/2, 5/2 -> 0, 1, 2) -> pattern index."""
    g = abs_grid()
    table = np.full(3 ** 8, -1, np.int32)
    main = g[:227]
    keys = ((main - 0.5) * np.array([3 ** i for i in range(8)])).sum(1).astype(np.int64)
    table[keys] = np.arange(227)
    keys12 = ((g[227:] - 0.5) * np.array([3 ** i for i in range(8)])).sum(1).astype(np.int64)
    table[keys12] = np.arange(227, 256)
    return table


# Optimal 19-comparator sorting network for 8 inputs.
_SORT8 = ((0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3),
          (4, 5), (6, 7), (2, 4), (3, 5), (1, 4), (3, 6), (1, 2), (3, 4), (5, 6))


def materialize(v: jax.Array) -> jax.Array:
    """Identity that makes XLA compute v once: v (...) integer array -> the same values, shape
    and dtype (float v: the same values where finite; inf becomes nan, as v * 1 + v * 0).

    Used on (N,) int32 per-vector values inside the codebook searches (`e8p_quantize_t`,
    `quipjax.codebooks.rvq.e81b_quantize_t`).

    XLA:CPU fuses cheap elementwise producers into every consumer and every element of a
    broadcast, so a per-vector value (the winning candidate) used by the 8 coordinates would
    be recomputed 8 times or more. A reduction over a minor axis is a fusion root that
    consumers cannot absorb (optimization_barrier does not survive to fusion). Of the forms
    tried, multiplying by a broadcast [1, 0] and summing is the cheapest (a stacked [v, 0]
    makes a slow concatenate fusion). Measured: the search runs about 10x faster.
    """
    return jnp.sum(v[..., None] * jnp.asarray([1, 0], v.dtype), -1)


def _sort_desc(a):
    s = list(a)
    for i, j in _SORT8:
        s[i], s[j] = jnp.maximum(s[i], s[j]), jnp.minimum(s[i], s[j])
    return s


def _best_candidate(y):
    """Best of the 36 candidates for a shifted input y (8, N).

    Returns (dist, idx): dist = min over codewords c (no shift) of |y - c|^2 and idx in
    [0, 36): < 7 a level multiset of `_MULTISETS` assigned in sorted order of |y|, >= 7 the
    NORM12 pattern idx - 7. Running max over rows (elementwise): XLA:CPU reductions over a
    major axis are ~20x slower.
    """
    a = [jnp.abs(y[i]) for i in range(8)]
    negpar = functools.reduce(jnp.logical_xor, [y[i] < 0 for i in range(8)])
    npf = negpar.astype(y.dtype)
    s = _sort_desc(a)
    smin = s[7]
    pen_even = 2.0 * smin * npf          # parity fix when #3/2 is even
    pen_odd = 2.0 * smin * (1.0 - npf)   # ... and when it is odd
    prefix = [None, s[0], s[0] + s[1], s[0] + s[1] + s[2], s[0] + s[1] + s[2] + s[3]]
    best, idx = None, jnp.zeros(y.shape[1:], jnp.int32)

    def consider(c, score):
        nonlocal best, idx
        if best is None:
            best = score
            return
        better = score > best
        best = jnp.where(better, score, best)
        idx = jnp.where(better, c, idx)

    for c, (k, j) in enumerate(_MULTISETS):
        norm = 2.0 + 2.0 * k + 6.0 * j
        pen = pen_odd if k % 2 else pen_even
        if j == 0:
            score = -norm - pen if k == 0 else 2.0 * prefix[k] - norm - pen
        else:
            score = 2.0 * (s[0] + prefix[k + 1]) - norm - pen
        consider(c, score)
    for e, row in enumerate(NORM12_X2):
        t = [i for i in range(8) if row[i] == 3]
        u = [i for i in range(8) if row[i] == 1]
        sum_t = sum((a[i] for i in t[1:]), a[t[0]])
        min_t = functools.reduce(jnp.minimum, [a[i] for i in t])
        min_u = functools.reduce(jnp.minimum, [a[i] for i in u])
        pen = 4.0 * jnp.minimum(0.5 * min_u, 1.5 * min_t) * (1.0 - npf)  # sum(p) = 9 is odd
        consider(_N_MAIN + e, 2.0 * sum_t - 12.0 - pen)
    # |y - c|^2 = |y|^2 - (2<y, c> - |c|^2), and 2<y, c> - |c|^2 = sum|y| + score
    dist = sum(y[i] * y[i] - a[i] for i in range(8)) - best
    return dist, idx


def e8p_quantize_t(x: jax.Array):
    """Exact nearest E8P12 codeword of each column of x (8, N).

    Returns (codes (N,) uint16 in the official layout, xhat (8, N) in x's dtype).
    """
    dt = x.dtype
    d_pos, c_pos = _best_candidate(x - 0.25)   # codewords shifted by +1/4 (sign parity 0)
    d_neg, c_neg = _best_candidate(x + 0.25)   # codewords shifted by -1/4 (sign parity 1)
    use_neg = d_neg < d_pos
    # c in [0, 36) and the shift, as one materialized integer
    cs = materialize(jnp.where(use_neg, c_neg + 64, c_pos))
    use_neg = cs >= 64
    c = cs & 63

    y = jnp.where(use_neg, x + 0.25, x - 0.25)          # (8, N)
    a = jnp.abs(y)
    neg = y < 0
    negpar = functools.reduce(jnp.logical_xor, [neg[i] for i in range(8)])
    rows = np.arange(8)[:, None]
    # rank of each coordinate in descending order of a, ties broken by index (8 compares
    # of (8, N) arrays: elementwise, vectorized along N)
    r = sum(((a[jj][None] > a) | ((a[jj][None] == a) & jnp.asarray(jj < rows))).astype(jnp.int32)
            for jj in range(8))
    is_main = c < _N_MAIN
    # level multiset of a main candidate: c in 0..4 -> (k=c, j=0); 5, 6 -> (k=c-5, j=1)
    j = (c >= 5).astype(jnp.int32)
    k = jnp.where(c >= 5, c - 5, c)
    main_lv = jnp.where(r < j, 2, jnp.where(r < j + k, 1, 0))
    # bit e of _EXTRA_MASKS[i] is 1 when NORM12 pattern e has 3/2 at coordinate i
    masks = jnp.asarray(np.array(_EXTRA_MASKS, np.int32))[:, None]
    extra_lv = (masks >> jnp.maximum(c - _N_MAIN, 0)) & 1
    lvl = jnp.where(is_main, main_lv, extra_lv)                     # (8, N) in {0, 1, 2}
    odd = jnp.where(is_main, k % 2 == 1, True)
    bad = odd ^ negpar
    p = 0.5 + lvl.astype(dt)
    # the coordinate to flip when the parity is wrong: smallest p_i a_i, first on ties
    cost = p * a
    best_cost, flip = cost[0], jnp.zeros(c.shape, jnp.int32)
    for i in range(1, 8):
        lower = cost[i] < best_cost
        best_cost = jnp.where(lower, cost[i], best_cost)
        flip = jnp.where(lower, i, flip)
    flip = materialize(jnp.where(bad, flip, -1))
    s_neg = neg ^ (flip == jnp.asarray(rows, jnp.int32))
    xhat = jnp.where(s_neg, -p, p) + jnp.where(use_neg, -0.25, 0.25).astype(dt)
    key = sum(lvl[i] * (3 ** i) for i in range(8))
    e = s_neg ^ (jnp.asarray(rows == 7) & odd)
    sbits = sum(e[i].astype(jnp.int32) << SHUFFLE_MAP[i] for i in range(8))
    sbits = sbits ^ use_neg.astype(jnp.int32)
    pattern = jnp.asarray(_key3_to_pattern())[key]
    codes = ((pattern << 8) | sbits).astype(jnp.uint16)
    # Materialized (an identity matmul is never fused into its consumers) so that consumers
    # (the residual of RVQ, the LDLQ error) do not re-derive it inside their own fusions:
    # besides the cost, XLA:CPU's fusion emitter in jaxlib 0.10.2 miscompiles that
    # re-derivation (a wrong level in ~4% of vectors; gone with
    # --xla_cpu_use_fusion_emitters=false). tests/test_codebooks.py checks xhat == decode.
    xhat = jnp.dot(jnp.eye(8, dtype=dt), xhat.astype(dt), precision=jax.lax.Precision.HIGHEST)
    return codes, xhat


def e8p_quantize_brute_force(x: jax.Array, chunk: int = 4096):
    """Reference: argmin over all 65536 codewords (slow). x (N, 8) -> (codes uint16, dist2)."""
    table = jnp.asarray(codeword_table())
    tnorm = jnp.sum(table * table, 1)

    def one(xc):
        d = jnp.sum(xc * xc, 1, keepdims=True) - 2.0 * xc @ table.T + tnorm[None]
        return jnp.argmin(d, 1).astype(jnp.uint16), jnp.min(d, 1)

    x = jnp.asarray(x, jnp.float32)
    outs = [jax.jit(one)(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    return jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs])


@dataclasses.dataclass(frozen=True)
class E8P12(Codebook):
    """The 2-bit E8P codebook. Codes: uint16 in the official layout (module docstring)."""

    name: str = "E8P12"
    dim: int = 8
    bits_per_weight: float = 2.0
    opt_scale: float = 1.03
    default_scale: float = 0.9
    code_shape: tuple = ()
    code_dtype: type = np.uint16
    search: str = "exact"

    def quantize_t(self, xt):
        return e8p_quantize_t(xt)

    def decode(self, codes):
        """codes (...,) integers in 0..65535 (uint16) -> (..., 8) float32; out-of-range
        concrete codes raise (`validate_codes`)."""
        self.validate_codes(codes)
        codes = jnp.asarray(codes)
        return jnp.asarray(codeword_table())[codes.astype(jnp.int32)]
