"""Codebooks behind one registry: `get(name)` -> a `Codebook` (hashable, jit-static).

| name        | bits/wt | dim | codes                      | opt_scale | default_scale | search |
|-------------|---------|-----|----------------------------|-----------|---------------|--------|
| E8P12       | 2       | 8   | uint16, official layout    | 1.03      | 0.9           | exact  |
| E8P12RVQ3B  | 3       | 8   | uint16 (..., 2): E8P, E81B | 0.98      | 0.98          | greedy (or beam) |
| E8P12RVQ4B  | 4       | 8   | uint16 (..., 2): E8P, E8P  | 1.03      | 1.03          | greedy (or beam) |
| E81B        | 1       | 8   | uint16 index 0..255        | 1.0       | 1.0           | exact  |
| HI2/HI3/HI4 | 2/3/4   | 1   | uint8 grid index           | Gaussian-optimal          | exact  |
| 1MAD2..4, 3INST2..4, HYB2..4 | 2/3/4 | 256 (a 16 x 16 tile) | uint16 (16 K,) bitstream | value std | value std | tail-biting |

search (the `Codebook.search` attribute): "exact" = a nearest codeword of every vector;
"greedy" = stage by stage, as the official code (`quipjax.codebooks.rvq`: on Gaussian data the
4-bit search misses the nearest codeword for ~44% of vectors, the 3-bit for ~0.7%); "beam" =
`get("E8P12RVQ4B", beam=B)` (or E8P12RVQ3B): the B nearest stage-1 points, each with the
exact stage-2 search, the best pair kept (never worse than greedy; same codes layout, name and
decode; BUILD_NOTES.md "Better 3/4-bit E8P search" measures B = 4, 16, 64). In the pipeline: `--rvq_beam=B`.

Adding a codebook: write a `Codebook` subclass (setting `search`) and add one line to
`_REGISTRY`.
"""
from __future__ import annotations

from quipjax.codebooks.base import Codebook
from quipjax.codebooks.e8p import E8P12
from quipjax.codebooks.rvq import E81B, RVQ, e8p12_rvq3b, e8p12_rvq4b
from quipjax.codebooks.scalar import HalfIntegerGrid, hi2, hi3, hi4
from quipjax.codebooks.trellis import TrellisCodebook, trellis_codebook

__all__ = ["Codebook", "E8P12", "E81B", "RVQ", "HalfIntegerGrid", "TrellisCodebook", "get",
           "names"]

_REGISTRY = {
    "E8P12": E8P12,
    "E8P12RVQ3B": e8p12_rvq3b,
    "E8P12RVQ4B": e8p12_rvq4b,
    "E81B": E81B,
    "HI2": hi2,
    "HI3": hi3,
    "HI4": hi4,
    # QTIP's trellis codes, L = 16, one trellis per 16 x 16 tile (`codebooks.trellis`)
    **{f"{c}{k}": (lambda c=c, k=k: trellis_codebook(c, k))
       for c in ("1MAD", "3INST", "HYB") for k in (2, 3, 4)},
}


def names() -> list:
    """Registered codebook names."""
    return list(_REGISTRY)


def get(name, *, beam: int | None = None) -> Codebook:
    """The codebook registered under `name` (a `Codebook` instance is returned as is).

    beam: for the residual codebooks (`RVQ`: E8P12RVQ3B, E8P12RVQ4B), search with a beam of
    this many stage-1 points (1: greedy, the registered default; 2..512: `search` = "beam");
    None leaves the search as it is. A ValueError for any other codebook (their searches are
    exact already).
    """
    if isinstance(name, Codebook):
        cb = name
    else:
        try:
            cb = _REGISTRY[name]()
        except KeyError:
            raise ValueError(f"unknown codebook {name!r}; available: "
                             f"{', '.join(_REGISTRY)}") from None
    if beam is None:
        return cb
    if not isinstance(cb, RVQ):
        raise ValueError(f"beam={beam}: only the residual codebooks (E8P12RVQ3B, E8P12RVQ4B) "
                         f"have a beam search; {cb.name}'s search is {cb.search!r}")
    return cb.with_beam(beam)
