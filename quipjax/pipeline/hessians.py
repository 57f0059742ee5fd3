"""Hessian collection: one pass of the FP model over the calibration windows, block by block.

Layer-major: block i reads its inputs for all windows from a disk file, accumulates the
Hessian of each linear group's input (recorders wrap the group's first member, so the
statistics live beside the model, Qwix-style), and writes its outputs, the inputs of block
i + 1. Memory holds one block, its accumulators and one batch of activations: it does not grow
with the number of windows (the disk files do). Each finished layer is saved atomically
(`layer_XXX.npz`), so a killed run resumes at the first missing layer.

The block steps run through `quipjax.sharding.HessianEngine`, on one device or data-parallel
over a mesh (windows split over the devices, one psum per layer): the windows are dealt to a
fixed number of accumulator slots (`shards`) that are combined by an exact sum, so the
Hessians are the same bits on any mesh.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import hessian
from quipjax.models.adapter import LLAMA, ModelAdapter
from quipjax.models.loaders import CheckpointSource, load_block

__all__ = ["HessianRecorder", "collect_hessians", "load_layer_hessians", "layer_file"]


class CalibStats(nnx.Variable):
    """A `hessian.HessianState` held in a module."""


class HessianRecorder(nnx.Module):
    """Wraps a linear layer: accumulates the Hessian of its inputs, then calls it."""

    def __init__(self, inner, n: int):
        self.inner = inner
        self.stats = CalibStats(hessian.init(n))

    def __call__(self, x):
        # the statistics of what the layer actually multiplies: x in its weights' dtype
        w = getattr(self.inner, "weight", None)
        xs = x.astype(w.dtype) if w is not None else x
        self.stats.set_value(hessian.update(self.stats.get_value(), xs))
        return self.inner(x)


def layer_file(hess_dir: str, i: int) -> str:
    return os.path.join(hess_dir, f"layer_{i:03d}.npz")


def _acts_file(work_dir: str, i: int) -> str:
    return os.path.join(work_dir, f"acts_{i:03d}.npy")


def _save_npz(path, **arrays):
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


class _ActFile:
    """An .npy file of activations read and written one batch at a time with positional I/O.

    (A memmap would do, but its touched pages count as resident memory, which then grows with
    the number of windows.)
    """

    def __init__(self, path, shape=None):
        self.path = path
        if shape is not None:                       # create
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                        "fortran_order": False, "shape": tuple(shape)})
                self.offset = f.tell()
                f.truncate(self.offset + int(np.prod(shape)) * 4)
            self.shape = tuple(shape)
        else:                                       # open
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                self.shape, _, dtype = read(f)
                self.offset = f.tell()
            if dtype != np.float32:
                raise ValueError(f"{path}: activations must be float32, got {dtype}")
        self.row = int(np.prod(self.shape[1:])) * 4

    def read(self, b0, b1):
        with open(self.path, "rb") as f:
            f.seek(self.offset + b0 * self.row)
            buf = np.fromfile(f, np.float32, (b1 - b0) * self.row // 4)
        return buf.reshape((b1 - b0,) + self.shape[1:])

    def write(self, b0, arr):
        with open(self.path, "r+b") as f:
            f.seek(self.offset + b0 * self.row)
            np.ascontiguousarray(arr, np.float32).tofile(f)


def _embed_all(src, windows, path, batch):
    emb = np.asarray(src.tensor("model.embed_tokens.weight"), np.float32)
    out = _ActFile(path + ".tmp.npy", windows.shape + (emb.shape[1],))
    for b in range(0, len(windows), batch):
        out.write(b, emb[windows[b:b + batch]])
    del emb
    os.replace(path + ".tmp.npy", path)


def collect_hessians(src: CheckpointSource, windows: np.ndarray, hess_dir: str, *,
                     adapter: ModelAdapter = LLAMA, dtype=jnp.bfloat16, batch: int = 1,
                     progress: Optional[Callable] = None, mesh=None,
                     shards: Optional[int] = None) -> None:
    """Write layer_XXX.npz (H_<group>, mean_<group>, count) for every layer into hess_dir.

    Reuses the layers already there (resume). windows (N, T) int32. batch: windows per
    forward pass of one device. mesh: a `jax.sharding.Mesh` (quipjax.sharding.parse_mesh) to
    split the windows over its devices, None for one device; shards: accumulator slots
    (default `sharding.DEFAULT_HESSIAN_SHARDS`, a multiple of the device count; the result
    depends on it, not on the mesh). progress(layer, done, total) is called after each step.
    """
    from quipjax import sharding
    shards = shards or sharding.DEFAULT_HESSIAN_SHARDS
    spec = src.spec
    L = spec.num_layers
    os.makedirs(hess_dir, exist_ok=True)
    missing = [i for i in range(L) if not os.path.exists(layer_file(hess_dir, i))]
    if not missing:
        return
    work = os.path.join(hess_dir, "acts")
    os.makedirs(work, exist_ok=True)
    first = missing[0]
    if not os.path.exists(_acts_file(work, first)):
        # no saved inputs for `first`: restart the forward from the embeddings
        _embed_all(src, windows, _acts_file(work, 0), batch)
        start = 0
    else:
        start = first
    N, T = windows.shape
    D = sharding.num_devices(mesh)
    G = D * batch                              # windows per step
    n_steps = -(-N // G)
    for i in range(start, L):
        acts = _ActFile(_acts_file(work, i))
        if acts.shape[:2] != windows.shape:
            raise ValueError(f"saved activations {acts.shape} do not match the calibration windows "
                             f"{windows.shape}: delete {work} to recollect")
        block = load_block(src, i, dtype)
        record = i in missing
        # layers already collected still run through the same (tapped) step, so the
        # activations do not depend on where a run resumed
        eng = sharding.HessianEngine(block, mesh, shards, adapter)
        out_path = _acts_file(work, i + 1)
        need_out = i + 1 < L
        out = _ActFile(out_path + ".tmp.npy", acts.shape) if need_out else None
        for t in range(n_steps):
            b0, b1 = t * G, min((t + 1) * G, N)
            x = np.zeros((G,) + acts.shape[1:], np.float32)
            x[:b1 - b0] = acts.read(b0, b1)
            mask = np.zeros((G, T), np.float32)
            mask[:b1 - b0] = 1.0
            y = eng.step(x, t, mask)
            if need_out:
                out.write(b0, np.asarray(y)[:b1 - b0])
            if progress is not None:
                progress(i, t + 1, n_steps)
        if need_out:
            os.replace(out_path + ".tmp.npy", out_path)
        if record:
            arrays = {}
            for name, st in eng.finalize().items():
                arrays[f"H_{name}"] = np.asarray(st.H)
                arrays[f"mean_{name}"] = np.asarray(st.mean)
                arrays["count"] = np.asarray(st.count)
            _save_npz(layer_file(hess_dir, i), **arrays)
        del acts, eng
        os.remove(_acts_file(work, i))
    if os.path.isdir(work) and not os.listdir(work):
        os.rmdir(work)
