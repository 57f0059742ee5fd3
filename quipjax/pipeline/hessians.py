"""Hessian collection: one pass of the FP model over the calibration windows, block by block.

Layer-major: block i reads its inputs for all windows from a disk file
(`pipeline.activations`), accumulates the Hessian of each linear group's input (a tap on the
group's first member, `quipjax.layers.InputTap`), and writes its outputs, the inputs of block
i + 1. Memory holds one block, its accumulators and one batch of activations: it does not grow
with the number of windows (the disk files do). Each finished layer is saved atomically
(`layer_XXX.npz`), so a killed run resumes at the first missing layer.

The block steps run through `quipjax.distributed.HessianEngine`, on one device or
data-parallel over a mesh (windows split over the devices, one all-reduce per layer): the
windows are dealt to a fixed number of accumulator slots (`shards`) that are combined by an
exact sum, so the Hessians are the same bits on any mesh. They depend on the batch size
(windows per forward pass of a device), which is part of the cache key of the pipeline.

In a run of several processes (`quipjax.distributed.processes`) each process embeds, feeds
and keeps on disk only its share of the windows (the rows of each step its devices take:
`acts.p<i>of<n>/`), and process 0 writes the Hessians: the same bits as one process.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from quipjax.distributed import DEFAULT_HESSIAN_SHARDS, HessianEngine, Placement, processes
from quipjax.models.adapter import ModelAdapter
from quipjax.models.families import adapter_of
from quipjax.models.loaders import CheckpointSource, load_block
from quipjax.pipeline.activations import ActFile, acts_path, clean_work_dir, embed_windows

__all__ = ["collect_hessians", "load_layer_hessians", "layer_file", "save_npz", "pool_starved"]


def layer_file(hess_dir: str, i: int) -> str:
    return os.path.join(hess_dir, f"layer_{i:03d}.npz")


def save_npz(path: str, **arrays) -> None:
    """np.savez under a temporary name, then renamed: a reader never sees half a file."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_layer_hessians(hess_dir: str, i: int, groups=None) -> dict:
    """{group name: H (n, n) float32} of layer i (only `groups` if given); a clear error when
    missing or truncated."""
    path = layer_file(hess_dir, i)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Hessians of layer {i} are missing ({path}): collect them first")
    try:
        with np.load(path) as z:
            return {k[2:]: z[k] for k in z.files
                    if k.startswith("H_") and (groups is None or k[2:] in groups)}
    except Exception as e:
        raise ValueError(f"{path} is unreadable (truncated?): delete it to recollect: {e}") from e


def pool_starved(stats: dict, adapter: ModelAdapter, layer: int, log=None) -> dict:
    """The policy for experts that receive too few tokens: a routed group (`adapter.pools`)
    with fewer tokens than its input dimension (H would be singular or noise) takes the
    pooled Hessian of its pool in this layer, sum_e count_e H_e / sum_e count_e over the
    pool's groups (every routed token of the layer, once per expert it went to), and its
    mean likewise; each replacement is logged. A pool without any token is an error.

    stats: {group: HessianStats} (numpy, from `HessianEngine.finalize`). Returns
    {group: (H, mean, count, pooled)}: float32 arrays, the group's own count, pooled bool.
    """
    out = {k: (np.asarray(s.H), np.asarray(s.mean), float(s.count), False)
           for k, s in stats.items()}
    pools = {}
    for g, p in adapter.pools:
        pools.setdefault(p, []).append(g)
    for pool, members in pools.items():
        counts = np.array([out[g][2] for g in members], np.float64)
        starved = [g for g, c in zip(members, counts) if c < out[g][0].shape[0]]
        if not starved:
            continue
        total = counts.sum()
        if total <= 0:
            raise ValueError(f"layer {layer}: no calibration token reached any group of "
                             f"{pool}: use more calibration windows")
        used = [(g, c) for g, c in zip(members, counts) if c > 0]
        H = sum(c * out[g][0].astype(np.float64) for g, c in used) / total
        mean = sum(c * out[g][1].astype(np.float64) for g, c in used) / total
        for g in starved:
            out[g] = (H.astype(np.float32), mean.astype(np.float32), out[g][2], True)
        if log is not None:
            log(f"layer {layer}: {len(starved)} of {len(members)} {pool} groups had fewer "
                f"tokens than their input dimension ({', '.join(f'{g}: {int(out[g][2])}' for g in starved)}); "
                f"they use the layer's pooled {pool} Hessian ({int(total)} tokens)")
    return out


def collect_hessians(src: CheckpointSource, windows: np.ndarray, hess_dir: str, *,
                     adapter: ModelAdapter = None, dtype=jnp.bfloat16, batch: int = 1,
                     progress: Optional[Callable] = None, placement: Placement = Placement(),
                     shards: int = DEFAULT_HESSIAN_SHARDS, log: Optional[Callable] = None) -> None:
    """Write layer_XXX.npz (H_<group>, mean_<group>, count) for every layer into hess_dir.

    Reuses the layers already there (resume). windows (N, T) int32. batch: windows per
    forward pass of one device. placement: the devices the windows are split over. shards:
    accumulator slots (a multiple of the device count; the result depends on it, not on the
    mesh). progress(layer, done, total) is called after each step. Experts that receive too
    few tokens follow `pool_starved` (log: where its lines go).
    """
    L = src.spec.num_layers
    os.makedirs(hess_dir, exist_ok=True)
    missing = [i for i in range(L) if not os.path.exists(layer_file(hess_dir, i))]
    processes.barrier("hessians: listed")      # before process 0 writes any layer
    if not missing:
        return
    N, T = windows.shape
    G = placement.devices * batch                 # windows per step
    n_steps = -(-N // G)
    # this process's rows of every step: window t G + r for r in [lo, hi) (past N: padding,
    # zero activations and no weight); with one process, every row
    lo, hi = placement.local_rows(G)
    rows = (np.arange(n_steps)[:, None] * G + np.arange(lo, hi)[None]).reshape(-1)
    valid = rows < N
    local = np.where(valid[:, None], windows[np.minimum(rows, N - 1)], 0)
    Gl = hi - lo
    work = processes.local_dir(os.path.join(hess_dir, "acts"))
    if processes.is_writer():       # what a killed run with another process count left
        for d in os.listdir(hess_dir):
            m = re.fullmatch(r"acts(\.p\d+of(\d+))?", d)
            if m and int(m.group(2) or 1) != processes.count():
                shutil.rmtree(os.path.join(hess_dir, d))
    processes.barrier("hessians: cleaned")
    os.makedirs(work, exist_ok=True)
    start = missing[0]
    if (not os.path.exists(acts_path(work, start))
            or ActFile(acts_path(work, start)).shape[:2] != local.shape):
        # no saved inputs for `start` (or saved for another device layout): restart the
        # forward from the embeddings
        start = 0
        embed_windows(src, local, acts_path(work, 0), batch, valid=valid)
    clean_work_dir(work, keep=(start,))
    for i in range(start, L):
        acts = ActFile(acts_path(work, i))
        # layers already collected still run through the same (tapped) step, so the
        # activations do not depend on where a run resumed
        adapter = adapter or adapter_of(src.spec)
        eng = HessianEngine(load_block(src, i, dtype), placement, shards, adapter)
        out_path = acts_path(work, i + 1)
        out = ActFile(out_path + ".tmp.npy", acts.shape) if i + 1 < L else None
        for t in range(n_steps):
            r0, r1 = t * Gl, (t + 1) * Gl
            mask = np.repeat(valid[r0:r1, None], T, 1).astype(np.float32)
            y = eng.step(acts.read(r0, r1), t, mask, windows=G)
            if out is not None:          # padding rows stay zero, as they entered
                out.write(r0, np.where(valid[r0:r1, None, None], y, np.float32(0)))
            if progress is not None:
                progress(i, t + 1, n_steps)
        if out is not None:
            os.replace(out_path + ".tmp.npy", out_path)
        stats = eng.finalize()          # every process: the reduction is collective
        if i in missing and processes.is_writer():
            arrays = {}
            for name, (H, mean, count, pooled) in pool_starved(stats, adapter, i, log).items():
                arrays[f"H_{name}"] = H
                arrays[f"mean_{name}"] = mean
                if adapter.pool_of(name):
                    arrays[f"count_{name}"] = np.float32(count)
                    arrays[f"pooled_{name}"] = np.bool_(pooled)
                else:
                    arrays["count"] = np.asarray(stats[name].count)
            save_npz(layer_file(hess_dir, i), **arrays)
        del acts, eng
        os.remove(acts_path(work, i))
    if os.path.isdir(work) and not os.listdir(work):
        os.rmdir(work)
    processes.barrier("hessians: saved")      # the others read what process 0 wrote
