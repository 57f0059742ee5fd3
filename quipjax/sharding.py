"""Meshes, partition rules and the multi-device programs of the pipeline.

One program for any number of devices (`--mesh=data:8`, `--mesh=data:2,model:4`), built from
`jax.jit` shardings and `jax.shard_map`:

* mesh axes: "data" and "model". Batches (calibration and evaluation windows, stacks of
  matrices to quantize) are split over both axes together (`BATCH`): every device works on
  its own windows or matrices. "model" additionally shards the weights (FP, dequantized or
  tunable) by output rows (`RULES`): a device stores 1/model of each weight and gathers a
  block's weights when it runs that block (ZeRO-3 / FSDP style). A device's arithmetic is
  then exactly the one-device program on its own windows, so results do not depend on the
  mesh (tested bit for bit), on CPUs and GPUs alike (tensor-parallel matmul slices would
  change the summation order).
* Hessian collection (`HessianEngine`): shard_map over `BATCH`; each device runs the block on
  its windows and adds the X^T X of each linear group's input to its own accumulators. The
  windows are dealt round robin to a fixed number of accumulator slots (`hessian_shards`,
  default 8) whatever the mesh; at the end of a layer the slots are combined with an exact
  (order-independent) sum whose cross-device part is a psum: an all-reduce. The Hessians,
  hence the codes, are the same bits on 1 or 8 devices.
* Quantization (`quantize_stack`): independent same-shaped matrices (one group type of
  several layers) are stacked and quantized one per device: shard_map over the stack axis of
  the very functions `quantize.quantize_linear` runs (same runtime arguments), so the codes are
  those of the one-device path; the programs contain no collective.
* Evaluation (`perplexity`) and fine-tuning: parameters placed by `RULES`, batches over
  `BATCH`; evaluation is exact, fine-tuning (gradients summed over devices) is not bit-equal.
* Planning (`plan`): memory per device and time of each stage from a model's config and
  measured per-unit costs (experiments/plan.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quipjax import hessian as _hessian

__all__ = ["AXES", "BATCH", "DEFAULT_HESSIAN_SHARDS", "mesh_shape", "parse_mesh", "describe", "num_devices",
           "RULES", "spec_for", "state_specs", "shard_state", "shard_module", "batch_spec",
           "put_batch", "block_forward", "block_forward_fn", "HessianEngine", "exact_merge", "quantize_stack",
           "quantize_layers_distributed", "perplexity", "abstract_model", "load_model_sharded",
           "collectives", "random_block", "plan", "PlanCosts"]

AXES = ("data", "model")
BATCH = ("data", "model")            # batch / stack axis: every device
DEFAULT_HESSIAN_SHARDS = 8


# ---------------------------------------------------------------------------- meshes

def mesh_shape(spec: Optional[str]) -> dict:
    """{"data": a, "model": b} from a --mesh string ("data:8", "data:2,model:4", "model:8");
    an axis left out has size 1; None or "" is {"data": 1, "model": 1}. Clear errors."""
    if spec is None or not spec.strip():
        return {a: 1 for a in AXES}
    sizes = {}
    for part in spec.split(","):
        part = part.strip()
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--mesh={spec!r}: each axis is written name:size (e.g. data:8 or "
                             f"data:2,model:4), got {part!r}")
        if name not in AXES:
            raise ValueError(f"--mesh={spec!r}: unknown axis {name!r}; the axes are 'data' "
                             "(windows and matrices are split over it) and 'model' (weights "
                             "are sharded over it)")
        if name in sizes:
            raise ValueError(f"--mesh={spec!r}: axis {name!r} is given twice")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"--mesh={spec!r}: the size of axis {name!r} must be a positive "
                             f"integer, got {size!r}") from None
        if n < 1:
            raise ValueError(f"--mesh={spec!r}: the size of axis {name!r} must be >= 1, got {n}")
        sizes[name] = n
    return {a: sizes.get(a, 1) for a in AXES}


def parse_mesh(spec: Optional[str], devices: Optional[Sequence] = None,
               n_devices: Optional[int] = None) -> Optional[Mesh]:
    """A Mesh with axes ("data", "model") from "data:8", "data:2,model:4", "model:8".

    None or "" means no mesh (one device, the default programs). An axis left out has size 1.
    The sizes must multiply to the number of devices. `n_devices` checks a spec against a
    device count without building a mesh (returns None).
    """
    if spec is None or not spec.strip():
        return None
    shape = tuple(mesh_shape(spec)[a] for a in AXES)
    total = int(np.prod(shape))
    if devices is None and n_devices is None:
        devices = jax.devices()
    have = len(devices) if devices is not None else n_devices
    if total != have:
        platform = devices[0].platform + " " if devices is not None and len(devices) else ""
        raise ValueError(
            f"--mesh={spec!r} needs {total} devices but {have} {platform}devices are visible: "
            f"the axis sizes must multiply to the device count (for {have} devices e.g. "
            f"data:{have}" + (f" or data:{have // 2},model:2" if have % 2 == 0 and have > 1 else "")
            + "); use CUDA_VISIBLE_DEVICES to use fewer GPUs, or "
            "--cpu_devices / XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate "
            "devices on a CPU")
    if devices is None:
        return None
    return Mesh(np.asarray(devices).reshape(shape), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def one_device_mesh() -> Mesh:
    """The mesh of the default (no --mesh) programs: the first device, axes of size 1."""
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        return "no mesh (1 device)"
    return (",".join(f"{a}:{mesh.shape[a]}" for a in AXES)
            + f" ({mesh.size} {mesh.devices.flat[0].platform} devices)")


def num_devices(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.size


# ---------------------------------------------------------------------------- partition rules

# (regex on the parameter path, spec). Weights are (out, in): sharded by output rows over
# "model" (storage only: a block gathers its weights to run). First match wins.
RULES = (
    (r"(.*\.)?(q|k|v|o|gate|up|down)_proj\.weight", P("model", None)),
    (r"(.*\.)?(q|k|v|o|gate|up|down)_proj\.R", P("model", None)),     # TunableQuantLinear
    (r"(.*\.)?lm_head\.weight", P("model", None)),
    (r"embed_tokens", P("model", None)),
    (r".*", P()),                                                        # norms, su/sv, biases
)


def _path_str(path) -> str:
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name == "value":
            continue
        parts.append(str(name))
    return ".".join(parts)


def spec_for(path: str, shape, mesh: Mesh, rules=RULES) -> P:
    """The PartitionSpec of the parameter at `path` ("layers.3.mlp.up_proj.weight"):
    the first matching rule, replicated where a sharded dimension is not divisible."""
    for rx, spec in rules:
        if re.fullmatch(rx, path):
            for dim, ax in enumerate(spec):
                if ax is None:
                    continue
                size = int(np.prod([mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,))]))
                if dim >= len(shape) or shape[dim] % size:
                    return P()
            return spec
    return P()


def state_specs(state, mesh: Mesh, rules=RULES):
    """A pytree of PartitionSpecs (as `jax.tree.leaves` order: a list) for an nnx State."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [spec_for(_path_str(p), np.shape(x), mesh, rules) for p, x in leaves]


def shard_state(state, mesh: Mesh, rules=RULES):
    """`state` with every leaf placed by the rules."""
    leaves, tdef = jax.tree.flatten(state)
    specs = state_specs(state, mesh, rules)
    out = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    return jax.tree.unflatten(tdef, out)


def shard_module(module, mesh: Optional[Mesh], rules=RULES):
    """Place a module's variables by the rules (in place); returns the module."""
    if mesh is None:
        return module
    state = nnx.state(module)
    nnx.update(module, shard_state(state, mesh, rules))
    return module


def batch_spec(mesh: Mesh, n: int) -> P:
    """Split a leading batch of n over every device if possible, else over "data", else none."""
    if n % mesh.size == 0:
        return P(BATCH)
    if n % mesh.shape["data"] == 0 and mesh.shape["data"] > 1:
        return P("data")
    return P()


def put_batch(tree, mesh: Optional[Mesh]):
    """Place arrays with a leading batch dimension across the mesh (see `batch_spec`)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.device_put(
        a, NamedSharding(mesh, batch_spec(mesh, np.shape(a)[0]))), tree)


def _gather(leaves, specs, mesh):
    """Inside shard_map: all-gather the leaves sharded over "model" (full weights)."""
    out = []
    for x, s in zip(leaves, specs):
        for dim, ax in enumerate(s):
            if ax is not None and mesh.shape[ax] > 1:
                x = jax.lax.all_gather(x, ax, axis=dim, tiled=True)
        out.append(x)
    return out


def _flatten_state(module):
    graphdef, state = nnx.split(module)
    leaves, tdef = jax.tree.flatten(state)
    return graphdef, tdef, leaves


# ---------------------------------------------------------------------------- block forward

@functools.lru_cache(maxsize=64)
def _forward_program(graphdef, tdef, mesh, specs):
    def body(leaves, x):
        leaves = _gather(leaves, specs, mesh)
        block = nnx.merge(graphdef, jax.tree.unflatten(tdef, leaves))
        return block(x, jnp.arange(x.shape[1]))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(list(specs), P(BATCH)),
                                 out_specs=P(BATCH), check_vma=False))


def block_forward_fn(block, mesh: Mesh) -> Callable:
    """x (B, T, d) -> block(x) with the windows split over every device (B % devices == 0);
    each device computes exactly the one-device batch of its windows. The weights are placed
    on the mesh once, here: call the result for every batch."""
    graphdef, tdef, leaves = _flatten_state(block)
    specs = tuple(state_specs(jax.tree.unflatten(tdef, leaves), mesh))
    leaves = [jax.device_put(l, NamedSharding(mesh, s)) for l, s in zip(leaves, specs)]
    prog = _forward_program(graphdef, tdef, mesh, specs)
    return lambda x: prog(leaves, jax.device_put(x, NamedSharding(mesh, P(BATCH))))


def block_forward(block, x, mesh: Mesh):
    """One call of `block_forward_fn(block, mesh)` (for one batch)."""
    return block_forward_fn(block, mesh)(x)


def random_block(spec, key, dtype=jnp.bfloat16, scale: float = 0.02):
    """A block of the given LlamaSpec with N(0, scale^2) weights and unit norms (benchmarks)."""
    from quipjax.models.llama import Block
    block = nnx.eval_shape(lambda: Block(spec, dtype))
    graphdef, state = nnx.split(block)
    flat = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(key, len(flat[0]))
    vals = []
    for k, (p, leaf) in zip(keys, flat[0]):
        name = _path_str(p)
        if name.endswith("inv_freq"):
            from quipjax.models.llama import rope_frequencies
            vals.append(jnp.asarray(rope_frequencies(spec), jnp.float32))
        elif len(leaf.shape) == 1:
            vals.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            vals.append((scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(flat[1], vals))


# ---------------------------------------------------------------------------- Hessians

class _Tap(nnx.Module):
    """Wraps a linear layer: hands its input (in the weights' dtype, as it is multiplied) to
    the active capture, then calls it. (Like `pipeline.hessians.HessianRecorder`, it does not
    forward `matmul_dtype`: attention runs in float32 during Hessian collection.)"""

    sink = None

    def __init__(self, inner, name: str):
        self.inner = inner
        self.name = name

    def __call__(self, x):
        w = getattr(self.inner, "weight", None)
        xs = x.astype(w.dtype) if w is not None else x
        if _Tap.sink is not None:
            _Tap.sink[self.name] = xs
        return self.inner(x)


def _pow2(e):
    """2.0 ** e (float32, exact) for an int32 array e, clamped to the normal range."""
    e = jnp.clip(e, -126, 127).astype(jnp.int32)
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _grid_sum(terms, e, axes):
    """Exact sum of the terms rounded to the grid 2^e, and the remainders (exact).

    Every term is rounded to a multiple of u = 2^e (round, times a power of two: exact), so
    when all partial sums stay below 2^24 u (the caller's choice of e), every addition is
    exact and the result is the same in any order, on any number of devices (psum)."""
    u, inv = _pow2(e), _pow2(-e)
    qs = [jnp.round(t * inv) * u for t in terms]
    rs = [t - q for t, q in zip(terms, qs)]
    s = functools.reduce(jnp.add, [jnp.sum(q, 0) for q in qs])
    if axes:
        s = jax.lax.psum(s, axes)
    return s, rs


def exact_merge(hi, lo, n_terms: int, axes=()):
    """Sum over axis 0 (and over `axes` by psum/pmax) of the double-float values hi + lo.

    Independent of the order and the grouping of the terms: three levels of exact grid sums
    (each about 23 - log2(2 n) bits: the sum is exact to 2^-57 of the largest |hi| for 8
    terms), the last remainders dropped, then rounded to the returned renormalized (hi, lo)
    pair (2^-48 of its value). `n_terms` is the total number of terms over all devices.
    """
    m = jnp.max(jnp.abs(hi), 0)
    if axes:
        m = jax.lax.pmax(m, axes)
    e = jnp.frexp(m)[1]                                  # |hi_i| <= m < 2^e
    c1 = max(1, math.ceil(math.log2(n_terms))) if n_terms > 1 else 1
    c2 = max(1, math.ceil(math.log2(2 * n_terms)))
    e1 = e + c1 - 23                                     # n * 2^e <= 2^23 u1
    q1, r1 = _grid_sum([hi], e1, axes)
    e2 = e1 - 1 + c2 - 23                                # 2n terms below u1 / 2
    q2, r2 = _grid_sum(r1 + [lo], e2, axes)
    e3 = e2 - 1 + c2 - 23
    q3, _ = _grid_sum(r2, e3, axes)
    h, l = _hessian._two_sum(q1, jnp.zeros_like(q1), q2)
    return _hessian._two_sum(h, l, q3)


def _merge_state(st: _hessian.HessianState, n_terms, axes) -> _hessian.HessianState:
    f = list(st)
    out = []
    for i in range(0, 6, 2):
        out += list(exact_merge(f[i], f[i + 1], n_terms, axes))
    return _hessian.HessianState(*out)


@functools.lru_cache(maxsize=32)
def _hessian_programs(graphdef, tdef, mesh, specs, names, shards, acc_tdef):
    n_acc = acc_tdef.num_leaves

    def step(leaves, x, acc, j, mask):
        leaves = _gather(leaves, specs, mesh)
        block = nnx.merge(graphdef, jax.tree.unflatten(tdef, leaves))
        sink = {}
        _Tap.sink = sink
        try:
            y = block(x, jnp.arange(x.shape[1]))
        finally:
            _Tap.sink = None
        acc = jax.tree.unflatten(acc_tdef, acc)
        new = {}
        for name in names:
            st = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False),
                              acc[name])
            up = _hessian.update(st, sink[name], mask=mask)   # padding windows weigh 0
            new[name] = jax.tree.map(
                lambda A, v: jax.lax.dynamic_update_index_in_dim(A, v, j, 0), acc[name], up)
        return y, jax.tree.leaves(new)

    acc_specs = [P(BATCH)] * n_acc
    step_p = jax.jit(jax.shard_map(step, mesh=mesh,
                                   in_specs=(list(specs), P(BATCH), acc_specs, P(), P(BATCH)),
                                   out_specs=(P(BATCH), acc_specs), check_vma=False),
                     donate_argnums=(2,))

    def reduce(acc):
        acc = jax.tree.unflatten(acc_tdef, acc)
        return {name: _hessian.finalize(_merge_state(acc[name], shards, BATCH)) for name in names}

    reduce_p = jax.jit(jax.shard_map(reduce, mesh=mesh, in_specs=(acc_specs,), out_specs=P(),
                                     check_vma=False))
    return step_p, reduce_p


class HessianEngine:
    """Data-parallel Hessian collection for one block (all blocks of a model share the
    compiled programs).

        eng = HessianEngine(block, mesh, shards=8)
        for step, x in enumerate(batches):           # x (devices * b, T, d), b windows each
            y = eng.step(x, step, valid)             # block outputs, same layout
        stats = eng.finalize()                       # {group: HessianStats} (numpy)

    Window batches of b windows ("microbatches") are numbered u = step * devices + device and
    go to accumulator slot u % shards: slot s holds microbatches s, s + shards, ... in order,
    on any mesh (shards % devices == 0). Each device keeps shards / devices slots.
    """

    def __init__(self, block, mesh: Optional[Mesh], shards: int = DEFAULT_HESSIAN_SHARDS,
                 adapter=None):
        from quipjax.models.adapter import LLAMA, get_path, set_path
        adapter = adapter or LLAMA
        self.mesh = mesh if mesh is not None else one_device_mesh()
        self.devices = self.mesh.size
        if shards < 1 or shards % self.devices:
            raise ValueError(f"hessian_shards ({shards}) must be a positive multiple of the "
                             f"number of devices ({self.devices}): set --hessian_shards")
        self.shards = shards
        self.names = tuple(g.name for g in adapter.groups)
        dims = {}
        for g in adapter.groups:
            lin = get_path(block, g.members[0])
            dims[g.name] = lin.weight.shape[1]
            set_path(block, g.members[0], _Tap(lin, g.name))
        self.graphdef, self.tdef, leaves = _flatten_state(block)
        self.specs = tuple(state_specs(jax.tree.unflatten(self.tdef, leaves), self.mesh))
        self.params = [jax.device_put(l, NamedSharding(self.mesh, s))
                       for l, s in zip(leaves, self.specs)]
        acc = {name: jax.tree.map(lambda z: jnp.zeros((shards,) + z.shape, z.dtype),
                                  _hessian.init(dims[name])) for name in self.names}
        leaves, self.acc_tdef = jax.tree.flatten(acc)
        sh = NamedSharding(self.mesh, P(BATCH))
        self.acc = [jax.device_put(a, sh) for a in leaves]
        self._step, self._reduce = _hessian_programs(self.graphdef, self.tdef, self.mesh,
                                                     self.specs, self.names, shards,
                                                     self.acc_tdef)

    def step(self, x, step: int, mask=None):
        """x (devices * b, T, d) float32; mask (devices * b, T) (0: a padding window, its
        rows are not counted). Returns the block outputs (a sharded array)."""
        D = self.devices
        if x.shape[0] % D:
            raise ValueError(f"a step takes a multiple of {D} windows, got {x.shape[0]}")
        mask = np.ones(x.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
        sh = NamedSharding(self.mesh, P(BATCH))
        x = jax.device_put(np.asarray(x, np.float32), sh)
        mask = jax.device_put(mask, sh)
        j = jnp.int32(step % (self.shards // D))
        y, self.acc = self._step(self.params, x, self.acc, j, mask)
        return y

    def finalize(self) -> dict:
        """{group name: HessianStats} as numpy arrays (H (n, n), mean (n,), count ())."""
        out = self._reduce(self.acc)
        return {k: _hessian.HessianStats(*(np.asarray(a) for a in v)) for k, v in out.items()}

    def lower_step(self, x_shape):
        """The lowered step program (for HLO inspection)."""
        sh = NamedSharding(self.mesh, P(BATCH))
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=sh)
        v = jax.ShapeDtypeStruct(x_shape[:2], jnp.float32, sharding=sh)
        return self._step.lower(self.params, x, self.acc, jnp.int32(0), v)

    def lower_reduce(self):
        return self._reduce.lower(self.acc)


def collectives(hlo_text: str) -> dict:
    """Counts of collective ops in an HLO module's text."""
    ops = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in ops}


# ---------------------------------------------------------------------------- quantization

@functools.lru_cache(maxsize=64)
def _quant_programs(mesh, rotations, cb, tune_iters, buf_cols):
    from quipjax import ldlq as _ldlq
    from quipjax import quantize as _q
    sm = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    S = P(BATCH)

    def rotate(W, H, kd, sigma, rho):       # quantize._rotate_and_scale, one matrix per device
        out = _q._rotate_and_scale(W[0], H[0], jax.random.wrap_key_data(kd[0]), sigma, rho,
                                   rotations)
        return tuple(a[None] for a in out)

    def ldl(Hr):                             # jax.jit(ldlq.block_ldl)
        L, D = _ldlq.block_ldl(Hr[0])
        return L[None], D[None]

    def finite(L):
        return jnp.all(jnp.isfinite(L[0]))[None]

    def round_(W, L, H):                     # ldlq.block_ldlq -> _block_ldlq
        Hh = H[0] if tune_iters else jnp.zeros((0, 0), W.dtype)
        codes, what = _ldlq._block_ldlq(W[0], L[0], Hh, cb, tune_iters, buf_cols)
        return codes[None], what[None]

    def proxy(W, codes, SU, SV, H, sigma):   # finetune_model._proxy (info only)
        from quipjax.quantize import QuantizedLinear
        ql = QuantizedLinear(codes=codes[0], SU=SU[0], SV=SV[0], codebook=cb.name,
                             shape=W.shape[1:], transforms=(rotations[0].kind, rotations[1].kind))
        return _ldlq.proxy_loss(W[0], ql.dequantize(), _hessian.regularize(H[0], sigma))[None]

    return {
        "rotate": jax.jit(sm(rotate, in_specs=(S, S, S, P(), P()), out_specs=S)),
        "ldl": jax.jit(sm(ldl, in_specs=(S,), out_specs=S)),
        "finite": jax.jit(sm(finite, in_specs=(S,), out_specs=S)),
        "round": jax.jit(sm(round_, in_specs=(S, S, S), out_specs=S)),
        "proxy": jax.jit(sm(proxy, in_specs=(S, S, S, S, S, P()), out_specs=S)),
    }


def quantize_stack(Ws: Sequence, Hs: Sequence, keys: Sequence, mesh: Mesh, *, codebook="E8P12",
                   scale=None, sigma_reg=1e-2, tune_iters=0, rotation="auto", rounding="ldlq",
                   buf_cols=128, proxies: bool = False, return_lowered: bool = False):
    """`quantize.quantize_linear` of k same-shaped matrices, one per device at a time.

    Ws: (m, n) weights, Hs: (n, n) Hessians, keys: jax.random keys (one each). Runs the
    stages of `quantize_linear` (rotate + scale, block LDL with the float64 retry, BlockLDLQ)
    as shard_maps of the same functions with the same runtime arguments over a stack padded
    to a multiple of the device count: the codes equal `quantize_linear`'s bit for bit.
    Returns a list of `QuantizedLinear` (and, with proxies=True, a list of proxy losses).
    """
    from quipjax import codebooks as _codebooks
    from quipjax import quantize as _q
    from quipjax import rht as _rht
    cb = _codebooks.get(codebook)
    k = len(Ws)
    if not (k == len(Hs) == len(keys)) or k == 0:
        raise ValueError("quantize_stack needs as many Ws, Hs and keys, at least one")
    m, n = np.shape(Ws[0])
    for W, H in zip(Ws, Hs):
        if np.shape(W) != (m, n):
            raise ValueError(f"quantize_stack: matrices of one stack share a shape: {np.shape(W)}"
                             f" != {(m, n)}")
        _q._check_inputs(jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32), cb)
    rho = _q._check_settings(cb, scale, sigma_reg, rounding)
    rotations = (_rht.rotation(m, rotation), _rht.rotation(n, rotation))
    prog = _quant_programs(mesh, rotations, cb, int(tune_iters), int(buf_cols))
    D = mesh.size
    sh = NamedSharding(mesh, P(BATCH))
    sigma, rho32 = jnp.float32(sigma_reg), jnp.float32(rho)
    out, prox, lowered = [], [], {}
    for c0 in range(0, k, D):
        idx = [min(i, k - 1) for i in range(c0, c0 + D)]          # pad with the last matrix
        Wst = jax.device_put(np.stack([np.asarray(Ws[i], np.float32) for i in idx]), sh)
        Hst = jax.device_put(np.stack([np.asarray(Hs[i], np.float32) for i in idx]), sh)
        kd = jax.device_put(np.stack([np.asarray(jax.random.key_data(keys[i])) for i in idx]), sh)
        if return_lowered and not lowered:
            lowered["rotate"] = prog["rotate"].lower(Wst, Hst, kd, sigma, rho32)
        Wsc, Hr, SU, SV, wscale = prog["rotate"](Wst, Hst, kd, sigma, rho32)
        if rounding == "nearest":
            L = jax.device_put(np.broadcast_to(np.eye(n, dtype=np.float32), (D, n, n)), sh)
        else:
            if return_lowered and "ldl" not in lowered:
                lowered["ldl"] = prog["ldl"].lower(Hr)
            L, _ = prog["ldl"](Hr)
            ok = np.asarray(prog["finite"](L))
            for j in np.nonzero(~ok)[0]:                         # the official float64 retry
                i = idx[j]
                Lf = _q._block_ldl_float64(jnp.asarray(Hs[i], jnp.float32),
                                           jnp.asarray(np.asarray(SU)[j]), sigma_reg,
                                           rotations[1])
                if Lf is None:
                    raise ValueError(
                        "H + sigma_reg * I is not positive definite, even with a float64 "
                        f"Cholesky (sigma_reg = {sigma_reg}): H is not a valid second moment; "
                        f"check it, or increase sigma_reg (e.g. to {max(10 * sigma_reg, 1e-1):g})")
                L = jax.device_put(L.at[j].set(Lf), sh)
        Hin = Hr if tune_iters else jax.device_put(np.zeros((D, 0, 0), np.float32), sh)
        if return_lowered and "round" not in lowered:
            lowered["round"] = prog["round"].lower(Wsc, L, Hin)
        codes, _ = prog["round"](Wsc, L, Hin)
        codes_h, SU_h = np.asarray(codes), np.asarray(SU)
        SV_h, ws_h = np.asarray(SV), np.asarray(wscale)
        SVf = []
        for j in range(D):
            if c0 + j >= k:
                break
            sv = SV_h[j] * ws_h[j]                   # quantize_linear: SV * wscale (IEEE)
            SVf.append(sv)
            out.append(_q.QuantizedLinear(codes=jnp.asarray(codes_h[j]), SU=jnp.asarray(SU_h[j]),
                                          SV=jnp.asarray(sv), codebook=cb.name, shape=(m, n),
                                          transforms=(rotations[0].kind, rotations[1].kind)))
        if proxies:
            SVst = jax.device_put(np.stack([SVf[min(j, len(SVf) - 1)] for j in range(D)]), sh)
            p = np.asarray(prog["proxy"](Wst, codes, SU, SVst, Hst, sigma))
            prox += [float(v) for v in p[:len(SVf)]]
    if return_lowered:
        return out, lowered
    return (out, prox) if proxies else out


def quantize_layers_distributed(src, out: str, hdir: str, settings, mesh: Mesh, *, adapter=None,
                                progress: Optional[Callable] = None,
                                log: Optional[Callable] = None) -> None:
    """Quantize every unfinished layer of the checkpoint in `out` (no fine-tuning), several
    layers at once: for each group type, the groups of `devices` layers are one stack
    (`quantize_stack`). Layers are saved in order with the same files, codes and resume
    behaviour as `finetune_model.quantize_layers` (sign keys depend on (seed, layer, group)
    only, so the chunking does not change any code)."""
    from quipjax.models.adapter import LLAMA
    from quipjax.pipeline import checkpoint as ckpt
    from quipjax.pipeline import hessians
    from quipjax.pipeline.checkpoint import QuantizedGroup
    from quipjax.pipeline.quantize_model import fuse_members, group_key, source_fp_params
    adapter = adapter or LLAMA
    L = src.spec.num_layers
    todo = [i for i in range(L) if not ckpt.layer_done(out, i)]
    D = mesh.size
    for c0 in range(0, len(todo), D):
        chunk = todo[c0:c0 + D]
        t0 = time.perf_counter()
        groups = {i: {} for i in chunk}
        info = {i: {"proxy": {}, "curves": {}} for i in chunk}
        for gi, g in enumerate(adapter.groups):
            Ws, Hs, keys, fused = [], [], [], []
            for i in chunk:
                ws = [src.tensor(f"model.layers.{i}.{mem}.weight") for mem in g.members]
                W, scales = fuse_members(ws)
                Ws.append(W)
                Hs.append(hessians.load_layer_hessians(hdir, i, groups=(g.name,))[g.name])
                keys.append(group_key(settings.seed, i, gi))
                fused.append((scales, tuple(w.shape[0] for w in ws)))
            qls, prox = quantize_stack(
                Ws, Hs, keys, mesh, codebook=settings.codebook, scale=settings.scale,
                sigma_reg=settings.sigma_reg, tune_iters=settings.tune_iters,
                rotation=settings.rotation, rounding=settings.rounding, proxies=True)
            for i, ql, (scales, rows), pr in zip(chunk, qls, fused, prox):
                groups[i][g.name] = QuantizedGroup(ql=ql, scales=jnp.asarray(scales),
                                                   members=g.members, rows=rows)
                info[i]["proxy"][g.name] = pr
            del Ws, Hs
        dt = (time.perf_counter() - t0) / len(chunk)
        for i in chunk:
            info[i]["seconds"] = dt
            norms = source_fp_params(src, i, adapter)          # no second read of the weights
            ckpt.save_layer(out, i, groups[i], norms, info[i])
            if progress:
                progress(i, info[i])


# ---------------------------------------------------------------------------- evaluation

class _Head(nnx.Module):
    """The output head of a Llama (final norm + lm_head or tied embeddings) on its own."""

    def __init__(self, model):
        self.norm = model.norm
        self.lm_head = model.lm_head
        self.embed_tokens = model.embed_tokens

    def head(self, x):
        from quipjax.models.llama import Llama
        return Llama.head(self, x)


@functools.lru_cache(maxsize=16)
def _eval_programs(mesh, head_def, head_tdef, head_specs, emb_spec):
    from quipjax.pipeline import evaluate as _ev

    def embed(table, tok):
        table = _gather([table], [emb_spec], mesh)[0]
        return table[tok].astype(jnp.float32)              # Llama.embed

    def nll(leaves, x, tok):
        leaves = _gather(leaves, head_specs, mesh)
        head = nnx.merge(head_def, jax.tree.unflatten(head_tdef, leaves))
        return _ev.nll_sum_fn(head, x, tok)[None]

    sm = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    return (jax.jit(sm(embed, in_specs=(emb_spec, P(BATCH)), out_specs=P(BATCH))),
            jax.jit(sm(nll, in_specs=(list(head_specs), P(BATCH), P(BATCH)), out_specs=P(BATCH))))


def perplexity(model, windows: np.ndarray, mesh: Mesh, *, batch: int = 1,
               progress: Optional[Callable] = None, blocks=None) -> dict:
    """`evaluate.perplexity` with the windows split over every device (batch windows each)
    and the weights placed by the rules. Each device runs the one-device program on its
    windows and the per-window losses are added in window order: the same value as the
    one-device evaluation with the same batch."""
    windows = np.asarray(windows, np.int32)
    D = mesh.size
    G = D * batch
    head = _Head(model)
    hdef, hstate = nnx.split(head)
    hleaves, htdef = jax.tree.flatten(hstate)
    hspecs = tuple(spec_for(p, np.shape(x), mesh) for p, x in
                   [(_path_str(pp), xx) for pp, xx in jax.tree_util.tree_flatten_with_path(hstate)[0]])
    hleaves = [jax.device_put(l, NamedSharding(mesh, s)) for l, s in zip(hleaves, hspecs)]
    table = model.embed_tokens[...]
    emb_spec = spec_for("embed_tokens", table.shape, mesh)
    table = jax.device_put(table, NamedSharding(mesh, emb_spec))
    embed, nll = _eval_programs(mesh, hdef, htdef, hspecs, emb_spec)
    layers = list(blocks) if blocks is not None else list(model.layers)
    prepared = []
    for b in layers:
        graphdef, tdef, leaves = _flatten_state(b)
        specs = tuple(state_specs(jax.tree.unflatten(tdef, leaves), mesh))
        leaves = [jax.device_put(l, NamedSharding(mesh, s)) for l, s in zip(leaves, specs)]
        prepared.append((_forward_program(graphdef, tdef, mesh, specs), leaves))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    N, T = windows.shape
    sh = NamedSharding(mesh, P(BATCH))
    for s in range(0, N, G):
        tok = np.zeros((G, T), np.int32)
        real = windows[s:s + G]
        tok[:len(real)] = real
        tok_d = jax.device_put(tok, sh)
        x = embed(table, tok_d)
        for prog, leaves in prepared:
            x = prog(leaves, x)
        per_dev = np.asarray(nll(hleaves, x, tok_d))          # (D,): sum over b windows each
        n_real = len(real)
        for d in range(D):
            w = d * batch
            if w >= n_real:
                break
            if w + batch > n_real:
                raise ValueError(f"{N} windows with batch {batch} on {D} devices: the last "
                                 "device batch is ragged; use batch=1")
            total += float(per_dev[d])
            count += batch * (T - 1)
        if progress is not None:
            progress(min(s + G, N), N, math.exp(total / count))
    return {"ppl": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- sharded models

def abstract_model(spec, dtype):
    """A Llama whose variables are shapes only (nothing allocated): fill it block by block."""
    from quipjax.models.llama import Llama
    return nnx.eval_shape(lambda: Llama(spec, dtype))


def put_param(owner, name: str, value, mesh: Mesh, path: Optional[str] = None, dtype=None):
    """owner.name = Param(value placed by the rules) (value: numpy/jax array)."""
    v = jnp.asarray(value, dtype) if dtype is not None else jnp.asarray(value)
    spec = spec_for(path or name, v.shape, mesh)
    setattr(owner, name, nnx.Param(jax.device_put(v, NamedSharding(mesh, spec))))


def load_model_sharded(src, dtype, mesh: Mesh):
    """`loaders.load_model` with every weight placed by the rules as it is read (one block in
    flight): a model larger than one device."""
    from quipjax.models.loaders import load_block
    spec = src.spec
    model = abstract_model(spec, dtype)
    put_param(model, "embed_tokens", src.tensor("model.embed_tokens.weight"), mesh, dtype=dtype)
    put_param(model.norm, "weight", src.tensor("model.norm.weight"), mesh, "norm.weight",
              jnp.float32)
    if model.lm_head is not None:
        put_param(model.lm_head, "weight", src.tensor("lm_head.weight"), mesh,
                  "lm_head.weight", dtype)
    for i in range(spec.num_layers):
        model.layers[i] = shard_module(load_block(src, i, dtype), mesh)
    return model


# ---------------------------------------------------------------------------- planning

@dataclasses.dataclass(frozen=True)
class PlanCosts:
    """Measured per-unit costs (seconds on one device of the machine that measured them) and
    the shapes they were measured on; `plan` scales them to other shapes.

    matrix: {"m x n": {"hessian_rht_s", "weight_rht_s", "block_ldl_s", "block_ldlq_s",
    "check_s", "peak_rss_mb", "rss_after_inputs_mb"}} (experiments/bench_sharding_costs.py
    --what=matrix); block: {name: {"hidden", "intermediate", "ctx", "hessian_step_s",
    "forward_s"}} (--what=block)."""

    matrix: dict
    block: dict
    source: str = ""

    @staticmethod
    def from_jsonl(path: str) -> "PlanCosts":
        import json
        matrix, block = {}, {}
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                if r.get("kind") == "matrix":
                    matrix.setdefault(r["shape"], {}).update(r)
                elif r.get("kind") == "proxy":
                    matrix.setdefault(r["shape"], {})["proxy_s"] = r["proxy_s"]
                elif r.get("kind") == "block":
                    block[r["block"]] = r
        return PlanCosts(matrix, block, path)


def _group_shapes(spec) -> dict:
    """{group: (m, n, count per layer)} of a Llama block's quantized groups."""
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    return {"qkv": (spec.num_heads * hd + 2 * spec.num_kv_heads * hd, d),
            "o": (d, spec.num_heads * hd),
            "up": (2 * f, d),
            "down": (d, f)}


def _fit(costs: PlanCosts, key: str, work: Callable[[int, int], float]) -> float:
    """Seconds per unit of `work(m, n)` for a stage: the least-squares ratio over the
    measured shapes, weighted toward large ones (sum t / sum work)."""
    num = den = 0.0
    for shape, r in costs.matrix.items():
        m, n = (int(v) for v in shape.split("x"))
        num += r[key]
        den += work(m, n)
    if den == 0:
        raise ValueError("no measured per-matrix costs: run experiments/bench_sharding_costs.py")
    return num / den


# stage work models (arbitrary units; the measured shapes calibrate them)
_WORK = {
    "check_s": lambda m, n: n * n + m * n,
    "hessian_rht_s": lambda m, n: n * n * math.log2(n),
    "weight_rht_s": lambda m, n: m * n * (math.log2(m) + math.log2(n)),
    "block_ldl_s": lambda m, n: n ** 3,
    "block_ldlq_s": lambda m, n: m * n * n,
}


def matrix_seconds(costs: PlanCosts, m: int, n: int) -> dict:
    """Estimated seconds of each quantize_linear stage for an (m, n) matrix, plus the proxy
    loss the pipeline records (two (m, n) x (n, n) products; measured when the costs have
    "proxy_s", else 2x BlockLDLQ)."""
    out = {k: _fit(costs, k, w) * w(m, n) for k, w in _WORK.items()}
    if all("proxy_s" in r for r in costs.matrix.values()):
        out["proxy_s"] = _fit(costs, "proxy_s", lambda m, n: m * n * n) * m * n * n
    else:
        out["proxy_s"] = 2.0 * out["block_ldlq_s"]
    out["total_s"] = sum(out.values())
    return out


def _block_seconds(costs: PlanCosts, spec, ctx: int, key: str) -> float:
    """Seconds of one block step on one window of `ctx` tokens, scaled from the measured
    block nearest in size by parameter count (linear part) and ctx^2 (attention)."""
    d = spec.hidden_size
    params = _block_params(spec)
    best = None
    for r in costs.block.values():
        rp = r.get("params") or (4 * r["hidden"] ** 2 + 3 * r["hidden"] * r["intermediate"])
        score = abs(math.log(params / rp))
        if best is None or score < best[0]:
            best = (score, r, rp)
    if best is None:
        raise ValueError("no measured block costs: run experiments/bench_sharding_costs.py --what=block")
    _, r, rp = best
    lin = params / rp * ctx / r["ctx"]
    att = (d / r["hidden"]) * (ctx / r["ctx"]) ** 2
    # the attention share of a block step at the measured ctx: 4 T^2 d of 2 T P + 4 T^2 d
    share = 4 * r["ctx"] * r["hidden"] / (2 * rp + 4 * r["ctx"] * r["hidden"])
    return r[key] * ((1 - share) * lin + share * att)


def _block_params(spec) -> int:
    sh = _group_shapes(spec)
    return sum(m * n for m, n in sh.values())


def plan(spec, mesh_shape: dict, costs: PlanCosts, *, devset: int = 64, ctx: int = 2048,
         batch: int = 1, hessian_shards: int = DEFAULT_HESSIAN_SHARDS, dtype_bytes: int = 2,
         eval_windows: int = 24 * 2, eval_ctx: int = 2048, ft: Optional[dict] = None,
         device_gb: float = 80.0, speedup: float = 1.0) -> list:
    """Memory per device and time of each stage of `experiments/quantize.py` on a mesh,
    from the model's spec alone. Returns a list of stage dicts (name, memory_gb parts,
    seconds, notes). Times are the measured costs (one device of the measuring machine)
    divided by `speedup`."""
    D = int(np.prod(list(mesh_shape.values())))
    M = mesh_shape.get("model", 1)
    L = spec.num_layers
    d, f, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    shapes = _group_shapes(spec)
    GB = 1024 ** 3
    block_w = _block_params(spec) * dtype_bytes
    stages = []
    if hessian_shards % D:
        raise ValueError(f"hessian_shards ({hessian_shards}) must be a multiple of the "
                         f"number of devices ({D})")

    # 1. Hessians: one block at a time; windows over all devices; slots per device
    state_b = sum(2 * (n * n + n + 1) * 4 for _, n in shapes.values())      # hi/lo pairs
    slots = hessian_shards // D
    acts = batch * ctx * (3 * d + 2 * f + 2 * spec.num_heads * spec.head_dim) * 4
    att = batch * spec.num_heads * min(ctx, 256) * ctx * 4 * 2           # chunked scores
    taps = batch * ctx * sum(n for _, n in shapes.values()) * 2
    hmax = max(n for _, n in shapes.values())
    # the end-of-layer reduction: ~7 n_max^2 float32 of grid-sum temporaries plus the H's
    # (7.1 n^2 measured: XLA's memory_analysis of the Llama-2-7B-shaped program)
    reduce_tmp = 7 * hmax * hmax * 4 + sum(n * n for _, n in shapes.values()) * 4
    step_tmp = acts + att + taps + hmax * hmax * 4                          # + one chunk's X^T X
    gathered = block_w if M > 1 else 0.0
    mem = {"block weights (1/model stored + one gathered copy)": block_w / M + gathered,
           f"accumulators ({slots} slot(s))": slots * state_b,
           "step temporaries (activations, one X^T X)": step_tmp,
           "end-of-layer reduction temporaries (not at the same time)": reduce_tmp}
    peak = block_w / M + gathered + slots * state_b + max(step_tmp, reduce_tmp)
    steps = L * math.ceil(devset / (D * batch))
    t_step = _block_seconds(costs, spec, ctx, "hessian_step_s") * batch
    stages.append(dict(name="Hessian collection", memory=mem, peak=peak,
                       seconds=steps * t_step / speedup,
                       notes=f"{L} layers x {math.ceil(devset / (D * batch))} steps of {D} x "
                             f"{batch} window(s) of {ctx} tokens; {t_step:.2f} s/step measured-scaled; "
                             f"one psum per layer; host streams {devset} x {ctx} x {d} float32 "
                             f"activations per layer ({devset * ctx * d * 4 / GB:.1f} GB on disk x 2)"))

    # 2. quantization: per group type, ceil(L / D) rounds of D matrices in parallel
    secs = 0.0
    mem_q = 0.0
    detail = []
    for g, (m, n) in shapes.items():
        c = matrix_seconds(costs, m, n)
        rounds = math.ceil(L / D)
        secs += rounds * c["total_s"]
        # W, fused copy, Ws: 3 m n; H, Hr, L, Cholesky temp: 4 n^2; codes m n / 8 * 2 bytes
        mem_g = (3 * m * n + 4 * n * n) * 4 + m * n // 4
        mem_q = max(mem_q, mem_g)
        detail.append(f"{g} {m}x{n}: {c['total_s']:.1f} s/matrix x {rounds} rounds")
    host = max(D * (m * n + n * n) * 4 for m, n in shapes.values())
    stages.append(dict(name="quantization (no FT)", memory={"one matrix (W, H, Hr, L, temps)": mem_q},
                       seconds=secs / speedup,
                       notes="; ".join(detail) + f"; {L} layers x 4 groups, {D} at a time; host "
                             f"RAM for one stack of W and H: {host / GB:.1f} GB"))

    def batch_par(b):      # devices a batch of b windows is split over (`batch_spec`)
        if b % D == 0:
            return D
        return mesh_shape.get("data", 1) if b % mesh_shape.get("data", 1) == 0 else 1

    # 3. fine-tuning (optional)
    if ft and ft.get("epochs", 0) > 0:
        fctx = ft.get("ctx", ctx)
        fw = _block_seconds(costs, spec, fctx, "forward_s")
        n_tr, n_va, ep = ft["train_size"], ft["valid_size"], ft["epochs"]
        # per block: FP outputs of all windows, then 3 tunings of ep epochs (fwd+bwd ~ 3 fwd)
        # with a validation pass each epoch, plus the 4 quantizations (one device each)
        bs = ft.get("bs", 4)
        par = batch_par(bs)
        per_block = (n_tr + n_va) * fw / D + 3 * (ep * (3 * n_tr + n_va) + n_va) * fw / par
        per_block += sum(matrix_seconds(costs, m, n)["total_s"] for m, n in shapes.values())
        act = bs * fctx * (8 * d + 4 * f) * 4 / par
        mem = {"block params + Adam + grads (float32)": 4 * _block_params(spec) * 4 / M,
               "activations (batch / devices)": act}
        stages.append(dict(name="in-block fine-tuning", memory=mem, seconds=L * per_block / speedup,
                           notes=f"{L} blocks sequential; 3 tunings x {ep} epochs x {n_tr} windows "
                                 f"of {fctx} tokens, batch {bs} split over {par} device(s) (a "
                                 "batch not divisible by the device count or the data axis runs "
                                 "replicated); the 4 groups of a block are quantized one after "
                                 "the other on one device"))
    if ft and ft.get("e2e_epochs", 0) > 0:
        ectx = ft.get("e2e_ctx", ctx)
        fw = _block_seconds(costs, spec, ectx, "forward_s")
        n_tr, n_va, ep = ft["e2e_train_size"], ft["e2e_valid_size"], ft["e2e_epochs"]
        # teacher fwd + student fwd + remat fwd + bwd (2x) per train window; 2 fwd per valid
        per_epoch = L * fw * (5 * n_tr + 2 * n_va) / batch_par(ft.get("e2e_bs", 1))
        R = sum(m * n for m, n in shapes.values()) * L * 4
        eb = ft.get("e2e_bs", 1)
        per_dev_b = eb / batch_par(eb)
        mem = {"student R (float32), 1/model": R / M,
               "teacher weights (bf16), 1/model": L * block_w / M,
               "gathered block (student R + teacher)": 3 * gathered,
               "block inputs kept for remat": L * per_dev_b * ectx * d * 4,
               "one block's backward activations": per_dev_b * ectx * (8 * d + 4 * f) * 4,
               "teacher log-probs + head + logits chunk": per_dev_b * ectx * V * 4
               + (V * d * 4) / M + 128 * V * 4 * 3}
        stages.append(dict(name="end-to-end fine-tuning", memory=mem,
                           seconds=ep * per_epoch / speedup,
                           notes=f"{ep} epochs x {n_tr} windows of {ectx} tokens; batch "
                                 f"{ft.get('e2e_bs', 1)} (devices beyond the batch only hold "
                                 "shards)"))

    # 4. evaluation: dequantized model sharded over every device, windows over devices
    model_w = (L * block_w + V * d * dtype_bytes * (1 if spec.tie_embeddings else 2))
    fw = _block_seconds(costs, spec, eval_ctx, "forward_s")
    steps = math.ceil(eval_windows / D)
    mem = {"model weights (sharded over model)": model_w / M,
           "one gathered block": gathered,
           "activations + logits (one window)": eval_ctx * (4 * d + 2 * f) * 4 + eval_ctx * V * 4 * 3}
    stages.append(dict(name="perplexity (each of FP and quantized)", memory=mem,
                       seconds=steps * L * fw / speedup,
                       notes=f"{eval_windows} windows of {eval_ctx} tokens, {D} at a time; "
                             "weights gathered block by block"))
    for s in stages:
        s["memory_gb"] = s.get("peak", sum(s["memory"].values())) / GB
        s["fits"] = s["memory_gb"] <= device_gb
    return stages
