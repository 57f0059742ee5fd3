"""Plain-JAX (XLA) decode-matmul for the trellis codebooks: y = x @ Q^T from packed bitstreams.

Layout (`prepare`): the codes as the codebook stores them, (m / 16, n / 16, 16 K) uint16, one
tail-biting bitstream of K bits per weight for each 16 x 16 tile (`codebooks.trellis`); nothing
is expanded, so the model keeps K bits per weight in memory.

The matmul (`matmul`, every batch size): a loop over bands of R rows (R a multiple of 16:
the largest power of two times 16 whose float32 band fits 12 MiB, as `xla_decode`'s tiles).
Each band is unpacked (each state is a shift and a mask of the two 16-bit words holding its
L <= 17 bits), decoded by the code's arithmetic (1MAD, 3INST) or its 2^Q-row table (HYB),
laid out as rows and multiplied by x^T with one float32 dot. The decoded weights are those
of the codebook's `decode_matrix`, so only the float32 summation order differs from
`kernels.reference_decode_matmul`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from quipjax import codebooks
from quipjax.kernels import TRELLIS_CODEBOOKS
from quipjax.kernels.xla_bands import map_row_bands

__all__ = ["prepare", "matmul", "band_rows", "CODEBOOKS"]

CODEBOOKS = TRELLIS_CODEBOOKS       # the registry's trellis codebooks
_BAND_BYTES = 12 << 20


def band_rows(m: int, n: int) -> int:
    """Rows per band: 16 times the largest power of two whose float32 band of n columns
    fits 12 MiB (at least 16, at most m)."""
    t = max(1, _BAND_BYTES // (4 * n * 16))
    return min(16 << (t.bit_length() - 1), m)


def prepare(codes: jax.Array, codebook_name: str) -> dict:
    """The packed codes (m / 16, n / 16, 16 K) uint16, as they are."""
    if codebook_name not in CODEBOOKS:
        raise ValueError(f"xla_trellis: {codebook_name!r} is not a trellis codebook")
    return {"codes": jnp.asarray(codes, jnp.uint16)}


def matmul(x: jax.Array, arrays: dict, codebook_name: str, shape) -> jax.Array:
    """x (..., n) float -> x @ Q^T (..., m) float32, Q the decoded codes of `prepare`."""
    m, n = shape
    cb = codebooks.get(codebook_name)
    lead = x.shape[:-1]
    xt = jnp.asarray(x).reshape(-1, n).astype(jnp.float32).T            # (n, B)
    codes, table = arrays["codes"], arrays.get("table")     # table: a tuned HYB table or None
    R = band_rows(m, n)

    def band(c):                                    # (r / 16, n / 16, 16 K) -> (r, B)
        r = c.shape[0] * 16
        return jnp.dot(cb.decode_matrix(c, r, n, table), xt, precision=jax.lax.Precision.HIGHEST)

    y = map_row_bands(band, codes, m, R, 16, xt.shape[1])
    return y.T.reshape(lead + (m,))
