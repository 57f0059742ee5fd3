"""Fused groups: linears that read the same input, quantized as one row-stacked matrix.

The members of a group share their input, hence one Hessian and one input-side RHT (the
official fused q/k/v and up/gate). Each member is divided by its RMS before stacking (its
"fuse scale"), so one weight scale serves the group; the scales multiply the member rows
back at dequantization.

    g = LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    W, scales = fuse([Wq, Wk, Wv])                 # (sum of rows, n), (3,)
    qg = quantize_group([Wq, Wk, Wv], H, key=group_key(seed, layer, 0), members=g.members)
    Wq_hat, Wk_hat, Wv_hat = qg.dequantize_members()
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.quantize import QuantizedLinear, quantize_linear

__all__ = ["LinearGroup", "QuantizedGroup", "fuse", "unfuse", "group_key", "quantize_group"]


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that share one input, in the order their rows are stacked.

    name: the group's name ("qkv"); members: module paths inside a block
    ("self_attn.q_proj", ...)."""

    name: str
    members: Tuple[str, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedGroup:
    """A quantized group: member i owns rows [offsets[i], offsets[i+1]) of `ql`, divided by
    `scales[i]` before quantization.

    ql: the `QuantizedLinear` of the row-stacked (sum(rows), n) matrix. scales: (k,) float32
    fuse scales. members (static): the members' module paths. rows (static): their row counts.
    """

    ql: QuantizedLinear
    scales: jax.Array
    members: Tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())
    rows: Tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())

    def dequantize_members(self) -> list:
        """[(rows_i, n) float32] the members' dequantized weights, fuse scales applied."""
        return unfuse(self.ql.dequantize(), self.scales, self.rows)

    @property
    def su_is_signs(self) -> bool:
        return bool(np.all(np.abs(np.asarray(self.ql.SU)) == 1))

    def bits(self) -> dict:
        """Storage in bits (`QuantizedLinear.bits` plus the float32 fuse scales): the one
        bits-per-weight definition of quipjax (metrics.json uses it)."""
        return dict(self.ql.bits(), scales=32 * len(self.rows))


def fuse(weights: Sequence) -> tuple:
    """(W, scales): the members' (out_i, in) matrices row-stacked, each divided by its RMS
    (numpy float32, RMS computed in float64); one member: itself and scale 1."""
    ws = [np.asarray(w, np.float32) for w in weights]
    if len(ws) == 1:
        return ws[0], np.ones((1,), np.float32)
    scales = np.array([np.sqrt(np.mean(w.astype(np.float64) ** 2)) for w in ws], np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.concatenate([w / s for w, s in zip(ws, scales)], 0), scales


def unfuse(W, scales, rows: Sequence[int]) -> list:
    """Split a row-stacked (sum(rows), n) matrix into its members, each times its scale."""
    out, r = [], 0
    for i, n in enumerate(rows):
        out.append(W[r:r + n] * scales[i])
        r += n
    return out


def group_key(seed: int, layer: int, group_index: int) -> jax.Array:
    """The sign-vector key of one group: a pure function of (seed, layer, group index), so
    the order and the chunking of the quantization never change a code."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), layer), group_index)


def quantize_group(weights: Sequence, H, *, key: jax.Array, members: Tuple[str, ...] = (),
                   **quantize_kw) -> QuantizedGroup:
    """Fuse the members' (out_i, n) weights and quantize them with `quantize_linear` (H: the
    shared (n, n) input Hessian; quantize_kw: its settings)."""
    ws = [np.asarray(w, np.float32) for w in weights]
    W, scales = fuse(ws)
    ql = quantize_linear(W, H, key=key, **quantize_kw)
    return QuantizedGroup(ql=ql, scales=jnp.asarray(scales), members=tuple(members),
                          rows=tuple(w.shape[0] for w in ws))
