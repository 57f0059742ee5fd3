"""Qwix-style rules: quantize the linears of ANY Flax NNX model with QuIP#.

    rules = [
        quipjax.Rule(r".*attn\\.(q|k|v)_proj", codebook="E8P12"),  # fused: they share an input
        quipjax.Rule(r".*mlp\\.down", codebook="E8P12RVQ3B"),      # mixed precision per rule
        quipjax.Rule(r".*lm_head|.*embed.*", skip=True),
    ]
    plan = quipjax.find_groups(model, rules, example)        # inspect the groups (optional)
    stats = quipjax.calibrate(model, rules, batches)         # Hessians of every group's input
    qmodel = quipjax.rules.quantize(model, rules, stats, key=jax.random.key(0))

(`quipjax.rules.quantize` is exported flat as `quipjax.quantize_with_rules`: the name
`quipjax.quantize` is the numerics module.)

Rules are matched against dotted module paths ("layers.0.attn.q_proj", from
`nnx.iter_modules`) with `re.fullmatch`; the first matching rule wins; unmatched modules stay
untouched. Supported linears (`KINDS`): `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum`
when they are plain matmuls (they contract the trailing axes of their input), and
`quipjax.models.llama.Linear`. Each becomes an (out, in) = (m, n) float32 matrix.

Groups: linears that read the same input tensor (the same traced array, found by tracing the
model once on example inputs) are fused into one row-stacked matrix with one Hessian and one
input-side RHT (`quipjax.group`); `Rule(group=name)` fuses explicitly instead (the linears of
one parent module whose rules give the same name). Every member of a group needs the same
settings. Each group's sign key is `key_for_group(key, group.name)`: the same key gives the
same codes whatever the other rules.

The quantized model is a new NNX module (the input is untouched): its matched linears are
`quipjax.layers.generic.CodesMember`s reading one shared `quipjax.layers.codes.CodesGroup`
per group (the decode-matmul kernels of `quipjax.kernels`), or, with linears="dequantized",
the model's own linears holding the dequantized weights. It splits, merges, jits and
saves/restores with orbax like any NNX module (`empty_groups` builds a restore target).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import hessian
from quipjax.group import QuantizedGroup, quantize_group
from quipjax.layers.codes import CodesGroup
from quipjax.layers.generic import CodesMember, InputRecorder
from quipjax.models.adapter import get_path as get_module, set_path as set_module
from quipjax.rule import Rule
from quipjax.models.llama import Linear as LlamaLinear
from quipjax.quantize import quantize_linear

__all__ = ["Rule", "Site", "Group", "Plan", "Calibration", "KINDS", "find_groups", "calibrate",
           "quantize_groups", "apply_groups", "quantize", "empty_groups", "key_for_group",
           "linear_kind", "einsum_layout", "get_module", "set_module"]

# ------------------------------------------------------------------------------- linear kinds

class LinearKind:
    """How one kind of linear module maps to an (out, in) = (m, n) matrix.

    `layout(path, module)` -> (in_shape, out_shape): the trailing input dims it contracts and
    its output dims (a ValueError naming `path` when it is not a plain matmul);
    `matrix(module)` -> (m, n) float32 numpy; `write(module, W)` stores an (m, n) matrix back
    (in the module's own layout and dtype); `bias(module)` -> its bias `nnx.Param` or None."""

    name = "linear"

    def layout(self, path: str, module) -> tuple:
        raise NotImplementedError

    def matrix(self, module) -> np.ndarray:
        raise NotImplementedError

    def write(self, module, W) -> None:
        raise NotImplementedError

    def bias(self, module):
        return getattr(module, "bias", None)


class FlaxLinear(LinearKind):
    """`nnx.Linear`: kernel (in, out), y = x @ kernel + bias."""

    name = "nnx.Linear"

    def layout(self, path, module):
        return (int(module.in_features),), (int(module.out_features),)

    def matrix(self, module):
        return np.asarray(module.kernel[...], np.float32).T

    def write(self, module, W):
        module.kernel[...] = jnp.asarray(W).T.astype(module.kernel.dtype)


class FlaxLinearGeneral(LinearKind):
    """`nnx.LinearGeneral` without batch axes, contracting the trailing input axes
    (axis = (-k, ..., -1)): kernel (*in_features, *out_features)."""

    name = "nnx.LinearGeneral"

    def layout(self, path, module):
        k = len(module.in_features)
        if module.batch_axis or tuple(module.axis) != tuple(range(-k, 0)):
            raise ValueError(
                f"{path}: nnx.LinearGeneral with axis={module.axis}, batch_axis="
                f"{dict(module.batch_axis)} is not a plain matmul over the trailing input axes; "
                f"quipjax.rules needs axis={tuple(range(-k, 0))} and no batch_axis (or skip it "
                "with Rule(..., skip=True))")
        return tuple(map(int, module.in_features)), tuple(map(int, module.out_features))

    def matrix(self, module):
        kern = np.asarray(module.kernel[...], np.float32)
        n = math.prod(module.in_features)
        return kern.reshape(n, -1).T

    def write(self, module, W):
        shape = module.kernel.shape
        module.kernel[...] = jnp.asarray(W).T.reshape(shape).astype(module.kernel.dtype)


def einsum_layout(eq: str, kernel_shape) -> Optional[tuple]:
    """(in_shape, out_shape, perm) of an einsum "lhs,rhs->out" (rhs: the kernel) that is a
    plain matmul: lhs = [...]batch+contracted, out = [...]batch+outs, rhs a permutation of
    contracted+outs; perm orders the kernel axes as (contracted, outs). None otherwise."""
    eq = eq.replace(" ", "")
    if eq.count(",") != 1 or "->" not in eq:
        return None
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    if "..." in rhs or lhs.find("...") not in (-1, 0) or out.find("...") != lhs.find("..."):
        return None
    l, o = lhs.replace("...", ""), out.replace("...", "")
    if "." in l + o + rhs or any(len(set(s)) != len(s) for s in (l, o, rhs)):
        return None
    contracted = [c for c in l if c in rhs and c not in o]
    batch = [c for c in l if c not in rhs]
    outs = [c for c in o if c not in l]
    if (not contracted or l != "".join(batch + contracted) or o != "".join(batch + outs)
            or sorted(rhs) != sorted(contracted + outs) or len(rhs) != len(kernel_shape)):
        return None
    perm = tuple(rhs.index(c) for c in contracted + outs)
    dims = [int(kernel_shape[p]) for p in perm]
    return tuple(dims[:len(contracted)]), tuple(dims[len(contracted):]), perm


class FlaxEinsum(LinearKind):
    """`nnx.Einsum` whose equation is a plain matmul (`einsum_layout`), e.g. "...d,df->...f"
    or "btd,dhk->bthk"; the bias (any shape of the output size) broadcast on the outputs."""

    name = "nnx.Einsum"

    def _layout(self, path, module):
        eq = getattr(module, "einsum_str", None)
        lay = None if eq is None else einsum_layout(eq, module.kernel.shape)
        if lay is None:
            raise ValueError(
                f"{path}: nnx.Einsum {eq!r} is not a plain matmul (the kernel must contract the "
                "trailing input axes and produce the trailing output axes, with no axis shared "
                "by input, kernel and output, and an einsum_str set at construction); skip it "
                "with Rule(..., skip=True)")
        return lay

    def layout(self, path, module):
        return self._layout(path, module)[:2]

    def matrix(self, module):
        ins, outs, perm = self._layout("", module)
        kern = np.transpose(np.asarray(module.kernel[...], np.float32), perm)
        return kern.reshape(math.prod(ins), math.prod(outs)).T

    def write(self, module, W):
        ins, outs, perm = self._layout("", module)
        k = jnp.asarray(W).T.reshape(ins + outs)
        module.kernel[...] = jnp.transpose(k, np.argsort(perm)).astype(module.kernel.dtype)


class QuipjaxLinear(LinearKind):
    """`quipjax.models.llama.Linear`: weight (out, in)."""

    name = "quipjax.models.llama.Linear"

    def layout(self, path, module):
        m, n = module.weight.shape
        return (int(n),), (int(m),)

    def matrix(self, module):
        return np.asarray(module.weight[...], np.float32)

    def write(self, module, W):
        module.weight[...] = jnp.asarray(W).astype(module.weight.dtype)


# (module type, adapter): the first isinstance match wins
KINDS = ((nnx.LinearGeneral, FlaxLinearGeneral()), (nnx.Linear, FlaxLinear()),
         (nnx.Einsum, FlaxEinsum()), (LlamaLinear, QuipjaxLinear()))


def linear_kind(module) -> Optional[LinearKind]:
    """The `LinearKind` adapter of a module (`KINDS`), None for anything else."""
    for cls, kind in KINDS:
        if isinstance(module, cls):
            return kind
    return None


# ------------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Site:
    """One matched linear. path: dotted module path; kind: `LinearKind.name`; in_shape: the
    trailing input dims it contracts (n = their product); out_shape: its output dims (m =
    their product); out_dtype: its output dtype name (as traced); rule: the `Rule` index."""

    path: str
    kind: str
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    out_dtype: str
    rule: int

    @property
    def n(self) -> int:
        return math.prod(self.in_shape)

    @property
    def m(self) -> int:
        return math.prod(self.out_shape)


@dataclasses.dataclass(frozen=True)
class Group:
    """Linears quantized as one row-stacked (sum of m, n) matrix with one Hessian.

    name: "layers.0.attn.q_proj+k_proj+v_proj" (automatic) or "<parent>.<group>" (explicit);
    members: `Site`s in row order; rule: the `Rule` all members share the settings of;
    explicit: True for a `Rule(group=...)` group."""

    name: str
    members: Tuple[Site, ...]
    rule: Rule
    explicit: bool = False

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(s.path for s in self.members)

    @property
    def n(self) -> int:
        return self.members[0].n

    @property
    def rows(self) -> Tuple[int, ...]:
        return tuple(s.m for s in self.members)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The groups the rules chose (hashable: a static pytree field of `Calibration`)."""

    rules: Tuple[Rule, ...]
    groups: Tuple[Group, ...]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} groups"]
        for g in self.groups:
            lines.append(f"  {g.name}: {g.rule.codebook}, ({sum(g.rows)}, {g.n}) from "
                         f"{len(g.members)} linear(s){' [explicit]' if g.explicit else ''}")
        return "\n".join(lines)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _match(model, rules: Sequence[Rule]) -> Dict[str, tuple]:
    """{path: (rule index, module)} of the linears the non-skip rules take; raises for an
    unused rule and for a non-skip rule on a module that is not a supported linear."""
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be quipjax.Rule values, got {r!r}")
    used, out, seen = [False] * len(rules), {}, []
    for path, module in nnx.iter_modules(model):
        if not path:
            continue
        p = _path_str(path)
        seen.append(p)
        hits = [i for i, r in enumerate(rules) if r.matches(p)]
        for i in hits:
            used[i] = True
        if not hits or rules[hits[0]].skip:
            continue
        i = hits[0]
        kind = linear_kind(module)
        if kind is None:
            raise ValueError(
                f"rule {i} {rules[i]!r} matches {p}, a {type(module).__module__}."
                f"{type(module).__name__}, which is not a supported linear "
                f"({', '.join(k.name for _, k in KINDS)}): narrow its pattern, or put a "
                f"Rule(..., skip=True) for {p} before it")
        kind.layout(p, module)                      # raises for a non-plain matmul
        out[p] = (i, module)
    for i, u in enumerate(used):
        if not u:
            raise ValueError(f"rule {i} {rules[i]!r} matches no module of the model (module "
                             f"paths look like {seen[:4]}): fix its pattern or remove it")
    return out


def _as_args(batch) -> tuple:
    """A batch as positional arguments of model(...): a tuple/list as is, else (batch,)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _recorded(model, paths, log=None):
    """Wrap the linears at `paths` of `model` (a merged copy, inside a trace) in
    `InputRecorder`s (appending their path to `log` at each call); returns {path: recorder}."""
    recs = {}
    for p in paths:
        recs[p] = InputRecorder(get_module(model, p), p, log)
        set_module(model, p, recs[p])
    return recs


def _trace(model, paths, args) -> tuple:
    """({path: [(input id, input shape, output dtype name) per call]}, [paths in the order
    of their first call]) from one abstract call of model(*args) (`jax.eval_shape`): equal
    ids = the same traced input array."""
    graphdef, state = nnx.split(model)
    info, log = {}, []

    def run(state, args):
        m = nnx.merge(graphdef, state)
        recs = _recorded(m, paths, log)
        m(*args)
        ids = {}
        for p, rec in recs.items():
            info[p] = [(ids.setdefault(id(x), len(ids)), tuple(x.shape), jnp.dtype(y.dtype).name)
                       for x, y in rec.calls.get_value()]
            # keep the tracers alive until every id is read (ids are unique while alive)
        return None

    jax.eval_shape(run, state, args)
    return info, list(dict.fromkeys(log))


def _site(path, module, rule_index, calls) -> Site:
    kind = linear_kind(module)
    ins, outs = kind.layout(path, module)
    if not calls:
        raise ValueError(f"{path} is matched by a rule but the model never called it on the "
                         "example inputs: nothing to calibrate; skip it (Rule(..., skip=True)) "
                         "or give inputs that reach it")
    for _, shape, _ in calls:
        if tuple(shape[len(shape) - len(ins):]) != ins:
            raise ValueError(f"{path} ({kind.name}) contracts input dims {ins} but was called "
                             f"with inputs of shape {shape}")
    return Site(path, kind.name, ins, outs, calls[0][2], rule_index)


def _group_name(paths) -> str:
    parents = {p.rpartition(".")[0] for p in paths}
    if len(paths) > 1 and len(parents) == 1:
        parent = parents.pop()
        return (parent + "." if parent else "") + "+".join(p.rpartition(".")[2] for p in paths)
    return "+".join(paths)


def _make_group(name, sites, rules, explicit) -> Group:
    r0 = rules[sites[0].rule]
    for s in sites[1:]:
        if rules[s.rule].settings() != r0.settings():
            raise ValueError(
                f"group {name}: {sites[0].path} (rule {sites[0].rule}: {r0.settings()}) and "
                f"{s.path} (rule {s.rule}: {rules[s.rule].settings()}) read the same input and "
                "are fused into one matrix, so they need the same codebook and settings: give "
                "them the same settings, or separate them with different Rule(group=...) names")
        if s.in_shape != sites[0].in_shape:
            raise ValueError(f"group {name}: {s.path} contracts input dims {s.in_shape}, "
                             f"{sites[0].path} {sites[0].in_shape}: they cannot share an input")
    return Group(name, tuple(sites), r0, explicit)


def find_groups(model, rules: Sequence[Rule], example) -> Plan:
    """The groups `calibrate` and `quantize` will use, found by tracing the model once.

    Args:
      model: an NNX module; model(*args) runs it (put it in eval mode first).
      rules: `Rule`s (first match wins).
      example: one batch: a tuple of positional arguments of model(...), or one array. Only
        its shapes and dtypes are used (`jax.eval_shape`: no computation).
    Returns:
      A `Plan`: linears whose rules have no `group` and that receive the same traced input
      array (in every call) form one automatic group; linears of one parent module whose
      rules name the same `group` form an explicit one. Members and groups are in the order
      the model first calls them (rows are stacked in that order).
    Raises:
      ValueError: a rule that matches no module, a non-skip rule on an unsupported module, a
        matched linear the example never calls, members of a group with different settings.
    """
    rules = tuple(rules)
    matched = _match(model, rules)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                        _as_args(example))
    info, order = _trace(model, list(matched), args)
    buckets: Dict[Any, list] = {}
    for p in order + [p for p in matched if p not in order]:   # uncalled ones raise in _site
        i, module = matched[p]
        site = _site(p, module, i, info[p])
        r = rules[i]
        key = (("explicit", p.rpartition(".")[0], r.group) if r.group is not None
               else ("auto", tuple(c[0] for c in info[p])))
        buckets.setdefault(key, []).append(site)
    groups = []
    for key, sites in buckets.items():
        explicit = key[0] == "explicit"
        name = ((key[1] + "." if key[1] else "") + key[2]) if explicit else _group_name(
            [s.path for s in sites])
        groups.append(_make_group(name, sites, rules, explicit))
    return Plan(rules, tuple(groups))


# ------------------------------------------------------------------------------- calibrate

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `calibrate` returns: a pytree.

    hessians: {group name: `quipjax.hessian.HessianStats`} (H (n, n) float32 = E[x x^T] over
    every row of every call of the group's input x (..., *in_shape) flattened to (-1, n);
    mean (n,); count () float32 rows). plan (static): the `Plan` they belong to."""

    hessians: Dict[str, hessian.HessianStats]
    plan: Plan = dataclasses.field(metadata=dict(static=True))


def _calibration_step(model, plan: Plan):
    """A jitted (state, accumulators, args) -> (accumulators, explicit-group input
    equality flags) over a merged copy of `model` with recorders on every member."""
    graphdef, _ = nnx.split(model)
    paths = [p for g in plan.groups for p in g.paths]

    @jax.jit
    def step(state, accs, args):
        m = nnx.merge(graphdef, state)
        recs = _recorded(m, paths)
        m(*args)
        new, same = {}, {}
        for g in plan.groups:
            calls = [x for x, _ in recs[g.paths[0]].calls.get_value()]
            acc = accs[g.name]
            for x in calls:
                acc = hessian.update(acc, x.reshape(-1, g.n))
            new[g.name] = acc
            if g.explicit:
                same[g.name] = _same_inputs(
                    calls, [[x for x, _ in recs[p].calls.get_value()] for p in g.paths[1:]])
        return new, same

    return step


def _same_inputs(calls, others) -> jax.Array:
    """() bool: every member's list of inputs equals the first member's `calls`."""
    ok = jnp.array(True)
    for o in others:
        if len(o) != len(calls):
            return jnp.array(False)
        for a, b in zip(o, calls):
            ok = ok & jnp.array_equal(a, b)
    return ok


def calibrate(model, rules: Sequence[Rule], batches: Iterable, *, plan: Optional[Plan] = None,
              progress: bool = False) -> Calibration:
    """Accumulate the Hessian of every group's input over `batches`.

    Args:
      model: an NNX module in eval mode; it is not modified.
      rules: `Rule`s (see `find_groups`).
      batches: an iterable of batches, each a tuple of positional arguments of model(...) or
        one array; every batch of the same shapes reuses one compiled step.
      plan: the `Plan` to use (default: `find_groups` on the first batch).
      progress: print one line per batch.
    Returns:
      A `Calibration` (float32 double-float sums, `quipjax.hessian.update`, one jitted step
      per batch shape).
    Raises:
      ValueError: no batches; an explicit group whose members saw different inputs; and
        everything `find_groups` raises.
    """
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("calibrate needs at least one batch") from None
    plan = plan if plan is not None else find_groups(model, rules, first)
    step = _calibration_step(model, plan)
    _, state = nnx.split(model)
    accs = {g.name: hessian.init(g.n) for g in plan.groups}
    for b, batch in enumerate(_chain(first, it)):
        accs, same = step(state, accs, _as_args(batch))
        bad = [name for name, ok in same.items() if not bool(ok)]
        if bad:
            raise ValueError(f"explicit group(s) {bad}: the members' inputs differ in batch {b}; "
                             "a Rule(group=...) may only fuse linears that read the same values")
        if progress:
            print(f"calibrate: batch {b + 1}", flush=True)
    return Calibration({name: hessian.finalize(a) for name, a in accs.items()}, plan)


def _chain(first, rest):
    yield first
    yield from rest


# ------------------------------------------------------------------------------- quantize

def key_for_group(key: jax.Array, name: str) -> jax.Array:
    """The sign key of the group `name`: `key` folded with the CRC-32 of the name, so a
    group's codes depend only on (key, its name, its weights, its Hessian, its rule)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _replan(model, rules: Sequence[Rule], plan: Plan) -> Plan:
    """`plan` with the settings of `rules` (they may change codebooks and settings, not the
    grouping); raises when the rules select other linears or groups than the plan's."""
    rules = tuple(rules)
    matched = _match(model, rules)
    planned = {p for g in plan.groups for p in g.paths}
    if set(matched) != planned:
        raise ValueError(
            f"the rules select other linears than the calibration's: new "
            f"{sorted(set(matched) - planned)[:4]}, dropped {sorted(planned - set(matched))[:4]}:"
            " calibrate again with these rules")
    groups = []
    for g in plan.groups:
        sites = [dataclasses.replace(s, rule=matched[s.path][0]) for s in g.members]
        names = {rules[s.rule].group for s in sites}
        if names != {plan.rules[s.rule].group for s in g.members}:
            raise ValueError(f"group {g.name}: the rules' group= names changed since "
                             "calibration: calibrate again with these rules")
        groups.append(_make_group(g.name, sites, rules, g.explicit))
    return Plan(rules, tuple(groups))


def quantize_groups(model, rules: Sequence[Rule], stats: Calibration, *,
                    key: jax.Array) -> Dict[str, QuantizedGroup]:
    """{group name: `QuantizedGroup`}: each group's members' (m_i, n) float32 matrices fused
    and quantized with its rule's settings (`quipjax.quantize_group`) against its Hessian,
    with the sign key `key_for_group(key, name)`. `rules` may change the settings (codebooks,
    scales...) of the calibration's rules, not the grouping."""
    plan = _replan(model, rules, stats.plan)
    out = {}
    for g in plan.groups:
        weights = []
        for s in g.members:
            module = get_module(model, s.path)
            kind = linear_kind(module)
            if kind is None or kind.layout(s.path, module) != (s.in_shape, s.out_shape):
                raise ValueError(f"{s.path}: the model's module differs from the calibrated "
                                 f"{s.kind} {s.in_shape} -> {s.out_shape}")
            weights.append(kind.matrix(module))
        out[g.name] = quantize_group(weights, stats.hessians[g.name].H,
                                     key=key_for_group(key, g.name), members=g.paths,
                                     **g.rule.settings())
    return out


def apply_groups(model, stats: Calibration, groups: Dict[str, QuantizedGroup], *,
                 linears: str = "codes", backend: str = "auto", dtype=jnp.float32):
    """A new model (`model` untouched) with the quantized `groups` in place.

    linears: "codes": each member becomes a `CodesMember` of one shared `CodesGroup` per group
    (decode-matmul `backend`, rotated inputs fed to the kernel in `dtype`; outputs in the FP
    linear's dtype, biases kept), built in one `nnx.jit` program (the codes conversion is
    integer work and row scales one product: the eager bits); "dequantized": the model's own
    linears hold the dequantized weights (in their parameter dtype and layout), computed
    eagerly (`QuantizedGroup.dequantize_members`). Works under `nnx.eval_shape`."""
    if linears not in ("codes", "dequantized"):
        raise ValueError(f"linears must be 'codes' or 'dequantized', got {linears!r}")
    for g in stats.plan.groups:
        if g.name not in groups:
            raise ValueError(f"no quantized group {g.name!r} (have {sorted(groups)[:4]}...)")
        qg = groups[g.name]
        if tuple(qg.rows) != g.rows or tuple(qg.ql.shape) != (sum(g.rows), g.n):
            raise ValueError(f"group {g.name}: quantized rows {qg.rows} / shape {qg.ql.shape} "
                             f"!= planned {g.rows} / {(sum(g.rows), g.n)}")
    groups = {g.name: groups[g.name] for g in stats.plan.groups}
    if linears == "codes":
        return _with_codes(model, groups, stats.plan, backend, jnp.dtype(dtype).name)
    new = nnx.clone(model)
    for g in stats.plan.groups:
        for s, w in zip(g.members, groups[g.name].dequantize_members()):
            module = get_module(new, s.path)
            linear_kind(module).write(module, w)
    return new


@functools.partial(nnx.jit, static_argnames=("plan", "backend", "dtype"))
def _with_codes(model, groups, plan: Plan, backend: str, dtype: str):
    new = nnx.clone(model)
    for g in plan.groups:
        cg = CodesGroup(groups[g.name], backend, dtype)
        for i, s in enumerate(g.members):
            bias = linear_kind(get_module(new, s.path)).bias(get_module(new, s.path))
            set_module(new, s.path, CodesMember(cg, i, s.in_shape, s.out_shape, bias, s.out_dtype))
    return new


def quantize(model, rules: Sequence[Rule], stats: Calibration, *, key: jax.Array,
             linears: str = "codes", backend: str = "auto", dtype=jnp.float32):
    """Quantize the linears the rules select; returns a new model (`model` untouched).

    `quantize_groups` (one `quipjax.quantize_group` per group, keys `key_for_group(key,
    name)`: the same key gives the same codes) then `apply_groups` (linears "codes" or
    "dequantized", `backend`, `dtype`: see there)."""
    groups = quantize_groups(model, rules, stats, key=key)
    return apply_groups(model, stats, groups, linears=linears, backend=backend, dtype=dtype)


def empty_groups(stats: Calibration) -> Dict[str, QuantizedGroup]:
    """{group name: `QuantizedGroup`} of zeros with the shapes, dtypes and static metadata
    (codebook, rotations) `quantize_groups` gives: with `apply_groups` under `nnx.eval_shape`,
    the abstract target an orbax restore of a quantized model's state needs."""
    out = {}
    for g in stats.plan.groups:
        m, n = sum(g.rows), g.n
        settings = g.rule.settings()
        abstract = jax.eval_shape(
            lambda W, H: quantize_linear(W, H, key=jax.random.key(0), **settings),
            jax.ShapeDtypeStruct((m, n), jnp.float32), jax.ShapeDtypeStruct((n, n), jnp.float32))
        ql = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        out[g.name] = QuantizedGroup(ql=ql, scales=jnp.ones((len(g.rows),), jnp.float32),
                                     members=g.paths, rows=g.rows)
    return out
