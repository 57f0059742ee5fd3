"""The compiled programs of the pipeline, one code path for 1 or N devices.

Every program is a `jax.shard_map` over the placement's `program_mesh` (the first device
alone when there is no mesh): each device gathers the weights it needs (all-gather over
"model" when they are sharded) and runs exactly the one-device computation on its own
windows or matrices, so results are the same bits on any mesh (tested).

* `block_forward_fn`: a block over a batch of windows (split over the devices).
* `HessianEngine`: Hessian collection of one block: the windows go to a fixed number of
  accumulator slots whatever the mesh, and the slots are combined at the end of the layer by
  the exact order-free sum of `quipjax.hessian.merge_slots` (one all-reduce).
* `ShardLift`: the `quantize.Lift` running one matrix per device (`quantize_stack`).
* `EvalPrograms`: embedding, blocks and summed next-token NLL of a model (perplexity).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quipjax import hessian
from quipjax.distributed import processes
from quipjax.distributed.mesh import BATCH
from quipjax.distributed.placement import Placement, spec_for
from quipjax.layers.tap import attach_taps, tap_inputs
from quipjax.models.adapter import LLAMA, get_path
from quipjax.models import parts
from quipjax.models.parts import Head
from quipjax.quantize import Lift

__all__ = ["DEFAULT_HESSIAN_SHARDS", "gather", "block_forward_fn", "HessianEngine",
           "ShardLift", "EvalPrograms", "nll_sum", "collectives"]

DEFAULT_HESSIAN_SHARDS = 8


def gather(leaves, specs, mesh):
    """Inside shard_map: all-gather the leaves sharded over "model" (full weights)."""
    out = []
    for x, s in zip(leaves, specs):
        for dim, ax in enumerate(s):
            if ax is not None and mesh.shape[ax] > 1:
                x = jax.lax.all_gather(x, ax, axis=dim, tiled=True)
        out.append(x)
    return out


class _Placed:
    """A module split into (graphdef, treedef, leaves), its leaves placed by the rules on the
    program mesh: what a program takes as its parameters."""

    def __init__(self, module, placement: Placement):
        self.graphdef, state = nnx.split(module)
        self.leaves, self.tdef = jax.tree.flatten(state)
        self.mesh = placement.program_mesh
        self.specs = tuple(placement.specs(state, self.mesh))
        self.leaves = [jax.device_put(l, NamedSharding(self.mesh, s))
                       for l, s in zip(self.leaves, self.specs)]


# ---------------------------------------------------------------------------- block forward

@functools.lru_cache(maxsize=64)
def _forward_program(graphdef, tdef, mesh, specs):
    def body(leaves, x):
        leaves = gather(leaves, specs, mesh)
        block = nnx.merge(graphdef, jax.tree.unflatten(tdef, leaves))
        return block(x, jnp.arange(x.shape[1]))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(list(specs), P(BATCH)),
                                 out_specs=P(BATCH), check_vma=False))


def block_forward_fn(block, placement: Placement = Placement()) -> Callable:
    """x (B, T, d) float32 -> block(x) (positions 0..T-1), the windows split over every
    device (B % devices == 0); each device computes exactly the one-device batch of its
    windows. The weights are placed once, here: call the result for every batch."""
    pb = _Placed(block, placement)
    prog = _forward_program(pb.graphdef, pb.tdef, pb.mesh, pb.specs)
    sh = NamedSharding(pb.mesh, P(BATCH))
    return lambda x: prog(pb.leaves, jax.device_put(x, sh))


# ---------------------------------------------------------------------------- Hessians

@functools.lru_cache(maxsize=32)
def _hessian_programs(graphdef, tdef, mesh, specs, groups, shards, acc_tdef, routed=()):
    n_acc = acc_tdef.num_leaves
    names = tuple(g.name for g in groups)

    def step(leaves, x, acc, j, mask):
        leaves = gather(leaves, specs, mesh)
        block = nnx.merge(graphdef, jax.tree.unflatten(tdef, leaves))
        y = block(x, jnp.arange(x.shape[1]))
        seen = tap_inputs(block, groups)
        acc = jax.tree.unflatten(acc_tdef, acc)
        new = {}
        for name in names:
            st = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False),
                              acc[name])
            m = mask                                             # padding windows weigh 0
            if name in routed:      # an expert's input: zero rows are tokens routed elsewhere
                m = mask * jnp.any(seen[name] != 0, -1).astype(mask.dtype)
            up = hessian.update(st, seen[name], mask=m)
            new[name] = jax.tree.map(
                lambda A, v: jax.lax.dynamic_update_index_in_dim(A, v, j, 0), acc[name], up)
        return y, jax.tree.leaves(new)

    acc_specs = [P(BATCH)] * n_acc
    step_p = jax.jit(jax.shard_map(step, mesh=mesh,
                                   in_specs=(list(specs), P(BATCH), acc_specs, P(), P(BATCH)),
                                   out_specs=(P(BATCH), acc_specs), check_vma=False),
                     donate_argnums=(2,))

    def reduce(st):
        return hessian.finalize(hessian.merge_slots(hessian.HessianState(*st), shards, BATCH))

    # one group at a time (`finalize` drops its slots after): one group's temporaries and the
    # slots of the groups not yet reduced, never every group's temporaries at once
    reduce_p = jax.jit(jax.shard_map(reduce, mesh=mesh, in_specs=([P(BATCH)] * 6,),
                                     out_specs=P(), check_vma=False))
    return step_p, reduce_p


class HessianEngine:
    """Data-parallel Hessian collection for one block (all blocks of a model share the
    compiled programs).

        eng = HessianEngine(block, placement, shards=8)
        for step, x in enumerate(batches):           # x (devices * b, T, d), b windows each
            y = eng.step(x, step, valid)             # block outputs, same layout
        stats = eng.finalize()                       # {group: HessianStats} (numpy)

    The first member of each of the adapter's groups is tapped (`quipjax.layers.InputTap`).
    The groups the adapter pools (experts) count only their nonzero input rows: the tokens
    routed to them (their count is 0 when none were; H and mean are then NaN).
    Window batches of b windows ("microbatches") are numbered u = step * devices + device and
    go to accumulator slot u % shards: slot s holds microbatches s, s + shards, ... in order,
    on any mesh (shards % devices == 0). Each device keeps shards / devices slots.
    """

    def __init__(self, block, placement: Placement = Placement(),
                 shards: int = DEFAULT_HESSIAN_SHARDS, adapter=LLAMA):
        self.mesh = placement.program_mesh
        self.devices = self.mesh.size
        if shards < 1 or shards % self.devices:
            raise ValueError(f"hessian_shards ({shards}) must be a positive multiple of the "
                             f"number of devices ({self.devices}): set --hessian_shards")
        self.shards = shards
        groups = tuple(adapter.groups)
        dims = {g.name: get_path(block, g.members[0]).weight.shape[1] for g in groups}
        attach_taps(block, groups)
        self._placed = pb = _Placed(block, placement)
        acc = {g.name: jax.tree.map(lambda z: jnp.zeros((shards,) + z.shape, z.dtype),
                                    hessian.init(dims[g.name])) for g in groups}
        leaves, acc_tdef = jax.tree.flatten(acc)
        sh = NamedSharding(self.mesh, P(BATCH))
        self.acc = [jax.device_put(a, sh) for a in leaves]
        self._acc_tdef = acc_tdef
        routed = tuple(g.name for g in groups if adapter.pool_of(g.name))
        self._step, self._reduce = _hessian_programs(pb.graphdef, pb.tdef, self.mesh, pb.specs,
                                                     groups, shards, acc_tdef, routed)

    def local_rows(self, windows: int) -> tuple:
        """(start, stop): the rows of a step's `windows` (devices * b) that this process
        feeds (all of them with one process; `processes.local_rows`)."""
        return processes.local_rows(NamedSharding(self.mesh, P(BATCH)), windows)

    def step(self, x, step: int, mask=None, windows: int = None):
        """x: this process's rows (`local_rows`) of a step of `windows` = devices * b windows
        (default: x holds all of them), (rows, T, d) float32; mask (rows, T) (0: a padding
        window, its rows are not counted). Returns this process's rows of the block outputs
        (numpy)."""
        D = self.devices
        windows = x.shape[0] if windows is None else windows
        if windows % D:
            raise ValueError(f"a step takes a multiple of {D} windows, got {windows}")
        mask = np.ones(x.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
        sh = NamedSharding(self.mesh, P(BATCH))
        x = processes.put_local(np.asarray(x, np.float32), sh, windows)
        mask = processes.put_local(mask, sh, windows)
        j = jnp.int32(step % (self.shards // D))
        y, self.acc = self._step(self._placed.leaves, x, self.acc, j, mask)
        return processes.local_part(y)

    def finalize(self) -> dict:
        """{group name: HessianStats} as numpy arrays (H (n, n), mean (n,), count ()). The
        accumulators are consumed (reduced group by group, each freed as it is)."""
        acc = jax.tree.unflatten(self._acc_tdef, self.acc)
        self.acc = None
        out = {}
        # smallest first: the largest group's reduction runs when the others' slots are freed
        for name in sorted(acc, key=lambda k: (acc[k].xtx_hi.size, k)):
            st = acc.pop(name)
            out[name] = hessian.HessianStats(*(np.asarray(a) for a in self._reduce(list(st))))
            del st
        return {k: out[k] for k in sorted(out)}

    def lower_step(self, x_shape):
        """The lowered step program (for HLO inspection)."""
        sh = NamedSharding(self.mesh, P(BATCH))
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=sh)
        v = jax.ShapeDtypeStruct(x_shape[:2], jnp.float32, sharding=sh)
        return self._step.lower(self._placed.leaves, x, self.acc, jnp.int32(0), v)

    def lower_reduce(self):
        """The lowered reduction of one group (the first) (for HLO inspection)."""
        return self._reduce.lower(self.acc[:6])


# ---------------------------------------------------------------------------- quantization

@dataclasses.dataclass(frozen=True)
class ShardLift(Lift):
    """The `quantize.Lift` that runs one matrix per device of `mesh` (width = devices): a
    shard_map over the stack axis of the very per-matrix stage, so every device computes
    `quantize_linear`'s program and the codes are its bits; no collectives. In a run of
    several processes each provides only its devices' matrices (`local`)."""

    mesh: Mesh

    @property
    def width(self) -> int:
        return self.mesh.size

    def __call__(self, fn, in_axes):
        def body(*args):
            out = fn(*[a[0] if ax == 0 else a for a, ax in zip(args, in_axes)])
            return jax.tree.map(lambda a: a[None], out)
        specs = tuple(P(BATCH) if ax == 0 else P() for ax in in_axes)
        return jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=P(BATCH),
                                     check_vma=False))

    def local(self) -> tuple:
        return processes.local_rows(NamedSharding(self.mesh, P(BATCH)), self.width)

    def put(self, x):
        # x: this process's rows of the stack (all of them with one process)
        return processes.put_local(np.asarray(x), NamedSharding(self.mesh, P(BATCH)), self.width)

    def get(self, x) -> np.ndarray:
        return processes.to_host(x)

    def local_part(self, x) -> np.ndarray:
        return processes.local_part(x)


# ---------------------------------------------------------------------------- evaluation

def nll_sum(model, x, tokens):
    """Sum of -log p(tokens[:, t+1] | ...) over t, from the last hidden states x (B, T, d)
    (`model` needs only `.head`; large vocabularies in chunks: `models.parts.nll_sum`)."""
    return parts.nll_sum(model.head, x, tokens)


@functools.lru_cache(maxsize=16)
def _eval_programs(mesh, head_def, head_tdef, head_specs, emb_spec, embed_scale):
    def embed(table, tok):
        table = gather([table], [emb_spec], mesh)[0]
        x = table[tok].astype(jnp.float32)                 # DecoderLM.embed
        return x if embed_scale is None else x * jnp.float32(embed_scale)

    def nll(leaves, x, tok):
        leaves = gather(leaves, head_specs, mesh)
        head = nnx.merge(head_def, jax.tree.unflatten(head_tdef, leaves))
        return nll_sum(head, x, tok)[None]

    sm = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    return (jax.jit(sm(embed, in_specs=(emb_spec, P(BATCH)), out_specs=P(BATCH))),
            jax.jit(sm(nll, in_specs=(list(head_specs), P(BATCH), P(BATCH)), out_specs=P(BATCH))))


class EvalPrograms:
    """A model's forward for evaluation, windows split over the devices, weights placed by
    the rules (a block's weights gathered only while it runs).

        ev = EvalPrograms(model, placement)
        x = ev.embed(tokens)             # tokens (devices * b, T) int32
        x = ev.blocks(x)                 # through every block (or blocks=(): none, and
        prog, leaves = ev.program(b)     #   each block b run by its own program(leaves, x))
        per_device = ev.nll(x, tokens)   # (devices,) summed NLL of each device's windows
    """

    def __init__(self, model, placement: Placement = Placement(), blocks=None):
        self.mesh = mesh = placement.program_mesh
        head = _Placed(Head(model), placement)
        table = model.embed_tokens[...]
        emb_spec = spec_for("embed_tokens", table.shape, mesh, placement.rules)
        self._table = jax.device_put(table, NamedSharding(mesh, emb_spec))
        self._head = head
        self._embed, self._nll = _eval_programs(mesh, head.graphdef, head.tdef, head.specs,
                                                emb_spec, model.embed_scale)
        self._placement = placement
        self._blocks = [self.program(b) for b in (list(model.layers) if blocks is None
                                                  else list(blocks))]
        self._sh = NamedSharding(mesh, P(BATCH))

    def program(self, block):
        """(program, leaves) of one block: `program(leaves, x)` runs it on x (devices * b,
        T, d) float32 (one compiled program for every block of one structure)."""
        pb = _Placed(block, self._placement)
        return _forward_program(pb.graphdef, pb.tdef, self.mesh, pb.specs), pb.leaves

    def put(self, tokens, n: int = None):
        """tokens: this process's rows (`Placement.local_rows`) of a batch of n windows
        (default: all of them) -> the global (n, T) array split over the devices."""
        n = len(tokens) if n is None else n
        return processes.put_local(np.asarray(tokens), self._sh, n)

    def embed(self, tokens):
        return self._embed(self._table, tokens)

    def blocks(self, x):
        for prog, leaves in self._blocks:
            x = prog(leaves, x)
        return x

    def nll(self, x, tokens):
        return self._nll(self._head.leaves, x, tokens)


def collectives(hlo_text: str) -> dict:
    """Counts of collective ops in an HLO module's text."""
    ops = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in ops}
