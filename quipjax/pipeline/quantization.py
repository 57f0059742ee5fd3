"""The one quantization loop: every unfinished layer of a checkpoint, group by group.

    quantize_layers(out, hdir, settings, SourceLayers(src, placement), range(L))   # no tuning
    quantize_layers(out, hdir, settings, BlockTuner(...), range(L))               # in-block FT

For each chunk of layers and each linear group (in the adapter's order: qkv, o, up/gate,
down), the members' weights are fused (`quipjax.group.fuse`) and the group of every layer of
the chunk is quantized as one stack (`quipjax.quantize.quantize_stack`); the sign keys depend
on (seed, layer, group) only, so the chunking never changes a code. A `LayerHook` supplies the
weights and sees every quantized group: `SourceLayers` reads them straight from the FP source
(chunks of `placement.devices` layers, one matrix per device: `distributed.ShardLift`),
`BlockLayers` from blocks in memory, `pipeline.tuning.BlockTuner` tunes the block between
groups (one layer at a time). Every
finished layer is saved with its proxy losses, so a killed run resumes at the first
unfinished layer with the same codes.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from quipjax import codebooks

from quipjax.distributed import Placement, ShardLift, one_device_mesh, processes
from quipjax.group import QuantizedGroup, fuse, group_key
from quipjax.models.adapter import LLAMA, ModelAdapter, get_path
from quipjax.models.families import adapter_of, family_of
from quipjax.models.loaders import CheckpointSource, block_param_names, source_fp_params
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline.hessians import load_layer_hessians
from quipjax.pipeline.settings import QuantSettings
from quipjax.quantize import quantize_stack
from quipjax.rule import first_match

__all__ = ["LayerHook", "SourceLayers", "BlockLayers", "quantize_layers", "check_model",
           "group_settings"]


class LayerHook:
    """What the loop asks of the layers it quantizes.

    width: layers quantized together (a chunk). lift: the `quantize.Lift` of the stacks.
    begin(i): prepare layer i. weights(i, member): its (out, in) float32 weight as the group
    is quantized. after_group(i, index, group) -> a curve or None: called with every
    quantized group (index in the adapter's order). end(i, groups) -> (groups, fp_params):
    the groups and FP parameters to save. saved(i): layer i is on disk.
    """

    width: int = 1
    lift = None

    def begin(self, i: int) -> None:
        pass

    def weights(self, i: int, member: str):
        raise NotImplementedError

    def after_group(self, i: int, index: int, group: QuantizedGroup):
        return None

    def end(self, i: int, groups: dict):
        raise NotImplementedError

    def saved(self, i: int) -> None:
        pass


class SourceLayers(LayerHook):
    """No tuning: the FP weights read from the source, `placement.devices` layers at a time,
    one matrix per device."""

    def __init__(self, src: CheckpointSource, placement: Placement = Placement(),
                 adapter: ModelAdapter = None):
        self.src, self.adapter = src, adapter or adapter_of(src.spec)
        self.width = placement.devices
        self.lift = ShardLift(placement.program_mesh)

    def weights(self, i, member):
        return self.src.tensor(block_param_names(self.src.spec, i)[member + ".weight"])

    def end(self, i, groups):
        return groups, source_fp_params(self.src, i, self.adapter)


class BlockLayers(LayerHook):
    """No tuning: the weights of blocks in memory (`blocks`: layer -> block), one layer at a
    time on one device."""

    def __init__(self, blocks, adapter: ModelAdapter = LLAMA):
        self.blocks, self.adapter = blocks, adapter
        self.lift = ShardLift(one_device_mesh())

    def weights(self, i, member):
        return np.asarray(get_path(self.blocks[i], member).weight[...], np.float32)

    def end(self, i, groups):
        return groups, self.adapter.fp_params(self.blocks[i])


def group_settings(settings: QuantSettings, adapter: ModelAdapter, user_rules=()) -> dict:
    """{group name: `quantize_linear` keyword arguments}: the run's settings, replaced by
    those of the user rule (`--rules`) that decides the group's first member, if any; the
    run's search (--rvq_beam) applies to a rule's codebook too."""
    out = {}
    for g in adapter.groups:
        kw = settings.quantize_kw()
        i = first_match(user_rules, g.members[0])
        if i is not None:
            kw.update(user_rules[i].settings())
            kw["codebook"] = settings.searched(kw["codebook"])
        out[g.name] = kw
    return out


def quantize_layers(out: str, hdir: str, settings: QuantSettings, hook: LayerHook,
                    layers: Sequence[int], *, adapter: ModelAdapter = LLAMA,
                    progress: Optional[Callable] = None, kw: Optional[dict] = None) -> None:
    """Quantize every layer of `layers` not yet finished in the checkpoint `out`, with the
    Hessians of `hdir` and the weights the `hook` supplies. kw: {group: quantize keyword
    arguments} (`group_settings`; default `settings` for every group).

    progress(layer, info) after each saved layer; info = {"proxy": {group: loss}, "curves":
    {group: curve}, "seconds"}.
    """
    todo = [i for i in layers if not ckpt.layer_done(out, i)]
    processes.barrier("quantize_layers: listed")   # before process 0 saves any layer
    for c0 in range(0, len(todo), hook.width):
        chunk = todo[c0:c0 + hook.width]
        t0 = time.perf_counter()
        groups = {i: {} for i in chunk}
        info = {i: {"proxy": {}, "curves": {}} for i in chunk}
        for i in chunk:
            hook.begin(i)
        # the layers of the stack's rows this process provides (all but with several)
        lo, hi = hook.lift.local()
        mine = {chunk[min(r, len(chunk) - 1)] for r in range(lo, hi)}
        for gi, g in enumerate(adapter.groups):
            fused, scales, rows = {}, {}, {}
            for i in chunk:         # a member at a time; only this process's fused matrices kept
                ws = [hook.weights(i, m) for m in g.members]
                W, scales[i] = fuse(ws)
                rows[i] = tuple(np.shape(w)[0] for w in ws)
                if i in mine:
                    fused[i] = W
                del ws, W
            qls, prox = quantize_stack(
                _Local(chunk, fused.__getitem__),
                _Local(chunk, lambda i, g=g: load_layer_hessians(hdir, i, groups=(g.name,))[g.name]),
                [group_key(settings.seed, i, gi) for i in chunk], lift=hook.lift, proxies=True,
                **(kw[g.name] if kw else settings.quantize_kw()))
            for i, ql, p in zip(chunk, qls, prox):
                qg = QuantizedGroup(ql=ql, scales=jnp.asarray(scales[i]), members=g.members,
                                    rows=rows[i])
                groups[i][g.name] = qg
                info[i]["proxy"][g.name] = p
                curve = hook.after_group(i, gi, qg)
                if curve is not None:
                    info[i]["curves"][g.name] = curve
            del fused
        dt = (time.perf_counter() - t0) / len(chunk)
        for i in chunk:
            info[i]["seconds"] = dt
            final, fp_params = hook.end(i, groups[i])
            if processes.is_writer():         # every process holds the same codes
                ckpt.save_layer(out, i, final, fp_params, info[i])
            hook.saved(i)
            if progress:
                progress(i, info[i])
    processes.barrier("quantize_layers: saved")    # the others read what process 0 wrote


class _Local:
    """The sequence (one entry per layer of `chunk`) `quantize_stack` reads: entry j is
    `load(chunk[j])`, computed when read (it reads only this process's)."""

    def __init__(self, chunk, load):
        self.chunk, self.load = chunk, load

    def __len__(self):
        return len(self.chunk)

    def __getitem__(self, j):
        return self.load(self.chunk[j])


def check_model(spec, codebook: str, adapter=None, kw: Optional[dict] = None) -> None:
    """Every group the adapter quantizes has a shape the codebook can code (an input dimension
    that is a multiple of 8 for every E8P codebook; both dimensions multiples of 16 for the
    trellis codes, rows counted over the fused members): a ValueError naming the first one
    that has not,
    before any expensive stage. The rotations take any dimension; the codes do not."""
    adapter = adapter or adapter_of(spec)
    block = family_of(spec).abstract_block(spec)
    for g in adapter.groups:
        cb = kw[g.name]["codebook"] if kw else codebook
        rows, cols = codebooks.get(cb).shape_multiple
        path = g.members[0]
        n = get_path(block, path + ".weight").shape[1]
        m = sum(get_path(block, p + ".weight").shape[0] for p in g.members)   # fused rows
        if n % cols:
            raise ValueError(f"model.layers.0.{path} (and every layer's) has input dimension {n}, "
                             f"not a multiple of {cols}: {codebooks.get(cb).name} codes need "
                             f"it (the rotations "
                             "take any dimension); pad the model's weights with zero columns "
                             "to the next multiple first")
        if m % rows:
            raise ValueError(f"model.layers.0 group {g.name} ({', '.join(g.members)}) has {m} "
                             f"output rows, not a multiple of {rows}: {codebooks.get(cb).name} "
                             f"codes {rows} x {cols} tiles; choose an E8P codebook for this "
                             "group (--codebook, or a --rules entry)")
