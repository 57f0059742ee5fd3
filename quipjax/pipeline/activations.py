"""Activations on disk: the inputs of one block for every calibration window.

Layer-major passes (Hessian collection, in-block fine-tuning) read block i's inputs from
`acts_XXX.npy` and write its outputs, the inputs of block i + 1, so memory holds one block
and one batch of windows whatever the number of windows. Files are written under a temporary
name and renamed when complete, and `clean_work_dir` removes what a killed run left behind.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from quipjax.distributed.processes import to_host

__all__ = ["ActFile", "acts_path", "embed_windows", "forward_file", "clean_work_dir"]


def acts_path(work_dir: str, i: int) -> str:
    """The inputs of block i (the outputs of block i - 1) in `work_dir`."""
    return os.path.join(work_dir, f"acts_{i:03d}.npy")


def clean_work_dir(work_dir: str, keep) -> None:
    """Remove every activation file of `work_dir` but those of the blocks in `keep` (a run
    killed between writing one block's outputs and removing its inputs leaves files behind,
    and a killed write leaves a temporary file)."""
    if not os.path.isdir(work_dir):
        return
    kept = {acts_path(work_dir, i) for i in keep}
    for fn in os.listdir(work_dir):
        p = os.path.join(work_dir, fn)
        if fn.startswith("acts_") and p not in kept:
            os.remove(p)


def forward_file(fwd: Callable, xf: "ActFile", path: str, devices: int = 1) -> "ActFile":
    """Run fwd (x (devices, T, d) -> y, e.g. `distributed.block_forward_fn`) over every window
    of xf, `devices` windows at a time (the last call padded with zeros), into `path`
    (atomically; an existing file is reused)."""
    if os.path.exists(path):
        return ActFile(path)
    tmp = path + ".tmp.npy"
    yf = ActFile(tmp, xf.shape)
    N = xf.shape[0]
    for b in range(0, N, devices):
        x = np.zeros((devices,) + xf.shape[1:], np.float32)
        x[:min(devices, N - b)] = xf.read(b, min(b + devices, N))
        yf.write(b, to_host(fwd(x))[:min(devices, N - b)])
    os.replace(tmp, path)
    return ActFile(path)


class ActFile:
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


def embed_windows(src, windows: np.ndarray, path: str, batch: int = 1, valid=None) -> None:
    """Write the embeddings (N, T, d) float32 of windows (N, T) int32 to `path`, atomically;
    rows where `valid` (N,) bool is False (padding) are zeros."""
    emb = np.asarray(src.tensor("model.embed_tokens.weight"), np.float32)
    scale = src.family.embed_scale(src.spec)        # as `DecoderLM.embed` (Gemma: sqrt(d))
    out = ActFile(path + ".tmp.npy", windows.shape + (emb.shape[1],))
    for b in range(0, len(windows), batch):
        x = emb[windows[b:b + batch]]
        x = x if scale is None else x * np.float32(scale)
        if valid is not None:
            x = np.where(valid[b:b + batch, None, None], x, np.float32(0))
        out.write(b, x)
    del emb
    os.replace(path + ".tmp.npy", path)
