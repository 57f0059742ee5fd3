"""Read and write quip-sharp's packed E8P checkpoints (the published QuIP# models).

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

A Hugging Face folder of the official format (`quantize_llama/hfize_llama.py`, model
`model/llama.py`): config.json = a LlamaConfig plus `quip_params`; safetensors with, per
decoder layer, `model.layers.{i}.self_attn.qkv_proj.*` (fused q, k, v),
`self_attn.o_proj.*`, `mlp.upgate_proj.*` (fused **up, gate**: in that order) and
`mlp.down_proj.*`, the two RMSNorm weights, and `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight` (absent when tied); all floating tensors float16.

    ql = to_quantized_linear(Qidxs, SU, SV, 7, m, n)         # one layer
    import_folder("Llama-2-7b-E8P-2Bit", "runs/llama7b_e8p")    # a whole model -> quipjax
    export_checkpoint("runs/smollm2_2bit", "smollm2_e8p_hf")    # quipjax -> official folder
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from quipjax import codebooks as _codebooks
from quipjax import hadamard as _hadamard
from quipjax.codebooks.e8p import SHUFFLE_MAP, packed_abs_grid
from quipjax.codebooks.rvq import e81b_table
from quipjax.quantize import QuantizedLinear

__all__ = [
    "CODEBOOK_IDS", "CODEBOOK_VERSIONS", "MODEL_VERSION", "OFFICIAL_GROUPS",
    "codebook_name", "official_hadamard_k", "check_shape", "qidxs_shape",
    "pack_qidxs", "unpack_qidxs", "reference_decode", "reference_dequantize",
    "to_quantized_linear", "from_quantized_linear", "quip_params", "official_config",
    "OfficialFolder", "import_folder", "export_checkpoint", "checkpoint_logits",
]

# lib/codebook/__init__.py: name -> (id, class)
CODEBOOK_IDS = {"E8P12": 7, "E8P12RVQ4B": 17, "E8P12RVQ3B": 18}
_ID_NAMES = {v: k for k, v in CODEBOOK_IDS.items()}
# `self.version` of each codebook class; the official runtime refuses other versions
CODEBOOK_VERSIONS = {"E8P12": 1, "E8P12RVQ4B": 1, "E8P12RVQ3B": 0}
# `self.packsz` (codes per int64 word, "fudged" for the RVQ codebooks); fixes Qidxs' width
_PACKSZ = {"E8P12": 4, "E8P12RVQ4B": 2, "E8P12RVQ3B": 8 / 3}
CODESZ = 8
MODEL_VERSION = 1           # lib/utils/model_version.py
# lib/utils/matmul_had.py get_hadK: the first K dividing n wins, and n / K must be 2^p
_OFFICIAL_K = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)
# the official CUDA decoder checks N < 65536 and K < 65536
_MAX_DIM = 65536


@dataclasses.dataclass(frozen=True)
class OfficialGroup:
    """One quantized module of an official decoder layer and the quipjax group it maps to."""

    name: str                 # quipjax group name (quipjax.models.adapter.LLAMA)
    module: str               # official module path inside a layer
    members: tuple            # quipjax/HF module paths, in the official row order
    fused: bool


OFFICIAL_GROUPS = (
    OfficialGroup("qkv", "self_attn.qkv_proj",
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
    OfficialGroup("o", "self_attn.o_proj", ("self_attn.o_proj",), False),
    OfficialGroup("up", "mlp.upgate_proj", ("mlp.up_proj", "mlp.gate_proj"), True),
    OfficialGroup("down", "mlp.down_proj", ("mlp.down_proj",), False),
)


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

def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _check_transforms(m: int, n: int) -> None:
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
    `quipjax.pipeline.checkpoint.QuantizedGroup`, which `import_folder` builds).
    """
    name = codebook_name(codebook_id)
    m, n = int(m), int(n)
    check_shape(m, n)
    su, sv = np.asarray(SU), np.asarray(SV)
    if su.shape != (n,) or sv.shape != (m,):
        raise ValueError(f"SU must have shape ({n},) and SV ({m},), got {su.shape} and {sv.shape}")
    _check_transforms(m, n)
    codes = unpack_qidxs(Qidxs, name, m, n)
    sv32 = _f32(sv)
    if Wscale is not None:
        ws = np.asarray(Wscale)
        if float(ws) != 1.0:
            prod = sv32 * _f32(ws)
            sv32 = _f32(prod.astype(sv.dtype) if np.issubdtype(sv.dtype, np.floating) else prod)
    su32 = _f32(su)
    if scaleWH is not None:
        su32 = _f32(su32 / _f32(scaleWH))
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
    if max(m, n) >= _MAX_DIM:
        raise ValueError(f"the official CUDA decoder handles dimensions below {_MAX_DIM}, got "
                         f"({m}, {n})")
    if tuple(ql.transforms) != ("hadamard", "hadamard"):
        raise ValueError(f"the layer uses the transforms {tuple(ql.transforms)}; the official "
                         "format runs randomized Hadamard transforms on both sides only "
                         "(quantize with --rotation=hadamard / auto on supported dimensions)")
    _check_transforms(m, n)
    dt = np.dtype(float_dtype)
    su = _f32(ql.SU)
    sv = _f32(ql.SV) * np.float32(sv_scale)
    out = {"Qidxs": pack_qidxs(np.asarray(ql.codes), name),
           "SU": su.astype(dt), "SV": sv.astype(dt),
           "Wscale": np.array(1.0, dt), "codebook_id": np.array(CODEBOOK_IDS[name], np.int64)}
    for k in ("SU", "SV"):
        if not np.isfinite(out[k]).all():
            raise ValueError(f"{k} overflows {dt.name}")
    return out


# ----------------------------------------------------------------------------- configs

def quip_params(codebook) -> dict:
    """The config.json `quip_params` of the official format for a codebook."""
    name = codebook_name(codebook)
    return {"codebook": name, "codebook_version": CODEBOOK_VERSIONS[name], "codesz": CODESZ,
            "idx_dtype": "torch.int64", "lora_rank": 0, "model_version": MODEL_VERSION,
            "packsz": _PACKSZ[name], "rescale_WH": False, "resid_scale_override": -1}


def official_config(spec, codebook, *, name_or_path: str = "", torch_dtype: str = "float16",
                    extra: Optional[dict] = None) -> dict:
    """config.json of the official format (a LlamaConfig plus quip_params) for a LlamaSpec."""
    _check_spec(spec)
    rope = None
    if spec.rope_scaling:
        sc = dict(spec.rope_scaling)
        rope = {"type": sc.get("rope_type", sc.get("type")), "factor": sc["factor"]}
    cfg = {
        "_name_or_path": name_or_path,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position,
        "model_type": "llama",
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "pretraining_tp": 1,
        "quip_params": quip_params(codebook),
        "rms_norm_eps": _short(spec.rms_eps),
        "rope_scaling": rope,
        "rope_theta": _short(spec.rope_theta),
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.40.1",      # the official requirements.txt
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if extra:
        cfg.update(extra)
    return cfg


def _short(x: float) -> float:
    """The shortest decimal of a float32 value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _check_spec(spec) -> None:
    """The architecture limits of the official model (model/llama.py)."""
    if spec.attention_bias or spec.mlp_bias:
        raise ValueError("the official quantized Llama has no biases; this model has "
                         f"attention_bias={spec.attention_bias}, mlp_bias={spec.mlp_bias}")
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        raise ValueError(f"the official model uses head_dim = hidden_size / num_heads; this model "
                         f"has head_dim {spec.head_dim} x {spec.num_heads} heads != hidden "
                         f"{spec.hidden_size}")
    if spec.rope_scaling:
        kind = dict(spec.rope_scaling).get("rope_type", dict(spec.rope_scaling).get("type"))
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"RoPE scaling {kind!r}: the official model supports only 'linear' "
                             "and 'dynamic'")


def _group_rows(spec, og: OfficialGroup) -> tuple:
    hd = spec.hidden_size // spec.num_heads           # as the official LlamaAttention
    return {"qkv": (spec.num_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd),
            "o": (spec.hidden_size,),
            "up": (spec.intermediate_size, spec.intermediate_size),
            "down": (spec.hidden_size,)}[og.name]


def _group_in(spec, og: OfficialGroup) -> int:
    return {"qkv": spec.hidden_size, "o": spec.hidden_size, "up": spec.hidden_size,
            "down": spec.intermediate_size}[og.name]


# ----------------------------------------------------------------------------- official folders

class OfficialFolder:
    """A Hugging Face folder in the official format: `config`, `quip_params`, `codebook`,
    `spec` (a LlamaSpec) and lazy `tensor(name)` (numpy, the stored dtype; bfloat16 read as
    float32)."""

    def __init__(self, path: str):
        from quipjax.models.llama import LlamaSpec
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face folder")
        with open(cfg_path) as f:
            self.config = json.load(f)
        qp = self.config.get("quip_params")
        if not qp:
            raise ValueError(f"{cfg_path} has no quip_params: not a quip-sharp quantized model "
                             "(an FP model is read by quipjax.models.loaders)")
        self.quip_params = qp
        self.codebook = codebook_name(qp.get("codebook"))
        self._check_params(qp)
        if self.config.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {self.config.get('model_type')!r}: the official format "
                             "holds Llama models (model/llama.py)")
        self.spec = LlamaSpec.from_hf(self.config)
        hd = self.spec.hidden_size // self.spec.num_heads
        if hd != self.spec.head_dim:     # the official model ignores a head_dim entry
            self.spec = dataclasses.replace(self.spec, head_dim=hd)
        from quipjax.models.loaders import safetensors_index
        self._where = safetensors_index(path)

    def _check_params(self, qp: dict) -> None:
        name = self.codebook
        v = qp.get("codebook_version", 0)
        if v != CODEBOOK_VERSIONS[name]:
            raise ValueError(f"{name} codebook version {v} in quip_params; the official code "
                             f"(and quipjax) read version {CODEBOOK_VERSIONS[name]}: the weights "
                             "predate the current packing; download the current release")
        if qp.get("model_version", MODEL_VERSION) != MODEL_VERSION:
            raise ValueError(f"model_version {qp.get('model_version')} != {MODEL_VERSION}")
        if qp.get("lora_rank", 0) not in (0, -1, None):
            raise ValueError(f"lora_rank {qp['lora_rank']}: low-rank corrections are not "
                             "supported (the official code removed them in 07/2024)")
        if qp.get("codesz", CODESZ) != CODESZ or qp.get("pack_out", False):
            raise ValueError(f"codesz {qp.get('codesz')} / pack_out {qp.get('pack_out')}: not an "
                             "E8P layout")
        if qp.get("idx_dtype", "torch.int64") != "torch.int64":
            raise ValueError(f"idx_dtype {qp['idx_dtype']}: E8P codes are stored as torch.int64")
        ps = qp.get("packsz")
        if ps is not None and abs(float(ps) - _PACKSZ[name]) > 1e-6:
            raise ValueError(f"packsz {ps} does not match {name} ({_PACKSZ[name]})")
        rso = qp.get("resid_scale_override", -1)
        if rso is not None and rso > 0 and name != "E8P12" and \
                abs(rso - _codebooks.get(name).resid_scale) > 1e-9:
            raise ValueError(f"resid_scale_override {rso}: quipjax's {name} uses the residual "
                             f"scale {_codebooks.get(name).resid_scale}")

    def names(self) -> list:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open
        if name not in self._where:
            raise KeyError(f"{name} is not in {self.path}")
        try:
            with safe_open(self._where[name], framework="numpy") as h:
                return h.get_tensor(name)
        except (TypeError, ValueError):     # bfloat16: numpy has no such dtype
            with safe_open(self._where[name], framework="flax") as h:
                return np.asarray(h.get_tensor(name).astype(jnp.float32))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for fn in sorted(set(self._where.values())) + [os.path.join(self.path, "config.json")]:
            st = os.stat(fn)
            h.update(f"{os.path.abspath(fn)}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]

    def group(self, layer: int, og: OfficialGroup):
        """The quipjax `QuantizedGroup` of one official module of a layer."""
        from quipjax.pipeline.checkpoint import QuantizedGroup
        spec = self.spec
        p = f"model.layers.{layer}.{og.module}."
        rows = _group_rows(spec, og)
        m, n = sum(rows), _group_in(spec, og)
        for extra in ("A", "B", "bias"):
            if self.has(p + extra):
                raise ValueError(f"{p + extra} is present: low-rank terms and biases are not "
                                 "supported")
        cid = self.tensor(p + "codebook_id")
        if int(cid) != CODEBOOK_IDS[self.codebook]:
            raise ValueError(f"{p}codebook_id is {int(cid)} but quip_params names "
                             f"{self.codebook} ({CODEBOOK_IDS[self.codebook]})")
        qidxs = self.tensor(p + "Qidxs")
        scale_wh = self.tensor(p + "scaleWH") if self.quip_params.get("rescale_WH") else None
        ql = to_quantized_linear(qidxs, self.tensor(p + "SU"), self.tensor(p + "SV"), int(cid),
                                 m, n, Wscale=self.tensor(p + "Wscale") if self.has(p + "Wscale")
                                 else None, scaleWH=scale_wh)
        if og.fused:
            fs = _f32(self.tensor(p + "fuse_scales"))
            if fs.shape != (len(og.members),):
                raise ValueError(f"{p}fuse_scales has shape {fs.shape}, expected "
                                 f"({len(og.members)},)")
        else:
            fs = np.ones((1,), np.float32)
        return QuantizedGroup(ql=ql, scales=jnp.asarray(fs), members=og.members, rows=rows), qidxs


def _tokenizer_ref(path: str, config: dict) -> dict:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if any(os.path.exists(os.path.join(path, f)) for f in names):
        return {"kind": "hf", "path": os.path.abspath(path)}
    src = config.get("_name_or_path") or ""
    if src and os.path.exists(src):      # a local HF folder or GGUF file
        return {"kind": "hf" if os.path.isdir(src) else "gguf", "path": os.path.abspath(src)}
    return {"kind": "hf", "path": os.path.abspath(path), "name_or_path": src}


def _prepare_out(path: str, overwrite: bool, marker: str) -> None:
    if os.path.exists(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it")
        if not os.path.exists(os.path.join(path, marker)):
            raise FileExistsError(f"{path} is not empty and has no {marker}: refusing to delete "
                                  "a folder this converter did not write")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def import_folder(folder: str, out_dir: str, *, verify: bool = True, overwrite: bool = False,
                  verify_flops: float = 2e10, log: Callable = print) -> dict:
    """An official-format Hugging Face folder -> a quipjax checkpoint in out_dir.

    Every layer is checked after writing (verify=True): read back from out_dir, it must equal
    what was written; its codes must decode to the values read straight from the official
    words (`reference_decode`: exact for E8P, 1e-6 for the RVQ residual's float32 division);
    and for layers with m n (m + n) <= verify_flops the dequantized weight must be finite and
    match the official formula computed in float64 with dense Hadamard matrices
    (`reference_dequantize`, times fuse_scales) to 1e-5 relative.
    Returns a summary dict (layers, codebook, max relative error seen).
    """
    from quipjax.models.adapter import LLAMA
    from quipjax.pipeline import checkpoint as ckpt
    src = OfficialFolder(folder)
    spec = src.spec
    _prepare_out(out_dir, overwrite, "quipjax.json")
    meta = {"model": spec.to_dict(), "tokenizer": _tokenizer_ref(folder, src.config),
            "adapter": LLAMA.name, "quantized_linears": [m for og in OFFICIAL_GROUPS
                                                         for m in og.members],
            "settings": {"codebook": src.codebook, "scale": None, "sigma_reg": None,
                         "tune_iters": None, "rotation": "hadamard", "rounding": None, "seed": 0},
            "source": {"path": os.path.abspath(folder), "kind": "quip-sharp",
                       "fingerprint": src.fingerprint()},
            "imported": {"format": "quip-sharp", "quip_params": src.quip_params,
                         "name_or_path": src.config.get("_name_or_path", "")}}
    ckpt.write_meta(out_dir, meta)
    g = {"embed_tokens": _f32(src.tensor("model.embed_tokens.weight")),
         "norm": _f32(src.tensor("model.norm.weight"))}
    if not spec.tie_embeddings:
        g["lm_head"] = _f32(src.tensor("lm_head.weight"))
    ckpt.save_globals(out_dir, g)
    worst, checked, total = 0.0, 0, 0
    for i in range(spec.num_layers):
        groups, raw = {}, {}
        for og in OFFICIAL_GROUPS:
            groups[og.name], raw[og.name] = src.group(i, og)
        p = f"model.layers.{i}."
        norms = {k: _f32(src.tensor(p + k)) for k in ("input_layernorm.weight",
                                                        "post_attention_layernorm.weight")}
        ckpt.save_layer(out_dir, i, groups, norms, {"imported_from": "quip-sharp"})
        if verify:
            back, _, _ = ckpt.load_layer(out_dir, i)
            for og in OFFICIAL_GROUPS:
                err, did = _verify_group(back[og.name], groups[og.name], raw[og.name],
                                         src.codebook, verify_flops, f"layer {i} {og.module}")
                worst, checked, total = max(worst, err), checked + did, total + 1
        if log:
            log(f"imported layer {i + 1}/{spec.num_layers}")
    out = {"layers": spec.num_layers, "codebook": src.codebook, "verified": bool(verify),
           "dense_checked_groups": checked, "groups": total, "max_rel_err": worst}
    if log:
        log(f"imported {folder} -> {out_dir}: {json.dumps(out)}")
    return out


def _verify_group(back, group, qidxs, codebook, verify_flops, what) -> tuple:
    m, n = back.ql.shape
    if not (np.array_equal(np.asarray(back.ql.codes), np.asarray(group.ql.codes))
            and np.array_equal(np.asarray(back.ql.SU), np.asarray(group.ql.SU))
            and np.array_equal(np.asarray(back.ql.SV), np.asarray(group.ql.SV))
            and np.array_equal(np.asarray(back.scales), np.asarray(group.scales))):
        raise RuntimeError(f"{what}: the written checkpoint does not read back identically")
    if not np.isfinite(np.asarray(back.scales)).all():
        raise RuntimeError(f"{what}: fuse_scales hold NaN/Inf")
    cb = _codebooks.get(codebook)
    codes = np.asarray(back.ql.codes)
    step = 16 * max(1, (1 << 22) // (16 * n))      # bounded memory: blocks of 16-row tiles
    for r in range(0, m, step):                     # stored rows [r, r+k) = weight rows
        k = min(step, m - r)
        ours = np.asarray(cb.decode(codes[r:r + k]), np.float64).reshape(k, n)
        # E8P values are exact (multiples of 1/4); RVQ adds stage2 / resid_scale in float32
        if np.abs(ours - reference_decode(qidxs[r:r + k], codebook, k, n)).max() > 1e-6:
            raise RuntimeError(f"{what}: codes decode differently from the official words")
    if m * n * (m + n) > verify_flops:
        return 0.0, 0
    W = np.concatenate([np.asarray(w, np.float64) for w in back.dequantize_members()], 0)
    ref = reference_dequantize(qidxs, np.asarray(back.ql.SU), np.asarray(back.ql.SV), codebook,
                               m, n)
    ref = ref * np.repeat(np.asarray(back.scales, np.float64), back.rows)[:, None]
    err = float(np.linalg.norm(W - ref) / max(np.linalg.norm(ref), 1e-30))
    if not np.isfinite(W).all() or err > 1e-5:
        raise RuntimeError(f"{what}: dequantized weight differs from the official formula "
                           f"(relative error {err:.3g})")
    return err, 1


# ----------------------------------------------------------------------------- export

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                    "generation_config.json")


class _ShardWriter:
    """Writes safetensors shards of at most max_bytes (HF names and index)."""

    def __init__(self, path: str, max_bytes: float):
        self.path, self.max_bytes = path, max_bytes
        self.cur, self.cur_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:        # (np.ascontiguousarray would make 0-d arrays 1-d)
            arr = arr.copy()
        if self.cur and self.cur_bytes + arr.nbytes > self.max_bytes:
            self._flush()
        self.cur[name] = arr
        self.cur_bytes += arr.nbytes
        self.total += arr.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file
        fn = os.path.join(self.path, f"shard-{len(self.files):05d}.tmp")
        save_file(self.cur, fn, metadata={"format": "pt"})
        self.files.append((fn, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def close(self) -> list:
        if self.cur or not self.files:
            self._flush()
        k = len(self.files)
        if k == 1:
            os.replace(self.files[0][0], os.path.join(self.path, "model.safetensors"))
            return ["model.safetensors"]
        names = []
        for j, (fn, keys) in enumerate(self.files):
            name = f"model-{j + 1:05d}-of-{k:05d}.safetensors"
            os.replace(fn, os.path.join(self.path, name))
            names.append(name)
            self.weight_map.update({key: name for key in keys})
        with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
                      f, indent=2, sort_keys=True)
        return names


def export_checkpoint(ckpt_dir: str, out_folder: str, *, float_dtype: str = "float16",
                      name_or_path: Optional[str] = None, max_shard_bytes: float = 5e9,
                      overwrite: bool = False, log: Callable = print) -> dict:
    """A quipjax checkpoint -> a Hugging Face folder in the official format.

    Uses the end-to-end tuned SU/SV and norms when the checkpoint has them. float_dtype:
    "float16" (the official files; SU, SV, scales, norms and embeddings are rounded to fp16)
    or "float32" (quipjax-only: lossless, same names and layout). name_or_path: written as
    config `_name_or_path`, where the official loader takes the tokenizer from (default: the
    tokenizer files copied into the folder when the source is a HF folder, else the source).
    """
    from quipjax.models.llama import LlamaSpec
    from quipjax.pipeline import checkpoint as ckpt
    if float_dtype not in ("float16", "float32"):
        raise ValueError(f"float_dtype must be 'float16' (official) or 'float32', got {float_dtype!r}")
    dt = np.dtype(float_dtype)
    meta = ckpt.read_meta(ckpt_dir)
    if meta.get("adapter", "llama") != "llama":
        raise ValueError(f"adapter {meta.get('adapter')!r}: the official format holds Llama models")
    spec = LlamaSpec.from_dict(meta["model"])
    _check_spec(spec)
    e2e = ckpt.load_e2e(ckpt_dir)
    glob_ = ckpt.load_globals(ckpt_dir)
    if e2e is not None:
        glob_.update(e2e[1])

    # every layer is checked before anything is written
    codebook = None
    for i in range(spec.num_layers):
        if not ckpt.layer_done(ckpt_dir, i):
            raise FileNotFoundError(f"layer {i} of {ckpt_dir} is missing: the checkpoint is "
                                    "incomplete (finish the quantization run first)")
        with open(os.path.join(ckpt_dir, "layers", f"layer_{i:03d}.json")) as f:
            info = json.load(f)
        for og in OFFICIAL_GROUPS:
            gm = info["groups"].get(og.name)
            if gm is None:
                raise ValueError(f"layer {i} has no quantized {og.name} group: the official "
                                 "format needs all seven linears quantized")
            if tuple(gm["members"]) != og.members:
                raise ValueError(
                    f"layer {i} group {og.name!r} stacks {tuple(gm['members'])}; the official "
                    f"{og.module} stacks {og.members} in that order. Rows cannot be reordered "
                    "after the randomized Hadamard transform: quantize the model again with "
                    "the current quipjax (whose Llama adapter uses the official order)")
            if tuple(gm["rows"]) != _group_rows(spec, og):
                raise ValueError(f"layer {i} {og.name}: rows {gm['rows']} != official "
                                 f"{_group_rows(spec, og)}")
            if codebook is None:
                codebook = codebook_name(gm["codebook"])
            elif gm["codebook"] != codebook:
                raise ValueError(f"layer {i} {og.name} uses {gm['codebook']} and others "
                                 f"{codebook}: the official config holds one codebook per model")
            m, n = gm["shape"]
            check_shape(m, n)
            if tuple(gm["transforms"]) != ("hadamard", "hadamard"):
                raise ValueError(f"layer {i} {og.name}: transforms {gm['transforms']}; the "
                                 "official format needs Hadamard transforms on both sides")
            _check_transforms(m, n)

    _prepare_out(out_folder, overwrite, "config.json")
    tok = meta.get("tokenizer") or {}
    tok_dir = tok.get("path") if tok.get("kind") == "hf" else None
    copied = []
    if tok_dir and os.path.isdir(tok_dir):
        for fn in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(tok_dir, fn)):
                shutil.copy(os.path.join(tok_dir, fn), os.path.join(out_folder, fn))
                copied.append(fn)
    if name_or_path is None:
        name_or_path = ((meta.get("imported") or {}).get("name_or_path")
                        or (os.path.abspath(out_folder) if copied else
                            (meta.get("source") or {}).get("path", "")))
    cfg = official_config(spec, codebook, name_or_path=name_or_path, torch_dtype=float_dtype)

    w = _ShardWriter(out_folder, max_shard_bytes)

    def fp(name, arr):
        a = np.asarray(arr, np.float32).astype(dt)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} overflows {float_dtype}")
        w.add(name, a)

    fp("model.embed_tokens.weight", glob_["embed_tokens"])
    for i in range(spec.num_layers):
        groups, norms = ckpt.load_layer_tuned(ckpt_dir, i, e2e)
        p = f"model.layers.{i}."
        for og in OFFICIAL_GROUPS:
            g = groups[og.name]
            scales = np.asarray(g.scales, np.float32)
            t = from_quantized_linear(g.ql, sv_scale=1.0 if og.fused else float(scales[0]),
                                      float_dtype=dt)
            if og.fused:
                t["fuse_scales"] = scales.astype(dt)
            for k in ("Qidxs", "SU", "SV", "Wscale", "codebook_id", "fuse_scales"):
                if k in t:
                    w.add(p + og.module + "." + k, t[k])
        for k in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            fp(p + k, norms[k])
        extra = set(norms) - {"input_layernorm.weight", "post_attention_layernorm.weight"}
        if extra:
            raise ValueError(f"layer {i} has FP parameters the official model lacks: {sorted(extra)}")
        if log:
            log(f"exported layer {i + 1}/{spec.num_layers}")
    fp("model.norm.weight", glob_["norm"])
    if not spec.tie_embeddings:
        fp("lm_head.weight", glob_["lm_head"])
    files = w.close()
    with open(os.path.join(out_folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    out = {"folder": out_folder, "codebook": codebook, "layers": spec.num_layers,
           "files": files, "bytes": w.total, "float_dtype": float_dtype,
           "tokenizer_files": copied, "name_or_path": name_or_path}
    if log:
        log(f"exported {ckpt_dir} -> {out_folder}: {json.dumps(out)}")
    return out


# ----------------------------------------------------------------------------- checks

def checkpoint_logits(ckpt_dir: str, tokens, dtype=jnp.float32) -> np.ndarray:
    """Logits (T, vocab) float32 of a quipjax checkpoint on one token sequence (T,)."""
    from quipjax.pipeline.checkpoint import read_meta
    from quipjax.pipeline.quantize_model import build_quantized_model
    model = build_quantized_model(ckpt_dir, read_meta(ckpt_dir), dtype)
    return np.asarray(model(jnp.asarray(np.asarray(tokens, np.int32))[None]))[0]
