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
from quipjax.models.parts import Linear

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
        everything but the weights of the adapter's linears (and the su/sv and tuned table of
        tunable ones, `layers.tunable`)."""
        quantized = {m + ".weight" for m in self.linear_paths()}
        out = {}
        for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
            name = ".".join(str(p) for p in path)
            if name in quantized or path[-1] in ("su", "sv") or path[-2:] == ("source", "table"):
                continue
            out[name] = np.asarray(v[...], np.float32)
        return out

    @staticmethod
    def from_rules(name: str, block, rules: Sequence) -> "ModelAdapter":
        """The groups of `block`'s linears as `rules` (`quipjax.rule.Rule`s over module paths
        inside the block) decide: the first matching rule wins, skip rules and unmatched
        linears stay in floating point; a rule's `group` (capture groups expanded) names the
        group, else the linear is a group of its own named by its path. Groups are ordered by
        their first rule, then by path (numbers numerically); members likewise. A rule that
        matches no module of the block, or decides for a module that is not a linear, is an
        error naming it."""
        def order(i, path):
            return (i, [int(t) if t.isdigit() else t for t in path.split(".")])
        found, used = {}, set()
        for path, mod in nnx.iter_modules(block):
            p = ".".join(str(x) for x in path)
            hits = [j for j, r in enumerate(rules) if p and r.matches(p)]
            used.update(hits)
            if not hits:
                continue
            i = hits[0]
            if rules[i].skip:
                continue
            if not isinstance(mod, Linear):
                raise ValueError(f"rule {rules[i]!r} matches {p}, a {type(mod).__name__}, not "
                                 "a linear: narrow its pattern")
            found[p] = i
        unused = [r for j, r in enumerate(rules) if j not in used]
        if unused:
            raise ValueError(f"rule {unused[0]!r} matches no module of the {name} block")
        groups, pools = {}, {}
        for p, i in sorted(found.items(), key=lambda kv: order(kv[1], kv[0])):
            g = rules[i].group_name(p) or p
            groups.setdefault(g, []).append(p)
            if rules[i].pool is not None:
                if pools.setdefault(g, rules[i].pool) != rules[i].pool:
                    raise ValueError(f"group {g} has members of pools {pools[g]} and {rules[i].pool}")
        return ModelAdapter(name=name, groups=tuple(LinearGroup(g, tuple(m)) for g, m in groups.items()),
                            pools=tuple(pools.items()))

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
