"""The Hessian tap: a stand-in that shows what a linear layer multiplies.

    attach_taps(block, adapter.groups)             # on the first member of each group
    y = block(x, positions)                        # inside a traced function
    xs = tap_inputs(block, adapter.groups)         # {group name: the input it saw}

The members of a group share their input, so one tap per group (on its first member) sees
the input of all of them. The tap keeps the input in its own `Captured` variable for the
traced call that produced it; the caller (`quipjax.distributed.HessianEngine`) accumulates.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from quipjax.models.adapter import get_path, set_path

__all__ = ["Captured", "InputTap", "attach_taps", "tap_inputs"]


class Captured(nnx.Variable):
    """The last input a tap saw (a traced array inside one call; None outside)."""


class InputTap(nnx.Module):
    """Wraps a linear layer: keeps its input, in the weights' dtype (what the linear actually
    multiplies), in `seen`, then calls the linear.

    It does not forward the linear's `matmul_dtype`, so a block whose q_proj is tapped runs
    its attention in float32 (`models.llama.Attention` reads the dtype from q_proj); the
    Hessians of quipjax (and its caches) are defined with this forward.
    """

    def __init__(self, inner):
        self.inner = inner
        self.seen = Captured(None)

    def __call__(self, x):
        w = getattr(self.inner, "weight", None)
        self.seen.set_value(x.astype(w.dtype) if w is not None else x)
        return self.inner(x)


def attach_taps(block, groups: Sequence) -> None:
    """Wrap the first member of each `LinearGroup` of `block` in an `InputTap` (in place)."""
    for g in groups:
        set_path(block, g.members[0], InputTap(get_path(block, g.members[0])))


def tap_inputs(block, groups: Sequence) -> dict:
    """{group name: the input its tap saw in the last call} of a tapped block."""
    return {g.name: get_path(block, g.members[0]).seen.get_value() for g in groups}
