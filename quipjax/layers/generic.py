"""Generic stand-ins for the linears of any NNX model (`quipjax.rules`).

    InputRecorder    wraps a linear; keeps every (input, output) of the traced call it is in
    CodesMember      stands in for one member of a quantized group: rows [r0, r1) of the
                     group's product (a shared `layers.codes.CodesGroup`), reshaped to the
                     member's output shape, plus its bias

A "linear" here contracts the trailing `len(in_shape)` axes of its input x (..., *in_shape)
with a weight and returns (..., *out_shape): `nnx.Linear`, a plain-matmul `nnx.LinearGeneral`
or `nnx.Einsum`, `quipjax.models.llama.Linear` (the adapters live in `quipjax.rules`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from quipjax.layers.codes import CodesGroup
from quipjax.layers.tap import Captured

__all__ = ["InputRecorder", "CodesMember"]


class InputRecorder(nnx.Module):
    """Wraps a linear and records each call: `calls` holds a tuple of (x, y) pairs, the
    inputs and outputs of every call since it was attached (tracers inside a traced call);
    with a `log` list, each call also appends `name` to it (the order of the calls).

    Used inside one traced call (`jax.eval_shape` / `jax.jit` of a merged copy of the
    model): the recorded arrays are read back in the same trace, never stored."""

    def __init__(self, inner, name: str = "", log: Optional[list] = None):
        self.inner = inner
        self.calls = Captured(())
        self.name = name
        self.log = nnx.static(log)

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        if self.log is not None:
            self.log.append(self.name)
        self.calls.set_value(self.calls.get_value() + ((x, y),))
        return y


class CodesMember(nnx.Module):
    """One member linear of a quantized group, computed from the group's codes.

    Args:
      group: the shared `CodesGroup` (its product is (..., m) float32 for inputs (..., n)).
      index: which member (the order of the group's members).
      in_shape: the member's contracted trailing input dims (prod(in_shape) == n).
      out_shape: the member's output dims (prod(out_shape) == r1 - r0).
      bias: the member's bias `nnx.Param` (any shape of out_shape's size) or None.
      out_dtype: dtype of the output (the FP linear's output dtype), a dtype name.

    x (..., *in_shape) -> (..., *out_shape) in `out_dtype`: the product computed in float32
    (the decode-matmul kernel in the group's dtype), bias added in float32, then cast.
    """

    def __init__(self, group: CodesGroup, index: int, in_shape: Tuple[int, ...],
                 out_shape: Tuple[int, ...], bias: Optional[nnx.Param] = None,
                 out_dtype: str = "float32"):
        r0, r1 = group.row_ranges()[index]
        if math.prod(in_shape) != group.shape[1] or math.prod(out_shape) != r1 - r0:
            raise ValueError(f"member {index}: input {in_shape} / output {out_shape} dims do not "
                             f"fit rows [{r0}, {r1}) of a quantized group of shape {group.shape}")
        if bias is not None and math.prod(bias.shape) != r1 - r0:
            raise ValueError(f"member {index}: bias of shape {bias.shape} for {r1 - r0} outputs")
        self.group = group
        self.index = int(index)
        self.r0, self.r1 = r0, r1
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_shape = tuple(int(d) for d in out_shape)
        self.bias = bias
        self.out_dtype = jnp.dtype(out_dtype).name

    def __call__(self, x: jax.Array) -> jax.Array:
        k = len(self.in_shape)
        if tuple(x.shape[x.ndim - k:]) != self.in_shape:
            raise ValueError(f"quantized linear with input dims {self.in_shape} got inputs of "
                             f"shape {x.shape}")
        lead = x.shape[:x.ndim - k]
        y = self.group(x.reshape(lead + (self.group.shape[1],)))[..., self.r0:self.r1]
        y = y.reshape(lead + self.out_shape)
        if self.bias is not None:
            y = y + jnp.asarray(self.bias[...], jnp.float32).reshape(self.out_shape)
        return y.astype(self.out_dtype)
