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

Kernels exist for the E8P codebooks (`KERNEL_CODEBOOKS`). "auto" picks "pallas" when the
default backend is a GPU and "xla" otherwise; for the trellis codebooks (`TRELLIS_CODEBOOKS`)
it picks their "xla" decoder (`kernels.xla_trellis`) on every platform, their Pallas kernels
(`kernels.pallas_trellis`) run when asked for by name (not yet run on a GPU); for the other
codebooks (HI2/3/4, E81B) it picks "reference". An explicit "pallas", "pallas_interpret" or "xla" for a codebook without a kernel
is an error.

Under "auto" on a GPU, the first use of each kernel configuration (codebook, input dtype class
bfloat16 / float16 / float32, matvec or batch kernel) in the process runs the Pallas kernel
and `reference_decode_matmul` on a fixed random 96 x 1024 case (seed 0). If they differ
by more than the worst-case float32 rounding bound of the sums (or the kernel raises), a
one-line warning names the configuration and that configuration runs on the "xla" backend
from then on (its codes converted from the Pallas layout inside each call). An explicit
backend="pallas" is never checked.

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
import math
import warnings
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks as _codebooks

__all__ = ["decode_matmul", "reference_decode_matmul", "pick_backend", "prepare",
           "prepared_matmul", "Prepared", "KERNEL_CODEBOOKS", "TRELLIS_CODEBOOKS", "stage_table"]

# Codebooks with in-kernel decoders (the E8P family); the others run on "auto" / "reference".
KERNEL_CODEBOOKS = ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B")
# The trellis codes: an "xla" decoder (`kernels.xla_trellis`, what "auto" picks everywhere
# until the Pallas kernels have run on a GPU) and Pallas kernels (`kernels.pallas_trellis`,
# explicit backend="pallas" / "pallas_interpret")
TRELLIS_CODEBOOKS = tuple(n for n in _codebooks.names()
                           if isinstance(_codebooks.get(n), _codebooks.TrellisCodebook))
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


def _platform() -> str:
    """The platform "auto" chooses for: `jax.default_backend()` ("gpu", "cpu", "tpu")."""
    return jax.default_backend()


def pick_backend(backend: str = "auto") -> str:
    """Resolve "auto" for the kernel codebooks: "pallas" on a GPU, "xla" elsewhere."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown decode-matmul backend {backend!r}; one of {_BACKENDS}")
    if backend != "auto":
        return backend
    return "pallas" if _platform() == "gpu" else "xla"


def reference_decode_matmul(x: jax.Array, codes: jax.Array, codebook, table=None) -> jax.Array:
    """x (..., n) float -> x @ decode(codes)^T (..., m) float32 (decode everything, then matmul).

    codes: the codebook's `codes_shape(m, n)` ((m, n // dim) + code_shape for the vector
    codebooks), as `QuantizedLinear.codes`; table: `QuantizedLinear.table` (a tuned HYB table)
    or None.
    """
    cb = _codebooks.get(codebook)
    Q = cb.decode_matrix(codes, *cb.matrix_shape(codes.shape), table)
    return jnp.einsum("...n,mn->...m", jnp.asarray(x, jnp.float32), Q,
                      precision=jax.lax.Precision.HIGHEST)


def _check(x, codes, cb):
    m, n = cb.matrix_shape(codes.shape)
    if x.shape[-1] != n:
        raise ValueError(f"decode_matmul: x has last dimension {x.shape[-1]}, codes of shape "
                         f"{codes.shape} ({cb.name}) describe n = {n}")
    want = cb.codes_shape(m, n)
    if tuple(codes.shape) != tuple(want):
        raise ValueError(f"decode_matmul: {cb.name} codes must have shape {tuple(want)} for an "
                         f"({m}, {n}) weight, got {codes.shape}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["backend", "codebook", "shape", "verify"])
@dataclasses.dataclass(frozen=True)
class Prepared:
    """Codes in a backend's layout. arrays: dict of arrays; shape: (m, n) of Q; verify: True
    when "auto" chose "pallas" (each kernel configuration is checked on first use, see the
    module docstring)."""

    arrays: dict
    backend: str
    codebook: str
    shape: Tuple[int, int]
    verify: bool = False


_MODULES = {"pallas": "quipjax.kernels.pallas_e8p", "pallas_interpret": "quipjax.kernels.pallas_e8p",
            "xla": "quipjax.kernels.xla_decode"}


def _module(backend: str, codebook: str):
    """The backend module that runs `codebook` on `backend`."""
    if codebook in TRELLIS_CODEBOOKS:
        return importlib.import_module("quipjax.kernels.xla_trellis" if backend == "xla"
                                       else "quipjax.kernels.pallas_trellis")
    return importlib.import_module(_MODULES[backend])


def _resolve(cb, backend):
    be = pick_backend(backend)
    if cb.name in KERNEL_CODEBOOKS:
        return be
    if cb.name in TRELLIS_CODEBOOKS:
        return "xla" if backend == "auto" else be
    if backend in ("auto", "reference"):
        return "reference"
    raise ValueError(f"decode-matmul backend {backend!r} has no kernel for codebook {cb.name} "
                     f"(kernels exist for {', '.join(KERNEL_CODEBOOKS)} and "
                     f"{', '.join(TRELLIS_CODEBOOKS)}); use backend='auto' "
                     f"or backend='reference' (decode, then one matmul)")


# Kernel configurations checked under "auto" on a GPU: (codebook, x dtype, "matvec" / "batch")
# -> True if the Pallas kernel matched the reference.
_VERDICTS: dict = {}
_CHECK_SHAPE = (96, 1024)        # rows padded to 128; 128 codes per row: several K steps
_CHECK_BATCH = {"matvec": 1, "batch": 3}


def _kernel_config(x, prepared) -> tuple:
    """(codebook, input dtype class, kernel) of a call: the key of `_VERDICTS`."""
    dt = jnp.dtype(x.dtype)
    dt = dt.name if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "float32"
    return prepared.codebook, dt, "matvec" if math.prod(x.shape[:-1]) == 1 else "batch"


def _check_codes(rng, codebook, m, kc) -> np.ndarray:
    """Uniformly random plain codes (m, kc[, 2]) uint16 of a kernel codebook."""
    kind = stage_table()[codebook][0]
    if kind is None:
        return rng.integers(0, 1 << 16, (m, kc)).astype(np.uint16)
    c2 = rng.integers(0, 256 if kind == "e81b" else 1 << 16, (m, kc))
    return np.stack([rng.integers(0, 1 << 16, (m, kc)), c2], -1).astype(np.uint16)


def _check_pallas(codebook: str, dtype: str, kernel: str) -> str | None:
    """Run the Pallas kernel and the reference on a fixed random case; None if they agree,
    else what went wrong (one line)."""
    m, n = _CHECK_SHAPE
    rng = np.random.default_rng(0)
    codes = _check_codes(rng, codebook, m, n // 8)
    x = rng.standard_normal((_CHECK_BATCH[kernel], n)).astype(np.float32)
    cb = _codebooks.get(codebook)
    pallas = importlib.import_module(_MODULES["pallas"])

    def run(x, codes):
        xd = x.astype(dtype)
        y = pallas.matmul(xd, pallas.prepare(codes, codebook), codebook, (m, n), interpret=False)
        ref = reference_decode_matmul(xd, codes, codebook)
        # bound on the rounding of both sides: every product and partial sum of magnitudes
        # |x| (|q| + 1/2) per stage (1/2 covers the matvec's separate +-1/4 shift term)
        if getattr(cb, "stage2", None) is None:
            mag = jnp.abs(cb.decode(codes)) + 0.5
        else:
            mag = (jnp.abs(cb.stage1.decode(codes[..., 0])) + 0.5
                   + (jnp.abs(cb.stage2.decode(codes[..., 1])) + 0.5) / cb.resid_scale)
        a = jnp.abs(xd.astype(jnp.float32)) @ mag.reshape(m, n).T
        return y, ref, a

    try:
        # compiled and called outside any trace: the first use may be inside jit or vmap
        y, ref, a = (np.asarray(v, np.float64)
                     for v in jax.jit(run).lower(x, codes).compile()(x, codes))
    except Exception as e:                          # e.g. a Triton compile error
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    u = 2.0 ** -24
    k = n + 16
    tol = 2.0 * (k * u / (1.0 - k * u)) * a
    excess = np.abs(y - ref) - tol
    if np.all(excess <= 0):
        return None
    return (f"differs from reference_decode_matmul by up to {float(np.abs(y - ref).max()):.3g} "
            f"(float32 rounding bound {float(tol.max()):.3g})")


def _pallas_verified(config: tuple) -> bool:
    """The cached verdict on a kernel configuration; checks it (and warns) on first use."""
    if config not in _VERDICTS:
        problem = _check_pallas(*config)
        _VERDICTS[config] = problem is None
        if problem is not None:
            codebook, dtype, kernel = config
            warnings.warn(f"quipjax.kernels: the Pallas {kernel} kernel for {codebook} with "
                          f"{dtype} inputs {problem} on a {_CHECK_SHAPE[0]}x{_CHECK_SHAPE[1]} "
                          f"test case; backend='auto' uses 'xla' for this configuration",
                          RuntimeWarning, stacklevel=3)
    return _VERDICTS[config]


def _xla_from_pallas_layout(x, prepared):
    """x @ Q^T by the "xla" backend from codes in the Pallas layout (plain codes, padded)."""
    m, n = prepared.shape
    a = prepared.arrays
    codes = a["c1"][:m, :n // 8]
    if "c2" in a:
        codes = jnp.stack([codes, a["c2"][:m, :n // 8].astype(jnp.uint16)], -1)
    mod = importlib.import_module(_MODULES["xla"])
    return mod.matmul(x, mod.prepare(codes, prepared.codebook), prepared.codebook, prepared.shape)


def prepare(codes: jax.Array, codebook, backend: str = "auto", table=None) -> Prepared:
    """Convert plain codes (m, n/8[, 2]) uint16 to `backend`'s layout (do it once per model).
    table: a tuned value table (`QuantizedLinear.table`, HYB codebooks) or None.

    Raises ValueError for an explicit kernel backend and a codebook without a kernel.
    """
    cb = _codebooks.get(codebook)
    cb.check_table(table)
    be = _resolve(cb, backend)
    m, n = cb.matrix_shape(codes.shape)
    if be == "reference":
        arrays = {"codes": jnp.asarray(codes)}
    else:
        arrays = _module(be, cb.name).prepare(codes, cb.name)
    if table is not None:           # only the trellis codes have one: "reference" or "xla"
        arrays["table"] = jnp.asarray(table, jnp.float32)
    return Prepared(arrays, be, cb.name, (m, n), verify=backend == "auto" and be == "pallas")


def prepared_matmul(x: jax.Array, prepared: Prepared) -> jax.Array:
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32."""
    m, n = prepared.shape
    if x.shape[-1] != n:
        raise ValueError(f"decode_matmul: x has last dimension {x.shape[-1]}, the codes describe "
                         f"a ({m}, {n}) matrix")
    if prepared.backend == "reference":
        return reference_decode_matmul(x, prepared.arrays["codes"], prepared.codebook,
                                       prepared.arrays.get("table"))
    if prepared.verify and not _pallas_verified(_kernel_config(x, prepared)):
        return _xla_from_pallas_layout(x, prepared)
    mod = _module(prepared.backend, prepared.codebook)
    if prepared.backend.startswith("pallas"):
        return mod.matmul(x, prepared.arrays, prepared.codebook, prepared.shape,
                          interpret=prepared.backend == "pallas_interpret")
    return mod.matmul(x, prepared.arrays, prepared.codebook, prepared.shape)


def decode_matmul(x: jax.Array, codes: jax.Array, codebook, *, backend: str = "auto",
                  table=None) -> jax.Array:
    """x (..., n) float32/bfloat16/float16 -> x @ Q^T (..., m) float32, Q decoded from `codes`.

    codes: the plain layout of `QuantizedLinear.codes`: (m, n // 8) uint16 (E8P12),
    (m, n // 8, 2) uint16 (the RVQ codebooks), (m / 16, n / 16, 16 K) uint16 (the trellis
    codes); table: `QuantizedLinear.table` or None. Works under jit and vmap. backend: see the
    module table.
    """
    cb = _codebooks.get(codebook)
    _check(x, codes, cb)
    return prepared_matmul(x, prepare(codes, cb, backend, table))
