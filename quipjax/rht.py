"""Randomized orthogonal transforms for incoherence processing (the RHT of QuIP#).

Conventions (official quip-sharp): W is (m, n) = (out, in); SU is a random +-1 vector of
length n (input side), SV of length m (output side); with M_k the orthogonal transform of
order k,

    Wr = M_m^T diag(SV) W diag(SU) M_n,      Hr = M_n^T diag(SU) H diag(SU) M_n.

Two kinds of M_k, chosen per dimension by `rotation(k)`:
  * "hadamard": M_k = kron(H_K, S_{2^p}) / sqrt(k) (`quipjax.hadamard`), for k = K * 2^p with a
    known K <= 256. Entries +-1/sqrt(k).
  * "rfft": for every even k with no such K (10920 = 2^3*3*5*7*13, 1000, 3000, ...): view x as
    k/2 complex numbers z = x[:k/2] + i x[k/2:], take the unitary DFT, and return
    [Re, Im]. A unitary map of C^(k/2) is an orthogonal map of R^k, so together with the
    random signs this is the paper's "random FFT" incoherence transform (it reports 8.30 vs
    8.22 wikitext2 perplexity for Llama-2-7B at 2 bits: almost as good as the RHT). Its
    entries are bounded by sqrt(2/k) (vs 1/sqrt(k) for Hadamard), so the Hoeffding
    incoherence bound loses only a factor sqrt(2); it costs O(k log k) for every k.
  * "identity": no rotation (the "no incoherence processing" ablation).
The kind of each side is stored in the quantized layer's metadata.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from quipjax import hadamard

__all__ = [
    "Rotation",
    "rotation",
    "sign_vectors",
    "incoherence_transform",
    "incoherence_inverse",
    "transform_hessian",
    "KINDS",
]

KINDS = ("hadamard", "rfft", "identity")


@dataclasses.dataclass(frozen=True)
class Rotation:
    """An orthogonal transform M of order n (static, hashable: usable as a jit static arg)."""

    kind: str
    n: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "hadamard" and not hadamard.has_hadamard(self.n):
            raise ValueError(f"no Hadamard transform of order {self.n}; use kind='rfft'")
        if self.kind == "rfft" and (self.n % 2 or self.n <= 0):
            raise ValueError(
                f"the randomized-FFT transform needs an even dimension, got {self.n}; "
                "pad the layer to an even size")

    def apply(self, x: jax.Array, axis: int = -1, transpose: bool = False) -> jax.Array:
        """M x (or M^T x) along `axis`; x float, x.shape[axis] == n. Returns x's shape/dtype."""
        if x.shape[axis] != self.n:
            raise ValueError(f"rotation of order {self.n} applied to an axis of size {x.shape[axis]}")
        if self.kind == "hadamard":
            return hadamard.hadamard_transform(x, axis=axis, transpose=transpose)
        if self.kind == "identity":
            return x
        return _rfft_apply(x, axis, transpose)

    def matrix(self) -> jax.Array:
        """The dense (n, n) float32 matrix M (for tests and small layers)."""
        return self.apply(jnp.eye(self.n, dtype=jnp.float32), axis=0)


def _row_major(z):
    """z with a row-major layout. XLA:CPU's FFT needs row-major operands, but inside a larger
    jit layout assignment can propagate a consumer's column-major layout (the Cholesky of
    `quipjax.ldlq.block_ldl`) back into the FFT (a RET_CHECK failure in fft_thunk.cc)."""
    if not isinstance(z, jax.core.Tracer):
        return z                                      # op by op: nothing to propagate
    return with_layout_constraint(z, Layout(tuple(range(z.ndim))))


def _rfft_apply(x, axis, transpose):
    dtype = x.dtype
    work = jnp.promote_types(dtype, jnp.float32)
    xm = jnp.moveaxis(x.astype(work), axis, -1)
    h = xm.shape[-1] // 2
    z = _row_major(jax.lax.complex(xm[..., :h], xm[..., h:]))
    # The forward map is the unitary DFT; its transpose (= inverse, as a real orthogonal map)
    # is the unitary inverse DFT.
    z = jnp.fft.ifft(z, norm="ortho") if transpose else jnp.fft.fft(z, norm="ortho")
    z = _row_major(z)
    y = jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1)
    return jnp.moveaxis(y, -1, axis).astype(dtype)


def rotation(n: int, kind: str = "auto") -> Rotation:
    """The rotation quipjax uses for dimension n: Hadamard when one is known, else the FFT.

    kind: "auto" (default), or "hadamard", "rfft", "identity" to force one.
    """
    if kind == "auto":
        kind = "hadamard" if hadamard.has_hadamard(n) else "rfft"
    return Rotation(kind, int(n))


def sign_vectors(key: jax.Array, m: int, n: int) -> tuple:
    """(SU, SV): random +-1 float32 vectors of lengths n (input side) and m (output side)."""
    ku, kv = jax.random.split(key)
    su = jax.random.rademacher(ku, (n,), dtype=jnp.float32)
    sv = jax.random.rademacher(kv, (m,), dtype=jnp.float32)
    return su, sv


def transform_hessian(H: jax.Array, SU: jax.Array, rot_n: Rotation) -> jax.Array:
    """Hr = M_n^T diag(SU) H diag(SU) M_n for H (n, n) float32."""
    h = H * SU[:, None] * SU[None, :]
    h = rot_n.apply(h, axis=0, transpose=True)
    return rot_n.apply(h, axis=1, transpose=True)


def incoherence_transform(W: jax.Array, H: jax.Array, key: jax.Array, *,
                          rotations: tuple | None = None) -> tuple:
    """Randomized incoherence processing of a weight and its Hessian.

    Args:
      W: (m, n) weight (out, in), float.
      H: (n, n) symmetric Hessian of the layer input, float.
      key: a jax.random key; SU and SV are drawn from it (same key, same signs).
      rotations: optional (rot_m, rot_n) `Rotation`s; default `rotation(m), rotation(n)`.
    Returns:
      (Wr, Hr, SU, SV): Wr (m, n) and Hr (n, n) float32, SU (n,) and SV (m,) float32 +-1.
    """
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    m, n = W.shape
    rot_m, rot_n = rotations if rotations is not None else (rotation(m), rotation(n))
    SU, SV = sign_vectors(key, m, n)
    w = W * SV[:, None] * SU[None, :]
    w = rot_m.apply(w, axis=0, transpose=True)   # M_m^T (.)
    w = rot_n.apply(w, axis=1, transpose=True)   # (.) M_n  (rows r -> M_n^T r)
    return w, transform_hessian(H, SU, rot_n), SU, SV


def incoherence_inverse(Wr: jax.Array, SU: jax.Array, SV: jax.Array, *,
                        rotations: tuple | None = None) -> jax.Array:
    """W = diag(SV) M_m Wr M_n^T diag(SU): undo `incoherence_transform` on a weight.

    Wr (m, n), SU (n,), SV (m,) (SV may carry a folded scale). Returns (m, n) float32.
    """
    Wr = jnp.asarray(Wr, jnp.float32)
    m, n = Wr.shape
    rot_m, rot_n = rotations if rotations is not None else (rotation(m), rotation(n))
    w = rot_n.apply(Wr, axis=1)   # (.) M_n^T
    w = rot_m.apply(w, axis=0)    # M_m (.)
    return w * SV[:, None] * SU[None, :]
