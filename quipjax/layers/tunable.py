"""Tunable stand-ins: quantized linears whose codes stay fixed while their signs train.

    What = diag(sv) R diag(su),   R = M_m Q M_n^T  (the decoded codes rotated back, fixed)

which is exactly `QuantizedLinear.dequantize()` with SU = su and SV = sv, so the gradients
with respect to su and sv are exact (no straight-through estimate). `attach_tunable` swaps a
group's members for `TunableQuantLinear`s (sharing one `su` Param, as they share the group's
input signs); `detach_tunable` reads the tuned group back out.

With train_table (codebooks with a value table: the HYB trellis codes) the group's table is
a Param too, shared by its members (`TableSource`): R = M_m Q(codes, table) M_n^T is decoded
in every forward, so the table's gradient is exact as well (QTIP's tuned "tlut").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import codebooks, rht
from quipjax.models.adapter import get_path, set_path

__all__ = ["Frozen", "TunableQuantLinear", "TableSource", "rotated_back", "attach_tunable",
           "detach_tunable", "SUSV"]

# the names of the quantizer parameters (their own learning rate): the sign vectors and a
# tuned value table
SUSV = ("su", "sv", "table")


class Frozen(nnx.Variable):
    """A fixed array held by a module: not an `nnx.Param`, so never trained."""


class TunableQuantLinear(nnx.Module):
    """y = x @ (diag(sv) R diag(su))^T (+ bias): a quantized linear with trainable signs.

    Args:
      R: (m, n) float32, the decoded codes rotated back with unit signs (fixed).
      su: an `nnx.Param` (n,) float32, shared by the members of one group.
      sv: (m,) float32 output scales (the group's SV rows times the member's fuse scale).
      bias: an `nnx.Param` (m,) or None (kept from the FP layer).
      compute_dtype: matmul input dtype (bf16 runs ~3x faster on CPU); accumulation is float32.
    """

    def __init__(self, R, su: nnx.Param, sv, bias=None, compute_dtype=jnp.bfloat16):
        # R: the fixed (m, n) array, or (TableSource, r0, r1): rows r0:r1 of its R(table)
        if isinstance(R, tuple):
            self.source, self.r0, self.r1 = R
            self.R = None
        else:
            self.source = None
            self.R = Frozen(jnp.asarray(R, jnp.float32))
        self.su = su
        self.sv = nnx.Param(jnp.asarray(sv, jnp.float32))
        self.bias = bias
        self.compute_dtype = compute_dtype

    @property
    def matmul_dtype(self):
        return self.compute_dtype

    def weight_value(self) -> jax.Array:
        """What (m, n) float32."""
        R = self.R[...] if self.source is None else self.source.R()[self.r0:self.r1]
        return self.sv[...][:, None] * R * self.su[...][None, :]

    def __call__(self, x):
        cdt = self.compute_dtype
        y = jnp.einsum("...i,oi->...o", x.astype(cdt), self.weight_value().astype(cdt),
                       preferred_element_type=jnp.float32)
        return y if self.bias is None else y + self.bias[...]


def rotated_back(ql) -> jax.Array:
    """R = M_m Q M_n^T (m, n) float32: `ql.dequantize()` with unit sign vectors."""
    m, n = ql.shape
    return rht.incoherence_inverse(ql.decode_rotated(), jnp.ones((n,), jnp.float32),
                                    jnp.ones((m,), jnp.float32), rotations=ql.rotations)


class TableSource(nnx.Module):
    """R(table) = M_m Q(codes, table) M_n^T of one group, its codes fixed and its value table
    a trainable Param (shared by the group's members)."""

    def __init__(self, ql):
        cb = codebooks.get(ql.codebook)
        table = cb.default_table() if ql.table is None else ql.table
        self.codes = Frozen(jnp.asarray(ql.codes))
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))
        self.codebook, self.shape, self.rotations = ql.codebook, tuple(ql.shape), ql.rotations

    def R(self) -> jax.Array:
        """(m, n) float32."""
        m, n = self.shape
        Q = codebooks.get(self.codebook).decode_matrix(self.codes[...], m, n, self.table[...])
        return rht.incoherence_inverse(Q, jnp.ones((n,), jnp.float32),
                                       jnp.ones((m,), jnp.float32), rotations=self.rotations)


def _member_sv(group, i: int, r: int, n: int):
    """(stored SV rows r:r+n as float32, the sv member i trains: those rows times its fuse scale).

    One definition for attach and detach, so the detach comparison sees the attached value.
    """
    SV = jnp.asarray(group.ql.SV[r:r + n], jnp.float32)
    return SV, SV * group.scales[i]


def attach_tunable(block, group, compute_dtype=jnp.bfloat16, train_table: bool = False) -> None:
    """Replace the members of `group` (a `QuantizedGroup`) in `block` by TunableQuantLinears.

    Member i gets rows [r_i, r_i + rows_i) of R and sv = SV[rows] * scales[i]; all members share
    one su Param initialised to the group's SU. The members' biases are kept. train_table: the
    group's value table becomes a shared Param too (`TableSource`), for codebooks that have
    one (`Codebook.has_table`); other groups are attached as without it.
    """
    if train_table and codebooks.get(group.ql.codebook).has_table:
        source = TableSource(group.ql)
        rows = lambda a, b: (source, a, b)                                   # noqa: E731
    else:
        R = rotated_back(group.ql)
        rows = lambda a, b: R[a:b]                                           # noqa: E731
    su = nnx.Param(jnp.asarray(group.ql.SU, jnp.float32))
    r = 0
    for i, (path, n) in enumerate(zip(group.members, group.rows)):
        old = get_path(block, path)
        _, sv = _member_sv(group, i, r, n)
        set_path(block, path, TunableQuantLinear(rows(r, r + n), su, sv,
                                                 getattr(old, "bias", None), compute_dtype))
        r += n


def detach_tunable(block, group):
    """The `QuantizedGroup` with the tuned su/sv of its members in `block` (codes unchanged)."""
    mods = [get_path(block, p) for p in group.members]
    if not all(isinstance(m, TunableQuantLinear) for m in mods):
        raise ValueError(f"the members of group {group.members} are not attached TunableQuantLinears")
    # sv = SV * scale does not round-trip exactly in float32: an entry still at its attached
    # value gives back the stored SV entry itself, so an untuned group comes back bit for bit
    sv, r = [], 0
    for i, (m, n) in enumerate(zip(mods, group.rows)):
        SV, start = _member_sv(group, i, r, n)
        sv.append(jnp.where(m.sv[...] == start, SV, m.sv[...] / group.scales[i]))
        r += n
    sv = jnp.concatenate(sv)
    table = group.ql.table
    if mods[0].source is not None:
        table = np.asarray(mods[0].source.table[...], np.float32)
        default = np.asarray(codebooks.get(group.ql.codebook).default_table(), np.float32)
        # a group attached but never tuned keeps decoding with the codebook's own table
        table = None if np.array_equal(table, default) else jnp.asarray(table)
    ql = dataclasses.replace(group.ql, SU=jnp.asarray(mods[0].su[...], jnp.float32),
                             SV=jnp.asarray(sv, jnp.float32), table=table)
    return dataclasses.replace(group, ql=ql)
