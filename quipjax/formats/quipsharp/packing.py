"""quip-sharp's packed E8P format, as pure array functions (no files, no models).

The official QuIP# code (github.com/Cornell-RelaxML/quip-sharp, commit 1d8f873) stores a
quantized linear layer W (m out x n in) as buffers of `lib/linear/quantized_linear.py`:

    Qidxs        int64 (m, n/32) E8P12 | (m, 3n/64) E8P12RVQ3B | (m, n/16) E8P12RVQ4B
    SU           float16 (n,)  input signs (real-valued once fine-tuned)
    SV           float16 (m,)  output signs times Wscale (and, unfused, the matrix RMS)
    Wscale       scalar (1 in current models: "new models have Wscale pre-fused into SV")
    codebook_id  int64 scalar: E8P12 = 7, E8P12RVQ4B = 17, E8P12RVQ3B = 18
    fuse_scales  (k,) for the fused q/k/v and up/gate layers: member i's output rows are
                 multiplied by fuse_scales[i] (the RMS of the member's original weight)

and computes y = SV * 32 * H_m (Q / 32) H_n^T (SU * x), Q the decoded codes: the /32 and *32
only keep fp16 in range, so the weight it uses is What = diag(SV) M_m Q M_n^T diag(SU), exactly
`QuantizedLinear.dequantize()` with M the orthonormal Hadamard transforms of `quipjax.hadamard`
(the official matrices, bit for bit). quipjax's 16-bit E8P12 codes are the official codes.

The packed layout of E8P12 codes (official `maybe_pack_idxs`; the CUDA decoder reads the same
words as a (m/16, n/64, 8, 4) array, m % 16 == 0 and n % 64 == 0):
  * one 64-bit word holds 2 rows x 2 adjacent codes (r0c0, r1c0, r0c1, r1c1 = codes 0..3);
    low 32 bits: the pattern bytes (code >> 8) of codes 0..3 in bytes 0..3; high 32 bits:
    bit 4j + i = sign bit j (bit j of code & 255) of code i;
  * the (m/2, n/16) words [row pair, code pair] are viewed as (m/16, 8, n/64, 4), transposed
    to (m/16, n/64, 8, 4) and stored row-major as an (m, n/32) tensor.
E8P12RVQ4B concatenates two such tensors along the columns (stage 1 | stage 2). E8P12RVQ3B
concatenates the stage-1 E8P12 words with (m, n/64) words holding 8 consecutive E81B indices
each (byte i = index of code 8k + i). The words are unsigned bit fields: as int64 about half
are negative (`pack_qidxs` returns int64, the official dtype; `unpack_qidxs` takes either).

    qidxs = pack_qidxs(codes, "E8P12")              # quipjax codes -> official words
    ql = to_quantized_linear(Qidxs, SU, SV, 7, m, n)   # one official layer
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from quipjax import codebooks as _codebooks
from quipjax import hadamard as _hadamard
from quipjax.codebooks.e8p import SHUFFLE_MAP, packed_abs_grid
from quipjax.codebooks.rvq import e81b_table
from quipjax.quantize import QuantizedLinear

__all__ = [
    "CODEBOOK_IDS", "CODEBOOK_VERSIONS", "PACKSZ", "CODESZ", "MODEL_VERSION", "MAX_DIM",
    "codebook_name", "official_hadamard_k", "check_shape", "check_transforms", "qidxs_shape",
    "pack_qidxs", "unpack_qidxs", "reference_decode", "reference_dequantize",
    "to_quantized_linear", "from_quantized_linear", "as_float32",
]

CODEBOOK_IDS = {"E8P12": 7, "E8P12RVQ4B": 17, "E8P12RVQ3B": 18}
_ID_NAMES = {v: k for k, v in CODEBOOK_IDS.items()}
# `self.version` of each codebook class; the official runtime refuses other versions
CODEBOOK_VERSIONS = {"E8P12": 1, "E8P12RVQ4B": 1, "E8P12RVQ3B": 0}
# `self.packsz` (codes per int64 word, "fudged" for the RVQ codebooks); fixes Qidxs' width
PACKSZ = {"E8P12": 4, "E8P12RVQ4B": 2, "E8P12RVQ3B": 8 / 3}
CODESZ = 8
MODEL_VERSION = 1           # lib/utils/model_version.py
# lib/utils/matmul_had.py get_hadK: the first K dividing n wins, and n / K must be 2^p
_OFFICIAL_K = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)
# the official CUDA decoder checks N < 65536 and K < 65536
MAX_DIM = 65536

# ----------------------------------------------------------------------------- basics

def codebook_name(codebook) -> str:
    """The quipjax name of a codebook given as a name, an official id or a `Codebook`."""
    if isinstance(codebook, _codebooks.Codebook):
        codebook = codebook.name
    if isinstance(codebook, (int, np.integer)) and not isinstance(codebook, bool):
        if int(codebook) not in _ID_NAMES:
            raise ValueError(f"unknown quip-sharp codebook id {int(codebook)}; known ids: "
                             + ", ".join(f"{v} ({k})" for k, v in CODEBOOK_IDS.items()))
        return _ID_NAMES[int(codebook)]
    if codebook not in CODEBOOK_IDS:
        raise ValueError(f"codebook {codebook!r} has no quip-sharp packed format; the official "
                         f"format stores {', '.join(CODEBOOK_IDS)} only")
    return codebook


def official_hadamard_k(n: int) -> int:
    """The dense Hadamard factor K the official code uses for dimension n (1: power of two).

    Raises ValueError for dimensions the official code cannot transform.
    """
    n = int(n)
    for k in _OFFICIAL_K:
        if n % k == 0:
            q = n // k
            if q & (q - 1):
                raise ValueError(f"dimension {n} is divisible by {k} but {n}/{k} = {q} is not a "
                                 "power of two: the official code (get_hadK) cannot transform it")
            return k
    if n <= 0 or n & (n - 1):
        raise ValueError(f"dimension {n} is neither a power of two nor K * 2^p with K in "
                         f"{_OFFICIAL_K}: the official code has no Hadamard transform for it")
    return 1


def check_shape(m: int, n: int, codebook=None) -> None:
    """Raise a ValueError unless an (m, n) weight fits the official packed layout."""
    if m % 16 or n % 64 or m <= 0 or n <= 0:
        raise ValueError(
            f"quip-sharp's packed E8P layout needs m % 16 == 0 and n % 64 == 0 (each int64 word "
            f"holds 2 rows x 2 codes of 8 weights, tiled in blocks of 16 rows x 64 columns); got "
            f"a weight of (m, n) = ({m}, {n}) (out, in): m % 16 = {m % 16}, n % 64 = {n % 64}")
    if codebook is not None:
        codebook_name(codebook)


def qidxs_shape(codebook, m: int, n: int) -> tuple:
    """Shape of the official Qidxs tensor of an (m, n) weight."""
    name = codebook_name(codebook)
    return (m, {"E8P12": n // 32, "E8P12RVQ4B": n // 16, "E8P12RVQ3B": 3 * n // 64}[name])


def _as_u64(qidxs) -> np.ndarray:
    q = np.asarray(qidxs)
    if q.dtype == np.int64:
        return q.view(np.uint64)
    if q.dtype == np.uint64:
        return q
    raise TypeError(f"Qidxs must be int64 (the official dtype) or uint64, got {q.dtype}")


# ----------------------------------------------------------------------------- packing

# _SPREAD[s]: bit j of the byte s moved to bit 4j (a sign byte spread over 8 nibbles)
_SPREAD = np.array([sum(((s >> j) & 1) << (4 * j) for j in range(8)) for s in range(256)],
                   np.uint64)


def _pack_e8p(codes: np.ndarray) -> np.ndarray:
    """E8P12 codes (m, n/8) -> words uint64 (m, n/32) in the official layout."""
    m, nc = codes.shape
    c = codes.astype(np.uint64).reshape(m // 2, 2, nc // 2, 2)     # [row pair, r, code pair, c]
    quad = c.transpose(0, 2, 3, 1).reshape(m // 2, nc // 2, 4)     # code i = r + 2 c
    lo = np.zeros(quad.shape[:2], np.uint64)
    hi = np.zeros(quad.shape[:2], np.uint64)
    for i in range(4):
        lo |= (quad[..., i] >> np.uint64(8)) << np.uint64(8 * i)
        hi |= _SPREAD[(quad[..., i] & np.uint64(255)).astype(np.intp)] << np.uint64(i)
    words = (hi << np.uint64(32)) | lo                              # (m/2, n/16)
    words = words.reshape(m // 16, 8, nc // 8, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(words).reshape(m, nc // 4)


def _unpack_e8p(words: np.ndarray, m: int, n: int) -> np.ndarray:
    """Inverse of `_pack_e8p`: words uint64 (m, n/32) -> codes uint16 (m, n/8)."""
    nc = n // 8
    w = words.reshape(m // 16, n // 64, 8, 4).transpose(0, 2, 1, 3).reshape(m // 2, nc // 2)
    lo = w & np.uint64(0xFFFFFFFF)
    hi = w >> np.uint64(32)
    quad = np.zeros((m // 2, nc // 2, 4), np.uint64)
    for i in range(4):
        pattern = (lo >> np.uint64(8 * i)) & np.uint64(255)
        signs = np.zeros_like(pattern)
        for j in range(8):
            signs |= ((hi >> np.uint64(4 * j + i)) & np.uint64(1)) << np.uint64(j)
        quad[..., i] = (pattern << np.uint64(8)) | signs
    codes = quad.reshape(m // 2, nc // 2, 2, 2).transpose(0, 3, 1, 2)   # [rp, r, cp, c]
    return np.ascontiguousarray(codes).reshape(m, nc).astype(np.uint16)


def _pack_e81b(idx: np.ndarray) -> np.ndarray:
    """E81B indices (m, n/8) in 0..255 -> words uint64 (m, n/64): byte i = index 8k + i."""
    m, nc = idx.shape
    b = idx.astype(np.uint64).reshape(m, nc // 8, 8)
    out = np.zeros((m, nc // 8), np.uint64)
    for i in range(8):
        out |= b[..., i] << np.uint64(8 * i)
    return out


def _unpack_e81b(words: np.ndarray, m: int, n: int) -> np.ndarray:
    out = np.zeros((m, n // 64, 8), np.uint16)
    for i in range(8):
        out[..., i] = ((words >> np.uint64(8 * i)) & np.uint64(255)).astype(np.uint16)
    return out.reshape(m, n // 8)


def pack_qidxs(codes, codebook) -> np.ndarray:
    """quipjax codes -> the official Qidxs tensor (int64; the words are unsigned bit fields).

    Args:
      codes: (m, n/8) uint16 E8P12 codes, or (m, n/8, 2) for the RVQ codebooks ([..., 0] the
        E8P12 stage, [..., 1] the E8P12 / E81B residual stage).
      codebook: quipjax name ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B") or official id (7, 18, 17).
    Returns:
      int64 array of `qidxs_shape(codebook, m, n)`.
    """
    name = codebook_name(codebook)
    c = np.asarray(codes)
    want_ndim = 2 if name == "E8P12" else 3
    if c.ndim != want_ndim or (want_ndim == 3 and c.shape[-1] != 2):
        raise ValueError(f"{name} codes must have shape (m, n/8)" + ("" if want_ndim == 2 else
                         " + (2,)") + f", got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {c.dtype}")
    c = c.astype(np.int64)
    if c.min(initial=0) < 0 or c.max(initial=0) > 0xFFFF:
        raise ValueError("codes must lie in 0..65535 (16-bit E8P12 codes)")
    m, n = c.shape[0], c.shape[1] * 8
    check_shape(m, n)
    if name == "E8P12":
        words = _pack_e8p(c)
    elif name == "E8P12RVQ4B":
        words = np.concatenate([_pack_e8p(c[..., 0]), _pack_e8p(c[..., 1])], 1)
    else:
        if c[..., 1].max(initial=0) > 255:
            raise ValueError("E8P12RVQ3B residual codes (E81B indices) must lie in 0..255")
        words = np.concatenate([_pack_e8p(c[..., 0]), _pack_e81b(c[..., 1])], 1)
    return words.view(np.int64)


def unpack_qidxs(qidxs, codebook, m: int, n: int) -> np.ndarray:
    """The official Qidxs tensor (int64 or uint64) -> quipjax codes (uint16).

    Returns (m, n/8) for E8P12, (m, n/8, 2) for E8P12RVQ3B / E8P12RVQ4B.
    """
    name = codebook_name(codebook)
    m, n = int(m), int(n)
    check_shape(m, n)
    w = _as_u64(qidxs)
    if w.shape != qidxs_shape(name, m, n):
        raise ValueError(f"{name} Qidxs of an ({m}, {n}) weight must have shape "
                         f"{qidxs_shape(name, m, n)}, got {w.shape}")
    e = n // 32
    if name == "E8P12":
        return _unpack_e8p(w, m, n)
    if name == "E8P12RVQ4B":
        return np.stack([_unpack_e8p(np.ascontiguousarray(w[:, :e]), m, n),
                         _unpack_e8p(np.ascontiguousarray(w[:, e:]), m, n)], -1)
    return np.stack([_unpack_e8p(np.ascontiguousarray(w[:, :e]), m, n),
                     _unpack_e81b(w[:, e:], m, n)], -1)


# ----------------------------------------------------------------------------- reference decode

def _reference_e8p(words: np.ndarray, m: int, n: int) -> np.ndarray:
    """Decode official E8P12 words straight to values (m, n) float64, the way the CUDA kernel
    (quiptools_e8p_gemv.cu, decompress_packed_e8p_kernel) reads them: word [a, c, b, d] of the
    (m/16, n/64, 8, 4) view covers rows 16a + 2b + (0, 1) and columns 64c + 16d + (0..15);
    parity of each code's sign bits from the high word, bit 0 flipped when odd, shift -1/4."""
    w = words.reshape(m // 16, n // 64, 8, 4)
    a = w & np.uint64(0xFFFFFFFF)
    b = w >> np.uint64(32)
    s = b ^ (b >> np.uint64(4))
    s ^= s >> np.uint64(8)
    s ^= s >> np.uint64(16)
    parity = s & np.uint64(15)             # bit i: parity of code i's sign bits
    s = b ^ parity
    grid = packed_abs_grid().astype(np.uint64)
    out = np.zeros((m // 16, 8, 2, n // 64, 4, 2, 8))   # rows (a, b, r), columns (c, d, cc, k)
    for i in range(4):
        r, cc = i % 2, i // 2
        nib = grid[((a >> np.uint64(8 * i)) & np.uint64(255)).astype(np.intp)]
        shift = np.where((parity >> np.uint64(i)) & np.uint64(1), -0.25, 0.25)
        for k in range(8):
            sh = SHUFFLE_MAP[k]
            v = (((nib >> np.uint64(4 * sh)) & np.uint64(15)).astype(np.float64) - 8) * 0.5
            neg = (s >> np.uint64(4 * sh + i)) & np.uint64(1)
            out[:, :, r, :, :, cc, k] = (np.where(neg, -v, v) + shift).transpose(0, 2, 1, 3)
    return out.reshape(m, n)


def _reference_e81b(words: np.ndarray, m: int, n: int) -> np.ndarray:
    table = e81b_table().astype(np.float64)
    out = np.zeros((m, n // 64, 8, 8))
    for i in range(8):
        out[:, :, i] = table[((words >> np.uint64(8 * i)) & np.uint64(255)).astype(np.intp)]
    return out.reshape(m, n)


def reference_decode(qidxs, codebook, m: int, n: int) -> np.ndarray:
    """The decoded code matrix Q (m, n) float64 read directly from the official words (no
    detour through quipjax codes): the independent check of `unpack_qidxs`."""
    name = codebook_name(codebook)
    check_shape(m, n)
    w = _as_u64(qidxs)
    if w.shape != qidxs_shape(name, m, n):
        raise ValueError(f"Qidxs shape {w.shape} != {qidxs_shape(name, m, n)}")
    e = n // 32
    if name == "E8P12":
        return _reference_e8p(w, m, n)
    cb = _codebooks.get(name)
    if name == "E8P12RVQ4B":
        return _reference_e8p(w[:, :e], m, n) + _reference_e8p(w[:, e:], m, n) / cb.resid_scale
    return _reference_e8p(w[:, :e], m, n) + _reference_e81b(w[:, e:], m, n) / cb.resid_scale


def _dense_hadamard(n: int) -> np.ndarray:
    k = official_hadamard_k(n)
    hk = _hadamard.hadamard_k_matrix(k).astype(np.float64) if k > 1 else np.ones((1, 1))
    return np.kron(hk, _hadamard.sylvester(n // k).astype(np.float64)) / math.sqrt(n)


def reference_dequantize(qidxs, SU, SV, codebook, m: int, n: int) -> np.ndarray:
    """The weight the official model uses, in float64 with dense Hadamard matrices:
    diag(SV) H_m Q H_n^T diag(SU) (had_right = H_K of m, had_left_T = H_K^T of n). Costs
    O(m n (m + n)): for tests and checks of small layers."""
    Q = reference_decode(qidxs, codebook, m, n)
    W = _dense_hadamard(m) @ Q @ _dense_hadamard(n).T
    return (np.asarray(SV, np.float64)[:, None] * W) * np.asarray(SU, np.float64)[None, :]


# ----------------------------------------------------------------------------- layers

def as_float32(x) -> np.ndarray:
    """x as a float32 numpy array (float16 / bfloat16 / float64 inputs converted)."""
    return np.asarray(x).astype(np.float32)


def check_transforms(m: int, n: int) -> None:
    """Raise unless quipjax's Hadamard factors of m and n are the official code's."""
    for side, d in (("output (m)", m), ("input (n)", n)):
        k_off = official_hadamard_k(d)
        k_ours = _hadamard.hadamard_factor(d)
        if k_ours != k_off:
            raise ValueError(f"the {side} dimension {d}: the official Hadamard factor is "
                             f"{k_off} but quipjax's is {k_ours}; the transforms differ")


def to_quantized_linear(Qidxs, SU, SV, codebook_id, m: int, n: int, *, Wscale=None,
                        scaleWH=None) -> QuantizedLinear:
    """One official quantized layer -> a `QuantizedLinear` whose `dequantize()` is the weight
    the official model uses.

    Args:
      Qidxs: the official int64 (or uint64) tensor, shape `qidxs_shape(codebook_id, m, n)`.
      SU: (n,) input signs (float16 in the files; real-valued after fine-tuning).
      SV: (m,) output signs times Wscale and, for an unfused layer, the weight RMS.
      codebook_id: 7, 17, 18 (or the quipjax name).
      m, n: the weight shape (out, in) = (len(SV), len(SU)).
      Wscale: the legacy `Wscale` buffer (1 in current models); folded into SV the way the
        official runtime does it (`self.SV *= self.Wscale`, in SV's dtype).
      scaleWH: the `rescale_WH` input scaling (None unless quip_params['rescale_WH']): the
        runtime divides inputs by it before SU, so it is folded into SU as SU / scaleWH.
    Fused layers: the member output rows are further scaled by `fuse_scales` (see
    `quipjax.group.QuantizedGroup`, which `import_folder` builds).
    """
    name = codebook_name(codebook_id)
    m, n = int(m), int(n)
    check_shape(m, n)
    su, sv = np.asarray(SU), np.asarray(SV)
    if su.shape != (n,) or sv.shape != (m,):
        raise ValueError(f"SU must have shape ({n},) and SV ({m},), got {su.shape} and {sv.shape}")
    check_transforms(m, n)
    codes = unpack_qidxs(Qidxs, name, m, n)
    sv32 = as_float32(sv)
    if Wscale is not None:
        ws = np.asarray(Wscale)
        if float(ws) != 1.0:
            prod = sv32 * as_float32(ws)
            sv32 = as_float32(prod.astype(sv.dtype) if np.issubdtype(sv.dtype, np.floating) else prod)
    su32 = as_float32(su)
    if scaleWH is not None:
        su32 = as_float32(su32 / as_float32(scaleWH))
    if not (np.isfinite(su32).all() and np.isfinite(sv32).all()):
        raise ValueError("SU or SV holds NaN/Inf: the checkpoint is corrupt")
    return QuantizedLinear(codes=jnp.asarray(codes), SU=jnp.asarray(su32),
                           SV=jnp.asarray(sv32), codebook=name, shape=(m, n),
                           transforms=("hadamard", "hadamard"))


def from_quantized_linear(ql: QuantizedLinear, *, sv_scale: float = 1.0,
                          float_dtype=np.float16) -> dict:
    """A `QuantizedLinear` -> the official tensors {Qidxs, SU, SV, Wscale, codebook_id}.

    sv_scale multiplies SV (the member scale of an unfused quipjax group, which the official
    format folds into SV). Raises ValueError for layers the official code cannot run (another
    codebook, a non-Hadamard transform, dimensions outside the packed layout).
    """
    name = codebook_name(ql.codebook)
    m, n = ql.shape
    check_shape(m, n)
    if max(m, n) >= MAX_DIM:
        raise ValueError(f"the official CUDA decoder handles dimensions below {MAX_DIM}, got "
                         f"({m}, {n})")
    if tuple(ql.transforms) != ("hadamard", "hadamard"):
        raise ValueError(f"the layer uses the transforms {tuple(ql.transforms)}; the official "
                         "format runs randomized Hadamard transforms on both sides only "
                         "(quantize with --rotation=hadamard / auto on supported dimensions)")
    check_transforms(m, n)
    dt = np.dtype(float_dtype)
    su = as_float32(ql.SU)
    sv = as_float32(ql.SV) * np.float32(sv_scale)
    out = {"Qidxs": pack_qidxs(np.asarray(ql.codes), name),
           "SU": su.astype(dt), "SV": sv.astype(dt),
           "Wscale": np.array(1.0, dt), "codebook_id": np.array(CODEBOOK_IDS[name], np.int64)}
    for k in ("SU", "SV"):
        if not np.isfinite(out[k]).all():
            raise ValueError(f"{k} overflows {dt.name}")
    return out
