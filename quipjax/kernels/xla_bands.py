"""The row-band loop the XLA (CPU) decode-matmuls share: decode a band of rows, multiply, write
it into the output; a `fori_loop` keeps one band's decoded weights alive at a time."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["map_row_bands"]


def map_row_bands(band_out, codes: jax.Array, m: int, rows: int, unit: int, batch: int
                  ) -> jax.Array:
    """Stack band_out over bands of `rows` output rows -> (m, batch) float32.

    codes: leading axis in units of `unit` output rows (1: a code row per weight row; 16: a
    trellis tile row); rows: a multiple of unit; band_out(c) maps a slice of codes covering r
    rows to their (r, batch) float32 outputs. Full bands run in a fori_loop, a last partial
    band after it.
    """
    nb = m // rows
    k = rows // unit
    parts = []
    if nb > 1:
        def body(i, acc):
            c = jax.lax.dynamic_slice_in_dim(codes, i * k, k, 0)
            return jax.lax.dynamic_update_slice_in_dim(acc, band_out(c), i * rows, 0)
        parts.append(jax.lax.fori_loop(0, nb, body, jnp.zeros((nb * rows, batch), jnp.float32)))
    elif nb == 1:
        parts.append(band_out(codes[:k]))
    if nb * rows < m:
        parts.append(band_out(codes[nb * k:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, 0)
