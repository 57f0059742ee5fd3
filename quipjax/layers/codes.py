"""Code-based stand-ins: quantized linears that compute from their codes (generation, serving).

Each quantized group of a block stays as its codes, converted once to the decode-matmul
kernel's layout (`quipjax.kernels.prepare`), and the member linears of the group read their
rows from one product of the whole group:

    CodesGroup (one per group: fused q/k/v, o, up/gate, down)
        codes  : `Codes` variable holding the `kernels.Prepared` pytree (never trained)
        SU     : `QuantVector` (n,) float32, the (possibly tuned) input signs
        row_scale : `QuantVector` (m,) float32, SV times each member's fuse scale per row
        rows (static) the members' row counts; rot_m, rot_n (static) the rotations
        __call__(x) = row_scale * M_m( x_rot @ Q^T ),  x_rot = M_n^T (SU * x)
    CodesLinear (replaces q_proj, k_proj, ...): group(x)[..., r0:r1] (+ bias)

The members of a fused group hold the same `CodesGroup` object (NNX shared reference), so it
is stored once in the model state, and the group's product is written once per member in the
traced program; identical HLO with identical operands is merged by XLA's common-subexpression
elimination under `jit`, so q, k and v cost one rotation, one decode-matmul and one inverse
rotation (`tests/test_generate.py` checks the optimized HLO of one block). Called eagerly
(without jit) the product runs once per member.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import kernels
from quipjax.group import QuantizedGroup
from quipjax.models.adapter import get_path, set_path

__all__ = ["Codes", "QuantVector", "CodesGroup", "CodesLinear", "attach_codes"]


class Codes(nnx.Variable):
    """Quantized codes in a kernel backend's layout: the value is a `kernels.Prepared` pytree.
    Not an `nnx.Param`: optimizers and `nnx.state(model, nnx.Param)` never see it."""


class QuantVector(nnx.Variable):
    """A fixed float32 vector of a quantized group (SU, SV, fuse scales); not an `nnx.Param`."""


class CodesGroup(nnx.Module):
    """The product of one quantized (row-stacked) group with its input, from the codes.

    Args:
      group: a `QuantizedGroup` (codes, SU, SV, fuse scales, member rows).
      backend: decode-matmul backend ("auto", "xla", "pallas", "reference", ...).
      dtype: dtype of the rotated input fed to the decode-matmul (bfloat16 or float32; the
        kernel accumulates in float32). Rotations and scales run in float32.
    """

    def __init__(self, group: QuantizedGroup, backend: str = "auto", dtype=jnp.bfloat16):
        ql = group.ql
        m, n = ql.shape
        if sum(group.rows) != m or len(group.rows) != len(group.scales):
            raise ValueError(f"group {group.members}: rows {group.rows} / {len(group.scales)} "
                             f"scales do not describe the {m} rows of its codes")
        self.codes = Codes(kernels.prepare(jnp.asarray(ql.codes), ql.codebook, backend,
                                           ql.table))
        self.SU = QuantVector(jnp.asarray(ql.SU, jnp.float32))
        # SV times each member's fuse scale, per output row: fixed at load, not per token
        self.row_scale = QuantVector(jnp.asarray(ql.SV, jnp.float32) * jnp.repeat(
            jnp.asarray(group.scales, jnp.float32), np.asarray(group.rows), total_repeat_length=m))
        self.rows = tuple(int(r) for r in group.rows)
        self.rot_m, self.rot_n = ql.rotations            # quipjax.rht.Rotation, static
        self.shape = (int(m), int(n))
        self.dtype = jnp.dtype(dtype)

    @property
    def backend(self) -> str:
        return self.codes.get_value().backend

    def row_ranges(self) -> list:
        """[(r0, r1)] of each member."""
        ends = np.cumsum((0,) + self.rows)
        return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., n) float -> (..., m) float32: x @ What^T for the whole group, each member's
        rows times its fuse scale (the concatenation of the members' outputs, no biases)."""
        n = self.shape[1]
        if x.shape[-1] != n:
            raise ValueError(f"quantized group of shape {self.shape} applied to inputs with last "
                             f"dimension {x.shape[-1]}")
        x = jnp.asarray(x, jnp.float32)
        # the math of QuantizedLinear.apply, with the codes prepared once at load
        t = self.rot_n.apply(x * self.SU[...], axis=-1, transpose=True)      # M_n^T diag(SU) x
        y = kernels.prepared_matmul(t.astype(self.dtype), self.codes.get_value())   # t Q^T
        return self.rot_m.apply(y, axis=-1) * self.row_scale[...]          # diag(SV) M_m (.)


class CodesLinear(nnx.Module):
    """Stands in for one member `Linear` of a group: rows [r0, r1) of the group's product.

    Args:
      group: the shared `CodesGroup`.
      index: which member (order of `QuantizedGroup.members`).
      bias: the member's bias `nnx.Param` (out,) or None.
    """

    def __init__(self, group: CodesGroup, index: int, bias: Optional[nnx.Param] = None):
        self.group = group
        self.index = int(index)
        self.r0, self.r1 = group.row_ranges()[index]
        self.bias = bias

    @property
    def matmul_dtype(self):
        """The compute dtype the attention of `models.llama` reads from q_proj."""
        return self.group.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., n) -> (..., r1 - r0) float32."""
        y = self.group(x)[..., self.r0:self.r1]
        return y if self.bias is None else y + self.bias[...]


def attach_codes(block, group: QuantizedGroup, backend: str = "auto",
                           dtype=jnp.bfloat16) -> CodesGroup:
    """Replace the members of `group` in `block` by `CodesLinear`s of one shared `CodesGroup`
    (their biases are kept). Returns the group module."""
    qg = CodesGroup(group, backend, dtype)
    for i, (path, rows) in enumerate(zip(group.members, group.rows)):
        old = get_path(block, path)
        w = getattr(old, "weight", None)
        if w is not None and tuple(w.shape) != (rows, qg.shape[1]):
            raise ValueError(f"{path}: quantized shape {(rows, qg.shape[1])} != model {tuple(w.shape)}")
        set_path(block, path, CodesLinear(qg, i, getattr(old, "bias", None)))
    return qg
