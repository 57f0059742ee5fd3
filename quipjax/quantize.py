"""quantize_linear: one linear layer to QuIP# codes (RHT -> scale -> block LDL -> BlockLDLQ).

    ql = quantize_linear(W, H, codebook="E8P12", key=jax.random.key(0))
    y = ql.apply(x)          # x @ What^T, computed in the rotated basis
    What = ql.dequantize()   # (m, n) float32

W is (m, n) = (out, in) and H (n, n) the second moment of the layer inputs (un-regularized,
e.g. `quipjax.hessian.finalize(...).H`). What = diag(SV) M_m Q M_n^T diag(SU), with Q the
decoded codes (m, n), M the rotations of `quipjax.rht`, SU the input signs and SV the output
signs times the scale.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks as _codebooks
from quipjax import hessian as _hessian
from quipjax import ldlq as _ldlq
from quipjax import rht as _rht

__all__ = ["QuantizedLinear", "quantize_linear", "FORMAT_VERSION"]

# Version of the QuantizedLinear layout (codes, SU, SV, metadata); bump on any change that
# would make an old checkpoint decode differently.
FORMAT_VERSION = 1

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "SU", "SV"],
                   meta_fields=["codebook", "shape", "transforms", "format_version"])
@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """A quantized (m, n) weight. A pytree: arrays are leaves, metadata is static.

    Attributes:
      codes: (m, n // dim) + code_shape codebook codes (uint16 for the E8P codebooks).
      SU: (n,) float32 input-side signs.
      SV: (m,) float32 output-side signs times the scale (Wscale folded in).
      codebook: codebook name (see `quipjax.codebooks`).
      shape: (m, n).
      transforms: (kind for m, kind for n), each "hadamard", "rfft" or "identity".
      format_version: `FORMAT_VERSION` of the writer.
    """

    codes: jax.Array
    SU: jax.Array
    SV: jax.Array
    codebook: str
    shape: Tuple[int, int]
    transforms: Tuple[str, str]
    format_version: int = FORMAT_VERSION

    @property
    def rotations(self):
        m, n = self.shape
        return _rht.Rotation(self.transforms[0], m), _rht.Rotation(self.transforms[1], n)

    def decode_rotated(self) -> jax.Array:
        """The decoded codes Q (m, n) float32, in the rotated basis, without the scale."""
        m, n = self.shape
        return _codebooks.get(self.codebook).decode(self.codes).reshape(m, n)

    def dequantize(self) -> jax.Array:
        """What (m, n) float32 in the original basis."""
        rot_m, rot_n = self.rotations
        return _rht.incoherence_inverse(self.decode_rotated(), self.SU, self.SV,
                                        rotations=(rot_m, rot_n))

    def apply(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """x (..., n) -> x @ What^T (..., m), float32, without forming What.

        Rotates x (cost O(n log n) per row), multiplies by the codes in the rotated basis with
        a decode-matmul kernel (`quipjax.kernels`: Pallas on GPU, the XLA path elsewhere;
        `backend` picks one), rotates back.
        """
        from quipjax import kernels as _kernels   # kernels import codebooks; keep this module light
        rot_m, rot_n = self.rotations
        m, n = self.shape
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != n:
            raise ValueError(f"QuantizedLinear of shape {self.shape} applied to inputs with "
                             f"last dimension {x.shape[-1]}")
        t = rot_n.apply(x * self.SU, axis=-1, transpose=True)          # M_n^T diag(SU) x
        y = _kernels.decode_matmul(t, self.codes, self.codebook, backend=backend)
        return rot_m.apply(y, axis=-1) * self.SV                        # diag(SV) M_m (.)

    def bits(self) -> dict:
        """Storage in bits: codes, and SU / SV counted as 16-bit floats (as quip-sharp stores)."""
        m, n = self.shape
        cb = _codebooks.get(self.codebook)
        return {"codes": int(round(m * n * cb.bits_per_weight)), "SU": 16 * n, "SV": 16 * m}

    @property
    def bits_per_weight(self) -> float:
        """All storage (codes, SU, SV) divided by the number of weights."""
        m, n = self.shape
        return sum(self.bits().values()) / (m * n)


@jax.jit
def _input_stats(W, H):
    # symmetry via H r vs H^T r for a fixed random r: two passes over H, no transpose of it
    # (an asymmetric H passes only on a measure-zero set of r)
    r = jax.random.normal(jax.random.key(0), (H.shape[0],), H.dtype)
    hr = jnp.dot(H, r, precision=_HI)
    rh = jnp.dot(r, H, precision=_HI)
    return (jnp.sum(~jnp.isfinite(W)), jnp.sum(~jnp.isfinite(H)),
            jnp.max(jnp.abs(H)) * jnp.sum(jnp.abs(r)), jnp.max(jnp.abs(hr - rh)),
            jnp.mean(jnp.diagonal(H)))


def _check_inputs(W, H, cb):
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (out, in) matrix, got shape {W.shape}")
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H has shape {H.shape} but W has shape {W.shape}: H must be (in, in) "
                         f"= ({n}, {n}), the Hessian of this layer's inputs")
    if n % _ldlq.BLOCK:
        raise ValueError(f"the input dimension of W ({n}) is not divisible by {_ldlq.BLOCK}: "
                         "BlockLDLQ rounds blocks of 8 columns; pad the layer's inputs")
    if n % cb.dim:
        raise ValueError(f"the input dimension {n} is not divisible by {cb.name}'s dim {cb.dim}")
    bad_w, bad_h, scale, asym, mean_diag = (float(v) for v in _input_stats(W, H))
    if bad_w:
        raise ValueError(f"W contains {int(bad_w)} NaN or Inf entries: fix the checkpoint or the "
                         "layer before quantizing")
    if bad_h:
        raise ValueError(f"H contains {int(bad_h)} NaN or Inf entries: the calibration activations "
                         "overflowed or were corrupted; recollect the Hessian")
    if asym > 1e-5 * max(scale, 1e-30):
        raise ValueError(f"H is not symmetric (|H r - H^T r| = {asym:.3g} for a random r, "
                         f"max|H| sum|r| = {scale:.3g})")
    if mean_diag <= 0:
        raise ValueError("H has a non-positive mean diagonal: it is not the second moment of "
                         "any inputs (all-zero calibration activations?)")


def _check_settings(cb, scale, sigma_reg, rounding) -> float:
    """The scale rho to use (the codebook's default when None); errors for bad settings."""
    rho = cb.default_scale if scale is None else float(scale)
    if not (rho > 0 and np.isfinite(rho)):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if sigma_reg < 0:
        raise ValueError(f"sigma_reg must be >= 0, got {sigma_reg}")
    if rounding not in ("ldlq", "nearest"):
        raise ValueError(f"rounding must be 'ldlq' or 'nearest', got {rounding!r}")
    return rho


@functools.partial(jax.jit, static_argnames=("rotations",))
def _rotate_and_scale(W, H, key, sigma_reg, rho, rotations):
    """Regularize H, RHT, and the scale. Returns (Wr / Wscale, Hr, SU, SV, Wscale)."""
    Hreg = _hessian.regularize(H, sigma_reg)
    Wr, Hr, SU, SV = _rht.incoherence_transform(W, Hreg, key, rotations=rotations)
    rms = jnp.sqrt(jnp.mean(Wr * Wr))
    wscale = rms / rho
    # an all-zero W: quantize zeros at scale 1 and fold a zero scale into SV (What = 0)
    safe = jnp.where(wscale > 0, wscale, 1.0)
    return Wr / safe, Hr, SU, SV, jnp.where(wscale > 0, wscale, 0.0)


def _block_ldl_float64(H, SU, sigma_reg, rot_n):
    """The official float64 retry: regularize, rotate and factor H in float64.

    Returns L as float32, or None when H + sigma_reg I is not positive definite in float64.
    """
    with jax.enable_x64(True):
        h = _hessian.regularize_any(jnp.asarray(np.asarray(H), jnp.float64), sigma_reg)
        hr = _rht.transform_hessian(h, jnp.asarray(np.asarray(SU), jnp.float64), rot_n)
        L, _ = _ldlq.block_ldl(hr)
        L = np.asarray(L)
    return jnp.asarray(L, jnp.float32) if np.isfinite(L).all() else None


def quantize_linear(W, H, *, codebook="E8P12", scale: float | None = None,
                    sigma_reg: float = 1e-2, tune_iters: int = 0, key: jax.Array,
                    rotation: str = "auto", rounding: str = "ldlq",
                    buf_cols: int = 128) -> QuantizedLinear:
    """Quantize one linear layer with QuIP# (RHT + BlockLDLQ with a lattice codebook).

    Args:
      W: (m, n) weight (out, in), any float dtype; n % 8 == 0.
      H: (n, n) second moment of the layer inputs, E[x x^T] (not regularized).
      codebook: name ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B", "HI2", ...) or a `Codebook`.
      scale: rho: the rotated weight is divided by RMS(Wr) / rho before rounding. Default:
        the codebook's `default_scale` (0.9 / 0.98 / 1.03 for 2 / 3 / 4 bits).
      sigma_reg: H <- H / mean(diag H) + sigma_reg I before use.
      tune_iters: extra block coordinate descent passes after BlockLDLQ.
      key: jax.random key for the sign vectors (same key, same codes, bit for bit).
      rotation: "auto" (Hadamard where one is known, else the randomized FFT), "hadamard",
        "rfft" or "identity" (no incoherence processing: the ablation).
      rounding: "ldlq" (BlockLDLQ) or "nearest" (each block rounded to its nearest codeword,
        the ablation; tune passes still apply if requested).
      buf_cols: LDLQ buffer width (speed only).
    Returns:
      A `QuantizedLinear`.
    Raises:
      ValueError: bad shapes, NaN/Inf, an asymmetric or indefinite H, unsupported dimensions.
    """
    cb = _codebooks.get(codebook)
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    _check_inputs(W, H, cb)
    m, n = W.shape
    rho = _check_settings(cb, scale, sigma_reg, rounding)
    rotations = (_rht.rotation(m, rotation), _rht.rotation(n, rotation))
    Ws, Hr, SU, SV, wscale = _rotate_and_scale(W, H, key, jnp.float32(sigma_reg),
                                               jnp.float32(rho), rotations)
    if rounding == "nearest":     # no error feedback: L = I
        L = jnp.eye(n, dtype=jnp.float32)
    else:
        L, _ = jax.jit(_ldlq.block_ldl)(Hr)
    if not bool(jnp.all(jnp.isfinite(L))):
        L = _block_ldl_float64(H, SU, sigma_reg, rotations[1])
        if L is None:
            raise ValueError(
                "H + sigma_reg * I is not positive definite, even with a float64 Cholesky "
                f"(sigma_reg = {sigma_reg}): H is not a valid second moment; check it, or "
                f"increase sigma_reg (e.g. to {max(10 * sigma_reg, 1e-1):g})")
    codes, _ = _ldlq.block_ldlq(Ws, L, cb, tune_iters, H=Hr if tune_iters else None,
                                buf_cols=buf_cols)
    return QuantizedLinear(codes=codes, SU=SU, SV=SV * wscale, codebook=cb.name,
                           shape=(m, n), transforms=(rotations[0].kind, rotations[1].kind))
