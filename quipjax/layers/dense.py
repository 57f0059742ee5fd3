"""Dense stand-ins: the model's own linears holding dequantized weights (evaluation, the
FP-equivalent reference of every other stand-in)."""
from __future__ import annotations

from quipjax.group import QuantizedGroup
from quipjax.models.adapter import get_path

__all__ = ["attach_dequantized"]


def attach_dequantized(block, group: QuantizedGroup, dtype) -> None:
    """Write the dequantized weights of `group`'s members (in `dtype`) into the block's
    linears at the members' paths (in place; their biases are kept)."""
    for path, w in zip(group.members, group.dequantize_members()):
        lin = get_path(block, path)
        if tuple(lin.weight.shape) != tuple(w.shape):
            raise ValueError(f"{path}: quantized shape {w.shape} != model {lin.weight.shape}")
        lin.weight[...] = w.astype(dtype)
