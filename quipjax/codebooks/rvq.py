"""Residual vector quantization: the 3- and 4-bit QuIP# codebooks.

    xhat = Q1(x) + Q2((x - Q1(x)) * s2) / s2

E8P12RVQ4B: Q1 = Q2 = E8P12, s2 = 3.45 (opt_scale 1.03).
E8P12RVQ3B: Q1 = E8P12, Q2 = E81B (1 bit per weight: the 256-entry E8 table below), s2 = 2.04
  (opt_scale 0.98).
Codes are uint16 of shape (..., 2): [..., 0] the E8P12 code of stage 1 (official layout),
[..., 1] the stage-2 code (an E8P12 code, or an E81B index in 0..255).

The search is greedy, as in the official code (`search` = "greedy"): each stage is an exact
nearest-point search (stage 1 of x, stage 2 of the scaled residual), but a stage-1 point other
than the nearest can leave a residual that stage 2 fits better, so the pair is not always the
nearest of the 2^32 (4-bit) or 2^24 (3-bit) codewords. On 2000 unit Gaussian vectors scaled
by opt_scale, E8P12RVQ4B misses the nearest codeword for 43.7% of them (+8.7% squared error)
and E8P12RVQ3B for 0.7% (+0.6%), against an exhaustive search over the 128 nearest stage-1
points, certified exact for all 2000 4-bit vectors and 1999 of the 3-bit ones
(tests/test_codebooks.py, `test_search_attribute_is_honest`).

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
from quipjax.codebooks.e8p import E8P12, materialize


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


@dataclasses.dataclass(frozen=True)
class RVQ(Codebook):
    """Two-stage residual VQ: xhat = Q1(x) + Q2((x - Q1(x)) * resid_scale) / resid_scale.

    Greedy search (`search` = "greedy"): Q1 is stage 1's search of x, Q2 stage 2's search of
    the scaled residual; the pair is not necessarily the nearest codeword q1 + q2 / resid_scale.
    """

    search: str = "greedy"
    stage1: Codebook = None
    stage2: Codebook = None
    resid_scale: float = 1.0

    def quantize_t(self, xt) -> Tuple[jax.Array, jax.Array]:
        c1, x1 = self.stage1.quantize_t(xt)
        c2, x2 = self.stage2.quantize_t((xt - x1) * self.resid_scale)
        return jnp.stack([c1, c2], -1), x1 + x2 / self.resid_scale

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
