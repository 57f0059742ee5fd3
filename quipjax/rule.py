"""`Rule`: which linears of a model are quantized, and how (Qwix-style, by module path).

A frozen keyword-only dataclass, matched with `re.fullmatch` against dotted module paths;
the first matching rule of a list decides. The same rules drive the user API
(`quipjax.rules`: any Flax NNX model) and the pipeline (each family's default rules,
`quipjax.models.families`, from which its linear groups are derived).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

from quipjax import codebooks
from quipjax.quantize import check_settings

__all__ = ["Rule", "ROTATIONS", "first_match", "rules_to_json", "rules_from_json"]

ROTATIONS = ("auto", "hadamard", "rfft", "identity")


# ------------------------------------------------------------------------------- rules

@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Which linears, and how to quantize them.

    Attributes:
      pattern: regex, `re.fullmatch`ed against dotted module paths ("layers.0.attn.q_proj").
        The only positional argument.
      codebook: a `quipjax.codebooks` name ("E8P12" 2 bits, "E8P12RVQ3B" 3, "E8P12RVQ4B" 4,
        "HI2", ...).
      skip: leave the matched modules untouched (any module type; also shields them from
        later rules).
      group: fuse the linears of one parent module whose rules name the same group (their
        inputs must hold the same values); None: automatic grouping by shared input. It may
        refer to the pattern's capture groups ("e\\1_up": one group per expert).
      pool: (pipeline) the linears' inputs are routed (a mixture's experts): rows that are
        all zero are tokens sent elsewhere and are not counted, and a group with fewer tokens
        than its input dimension takes the pooled Hessian of the groups of its pool
        (`quipjax.pipeline.hessians.pool_starved`).
      scale, sigma_reg, rotation, tune_iters: `quipjax.quantize_linear`'s settings (scale
        None: the codebook's default; rotation one of "auto", "hadamard", "rfft", "identity").
    """

    pattern: str = dataclasses.field(kw_only=False)
    codebook: str = "E8P12"
    skip: bool = False
    group: Optional[str] = None
    scale: Optional[float] = None
    sigma_reg: float = 1e-2
    rotation: str = "auto"
    tune_iters: int = 0
    pool: Optional[str] = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"{self!r}: pattern is not a valid regex ({e})") from None
        if self.skip:
            return
        try:
            codebooks.get(self.codebook)
            check_settings(self.codebook, self.scale, self.sigma_reg)
        except ValueError as e:
            raise ValueError(f"{self!r}: {e}") from None
        if self.rotation not in ROTATIONS:
            raise ValueError(f"{self!r}: rotation must be one of {ROTATIONS}")
        if not (isinstance(self.tune_iters, int) and self.tune_iters >= 0):
            raise ValueError(f"{self!r}: tune_iters must be an int >= 0")

    def settings(self) -> dict:
        """The keyword arguments of `quipjax.quantize_linear` this rule sets."""
        return dict(codebook=self.codebook, scale=self.scale, sigma_reg=self.sigma_reg,
                    rotation=self.rotation, tune_iters=self.tune_iters)

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    def group_name(self, path: str) -> Optional[str]:
        """`group` with the capture groups of the pattern's match of `path` filled in."""
        if self.group is None:
            return None
        return re.fullmatch(self.pattern, path).expand(self.group)


def first_match(rules: Sequence[Rule], path: str) -> Optional[int]:
    """Index of the first rule matching `path` (the one that decides), or None."""
    return next((i for i, r in enumerate(rules) if r.matches(path)), None)


def rules_to_json(rules: Sequence[Rule]) -> list:
    """Rules as a list of JSON objects (every field)."""
    return [dataclasses.asdict(r) for r in rules]


def rules_from_json(items, where: str = "rules", defaults: Optional[dict] = None) -> tuple:
    """Rules from a list of JSON objects (fields of `Rule`; `defaults` fills the fields an
    object leaves out). Errors name `where` and the entry."""
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a JSON list of rule objects, got {type(items).__name__}")
    names = {f.name for f in dataclasses.fields(Rule)}
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "pattern" not in item:
            raise ValueError(f"{where}: entry {k} is not an object with a \"pattern\"")
        unknown = sorted(set(item) - names)
        if unknown:
            raise ValueError(f"{where}: entry {k} has unknown fields {unknown}; a rule has "
                             f"{sorted(names)}")
        try:
            out.append(Rule(**dict(defaults or {}, **item)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: entry {k}: {e}") from None
    return tuple(out)
