"""Hadamard matrices of order K * 2^p and their fast transform.

Convention (the official quip-sharp one): for n = K * 2^p the orthonormal transform is

    M_n = kron(H_K, S_{2^p}) / sqrt(n)

where H_K is a K x K matrix of +-1 with H_K H_K^T = K I and S_{2^p} the Sylvester matrix.
`hadamard_transform(x)` computes M_n x along an axis; `transpose=True` computes M_n^T x.
Only H_K is dense; the Sylvester factor is applied as a Kronecker product of small Sylvester
matrices (a few small matmuls beat a log2(n) butterfly on CPUs and GPUs alike).

Where the K x K matrix comes from:
  * Paley I (q prime, q = 3 mod 4, order q + 1) in the skew form I + [[0, -1^T], [1, Q]],
    and Paley II (q prime, q = 1 mod 4, order 2(q + 1)): built here. For K in
    {12, 20, 28, 36, 60, 108, 140} they equal the official tables entry for entry.
  * 52, 116, 124, 156, 172: the official (Sloane library, Williamson-type) tables shipped as
    data in `quipjax/data/hadamard_tables.txt`. 52 and 124 also have Paley II constructions,
    but the official code uses the tabled ones and its checkpoints depend on that choice.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "hadamard_matrix",
    "hadamard_transform",
    "hadamard_factor",
    "has_hadamard",
    "hadamard_k_matrix",
    "sylvester",
    "paley1",
    "paley2",
    "available_orders",
    "MAX_DENSE_K",
]

# Largest dense factor K the fast transform uses. Orders whose odd part needs a larger K fall
# back to the randomized FFT in `quipjax.rht` (dense application would cost n*K per vector).
MAX_DENSE_K = 256

_DATA_FILE = os.path.join(os.path.dirname(__file__), "data", "hadamard_tables.txt")
# Orders for which the official table is used instead of a construction.
_TABLED = (52, 116, 124, 156, 172)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    r = int(math.isqrt(q))
    return all(q % d for d in range(3, r + 1, 2))


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def sylvester(n: int) -> np.ndarray:
    """The (n, n) Sylvester Hadamard matrix of +-1 (int8), n a power of two."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester matrices exist for powers of two only, got {n}")
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(i - j) over GF(q), q prime; chi the quadratic character."""
    squares = np.zeros(q, bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1, -1).astype(np.int8)
    chi[0] = 0
    i = np.arange(q)
    return chi[(i[:, None] - i[None, :]) % q]


def paley1(q: int) -> np.ndarray:
    """Skew Paley I Hadamard matrix of order q + 1 (q prime, q = 3 mod 4), int8 +-1."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    n = q + 1
    s = np.zeros((n, n), np.int8)
    s[0, 1:] = -1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    return (np.eye(n, dtype=np.int8) + s).astype(np.int8)


def paley2(q: int) -> np.ndarray:
    """Symmetric Paley II Hadamard matrix of order 2(q + 1) (q prime, q = 1 mod 4), int8."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    n = q + 1
    c = np.zeros((n, n), np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], np.int8)
    b = np.array([[1, -1], [-1, -1]], np.int8)
    return (np.kron(a, c) + np.kron(b, np.eye(n, dtype=np.int8))).astype(np.int8)


@functools.lru_cache(maxsize=None)
def _tables() -> dict:
    out, cur, rows = {}, None, []
    with open(_DATA_FILE) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("K "):
                if cur is not None:
                    out[cur] = np.array(rows, np.int8)
                cur, rows = int(line[2:]), []
            else:
                rows.append([1 if ch == "+" else -1 for ch in line])
    if cur is not None:
        out[cur] = np.array(rows, np.int8)
    return out


def _odd_part(n: int) -> int:
    while n % 2 == 0 and n > 0:
        n //= 2
    return n


@functools.lru_cache(maxsize=None)
def _construct(k: int) -> Optional[np.ndarray]:
    """A K x K Hadamard matrix with 4 | K (or K in {1, 2}) if quipjax can build one, else None."""
    if k == 1:
        return np.ones((1, 1), np.int8)
    if _is_pow2(k):
        return sylvester(k)
    if k in _TABLED:
        return _tables()[k]
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return paley1(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return paley2(k // 2 - 1)
    return None


@functools.lru_cache(maxsize=None)
def hadamard_factor(n: int) -> Optional[int]:
    """The dense factor K (n = K * 2^p, K <= MAX_DENSE_K) used for order n, or None.

    K = 1 for powers of two; otherwise the smallest order with n's odd part that quipjax can
    build. For every n the official code supports this is the official K.
    """
    if n <= 0:
        return None
    if _is_pow2(n):
        return 1
    odd = _odd_part(n)
    k = odd
    while k <= min(n, MAX_DENSE_K):
        if n % k == 0 and _construct(k) is not None:
            return k
        k *= 2
    return None


def has_hadamard(n: int) -> bool:
    """True when `hadamard_matrix(n)` / `hadamard_transform` support order n."""
    return hadamard_factor(n) is not None


def available_orders(limit: int = MAX_DENSE_K) -> list:
    """The non-power-of-two dense factors K <= limit that quipjax can build or has tabled."""
    return [k for k in range(3, limit + 1) if not _is_pow2(k) and hadamard_factor(k) == k]


def hadamard_k_matrix(k: int) -> np.ndarray:
    """The K x K +-1 matrix (int8) quipjax uses as the dense factor for order K."""
    h = _construct(k)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {k} is known to quipjax")
    return h


def _require_factor(n: int) -> int:
    k = hadamard_factor(n)
    if k is None:
        raise ValueError(
            f"no Hadamard transform of order {n} (= {_odd_part(n)} * 2^{int(math.log2(n // _odd_part(n)))}) "
            f"is known to quipjax: the odd part needs a dense factor of order at most {MAX_DENSE_K}. "
            "Use quipjax.rht.rotation(n, kind='rfft') (the randomized-FFT fallback, any even n), "
            "which quipjax.rht picks automatically for such dimensions.")
    return k


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """The (n, n) orthonormal Hadamard matrix M_n = kron(H_K, S_{n/K}) / sqrt(n).

    Entries are +-1/sqrt(n). Dense: use `hadamard_transform` to apply it.
    """
    k = _require_factor(n)
    m = np.kron(hadamard_k_matrix(k).astype(np.float64), sylvester(n // k).astype(np.float64))
    return jnp.asarray(m / math.sqrt(n), dtype=dtype)


def _pow2_chunks(p: int, max_bits: int = 6) -> list:
    """Split 2^p into near-equal power-of-two factors of at most 2^max_bits each."""
    if p == 0:
        return []
    parts = -(-p // max_bits)
    base, extra = divmod(p, parts)
    return [1 << (base + (1 if i < extra else 0)) for i in range(parts)]


def hadamard_transform(x: jax.Array, axis: int = -1, transpose: bool = False) -> jax.Array:
    """Apply M_n (or M_n^T with `transpose=True`) along `axis` of x, n = x.shape[axis].

    Args:
      x: array of any shape, float dtype; n = x.shape[axis] must be K * 2^p with a known K
         (see `has_hadamard`).
      axis: the axis to transform.
      transpose: apply M_n^T instead of M_n (the inverse, since M_n is orthogonal).
    Returns:
      An array of x's shape and dtype. Cost O(n (K + sum of chunk sizes)) per vector, computed
      in float32 (or x's dtype if wider) with full-precision matmuls; jit/vmap friendly.
    """
    x = jnp.asarray(x)
    axis = axis % x.ndim
    n = x.shape[axis]
    k = _require_factor(n)
    work = jnp.promote_types(x.dtype, jnp.float32)
    dims = ([k] if k > 1 else []) + _pow2_chunks(int(math.log2(n // k)))
    pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    # view the axis as its Kronecker factors, keep the layout, contract one factor at a time
    # (no transposes of x: each step is a batched matmul with a small matrix)
    y = x.astype(work).reshape((pre,) + tuple(dims) + (post,))
    idx = "abcdefgh"[:len(dims)]
    for i, d in enumerate(dims):
        if k > 1 and i == 0:
            mat = hadamard_k_matrix(k).T if transpose else hadamard_k_matrix(k)
        else:
            mat = sylvester(d)  # symmetric
        src = "P" + idx + "Q"
        y = jnp.einsum(f"Z{idx[i]},{src}->{src.replace(idx[i], 'Z')}", jnp.asarray(mat, work), y,
                       precision=jax.lax.Precision.HIGHEST)
    return (y * jnp.asarray(1.0 / math.sqrt(n), work)).reshape(x.shape).astype(x.dtype)
