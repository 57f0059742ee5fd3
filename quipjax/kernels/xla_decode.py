"""Plain-JAX (XLA:CPU) decode-matmul for the E8P codebooks: y = x @ Q^T from nibble-packed codes.

Layout (`prepare`, once at model load): every E8P coordinate is k/4 with k odd in [-15, 15],
so it is one 4-bit nibble u = (k + 15) / 2 (value 0.5 u - 3.75); an E81B coordinate (the 3-bit
RVQ's second stage) is v in {0, +-1/2, +-1, +-2}, nibble u = 2 v + 8 (value 0.5 u - 4). Two
nibbles share a byte, high nibble first:

| codebook    | array `nib`        | byte [r, j]                                     | bits/weight |
|-------------|--------------------|-------------------------------------------------|-------------|
| E8P12       | (m, n / 2) uint8   | 16 u(Q[r, j]) + u(Q[r, j + n/2])                | 4           |
| E8P12RVQ4B  | (m, n) uint8       | 16 u(stage 1 [r, j]) + u(stage 2 [r, j])        | 8           |
| E8P12RVQ3B  | (m, n) uint8       | 16 u(stage 1 [r, j]) + u(E81B stage 2 [r, j])   | 8           |

(against 16 for dense bf16 and 2 / 4 / 3 for the plain codes). Why nibbles and no lookup
tables: gathers are slow on XLA:CPU (a 65536 x 8 table decode costs ~20-40x a dense matvec),
while a nibble decodes with arithmetic XLA vectorizes: f = float(byte), hi = floor(f / 16),
lo = f - 16 hi (exact on these small integers). `prepare` itself is one uint32 gather per code
from a table of packed nibbles (256 KiB), so `decode_matmul` (which prepares inside every
call) is also several times faster than the reference.

The matmul (`matmul`, every batch size): a `fori_loop` over tiles of T rows (`_tile_rows`:
the largest power of two with T * n * 4 bytes <= 12 MiB, e.g. 512 rows at n = 4096, 256 at
n = 11008; the last partial tile runs after the loop). Each tile is decoded by a vectorized XLA
loop fusion into float32 (L3-resident) and multiplied by x^T with one float32 dot (XLA's GEMV
at batch 1, YNNPACK's GEMM above): y_tile = W_tile @ x^T. E8P12 keeps its two nibble planes as
two (T, n/2) tiles and two dots against the two halves of x (a concatenate into one (T, n) tile
is a slow scalar copy). The decoded weights are exactly those of the codebooks' `decode` under
jit (E8P: (2 u - 15) / 4 exactly, applied as 2 u - 15 against x / 4; RVQ: q1 + q2 / s in
float32, the same operations), so only the float32 summation order differs.

Measured alternatives (2-core EPYC, shared, XLA:CPU of jaxlib 0.10.2; ratios to a dense f32
matmul in the same process, 4096 x 4096 unless said):
  * a fused reduction y[r] = sum_j decode(nib)[r, j] x[j] (XLA hands the reduce and its
    elementwise producers to YNNPACK: the decoded weights are never stored): 1.6-2.3x at
    batch 1 for E8P12 against ~1.0-1.5x for the loop; 5-11x for RVQ (more ops per weight);
    ~100 ms at batch 16 (the decode is redone per row of x);
  * dots take no producers into their fusion on this backend, so decoding the whole matrix
    first materializes it (64 MiB of float32, page faults: ~30 ms);
  * tiles of 16-64 rows: 1.2-2x slower at batch 1 (~10-20 us of loop overhead per step);
    tiles over ~16 MiB fall off the L3 (n = 11008: 512 rows +50%, 1024 rows 3.5x);
  * bf16 decoded tiles and bf16 dots: no faster at batch 16 even for bf16 x (and a float32 x
    would need a 3-way bf16 split, 1.3-1.5x slower); bf16 matvecs are slow on XLA:CPU;
  * a transposed layout (n/2, m) with x @ W^T dots or a loop over K chunks: no faster;
  * uint32 words of 8 nibbles decoded by shifts (the same 4 bits/weight): 1.5-2x slower at
    batch 16 than bytes + floor; and a tile taken by a dynamic slice along a minor axis makes
    XLA emit a scalar decode loop (hence row tiles: contiguous slices along axis 0);
  * RVQ weights as one affine form of (byte, hi) (5 ops instead of 8): ~10% faster at batch 1
    but rounds differently from the reference decode, so not used.

Inputs of any float dtype are converted to float32 first (exact for bfloat16 / float16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.codebooks import e8p as _e8p
from quipjax.codebooks import rvq as _rvq
from quipjax.kernels import stage_table
from quipjax.kernels.xla_bands import map_row_bands


__all__ = ["prepare", "matmul", "bits_per_weight"]

# {codebook: (stage-2 kind, residual scale)}; stage 1 is always E8P
_STAGES = stage_table()
# value = _A * nibble + _B
_AFFINE = {"e8p": (0.5, -3.75), "e81b": (0.5, -4.0)}

# Largest decoded float32 tile (rows * n * 4 bytes); rows are the largest power of two under it.
# Measured on the 2-core EPYC (L2 2 MiB / core, L3 32 MiB): the loop costs ~10-20 us per
# iteration, so big tiles win (T = 16 -> 512 rows at n = 4096: -30% at batch 1), until the tile
# outgrows the L3 (n = 11008: 256 rows = 11 MiB fine, 512 rows = 22 MiB +50%, 45 MiB 4x).
_TILE_BYTES = 12 << 20


def bits_per_weight(codebook_name: str) -> int:
    """Memory of the prepared layout per weight."""
    return 4 if _STAGES[codebook_name][0] is None else 8


@functools.lru_cache(maxsize=None)
def _packed_table(kind: str) -> np.ndarray:
    """Code -> its 8 nibbles packed in a uint32 (coordinate i in bits 4i..4i+3), (65536,) for
    E8P (256 KiB, from the official codeword table) or (256,) for E81B."""
    vals = (_e8p.codeword_table() if kind == "e8p" else _rvq.e81b_table()).astype(np.float64)
    a, b = _AFFINE[kind]
    u = np.round((vals - b) / a).astype(np.int64)
    assert u.min() >= 0 and u.max() <= 15 and np.array_equal(u * a + b, vals)
    word = np.zeros(u.shape[0], np.int64)
    for i in range(8):
        word |= u[:, i] << (4 * i)
    return word.astype(np.uint32)


def _nibbles(codes, kind):
    """Codes (m, n/8) -> nibbles (m, n) uint8: one uint32 gather per code (not 8 floats)."""
    m, kc = codes.shape
    words = jnp.asarray(_packed_table(kind))[codes.astype(jnp.int32)]            # (m, kc)
    shifts = jnp.arange(0, 32, 4, dtype=jnp.uint32)
    return ((words[:, :, None] >> shifts) & 15).astype(jnp.uint8).reshape(m, 8 * kc)


def prepare(codes: jax.Array, codebook_name: str) -> dict:
    """Plain codes (m, n/8) / (m, n/8, 2) uint16 -> {"nib": uint8 array} (module table).

    Plain jnp (jit / vmap friendly): `decode_matmul` prepares inside every call.
    """
    kind, _ = _STAGES[codebook_name]
    codes = jnp.asarray(codes)
    if kind is None:
        u = _nibbles(codes, "e8p")                                                 # (m, n)
        h = u.shape[1] // 2
        return {"nib": (u[:, :h] << 4) | u[:, h:]}
    return {"nib": (_nibbles(codes[..., 0], "e8p") << 4) | _nibbles(codes[..., 1], kind)}


def _split(p):
    """uint8 bytes -> (hi, lo) nibbles as exact float32."""
    f = p.astype(jnp.float32)
    hi = jnp.floor(f * 0.0625)
    return hi, f - 16.0 * hi


def _rvq_weights(p, kind, scale):
    """RVQ bytes -> q1 + q2 / s, float32, rounded exactly as the reference decode."""
    hi, lo = _split(p)
    a, b = _AFFINE[kind]
    return (hi * 0.5 - 3.75) + (lo * a + b) / jnp.float32(scale)


def _tile_rows(m: int, n: int) -> int:
    """Rows per tile: the largest power of two whose float32 decode fits `_TILE_BYTES` (>= 8)."""
    t = max(8, _TILE_BYTES // (4 * n))
    return min(1 << (t.bit_length() - 1), m)


def _tiled(x, p, codebook_name):
    """x (B, n) float32 -> (B, m): loop over row tiles, decode to a cached tile, f32 dot."""
    kind, scale = _STAGES[codebook_name]
    m = p.shape[0]
    n = x.shape[1]
    bsz = x.shape[0]
    if kind is None:
        h = n // 2
        xa, xb = (0.25 * x[:, :h]).T, (0.25 * x[:, h:]).T          # (h, B)

        def tile_out(t):
            hi, lo = _split(t)
            return (jnp.dot(2.0 * hi - 15.0, xa, precision=jax.lax.Precision.HIGHEST)
                    + jnp.dot(2.0 * lo - 15.0, xb, precision=jax.lax.Precision.HIGHEST))
    else:
        xt = x.T                                                     # (n, B)

        def tile_out(t):
            return jnp.dot(_rvq_weights(t, kind, scale), xt, precision=jax.lax.Precision.HIGHEST)

    y = map_row_bands(tile_out, p, m, _tile_rows(m, n), 1, bsz)
    return y.T


def matmul(x: jax.Array, arrays: dict, codebook_name: str, shape) -> jax.Array:
    """x (..., n) float -> x @ Q^T (..., m) float32, Q the decoded codes of `prepare`."""
    m, n = shape
    if codebook_name not in _STAGES:
        raise ValueError(f"xla_decode: no decoder for codebook {codebook_name!r}")
    lead = x.shape[:-1]
    x2 = jnp.asarray(x).reshape(-1, n).astype(jnp.float32)
    bsz = x2.shape[0]
    p = arrays["nib"]
    if bsz == 0:
        y = jnp.zeros((0, m), jnp.float32)
    else:
        y = _tiled(x2, p, codebook_name)
    return y.reshape(lead + (m,))
