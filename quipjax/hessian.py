"""Streaming accumulation of layer-input Hessians H = E[x x^T] (the second moment).

    state = init(n)
    for x in activations:            # x (..., n), any float dtype
        state = update(state, x)     # jit/vmap/shard_map friendly
    stats = finalize(state)          # HessianStats(H, mean, count)
    Hreg = regularize(stats.H, sigma_reg=1e-2)

Accuracy: JAX computes in float32 by default (x64 is off, TPUs have no float64), so the sums
are kept as unevaluated float32 pairs (hi + lo, "double-float") and every addition is an
error-free TwoSum. The products of a batch are summed by the matmul in chunks of at most
`chunk` rows, so float32 rounding never accumulates over more than one chunk. Against a float64
NumPy reference on 10^6 tokens with a large mean the relative error is ~1e-7 (see tests),
without float64 anywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["HessianState", "HessianStats", "init", "update", "merge", "finalize",
           "regularize"]


class HessianState(NamedTuple):
    """Running sums as float32 (hi, lo) pairs: the value is hi + lo."""

    xtx_hi: jax.Array   # (n, n) sum of x x^T
    xtx_lo: jax.Array
    sum_hi: jax.Array   # (n,) sum of x
    sum_lo: jax.Array
    count_hi: jax.Array  # () number of rows
    count_lo: jax.Array


class HessianStats(NamedTuple):
    H: jax.Array      # (n, n) float32, E[x x^T]
    mean: jax.Array   # (n,) float32, E[x]
    count: jax.Array  # () float32, number of rows accumulated


def _two_sum(a_hi, a_lo, b):
    """(a_hi + a_lo) + b as a renormalized pair (Knuth TwoSum, then fast renormalization)."""
    s = a_hi + b
    bb = s - a_hi
    err = (a_hi - (s - bb)) + (b - bb)
    lo = a_lo + err
    hi = s + lo
    return hi, lo - (hi - s)


def init(n: int, dtype=jnp.float32) -> HessianState:
    """Empty accumulator for inputs of dimension n."""
    z2, z1, z0 = jnp.zeros((n, n), dtype), jnp.zeros((n,), dtype), jnp.zeros((), dtype)
    return HessianState(z2, z2, z1, z1, z0, z0)


def update(state: HessianState, x: jax.Array, mask: jax.Array | None = None,
           chunk: int = 1024) -> HessianState:
    """Add rows of x to the sums.

    Args:
      state: a `HessianState` for dimension n.
      x: (..., n) activations (bf16/f16/f32); leading dims are flattened into rows. 16-bit
        inputs are multiplied in 16 bits (exact products) with float32 accumulation.
      mask: optional (...) weights (1 keeps a row, 0 drops it: padding tokens).
      chunk: rows per matmul; float32 rounding accumulates over at most this many rows.
    Returns:
      The new `HessianState`.
    """
    n = state.sum_hi.shape[0]
    if x.shape[-1] != n:
        raise ValueError(f"Hessian accumulator of dimension {n} got inputs of dimension {x.shape[-1]}")
    dt = state.xtx_hi.dtype
    # 16-bit inputs stay 16-bit: their products are exact in float32 (8 or 11 mantissa bits
    # each), and the matmul accumulates in float32 at 16-bit speed
    in_dt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else dt
    rows = x.reshape(-1, n).astype(in_dt)
    if mask is None:
        w = jnp.ones((rows.shape[0],), dt)
    else:
        w = jnp.asarray(mask, dt).reshape(-1)
        rows = rows * w[:, None].astype(in_dt)
    r = rows.shape[0]
    nchunks = max(1, -(-r // chunk))
    pad = nchunks * chunk - r if nchunks > 1 else 0
    size = chunk if nchunks > 1 else r
    rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(nchunks, size, n)
    w = jnp.pad(w, (0, pad)).reshape(nchunks, size)

    def body(st, xs):
        xc, wc = xs
        xtx = jnp.dot(xc.T, xc, precision=jax.lax.Precision.HIGHEST, preferred_element_type=dt)
        a = _two_sum(st.xtx_hi, st.xtx_lo, xtx)
        b = _two_sum(st.sum_hi, st.sum_lo, jnp.sum(xc.astype(dt), 0))
        c = _two_sum(st.count_hi, st.count_lo, jnp.sum(wc))
        return HessianState(*a, *b, *c), None

    state, _ = jax.lax.scan(body, state, (rows, w))
    return state


def merge(a: HessianState, b: HessianState) -> HessianState:
    """Combine two accumulators (e.g. from data-parallel shards)."""
    out = []
    for hi_a, lo_a, hi_b, lo_b in ((a.xtx_hi, a.xtx_lo, b.xtx_hi, b.xtx_lo),
                                   (a.sum_hi, a.sum_lo, b.sum_hi, b.sum_lo),
                                   (a.count_hi, a.count_lo, b.count_hi, b.count_lo)):
        hi, lo = _two_sum(hi_a, lo_a, hi_b)
        hi, lo = _two_sum(hi, lo, lo_b)
        out += [hi, lo]
    return HessianState(*out)


def finalize(state: HessianState) -> HessianStats:
    """E[x x^T], E[x] and the row count (float32). Symmetric by construction."""
    count = state.count_hi + state.count_lo
    inv = 1.0 / count
    # divide hi and lo separately, then add: the pair's precision survives the division
    H = state.xtx_hi * inv + state.xtx_lo * inv
    H = 0.5 * (H + H.T)
    mean = state.sum_hi * inv + state.sum_lo * inv
    return HessianStats(H, mean, count)


def regularize(H: jax.Array, sigma_reg: float = 1e-2) -> jax.Array:
    """H / mean(diag(H)) + sigma_reg * I (the official normalization), float32 (n, n)."""
    return regularize_any(jnp.asarray(H, jnp.float32), sigma_reg)


def regularize_any(H: jax.Array, sigma_reg: float = 1e-2) -> jax.Array:
    """`regularize` in H's own float dtype (float64 under x64)."""
    H = H / jnp.mean(jnp.diagonal(H))
    return H + sigma_reg * jnp.eye(H.shape[0], dtype=H.dtype)
