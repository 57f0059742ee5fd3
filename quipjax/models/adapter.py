"""Where the linear layers of a model are, and which of them share an input.

Quantization code (Hessian collection, quantize_model) reads only this; it knows nothing else
about the architecture. A group's members share one input, so they share one Hessian and are
quantized as one row-stacked matrix (the official fused q/k/v and gate/up).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Tuple

__all__ = ["LinearGroup", "ModelAdapter", "LLAMA", "get_path", "set_path"]


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    name: str                      # "qkv"
    members: Tuple[str, ...]       # module paths inside a block, e.g. "self_attn.q_proj"


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """Block structure of a decoder: its linear groups in quantization order."""

    name: str
    groups: Tuple[LinearGroup, ...]
    blocks_attr: str = "layers"

    def blocks(self, model):
        return getattr(model, self.blocks_attr)

    def linear_paths(self) -> list:
        return [p for g in self.groups for p in g.members]

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


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj, path: str, value):
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)
