"""Fine-tuning stages of the job: in-block (a hook of the quantization loop) and end to end.

In-block (QuIP# section 3): each block's groups are quantized in the adapter's order
(qkv -> o -> gate/up -> down); after each but the last, the block is tuned to reproduce the FP
block's outputs on the FP inputs (MSE): the su/sv of the quantized groups, the weights of the
not-yet-quantized ones and the norms train. A later group is quantized from its tuned weights
with the FP Hessian, as the official code does. The FP inputs of each block stream through
disk files (`ft_acts/` in the output directory, `pipeline.activations`), and each finished
block is saved, so a killed run resumes at its first unfinished block.

End to end: every su/sv, the norms (and optionally the output head) train to match the FP
model's next-token distribution (KL), with validation and early stopping; the result is saved
as an override of the layers' values (`checkpoint.save_e2e`).

Both run with the parameters and batches placed by a `distributed.Placement` (a no-op on one
device); gradients summed over devices make a multi-device run close to, not bit-equal with,
the one-device run.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import layers, training
from quipjax.distributed import Placement, ShardLift, block_forward_fn, one_device_mesh, processes
from quipjax.distributed.processes import to_host
from quipjax.models.adapter import LLAMA, ModelAdapter, get_path
from quipjax.models.families import adapter_of
from quipjax.models.llama import Linear
from quipjax.models.parts import Head
from quipjax.models.loaders import CheckpointSource, load_block, load_model
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline.activations import (ActFile, acts_path, clean_work_dir, embed_windows,
                                          forward_file)
from quipjax.pipeline.build import build_model
from quipjax.pipeline.peak_memory import release_freed
from quipjax.pipeline.quantization import LayerHook
from quipjax.pipeline.settings import BlockTuneSettings, E2ESettings

__all__ = ["ActivationWindows", "BlockTuner", "finetune_e2e", "set_compute_dtype"]


def set_compute_dtype(module, dtype) -> None:
    """Make every `Linear` of `module` run its matmuls in `dtype` (weights stay float32)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Linear):
            node.compute_dtype = dtype


class _Windows:
    """Batches of (FP inputs, FP outputs) of one block from two activation files."""

    def __init__(self, x_file, y_file, n_train, bs, seed, layer, placement):
        self.x, self.y = x_file, y_file
        self.n_train, self.bs, self.seed, self.layer = n_train, bs, seed, layer
        self.n = x_file.shape[0]
        self.placement = placement

    def _batch(self, idx):
        x = np.stack([self.x.read(i, i + 1)[0] for i in idx])
        y = np.stack([self.y.read(i, i + 1)[0] for i in idx])
        return self.placement.batch((x, y))

    def train(self, epoch, stage):
        rng = np.random.default_rng([self.seed, self.layer, stage, epoch])
        perm = rng.permutation(self.n_train)
        for b in range(0, self.n_train - self.bs + 1, self.bs):     # drop the ragged tail
            yield self._batch(perm[b:b + self.bs])

    def valid(self):
        for b in range(self.n_train, self.n, self.bs):
            yield self._batch(range(b, min(b + self.bs, self.n)))


class ActivationWindows:
    """The fine-tuning data of each block, streamed through disk: `data(i)` loads block i
    (float32, matmuls in `compute_dtype`), runs it over its FP inputs (the outputs are the
    next block's inputs) and returns (block, train_batches(epoch, stage), valid_batches());
    `saved(i)` drops what layer i no longer needs.

    windows: (ft.train_size + ft.valid_size, ctx) int32; work: the directory of the block
    inputs (rebuilt with the FP model when a run starts or resumes without them; removed
    after the last layer).
    """

    def __init__(self, src: CheckpointSource, work: str, ft: BlockTuneSettings, compute_dtype,
                 windows: np.ndarray, *, seed: int, placement: Placement = Placement()):
        self.src, self.work, self.ft, self.windows = src, work, ft, windows
        self.cdt, self.seed, self.placement = jnp.dtype(compute_dtype), seed, placement

    def _forward(self, block, xf, i):
        return forward_file(block_forward_fn(block, self.placement), xf,
                            acts_path(self.work, i + 1), self.placement.devices)

    def _inputs(self, i: int) -> ActFile:
        os.makedirs(self.work, exist_ok=True)
        if not os.path.exists(acts_path(self.work, i)):
            clean_work_dir(self.work, keep=())
            embed_windows(self.src, self.windows, acts_path(self.work, 0), 1)
            for j in range(i):
                blk = load_block(self.src, j, jnp.float32)
                set_compute_dtype(blk, self.cdt)
                self._forward(blk, ActFile(acts_path(self.work, j)), j)
                os.remove(acts_path(self.work, j))
        clean_work_dir(self.work, keep=(i, i + 1))
        xf = ActFile(acts_path(self.work, i))
        if xf.shape[:2] != self.windows.shape:
            raise ValueError(f"{self.work} holds activations for other fine-tuning windows: "
                             "delete it and rerun")
        return xf

    def __call__(self, i: int):
        block = load_block(self.src, i, jnp.float32)
        set_compute_dtype(block, self.cdt)
        xf = self._inputs(i)
        w = _Windows(xf, self._forward(block, xf, i), self.ft.train_size, self.ft.bs,
                     self.seed, i, self.placement)
        return block, w.train, w.valid

    def saved(self, i: int) -> None:
        os.remove(acts_path(self.work, i))
        if i == self.src.spec.num_layers - 1:
            os.remove(acts_path(self.work, i + 1))
            if os.path.isdir(self.work) and not os.listdir(self.work):
                os.rmdir(self.work)


class BlockTuner(LayerHook):
    """The in-block fine-tuning hook of `quantization.quantize_layers`: one layer at a time,
    its groups quantized on one device, the block tuned with `placement` between groups.

    data: i -> (block i, train_batches(epoch, stage), valid_batches()) with batches of (FP
    inputs, FP outputs) of the block (`ActivationWindows`, or arrays in memory); its
    `saved(i)`, if any, is called once layer i is on disk.
    """

    width = 1

    def __init__(self, ft: BlockTuneSettings, compute_dtype, data: Callable, *, seed: int,
                 placement: Placement = Placement(), adapter: ModelAdapter = LLAMA,
                 log: Optional[Callable] = None):
        self.ft, self.cdt, self.data = ft, jnp.dtype(compute_dtype), data
        self.seed, self.placement, self.adapter, self.log = seed, placement, adapter, log
        self.lift = ShardLift(one_device_mesh())
        self.block = self.batches = None

    def begin(self, i):
        block, train_b, valid_b = self.data(i)
        self.block, self.batches = self.placement.module(block), (train_b, valid_b)

    def weights(self, i, member):
        return to_host(get_path(self.block, member).weight[...]).astype(np.float32)

    def after_group(self, i, index, group):
        layers.attach_tunable(self.block, group, self.cdt, self.ft.train_table)
        self.placement.module(self.block)
        if index == len(self.adapter.groups) - 1:
            return None                            # nothing left to tune for
        train_b, valid_b = self.batches
        tc = training.TuneConfig(epochs=self.ft.epochs, lr=self.ft.lr, susv_lr=self.ft.susv_lr,
                                 batch_size=self.ft.bs, update_freq=self.ft.update_freq,
                                 early_stop=self.ft.early_stop, seed=self.seed)
        curve = training.tune(self.block, training.block_mse,
                              lambda e: train_b(e, index), valid_b, tc)
        if self.log:
            c0, cb = curve[0]["valid"], min(c["valid"] for c in curve)
            msg = (f"layer {i} after {self.adapter.groups[index].name}: "
                   f"block MSE {c0:.4g} -> {cb:.4g} ({len(curve) - 1} epochs)")
            if len(curve) > 1 and not any(c["best"] for c in curve[1:]):
                msg += (": no epoch lowered it, the untuned values are kept (too high a "
                        "learning rate? --ft_lr / --ft_susv_lr)")
            self.log(msg)
        return curve

    def end(self, i, groups):
        tuned = {k: layers.detach_tunable(self.block, g) for k, g in groups.items()}
        return tuned, self.adapter.fp_params(self.block)

    def saved(self, i):
        if hasattr(self.data, "saved"):
            self.data.saved(i)
        self.block = self.batches = None


def teacher_hidden_states(teacher, windows: np.ndarray, bs: int, path: str,
                          placement: Placement = Placement()) -> ActFile:
    """Write the teacher's last hidden states (N, T, d) float32 of every window (N, T) to
    `path` (atomically), and return the file. Each batch of `bs` windows runs split over the
    mesh; every process writes every row (its own file: a batch made later from any windows
    is read from it).

    A row depends only on its own window (not on the rest of its batch), so batches made
    later from these rows carry the bits the teacher would give them. On disk, not in
    memory: at the paper's settings (384 windows of 4096 tokens) Llama-2-7B's are 24 GB.
    """
    @nnx.jit
    def hidden(teacher, tokens):
        return training.model_hidden(teacher, tokens, remat=False)

    out = None
    for b in range(0, len(windows), bs):
        h = to_host(hidden(teacher, jnp.asarray(placement.batch(windows[b:b + bs]))))
        if out is None:
            out = ActFile(path + ".tmp.npy", (len(windows),) + h.shape[1:])
        out.write(b, h)
    os.replace(out.path, path)
    return ActFile(path)


def finetune_e2e(ckpt_dir: str, src: CheckpointSource, e2e: E2ESettings, compute_dtype,
                 windows: np.ndarray, *, placement: Placement = Placement(),
                 adapter: Optional[ModelAdapter] = None, log: Optional[Callable] = None) -> list:
    """Tune su/sv, the norms (and the head with e2e.train_head) of the checkpoint's model to
    the FP model's next-token distribution; save the best as the checkpoint's e2e override.

    windows: (e2e.train_size + e2e.valid_size, ctx) int32. Returns the curve.
    """
    adapter = adapter or adapter_of(src.spec)
    cdt = jnp.dtype(compute_dtype)
    reader = ckpt.Reader(ckpt_dir)
    n_train, bs = e2e.train_size, e2e.bs
    # the teacher runs once per window, before the student exists: only its head stays (its
    # log-probs are made a chunk of positions at a time inside the loss, no (batch, ctx,
    # vocab) array held)
    work = processes.local_dir(os.path.join(ckpt_dir, "e2e_teacher"))
    shutil.rmtree(work, ignore_errors=True)          # what a killed run left
    os.makedirs(work)
    teacher = load_model(src, cdt, placement=placement)
    hidden = teacher_hidden_states(teacher, windows, bs, os.path.join(work, "hidden.npy"),
                                   placement)
    head_def, head_state = nnx.split(Head(teacher))
    del teacher
    release_freed()
    model = build_model(ckpt_dir, linears="tunable", dtype=cdt, placement=placement,
                        head_dtype=jnp.float32 if e2e.train_head else cdt, meta=reader.meta,
                        adapter=adapter, train_table=e2e.train_table)

    def batch(idx):
        idx = np.asarray(list(idx))
        h = np.concatenate([hidden.read(i, i + 1) for i in idx])
        tok, h = placement.batch((windows[idx], h))
        return jnp.asarray(tok), (h, head_state)

    def train(epoch):
        perm = np.random.default_rng([reader.meta["settings"]["seed"], 1 << 20, epoch]).permutation(n_train)
        for b in range(0, n_train - bs + 1, bs):
            yield batch(perm[b:b + bs])

    def valid():
        for b in range(n_train, len(windows), bs):
            yield batch(range(b, min(b + bs, len(windows))))

    head = "embed_tokens" if model.lm_head is None else "lm_head"
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")),
                        nnx.Not(nnx.PathContains("lm_head")))
    if e2e.train_head:
        trainable = nnx.All(nnx.Param, nnx.Any(trainable, nnx.PathContains(head)))
    tc = training.TuneConfig(epochs=e2e.epochs, lr=e2e.lr, susv_lr=e2e.susv_lr, batch_size=bs,
                             update_freq=e2e.update_freq, early_stop=e2e.early_stop)

    def prog(c):
        if log:
            tr = "" if c["train"] is None else f"train KL {c['train']:.4f}, "
            log(f"e2e epoch {c['epoch']}: {tr}valid KL {c['valid']:.4f} ({c['seconds']:.0f} s)")
    loss = functools.partial(training.distill_kl, teacher_head=head_def)
    with training.stacked_blocks(model):       # stacked once, not copied at every step
        release_freed()       # what building, loading and stacking left (BUILD_NOTES.md)
        curve = training.tune(model, loss, train, valid, tc, trainable=trainable,
                              progress=prog)
    shutil.rmtree(work, ignore_errors=True)
    if log and len(curve) > 1 and not any(c["best"] for c in curve[1:]):
        log("e2e: no epoch lowered the validation KL, the untuned values are kept (too high a "
            "learning rate? --e2e_lr / --e2e_susv_lr)")
    _save_e2e(ckpt_dir, reader, model, adapter, head if e2e.train_head else None, curve)
    return curve


def _save_e2e(ckpt_dir, reader, model, adapter, head: Optional[str], curve) -> None:
    """Save the tuned su/sv (and tables), norms, and the head if it trained (`head`: its
    name), as the checkpoint's e2e override (written once)."""
    tuned_layers = []
    for i, block in enumerate(model.layers):
        groups, _ = reader.layer(i)
        tuned = {k: layers.detach_tunable(block, g) for k, g in groups.items()}
        tuned_layers.append({"groups": {k: (g.ql.SU, g.ql.SV) + (
                                            () if g.ql.table is None else (g.ql.table,))
                                        for k, g in tuned.items()},
                             "norms": adapter.fp_params(block)})
    glob = {"norm": to_host(model.norm.weight[...])}
    if head is not None:
        glob[head] = to_host((model.embed_tokens if head == "embed_tokens"
                              else model.lm_head.weight)[...])
    if processes.is_writer():
        ckpt.save_e2e(ckpt_dir, tuned_layers, glob, {"curve": curve})
    processes.barrier("e2e: saved")
