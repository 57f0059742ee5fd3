"""Where the linear layers of a model are, which of them share an input, and module paths.

Quantization code (Hessian collection, the quantization loop, the model builder) reads only
this; it knows nothing else about the architecture. A group's members share one input, so
they share one Hessian and are quantized as one row-stacked matrix (the official fused q/k/v
and up/gate; `quipjax.group`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax.group import LinearGroup

__all__ = ["LinearGroup", "ModelAdapter", "LLAMA", "get_path", "set_path", "set_param",
           "path_str"]


def _child(obj, part: str):
    # "experts.3": an item of a list of modules
    return obj[int(part)] if part.isdigit() and not hasattr(obj, part) else getattr(obj, part)


def get_path(obj, path: str):
    """The attribute at a dotted module path ("self_attn.q_proj", "mlp.experts.3.up_proj")
    of obj; digits index lists of modules."""
    for part in path.split("."):
        obj = _child(obj, part)
    return obj


def set_path(obj, path: str, value) -> None:
    """Replace the attribute (or list item) at a dotted module path by value."""
    *head, last = path.split(".")
    for part in head:
        obj = _child(obj, part)
    if last.isdigit() and not hasattr(obj, last):
        obj[int(last)] = value
    else:
        setattr(obj, last, value)


def set_param(module, path: str, value, dtype=None) -> None:
    """Fill the parameter at `path` ("mlp.up_proj.bias", "embed_tokens") with `value`, in
    `dtype` (default: the parameter's own). An abstract parameter (from `nnx.eval_shape`) is
    replaced by a concrete `nnx.Param`. Errors name the path: an unknown parameter (another
    architecture or configuration) or a shape that differs from the model's."""
    *mod, name = path.split(".")
    try:
        holder = get_path(module, ".".join(mod)) if mod else module
        var = getattr(holder, name)
    except AttributeError:
        var = None
    if not isinstance(var, nnx.Variable):
        raise ValueError(f"the model has no parameter {path}: the checkpoint is from another "
                         "architecture or configuration")
    if tuple(var.shape) != tuple(np.shape(value)):
        raise ValueError(f"{path}: checkpoint shape {np.shape(value)} != model {tuple(var.shape)}")
    abstract = isinstance(var.get_value(), jax.ShapeDtypeStruct)
    if abstract or (dtype is not None and jnp.dtype(dtype) != var.dtype):
        # a new Variable of the same kind (an `nnx.eval_shape` skeleton, or another dtype)
        setattr(holder, name, type(var)(jnp.asarray(value, var.dtype if dtype is None else dtype)))
    else:
        var[...] = jnp.asarray(value, var.dtype)


def path_str(path) -> str:
    """"layers.3.mlp.up_proj.weight" from a jax/nnx key path (the Variable's `value` key
    dropped)."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name == "value":
            continue
        parts.append(str(name))
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """Block structure of a decoder: its linear groups in quantization order."""

    name: str
    groups: Tuple[LinearGroup, ...]
    blocks_attr: str = "layers"
    # (group, pool): groups whose input rows are zero for tokens not routed to them (experts
    # of a mixture); the Hessian counts only nonzero rows, and a group with too few tokens
    # takes its pool's Hessian (`pipeline.hessians.pool_starved`)
    pools: Tuple[Tuple[str, str], ...] = ()

    def pool_of(self, group: str):
        """The pool of a routed group, None for a dense one."""
        return dict(self.pools).get(group)

    def blocks(self, model):
        return getattr(model, self.blocks_attr)

    def linear_paths(self) -> list:
        return [p for g in self.groups for p in g.members]

    def group(self, name: str) -> LinearGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"{self.name} has no linear group {name!r}: "
                       f"{[g.name for g in self.groups]}")

    def fp_params(self, block) -> dict:
        """The block's parameters that stay in floating point (norm weights, biases): {module
        path ("input_layernorm.weight", "self_attn.q_proj.bias"): float32 numpy array},
        everything but the weights of the adapter's linears (and the su/sv of tunable ones)."""
        quantized = {m + ".weight" for m in self.linear_paths()}
        out = {}
        for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
            name = ".".join(str(p) for p in path)
            if name in quantized or path[-1] in ("su", "sv"):
                continue
            out[name] = np.asarray(v[...], np.float32)
        return out

    def select(self, patterns: Sequence[str]) -> Tuple[LinearGroup, ...]:
        """Groups whose every member path matches one of the regexes (Qwix-style rules)."""
        rx = [re.compile(p) for p in patterns]
        out = []
        for g in self.groups:
            hits = [any(r.fullmatch(m) for r in rx) for m in g.members]
            if any(hits) and not all(hits):
                raise ValueError(f"rules match only part of the fused group {g.name} {g.members}: "
                                 "members that share an input are quantized together")
            if all(hits):
                out.append(g)
        return tuple(out)


LLAMA = ModelAdapter(
    name="llama",
    groups=(
        LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("o", ("self_attn.o_proj",)),
        # (up, gate): the official fused upgate_proj row order, so that checkpoints export to
        # quip-sharp (rows cannot be reordered after the RHT; quipjax.formats.quipsharp)
        LinearGroup("up", ("mlp.up_proj", "mlp.gate_proj")),
        LinearGroup("down", ("mlp.down_proj",)),
    ),
)
