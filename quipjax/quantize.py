"""One linear layer to QuIP# codes, as public stages and two thin compositions of them.

    ql = quantize_linear(W, H, codebook="E8P12", key=jax.random.key(0))
    y = ql.apply(x)          # x @ What^T, computed in the rotated basis
    What = ql.dequantize()   # (m, n) float32

W is (m, n) = (out, in) and H (n, n) the second moment of the layer inputs (un-regularized,
e.g. `quipjax.hessian.finalize(...).H`). What = diag(SV) M_m Q M_n^T diag(SU), with Q the
decoded codes (m, n), M the rotations of `quipjax.rht`, SU the input signs and SV the output
signs times the scale.

The stages, each usable on its own (arrays in, arrays out):

    check_inputs(W, H, codebook)                    shapes, NaN/Inf, symmetry (raises)
    rho = check_settings(codebook, scale, ...)      the scale rho; bad settings raise
    r = rotate_and_scale(W, H, key, sigma_reg, rho, rotations)   regularize H, RHT, scale
    L = factor(r.H, H=H, SU=r.SU, ...)             block LDL, float64 retry (raises)
    codes = round_ldlq(r.W, L, codebook, ...)       BlockLDLQ (or any rounding of your own)
    ql = assemble(codes, r, codebook, rotations)    a `QuantizedLinear`

`quantize_linear` runs them for one matrix; `quantize_stack` runs the same stages for a stack
of same-shaped matrices, each stage lifted over the stack by a `Lift` (`SequentialLift`,
`VmapLift` here; `quipjax.distributed.ShardLift` runs one matrix per device, the same bits as
`quantize_linear`), the way `optax.adam` is a chain of its transformations.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks
from quipjax import hessian
from quipjax import ldlq
from quipjax import rht
from quipjax.codebooks.base import concrete

__all__ = ["QuantizedLinear", "FORMAT_VERSION", "Rotated", "check_inputs", "check_settings",
           "rotations_for", "rotate_and_scale", "factor", "factor_float64", "round_ldlq",
           "assemble", "check_result", "proxy", "quantize_linear", "Lift", "SequentialLift",
           "VmapLift", "lifted_stages", "quantize_stack"]

# Version of the QuantizedLinear layout (codes, SU, SV, metadata); bump on any change that
# would make an old checkpoint decode differently.
FORMAT_VERSION = 1

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "SU", "SV", "table"],
                   meta_fields=["codebook", "shape", "transforms", "format_version"])
@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """A quantized (m, n) weight. A pytree: arrays are leaves, metadata is static.

    Attributes:
      codes: (m, n // dim) + code_shape codebook codes (uint16 for the E8P codebooks).
      SU: (n,) float32 input-side signs (real-valued once fine-tuned).
      SV: (m,) float32 output-side signs times the scale (Wscale folded in).
      codebook: codebook name (see `quipjax.codebooks`).
      shape: (m, n).
      transforms: (kind for m, kind for n), each "hadamard", "rfft" or "identity".
      format_version: `FORMAT_VERSION` of the writer.
      table: None, or the fine-tuned value table of a codebook that has one (the HYB trellis
        codes: (2^Q, 2) float32); None decodes with the codebook's own table.
    """

    codes: jax.Array
    SU: jax.Array
    SV: jax.Array
    codebook: str
    shape: Tuple[int, int]
    transforms: Tuple[str, str]
    format_version: int = FORMAT_VERSION
    table: Optional[jax.Array] = None

    @property
    def rotations(self):
        m, n = self.shape
        return rht.Rotation(self.transforms[0], m), rht.Rotation(self.transforms[1], n)

    def decode_rotated(self) -> jax.Array:
        """The decoded codes Q (m, n) float32, in the rotated basis, without the scale."""
        m, n = self.shape
        return codebooks.get(self.codebook).decode_matrix(self.codes, m, n, self.table)

    def dequantize(self) -> jax.Array:
        """What (m, n) float32 in the original basis."""
        rot_m, rot_n = self.rotations
        return rht.incoherence_inverse(self.decode_rotated(), self.SU, self.SV,
                                       rotations=(rot_m, rot_n))

    def apply(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """x (..., n) -> x @ What^T (..., m), float32, without forming What.

        Rotates x (cost O(n log n) per row), multiplies by the codes in the rotated basis with
        a decode-matmul kernel (`quipjax.kernels`: Pallas on GPU, the XLA path elsewhere;
        `backend` picks one), rotates back.
        """
        from quipjax import kernels   # kernels import codebooks; keep this module light
        rot_m, rot_n = self.rotations
        m, n = self.shape
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != n:
            raise ValueError(f"QuantizedLinear of shape {self.shape} applied to inputs with "
                             f"last dimension {x.shape[-1]}")
        t = rot_n.apply(x * self.SU, axis=-1, transpose=True)          # M_n^T diag(SU) x
        y = kernels.decode_matmul(t, self.codes, self.codebook, backend=backend,
                                  table=self.table)
        return rot_m.apply(y, axis=-1) * self.SV                        # diag(SV) M_m (.)

    def bits(self) -> dict:
        """Storage in bits, as a quipjax checkpoint stores the layer: the codes; SU as one bit
        per entry while it holds signs (32 once fine-tuning made it real-valued); SV float32;
        a tuned table float32. Needs concrete arrays (not under jit)."""
        m, n = self.shape
        cb = codebooks.get(self.codebook)
        signs = bool(np.all(np.abs(np.asarray(self.SU)) == 1))
        out = {"codes": int(round(m * n * cb.bits_per_weight)), "SU": n if signs else 32 * n,
               "SV": 32 * m}
        if self.table is not None:
            out["table"] = 32 * int(np.size(self.table))
        return out

    @property
    def bits_per_weight(self) -> float:
        """All storage (`bits()`: codes, SU, SV) divided by the number of weights."""
        m, n = self.shape
        return sum(self.bits().values()) / (m * n)


# ------------------------------------------------------------------------------- stages

def _known(*xs) -> bool:
    """True when the values of all xs are known (`codebooks.base.concrete`): not inside
    jit / vmap. Checks that need values run only then."""
    return all(concrete(x) is not None for x in xs)


@jax.jit
def _w_stats(W):
    return jnp.sum(~jnp.isfinite(W))


@jax.jit
def _h_stats(H):
    # symmetry via H r vs H^T r for a fixed random r: two passes over H, no transpose of it
    # (an asymmetric H passes only on a measure-zero set of r)
    r = jax.random.normal(jax.random.key(0), (H.shape[0],), H.dtype)
    hr = jnp.dot(H, r, precision=_HI)
    rh = jnp.dot(r, H, precision=_HI)
    return (jnp.sum(~jnp.isfinite(H)), jnp.max(jnp.abs(H)) * jnp.sum(jnp.abs(r)),
            jnp.max(jnp.abs(hr - rh)), jnp.mean(jnp.diagonal(H)))


def check_inputs(W, H, codebook) -> None:
    """Raise a ValueError naming the fix unless W (m, n) and H (n, n) float32 can be quantized
    with `codebook`: shapes, n % 8, NaN/Inf, symmetry of H, a positive mean diagonal.

    Under tracing (jit / vmap) only the shape checks run: the value checks (NaN/Inf,
    symmetry, mean diagonal) need concrete arrays and are skipped for a traced W or H."""
    cb = codebooks.get(codebook)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (out, in) matrix, got shape {W.shape}")
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H has shape {H.shape} but W has shape {W.shape}: H must be (in, in) "
                         f"= ({n}, {n}), the Hessian of this layer's inputs")
    if n % cb.block:
        raise ValueError(f"the input dimension of W ({n}) is not divisible by {cb.block}: "
                         f"BlockLDLQ rounds {cb.name} in blocks of {cb.block} columns; pad the "
                         "layer's inputs")
    cb.check_shape(m, n)
    if _known(W):
        bad_w = int(_w_stats(concrete(W)))
        if bad_w:
            raise ValueError(f"W contains {bad_w} NaN or Inf entries: fix the checkpoint or "
                             "the layer before quantizing")
    if not _known(H):
        return
    bad_h, scale, asym, mean_diag = (float(v) for v in _h_stats(concrete(H)))
    if bad_h:
        raise ValueError(f"H contains {int(bad_h)} NaN or Inf entries: the calibration activations "
                         "overflowed or were corrupted; recollect the Hessian")
    if asym > 1e-5 * max(scale, 1e-30):
        raise ValueError(f"H is not symmetric (|H r - H^T r| = {asym:.3g} for a random r, "
                         f"max|H| sum|r| = {scale:.3g})")
    if mean_diag <= 0:
        raise ValueError("H has a non-positive mean diagonal: it is not the second moment of "
                         "any inputs (all-zero calibration activations?)")


def check_settings(codebook, scale: Optional[float], sigma_reg: float,
                   rounding: Union[str, Callable] = "ldlq") -> float:
    """The scale rho to use (the codebook's `default_scale` when `scale` is None); a ValueError
    for a non-positive scale, a negative sigma_reg or an unknown rounding. A traced scale or
    sigma_reg (a jit argument that is not static) is passed through unchecked."""
    cb = codebooks.get(codebook)
    if scale is not None and not _known(scale):
        rho = scale                                   # a traced scale: not checked
    else:
        rho = cb.default_scale if scale is None else float(scale)
        if not (rho > 0 and np.isfinite(rho)):
            raise ValueError(f"scale must be a positive number, got {scale}")
    if _known(sigma_reg) and concrete(sigma_reg) < 0:
        raise ValueError(f"sigma_reg must be >= 0, got {sigma_reg}")
    if not callable(rounding) and rounding not in ("ldlq", "nearest"):
        raise ValueError(f"rounding must be 'ldlq', 'nearest' or a function (rotated, codebook) "
                         f"-> codes, got {rounding!r}")
    return rho


def rotations_for(shape, rotation="auto") -> tuple:
    """(rot_m, rot_n) `rht.Rotation`s of an (m, n) weight: `rotation` is a kind ("auto",
    "hadamard", "rfft", "identity") used on both sides, or a pair of `Rotation` values."""
    m, n = shape
    if isinstance(rotation, str):
        return rht.rotation(m, rotation), rht.rotation(n, rotation)
    rot_m, rot_n = rotation
    if not (isinstance(rot_m, rht.Rotation) and isinstance(rot_n, rht.Rotation)):
        raise TypeError("rotation must be a kind ('auto', 'hadamard', 'rfft', 'identity') or a "
                        "pair (rot_m, rot_n) of quipjax.rht.Rotation")
    if (rot_m.n, rot_n.n) != (m, n):
        raise ValueError(f"rotations of orders {(rot_m.n, rot_n.n)} for a weight of shape {(m, n)}")
    return rot_m, rot_n


class Rotated(NamedTuple):
    """The output of `rotate_and_scale`: what the rounding stage works on.

    W: (m, n) float32, M_m^T diag(SV) W diag(SU) M_n / scale (the rotated, scaled weight).
    H: (n, n) float32, M_n^T diag(SU) Hreg diag(SU) M_n (the rotated, regularized Hessian).
    SU: (n,), SV: (m,) float32 random signs. scale: () float32 RMS(rotated W) / rho (0 for
    an all-zero W, which is then rounded at scale 1).
    """

    W: jax.Array
    H: jax.Array
    SU: jax.Array
    SV: jax.Array
    scale: jax.Array


def _rotate_and_scale(W, H, key, sigma_reg, rho, rotations) -> Rotated:
    # Inside a caller's jit, sigma_reg and rho (and W, H) may be constants, which XLA would
    # fold differently from the parameters of this stage's own program (rms / rho: SV one ulp
    # off); the barrier keeps the eager call's bits.
    W, H, sigma_reg, rho = jax.lax.optimization_barrier((W, H, sigma_reg, rho))
    Hreg = hessian.regularize(H, sigma_reg)
    Wr, Hr, SU, SV = rht.incoherence_transform(W, Hreg, key, rotations=rotations)
    rms = jnp.sqrt(jnp.mean(Wr * Wr))
    wscale = rms / rho
    # an all-zero W: quantize zeros at scale 1 and fold a zero scale into SV (What = 0)
    safe = jnp.where(wscale > 0, wscale, 1.0)
    return Rotated(Wr / safe, Hr, SU, SV, jnp.where(wscale > 0, wscale, 0.0))


@functools.lru_cache(maxsize=64)
def _rotate_and_scale_seq(rotations):
    # Under vmap, one matrix after the other (lax.map): a batched mean over (k, m, n) sums in
    # another order than the (m, n) one (scale, hence SV, off by an ulp). The custom_jvp
    # differentiates the plain function (custom_vmap alone has no reverse mode).
    plain = functools.partial(_rotate_and_scale, rotations=rotations)
    fn = jax.custom_jvp(jax.custom_batching.sequential_vmap(plain))
    fn.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return fn


@functools.partial(jax.jit, static_argnames=("rotations",))
def rotate_and_scale(W, H, key, sigma_reg, rho, rotations) -> Rotated:
    """Regularize H (`hessian.regularize`), apply the RHT with signs drawn from `key`, divide
    the rotated weight by RMS / rho. W (m, n), H (n, n) float32; sigma_reg, rho float32
    scalars; rotations a static (rot_m, rot_n) pair (`rotations_for`). Returns `Rotated`.
    The same bits eagerly, inside a jit and under vmap (which runs the matrices in a loop)."""
    return _rotate_and_scale_seq(rotations)(W, H, key, sigma_reg, rho)


def factor_float64(H, SU, sigma_reg, rot_n, block: int = ldlq.BLOCK):
    """The official float64 retry: regularize, rotate and factor H in float64 (blocks of
    `block` columns, the codebook's).

    Returns L (n, n) float32, or None when H + sigma_reg I is not positive definite in float64.
    """
    with jax.enable_x64(True):
        h = hessian.regularize_any(jnp.asarray(np.asarray(H), jnp.float64), sigma_reg)
        hr = rht.transform_hessian(h, jnp.asarray(np.asarray(SU), jnp.float64), rot_n)
        L, _ = ldlq.block_ldl(hr, block)
        L = np.asarray(L)
    return jnp.asarray(L, jnp.float32) if np.isfinite(L).all() else None


_block_ldl = jax.jit(ldlq.block_ldl, static_argnums=1)


def _not_positive_definite(sigma_reg) -> ValueError:
    return ValueError(
        "H + sigma_reg * I is not positive definite, even with a float64 Cholesky "
        f"(sigma_reg = {sigma_reg}): H is not a valid second moment; check it, or "
        f"increase sigma_reg (e.g. to {max(10 * sigma_reg, 1e-1):g})")


def factor(Hr, *, H, SU, sigma_reg: float, rot_n, block: int = ldlq.BLOCK) -> jax.Array:
    """L (n, n) float32 of the block LDL of the rotated Hessian Hr (n, n) float32 in blocks
    of `block` columns (the codebook's `block`; `ldlq.block_ldl`); when the float32 Cholesky fails, the float64 retry from the
    un-rotated H (n, n) and the signs SU (n,) (`factor_float64`). Raises a ValueError when
    H + sigma_reg I is not positive definite.

    Under tracing (jit / vmap, or a traced H, SU or sigma_reg) the float64 retry is
    unavailable (it needs concrete arrays and x64): the float32 L is returned as is, and a
    factorization that failed gives a non-finite L (NaN) instead of an error. Check it with
    `jnp.all(jnp.isfinite(L))`; `quantize_linear` turns it into a NaN SV (see there)."""
    L, _ = _block_ldl(Hr, block)
    if not _known(L, H, SU, sigma_reg):
        return L
    if not bool(jnp.all(jnp.isfinite(concrete(L)))):
        sigma_reg = concrete(sigma_reg)
        L = factor_float64(concrete(H), concrete(SU), sigma_reg, rot_n, block)
        if L is None:
            raise _not_positive_definite(sigma_reg)
    return L


def round_ldlq(W, L, codebook, *, tune_iters: int = 0, Hr=None, buf_cols: int = 128):
    """BlockLDLQ codes (m, n // dim) + code_shape of the rotated, scaled W (m, n) with the block
    LDL factor L (n, n) (the identity: nearest rounding); `tune_iters` block coordinate
    descent passes need Hr. See `quipjax.ldlq.block_ldlq`."""
    codes, _ = ldlq.block_ldlq(W, L, codebook, tune_iters, H=Hr if tune_iters else None,
                               buf_cols=buf_cols)
    return codes


def assemble(codes, rotated: Rotated, codebook, rotations) -> QuantizedLinear:
    """The `QuantizedLinear` of the codes of a rotated weight: the scale folded into SV."""
    m, n = rotated.W.shape
    return QuantizedLinear(codes=codes, SU=rotated.SU, SV=rotated.SV * rotated.scale,
                           codebook=codebooks.get(codebook).name, shape=(m, n),
                           transforms=(rotations[0].kind, rotations[1].kind))


def proxy(W, ql: QuantizedLinear, H, sigma_reg) -> jax.Array:
    """The proxy loss of a quantized weight (`ldlq.proxy_loss` against the regularized H):
    tr((What - W) Hreg (What - W)^T) / tr(W Hreg W^T), a float32 scalar. W (m, n), H (n, n)."""
    return ldlq.proxy_loss(W, ql.dequantize(), hessian.regularize(H, sigma_reg))


# ------------------------------------------------------------------------------- composers

def quantize_linear(W, H, *, codebook="E8P12", scale: float | None = None,
                    sigma_reg: float = 1e-2, tune_iters: int = 0, key: jax.Array,
                    rotation="auto", rounding="ldlq", buf_cols: int = 128) -> QuantizedLinear:
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
        "rfft" or "identity" (no incoherence processing: the ablation), or a pair of
        `quipjax.rht.Rotation` values (rot_m, rot_n).
      rounding: "ldlq" (BlockLDLQ), "nearest" (each block rounded by the codebook's search
        with no error feedback: the ablation; tune passes still apply if requested; the
        search is greedy for the RVQ codebooks, see `Codebook.search`), or your own function
        (rotated: `Rotated`, codebook) -> codes (m, n // dim) + code_shape.
      buf_cols: LDLQ buffer width (speed only).
    Returns:
      A `QuantizedLinear`.
    Raises:
      ValueError: bad shapes, NaN/Inf, an asymmetric or indefinite H, unsupported dimensions,
        a non-finite result (weights so large that their RMS overflows float32).

    Under `jax.jit` (the settings codebook, scale, sigma_reg, tune_iters, rotation, rounding,
    buf_cols static) and `jax.vmap` (over W, H and key) the codes, SU and SV are the eager
    call's bits; only the checks that need concrete values change:
      * shape and settings checks still raise; the value checks of `check_inputs` (NaN/Inf,
        symmetry, mean diagonal) and of the result (`check_result`) are skipped;
      * the float64 retry of `factor` is unavailable: when the float32 Cholesky of the
        rotated Hessian fails, SV is set to NaN (all m entries), so `dequantize` and `apply`
        give NaN, never plausible wrong weights. The codes of such a matrix are meaningless.
      * weights whose RMS overflows float32 give a non-finite SV as well.
    So under tracing a result is valid iff `jnp.all(jnp.isfinite(ql.SV))`; to get the float64
    retry and the errors, call `quantize_linear` eagerly (or `quantize_stack`).
    """
    cb = codebooks.get(codebook)
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    check_inputs(W, H, cb)
    rho = check_settings(cb, scale, sigma_reg, rounding)
    rotations = rotations_for(W.shape, rotation)
    r = rotate_and_scale(W, H, key, jnp.float32(sigma_reg), jnp.float32(rho), rotations)
    L = None
    if callable(rounding):
        codes = rounding(r, cb)
    else:
        L = (jnp.eye(W.shape[1], dtype=jnp.float32) if rounding == "nearest" else
             factor(r.H, H=H, SU=r.SU, sigma_reg=sigma_reg, rot_n=rotations[1],
                    block=cb.block))
        codes = round_ldlq(r.W, L, cb, tune_iters=tune_iters, Hr=r.H, buf_cols=buf_cols)
    ql = assemble(codes, r, cb, rotations)
    if _known(L, ql.SV):
        check_result(ql, W)
    elif L is not None:
        # no float64 retry under tracing: a failed factorization is flagged by a NaN SV
        ql = dataclasses.replace(ql, SV=jnp.where(jnp.all(jnp.isfinite(L)), ql.SV, jnp.nan))
    return ql


def check_result(ql: QuantizedLinear, W=None) -> None:
    """Raise a ValueError naming the cause and the fix unless the scale SV (m,) and the
    dequantized weight (m, n) of `ql` are finite; W (m, n), if given, only for the message.
    Needs concrete arrays (a TypeError inside jit / vmap).

    Cheap: reads the m entries of SV. |What_ij| <= |SV_i| ||Q||_F (orthogonal rotations, SU
    +-1), and codewords are small (below 8 for the registered codebooks, assumed below 1e8),
    so What is dequantized and checked only when max |SV| sqrt(m n) > 1e30."""
    sv = concrete(ql.SV)
    if sv is None:
        raise TypeError("check_result needs concrete arrays; under jit / vmap a result is valid "
                        "iff jnp.all(jnp.isfinite(ql.SV))")
    sv = np.asarray(sv)
    big = "" if W is None else f" (max |W| = {float(jnp.max(jnp.abs(concrete(W)))):.3g})"
    fix = ("Fix: quantize W / c for a power of two c that brings max |W| near 1 and multiply "
           "the result's SV by c (What is linear in SV), or fix the checkpoint if such weights "
           "are corrupt")
    bad = int(np.sum(~np.isfinite(sv)))
    if bad:
        raise ValueError(
            f"quantize_linear produced a non-finite scale: {bad} of the {sv.size} entries of SV "
            f"are NaN or Inf, so the dequantized weight would be too. The RMS of the rotated "
            f"weight overflows float32{big}: weights above ~1e19 square to Inf. {fix}")
    m, n = ql.shape
    if float(np.max(np.abs(sv), initial=0.0)) * np.sqrt(m * n) > 1e30:
        bad = int(jnp.sum(~jnp.isfinite(concrete(ql.dequantize()))))
        if bad:
            raise ValueError(
                f"the dequantized weight has {bad} NaN or Inf entries although SV is finite "
                f"(max |SV| = {float(np.max(np.abs(sv))):.3g}): the scale overflows float32 "
                f"once multiplied by the codewords{big}. {fix}")


def _checked(Ws, Hs, idx, shape, cb) -> tuple:
    """(W stack, H stack) float32 of the matrices idx, each read and checked once
    (`check_inputs`; a padded stack repeats its last index)."""
    got = {}
    for i in dict.fromkeys(idx):
        W, H = np.asarray(Ws[i], np.float32), np.asarray(Hs[i], np.float32)
        if W.shape != shape:
            raise ValueError(f"quantize_stack: matrices of one stack share a shape: {W.shape}"
                             f" != {shape}")
        check_inputs(jnp.asarray(W), jnp.asarray(H), cb)
        got[i] = W, H
    return np.stack([got[i][0] for i in idx]), np.stack([got[i][1] for i in idx])


class Lift:
    """How `quantize_stack` runs a per-matrix stage over a stack of `width` matrices.

    `lift(fn, in_axes)` returns a function of stacked arrays: arguments with in_axes 0 have a
    leading axis of size `width` (one entry per matrix), arguments with None are shared;
    `fn` sees one matrix's arrays, and every output of the lifted function gets the leading
    axis. `local()` is the (start, stop) of the stack's rows this process provides (all of
    them but in a run of several processes), `put(x)` places those rows (a stacked numpy
    array) where the lifted functions want them, `get(y)` brings a stacked output back as
    numpy. Lifts compare equal when they run the same programs (the compiled stages are
    cached by lift).
    """

    width: int = 1

    def __call__(self, fn: Callable, in_axes: Sequence) -> Callable:
        raise NotImplementedError

    def local(self) -> tuple:
        """(start, stop): the rows of a stack of `width` that this process provides."""
        return 0, self.width

    def put(self, x):
        return jnp.asarray(x)

    def get(self, x) -> np.ndarray:
        """A lifted function's stacked output as numpy (the whole stack)."""
        return np.asarray(x)

    def local_part(self, x) -> np.ndarray:
        """This process's rows (`local()`) of a lifted function's stacked output, as numpy."""
        return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class SequentialLift(Lift):
    """One matrix after the other, each stage jitted per matrix: `quantize_linear`'s programs
    and bits. width: matrices per group."""

    width: int = 1

    def __call__(self, fn, in_axes):
        one = jax.jit(fn)

        def lifted(*args):
            outs = [one(*[a[i] if ax == 0 else a for a, ax in zip(args, in_axes)])
                    for i in range(self.width)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return lifted


@dataclasses.dataclass(frozen=True)
class VmapLift(Lift):
    """`width` matrices at a time through one jitted `jax.vmap` of each stage (one program per
    stage for the whole group: fewer dispatches for many small matrices). The rotate stage
    runs its matrices in a loop under vmap (`rotate_and_scale`: a batched mean would reorder
    the sum, SV one ulp off); the LDL and LDLQ stages are batched and gave `quantize_linear`'s
    bits in every case measured (CPU, tests/test_quantize.py), which XLA does not promise for
    batched matmuls. The pipeline uses `SequentialLift` / `distributed.ShardLift`."""

    width: int = 8

    def __call__(self, fn, in_axes):
        return jax.jit(jax.vmap(fn, in_axes=tuple(in_axes)))


@functools.lru_cache(maxsize=64)
def lifted_stages(lift: Lift, rotations, cb, tune_iters: int, buf_cols: int) -> dict:
    """The stages `quantize_stack` runs, lifted over a stack by `lift` (cached per lift and
    static settings): {"rotate", "ldl", "finite", "round", "proxy"} -> stacked functions."""
    def rotate(W, H, kd, sigma, rho):
        return rotate_and_scale(W, H, jax.random.wrap_key_data(kd), sigma, rho, rotations)

    def ldl(Hr):
        return ldlq.block_ldl(Hr, cb.block)[0]

    def finite(L):
        return jnp.all(jnp.isfinite(L))

    def round_(W, L, Hr=None):
        return round_ldlq(W, L, cb, tune_iters=tune_iters, Hr=Hr, buf_cols=buf_cols)

    def proxy_(W, codes, SU, SV, H, sigma):
        ql = QuantizedLinear(codes=codes, SU=SU, SV=SV, codebook=cb.name, shape=W.shape,
                             transforms=(rotations[0].kind, rotations[1].kind))
        return proxy(W, ql, H, sigma)

    return {"rotate": lift(rotate, (0, 0, 0, None, None)),
            "ldl": lift(ldl, (0,)),
            "finite": lift(finite, (0,)),
            "round": lift(round_, (0, 0, 0) if tune_iters else (0, 0)),
            "proxy": lift(proxy_, (0, 0, 0, 0, 0, None))}


def quantize_stack(Ws: Sequence, Hs: Sequence, keys: Sequence, *, codebook="E8P12",
                   scale=None, sigma_reg=1e-2, tune_iters=0, rotation="auto", rounding="ldlq",
                   buf_cols=128, lift: Optional[Lift] = None, proxies: bool = False):
    """`quantize_linear` of k same-shaped matrices through the same stages, `lift.width` at a
    time (the last group padded with the last matrix).

    Ws: (m, n) weights, Hs: (n, n) Hessians, keys: jax.random keys (one each). lift: how the
    stages run over a group (default `SequentialLift()`: `quantize_linear`'s programs;
    `quipjax.distributed.ShardLift(mesh)`: one matrix per device, the same bits). Ws and Hs
    are indexed only where needed, a group at a time, and in a run of several processes only
    at the rows this process provides (`lift.local()`): sequences that load on access keep
    one group's local matrices in memory. Returns a list of `QuantizedLinear` and, with
    proxies=True, also the list of their `proxy` losses.
    """
    lift = lift or SequentialLift()
    cb = codebooks.get(codebook)
    k = len(Ws)
    if not (k == len(Hs) == len(keys)) or k == 0:
        raise ValueError("quantize_stack needs as many Ws, Hs and keys, at least one")
    if callable(rounding):
        raise ValueError("quantize_stack runs the built-in roundings ('ldlq', 'nearest'); "
                         "use quantize_linear for a rounding function of your own")
    D = lift.width
    lo, hi = lift.local()
    m, n = np.shape(Ws[min(lo, k - 1)])
    rho = check_settings(cb, scale, sigma_reg, rounding)
    rotations = rotations_for((m, n), rotation)
    st = lifted_stages(lift, rotations, cb, int(tune_iters), int(buf_cols))
    sigma, rho32 = jnp.float32(sigma_reg), jnp.float32(rho)
    out, prox = [], []
    for c0 in range(0, k, D):
        idx = [min(i, k - 1) for i in range(c0, c0 + D)]          # pad with the last matrix
        real = min(D, k - c0)
        mine = idx[lo:hi]                                          # this process's rows
        Wl, Hl = _checked(Ws, Hs, mine, (m, n), cb)
        Wst, Hst = lift.put(Wl), lift.put(Hl)
        del Wl, Hl
        kd = lift.put(np.stack([np.asarray(jax.random.key_data(keys[i])) for i in mine]))
        r = st["rotate"](Wst, Hst, kd, sigma, rho32)
        if rounding == "nearest":
            L = lift.put(np.broadcast_to(np.eye(n, dtype=np.float32), (hi - lo, n, n)))
        else:
            L = st["ldl"](r.H)
            bad = np.nonzero(~lift.get(st["finite"](L)))[0]
            if len(bad):                                            # the float64 retry
                Lh = np.array(lift.local_part(L))      # writable: this process's rows
                SU_h = lift.get(r.SU)
                for j in bad[(bad >= lo) & (bad < hi)]:
                    Lf = factor_float64(jnp.asarray(Hs[idx[j]], jnp.float32),
                                        jnp.asarray(SU_h[j]), sigma_reg, rotations[1], cb.block)
                    if Lf is None:
                        raise _not_positive_definite(sigma_reg)
                    Lh[j - lo] = np.asarray(Lf)
                L = lift.put(Lh)
        codes = st["round"](r.W, L, r.H) if tune_iters else st["round"](r.W, L)
        codes_h, SU_h = lift.get(codes), lift.get(r.SU)
        SV_h = lift.get(r.SV) * lift.get(r.scale)[:, None]         # assemble: SV * scale
        for j in range(real):
            out.append(QuantizedLinear(codes=jnp.asarray(codes_h[j]), SU=jnp.asarray(SU_h[j]),
                                       SV=jnp.asarray(SV_h[j]), codebook=cb.name, shape=(m, n),
                                       transforms=(rotations[0].kind, rotations[1].kind)))
            check_result(out[-1], Ws[idx[j]] if lo <= j < hi else None)
        if proxies:
            SVst = lift.put(SV_h[[min(j, real - 1) for j in range(lo, hi)]])
            p = lift.get(st["proxy"](Wst, codes, r.SU, SVst, Hst, sigma))
            prox += [float(v) for v in p[:real]]
    return (out, prox) if proxies else out
