"""Stand-in layers: what quipjax puts in place of a model's linears, all in one place.

| stand-in | module | for |
|---|---|---|
| `InputTap` | `layers.tap` | Hessian collection: shows what a linear multiplies |
| the model's `Linear` with dequantized weights | `layers.dense` | evaluation, reference |
| `TunableQuantLinear` | `layers.tunable` | fine-tuning: codes fixed, su/sv trainable |
| `CodesGroup` + `CodesLinear` | `layers.codes` | inference from the codes (kernels) |
| `InputRecorder`, `CodesMember` | `layers.generic` | any NNX linear (`quipjax.rules`) |

`attach(block, group, kind, ...)` puts the stand-in of one kind in place of a quantized
group's members; the model code is never edited (members are found by module path).
"""
from __future__ import annotations

from quipjax.layers.codes import Codes, CodesGroup, CodesLinear, QuantVector, attach_codes
from quipjax.layers.dense import attach_dequantized
from quipjax.layers.generic import CodesMember, InputRecorder
from quipjax.layers.tap import Captured, InputTap, attach_taps, tap_inputs
from quipjax.layers.tunable import (SUSV, Frozen, TableSource, TunableQuantLinear,
                                    attach_tunable, detach_tunable, rotated_back)

__all__ = ["InputTap", "Captured", "attach_taps", "tap_inputs", "attach_dequantized",
           "Frozen", "TunableQuantLinear", "TableSource", "attach_tunable", "detach_tunable", "rotated_back",
           "SUSV", "Codes", "QuantVector", "CodesGroup", "CodesLinear", "attach_codes",
           "InputRecorder", "CodesMember", "KINDS", "attach"]

KINDS = ("dequantized", "tunable", "codes")


def attach(block, group, kind: str, *, dtype, backend: str = "auto",
           train_table: bool = False) -> None:
    """Put the stand-in of `kind` in place of the members of `group` (a
    `quipjax.group.QuantizedGroup`) in `block`:

    - "dequantized": the block's linears get the dequantized weights in `dtype`;
    - "tunable": `TunableQuantLinear`s computing their matmuls in `dtype` (with train_table,
      the value table of a HYB group is trainable too);
    - "codes": `CodesLinear`s of one `CodesGroup` (decode-matmul `backend`, input `dtype`).
    """
    if kind == "dequantized":
        attach_dequantized(block, group, dtype)
    elif kind == "tunable":
        attach_tunable(block, group, dtype, train_table)
    elif kind == "codes":
        attach_codes(block, group, backend, dtype)
    else:
        raise ValueError(f"unknown stand-in kind {kind!r}; one of {KINDS}")
