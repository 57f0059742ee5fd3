"""Scalar half-integer grids HI2/HI3/HI4: the paper's "no E8" ablation.

HIb rounds each weight to the nearest of the 2^b points {-2^(b-1) + 1/2, ..., 2^(b-1) - 1/2}
(HI2: {-3/2, -1/2, 1/2, 3/2}). dim = 1; codes uint8 in 0..2^b - 1 (value = code - 2^(b-1) + 1/2).
opt_scale is the input RMS that minimizes the MSE on unit Gaussian data (computed by
`optimal_scale` and checked by the tests); it is also the default scale.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from quipjax.codebooks.base import Codebook


@dataclasses.dataclass(frozen=True)
class HalfIntegerGrid(Codebook):
    """The 2^bits half-integer points. Exact search: code = clip(floor(x) + 2^(bits-1)), the
    nearest grid point."""

    search: str = "exact"
    bits: int = 2

    def quantize_t(self, xt):
        half = 2 ** (self.bits - 1)
        code = jnp.clip(jnp.floor(xt[0]) + half, 0, 2 * half - 1)
        return code.astype(jnp.uint8), (code - half + 0.5).astype(xt.dtype)[None]

    def decode(self, codes):
        """codes (...,) integers in 0..2^bits - 1 -> (..., 1) float32; out-of-range concrete
        codes raise (`validate_codes`)."""
        self.validate_codes(codes)
        half = 2 ** (self.bits - 1)
        return (jnp.asarray(codes).astype(jnp.float32) - half + 0.5)[..., None]


def optimal_scale(bits: int) -> float:
    """Input RMS minimizing E|Q(s g)/s - g|^2 for g ~ N(0, 1) on the HIb grid (numerical)."""
    from math import erf, exp, pi, sqrt

    def mse(s):
        # exact Gaussian MSE of the grid scaled by 1/s, by integrating over the cells
        half = 2 ** (bits - 1)
        pts = (np.arange(2 * half) - half + 0.5) / s
        edges = np.concatenate([[-np.inf], (pts[1:] + pts[:-1]) / 2, [np.inf]])
        tot = 0.0
        for p, lo, hi in zip(pts, edges[:-1], edges[1:]):
            def part(t):  # integral of (g - p)^2 phi(g) dg from -inf to t
                if np.isinf(t):
                    return (1 + p * p) * (1.0 if t > 0 else 0.0)
                cdf = 0.5 * (1 + erf(t / sqrt(2)))
                pdf = exp(-t * t / 2) / sqrt(2 * pi)
                return (1 + p * p) * cdf - t * pdf + 2 * p * pdf
            tot += part(hi) - part(lo)
        return tot

    lo, hi = 0.3, 6.0
    for _ in range(200):  # golden-section search; mse is unimodal in s here
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if mse(a) < mse(b):
            hi = b
        else:
            lo = a
    return round((lo + hi) / 2, 4)


def _grid(bits: int, scale: float) -> HalfIntegerGrid:
    return HalfIntegerGrid(name=f"HI{bits}", dim=1, bits_per_weight=float(bits),
                           opt_scale=scale, default_scale=scale, code_shape=(),
                           code_dtype=np.uint8, bits=bits)


# Values of optimal_scale(2), (3), (4), stored so that importing does no numerics.
def hi2() -> HalfIntegerGrid:
    return _grid(2, 1.0043)


def hi3() -> HalfIntegerGrid:
    return _grid(3, 1.7064)


def hi4() -> HalfIntegerGrid:
    return _grid(4, 2.9833)
