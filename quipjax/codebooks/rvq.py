"""Residual vector quantization: the 3- and 4-bit QuIP# codebooks.

    xhat = Q1(x) + Q2((x - Q1(x)) * s2) / s2

E8P12RVQ4B: Q1 = Q2 = E8P12, s2 = 3.45 (opt_scale 1.03).
E8P12RVQ3B: Q1 = E8P12, Q2 = E81B (1 bit per weight: the 256-entry E8 table below), s2 = 2.04
  (opt_scale 0.98).
Codes are uint16 of shape (..., 2): [..., 0] the E8P12 code of stage 1 (official layout),
[..., 1] the stage-2 code (an E8P12 code, or an E81B index in 0..255).

The registered codebooks search greedily, as the official code (`search` = "greedy"): each
stage is an exact nearest-point search (stage 1 of x, stage 2 of the scaled residual), but a
stage-1 point other than the nearest can leave a residual that stage 2 fits better, so the pair
is not always the nearest of the 2^32 (4-bit) or 2^24 (3-bit) codewords. On 2000 unit Gaussian
vectors scaled by opt_scale, E8P12RVQ4B misses the nearest codeword for 43.7% of them (+8.7%
squared error) and E8P12RVQ3B for 0.7% (+0.6%), against an exhaustive search over the 128
nearest stage-1 points, certified exact for all 2000 4-bit vectors and 1999 of the 3-bit ones
(tests/test_codebooks.py, `test_search_attribute_is_honest`).

Beam search (`RVQ.beam` = B > 1, `search` = "beam"; `quipjax.codebooks.get(name, beam=B)`):
the B nearest E8P12 points of each vector (`e8p_nearest_k`), each followed by stage 2's exact
search of its scaled residual; the pair of least squared error is kept. Candidate 0 is the
greedy pair (the exact stage-1 search's point), so the result is never worse than greedy and
B = 1 is greedy. Same codes and decode: only the search changes. Measured on 10^5 Gaussian
vectors (BUILD_NOTES.md "Better 3/4-bit E8P search", experiments/bench_rvq_search.py): MSE -7.6% (B = 4) and -8.5%
(B = 16, the same as B = 64) at 4 bits, -0.4% / -0.5% at 3 bits, for a search 25-55x (B = 4)
and 50-100x (B = 16) slower than greedy on a 2-core CPU.

E81B, the official 256-entry table, in official index order: the 241 points of E8 with
norm^2 <= 2 (the origin, the 112 roots +-e_i +-e_j and the 128 points (+-1/2)^8 with an even
number of minus signs; integer points first, each group in lexicographic order of the
coordinates), then 2e_1..2e_8 and -2e_1..-2e_7 (-2e_8 left out). Its nearest point is found in
closed form per class (origin / integer root / half-integer root / 2e_i).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.codebooks.base import Codebook, check_codes, lex_keys
from quipjax.codebooks.e8p import (E8P12, SHUFFLE_MAP, abs_grid, e8p_quantize_t,
                                   materialize)


@functools.lru_cache(maxsize=None)
def e81b_table() -> np.ndarray:
    """The 256 E81B codewords (256, 8) float32 in official order."""
    # integer points of norm^2 <= 2 have coordinates in {-1, 0, 1}: enumerate 3^8, not 8^8
    ints = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 8), indexing="ij"), -1).reshape(-1, 8)
    ints = ints[((ints ** 2).sum(1) <= 2) & (ints.sum(1) % 2 == 0)]
    ints = ints[np.argsort(lex_keys(ints + 4, 8), kind="stable")]
    halves2 = np.stack(np.meshgrid(*([np.array([-1, 1])] * 8), indexing="ij"), -1).reshape(-1, 8)
    halves2 = halves2[(halves2.sum(1) // 2) % 2 == 0]          # even sum of the halves
    halves2 = halves2[np.argsort(lex_keys((halves2 + 1) // 2, 2), kind="stable")]
    two = np.concatenate([2 * np.eye(8), -2 * np.eye(8)[:7]])
    table = np.concatenate([ints, halves2 / 2, two]).astype(np.float32)
    assert table.shape == (256, 8)
    return table


# Descriptor of a codeword (class + a few bits) -> official index, so the index costs one
# gather: 0 origin; 1 + 4 (8 lo + hi) + 2 s_lo + s_hi for +-e_lo +-e_hi (s = 1 if negative);
# 257 + sign bits (bit i: coordinate i negative) for (+-1/2)^8; 513 + 2 i + s for +-2 e_i.
_DESC_SIZE = 529


@functools.lru_cache(maxsize=None)
def _desc_to_index() -> np.ndarray:
    table = e81b_table()
    out = np.full(_DESC_SIZE, -1, np.int32)
    for idx, c in enumerate(table):
        nz = np.nonzero(c)[0]
        if len(nz) == 0:
            d = 0
        elif np.all(np.abs(c) == 0.5):
            d = 257 + int(sum(1 << i for i in range(8) if c[i] < 0))
        elif len(nz) == 2:
            lo, hi = nz
            d = 1 + 4 * (8 * lo + hi) + 2 * int(c[lo] < 0) + int(c[hi] < 0)
        else:
            (i,) = nz
            d = 513 + 2 * i + int(c[i] < 0)
        out[d] = idx
    assert (np.sort(out[out >= 0]) == np.arange(256)).all()
    return out


def _argmax_rows(v, exclude=None):
    """First index of the max over the 8 rows of v (list of (N,) arrays), as a chain."""
    best, idx = None, None
    for i, vi in enumerate(v):
        if exclude is not None:
            vi = jnp.where(exclude == i, -jnp.inf, vi)
        if best is None:
            best, idx = vi, jnp.zeros(vi.shape, jnp.int32)
        else:
            better = vi > best
            best, idx = jnp.where(better, vi, best), jnp.where(better, i, idx)
    return best, idx


def e81b_quantize_t(y: jax.Array):
    """Exact nearest E81B codeword of each column of y (8, N) -> (index uint16 (N,), yhat)."""
    dt = y.dtype
    a = [jnp.abs(y[i]) for i in range(8)]
    neg = [y[i] < 0 for i in range(8)]
    negpar = functools.reduce(jnp.logical_xor, neg)
    t0, i1 = _argmax_rows(a)
    t1, i2 = _argmax_rows(a, exclude=i1)
    amin, fl = _argmax_rows([-ai for ai in a])
    amin = -amin
    total = sum(a[1:], a[0])
    # the allowed 2e_i: +-2e_i for i < 7, only +2e_8 (score 4 y_7 - 4)
    t2, ie = _argmax_rows(a[:7] + [y[7]])
    # scores 2<y, c> - |c|^2 of each class's best point
    s_root = 2.0 * (t0 + t1) - 2.0
    s_half = total - 2.0 - 2.0 * amin * negpar.astype(dt)
    s_two = 4.0 * t2 - 4.0
    cls, best = jnp.zeros(y.shape[1:], jnp.int32), jnp.zeros(y.shape[1:], dt)
    for cnum, sc in ((1, s_root), (2, s_half), (3, s_two)):
        better = sc > best
        best, cls = jnp.where(better, sc, best), jnp.where(better, cnum, cls)
    packed = materialize(cls | (i1 << 2) | (i2 << 5) | (fl << 8) | (ie << 11)
                          | (negpar.astype(jnp.int32) << 14))
    cls, i1, i2 = packed & 3, (packed >> 2) & 7, (packed >> 5) & 7
    fl, ie, bad = (packed >> 8) & 7, (packed >> 11) & 7, (packed >> 14) & 1
    rows = jnp.arange(8, dtype=jnp.int32)[:, None]
    negm = y < 0
    half_neg = negm ^ ((bad == 1) & (rows == fl))
    mag = jnp.where(cls == 1, ((rows == i1) | (rows == i2)).astype(dt),
                    jnp.where(cls == 2, 0.5, jnp.where(cls == 3, 2.0 * (rows == ie), 0.0)))
    negc = jnp.where(cls == 2, half_neg, negm & ~((cls == 3) & (rows == 7)))
    yhat = jnp.where(negc, -mag, mag).astype(dt)
    lo, hi = jnp.minimum(i1, i2), jnp.maximum(i1, i2)
    s_lo = jnp.where(lo == i1, neg_at(y, i1), neg_at(y, i2))
    s_hi = jnp.where(hi == i1, neg_at(y, i1), neg_at(y, i2))
    half_bits = sum(half_neg[i].astype(jnp.int32) << i for i in range(8))
    d = jnp.where(cls == 0, 0,
                  jnp.where(cls == 1, 1 + 4 * (8 * lo + hi) + 2 * s_lo + s_hi,
                            jnp.where(cls == 2, 257 + half_bits,
                                      513 + 2 * ie + jnp.where(ie == 7, 0, neg_at(y, ie)))))
    idx = jnp.asarray(_desc_to_index())[d]
    return idx.astype(jnp.uint16), yhat


def neg_at(y, i):
    """1 where y[i, n] < 0 for a per-column row index i (N,), else 0 (int32)."""
    sel = functools.reduce(lambda acc, r: jnp.where(i == r, y[r], acc), range(1, 8), y[0])
    return (sel < 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class E81B(Codebook):
    """1 bit per weight: the 256-point E8 table of the official 3-bit second stage."""

    name: str = "E81B"
    dim: int = 8
    bits_per_weight: float = 1.0
    opt_scale: float = 1.0
    default_scale: float = 1.0
    code_shape: tuple = ()
    code_dtype: type = np.uint16
    search: str = "exact"

    def quantize_t(self, xt):
        return e81b_quantize_t(xt)

    def decode(self, codes):
        """codes (...,) integers in 0..255 -> (..., 8) float32; out-of-range concrete codes
        raise (`validate_codes`)."""
        self.validate_codes(codes)
        return jnp.asarray(e81b_table())[jnp.asarray(codes).astype(jnp.int32)]


# --- k nearest E8P12 points and the RVQ beam search -----------------------------------------
#
# E8P12 = (P + 1/4) u (P - 1/4), P = {s * p: p one of the 256 absolute-value patterns, s a sign
# vector with #negatives = sum(p) mod 2} (`quipjax.codebooks.e8p`). A "class" (shift, pattern)
# holds 128 codewords; there are 512 classes. The nearest point of a class is found in closed
# form: for y = x - shift and a = |y|, the signs of y, and if their parity is not the class's,
# a flip of the coordinate with the smallest p_i a_i (+4 p_i a_i to the squared distance).
# The k nearest codewords lie in the k classes whose minima are smallest: those classes'
# minimizers are k distinct codewords at most d = the k-th smallest minimum away, and every
# codeword of any other class is at least d away (ties: an equally near set). So: 512 class
# minima (4096 multiply-adds per vector), top k classes, their 128 k codewords scored by one
# small matmul, top k of those; 8x to 128x fewer distances than a scan of all 65536 for
# k = 64 to 4. Tried and dropped: a static candidate set of at most k - r sign vectors for
# the class ranked r, chosen by dominance over the sorted flip costs (11 / 200 / 3068
# candidates for k = 4 / 16 / 64 instead of 128 k): on XLA:CPU, 512-vector chunks, no faster
# at k = 4 and 16 and 2.5x slower at k = 64 (sorting network, gathers).

MAX_BEAM = 512                    # classes of E8P12 (the class step takes at most all of them)
_BEAM_ELEMS = 1 << 22             # elements of the largest per-chunk array of the beam search


@functools.lru_cache(maxsize=None)
def _e8p_classes():
    """(patterns (256, 8) float64, odd (256,) bool: sum(pattern) odd, so its sign vectors have
    an odd number of minus signs, even_signs (128, 8) float64 of +-1 with an even number of
    -1: a class's 128 sign vectors are these, with coordinate 0 negated when odd)."""
    patterns = abs_grid()
    odd = (patterns.sum(1) % 2).astype(bool)
    bits = (np.arange(256)[:, None] >> np.arange(8)[None]) & 1
    even_signs = (1 - 2 * bits[bits.sum(1) % 2 == 0]).astype(np.float64)
    assert even_signs.shape == (128, 8)
    return patterns, odd, even_signs


def e8p_nearest_k(x: jax.Array, k: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The k nearest E8P12 codewords of each row of x, nearest first (ties in any order).

    x (N, 8) float32 / float64; k in 1..512 (static). Returns (codes (N, k) uint16 in the
    official layout; q (N, k, 8) in x's dtype: the k distinct codewords, exact multiples of
    1/4, q = E8P12.decode(codes); dist2 (N, k) their squared distances, ascending, as computed
    in x's dtype). Memory O(N (512 + 128 k)) (chunk N for large inputs, as
    `rvq_beam_quantize_t` does). The method: the comment above; tests/test_rvq_search.py
    checks it against all 65536 codewords.
    """
    if not 1 <= k <= MAX_BEAM:
        raise ValueError(f"e8p_nearest_k: k must be in 1..{MAX_BEAM}, got {k}")
    dt = x.dtype
    n = x.shape[0]
    patterns, odd, even_signs = _e8p_classes()
    pj, oddj, sj = jnp.asarray(patterns, dt), jnp.asarray(odd), jnp.asarray(even_signs, dt)
    shifts = jnp.asarray([0.25, -0.25], dt)       # class c: shift shifts[c // 256], pattern c % 256
    hi = jax.lax.Precision.HIGHEST
    # class minima: |y - sign(y) p|^2 = |a|^2 - 2 a.p + |p|^2, + the flip if the parity is wrong
    y = x[:, None, :] - shifts[None, :, None]                                  # (N, 2, 8)
    a = jnp.abs(y)
    negpar = (jnp.sum((y < 0).astype(jnp.int32), -1) % 2).astype(bool)        # (N, 2)
    base = (jnp.sum(a * a, -1)[..., None] + jnp.sum(pj * pj, -1)
            - 2.0 * jnp.einsum("nti,pi->ntp", a, pj, precision=hi))            # (N, 2, 256)
    # a running minimum over the 8 coordinates (elementwise on (N, 2, 256)): ~7x faster on
    # XLA:CPU than jnp.min over a minor axis of 8 of an (N, 2, 256, 8) product
    flip = a[..., 0, None] * pj[:, 0]
    for i in range(1, 8):
        flip = jnp.minimum(flip, a[..., i, None] * pj[:, i])
    dcls = jnp.where(negpar[..., None] != oddj, base + 4.0 * flip, base).reshape(n, 512)
    _, cls = jax.lax.top_k(-dcls, k)                                           # (N, k)
    # every codeword of the k classes: |y - s p|^2 = |y|^2 + |p|^2 - 2 <s, p y>
    shift = shifts[cls // 256][..., None]                                      # (N, k, 1)
    pat = pj[cls % 256]                                                        # (N, k, 8)
    neg0 = jnp.where(oddj[cls % 256], -1.0, 1.0).astype(dt)                    # (N, k)
    yk = x[:, None, :] - shift                                                 # (N, k, 8)
    w = (pat * yk).at[..., 0].multiply(neg0)
    dot = jnp.einsum("nki,si->nks", w, sj, precision=hi)                       # (N, k, 128)
    d = (jnp.sum(yk * yk, -1) + jnp.sum(pat * pat, -1))[..., None] - 2.0 * dot
    negd, idx = jax.lax.top_k(-d.reshape(n, k * 128), k)                       # (N, k)
    j = idx // 128
    signs = sj[idx % 128].at[..., 0].multiply(jnp.take_along_axis(neg0, j, 1))
    q = (signs * jnp.take_along_axis(pat, j[..., None], 1)
         + jnp.take_along_axis(shift, j[..., None], 1))
    # the official code (as `e8p_quantize_t` builds it): pattern index << 8 | sign field, the
    # field's bit SHUFFLE_MAP[i] = coordinate i negative, XOR coordinate 7 for an odd pattern,
    # XOR bit 0 for the -1/4 shift (so the field's parity is the shift)
    c = jnp.take_along_axis(cls, j, 1)
    neg = signs < 0
    neg = neg.at[..., 7].set(neg[..., 7] ^ oddj[c % 256])
    field = sum(neg[..., i].astype(jnp.int32) << SHUFFLE_MAP[i] for i in range(8))
    codes = ((c % 256) << 8) | (field ^ (c // 256))
    return codes.astype(jnp.uint16), q, -negd


def _beam_chunk(x, stage2: Codebook, resid_scale: float, beam: int):
    """Beam search of the rows of one chunk x (C, 8) -> (codes (C, 2) uint16, xhat (C, 8))."""
    c = x.shape[0]
    c1, q1, _ = e8p_nearest_k(x, beam)                                         # (C, B, 8)
    # candidate 0 is exactly greedy's stage-1 point (the nearest but for float ties), so the
    # beam keeps the greedy pair unless another is strictly better, and B = 1 is greedy
    g1, x1 = e8p_quantize_t(x.T)
    c1, q1 = c1.at[:, 0].set(g1), q1.at[:, 0].set(x1.T)
    r = (x[:, None, :] - q1) * resid_scale
    c2, x2 = stage2.quantize_t(r.reshape(c * beam, 8).T)
    x2 = x2.T.reshape(c, beam, 8)
    err = jnp.sum((x[:, None, :] - q1 - x2 / resid_scale) ** 2, -1)            # (C, B)
    best = jnp.argmin(err, 1)                                                  # first on ties
    q1b = jnp.take_along_axis(q1, best[:, None, None], 1)[:, 0]
    x2b = jnp.take_along_axis(x2, best[:, None, None], 1)[:, 0]
    c1b = jnp.take_along_axis(c1, best[:, None], 1)[:, 0]
    c2b = jnp.take_along_axis(c2.reshape(c, beam), best[:, None], 1)[:, 0]
    return jnp.stack([c1b, c2b.astype(jnp.uint16)], -1), q1b + x2b / resid_scale


def beam_chunk_size(n: int, beam: int) -> int:
    """Vectors per chunk of the beam search: its largest arrays, (C, 2, 256) class terms and
    (C, beam * 128) codeword scores, stay within 2^22 elements (16 MiB in float32); C <= 4096
    (for beam 4: 4096 vectors, 16: 2048, 64: 512, 512: 64)."""
    return max(1, min(n, 4096, _BEAM_ELEMS // max(2 * 256, 128 * beam)))


def rvq_beam_quantize_t(xt: jax.Array, stage2: Codebook, resid_scale: float, beam: int,
                        chunk: int | None = None) -> Tuple[jax.Array, jax.Array]:
    """Beam search of a two-stage codebook whose stage 1 is E8P12 (module docstring).

    xt (8, N) float32 / float64 (coordinates first, as `Codebook.quantize_t`); beam in
    1..512 and chunk (vectors per step, default `beam_chunk_size`) static. Returns (codes (N, 2)
    uint16: E8P12 code, stage-2 code; xhat (8, N) in xt's dtype, q1 + q2 / resid_scale, which is
    what `RVQ.decode` gives for the codes). Jittable; chunks run one after another
    (`lax.map`), so memory is bounded by the chunk, not by N.
    """
    if not 1 <= beam <= MAX_BEAM:
        raise ValueError(f"beam must be in 1..{MAX_BEAM}, got {beam}")
    n = xt.shape[1]
    x = xt.T
    cs = beam_chunk_size(n, beam) if chunk is None else max(1, min(int(chunk), n))
    run = functools.partial(_beam_chunk, stage2=stage2, resid_scale=resid_scale, beam=beam)
    if cs >= n:
        codes, xhat = run(x)
    else:
        nc = -(-n // cs)
        xp = jnp.pad(x, ((0, nc * cs - n), (0, 0)))       # zero rows: valid, dropped below
        codes, xhat = jax.lax.map(run, xp.reshape(nc, cs, 8))
        codes, xhat = codes.reshape(nc * cs, 2)[:n], xhat.reshape(nc * cs, 8)[:n]
    return codes, xhat.T


@dataclasses.dataclass(frozen=True)
class RVQ(Codebook):
    """Two-stage residual VQ: xhat = q1 + q2 / resid_scale, q1 a stage-1 codeword, q2 a stage-2
    codeword.

    beam = 1 (the registered codebooks): greedy search (`search` = "greedy"): q1 = stage 1's
    search of x, q2 stage 2's search of the scaled residual (x - q1) * resid_scale; the pair is
    not necessarily the nearest codeword. beam = B in 2..512 (`search` = "beam", stage 1 must
    be E8P12): the B nearest q1, each with stage 2's search of its residual, the best pair kept
    (`rvq_beam_quantize_t`). Make one with `with_beam(B)` or `quipjax.codebooks.get(name,
    beam=B)`. The beam changes the search only: `name`, the codes' layout and `decode` are
    those of the greedy codebook (checkpoints record the name, not the search).
    """

    search: str = "greedy"
    stage1: Codebook = None
    stage2: Codebook = None
    resid_scale: float = 1.0
    beam: int = 1

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beam, bool) or not isinstance(self.beam, (int, np.integer)) \
                or not 1 <= self.beam <= MAX_BEAM:
            raise ValueError(f"{self.name}: beam must be an int in 1..{MAX_BEAM}, got "
                             f"{self.beam!r}")
        want = "greedy" if self.beam == 1 else "beam"
        if self.search != want:
            raise ValueError(f"{self.name}: beam={self.beam} searches {want!r}, but "
                             f"search={self.search!r}; use with_beam({self.beam})")
        if self.beam > 1 and not isinstance(self.stage1, E8P12):
            raise ValueError(f"{self.name}: the beam search needs an E8P12 first stage, got "
                             f"{self.stage1!r}")

    def with_beam(self, beam: int) -> "RVQ":
        """This codebook searching with a beam of `beam` stage-1 points (1: greedy)."""
        if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)):
            raise ValueError(f"{self.name}: beam must be an int in 1..{MAX_BEAM}, got {beam!r}")
        return dataclasses.replace(self, beam=int(beam),
                                   search="greedy" if beam == 1 else "beam")

    def quantize_t(self, xt) -> Tuple[jax.Array, jax.Array]:
        if self.beam > 1:
            return rvq_beam_quantize_t(xt, self.stage2, self.resid_scale, self.beam)
        c1, x1 = self.stage1.quantize_t(xt)
        c2, x2 = self.stage2.quantize_t((xt - x1) * self.resid_scale)
        return jnp.stack([c1, c2], -1), x1 + x2 / self.resid_scale

    def __repr__(self):
        beam = f", beam {self.beam}" if self.beam > 1 else ""
        return f"Codebook({self.name}: {self.bits_per_weight:g} bits/weight, dim {self.dim}{beam})"

    def validate_codes(self, codes) -> None:
        """Codes (..., 2): a ValueError unless the last axis has the 2 stages (also under
        tracing) and, for concrete codes, each stage's code is in its stage's range."""
        if np.shape(codes)[-1:] != (2,):
            raise ValueError(f"{self.name} codes have shape (..., 2) (stage 1, stage 2), got "
                             f"{np.shape(codes)}")
        codes = codes if isinstance(codes, (np.ndarray, jax.Array)) else np.asarray(codes)
        for i, st in enumerate((self.stage1, self.stage2)):
            check_codes(codes[..., i], st.num_codes, self.name,
                        f"stage-{i + 1} codes ({st.name}, codes[..., {i}])")

    def decode(self, codes):
        """codes (..., 2) -> (..., 8) float32 q1 + q2 / resid_scale; out-of-range concrete
        codes raise (`validate_codes`)."""
        self.validate_codes(codes)
        codes = jnp.asarray(codes)
        return (self.stage1.decode(codes[..., 0])
                + self.stage2.decode(codes[..., 1]) / self.resid_scale)


def e8p12_rvq4b() -> RVQ:
    return RVQ(name="E8P12RVQ4B", dim=8, bits_per_weight=4.0, opt_scale=1.03,
               default_scale=1.03, code_shape=(2,), code_dtype=np.uint16,
               stage1=E8P12(), stage2=E8P12(), resid_scale=3.45)


def e8p12_rvq3b() -> RVQ:
    return RVQ(name="E8P12RVQ3B", dim=8, bits_per_weight=3.0, opt_scale=0.98,
               default_scale=0.98, code_shape=(2,), code_dtype=np.uint16,
               stage1=E8P12(), stage2=E81B(), resid_scale=2.04)
