"""Decode-matmul kernels: y = x @ Q^T straight from E8P codes, in the rotated basis.

    y = decode_matmul(x, codes, "E8P12")      # x (..., n), codes (m, n // 8) uint16 -> (..., m)

`Q` is the decoded code matrix (m, n) of `QuantizedLinear.decode_rotated()`; rotations, SU
and SV stay outside (`QuantizedLinear.apply`). Backends:

| backend            | where                | what                                              |
|--------------------|----------------------|---------------------------------------------------|
| "pallas"           | GPU (Triton)         | `kernels.pallas_e8p`: decode in registers, fp32 acc |
| "pallas_interpret" | anywhere (tests)     | the same kernels run by the Pallas interpreter    |
| "xla"              | CPU and the rest     | `kernels.xla_decode`: the fastest plain-JAX path  |
| "reference"        | anywhere             | full table decode, then one float32 matmul        |

"auto" picks "pallas" when the default backend is a GPU and "xla" otherwise.

Each backend may keep the codes in its own memory layout (padded, reordered, expanded):
`prepare(codes, codebook, backend)` converts once (at model load) and returns a `Prepared`
pytree; `prepared_matmul(x, prepared)` is the per-call work. `decode_matmul` does both.
A backend module provides `prepare(codes, codebook_name) -> dict of arrays` and
`matmul(x, arrays, codebook_name, shape) -> (..., m) float32`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Tuple

import jax
import jax.numpy as jnp

from quipjax import codebooks as _codebooks

__all__ = ["decode_matmul", "reference_decode_matmul", "pick_backend", "prepare",
           "prepared_matmul", "Prepared", "KERNEL_CODEBOOKS", "stage_table"]

# Codebooks with in-kernel decoders (the E8P family); the others use the reference path.
KERNEL_CODEBOOKS = ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B")
_BACKENDS = ("auto", "pallas", "pallas_interpret", "xla", "reference")


def stage_table() -> dict:
    """{codebook name: (stage-2 kind "e8p" / "e81b" or None, residual scale)} of the kernel
    codebooks, read off `quipjax.codebooks` (stage 1 is always E8P)."""
    kinds = {"E8P12": "e8p", "E81B": "e81b"}
    out = {}
    for name in KERNEL_CODEBOOKS:
        cb = _codebooks.get(name)
        stage2 = getattr(cb, "stage2", None)
        out[name] = (None, 1.0) if stage2 is None else (kinds[stage2.name], float(cb.resid_scale))
    return out


def pick_backend(backend: str = "auto") -> str:
    """Resolve "auto": "pallas" on a GPU, "xla" elsewhere."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown decode-matmul backend {backend!r}; one of {_BACKENDS}")
    if backend != "auto":
        return backend
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def reference_decode_matmul(x: jax.Array, codes: jax.Array, codebook) -> jax.Array:
    """x (..., n) float -> x @ decode(codes)^T (..., m) float32 (decode everything, then matmul).

    codes: (m, n // dim) + code_shape, as `QuantizedLinear.codes`.
    """
    cb = _codebooks.get(codebook)
    m = codes.shape[0]
    Q = cb.decode(codes).reshape(m, -1)
    return jnp.einsum("...n,mn->...m", jnp.asarray(x, jnp.float32), Q,
                      precision=jax.lax.Precision.HIGHEST)


def _check(x, codes, cb):
    n = codes.shape[1] * cb.dim
    if x.shape[-1] != n:
        raise ValueError(f"decode_matmul: x has last dimension {x.shape[-1]}, codes of shape "
                         f"{codes.shape} ({cb.name}) describe n = {n}")
    want = (codes.shape[0], codes.shape[1]) + tuple(cb.code_shape)
    if tuple(codes.shape) != want:
        raise ValueError(f"decode_matmul: {cb.name} codes must have shape (m, n/8)"
                         f"{'+' + str(tuple(cb.code_shape)) if cb.code_shape else ''}, "
                         f"got {codes.shape}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["backend", "codebook", "shape"])
@dataclasses.dataclass(frozen=True)
class Prepared:
    """Codes in a backend's layout. arrays: dict of arrays; shape: (m, n) of Q."""

    arrays: dict
    backend: str
    codebook: str
    shape: Tuple[int, int]


_MODULES = {"pallas": "quipjax.kernels.pallas_e8p", "pallas_interpret": "quipjax.kernels.pallas_e8p",
            "xla": "quipjax.kernels.xla_decode"}


def _resolve(cb, backend):
    be = pick_backend(backend)
    return "reference" if cb.name not in KERNEL_CODEBOOKS else be


def prepare(codes: jax.Array, codebook, backend: str = "auto") -> Prepared:
    """Convert plain codes (m, n/8[, 2]) uint16 to `backend`'s layout (do it once per model)."""
    cb = _codebooks.get(codebook)
    be = _resolve(cb, backend)
    m, n = codes.shape[0], codes.shape[1] * cb.dim
    if be == "reference":
        arrays = {"codes": jnp.asarray(codes)}
    else:
        arrays = importlib.import_module(_MODULES[be]).prepare(codes, cb.name)
    return Prepared(arrays, be, cb.name, (m, n))


def prepared_matmul(x: jax.Array, prepared: Prepared) -> jax.Array:
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32."""
    m, n = prepared.shape
    if x.shape[-1] != n:
        raise ValueError(f"decode_matmul: x has last dimension {x.shape[-1]}, the codes describe "
                         f"a ({m}, {n}) matrix")
    if prepared.backend == "reference":
        return reference_decode_matmul(x, prepared.arrays["codes"], prepared.codebook)
    mod = importlib.import_module(_MODULES[prepared.backend])
    if prepared.backend.startswith("pallas"):
        return mod.matmul(x, prepared.arrays, prepared.codebook, prepared.shape,
                          interpret=prepared.backend == "pallas_interpret")
    return mod.matmul(x, prepared.arrays, prepared.codebook, prepared.shape)


def decode_matmul(x: jax.Array, codes: jax.Array, codebook, *, backend: str = "auto") -> jax.Array:
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32, Q decoded from `codes`.

    codes: (m, n // 8) uint16 (E8P12) or (m, n // 8, 2) uint16 (the RVQ codebooks), the plain
    layout of `QuantizedLinear.codes`. Works under jit and vmap. backend: see the module table.
    """
    cb = _codebooks.get(codebook)
    _check(x, codes, cb)
    return prepared_matmul(x, prepare(codes, cb, backend))
