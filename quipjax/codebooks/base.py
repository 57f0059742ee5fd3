"""The codebook interface every quantizer in `quipjax.codebooks` implements.

A codebook is a frozen (hashable) dataclass, so it can be passed to `jax.jit` as a static
argument, like an optax transformation is passed to a training loop. Subclasses implement
`quantize_t` (coordinates-first "struct of arrays" layout, the fast path used inside
BlockLDLQ) and `decode`, and set `search` to one of `SEARCHES`:
  "exact": `quantize_t` returns a nearest codeword of every vector;
  "greedy": it searches stage by stage (the residual codebooks: each stage's point is the
    nearest to what the earlier stages left, which need not make the sum the nearest
    codeword);
  "beam": a residual codebook with `beam` > 1 (`quipjax.codebooks.rvq.RVQ`): the `beam`
    nearest stage-1 points of each vector, each followed by the exact stage-2 search of its
    residual, the pair of least squared error kept. Never worse than "greedy" (greedy's pair
    is one of the candidates), and a nearest codeword whenever a nearest codeword's stage-1
    point is among the `beam` nearest stage-1 points.
  "tail-biting": the trellis codes (`quipjax.codebooks.trellis`): QTIP's two-pass search,
    a least-error trellis path among those that start and end on the
    overlap a first pass chose (exact for that overlap, not over every overlap).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


SEARCHES = ("exact", "greedy", "beam", "tail-biting")   # meanings: the module docstring


@dataclasses.dataclass(frozen=True)
class Codebook:
    """Base class.

    Attributes:
      name: registry name ("E8P12", ...).
      dim: vector dimension of one code (8 for the E8 codebooks, 1 for scalar grids).
      bits_per_weight: code bits per weight.
      opt_scale: RMS of the input that minimizes MSE on unit Gaussian data (the official
        codebook's `opt_scale`).
      default_scale: the rho `quantize_linear` uses when `scale=None` (the official README's
        recommendation; 0.9 for E8P12, which beats 1.03 on real layers).
      code_shape: trailing shape of the codes of one vector (() or (stages,)).
      code_dtype: numpy dtype of the codes.
      search: what `quantize_t` (and so `quantize`, `__call__`, BlockLDLQ) finds: "exact" (a
        nearest codeword of each vector), "greedy" (stage by stage; `quipjax.codebooks.rvq`)
        nearest codeword of each vector), "greedy" (stage by stage; `quipjax.codebooks.rvq`),
        "beam" (an RVQ codebook's beam search) or "tail-biting" (the trellis codes); the
        module docstring says what each finds.
    """

    name: str
    dim: int
    bits_per_weight: float
    opt_scale: float
    default_scale: float
    code_shape: Tuple[int, ...]
    code_dtype: type
    search: str

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"codebook {self.name}: search={self.search!r} is not one of "
                             f"{SEARCHES}; set search='exact' if quantize_t returns a nearest "
                             f"codeword of every vector, else search='greedy' (stage by stage) "
                             f"or 'beam' (an RVQ beam search)")

    # -- to implement -------------------------------------------------------------------
    def quantize_t(self, xt: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Coordinates-first search: the codes and codewords of the N columns of xt.

        xt (dim, N) float32 (or float64) -> (codes (N,) + code_shape of dtype code_dtype,
        xhat (dim, N) in xt's dtype, column n the codeword of codes[n]). The search is the
        one `search` names.
        """
        raise NotImplementedError

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes (...,) + code_shape -> (..., dim) float32 codewords. Implementations call
        `validate_codes` first."""
        raise NotImplementedError

    # -- code validation ----------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        """Number of codes of one vector, 2^(bits_per_weight * dim) (codes 0..num_codes - 1
        for a one-stage codebook)."""
        return 2 ** round(self.bits_per_weight * self.dim)

    def validate_codes(self, codes) -> None:
        """Raise a ValueError naming the codebook, the valid range, the count and the first
        bad value when concrete codes (...,) + code_shape are out of range. Skipped for
        traced codes (inside jit / vmap): there an out-of-range code decodes to a clamped
        index (a valid but wrong codeword) or a wrong value, without an error."""
        check_codes(codes, self.num_codes, self.name)

    # -- how a weight matrix is laid out (BlockLDLQ) --------------------------------------
    # A vector codebook rounds each row of a block of `block` columns in vectors of `dim`;
    # a codebook of 2-D tiles (the trellis codes) overrides these four.
    @property
    def block(self) -> int:
        """Columns of one BlockLDLQ block (and of the block LDL of the Hessian)."""
        return 8

    def quantize_block(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Round one block, columns leading: x (block, m) float -> (codes (m, block // dim) +
        code_shape, xhat (block, m) in x's dtype)."""
        b, d, m = self.block, self.dim, x.shape[1]
        xt = x.reshape(b // d, d, m).transpose(1, 0, 2).reshape(d, -1)
        codes, xh = self.quantize_t(xt)
        codes = jnp.moveaxis(codes.reshape((b // d, m) + self.code_shape), 0, 1)
        return codes, xh.reshape(d, b // d, m).transpose(1, 0, 2).reshape(b, m)

    def codes_shape(self, m: int, n: int) -> tuple:
        """Shape of the codes of an (m, n) weight: (m, n // dim) + code_shape."""
        return (m, n // self.dim) + self.code_shape

    def decode_matrix(self, codes: jax.Array, m: int, n: int, table=None) -> jax.Array:
        """Codes of `codes_shape(m, n)` -> the (m, n) float32 matrix they stand for. table: a
        tuned value table (codebooks with `has_table` only; None: the codebook's own)."""
        self.check_table(table)
        return self.decode(codes).reshape(m, n)

    # -- a tunable value table (HYB) ------------------------------------------------------
    @property
    def has_table(self) -> bool:
        """Whether decoding reads a value table that fine-tuning may change (HYB)."""
        return False

    def default_table(self):
        """The codebook's own table (float32), the one its search uses."""
        raise ValueError(f"{self.name} has no value table to tune (only the HYB trellis "
                         "codes have one)")

    def check_table(self, table) -> None:
        """A ValueError unless `table` is None or a table of this codebook's shape."""
        if table is None:
            return
        if not self.has_table:
            raise ValueError(f"{self.name} has no value table, got one of shape "
                             f"{np.shape(table)}")
        want = np.shape(self.default_table())
        if tuple(np.shape(table)) != want:
            raise ValueError(f"{self.name}'s table has shape {want}, got {np.shape(table)}")

    def matrix_shape(self, codes_shape: tuple) -> tuple:
        """(m, n) of a weight whose codes have shape `codes_shape` (inverse of codes_shape)."""
        return (codes_shape[0], codes_shape[1] * self.dim)

    @property
    def shape_multiple(self) -> tuple:
        """(rows, columns): an (m, n) weight can be coded when m and n are multiples."""
        return (1, math.lcm(self.block, self.dim))

    def check_shape(self, m: int, n: int) -> None:
        """A ValueError naming the fix unless an (m, n) weight can be coded."""
        if n % self.dim:
            raise ValueError(f"the input dimension {n} is not divisible by {self.name}'s dim "
                             f"{self.dim}")

    # -- shared -------------------------------------------------------------------------
    def quantize_with_values(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """x (..., dim) float -> (codes (...,) + code_shape, xhat (..., dim) in x's dtype)."""
        x = jnp.asarray(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name} quantizes vectors of dimension {self.dim}, "
                             f"got trailing dimension {x.shape[-1]}")
        lead = x.shape[:-1]
        work = jnp.promote_types(x.dtype, jnp.float32)
        xt = x.reshape(-1, self.dim).astype(work).T
        codes, xhat_t = self.quantize_t(xt)
        return (codes.reshape(lead + self.code_shape),
                xhat_t.T.reshape(lead + (self.dim,)).astype(x.dtype))

    def quantize(self, x: jax.Array) -> jax.Array:
        """Codes of each vector, found by the `search` the codebook names: x (..., dim) ->
        (...,) + code_shape."""
        return self.quantize_with_values(x)[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Round x (..., dim) to the codebook: decode(quantize(x)), in x's dtype."""
        return self.quantize_with_values(x)[1]

    def mse(self, x: jax.Array, scale: float | None = None) -> jax.Array:
        """Mean squared error per dimension of rounding x * scale, measured at unit scale."""
        s = self.opt_scale if scale is None else scale
        return jnp.mean((self(x * s) / s - x) ** 2)

    def __repr__(self):
        return f"Codebook({self.name}: {self.bits_per_weight:g} bits/weight, dim {self.dim})"


def concrete(x):
    """The value of x when it is known, else None: x itself unless it is a tracer; for a
    tracer the concrete value it stands for (eager `jax.grad`: the primal) or None (inside
    jit / vmap, where values are abstract). Checks that need values run on known ones."""
    return x.to_concrete_value() if isinstance(x, jax.core.Tracer) else x


def check_codes(codes, size: int, name: str, what: str = "codes") -> None:
    """Raise a ValueError unless every code is an integer in 0..size - 1.

    codes: any array-like of integers (NumPy, jax.Array, list); traced codes (inside jit /
    vmap) are not checked. An unsigned dtype whose every value is below `size` (uint16 E8P12
    codes) is not read at all; otherwise a min / max reduction (the count and the first bad
    value only on failure). `name` and `what` name the codebook and the field in the message.
    """
    codes = concrete(codes)
    if codes is None:
        return
    if not isinstance(codes, (np.ndarray, jax.Array)):
        codes = np.asarray(codes)
    dt = np.dtype(codes.dtype)
    if dt.kind == "b" or (dt.kind == "u" and np.iinfo(dt).max < size):
        return
    if codes.size == 0:
        return
    xp = np if isinstance(codes, np.ndarray) else jnp
    lo, hi = xp.min(codes), xp.max(codes)
    integral = True if dt.kind in "iu" else bool(xp.all(codes == xp.floor(codes)))
    if integral and lo >= 0 and hi < size:
        return
    c = np.asarray(codes).reshape(-1)
    bad = (c < 0) | (c >= size) | (c != np.floor(c) if dt.kind not in "iu" else False)
    idx = int(np.flatnonzero(bad)[0])
    where = tuple(int(i) for i in np.unravel_index(idx, codes.shape))
    raise ValueError(
        f"{name}: {int(bad.sum())} of {c.size} {what} are not integers in the valid range "
        f"0..{size - 1} (first bad value {c[idx].item()!r} at index {where}): "
        f"decode only codes produced by this codebook ({name}), from a checkpoint of the "
        f"same codebook and layout")


def lex_keys(v: np.ndarray, base: int) -> np.ndarray:
    """Integer keys of small non-negative integer rows (first column most significant)."""
    key = np.zeros(v.shape[0], np.int64)
    for col in range(v.shape[1]):
        key = key * base + v[:, col]
    return key
